import subprocess
import sys
from pathlib import Path

import fxcompress.golden_models
import fxcompress.passes

import fxcompress

ROOT = Path(__file__).resolve().parents[2]


def test_passes_and_golden_models_are_subpackages_of_fxcompress():
    assert Path(fxcompress.passes.__file__).resolve() == ROOT / "passes" / "__init__.py"
    assert Path(fxcompress.golden_models.__file__).resolve() == ROOT / "golden_models" / "__init__.py"


def test_no_top_level_passes_package(tmp_path):
    code = "import importlib.util; print(importlib.util.find_spec('passes'), importlib.util.find_spec('golden_models'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "None None", done.stderr


def test_golden_registry():
    names = fxcompress.golden.names()
    assert {"resnet18", "resnet50", "mobilenet_v2", "vgg11_bn"} <= set(names)
    model, (x,) = fxcompress.golden.load("mobilenet_v2")
    assert not model.training and x.shape == (1, 3, 224, 224)
    bn = model.features[0][1]
    assert bn.running_var.min() > 0 and not bn.running_mean.eq(0).all()  # estimated, not left at defaults
    again, (y,) = fxcompress.golden.load("mobilenet_v2")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert (x == y).all()


def test_pyproject_states_ranges_and_requirements_pin_torch():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=' in text and "==" not in text
    req = (ROOT / "requirements-dev.txt").read_text().split()
    assert "torch==2.14.1" in req and "torchvision==0.29.1" in req and "-e" in req and ".[dev]" in req
