"""The runtime's cross-attention mask of a prompt against transformers' `MllamaProcessor` helpers."""

from __future__ import annotations

import numpy as np
import pytest

from llamaforge.runtime.core.mllama_prompt import cross_attention_mask

IMAGE = 640


@pytest.mark.parametrize("ids, tiles", [
    ([1, 5, IMAGE, 7, 8], [3]),
    ([1, IMAGE, 5, 6, IMAGE, 7, 8, 9], [2, 4]),
    ([1, IMAGE, IMAGE, 5, 6, IMAGE, 7], [1, 4, 2]),  # a run of two, then a third image
    ([IMAGE, IMAGE, 3, 4], [4, 1]),
    ([1, 2, 3], []),
])
def test_mask_is_the_processors(ids: list[int], tiles: list[int]) -> None:
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    max_images = max(len(tiles), 1)
    got = cross_attention_mask(ids, IMAGE, tiles, max_images, 4)
    sparse = [get_cross_attention_token_mask(ids, IMAGE)]
    if tiles:
        want = convert_sparse_cross_attention_mask_to_dense(sparse, [tiles], 4, len(ids))[0]
        np.testing.assert_array_equal(got, want)
    assert got.shape == (len(ids), max_images, 4) and got.dtype == np.int64
    assert got.sum() == sum(t * len([i for i in range(len(ids)) if got[i, k].any()]) for k, t in enumerate(tiles))
