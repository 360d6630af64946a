"""Which text tokens see which image tiles: the cross-attention mask of a Llama 3.2 Vision prompt.

What transformers' `MllamaProcessor` computes (`get_cross_attention_token_mask` and
`convert_sparse_cross_attention_mask_to_dense`), with NumPy only: the k-th `<|image|>` token's image is
visible from that token up to (not including) the next `<|image|>` token, or to the end of the
prompt for the last one; consecutive `<|image|>` tokens form a group whose images are all visible
until the end of what follows the group's last member's span. Only an image's real tiles are marked.
Tokens before the first image see no tile (the decoder then treats their rows specially: see
plugins/cross_attention/schema.py). Generated tokens see what the prompt's last token sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_spans(token_ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) token positions that see each image, in image order (end exclusive)."""
    locations = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if not locations:
        return []
    spans = [[a, b] for a, b in zip(locations[:-1], locations[1:])] + [[locations[-1], len(token_ids)]]
    last_end = spans[-1][1]
    for span in reversed(spans):  # a run of adjacent image tokens shares the run's last span
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(token_ids: Sequence[int], image_token_id: int, num_tiles: Sequence[int],
                         max_images: int, max_num_tiles: int) -> np.ndarray:
    """int64 [len(token_ids), max_images, max_num_tiles]: 1 where the token may attend to the tile.
    `num_tiles[k]` is the k-th image's real tile count; images past the prompt's `<|image|>` tokens,
    or tokens past the images given, get no mask (as the processor)."""
    mask = np.zeros((len(token_ids), max_images, max_num_tiles), dtype=np.int64)
    for k, ((start, end), tiles) in enumerate(zip(image_spans(token_ids, image_token_id), num_tiles)):
        if k < max_images:
            mask[start:end, k, :tiles] = 1
    return mask
