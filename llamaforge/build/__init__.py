"""The build stage: an exported, pass-processed graph becomes an engine directory.

    builder.py       build orchestration: checkpoint -> export -> passes -> backend -> manifest
    trt_backend.py   the TensorRT backend (a serialized plan from the lowered ONNX graph)
    compare_data.py  polygraphy data loader for `make compare-trt`
    atomic.py        build in a temporary sibling directory, then rename into place
"""
