import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zoo

import fxcompress as fxc
from fxcompress import counting


def _macs_by_node(gm):
    return {r.node: r.macs for r in counting.node_costs(gm)}


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # out 8x6x6, per output 2*9 MACs
        self.up = nn.ConvTranspose2d(8, 4, 2, 2)  # in 8x6x6, per input 4*4 MACs
        self.fc = nn.Linear(16, 3)
        self.w = nn.Parameter(torch.randn(5, 4, 3, 3))
        self.m = nn.Parameter(torch.randn(12, 7))
        self.lin = nn.Parameter(torch.randn(2, 7))

    def forward(self, x):  # x: (1, 4, 6, 6)
        y = self.up(self.conv(x))  # (1, 4, 12, 12)
        f = F.conv2d(x, self.w)  # (1, 5, 4, 4): 80 outputs * 36
        z = self.fc(y.reshape(1, 36, 16))  # (1, 36, 3): 108 * 16
        a = z.reshape(1, 9, 12) @ self.m  # (1, 9, 7): 63 * 12
        b = torch.bmm(a.transpose(1, 2), a)  # (1, 7, 7): 49 * 9
        c = F.linear(a, self.lin)  # (1, 9, 2): 18 * 7
        q = y.reshape(1, 2, 36, 8)
        d = F.scaled_dot_product_attention(q, q, q)  # batch 2, L=S=36, E=Ev=8
        return f.sum() + b.sum() + c.sum() + a.matmul(a.transpose(1, 2)).sum() + d.sum()


def test_macs_of_every_counted_op():
    gm = fxc.trace(Mixed().eval(), torch.randn(1, 4, 6, 6))
    macs = _macs_by_node(gm)
    assert macs["conv"] == 8 * 36 * 2 * 9
    assert macs["up"] == 8 * 36 * 4 * 4
    assert macs["conv2d"] == 80 * 36
    assert macs["fc"] == 108 * 16
    assert macs["matmul"] == 63 * 12
    assert macs["bmm"] == 49 * 9
    assert macs["linear"] == 18 * 7
    assert macs["matmul_1"] == 81 * 7  # the method form
    assert macs["scaled_dot_product_attention"] == 2 * 36 * 36 * 16
    total = counting.totals(gm)
    assert total.macs == sum(macs.values())
    assert total.params == sum(p.numel() for p in Mixed().parameters())


def test_multihead_attention_macs():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 16)
    gm = fxc.trace(mha, (x, x, x))
    expected = 3 * (4 * 10 * 16 * 16 + 2 * 10 * 10 * 16)  # q,k,v,out projections + scores + weighted sum
    assert counting.totals(gm).macs == expected


def test_shared_module_params_once_macs_twice():
    model, inputs = zoo.build("shared_multi_user")
    gm = fxc.trace(model, inputs)
    rows = [r for r in counting.node_costs(gm) if r.target == "shared"]
    assert len(rows) == 2 and rows[0].macs == rows[1].macs == 2 * 64 * 8 * 8 * 9
    assert counting.totals(gm).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, params, gmacs", [("resnet18", 11_689_512, 1.814), ("mobilenet_v2", 3_504_872, 0.3008)])
def test_published_counts(name, params, gmacs):
    model, inputs = fxc.golden.load(name)
    totals = counting.totals(fxc.trace(model, inputs))
    assert totals.params == params
    assert totals.macs / 1e9 == pytest.approx(gmacs, rel=2e-3)


def test_bytes_and_table():
    model, inputs = zoo.build("residual")
    gm = fxc.trace(model, inputs)
    rows = counting.node_costs(gm)
    x = rows[0]
    assert x.op == "placeholder" and x.out_bytes == 2 * 3 * 16 * 16 * 4
    totals = counting.totals(gm)
    assert totals.weight_bytes == sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()]
                                      if t.dtype == torch.float32) + 8 * 5  # num_batches_tracked: 5 int64
    from fxcompress.report import node_table

    table = node_table(rows, totals)
    assert "stem_0" in table and "total" in table.splitlines()[-1]
