"""The copy fine-tune's windows (export/demo/copy_tune.py): what stdlib-5m-copy was shown."""

from __future__ import annotations

import torch

from llamaforge.export.demo.copy_tune import copy_window
from llamaforge.export.demo.train import SEQ_LEN


def chunk_of(window: list[int], sep: list[int]) -> list[int]:
    """The chunk: what stands between BOS and the first separator."""
    for i in range(1, len(window)):
        if window[i:i + len(sep)] == sep:
            return window[1:i]
    raise AssertionError("no separator in the window")


def test_a_code_window_is_a_stream_slice_then_itself_repeated_to_the_window_length() -> None:
    stream = torch.arange(1000, 5000)  # distinct ids, so a chunk's place in the stream is known
    sep = [7, 7]
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        window = copy_window(stream, 0, sep, 4096, random_fraction=0.0, gen=gen).tolist()
        assert len(window) == SEQ_LEN + 1 and window[0] == 0
        chunk = chunk_of(window, sep)
        assert 32 <= len(chunk) < 160
        assert chunk == list(range(chunk[0], chunk[0] + len(chunk)))  # contiguous in the stream
        rest = window[1 + len(chunk) + len(sep):]
        assert rest == (chunk * (len(rest) // len(chunk) + 1))[:len(rest)]  # the chunk again, from its start


def test_a_random_window_repeats_ids_that_no_stream_slice_explains() -> None:
    stream = torch.zeros(1000, dtype=torch.int64)
    gen = torch.Generator().manual_seed(4)
    window = copy_window(stream, 0, [1], 64, random_fraction=1.0, gen=gen).tolist()
    chunk = chunk_of(window, [1])
    assert all(2 <= t < 64 for t in chunk) and len(set(chunk)) > 10  # random ids, not the all-zero stream
    rest = window[1 + len(chunk) + 1:]
    assert rest[:len(chunk)] == chunk[:len(rest)]
