"""Triton Inference Server Python-backend models of a generated model repository (`make repo`).

    interfaces.py       the tensors of every model and the ensemble's wiring (no Triton import;
                        triton_repo/repository.py builds each config.pbtxt from it)
    text.py             tokenization and stateless detokenization steps (no Triton import)
    backend.py          helpers shared by the models (parameters, tensors, errors)
    metrics.py          the engine core's metrics through pb_utils.MetricFamily
    preprocessing.py, llama.py, postprocessing.py, bls.py
                        one `TritonPythonModel` each; they import `triton_python_backend_utils`,
                        which exists only inside Triton's Python backend (tests use a stand-in)

The sources live in the runtime package, not as templates, so they are imported, type-checked and
tested like the rest of the runtime; the generator copies the whole `runtime` package next to each
model's `model.py` (a two-line re-export), which is how the repository carries its own code.
The `llama` model drives the same `EngineCore` as the standalone server: no batching logic here.
"""
