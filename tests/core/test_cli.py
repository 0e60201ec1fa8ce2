import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import onnx
import pytest
import torch.nn as nn

import fxcompress as fxc
from fxcompress.cli import main

RECIPE = '[[passes]]\npass = "fold_bn"\n'


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "fold.toml"
    path.write_text(RECIPE)
    return str(path)


def test_passes_lists_name_contract_and_doc(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("fold_bn"))
    assert "exact" in row and "Fold eval-mode BatchNorm" in row


def test_compress_with_export(recipe, tmp_path, capsys):
    out_path = tmp_path / "m.onnx"
    assert main(["compress", "zoo:small_resnet", "--recipe", recipe, "--export", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "bn_folded=5" in out and "params" in out
    diff = float(out.split("max abs diff")[1].split()[0])
    assert diff <= 1e-4
    onnx.checker.check_model(str(out_path))


def test_compress_step_by_step_prints_each_diff(recipe, tmp_path, capsys):
    assert main(["compress", "zoo:small_resnet", "--recipe", recipe, "--step", "--dump-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "[00 fold_bn]" in out and "--- before fold_bn" in out and "+a.0.bias [8]" in out
    assert (tmp_path / "d" / "01_fold_bn.diff").is_file()


def test_inspect_golden_model_per_node(capsys):
    assert main(["inspect", "resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("conv1 ") and "118.014 M" in line for line in lines)
    assert lines[-1].startswith("total") and "11689512" in lines[-1] and "1.814 G" in lines[-1]


def test_groups_lists_channel_groups_and_barriers(capsys):
    assert main(["groups", "zoo:small_resnet"]) == 0
    out = capsys.readouterr().out
    assert "prunable" in out and "model output" in out


def test_compress_with_prune_recipe(tmp_path, capsys):
    path = tmp_path / "prune.toml"
    path.write_text('[[passes]]\npass = "prune"\nratio = 0.5\n\n[[passes]]\npass = "fold_bn"\n')
    assert main(["compress", "resnet20-digits", "--recipe", str(path), "--export", str(tmp_path / "p.onnx")]) == 0
    out = capsys.readouterr().out
    assert "remove_channels" in out and "channels_removed" in out
    assert float(out.split("max abs diff")[1].split()[0]) <= 1e-4


def test_shipped_prune_low_rank_quantize_recipe(tmp_path, capsys):
    recipe = Path(__file__).parents[2] / "recipes" / "prune_low_rank_quantize.toml"
    assert main(["compress", "vgg-small-digits", "--recipe", str(recipe), "--export", str(tmp_path / "q.onnx")]) == 0
    out = capsys.readouterr().out
    for name in ("remove_channels", "low_rank_svd", "lower_quantized"):
        assert name in out
    assert "layers_replaced=8" in out


def _compress_shipped(recipe: str, tmp_path, capsys, monkeypatch):
    """``fxcompress compress resnet20-hard-digits`` with a shipped recipe: (printed output, the compile result,
    (test accuracy before, after))."""
    import fxcompress.cli as cli

    results = []
    compile_model = cli.compile_model
    monkeypatch.setattr(cli, "compile_model", lambda *a, **k: results.append(compile_model(*a, **k)) or results[-1])
    path = Path(__file__).parents[2] / "recipes" / recipe
    assert main(["compress", "resnet20-hard-digits", "--recipe", str(path), "--export", str(tmp_path / "q.onnx")]) == 0
    out = capsys.readouterr().out
    line = out.split("test accuracy:")[1].splitlines()[0]  # " 86.11 % before, 86.94 % after"
    return out, results[0], tuple(float(part.split("%")[0]) for part in line.split(","))


@pytest.mark.slow
def test_shipped_sparsify_finetune_ptq_qat_recipe(tmp_path, capsys, monkeypatch):
    """The full training pipeline runs end to end from the command line, keeps its sparsity through QAT and
    lowering, and does not lose accuracy on the hard digits."""
    out, result, (before, after) = _compress_shipped("sparsify_finetune_ptq_qat.toml", tmp_path, capsys, monkeypatch)
    for name in ("gradual_prune", "finetune", "calibrate", "qat", "lower_quantized"):
        assert name in out
    assert after >= before - 1.0
    gm = result.module
    convs = [m for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((m.weight == 0).sum()) for m in convs) / sum(m.weight.numel() for m in convs)
    assert 0.29 <= zeros <= 0.4  # the 30 % stays zero through fine-tuning, QAT and lowering


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[2] / "recipes").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_name_known_passes_and_options(recipe):
    pm = fxc.PassManager(str(recipe))
    assert pm.passes


@pytest.mark.slow
def test_shipped_prune_finetune_int8_recipe(tmp_path, capsys, monkeypatch):
    """Half of every channel group removed in widths of 16 (ORT's int8 kernels pack 16 output channels), then
    fine-tuned and quantized: about half the MACs, accuracy at least fp32's on the hard digits."""
    _, result, (before, after) = _compress_shipped("prune_finetune_int8.toml", tmp_path, capsys, monkeypatch)
    assert after >= before
    assert 0.45 < result.after.macs / result.before.macs < 0.55
    widths = {m.out_channels for m in result.module.modules() if isinstance(m, nn.Conv2d)}
    assert widths and all(w % 16 == 0 for w in widths)


def bare_factory():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()


def test_bare_module_factory_needs_input_shape(recipe, capsys):
    assert main(["inspect", "test_cli:bare_factory"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["compress", "test_cli:bare_factory", "--recipe", recipe, "--input-shape", "1,3,8,8"]) == 0
    assert "bn_folded=1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["compress", "resnet19", "--recipe", "x.toml"], "Did you mean 'resnet18'"),
    (["compress", "zoo:small_resnet", "--recipe", "missing.toml"], "does not exist"),
    (["inspect", "no_such_module:factory"], "cannot import module 'no_such_module'"),
    (["inspect", "torch.nn:Linear"], "factory is called with no arguments"),
])
def test_errors_are_one_line_messages(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxcompress: error:") and message in err and "Traceback" not in err


def test_console_script_is_installed():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("fxcompress") == "fxcompress.cli:main"
    done = subprocess.run([sys.executable, "-m", "fxcompress.cli", "passes"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "fold_bn" in done.stdout


def _user_model(tmp_path):
    (tmp_path / "usermodel.py").write_text(
        "import torch, torch.nn as nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),\n"
        "                      nn.Linear(8 * 8 * 8, 4))\n"
        "    return m.eval(), (torch.randn(1, 3, 8, 8),)\n"
        "def calibration():\n"
        "    return torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(1))\n"
        "def score(module):\n"
        "    return float(module(torch.ones(2, 3, 8, 8)).sum())\n")
    return tmp_path


def test_compress_takes_the_users_data_and_says_when_it_falls_back(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.chdir(_user_model(tmp_path))
    recipe = str(Path(__file__).parents[2] / "recipes" / "quantize.toml")
    assert main(["compress", "usermodel:make", "--recipe", recipe]) == 0
    assert "calibrating on 128 random N(0, 1) inputs" in capsys.readouterr().err
    torch.save(torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(2)), tmp_path / "calib.pt")
    torch.save((torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))), tmp_path / "eval.pt")
    for calibration, score in (("calib.pt", "eval.pt"), ("usermodel:calibration", "usermodel:score")):
        assert main(["compress", "usermodel:make", "--recipe", recipe, "--calibration-data", calibration,
                     "--eval-fn", score, "--save", "m.pt", "--export", "m.onnx"]) == 0
        out, err = capsys.readouterr()
        assert "random" not in err and "eval_fn:" in out and "before" in out
        assert "samples=40" in out if calibration == "calib.pt" else "samples=48" in out
        loaded = fxc.load(tmp_path / "m.pt")
        assert (tmp_path / "m.onnx").is_file() and loaded.training is False


def test_compress_trains_on_the_users_data(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.chdir(_user_model(tmp_path))
    (tmp_path / "train.toml").write_text('[[passes]]\npass = "finetune"\nepochs = 2\n')
    torch.save((torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))), tmp_path / "train.pt")
    assert main(["compress", "usermodel:make", "--recipe", "train.toml", "--train-data", "train.pt",
                 "--batch-size", "8"]) == 0
    assert "steps=8" in capsys.readouterr().out  # 2 epochs of 32 samples in batches of 8


def test_step_mode_exports_and_saves(recipe, tmp_path, capsys):
    assert main(["compress", "zoo:small_resnet", "--recipe", recipe, "--step", "--export", str(tmp_path / "s.onnx"),
                 "--save", str(tmp_path / "s.pt")]) == 0
    assert "[00 fold_bn]" in capsys.readouterr().out
    onnx.checker.check_model(str(tmp_path / "s.onnx"))
    assert isinstance(fxc.load(tmp_path / "s.pt"), fxc.CompiledModule)


def test_bad_data_files_are_clear_errors(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.chdir(_user_model(tmp_path))
    torch.save({"not": "tensors"}, tmp_path / "dict.pt")
    for argv, message in ((["--calibration-data", "missing.pt"], "neither a file nor package.module:function"),
                          (["--calibration-data", "dict.pt"], "holds a dict"),
                          (["--eval-fn", "usermodel:nothing"], "has no attribute 'nothing'")):
        assert main(["compress", "usermodel:make", "--recipe", str(Path(__file__).parents[2] / "recipes" /
                                                                   "quantize.toml"), *argv]) == 2
        assert message in capsys.readouterr().err
