"""The pruning benchmark runs end to end on tiny synthetic models (timings themselves are not asserted)."""
from __future__ import annotations

from fxcompress.bench import pruning


def test_pruning_bench_small(monkeypatch):
    monkeypatch.setattr(pruning, "_have_tp", lambda: False)  # the comparison needs the optional bench extra
    report = pruning.run(["chain2", "chain4", "dense2"], runs=1, latency_runs=1, log=lambda m: None)
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"chain2", "chain4", "dense2"}
    for r in rows.values():
        assert r["ours"]["params"] < r["params"] and r["ours"]["macs"] < r["macs"]
        assert set(r["ours"]["seconds"]) >= {"propagate_dependencies", "select_channels", "remove_channels", "trace"}
    table = pruning.format_table(report)
    assert "chain4" in table and "(" in table.splitlines()[3]  # growth against chain2


def test_scaling_mode_reports_growth_per_doubling():
    report = pruning.scaling(["chain2", "chain4"], runs=1, log=lambda m: None)
    assert [r["model"] for r in report["rows"]] == ["chain2", "chain4"]
    assert all(r["off"] > 0 and r["on"] > 0 for r in report["rows"])
    table = pruning.format_scaling(report)
    assert "chain4" in table and "x)" in table.splitlines()[3]
