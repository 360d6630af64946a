"""A STAND-IN for `triton_python_backend_utils`, the module Triton's Python backend gives models
(a helper module for tests, not a test file, and not Triton).

A real Triton server cannot run on our machines, so tests/triton_repo/test_triton_repo.py runs the generated
repository's Python-backend models in-process against this module. It implements the documented
API surface those models use (python_backend README: "Usage", "Decoupled mode", "Request
Cancellation Handling", "Business Logic Scripting", "Custom Metrics"):

    Tensor(name, ndarray).name() / .as_numpy()
    InferenceRequest: inputs(), get_input_tensor_by_name, get_response_sender, is_cancelled,
        request_id, parameters (a JSON string), requested_output_names; the BLS form
        InferenceRequest(model_name=, requested_output_names=, inputs=).exec(decoupled=) with a
        response iterator that has cancel()
    InferenceResponse(output_tensors, error).output_tensors() / has_error() / error()
    InferenceResponseSender.send(response, flags) / is_cancelled()
    TritonError(message, code) with the documented codes, TRITONSERVER_RESPONSE_COMPLETE_FINAL
    get_input_config_by_name, get_output_config_by_name, triton_string_to_numpy
    MetricFamily(name, description, kind) with COUNTER / GAUGE / HISTOGRAM; .Metric(labels,
        buckets) with increment / set / observe / value

and, in place of the server, `StandInServer`: loads a generated repository's config.pbtxt files,
initialises each Python model with the `args` Triton passes, checks request tensors against the
config as Triton does (names, datatypes, optional inputs, dims after the batch dimension of a
model with max_batch_size > 0, one batch size per request), runs the ensemble's steps by its
input_map/output_map (one downstream run per response of a decoupled step, as Triton does), routes
BLS calls and propagates a client's cancellation to the requests it caused. Responses a model
sends after its final one, or a request it never finishes, fail the test. As Triton (one instance
per model here), it runs one `execute` of a model at a time; a decoupled model's must return None,
a non-decoupled model's must return one response per request (and it has no response sender).
"""

from __future__ import annotations

import importlib
import json
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

_NP = {"TYPE_BOOL": np.bool_, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
       "TYPE_INT64": np.int64, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
       "TYPE_UINT64": np.uint64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
       "TYPE_STRING": np.object_}


def install() -> Any:
    """Make `import triton_python_backend_utils` give this module."""
    module = sys.modules[__name__]
    sys.modules["triton_python_backend_utils"] = module
    return module


def triton_string_to_numpy(triton_type: str) -> Any:
    return _NP[triton_type]


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in model_config.get("input", []) if c["name"] == name), None)


def get_output_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in model_config.get("output", []) if c["name"] == name), None)


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self._code})"


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"Tensor {name}: expected a NumPy array, got {type(array).__name__}")
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None,
                 parameters: Any = None) -> None:
        self._tensors, self._error = list(output_tensors or []), error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceResponseSender:
    """Delivers responses to `deliver(response_or_None, flags)`; refuses sends after the final one."""

    def __init__(self, deliver: Callable[[InferenceResponse | None, int], None], cancelled: threading.Event) -> None:
        self._deliver, self._cancelled = deliver, cancelled
        self._lock = threading.Lock()
        self.closed = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError("response sent after TRITONSERVER_RESPONSE_COMPLETE_FINAL")
            if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                self.closed = True
        self._deliver(response, flags)

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()


class ResponseIterator:
    """What `exec(decoupled=True)` returns: the responses as they come, the flag-only final one as
    an empty response; `cancel()` cancels the request."""

    def __init__(self, cancelled: threading.Event) -> None:
        self._queue: queue.Queue[tuple[InferenceResponse | None, int]] = queue.Queue()
        self._cancelled = cancelled

    def put(self, response: InferenceResponse | None, flags: int) -> None:
        self._queue.put((response, flags))

    def __iter__(self) -> Iterator[InferenceResponse]:
        while True:
            response, flags = self._queue.get(timeout=60)
            yield response if response is not None else InferenceResponse()
            if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                return

    def cancel(self) -> None:
        self._cancelled.set()


class InferenceRequest:
    def __init__(self, request_id: str = "", correlation_id: int = 0, inputs: list[Tensor] | None = None,
                 requested_output_names: list[str] | None = None, model_name: str = "", model_version: int = -1,
                 flags: int = 0, timeout: int = 0, preferred_memory: Any = None, trace: Any = None,
                 parameters: Mapping[str, Any] | None = None) -> None:
        self._id, self._inputs = request_id, list(inputs or [])
        self._outputs = list(requested_output_names or [])
        self.model_name = model_name
        self._parameters = json.dumps(dict(parameters or {}))
        self.cancelled = threading.Event()
        self._sender: InferenceResponseSender | None = None

    # -- what a model sees ---------------------------------------------------------------------
    def inputs(self) -> list[Tensor]:
        return self._inputs

    def get_input_tensor_by_name(self, name: str) -> Tensor | None:
        return next((t for t in self._inputs if t.name() == name), None)

    def request_id(self) -> str:
        return self._id

    def parameters(self) -> str:
        return self._parameters

    def requested_output_names(self) -> list[str]:
        return self._outputs

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            raise RuntimeError("get_response_sender() on a request that no server dispatched")
        return self._sender

    # -- BLS ------------------------------------------------------------------------------------------
    def exec(self, decoupled: bool = False) -> Any:
        if _SERVER is None:
            raise RuntimeError("no StandInServer is running")
        return _SERVER.bls(self, decoupled)


class Metric:
    def __init__(self, family: MetricFamily, labels: dict[str, str], buckets: list[float] | None) -> None:
        self.family, self.labels, self.buckets = family, labels, buckets
        self._value = 0.0
        self.observations: list[float] = []
        self._lock = threading.Lock()

    def increment(self, value: float) -> None:
        if self.family.kind == MetricFamily.HISTOGRAM:
            raise RuntimeError("increment() on a histogram")
        if self.family.kind == MetricFamily.COUNTER and value < 0:
            raise ValueError("a counter cannot decrease")
        with self._lock:
            self._value += value

    def set(self, value: float) -> None:
        if self.family.kind != MetricFamily.GAUGE:
            raise RuntimeError("set() is only for gauges")
        self._value = float(value)

    def observe(self, value: float) -> None:
        if self.family.kind != MetricFamily.HISTOGRAM:
            raise RuntimeError("observe() is only for histograms")
        with self._lock:
            self.observations.append(float(value))

    def value(self) -> float:
        if self.family.kind == MetricFamily.HISTOGRAM:
            raise RuntimeError("value() is not available for histograms")
        return self._value


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"
    registry: dict[str, MetricFamily] = {}
    name: str
    description: str
    kind: str
    metrics: list[Metric]

    def __new__(cls, name: str, description: str, kind: str) -> MetricFamily:
        existing = cls.registry.get(name)
        if existing is not None:  # Triton: same name and kind is the same family
            if existing.kind != kind:
                raise ValueError(f"metric family {name} already exists with kind {existing.kind}")
            return existing
        fam = super().__new__(cls)
        fam.name, fam.description, fam.kind, fam.metrics = name, description, kind, []
        cls.registry[name] = fam
        return fam

    def __init__(self, name: str, description: str, kind: str) -> None:
        pass

    def Metric(self, labels: Mapping[str, str] | None = None, buckets: list[float] | None = None) -> Metric:  # noqa: N802
        if (self.kind == MetricFamily.HISTOGRAM) != (buckets is not None):
            raise ValueError("buckets are required for, and only for, histograms")
        m = Metric(self, dict(labels or {}), buckets)
        self.metrics.append(m)
        return m


# -- the server's side ------------------------------------------------------------------------------

_SERVER: StandInServer | None = None


class Call:
    """One client request: its responses (outputs dict or TritonError) in order, `done` once final."""

    def __init__(self) -> None:
        self.items: list[dict[str, np.ndarray] | TritonError] = []
        self.finals = 0
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self.arrived = threading.Condition()

    def deliver(self, item: dict[str, np.ndarray] | TritonError | None, final: bool) -> None:
        with self.arrived:
            if self.done.is_set():
                raise RuntimeError("a response arrived after the final one")
            if item is not None:
                self.items.append(item)
            if final:
                self.finals += 1
                self.done.set()
            self.arrived.notify_all()

    def wait(self, timeout: float = 60.0) -> Call:
        if not self.done.wait(timeout):
            raise TimeoutError("the request never got its final response")
        return self

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.items) >= n or self.done.is_set(), timeout):
                raise TimeoutError(f"fewer than {n} responses arrived")

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def outputs(self) -> list[dict[str, np.ndarray]]:
        return [i for i in self.items if isinstance(i, dict)]

    @property
    def errors(self) -> list[TritonError]:
        return [i for i in self.items if isinstance(i, TritonError)]


class StandInServer:
    """Loads the Python models of a generated repository from the runtime package in this process."""

    def __init__(self, repo: Path, instance_kind: str = "CPU") -> None:
        global _SERVER
        install()
        MetricFamily.registry.clear()  # one server per process at a time, as in Triton
        self.repo = Path(repo)
        self.configs: dict[str, mc.ModelConfig] = {}
        self.models: dict[str, Any] = {}
        self._executing: dict[str, threading.Lock] = {}  # one execute at a time per model (instance)
        for config_path in sorted(self.repo.glob("*/config.pbtxt")):
            cfg = text_format.Parse(config_path.read_text(), mc.ModelConfig())
            self.configs[cfg.name] = cfg
        for name, cfg in self.configs.items():
            if cfg.backend == "python":
                module = importlib.import_module(f"llamaforge.triton_repo.models.{name}")
                model = module.TritonPythonModel()
                model.initialize({
                    "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                    "model_instance_kind": instance_kind, "model_instance_device_id": "0",
                    "model_instance_name": f"{name}_0_0", "model_repository": str(self.repo / name),
                    "model_version": "1", "model_name": name,
                })
                self.models[name] = model
                self._executing[name] = threading.Lock()
        _SERVER = self

    def stop(self) -> None:
        global _SERVER
        for model in self.models.values():
            if hasattr(model, "finalize"):
                model.finalize()
        _SERVER = None

    # -- Triton's request validation ------------------------------------------------------------------
    def check_inputs(self, model: str, tensors: Mapping[str, np.ndarray]) -> TritonError | None:
        """As Triton: names, datatypes, required inputs, and shapes against the dims; with
        max_batch_size > 0 every shape is [batch, *dims], every input has the same batch size, and
        that is at most max_batch_size."""
        cfg = self.configs[model]
        declared = {i.name: i for i in cfg.input}
        batch: int | None = None
        for name, arr in tensors.items():
            spec = declared.get(name)
            if spec is None:
                return TritonError(f"[request id: ] unexpected inference input '{name}' for model '{model}'",
                                   TritonError.INVALID_ARG)
            want = np.dtype(_NP[mc.DataType.Name(spec.data_type)])
            if arr.dtype != want:
                return TritonError(f"input '{name}': datatype {arr.dtype} does not match {want}", TritonError.INVALID_ARG)
            dims = list(spec.dims)
            shape = list(arr.shape)
            if cfg.max_batch_size > 0:
                if not shape:
                    return TritonError(f"input '{name}': shape [] has no batch dimension", TritonError.INVALID_ARG)
                if batch is None:
                    batch = shape[0]
                elif shape[0] != batch:
                    return TritonError(f"input '{name}' batch size does not match other inputs for '{model}'",
                                       TritonError.INVALID_ARG)
                if not 1 <= batch <= cfg.max_batch_size:
                    return TritonError(f"inference request batch-size must be <= {cfg.max_batch_size} for '{model}'",
                                       TritonError.INVALID_ARG)
                shape = shape[1:]
            if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
                return TritonError(f"input '{name}': shape {list(arr.shape)} does not match the config dims {dims}"
                                   + (" after the batch dimension" if cfg.max_batch_size > 0 else ""),
                                   TritonError.INVALID_ARG)
        missing = [i.name for i in cfg.input if not i.optional and i.name not in tensors]
        if missing:
            return TritonError(f"expected input '{missing[0]}' for model '{model}'", TritonError.INVALID_ARG)
        return None

    # -- dispatch -----------------------------------------------------------------------------------------
    def infer(self, model: str, tensors: Mapping[str, np.ndarray], request_id: str = "",
              parameters: Mapping[str, Any] | None = None) -> Call:
        """A client request; returns at once (decoupled models answer from their threads)."""
        call = Call()
        self._dispatch(model, dict(tensors), request_id, parameters, call.cancelled,
                       lambda outputs, final: call.deliver(outputs, final))
        return call

    def _dispatch(self, model: str, tensors: dict[str, np.ndarray], request_id: str,
                  parameters: Mapping[str, Any] | None, cancelled: threading.Event,
                  deliver: Callable[[dict[str, np.ndarray] | TritonError | None, bool], None]) -> None:
        error = self.check_inputs(model, tensors)
        if error is not None:
            deliver(error, True)
            return
        cfg = self.configs[model]
        if cfg.platform == "ensemble":
            self._run_ensemble(cfg, tensors, request_id, parameters, cancelled, deliver)
            return
        request = InferenceRequest(request_id=request_id, inputs=[Tensor(k, v) for k, v in tensors.items()],
                                   requested_output_names=[o.name for o in cfg.output], model_name=model,
                                   parameters=parameters)
        request.cancelled = cancelled

        def on_response(response: InferenceResponse | None, flags: int) -> None:
            final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            if response is None:
                deliver(None, final)
            elif response.has_error():
                deliver(response.error(), final)
            else:
                deliver({t.name(): t.as_numpy() for t in response.output_tensors()}, final)

        if cfg.model_transaction_policy.decoupled:
            request._sender = InferenceResponseSender(on_response, cancelled)
            with self._executing[model]:
                result = self.models[model].execute([request])
            assert result is None, f"decoupled model {model} must return None from execute()"
        else:
            with self._executing[model]:
                responses = self.models[model].execute([request])
            assert isinstance(responses, list) and len(responses) == 1, \
                f"model {model} must return one response per request, got {responses!r}"
            assert isinstance(responses[0], InferenceResponse), f"model {model} returned {responses[0]!r}"
            on_response(responses[0], TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _run_ensemble(self, cfg: mc.ModelConfig, tensors: dict[str, np.ndarray], request_id: str,
                      parameters: Mapping[str, Any] | None, cancelled: threading.Event,
                      deliver: Callable[[dict[str, np.ndarray] | TritonError | None, bool], None]) -> None:
        steps = list(cfg.ensemble_scheduling.step)
        outputs = [o.name for o in cfg.output]
        pending = {"n": 1}  # downstream runs not yet finished: the ensemble is final when none is left
        lock = threading.Lock()

        def finish_one(item: dict[str, np.ndarray] | TritonError | None) -> None:
            with lock:
                pending["n"] -= 1
                final = pending["n"] == 0
            deliver(item, final)

        def run(index: int, env: dict[str, np.ndarray]) -> None:
            if index == len(steps):
                finish_one({name: env[name] for name in outputs if name in env})
                return
            step = steps[index]
            inputs = {k: env[v] for k, v in step.input_map.items() if v in env}

            def on_step_response(item: dict[str, np.ndarray] | TritonError | None, final: bool) -> None:
                if isinstance(item, TritonError):
                    finish_one(item) if final else None
                    return
                if item is not None:
                    with lock:
                        pending["n"] += 1
                    run(index + 1, {**env, **{step.output_map[k]: v for k, v in item.items() if k in step.output_map}})
                if final:
                    finish_one(None)

            self._dispatch(step.model_name, inputs, request_id, parameters, cancelled, on_step_response)

        run(0, dict(tensors))

    def bls(self, request: InferenceRequest, decoupled: bool) -> Any:
        tensors = {t.name(): t.as_numpy() for t in request.inputs()}
        if decoupled:
            iterator = ResponseIterator(request.cancelled)

            def deliver(item: dict[str, np.ndarray] | TritonError | None, final: bool) -> None:
                if isinstance(item, TritonError):
                    response: InferenceResponse | None = InferenceResponse(error=item)
                elif item is None:
                    response = None
                else:
                    response = InferenceResponse([Tensor(k, v) for k, v in item.items()])
                iterator.put(response, TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

            self._dispatch(request.model_name, tensors, request.request_id(), None, request.cancelled, deliver)
            return iterator
        call = Call()
        self._dispatch(request.model_name, tensors, request.request_id(), None, request.cancelled,
                       lambda item, final: call.deliver(item, final))
        call.wait()
        item = call.items[-1]
        return InferenceResponse(error=item) if isinstance(item, TritonError) else \
            InferenceResponse([Tensor(k, v) for k, v in item.items()])


def metric(name: str, **labels: str) -> Metric:
    """The one metric of family `name` whose labels include `labels`."""
    fam = MetricFamily.registry[name]
    found = [m for m in fam.metrics if all(m.labels.get(k) == v for k, v in labels.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} metrics of {name} match {labels}")
    return found[0]
