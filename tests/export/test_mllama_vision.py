"""The vision encoder + projector graph (`vision.onnx`) against transformers' `MllamaModel`.

Oracle: the tiny random `MllamaForConditionalGeneration` of `tiny_mllama`, whose vision tower and
projector compute the cross-attention states the text model receives; the exported graph with the
checkpoint's weights bound, run by ONNX Runtime on the CPU, must match within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_mllama import image_inputs, load_mllama_oracle, make_mllama_checkpoint, tiny_mllama_configs

from llamaforge import cli
from llamaforge.export.checkpoint_base import read_json_object
from llamaforge.export.exporter import bind_weights, save_streaming
from llamaforge.export.mllama_checkpoint import open_mllama
from llamaforge.export.mllama_export import trace_vision
from llamaforge.export.mllama_vision import INPUT_NAMES

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mllama_checkpoint(tmp_path_factory.mktemp("mllama") / "ckpt")


@pytest.fixture(scope="module")
def vision_session(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ort.InferenceSession:
    ckpt = open_mllama(checkpoint, read_json_object(checkpoint, "config.json"), "tiny-mllama")
    ckpt.validate()
    model = trace_vision(ckpt.vision, ckpt.config.hidden_size)
    bind_weights(model, ckpt, torch.float32)
    path = tmp_path_factory.mktemp("vision") / "vision.onnx"
    save_streaming(model, path)
    assert (path.parent / "vision.onnx.data").is_file()
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def oracle_states(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """What `MllamaModel.forward` hands its text model, as [batch, images * tiles * positions, hidden]."""
    with torch.no_grad():
        vision = model.model.vision_model(**inputs).last_hidden_state
        states = model.model.multi_modal_projector(vision).reshape(-1, vision.shape[-2], model.config.text_config.hidden_size)
    return states.reshape(inputs["pixel_values"].shape[0], -1, states.shape[-1]).numpy()


@pytest.mark.parametrize("tiles", [[[1]], [[4]], [[2, 3]], [[4, 1], [3]], [[2], [1, 4]]],
                         ids=["1-image-1-tile", "1-image-4-tiles", "2-images", "batch-2-padding-image", "batch-2-b"])
def test_vision_graph_matches_transformers(checkpoint: Path, vision_session: ort.InferenceSession,
                                           tiles: list[list[int]]) -> None:
    vision, _ = tiny_mllama_configs()
    inputs = image_inputs(tiles, vision, seed=len(tiles) + sum(map(sum, tiles)))
    want = oracle_states(load_mllama_oracle(checkpoint), inputs)
    (got,) = vision_session.run(None, {name: inputs[name].numpy() for name in INPUT_NAMES})
    assert got.shape == want.shape == (len(tiles), max(map(len, tiles)) * vision.max_num_tiles * vision.num_patches, 64)
    diff = float(np.abs(got - want).max())
    print(f"vision {tiles}: max abs diff {diff:.3g} (|states| max {np.abs(want).max():.3g})")
    assert diff <= TOLERANCE


def test_gates_and_masks_matter(checkpoint: Path, vision_session: ort.InferenceSession) -> None:
    """The comparison can fail: another arrangement id or a tile masked differently changes the states."""
    vision, _ = tiny_mllama_configs()
    inputs = {k: v.numpy() for k, v in image_inputs([[2, 3]], vision, seed=1).items()}
    (base,) = vision_session.run(None, inputs)
    other_id = dict(inputs, aspect_ratio_ids=inputs["aspect_ratio_ids"] % 8 + 1)
    other_mask = dict(inputs, aspect_ratio_mask=np.ones_like(inputs["aspect_ratio_mask"]))
    for changed in (other_id, other_mask):
        assert np.abs(vision_session.run(None, changed)[0] - base).max() > 100 * TOLERANCE


def test_single_graph_export_refuses_with_a_pointer_to_the_build(checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`llamaforge export` writes one graph; an mllama checkpoint makes two, so it points at the build."""
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vision.onnx" in err and "llamaforge build" in err and not out.exists()


@pytest.mark.parametrize("name, change", [("vision_model.class_embedding", "drop"),
                                          ("language_model.model.layers.1.cross_attn.k_norm.weight", "reshape")])
def test_bad_tensors_are_named(checkpoint: Path, tmp_path: Path, name: str, change: str) -> None:
    """A missing or wrongly shaped tensor of either graph stops the opening, named, before any trace."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llamaforge.export.checkpoint import open_checkpoint
    from llamaforge.export.checkpoint_errors import CheckpointError

    bad = tmp_path / "ckpt"
    shutil.copytree(checkpoint, bad)
    for shard in sorted(bad.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if name in tensors:
            if change == "drop":
                del tensors[name]
            else:
                tensors[name] = tensors[name][:-1].clone()
            save_file(tensors, str(shard), metadata={"format": "pt"})
    graph_name = name.removeprefix("language_model.")
    with pytest.raises(CheckpointError, match=graph_name.replace(".", r"\.")):
        open_checkpoint(bad)
