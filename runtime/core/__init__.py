"""The engine core: the step loop, the scheduler, the KV cache, the model runner, sampling and
(de)tokenization. No front end and no transport: front ends drive it through `EngineCore`."""
