"""The search benchmark's comparisons, read off a report: knapsack against uniform at equal latency and at equal
accuracy."""
from __future__ import annotations

import pytest

from fxcompress.bench import search


def _row(strategy, budget, ms, accuracy):
    return {"strategy": strategy, "budget": budget, "ms": ms, "accuracy": accuracy, "vs_ort": ms / 2.0, "search_s": 1.0,
            "within_budget": True}


def test_accuracy_at_and_latency_for_interpolate_between_measured_results():
    rows = [_row("uniform", 0.9, 2.0, 88.0), _row("uniform", 0.7, 1.6, 86.0), _row("uniform", 0.5, 1.2, 80.0)]
    assert search.accuracy_at(rows, 1.4) == pytest.approx(83.0)
    assert search.accuracy_at(rows, 1.0) is None and search.accuracy_at(rows, 2.1) is None
    assert search.latency_for(rows, 83.0) == pytest.approx(1.4)  # from the fastest up: first reached at 1.4 ms
    assert search.latency_for(rows, 79.0) == pytest.approx(1.2)
    assert search.latency_for(rows, 88.5) is None


def test_the_summary_compares_knapsack_and_uniform_at_equal_latency_and_equal_accuracy():
    rows = [_row("uniform", 0.9, 2.0, 88.0), _row("uniform", 0.5, 1.2, 80.0), _row("knapsack", 0.7, 1.4, 86.0)]
    report = {"models": [{"model": "m", "fp32": 86.5, "budgets": [0.9, 0.7, 0.5], "rows": rows,
                          "floor": {"measured_ms": 1.0}, "int8_ms": 2.0, "ort_int8": {"ms": 2.0, "accuracy": 86.0},
                          "refused": [{"strategy": "uniform", "budget": 0.7, "reason": "below the fastest"}],
                          "failed": [{"strategy": "knapsack", "budget": 0.6, "reason": "exceeded its error bound"}]}]}
    lines = search.summary(report)
    assert any("uniform reaches 82.00 %" in line and "+4.00 points at equal latency" in line for line in lines)
    # uniform reaches 86 % at 1.8 ms: knapsack's 1.4 ms saves 22.2 %
    assert any("uniform reaches it at 1.800 ms" in line and "+22.2 % time saved" in line for line in lines)
    assert "m uniform@0.7 refused: below the fastest" in lines  # a budget a strategy cannot reach is reported
    assert "m knapsack@0.6 failed: exceeded its error bound" in lines  # so is a result that could not be lowered
    row = next(line for line in search.pivot(report).splitlines() if "|      0.7 |" in line)
    assert [c.strip() for c in row.split("|")[3:5]] == ["-", "86.0 / 0.70"]  # its uniform cell left empty
    assert lines[0].startswith("m: fastest within 1 point of fp32") and "knapsack at budget 0.7" in lines[0]
