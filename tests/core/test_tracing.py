import copy
import operator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zoo

import fxcompress as fxc
from fxcompress import meta
from fxcompress.meta import TensorInfo


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, repr(model),
            [m.training for m in model.modules()], getattr(model, "code", None))


def _assert_unchanged(model: nn.Module, before) -> None:
    state, text, modes, code = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert repr(model) == text
    assert [m.training for m in model.modules()] == modes
    assert getattr(model, "code", None) == code


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_node_has_metadata_matching_a_real_run(name):
    model, inputs = zoo.build(name)
    gm = fxc.trace(model, inputs)
    observed, _ = meta.observe(gm, inputs)
    for node in gm.graph.nodes:
        assert meta.TENSOR in node.meta, node.name
        assert node.meta[meta.TENSOR] == observed[node.name]


def test_shared_submodule_called_twice_gives_two_nodes():
    model, inputs = zoo.build("shared_multi_user")
    gm = fxc.trace(model, inputs)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "shared"]
    assert len(calls) == 2
    assert all(meta.tensor_info(n) == TensorInfo((2, 8, 8, 8), torch.float32) for n in calls)


def test_functional_calls_with_bare_parameters():
    model, inputs = zoo.build("functional")
    gm = fxc.trace(model, inputs)
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"w", "mean", "var", "gamma", "beta", "proj", "lin"} <= attrs
    assert F.batch_norm in {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert meta.tensor_info(next(n for n in gm.graph.nodes if n.target == "w")).shape == (8, 3, 3, 3)


def test_multihead_attention_is_one_node_with_tuple_metadata():
    mha = nn.MultiheadAttention(8, 2).eval()  # batch_first=False: (L, N, E)
    x = torch.randn(5, 3, 8)
    gm = fxc.trace(mha, (x, x, x))
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [(n.op, type(gm.get_submodule(n.target))) for n in calls] == [("call_module", nn.MultiheadAttention)]
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["query", "key", "value"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.meta[meta.TENSOR] == (TensorInfo((5, 3, 8), torch.float32), TensorInfo((3, 5, 5), torch.float32))
    torch.testing.assert_close(gm(x, x, x), mha(x, x, x), rtol=0, atol=0)


def test_cat_chunk_split_view_permute_flatten_shapes():
    model, inputs = zoo.build("splits_views")
    gm = fxc.trace(model, inputs)
    by_target = {}
    for n in gm.graph.nodes:
        by_target.setdefault(getattr(n.target, "__name__", n.target), []).append(n.meta[meta.TENSOR])
    assert by_target["split"] == [(TensorInfo((2, 4, 8, 8), torch.float32), TensorInfo((2, 8, 8, 8), torch.float32))]
    assert by_target["chunk"][0][1] == TensorInfo((2, 4, 8, 8), torch.float32)
    assert by_target["cat"] == [TensorInfo((2, 8, 8, 8), torch.float32)]
    assert by_target["flatten"] == [TensorInfo((2, 384), torch.float32)]
    out = gm(*inputs)
    assert isinstance(out, dict) and set(out) == {"logits", "aux"}


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x - 1


class WithUntraceableChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.branchy = DataDependent()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(self.branchy(self.pre(x)))


def test_untraceable_submodule_becomes_a_leaf_and_is_reported():
    model = WithUntraceableChild().eval()
    x = torch.randn(3, 4)
    gm = fxc.trace(model, x)
    info = gm.meta[meta.TRACE_INFO]
    assert list(info.auto_leaves) == ["branchy"]
    assert "control flow" in info.auto_leaves["branchy"] and "test_tracing.py" in info.auto_leaves["branchy"]
    node = next(n for n in gm.graph.nodes if n.target == "branchy")
    assert node.op == "call_module" and meta.AUTO_LEAF in node.meta
    for sign in (1, -1):  # both branches still taken at run time, since the leaf runs real Python
        torch.testing.assert_close(gm(sign * x.abs()), model(sign * x.abs()), rtol=0, atol=0)
    result = fxc.compile(model, x, [{"pass": "fold_bn"}])
    assert "branchy" in result.report()


class PadToEven(nn.Module):
    """MobileViT's unfold: a Python ``if`` on the input's shape (pad to a multiple of the patch size)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2))
        return self.conv(x)


class WithShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad, self.head = PadToEven(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.pad(x))


@pytest.mark.parametrize("size", [6, 7])
def test_an_if_on_input_shapes_takes_the_example_branch_and_asserts_it(size):
    """The submodule traces (no opaque leaf): the branch is the one the example inputs take, any batch size runs,
    and inputs whose shapes take the other branch fail loudly instead of computing the wrong thing."""
    model, x = WithShapeBranch().eval(), torch.randn(2, 3, size, size)
    gm = fxc.trace(model, x)
    info = gm.meta[meta.TRACE_INFO]
    assert not info.auto_leaves and info.shape_branches
    assert all(b == f"`if h % 2 or w % 2:` -> {bool(size % 2)}" for b in info.shape_branches)
    assert any(n.op == "call_module" and n.target == "pad.conv" for n in gm.graph.nodes)
    bigger = torch.randn(5, 3, size, size)
    torch.testing.assert_close(gm(bigger), model(bigger), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="trace the model again"):
        gm(torch.randn(2, 3, size + 1, size + 1))
    result = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    assert result.module.pad.conv.out_channels == 2


class RelativeBias(nn.Module):
    """timm's SAM ViT: a table of relative positions sized by ``int()`` of a value computed from the input's shape,
    added to the attention of every head."""

    def __init__(self, size=5, dim=4):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(2 * size - 1, 1))

    def forward(self, x):
        n = x.shape[1]
        span = int(2 * n - 1)
        rel = self.rel if self.rel.shape[0] == span else self.rel[:span]
        coords = torch.arange(n)[:, None] - torch.arange(n)[None, :] + (n - 1)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) + rel[coords.long()][..., 0]).softmax(-1)
        return self.proj(attn @ v) + x


def test_int_of_a_shape_takes_the_example_value_and_asserts_it():
    """``int()`` of a value computed from shapes no longer makes the module opaque: the graph uses the example's
    value and asserts it, so any batch runs, another sequence length fails loudly, and the block prunes."""
    model, x = nn.Sequential(RelativeBias(), nn.Linear(4, 2)).eval(), torch.randn(2, 5, 4)
    gm = fxc.trace(model, x)
    info = gm.meta[meta.TRACE_INFO]
    assert not info.auto_leaves
    assert "`span = int(2 * n - 1)` -> int 9" in info.shape_branches
    bigger = torch.randn(7, 5, 4)
    torch.testing.assert_close(gm(bigger), model(bigger), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="use the value 9"):
        gm(torch.randn(2, 4, 4))
    result = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    assert result.module.get_submodule("0.qkv").out_features < 12  # q and k, or v, pruned inside the block


class DisentangledLike(nn.Module):
    """Hugging Face DeBERTa-v2's patterns: a buffer sliced by a traced length, ``torch.tensor`` of a traced size,
    the smallest value of a traced dtype filling masked scores."""

    def __init__(self, dim=8, max_len=16):
        super().__init__()
        self.qkv, self.out, self.pos = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Embedding(max_len, dim)
        self.register_buffer("position_ids", torch.arange(max_len)[None], persistent=False)

    def forward(self, x, mask):
        n = x.size(1)
        x = x + self.pos(self.position_ids[:, :n])
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scale = torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float))
        scores = (q @ k.transpose(-1, -2)) / scale
        scores = scores.masked_fill(~mask[:, None, :].bool(), torch.finfo(q.dtype).min)
        return self.out(scores.softmax(-1) @ v)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = DisentangledLike(), nn.Linear(8, 2)

    def forward(self, x, mask):
        return self.head(self.block(x, mask))


def test_buffers_sliced_tensors_made_and_dtype_limits_taken_from_traced_shapes(tmp_path):
    """A buffer sliced by a length read from the input, ``torch.tensor`` of a size and ``torch.finfo`` of a traced
    tensor's dtype take the example's values (asserted in the graph) instead of making the module opaque: any
    batch runs, another length fails loudly, the attention prunes, and the export runs in ONNX Runtime."""
    model = Encoder().eval()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    gm = fxc.trace(model, (x, mask))
    info = gm.meta[meta.TRACE_INFO]
    assert not info.auto_leaves
    assert {b.split(" -> ")[1] for b in info.shape_branches} == {"int 5", "int 8", "dtype torch.float32"}
    bigger = (torch.randn(7, 5, 8), torch.ones(7, 5, dtype=torch.long))
    torch.testing.assert_close(gm(*bigger), model(*bigger), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="use the value 5"):
        gm(torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.long))
    result = fxc.compile(model, (x, mask), [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    assert result.module.block.qkv.out_features < 24
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(result.export_onnx(tmp_path / "m.onnx")))
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()], (x.numpy(), mask.numpy()))))[0]
    np.testing.assert_allclose(got, result.module(x, mask).detach().numpy(), atol=1e-5)


def test_int_of_a_tensor_value_keeps_the_submodule_opaque():
    class Counted(nn.Module):
        def forward(self, x):
            return x[:, : int(x.sum() > 0) + 1]

    model = nn.Sequential(nn.Linear(4, 4), Counted()).eval()
    gm = fxc.trace(model, torch.randn(2, 4))
    assert "int() of the symbolically traced value" in gm.meta[meta.TRACE_INFO].auto_leaves["1"]


class CachedTable(nn.Module):
    """timm ConViT: a table of relative positions built by item assignment, cached on the module in its forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.register_buffer("table", torch.zeros(1, 1, 3), persistent=False)

    def forward(self, x):
        n = x.shape[1]
        if self.table.shape[1] != n:
            table = torch.zeros(1, n, 3)
            table[:, :, 0] = torch.arange(n, dtype=torch.float32)
            table[:, :, 2] = 1.0
            self.table = table
        return self.fc(x + self.table)


def test_item_assignment_traces_and_a_tensor_cached_on_the_module_is_not_left_a_proxy():
    model, x = nn.Sequential(CachedTable(), nn.ReLU()).eval(), torch.randn(2, 5, 3)
    gm = fxc.trace(model, x)
    assert not gm.meta[meta.TRACE_INFO].auto_leaves
    assert sum(n.target is operator.setitem for n in gm.graph.nodes) == 2
    other = torch.randn(7, 5, 3)
    torch.testing.assert_close(gm(other), model(other), rtol=0, atol=0)
    assert not [v for m in gm.modules() for v in (*m.__dict__.values(), *m._buffers.values())
                if isinstance(v, torch.fx.Proxy)]


class UntraceableTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.max() > 10:  # the line the error must name
            y = y / 10
        return y


def test_untraceable_top_level_names_module_and_source_line():
    model = UntraceableTop()
    before = _snapshot(model)
    with pytest.raises(fxc.TracingError) as err:
        fxc.trace(model, torch.randn(2, 4))
    msg = str(err.value)
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if "the line the error must name" in text)
    assert "UntraceableTop" in msg
    assert f"test_tracing.py:{line}" in msg
    assert "concrete_args" in msg and "leaf_modules" in msg
    _assert_unchanged(model, before)


def test_leaf_modules_by_name_and_type():
    model, inputs = zoo.build("residual")
    gm = fxc.trace(model, inputs, leaf_modules=["a", nn.Sequential])
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"a", "stem", "b", "down", "c"} <= targets
    with pytest.raises(fxc.InputError, match="Did you mean 'a'"):
        fxc.trace(model, inputs, leaf_modules=["aa"])


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # Python-side state the trace bakes in
        return x * self.calls


def test_trace_that_computes_something_else_is_an_error():
    with pytest.raises(fxc.TracingError, match="different output"):
        fxc.trace(Counter(), torch.randn(3))


@pytest.mark.parametrize("name", ["residual", "attention", "functional"])
def test_user_model_is_never_modified(name):
    model, inputs = zoo.build(name)
    model.train()  # a training-mode model must come back in training mode, with its BN statistics untouched
    before = _snapshot(model)
    result = fxc.compile(model, inputs, [{"pass": "fold_bn"}])
    _assert_unchanged(model, before)
    assert not result.module.training


def test_graph_module_input_is_not_modified():
    model, inputs = zoo.build("residual")
    gm = torch.fx.symbolic_trace(model)
    before = _snapshot(gm)
    fxc.compile(gm, inputs, [{"pass": "fold_bn"}])
    _assert_unchanged(gm, before)


@pytest.mark.parametrize("bad, match", [
    ("not a tensor", "must be a tensor"),
    ((torch.randn(2, 3, 8, 8), "x"), "tensors only"),
    ((), "non-empty"),
    ({"x": "not a tensor"}, "maps argument names to tensors"),
    ({"y": torch.randn(2, 3, 8, 8)}, "names 'y', which"),
])
def test_bad_example_inputs(bad, match):
    model, _ = zoo.build("residual")
    with pytest.raises(fxc.InputError, match=match):
        fxc.trace(model, bad)


def test_inputs_that_do_not_fit_the_model_name_the_model():
    model, _ = zoo.build("residual")
    with pytest.raises(fxc.FxCompressError, match="Residual") as err:
        fxc.trace(model, torch.randn(2, 5, 8, 8))
    assert "zoo.py" in str(err.value)


def test_not_a_module():
    with pytest.raises(fxc.InputError, match="torch.nn.Module"):
        fxc.trace(lambda x: x, torch.randn(2))


def test_uncopyable_model_is_a_clear_error():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.gen = (i for i in range(3))

        def forward(self, x):
            return x

    with pytest.raises(fxc.InputError, match="cannot copy Holder .*generator"):
        fxc.trace(Holder(), torch.randn(2))


def test_trace_keeps_training_flags_and_eval_mode_option():
    model, inputs = zoo.build("residual")
    model.a.train()
    gm = fxc.trace(model, inputs)
    assert gm.get_submodule("a.1").training and not gm.get_submodule("b.1").training
    gm_eval = fxc.trace(copy.deepcopy(model), inputs, eval_mode=True)
    assert not any(m.training for m in gm_eval.modules())


def test_optional_arguments_not_given_are_traced_as_none():
    """``forward(x, mask=None)`` called with x only: the branch on ``mask is not None`` is the one the caller takes
    (timm's Hiera and Gemma4 ViT failed their trace check before)."""

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x, mask=None):
            y = self.conv(x)
            if mask is not None:
                y = y * mask.view(mask.shape[0], 1, 1, 1)
            return y

    x = torch.randn(2, 3, 4, 4)
    model = Masked().eval()
    gm = fxc.trace(model, (x,))
    assert torch.equal(gm(x), model(x))
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == 1 and "mul" not in gm.code


def test_the_report_names_the_branches_taken_on_input_shapes():
    result = fxc.compile(WithShapeBranch().eval(), torch.randn(1, 3, 5, 5), [{"pass": "fold_bn"}])
    assert "branches on input shapes taken as the example inputs take them: `if h % 2 or w % 2:` -> True" \
        in result.report()
