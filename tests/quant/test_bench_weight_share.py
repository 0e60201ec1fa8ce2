"""The weight-sharing benchmark: a row per variant measured end to end (file, SQNR, accuracy in ORT, latency,
session memory), and its reading of a report (acceptance lines, faster / as fast / slower verdicts)."""
from __future__ import annotations

import pytest

from fxcompress.bench import weight_share as bench


def _row(variant, kb, sqnr, accuracy, ms, smaller=1.0):
    return {"variant": variant, "bytes": kb * 1000, "smaller": smaller, "bits_per_weight": None,
            "logit_sqnr_db": sqnr, "accuracy": accuracy, "ms": ms, "memory_mb": 10.0, "ort_vs_torch": 1e-6}


def test_the_summary_reads_the_acceptance_and_the_speed_verdicts():
    rows = [_row("fp32", 1000, 120.0, 86.0, 5.0), _row("int8", 300, 25.0, 85.8, 2.5, 3.3),
            _row("uniform 4-bit", 170, 14.0, 85.0, 5.1, 5.9), _row("kmeans 4-bit", 150, 16.0, 85.2, 5.0, 6.7),
            _row("kmeans 4-bit data-aware", 150, 24.0, 86.1, 5.0, 6.7),
            _row("kmeans 4-bit data-aware + ft", 150, 25.0, 86.4, 5.6, 6.7),
            _row("ternary", 100, 8.0, 84.5, 5.0, 10.0)]
    lines = bench.summary({"models": [{"model": "m", "rows": rows}]})
    assert ("  4-bit k-means, at most one epoch of fine-tuning: best kmeans 4-bit data-aware + ft, 86.40 % (+0.40 "
            "points), 6.70x smaller") in lines
    assert "  kmeans 4-bit data-aware before fine-tuning: +10.00 dB logit SQNR over uniform 4-bit (14.00 dB)" in lines
    assert "  4-bit: data-aware +8.00 dB over plain" in lines
    assert "  ternary: 84.50 % (-1.50), 10.00x smaller" in lines
    assert "  kmeans 4-bit data-aware + ft: 5.600 ms, slower (1.12x) than fp32, slower (2.24x) than int8" in lines
    assert "  uniform 4-bit: 5.100 ms, as fast as fp32, slower (2.04x) than int8" in lines
    assert "| m " in bench.format_table({"models": [{"model": "m", "rows": rows}]})


@pytest.mark.slow
def test_a_variant_is_measured_end_to_end(tmp_path):
    report = bench.bench_model("resnet20-hard-digits", 1, 3, tmp_path, lambda m: None,
                               only=["fp32", "uniform 4-bit", "kmeans 2-bit"])
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"fp32", "uniform 4-bit", "kmeans 2-bit"}
    assert rows["fp32"]["logit_sqnr_db"] > 100 and rows["fp32"]["smaller"] == 1.0
    k2 = rows["kmeans 2-bit"]
    assert k2["smaller"] > 10 and k2["bits_per_weight"] < 2.1 and k2["ort_vs_torch"] < 1e-3
    assert rows["uniform 4-bit"]["logit_sqnr_db"] > k2["logit_sqnr_db"]
    assert all(r["ms"] > 0 and r["memory_mb"] > 0 for r in rows.values())
