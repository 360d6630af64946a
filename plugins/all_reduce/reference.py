"""Reference semantics of `llamaforge::AllReduce` (see `schema.py`): given every rank's input, the
output each rank gets. Written for clarity; the lowerings are tested against it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llamaforge.plugins.all_reduce.schema import AllReduceAttrs


def all_reduce(inputs: Sequence[torch.Tensor], attrs: AllReduceAttrs) -> torch.Tensor:
    """The sum of the ranks' inputs (rank order), which every rank receives."""
    if len(inputs) != attrs.world_size:
        raise ValueError(f"AllReduce: {len(inputs)} rank inputs for world_size={attrs.world_size}")
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) != 1:
        raise ValueError(f"AllReduce: the ranks' inputs differ in shape {sorted(shapes)}")
    out = inputs[0].clone()
    for x in inputs[1:]:
        out = out + x
    return out
