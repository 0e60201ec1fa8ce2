"""Input rows and moments of Conv/Linear layers, collected from data (shared by data-aware SVD and weight sharing)."""
import pytest
import torch
import torch.nn as nn

from fxcompress.layer_inputs import input_moments, input_rows, supported
from fxcompress.tracing import trace


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3)
        self.line = nn.Conv1d(6, 5, 2, dilation=2)
        self.fc = nn.Linear(5, 5)
        self.after = nn.Linear(5, 3)

    def forward(self, x):
        y = self.grouped(self.conv(x).relu())
        z = self.line(y.flatten(2)).transpose(1, 2)
        return self.after(self.fc(self.fc(z).relu()))  # fc called twice


def test_rows_times_the_weight_matrix_are_the_layer_outputs():
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        h = net.conv(x)
        rows = input_rows(net.conv, x)
        mine = (rows @ net.conv.weight.flatten(1).T + net.conv.bias).reshape(2, 7, 7, 6).permute(0, 3, 1, 2)
        torch.testing.assert_close(mine, h, rtol=1e-5, atol=1e-5)
        y = net.grouped(h.relu()).flatten(2)
        rows = input_rows(net.line, y)
        mine = (rows @ net.line.weight.flatten(1).T + net.line.bias).reshape(2, -1, 5).transpose(1, 2)
        torch.testing.assert_close(mine, net.line(y), rtol=1e-5, atol=1e-5)


def test_supported_names_exactly_the_layers_whose_rows_it_collects():
    assert all(supported(m) for m in (nn.Linear(3, 2), nn.Conv1d(3, 2, 3), nn.Conv2d(3, 2, 3, groups=1)))
    assert not any(supported(m) for m in (nn.Conv3d(3, 2, 3), nn.ConvTranspose2d(3, 2, 3), nn.Bilinear(3, 3, 2),
                                          nn.BatchNorm2d(3)))


def test_moments_are_the_sums_over_every_call_and_batch_and_the_early_stop_changes_nothing():
    torch.manual_seed(1)
    net = _Net().eval()
    gm = trace(net, (torch.randn(2, 4, 7, 7),), eval_mode=True)
    batches = [(torch.randn(3, 4, 7, 7),) for _ in range(3)]
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    got = input_moments(gm, [gm.get_submodule("grouped"), gm.get_submodule("fc")], iter(batches), max_samples=5)
    # 5 samples: the first two batches
    want_g = torch.zeros(3, 18, 18, dtype=torch.float64)
    want_fc = torch.zeros(1, 5, 5, dtype=torch.float64)
    rows_fc = 0
    with torch.no_grad():
        for (x,) in batches[:2]:
            h = net.conv(x).relu()
            r = input_rows(net.grouped, h).double().reshape(-1, 3, 18).transpose(0, 1)
            want_g += r.transpose(1, 2) @ r
            z = net.line(net.grouped(h).flatten(2)).transpose(1, 2)
            for inp in (z, net.fc(z).relu()):
                r = inp.reshape(-1, 5).double()
                want_fc[0] += r.T @ r
                rows_fc += r.shape[0]
    torch.testing.assert_close(got[0].sums, want_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].sums, want_fc, rtol=1e-5, atol=1e-6)
    assert got[1].rows == rows_fc
    torch.testing.assert_close(got[1].mean(), want_fc[0] / rows_fc)
    with pytest.raises(ValueError, match="3 groups"):
        got[0].mean()
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    # the forward stopped after the last call of the layers asked for: "after" never ran
    ran = []
    handle = gm.get_submodule("after").register_forward_pre_hook(lambda m, a: ran.append(1))
    input_moments(gm, [gm.get_submodule("conv")], iter(batches), max_samples=100)
    assert not ran
    input_moments(gm, [gm.get_submodule("after")], iter(batches), max_samples=100)
    assert len(ran) == 3
    handle.remove()
