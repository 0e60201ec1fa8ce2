import json
import math

import pytest
from fxcompress.golden_models import EXPECTED

from fxcompress.bench import BenchConfig, format_table, run_bench


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    recipe = tmp_path_factory.mktemp("r") / "fold_bn.toml"
    recipe.write_text('[[passes]]\npass = "fold_bn"\n')
    config = BenchConfig(batches=(1, 2), threads=(1,), runs=3, warmup=1, calibration_samples=8,
                         methods=("MinMax", "Entropy-2048"), eval_samples=8)
    return run_bench("resnet20-digits", [str(recipe)], config, log=lambda _: None)


def test_rows_and_columns(report):
    names = [r["name"] for r in report["rows"]]
    assert names == ["fp32 PyTorch", "fp32 ORT", "ORT INT8 MinMax", "ORT INT8 Entropy-2048", "fxcompress fold_bn"]
    assert report["best_ort_int8"] in names[2:4]
    for row in report["rows"]:
        assert set(row["latency_ms"]) == {"b1_t1", "b2_t1"} and all(v > 0 for v in row["latency_ms"].values())
        assert row["size_mb"] > 0
    best = next(r for r in report["rows"] if r["name"] == report["best_ort_int8"])
    assert all(math.isclose(v, 1.0) for v in best["ratio_to_ort_int8"].values())
    int8 = [r for r in report["rows"] if r["name"].startswith("ORT INT8")]
    assert all(r["seconds"] > 0 and r["peak_mb"] >= r["base_mb"] for r in int8)
    assert all(r["size_mb"] < report["rows"][1]["size_mb"] / 2 for r in int8)  # int8 weights


def test_quality_columns(report):
    fp32, ort_fp32, *_, fxc_row = report["rows"]
    recorded = json.loads(EXPECTED.read_text())["resnet20-digits"]["fp32_accuracy"]["test"]
    assert fp32["accuracy"] == pytest.approx(recorded) and fp32["agreement"] == 100.0
    assert ort_fp32["sqnr_db"] > 80 and fxc_row["sqnr_db"] > 80  # float32 vs float32: rounding only
    assert fxc_row["passes"][0][0] == "fold_bn"
    for r in report["rows"][2:4]:  # INT8 from 8 calibration samples: far noisier than fp32, same predictions mostly
        assert 5 < r["sqnr_db"] < 60 and r["agreement"] > 80


def test_table_and_json(report):
    table = format_table(report)
    assert "ms b1 t1" in table and "ms b2 t1" in table and " *" in table
    assert "fxcompress fold_bn: fold_bn" in table
    json.dumps(report)
