"""The conformance suite (``python -m fxcompress.bench.zoo``): a fast sample by default, the catalogues when slow."""
from __future__ import annotations

import pytest

from fxcompress.bench import zoo

pytest.importorskip("torchvision")
pytest.importorskip("timm")
pytest.importorskip("transformers")

SAMPLE = ["segmentation:lraspp_mobilenet_v3_large", "timm:mobilenetv3_small_050", "hf:distilbert", "hf:gpt2"]


def _every_step_passes(row: dict) -> None:
    failed = {s: row["errors"].get(s, row["steps"][s]) for s in zoo.STEPS[:-1] if not zoo.step_passed(row, s)}
    assert not failed, failed


@pytest.mark.parametrize("spec", SAMPLE)
def test_sample_passes_every_step(spec, tmp_path):
    row = zoo.check(spec, 0.3, tmp_path)
    _every_step_passes(row)
    assert row["macs_kept"] < 0.9 and 0 < row["share"] <= 1


def test_a_model_that_runs_out_of_time_is_a_row_that_says_so():
    row = zoo.run_isolated("hf:bert", 0.3, timeout=0.5)
    assert row["errors"] == {"run": "timed out after 0.5 s"} and set(row["steps"].values()) == {"-"}


def test_limits_interrupt_a_step_that_runs_too_long_or_grows_too_large():
    with pytest.raises(TimeoutError, match="after 0.3 s"), zoo.limits(0.3, 100.0):
        while True:
            pass
    hoard = []
    with pytest.raises(MemoryError, match="GB of memory"), zoo.limits(60.0, zoo.resident_gb() + 0.2):
        while True:
            hoard.append(bytearray(10_000_000))
            hoard[-1][::4096] = b"x" * len(range(0, 10_000_000, 4096))  # resident, not only reserved
    assert 15 <= len(hoard) <= 60


def test_channels_removed_counts_the_output_channels_of_the_layers_in_both_models():
    import torch.nn as nn
    before = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ConvTranspose2d(8, 4, 2), nn.Linear(4, 4))
    after = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 4, 2), nn.Linear(4, 4))
    assert zoo.widths(before) == {"0": 8, "1": 4, "2": 4}
    assert zoo.channels_removed(zoo.widths(before), after) == 0.25


def test_tables_and_the_readme_section(tmp_path):
    rows = [{"model": "hf:bert", "steps": dict.fromkeys(zoo.STEPS, "ok"), "errors": {}, "share": 0.5,
             "macs_kept": 0.7, "tp_macs_kept": None},
            {"model": "hf:opt", "steps": {**dict.fromkeys(zoo.STEPS, "-"), "trace": "FAIL"},
             "errors": {"trace": "TracingError: no"}},
            {"model": "timm:ghostnet_050", "steps": dict.fromkeys(zoo.STEPS, "ok"), "errors": {}, "share": 0.8,
             "macs_kept": 0.52, "tp_macs_kept": 0.28, "channels_removed": 0.37, "tp_channels_removed": 0.44,
             "macs_kept_at_tp_cut": 0.25, "channels_removed_at_tp_cut": 0.45},
            {"model": "timm:resnet10t", "steps": dict.fromkeys(zoo.STEPS, "ok"), "errors": {}, "share": 0.8,
             "macs_kept": 0.5, "tp_macs_kept": 0.5, "channels_removed": 0.3, "tp_channels_removed": 0.32}]
    table = zoo.coverage_table(rows[:2])
    cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert cells == ["hf", "2"] + ["1"] * (len(zoo.STEPS) + 1)  # tried, each step, every step
    models = zoo.model_table(rows)
    assert "28 % (removes 44 % of the channels, we 37 %; removing 45 % we keep 25 %)" in models
    assert "removes 32 %" not in models
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{zoo.README_BEGIN}\nstale table\n{zoo.README_END}\nrest\n")
    zoo.write_readme(readme, rows, ["python -m fxcompress.bench.zoo --suites hf"], "a CPU")
    text = readme.read_text()
    assert "stale table" not in text and "trace: TracingError: no" in text and text.endswith("rest\n")
    begin, end = zoo.markers("other")
    readme.write_text(f"a\n{zoo.README_BEGIN}\nmain\n{zoo.README_END}\n{begin}\nold\n{end}\n")
    zoo.write_readme(readme, rows[:1], ["cmd"], "a CPU", "other")
    text = readme.read_text()
    assert "\nmain\n" in text and "\nold\n" not in text and "hf:bert" in text.split("zoo:begin other")[1]
    readme.write_text("no section")
    with pytest.raises(SystemExit, match="zoo:begin"):
        zoo.write_readme(readme, rows, ["cmd"], "a CPU")


def test_where_torch_pruning_cuts_more_ours_is_pruned_again_at_its_cut():
    import torch
    import torch.nn as nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    row = {"channels_removed": 0.2, "tp_channels_removed": 0.6}
    zoo.at_its_cut(row, model, x)
    assert 0.5 <= row["channels_removed_at_tp_cut"] <= 0.7 and row["macs_kept_at_tp_cut"] < 0.5
    close = {"channels_removed": 0.3, "tp_channels_removed": 0.33}
    zoo.at_its_cut(close, model, x)
    assert "macs_kept_at_tp_cut" not in close


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for suite in ("torchvision", "segmentation", "detection", "hf")
                                  for s in zoo.catalogue(suite)])
def test_catalogue_passes_every_step(spec, tmp_path):
    _every_step_passes(zoo.check(spec, 0.3, tmp_path))


def test_resume_runs_only_the_models_without_a_row(tmp_path, monkeypatch, capsys):
    done = {"model": "hf:bert", "steps": dict.fromkeys(zoo.STEPS, "ok"), "errors": {}, "seconds": {"total": 1.0}}
    report = tmp_path / "zoo.json"
    report.write_text(zoo.json.dumps({"rows": [done], "commands": ["first"]}))
    ran = []

    def fake(spec, ratio, timeout, tp_seconds):
        ran.append(spec)
        return {**done, "model": spec}

    monkeypatch.setattr(zoo, "run_isolated", fake)
    zoo.main(["--models", "hf:bert", "hf:opt", "--json", str(report), "--update", "--resume"])
    assert ran == ["hf:opt"]
    assert [r["model"] for r in zoo.json.loads(report.read_text())["rows"]] == ["hf:bert", "hf:opt"]
    with pytest.raises(SystemExit):
        zoo.main(["--models", "hf:bert", "--json", str(report), "--resume"])
    assert "--resume continues an earlier run" in capsys.readouterr().err


def test_a_process_killed_on_the_way_keeps_the_steps_it_passed(monkeypatch):
    def killed(command, **_):  # the child wrote its row, then died in the middle of pruning
        progress = zoo.Path(command[command.index("--progress") + 1])
        steps = {**dict.fromkeys(zoo.STEPS, "-"), "trace": "ok", "fold": "ok"}
        progress.write_text(zoo.json.dumps({"model": "hf:bert", "steps": steps, "errors": {}, "running": "prune"}))
        return zoo.subprocess.CompletedProcess(command, -9, "", "")

    monkeypatch.setattr(zoo.subprocess, "run", killed)
    row = zoo.run_isolated("hf:bert", 0.3, timeout=60)
    assert row["steps"]["fold"] == "ok" and row["steps"]["prune"] == "FAIL" and "running" not in row
    assert row["errors"] == {"prune": "process ended with code -9 (killed: out of memory?): no output"}


def test_quiet_parameters_are_redrawn_and_an_all_zero_reference_is_refused():
    class Quiet(zoo.nn.Module):  # a zero-initialised head (torchvision ViT) and a layer scale at 1e-5
        def __init__(self):
            super().__init__()
            self.body, self.head = zoo.nn.Linear(4, 4), zoo.nn.Linear(4, 2)
            self.gamma = zoo.nn.Parameter(zoo.torch.full((4,), 1e-5))
            zoo.nn.init.zeros_(self.head.weight)
            zoo.nn.init.zeros_(self.head.bias)

        def forward(self, x):
            return self.head(x + self.gamma * self.body(x))

    model, x = Quiet(), zoo.torch.randn(3, 4)
    with pytest.raises(ValueError, match="all zeros"):
        zoo.relative_error(model(x), model(x))
    assert zoo.randomize_quiet_parameters(model) == ["gamma", "head.weight"]
    assert model.head.weight.abs().min() > 0 and 0.5 <= float(model.gamma.min()) <= float(model.gamma.max()) <= 1.5
    assert not model.head.bias.any()  # biases stay as initialised
    assert zoo.relative_error(model(x), model(x)) == 0.0
    with pytest.raises(ValueError, match="vanishes"):
        zoo.relative_error(x * 1e-30, x * 1e-30)


def test_hugging_face_batchnorm_weights_are_redrawn_so_that_outputs_do_not_vanish():
    model, inputs, _ = zoo.build("hf:mobilevit")  # BatchNorm weights ~ N(0, 0.02): outputs were about 1e-40
    with zoo.torch.no_grad():
        assert model(**inputs).last_hidden_state.abs().max() > 1e-3


def test_fold_is_judged_in_float64_where_float32_rounding_is_larger_than_the_tolerance():
    torch, nn = zoo.torch, zoo.nn

    class Cancelling(nn.Module):  # the output is the small difference of two large branches: float32 noise shows
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.twin = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(3, 8, 3)
            self.bn.eval().running_var.fill_(0.37)
            self.bn.running_mean.fill_(0.1)
            self.twin.load_state_dict(self.conv.state_dict())

        def forward(self, x):
            return self.bn(self.conv(x)) - 0.99 * (self.twin(x) - 0.1) / (0.37 + 1e-5) ** 0.5

    torch.manual_seed(0)
    model, x = Cancelling().eval(), (torch.randn(2, 3, 16, 16),)
    folded = zoo.fxc.compile(model, x, [{"pass": "fold_bn"}])
    assert zoo.compare(folded, model, x) > zoo.FOLD_TOL  # float32 rounding of the same sum, in another order
    assert zoo.compare_float64(folded, model, x) <= zoo.FOLD_TOL
    with torch.no_grad():  # a fold that is wrong by 1e-4 of one weight fails in float64 too
        folded.module.conv.weight[0, 0, 0, 0] *= 1 + 1e-4
    assert zoo.compare_float64(folded, model, x) > zoo.FOLD_TOL
    assert model.conv.weight.dtype == torch.float32  # the copies were widened, not the model


def test_timm_models_made_for_very_large_inputs_run_at_224_px_where_they_take_any_size():
    _, (x,), sample = zoo.build("timm:sam2_hiera_tiny")  # pretrained at 896 px, any size accepted
    assert tuple(x.shape) == (1, 3, 224, 224) == tuple(sample(3)[0].shape)
    _, (x,), _ = zoo.build("timm:csatv2")  # 512 px: not over the limit
    assert tuple(x.shape) == (1, 3, 512, 512)


def test_a_detector_that_finds_nothing_gets_its_score_threshold_lowered():
    import torch

    class Detector(torch.nn.Module):
        score_thresh = 0.05

        def forward(self, images):
            scores = torch.full((3,), 1e-6)
            keep = scores > self.score_thresh
            return [{"boxes": torch.ones(3, 4)[keep], "scores": scores[keep]} for _ in images]

    model, inputs = Detector(), ([torch.zeros(3, 8, 8)],)
    zoo.detect_something(model, inputs)
    assert model.score_thresh == 0.0 and len(model(*inputs)[0]["boxes"]) == 3
    zoo.detect_something(model, inputs)  # finds boxes now: left as it is
    assert model.score_thresh == 0.0


def test_any_transformers_model_type_is_built_small_with_its_main_input():
    model, inputs, _ = zoo.build("hf:dinov2")
    assert list(inputs) == ["pixel_values"] and model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    model, inputs, _ = zoo.build("hf:electra")
    assert list(inputs) == ["input_ids", "attention_mask"] and model.config.vocab_size == 1000
    with pytest.raises(SystemExit, match="nor a transformers model type"):
        zoo.build("hf:no-such-model")


def test_a_spec_without_its_suite_is_refused_before_any_model_runs(capsys, tmp_path):
    with pytest.raises(SystemExit):
        zoo.main(["--models", "ghostnet_050", "--json", str(tmp_path / "z.json")])
    assert "timm:ghostnet_050" in capsys.readouterr().err
    assert not (tmp_path / "z.json").exists()
