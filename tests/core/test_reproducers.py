"""A failing pass leaves the module as it received it and a reproducer that reruns it, for every registered pass.

Each pass is made to fail after its real work (so the restore undoes real changes); the reproducer's ``repro.py``
then runs in this process twice: with the failure still injected it fails the same way, and without it the pass
runs to the end, which shows that the reproducer carries what the pass requires (plans, analyses, data, model).
"""
from __future__ import annotations

import runpy

import pytest
import torch
import zoo
from fxcompress.passes import PASSES

import fxcompress as fxc
from fxcompress.instruments import fingerprint

TRAIN = {"epochs": 1, "max_steps": 2, "lr": 1e-3}
PRUNE = [{"pass": "propagate_dependencies"}, {"pass": "select_channels", "ratio": 0.5}]
QUANT = [{"pass": "fold_bn"}, {"pass": "insert_observers"}, {"pass": "calibrate"}]
# The pipeline that reaches each registered pass (the pass itself last).
PIPELINES = {
    "fold_bn": [{"pass": "fold_bn"}],
    "propagate_dependencies": PRUNE[:1],
    "select_channels": PRUNE,
    "search_widths": [*PRUNE[:1], {"pass": "search_widths", "budget": {"macs": 0.5}}],
    "remove_channels": [*PRUNE, {"pass": "remove_channels"}],
    "low_rank_svd": [{"pass": "low_rank_svd", "rank_ratio": 0.5}],
    "insert_observers": QUANT[:2],
    "calibrate": QUANT,
    "lower_quantized": [*QUANT, {"pass": "lower_quantized"}],
    "recalibrate_bn": [*PRUNE, {"pass": "remove_channels"}, {"pass": "recalibrate_bn"}],
    "finetune": [{"pass": "finetune", **TRAIN}],
    "distill": [{"pass": "distill", **TRAIN}],
    "qat": [*QUANT, {"pass": "qat", **TRAIN}],
    "gradual_prune": [*PRUNE[:1], {"pass": "gradual_prune", "target": 0.5, "frequency": 1, **TRAIN}],
    "nas": [{"pass": "nas", "budget": {"macs": 0.6}, "population": 4, "generations": 1, **TRAIN}],
    "weight_share": [{"pass": "weight_share", "bits": 3, "data_aware": True}],
    "binarize": [{"pass": "binarize", "weights": "ternary", "activations": "binary"}],
}


class Injected(RuntimeError):
    pass


def test_every_registered_pass_has_a_pipeline():
    assert set(PIPELINES) == set(PASSES)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_failure_restores_and_reproduces(name, tmp_path, monkeypatch):
    model, inputs = zoo.build("residual")
    torch.manual_seed(0)
    calibration = [torch.randn_like(inputs[0]) for _ in range(4)]
    train = [(x, torch.randint(0, 10, (x.shape[0],))) for x in calibration]
    cls = PASSES[name]
    real_run = cls.run

    def failing_run(self, ctx):
        real_run(self, ctx)
        raise Injected(f"injected failure after {name} ran")

    pm = fxc.PassManager(PIPELINES[name], reproducer_dir=tmp_path)
    ctx = pm.context(model, inputs, calibration_data=calibration, train_data=train)
    if len(pm.names) > 1:
        pm.run(ctx, until=pm.names[-2])
    received = fingerprint(ctx.gm)
    monkeypatch.setattr(cls, "run", failing_run)
    with pytest.raises(fxc.PassError, match="injected failure") as err:
        pm.step(ctx)
    assert fingerprint(ctx.gm) == received, "the module is not what the failing pass received"
    torch.testing.assert_close(ctx.gm(*inputs), ctx.gm(*inputs))
    directory = next(tmp_path.glob(f"*_{name}"))
    assert str(directory) in str(err.value)
    script = str(directory / "repro.py")
    with pytest.raises(fxc.PassError, match="injected failure"):
        runpy.run_path(script, run_name="__main__")
    monkeypatch.undo()
    runpy.run_path(script, run_name="__main__")  # the pass itself runs through with what the reproducer saved
