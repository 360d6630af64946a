"""A Llama 3.2 Vision engine from the registry alone (`make engine MODEL=llama3.2-11b-vision-instruct
WEIGHTS=none`): both graphs at full size, complete and checked (the build runs onnx.checker with
full shape inference on each), with sparse external data and no weights to run."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.export.variants import get_variant
from llamaforge.runtime.core.engine import EngineError
from llamaforge.runtime.core.mllama_engine import MllamaEngine

NAME = "llama3.2-11b-vision-instruct"


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_engine(BuildOptions(model=NAME, weights=False, out=tmp_path_factory.mktemp("graph") / "engine"))


def test_both_graphs_at_full_size(engine_dir: Path) -> None:
    variant = get_variant(NAME)
    assert variant.vision is not None
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["weights"] == "none" and manifest["source"] == {"checkpoint": None, "registry": NAME}
    assert manifest["vision"]["cross_attention_layers"] == list(range(3, 40, 5))
    assert manifest["vision"]["tokens_per_tile"] == 1601 and manifest["vision"]["image_size"] == 560
    text = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False).graph
    names = [i.name for i in text.input]
    assert "past_cross_key.3" in names and "past_key.3" not in names and "past_key.4" in names
    embed = next(t for t in text.initializer if t.name == "model.embed_tokens.weight")
    assert list(embed.dims) == [128256 + 8, 4096]
    vision = onnx.load(str(engine_dir / "vision.onnx"), load_external_data=False).graph
    dims = [d.dim_param or d.dim_value for d in vision.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "max_images", 4, 3, 560, 560]
    # Sparse placeholders the size of the weights: ~10.6B float32 parameters between the two files.
    total = sum((engine_dir / f).stat().st_size for f in ("model.onnx.data", "vision.onnx.data"))
    assert total >= 4 * variant.computed_params
    with pytest.raises(EngineError, match="WEIGHTS=none"):
        MllamaEngine(engine_dir)
