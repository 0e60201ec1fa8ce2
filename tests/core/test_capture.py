"""The second front end: a forward symbolic tracing cannot run (a tensor made with traced sizes) is captured by
torch.export and normalised to the graph the passes read (built-in layers as modules, ATen ops as the functions
the registry knows), with batch and sequence dimensions left dynamic."""
from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress as fxc
from fxcompress import meta


class Encoder(nn.Module):
    """A small BERT-like block written as transformers writes it: a mask assigned into and built from sizes,
    scaled-dot-product attention, LayerNorm, a GELU FFN, and a conv + BatchNorm branch."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(100, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.ff1, self.act, self.ff2 = nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d)
        self.conv, self.bn = nn.Conv1d(d, d, 3, padding=1), nn.BatchNorm1d(d)

    def forward(self, ids, mask):
        x = self.emb(ids)
        batch, length, width = x.shape
        mask = mask.clone()
        mask[:, 0] = 1  # item assignment
        mask = torch.maximum(mask, torch.zeros(batch, length, dtype=mask.dtype))  # symbolic tracing stops here
        q, k, v = (lin(x).view(batch, length, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].to(torch.bool))
        x = self.ln(x + self.o(a.transpose(1, 2).reshape(batch, length, width)))
        x = x + self.ff2(self.act(self.ff1(x)))
        x = x + self.bn(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return {"hidden": x, "pooled": x[:, 0]}


def _inputs(batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - 2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Encoder().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def test_a_forward_symbolic_tracing_cannot_run_is_captured_by_export(model):
    gm = fxc.trace(model, _inputs())
    info = gm.meta[meta.TRACE_INFO]
    assert info.front_end == "export" and "zeros()" in info.fx_failure
    layers = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert layers == {"emb": nn.Embedding, "q": nn.Linear, "k": nn.Linear, "v": nn.Linear, "o": nn.Linear,
                      "ln": nn.LayerNorm, "ff1": nn.Linear, "act": nn.GELU, "ff2": nn.Linear, "conv": nn.Conv1d,
                      "bn": nn.BatchNorm1d}
    aten = [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    assert not aten, aten  # every op of this model has a function the registry knows
    for batch, length in ((1, 7), (3, 11)):  # batch and sequence stay dynamic (a batch of one included)
        x = _inputs(batch, length, seed=1)
        out, want = gm(*x), model(*x)
        assert type(out) is dict and out.keys() == want.keys()
        assert all(torch.equal(out[k], want[k]) for k in want)


def test_passes_run_on_the_exported_graph(model, tmp_path):
    x = _inputs()
    folded = fxc.compile(model, x, [{"pass": "fold_bn"}])
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.module.modules())
    assert torch.allclose(folded.module(*x)["hidden"], model(*x)["hidden"], atol=1e-5)
    loaded = fxc.load(folded.save(tmp_path / "m.pt"))
    assert all(torch.equal(loaded(*x)[k], folded.module(*x)[k]) for k in ("hidden", "pooled"))
    session = ort.InferenceSession(str(folded.export_onnx(tmp_path / "m.onnx")))
    for batch, length in ((2, 7), (3, 11)):  # the sequence axis export kept symbolic stays dynamic in ONNX too
        y = _inputs(batch, length, seed=2)
        got = session.run(None, {"ids": y[0].numpy(), "mask": y[1].numpy()})
        assert abs(got[0] - folded.module(*y)["hidden"].detach().numpy()).max() < 1e-4

    mask = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5, "mode": "mask"}])
    removed = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    assert removed.after.macs < 0.8 * removed.before.macs
    assert removed.module.get_submodule("ff1").out_features == 32  # the FFN's intermediate width
    for k in ("hidden", "pooled"):
        assert torch.allclose(removed.module(*x)[k], mask.module(*x)[k], atol=1e-4)


def test_a_model_neither_front_end_can_capture_names_both_reasons():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # a branch on values
                return x.relu()
            return -x
    with pytest.raises(fxc.TracingError, match="(?s)symbolically traced.*torch.export could not capture it either"):
        fxc.trace(DataDependent(), (torch.randn(2, 3),))


def test_leaf_modules_or_concrete_args_keep_symbolic_tracing_the_only_front_end(model):
    with pytest.raises(fxc.TracingError, match=r"zeros\(\)") as err:
        fxc.trace(model, _inputs(), leaf_modules=["emb"])
    assert "torch.export" not in str(err.value)


def test_inputs_by_name_reach_the_forwards_keyword_arguments(model):
    """Hugging Face forwards take optional arguments between the ones a user gives (GPT-2: input_ids,
    past_key_values, ..., attention_mask): example inputs by name are passed by name, and the compiled module takes
    them in the dict's order, by position or by name."""
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, past=None, mask=None):
            assert past is None
            return self.inner(ids, mask)
    ids, mask = _inputs()
    result = fxc.compile(Wrapped(), {"ids": ids, "mask": mask}, [{"pass": "fold_bn"}])
    assert result.trace.front_end == "export" and "by keyword" in result.trace.fx_failure
    want = model(ids, mask)["hidden"]
    assert torch.allclose(result.module(ids, mask)["hidden"], want, atol=1e-5)
    assert torch.allclose(result.module(ids=ids, mask=mask)["hidden"], want, atol=1e-5)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sign()

    @staticmethod
    def backward(ctx, grad):
        return grad


class _MadeFromSizes(nn.Module):
    """Two Linear layers around ``middle(hidden, training)``, after a tensor made with traced sizes (symbolic
    tracing stops there)."""

    def __init__(self, middle):
        super().__init__()
        self.a, self.b, self.middle = nn.Linear(6, 8), nn.Linear(8, 3), middle

    def forward(self, x):
        x = x * torch.ones(x.shape[0], 1)
        return self.b(self.middle(self.a(x), self.training))


def test_a_custom_autograd_function_export_inlines_is_recorded_and_training_refuses_it():
    """torch.export keeps a custom Function's forward ops and loses its backward: the graph says so, as symbolic
    tracing's does, and the training passes refuse it."""
    x = torch.randn(16, 6)
    result = fxc.compile(_MadeFromSizes(lambda h, training: _SignSTE.apply(h)), x, [{"pass": "fold_bn"}])
    assert result.trace.front_end == "export" and result.trace.inlined_functions == ("_SignSTE",)
    with pytest.raises(fxc.PassError, match="_SignSTE"):
        fxc.compile(_MadeFromSizes(lambda h, training: _SignSTE.apply(h)), x, [{"pass": "finetune"}],
                    train_data=[(x, torch.arange(16) % 3)])


def test_the_exported_graph_is_of_the_model_in_eval_mode_as_compile_asks():
    """compile traces in eval mode; the export front end captures that same copy, not the caller's training-mode
    model (whose dropout would be captured as a random op)."""
    model = _MadeFromSizes(lambda h, training: F.dropout(h, 0.5, training)).train()  # an op, not a module
    x = torch.randn(16, 6)
    result = fxc.compile(model, x, [{"pass": "fold_bn"}])
    assert result.trace.front_end == "export" and model.training
    assert not any(m.training for m in result.module.modules())
    assert torch.equal(result.module(x), model.eval()(x))


def test_a_vector_norm_export_records_as_aten_reads_as_torch_linalg_vector_norm():
    """ConvNeXt-V2's global response norm: torch.norm is recorded by torch.export as aten.linalg_vector_norm, which
    torch has only as torch.linalg.vector_norm; the graph reads it as that function (the pruning rules know it)."""
    class Grn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            h = self.a(x) * torch.ones(x.shape[0], 1, 1)  # made with traced sizes: torch.export captures it
            g = h.norm(p=2, dim=1, keepdim=True)
            return self.b(h * g / (g.mean(dim=-1, keepdim=True) + 1e-6))

    x = torch.randn(2, 5, 8)
    gm = fxc.trace(Grn().eval(), x)
    assert gm.meta[meta.TRACE_INFO].front_end == "export"
    assert any(n.target is torch.linalg.vector_norm for n in gm.graph.nodes)
    pruned = fxc.compile(Grn().eval(), x, [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    assert pruned.module.a.out_features == 8


class FusedQkv(nn.Module):
    """Falcon's layers as torch.export records them: ``x @ self.weight.T`` (aten.numpy_T) and a fused query, key and
    value projection cut with ``split`` into unequal parts (aten.split_with_sizes)."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(2 * d + 8, d) / d ** 0.5)
        self.out, self.ffn = nn.Linear(d, d), nn.Linear(8, d)

    def forward(self, x):
        x = x * torch.ones(x.shape[0], 1, 1)  # made with traced sizes: torch.export captures it
        q, k, v = torch.split(x @ self.qkv.T, [x.shape[-1], x.shape[-1], 8], dim=-1)
        return self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ q) + self.ffn(F.gelu(v))


def test_transposed_weights_and_unequal_splits_export_records_read_as_the_functions_pruning_knows():
    x = torch.randn(2, 5, 16)
    torch.manual_seed(0)
    model = FusedQkv().eval()
    gm = fxc.trace(model, x)
    assert gm.meta[meta.TRACE_INFO].front_end == "export"
    assert not [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    mask = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5, "mode": "mask"}])
    removed = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    assert removed.module.ffn.in_features < 8 and removed.module.qkv.shape[0] < 40  # the split's parts re-sized
    assert torch.allclose(removed.module(x), mask.module(x), atol=1e-5)
