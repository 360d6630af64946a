"""bench/schedule_model.py: the cost model behind `make bench-serve`'s bound and model lines
replays our real scheduler on a virtual clock. Expected times are worked out by hand below."""

from __future__ import annotations

import pytest
from schedule_model import StepCosts, perfect_seconds, replay_seconds
from serve import Req

# Prefill is free; a decode call costs 1 s a live row; a finished row of a 2-row call costs 0.5 s
# less than a live one (it skips attention).
COSTS = StepCosts(prefill_fixed_s=0.0, prefill_per_token_s=0.0, decode_live_s=(1.0, 2.0), decode_dead_s=(1.0, 1.5))
# Three requests at t=0 with 4-token prompts; two sequences at a time.
REQS = [Req(0, 0.0, "", [1, 2, 3, 4], 3), Req(1, 0.0, "", [1, 2, 3, 4], 2), Req(2, 0.0, "", [1, 2, 3, 4], 2)]


def test_static_keeps_a_finished_row_and_the_next_batch_waits() -> None:
    # Step 1: batch {0, 1} prefilled (free), one token each. Step 2: decode both (2 s), 1 is done.
    # Step 3: decode 0 with 1's dead row (1.5 + 0.5 * 1/2 = 1.75 s), 0 is done. Step 4: batch {2}
    # prefilled. Step 5: decode 2 alone (1 s). Last token at 4.75 s.
    assert replay_seconds(COSTS, REQS, 2, "static") == pytest.approx(4.75)


def test_inflight_admits_into_the_freed_row() -> None:
    # Step 1: {0, 1} prefilled. Step 2: decode both (2 s), 1 is done. Step 3: decode 0 alone (1 s),
    # 2 joins and is prefilled; 0 is done. Step 4: decode 2 (1 s). Last token at 4 s.
    assert replay_seconds(COSTS, REQS, 2, "inflight") == pytest.approx(4.0)


def test_perfect_schedule_decodes_all_but_the_first_tokens_in_full_batches() -> None:
    # 2 + 1 + 1 tokens after the prefills' first ones: 2 full 2-row calls at 2 s.
    assert perfect_seconds(COSTS, REQS, 2) == pytest.approx(4.0)


def test_waits_for_arrivals_and_counts_from_the_first() -> None:
    late = [Req(0, 1.0, "", [1, 2], 2), Req(1, 10.0, "", [1, 2], 2)]
    # 0 arrives at 1 s: prefill, then one decode (1 s) -> 2 s; 1 arrives at 10 s -> last token at 11 s.
    assert replay_seconds(COSTS, late, 2, "inflight") == pytest.approx(10.0)
