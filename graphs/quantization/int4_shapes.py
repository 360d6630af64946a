"""Can this model take INT4 blocks? Checked on the checkpoint's configuration before the export, so a
model whose widths no block size divides fails at once, naming the weight (not after a long trace).

The shapes are the exporter's own modules (`export/model.py`'s DecoderLayer, built on the meta
device: no memory, no weights), so the check sees exactly the linears the graph will have.
"""

from __future__ import annotations

import torch
from torch import nn

from llamaforge.export.config import ModelConfig
from llamaforge.export.model import DecoderLayer
from llamaforge.graphs.quantization.int4 import block_problem
from llamaforge.graphs.quantization.recipes import is_router

EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")  # [E, in, out], blocks along `in`


def int4_weight_problems(config: ModelConfig, block_size: int, quantize_lm_head: bool = False,
                         experts: bool = True) -> list[str]:
    """One line per weight INT4 cannot block (its input width divided by no allowed block size)."""
    problems: list[str] = []
    for i in range(config.num_layers):
        with torch.device("meta"):
            layer = DecoderLayer(config, i)
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and not is_router(name):
                problem = block_problem(f"model.layers.{i}.{name}.weight", module.in_features, block_size)
                problems += [problem] if problem else []
        for name, param in layer.named_parameters():
            if experts and name.endswith(EXPERT_WEIGHTS):
                problem = block_problem(f"model.layers.{i}.{name}", int(param.shape[1]), block_size)
                problems += [problem] if problem else []
    if quantize_lm_head:
        problem = block_problem("lm_head.weight", config.hidden_size, block_size)
        problems += [problem] if problem else []
    return problems
