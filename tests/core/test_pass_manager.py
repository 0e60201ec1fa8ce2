import json

import pytest
import torch
import torch.nn as nn
import zoo
from fxcompress.passes.pruning.select_channels import PruningPlan

import fxcompress as fxc
from fxcompress import meta
from fxcompress.pass_base import Contract, Pass, PassResult
from fxcompress.plans import Artifact, Lifetime


class ScaleOutput(Pass):
    """Multiplies the output by a factor (CHANGES, or a lying EXACT when told to)."""

    name = "scale_output"
    contract = Contract.CHANGES

    def __init__(self, factor: float = 2.0, claim_modified: bool = True):
        self.factor, self.claim_modified = factor, claim_modified

    def run(self, ctx):
        graph = ctx.gm.graph
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(out):
            scaled = graph.call_function(torch.mul, (out.args[0], self.factor))
        scaled.meta[meta.TENSOR] = out.args[0].meta[meta.TENSOR]
        out.args = (scaled,)
        out.meta[meta.TENSOR] = scaled.meta[meta.TENSOR]
        return PassResult(modified=self.claim_modified, stats={"scaled": 1})


class ExactScale(ScaleOutput):
    name = "exact_scale"
    contract = Contract.EXACT


class BoundedScale(ScaleOutput):
    name = "bounded_scale"
    contract = Contract.BOUNDED

    def error_bound(self, ctx):
        return 0.05


class Nothing(Pass):
    name = "nothing"
    contract = Contract.EXACT

    def __init__(self, claim_modified: bool = False):
        self.claim_modified = claim_modified

    def run(self, ctx):
        return PassResult(modified=self.claim_modified, stats={"looked": 1})


class ZeroWeight(Pass):
    """Changes a parameter value but not the code."""

    name = "zero_weight"
    contract = Contract.CHANGES
    writes_tensors = True

    def __init__(self, fail: bool = False):
        self.fail = fail

    def run(self, ctx):
        with torch.no_grad():
            ctx.gm.get_submodule("fc").weight.zero_()
        if self.fail:
            raise RuntimeError("failed after writing")
        return PassResult(modified=False)


class UndeclaredWrite(ZeroWeight):
    """Writes a parameter in place without saying so: the restore point shares it."""

    name = "undeclared_write"
    writes_tensors = False


class StaleMeta(ScaleOutput):
    """Adds a node without metadata."""

    name = "stale_meta"

    def run(self, ctx):
        graph = ctx.gm.graph
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(out):
            added = graph.call_function(torch.add, (out.args[0], 1.0))
        out.args = (added,)
        return PassResult(modified=True)


class Crash(Pass):
    name = "crash"
    contract = Contract.EXACT

    def __init__(self):
        pass

    def run(self, ctx):
        ctx.gm.graph.erase_node(next(n for n in ctx.gm.graph.nodes if n.op == "output"))
        raise RuntimeError("boom")


def _residual():
    return zoo.build("residual")


def test_step_shows_diff_stats_and_time(tmp_path):
    model, inputs = _residual()
    pm = fxc.PassManager([{"pass": "fold_bn"}, Nothing()], dump_dir=tmp_path)
    ctx = pm.context(model, inputs)
    assert pm.pending(ctx) == ["fold_bn", "nothing"]
    first = pm.step(ctx)
    assert first.name == "fold_bn" and first.modified and first.seconds > 0
    assert first.diff.startswith("--- before fold_bn") and '-    stem_1 = getattr(self.stem, "1")(stem_0)' in first.diff
    assert first.stats["bn_folded"] == 5 and first.error is not None and first.error < 1e-5
    assert "fold_bn" in first.summary() and "bn_folded=5" in first.summary()
    second = pm.step(ctx)
    assert not second.modified and second.diff == "" and second.param_changes == ()
    assert pm.pending(ctx) == []
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_input.py", "01_fold_bn.diff", "01_fold_bn.py"]  # no dump for the unchanged pass
    assert "+a.0.bias [8]" in (tmp_path / "01_fold_bn.diff").read_text()
    with pytest.raises(fxc.RecipeError, match="finished"):
        pm.step(ctx)


def test_until_start_after_only():
    model, inputs = _residual()
    pm = fxc.PassManager([Nothing(), {"pass": "fold_bn"}, ScaleOutput()])
    ctx = pm.context(model, inputs)
    assert [r.name for r in pm.run(ctx, until="fold_bn")] == ["nothing", "fold_bn"]
    assert [r.name for r in pm.run(ctx)] == ["scale_output"]
    ctx = pm.context(model, inputs)
    assert [r.name for r in pm.run(ctx, start_after="fold_bn")] == ["scale_output"]
    ctx = pm.context(model, inputs)
    assert [r.name for r in pm.run(ctx, only="fold_bn")] == ["fold_bn"]
    assert pm.pending(ctx) == ["nothing", "fold_bn", "scale_output"]
    with pytest.raises(fxc.RecipeError, match="Did you mean 'fold_bn'"):
        pm.run(ctx, until="fold")


def test_honesty_graph_changed_but_said_unchanged():
    model, inputs = _residual()
    with pytest.raises(fxc.VerificationError, match="modified=False but changed the module"):
        fxc.compile(model, inputs, [ScaleOutput(claim_modified=False)])


def test_honesty_parameter_values_count_as_changes():
    model, inputs = _residual()
    with pytest.raises(fxc.VerificationError, match="parameter/buffer values"):
        fxc.compile(model, inputs, [ZeroWeight()])


def test_in_place_write_without_declaring_it_is_named():
    model, inputs = _residual()
    with pytest.raises(fxc.PassError, match=r"\[undeclared_write\] wrote fc.weight in place"):
        fxc.compile(model, inputs, [UndeclaredWrite()])


def test_failure_after_a_declared_in_place_write_restores_the_values(tmp_path):
    model, inputs = _residual()
    pm = fxc.PassManager([ZeroWeight(fail=True)], reproducer_dir=tmp_path)
    ctx = pm.context(model, inputs)
    before = ctx.gm.get_submodule("fc").weight.detach().clone()
    with pytest.raises(fxc.PassError, match="failed after writing"):
        pm.step(ctx)
    assert torch.equal(ctx.gm.get_submodule("fc").weight, before) and bool(before.abs().sum() > 0)
    assert torch.equal(ctx.gm(*inputs), model(*inputs))


def test_honesty_said_modified_but_changed_nothing():
    model, inputs = _residual()
    with pytest.raises(fxc.VerificationError, match="modified=True but changed nothing"):
        fxc.compile(model, inputs, [Nothing(claim_modified=True)])


def test_honesty_is_forced_on_by_strict_checks():
    model, inputs = _residual()
    with pytest.raises(fxc.VerificationError):
        fxc.PassManager([ScaleOutput(claim_modified=False)], check_honesty=False, verify=False)
        fxc.compile(model, inputs, [ScaleOutput(claim_modified=False)], verify=False, check_numerics=False)


def test_exact_pass_that_changes_outputs_fails_numeric_check():
    model, inputs = _residual()
    with pytest.raises(fxc.VerificationError, match="EXACT but changed the outputs.*in float32 and in float64"):
        fxc.compile(model, inputs, [ExactScale(factor=1.001)])
    result = fxc.compile(model, inputs, [ExactScale(factor=1 + 1e-7)])  # within float rounding: accepted
    assert result.history[0].error < 1e-6


def test_bounded_pass_checked_against_its_bound():
    model, inputs = _residual()
    assert fxc.compile(model, inputs, [BoundedScale(factor=1.01)]).history[0].error == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(fxc.VerificationError, match="exceeded its error bound"):
        fxc.compile(model, inputs, [BoundedScale(factor=1.1)])


def test_changes_pass_is_not_numerically_checked_but_the_next_stage_is():
    model, inputs = _residual()
    result = fxc.compile(model, inputs, [ScaleOutput(factor=3.0), {"pass": "fold_bn"}])
    assert result.history[0].error is None and result.history[1].error < 1e-5
    torch.testing.assert_close(result.module(*inputs), 3 * model(*inputs), rtol=1e-5, atol=1e-5)


def test_stale_metadata_is_caught():
    model, inputs = _residual()
    with pytest.raises(fxc.VerificationError, match="stale metadata") as err:
        fxc.compile(model, inputs, [StaleMeta()])
    assert "add" in str(err.value)


def test_failure_restores_module_and_writes_reproducer(tmp_path):
    model, inputs = _residual()
    pm = fxc.PassManager([{"pass": "fold_bn"}, Crash()], reproducer_dir=tmp_path)
    ctx = pm.context(model, inputs)
    pm.step(ctx)
    code_before = ctx.gm.code
    with pytest.raises(fxc.PassError, match=r"\[crash\] failed with RuntimeError: boom") as err:
        pm.step(ctx)
    repro = tmp_path / "01_crash"
    assert str(repro) in str(err.value)
    assert ctx.gm.code == code_before and pm.pending(ctx) == ["crash"] # left as the failing pass received it
    assert {p.name for p in repro.iterdir()} >= {"code.py", "graph.txt", "error.txt", "pass.json", "inputs.pt",
                                                 "state_dict.pt", "module.pt", "repro.py"}
    assert json.loads((repro / "pass.json").read_text()) == {"pass": "crash"}
    assert "boom" in (repro / "error.txt").read_text()
    saved = torch.load(repro / "module.pt", weights_only=False)
    torch.testing.assert_close(saved(*torch.load(repro / "inputs.pt")), ctx.gm(*inputs))


def test_reproducer_script_reruns_a_registered_pass(tmp_path, monkeypatch):
    import subprocess
    import sys

    from fxcompress.passes import PASSES

    model, inputs = _residual()

    def broken_run(self, ctx):
        raise ValueError("broken fold")

    monkeypatch.setattr(PASSES["fold_bn"], "run", broken_run)
    with pytest.raises(fxc.PassError, match="broken fold"):
        fxc.PassManager([{"pass": "fold_bn"}], reproducer_dir=tmp_path).run(fxc.PassManager([]).context(model, inputs))
    monkeypatch.undo()
    script = tmp_path / "00_fold_bn" / "repro.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fold_bn" in done.stdout and "bn_folded=5" in done.stdout


class NodeCount(Artifact):
    kind = "test_node_count"
    owner = "uses_analysis"
    lifetime = Lifetime.ANALYSIS

    def __init__(self, n: int):
        self.n = n


def test_analyses_are_cached_and_invalidated_on_modification():
    model, inputs = _residual()
    calls = []

    class UsesAnalysis(Nothing):
        name = "uses_analysis"

        def run(self, ctx):
            ctx.analysis(NodeCount, lambda c: calls.append(1) or NodeCount(len(c.gm.graph.nodes)))
            return PassResult(modified=False)

    pm = fxc.PassManager([UsesAnalysis(), UsesAnalysis(), {"pass": "fold_bn"}, UsesAnalysis()])
    ctx = pm.context(model, inputs)
    pm.run(ctx)
    assert len(calls) == 2  # computed, reused, invalidated by fold_bn, recomputed
    assert ctx.analyses[NodeCount].n == len(ctx.gm.graph.nodes)


def test_missing_requirement_names_it():
    class NeedsPlan(Nothing):
        name = "needs_plan"
        requires = (PruningPlan,)

    model, inputs = _residual()
    with pytest.raises(fxc.PassError, match="needs 'pruning_plan'.*select_channels"):
        fxc.compile(model, inputs, [NeedsPlan()])


def test_instances_do_not_share_state():
    a, b = fxc.PassManager([Nothing()]), fxc.PassManager([Nothing()])
    assert a.instruments is not b.instruments and a.passes[0] is not b.passes[0]
    assert all(x is not y for x, y in zip(a.instruments, b.instruments))


def test_record_check_time_and_report_rows():
    model, inputs = _residual()
    result = fxc.compile(model, inputs, [{"pass": "fold_bn"}, Nothing()])
    assert [r.name for r in result.history] == ["fold_bn", "nothing"]
    assert all(r.check_seconds > 0 for r in result.history)
    report = result.report()
    assert "fold_bn" in report and "bn_folded=5" in report and "nothing" in report
    assert "params" in report and "MACs" in report


def test_verify_hook_of_the_pass_runs():
    class Picky(Nothing):
        name = "picky"

        def verify(self, ctx):
            raise fxc.VerificationError("[picky] graph not to my liking")

    model, inputs = _residual()
    with pytest.raises(fxc.VerificationError, match="not to my liking"):
        fxc.compile(model, inputs, [Picky()])


def test_pass_crash_does_not_touch_user_model():
    model, inputs = _residual()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxc.PassError):
        fxc.compile(model, inputs, [{"pass": "fold_bn"}, Crash()])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.a[1], nn.BatchNorm2d)


def _storages(m: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()] if t.numel()}


def test_the_traced_copy_borrows_the_model_tensors_until_a_pass_writes():
    model, inputs = _residual()
    versions = {k: v._version for k, v in model.state_dict().items()}
    pm = fxc.PassManager([{"pass": "propagate_dependencies"}, {"pass": "select_channels", "ratio": 0.5},
                          {"pass": "remove_channels", "mode": "mask"}])
    ctx = pm.context(model, inputs)
    assert ctx.gm.get_parameter("a.0.weight") is model.a[0].weight  # copy on write: nothing copied yet
    pm.run(ctx)  # mask mode writes zeros: the tensors were copied first
    assert not _storages(ctx.gm) & _storages(model) and not ctx.borrowed
    assert {k: v._version for k, v in model.state_dict().items()} == versions
    for recipe in ([{"pass": "propagate_dependencies"}], [{"pass": "fold_bn"}], [{"pass": "prune", "ratio": 0.5}]):
        result = fxc.compile(model, inputs, recipe)
        assert not _storages(result.module) & _storages(model), recipe  # never handed back shared
    assert {k: v._version for k, v in model.state_dict().items()} == versions
