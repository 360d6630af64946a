"""`make repo ENGINE=dir` / `llamaforge repo ENGINE`: a Triton Inference Server model repository
for an engine directory (deployment: triton_repo/README.md).

    OUT/preprocessing/   config.pbtxt, 1/model.py, 1/llamaforge/   tokenizer (Python backend)
    OUT/llama/           config.pbtxt, 1/model.py, 1/llamaforge/   the in-flight batching engine core
                         (decoupled), 1/requirements.txt: what to pip-install in the container
    OUT/postprocessing/  config.pbtxt, 1/model.py, 1/llamaforge/   incremental detokenization
    OUT/ensemble/        config.pbtxt, 1/                          preprocessing -> llama -> postprocessing
    OUT/bls/             config.pbtxt, 1/model.py, 1/llamaforge/   the same in one decoupled model

Decoupled mode is a deployment choice (`RepoOptions.decoupled`, `llamaforge repo --no-decoupled`,
`make repo DECOUPLED=false`), as tensorrtllm_backend's `decoupled_mode`: llama and bls get
`model_transaction_policy { decoupled: false }` (proto3 prints the block without the false value,
which is Triton's default) and answer each request with one response; a request that asks to
stream is then an error.

Each config.pbtxt is a `tritonclient.grpc.model_config_pb2.ModelConfig` (Triton's own schema)
printed with `google.protobuf.text_format`; the tensors come from triton_repo/models/interfaces.py
and are declared by runtime/serving/model_interface.py `declare_tensors`, the builder the gRPC server's
ModelConfig answer uses too.
Each model's `model.py` re-exports its class from a copy of the serving part of the `llamaforge`
package placed next to it (`llamaforge.runtime` and `llamaforge.triton_repo.models`; Triton's Python
backend puts the model's version directory on sys.path), so the repository carries all of its own
code and needs only third-party packages in the container (requirements.txt).
The repository is assembled in a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import llamaforge
import llamaforge.runtime
import llamaforge.triton_repo.models
from llamaforge.build.atomic import staged_dir
from llamaforge.runtime.core.config import SCHEDULING_POLICIES, CoreConfig, SpeculativeError
from llamaforge.runtime.core.engine import EngineError, read_manifest
from llamaforge.runtime.serving.model_interface import MAX_BATCH_SIZE, declare_tensors
from llamaforge.triton_repo.models.interfaces import (
    BLS,
    ENSEMBLE,
    ENSEMBLE_STEPS,
    INTERFACES,
    LLAMA,
    POSTPROCESSING,
    PREPROCESSING,
)

__all__ = ["RepoOptions", "RepoError", "model_configs", "write_repo", "runtime_requirements", "PYTHON_MODELS"]

PYTHON_MODELS = (PREPROCESSING, LLAMA, POSTPROCESSING, BLS)
_SOURCE_NAMES = ("models", "__pycache__")  # triton_repo/NAME must not overwrite the generator's own sources
# Distributions the runtime imports on a serving host (no torch): runtime/ and its imports.
RUNTIME_DISTRIBUTIONS = ("numpy", "onnxruntime", "tokenizers", "sentencepiece", "tiktoken", "jinja2", "protobuf",
                         "tritonclient", "prometheus-client")
# A tensor-parallel engine's ranks also need MPI (mpi4py over the mpich wheel, whose mpiexec the
# orchestrator's spawn runs) and the all-reduce op's host (runtime/parallel/).
TENSOR_PARALLEL_DISTRIBUTIONS = ("mpi4py", "mpich", "onnxruntime-extensions")


class RepoError(RuntimeError):
    """The repository cannot be generated; the message names the offending option or file."""


@dataclass
class RepoOptions:
    engine: Path
    name: str | None = None  # default: the engine's variant name
    out: Path | None = None  # default: triton_repo/NAME
    engine_path: str | None = None  # engine_dir as the server sees it (default: ENGINE, absolute)
    device: str = "gpu"  # llama's instance_group kind: gpu | cpu
    gpus: Sequence[int] = (0,)
    instances: int = 1  # llama instances per GPU (or on the CPU); each has its own core and KV cache
    text_instances: int = 1  # CPU instances of preprocessing, postprocessing and bls
    # Each llama instance's engine core, as its config.pbtxt parameters carry it (`core_parameters`);
    # the settings they do not carry must keep their defaults (`_check`).
    core: CoreConfig = field(default_factory=CoreConfig)
    decoupled: bool = True  # llama and bls: streaming (True) or one response per request (False)


def core_parameters(core: CoreConfig) -> dict[str, int | str | None]:
    """The llama model's config.pbtxt parameters for `core` (None: empty, the model's default);
    triton_repo/models/llama.py `core_config` reads them back."""
    return {
        "kv_budget_tokens": core.kv.budget_tokens, "kv_budget_bytes": core.kv.budget_bytes,
        "max_num_seqs": core.scheduler.max_num_seqs, "max_num_batched_tokens": core.scheduler.max_num_batched_tokens,
        "max_queue": core.max_queue, "scheduling_policy": core.scheduler.policy, "intra_op_threads": core.threads,
        "enable_kv_cache_reuse": "true" if core.kv.prefix_caching else "false",  # TensorRT-LLM's name
        # Speculative decoding, under `llamaforge serve`'s names (runtime/core/config.py SpeculativeConfig).
        "speculative": core.speculative.method, "num_speculative_tokens": core.speculative.num_speculative_tokens,
        "prompt_lookup_min": core.speculative.prompt_lookup_min, "prompt_lookup_max": core.speculative.prompt_lookup_max,
        "draft_engine_dir": core.speculative.draft_engine,
        "speculative_disable_by_batch_size": core.speculative.disable_by_batch_size,
    }


def _check(opts: RepoOptions) -> None:
    if opts.device not in ("gpu", "cpu"):
        raise RepoError(f"DEVICE={opts.device!r} is not 'gpu' or 'cpu'")
    if opts.device == "gpu" and (not opts.gpus or any(g < 0 for g in opts.gpus)):
        raise RepoError(f"GPUS={list(opts.gpus)}: give one or more GPU ids >= 0")
    params = core_parameters(opts.core)
    policy = params.pop("scheduling_policy")
    if policy not in SCHEDULING_POLICIES:
        raise RepoError(f"scheduling policy {policy!r} is not one of {list(SCHEDULING_POLICIES)}")
    try:  # the engine core's own check, here so a repository Triton would refuse is never written
        opts.core.speculative.check()
    except SpeculativeError as e:
        raise RepoError(str(e)) from None
    for name in ("speculative", "speculative_disable_by_batch_size"):  # checked above (the latter may be 0)
        params.pop(name)
    for key, value in {"instances": opts.instances, "text_instances": opts.text_instances, **params}.items():
        if isinstance(value, int) and value <= 0:
            raise RepoError(f"{key}: must be > 0, got {value}")
    defaults = CoreConfig()
    uncarried: tuple[tuple[str, object, object], ...] = (
        ("kv.block_size", opts.core.kv.block_size, defaults.kv.block_size),
        ("prefill_padding_tokens", opts.core.prefill_padding_tokens, defaults.prefill_padding_tokens),
        ("condense_decode_rows", opts.core.condense_decode_rows, defaults.condense_decode_rows),
        ("providers", opts.core.providers, defaults.providers),  # placement picks them per instance
    )
    for key, setting, default in uncarried:
        if setting != default:
            raise RepoError(f"core.{key}: the llama model's config.pbtxt does not carry it; leave the default {default!r}")


def model_configs(opts: RepoOptions, engine_path: str, tensor_parallel: int | None = None) -> dict[str, mc.ModelConfig]:
    """The config of every model in the repository (`tensor_parallel`: the engine's ranks, if any)."""
    _check(opts)
    configs: dict[str, mc.ModelConfig] = {}
    for name in PYTHON_MODELS:
        iface = INTERFACES[name]
        # A batch dimension as TensorRT-LLM's models declare (no dynamic_batching: Triton hands each
        # request over as it comes and our scheduler batches its rows with everything in flight).
        cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=MAX_BATCH_SIZE)
        if iface.decoupled:  # the models that can stream; the deployment decides whether they do
            cfg.model_transaction_policy.SetInParent()
            cfg.model_transaction_policy.decoupled = opts.decoupled
        declare_tensors(cfg, iface.inputs, iface.outputs)
        cfg.parameters["engine_dir"].string_value = engine_path
        if name == LLAMA:
            if tensor_parallel is not None:  # read by nothing: it tells a reader how the instance runs
                cfg.parameters["tensor_parallel_size"].string_value = str(tensor_parallel)
            group = cfg.instance_group.add(count=opts.instances)
            if opts.device == "gpu":
                group.kind = mc.ModelInstanceGroup.KIND_GPU
                group.gpus.extend(opts.gpus)
            else:
                group.kind = mc.ModelInstanceGroup.KIND_CPU
            params = {
                **core_parameters(opts.core),
                "gpu_device_ids": ",".join(str(g) for g in opts.gpus) if opts.device == "gpu" else "",
            }
            for key, value in params.items():
                cfg.parameters[key].string_value = "" if value is None else str(value)
        else:
            cfg.instance_group.add(count=opts.text_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
        if name == BLS:
            cfg.parameters["llama_model"].string_value = LLAMA
        configs[name] = cfg

    ens = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=MAX_BATCH_SIZE)
    declare_tensors(ens, INTERFACES[ENSEMBLE].inputs, INTERFACES[ENSEMBLE].outputs)
    for step in ENSEMBLE_STEPS:
        s = ens.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        s.input_map.update(step.input_map)
        s.output_map.update(step.output_map)
    configs[ENSEMBLE] = ens
    return configs


def runtime_requirements(device: str, tensor_parallel: bool = False) -> list[str]:
    """Pinned third-party requirements of the runtime on a serving host: the versions installed
    here (which pyproject.toml pins); onnxruntime becomes onnxruntime-gpu for GPU instances; MPI's
    for a tensor-parallel engine."""
    lines = []
    for dist in (*RUNTIME_DISTRIBUTIONS, *(TENSOR_PARALLEL_DISTRIBUTIONS if tensor_parallel else ())):
        version = metadata.version(dist)
        name = {"onnxruntime": "onnxruntime-gpu" if device == "gpu" else "onnxruntime",
                "tritonclient": "tritonclient[grpc]"}.get(dist, dist)
        lines.append(f"{name}=={version}")
    return lines


_MODEL_PY = '''\
# Generated by `llamaforge repo`: the {name} model is triton_repo/models/{name}.py of the copy of
# llama-forge's serving code next to this file (Triton's Python backend puts this directory on sys.path).
from llamaforge.triton_repo.models.{name} import TritonPythonModel  # noqa: F401
'''


def _copy_serving_code(version: Path) -> None:
    """`version/llamaforge/`: the package's root, its runtime and the Python-backend models; no
    build stage, so the copy imports neither torch nor onnx."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = version / "llamaforge"
    package.mkdir()
    shutil.copy2(Path(llamaforge.__file__), package / "__init__.py")
    shutil.copytree(Path(llamaforge.runtime.__file__).parent, package / "runtime", ignore=ignore)
    triton_repo_src = Path(llamaforge.triton_repo.models.__file__).parent.parent
    (package / "triton_repo").mkdir()
    shutil.copy2(triton_repo_src / "__init__.py", package / "triton_repo" / "__init__.py")
    shutil.copytree(triton_repo_src / "models", package / "triton_repo" / "models", ignore=ignore)


def write_repo(opts: RepoOptions) -> Path:
    """Generate the repository; returns its path."""
    engine = Path(opts.engine)
    try:
        manifest = read_manifest(engine)
    except EngineError as e:
        raise RepoError(f"ENGINE={engine}: {e}") from None
    if manifest.weights == "none":
        raise RepoError(f"ENGINE={engine}: built with WEIGHTS=none (manifest.json 'weights'); it cannot be served")
    if manifest.tokenizer is None:
        raise RepoError(f"ENGINE={engine}: manifest.json 'tokenizer.kind' is 'none'; the text models need the tokenizer")
    if manifest.backend == "trt":
        print(f"note: ENGINE={engine} is a TensorRT engine; the llama model will refuse to load it until the runtime "
              "has a TensorRT runner (see triton_repo/README.md, 'ORT and TRT engines')")
    tp = manifest.tensor_parallel
    if tp is not None and (opts.instances != 1 or (opts.device == "gpu" and len(opts.gpus) != 1)):
        # Orchestrator mode (triton_repo/README.md): the one llama instance is rank 0 and spawns the
        # other ranks; several instances would each spawn a whole set of ranks.
        raise RepoError(f"ENGINE={engine} is tensor-parallel ({tp.size} ranks): the llama model runs as one instance "
                        f"(rank 0, which spawns the other {tp.size - 1}); got INSTANCES={opts.instances}, "
                        f"GPUS={','.join(map(str, opts.gpus))}")
    name = opts.name or manifest.variant or engine.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise RepoError(f"NAME={name!r} is not a valid directory name")
    if not opts.out and name in _SOURCE_NAMES:
        raise RepoError(f"NAME={name!r} is a source folder of triton_repo/; give another NAME or an OUT")
    out = Path(opts.out) if opts.out else Path("triton_repo") / name
    engine_path = opts.engine_path or str(engine.resolve())
    configs = model_configs(opts, engine_path, None if tp is None else tp.size)

    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RepoError(f"OUT={out}: cannot create {parent}: {e.strerror}") from None
    if out.exists() and not out.is_dir():
        raise RepoError(f"OUT={out}: exists and is not a directory")
    with staged_dir(out) as tmp:  # a server in a container may run as another user: staged_dir's permissions
        for model, cfg in configs.items():
            version = tmp / model / "1"
            version.mkdir(parents=True)
            (tmp / model / "config.pbtxt").write_text(text_format.MessageToString(cfg))
            if model in PYTHON_MODELS:
                (version / "model.py").write_text(_MODEL_PY.format(name=model))
                _copy_serving_code(version)
        requirements = runtime_requirements(opts.device, tensor_parallel=tp is not None)
        (tmp / LLAMA / "1" / "requirements.txt").write_text("\n".join(requirements) + "\n")
    print(f"triton repository: {out} (models: {', '.join(configs)}; engine_dir {engine_path})")
    return out
