"""Alternated latency: single runs alternated among contenders find caches the others left; in blocks, the first
run of each block pays for that and is not counted."""
from __future__ import annotations

import time

import pytest

from fxcompress.timing import alternated_latency

COLD = 0.004  # seconds a contender loses when the call before it was another contender's


def _contenders():
    state = {"last": None, "calls": []}

    def make(name):
        def call():
            if state["last"] != name:
                time.sleep(COLD)
            state["last"] = name
            state["calls"].append(name)
        return call
    return {name: make(name) for name in "abc"}, state


def test_single_alternated_runs_pay_the_switch_and_blocks_do_not_count_it():
    contenders, state = _contenders()
    single = alternated_latency(contenders, runs=6, warmup=1)
    assert all(v >= COLD * 0.9 for v in single.values())
    assert state["calls"][3:9] == list("abcbca")  # the first contender rotates every round
    contenders, state = _contenders()
    blocks = alternated_latency(contenders, runs=6, warmup=1, block=3)
    assert all(v < COLD / 2 for v in blocks.values())
    assert len(state["calls"]) == 3 * (1 + 6 * 3)
    assert state["calls"][3:12] == list("aaabbbccc")


def test_a_block_below_one_is_refused():
    with pytest.raises(ValueError, match="block must be at least 1"):
        alternated_latency({"a": lambda: None}, runs=1, block=0)
