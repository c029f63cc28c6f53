"""Merge points of plain MLPs and of conv -> flatten -> linear heads (issue 2).

These tests pin the spec itself on tiny hand-built models: which parameter axis
lands in which merge point, at which coordinates, in which role.
"""

import numpy as np
import pytest
import torch
from torch import nn

import autoalign
from autoalign.examples.zoo import break_symmetry


def _axis(spec, tensor, axis, block=None):
    found = [a for a in spec.axes if a.tensor == tensor and a.axis == axis and a.block == block]
    assert len(found) == 1, f"expected one role for {tensor} axis {axis} block {block}, got {found}"
    return found[0]


def _no_axis(spec, tensor, axis):
    """The axis indexes no merge point (absent from the table, or all -1)."""
    for a in spec.axes:
        if a.tensor == tensor and a.axis == axis:
            assert np.all(a.point_of == -1), f"{tensor} axis {axis} unexpectedly in points {a.points()}"


def _assert_check(model, x, spec=None):
    report = autoalign.check(model, x, spec=spec, seed=1)
    assert report.ok, str(report)
    return report


# ----------------------------------------------------------------------------- MLP


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_mlp_one_point_per_hidden_layer():
    net = _mlp()
    x = torch.randn(4, 5)
    spec = autoalign.find_merge_points(net, x)

    assert [p.name for p in spec.points] == ["0", "2", "4"]
    assert [p.dim for p in spec.points] == [8, 6, 3]
    assert [p.kind for p in spec.points] == ["linear", "linear", "frozen"]
    h1, h2, out = spec.points
    assert h1.reason is None and h2.reason is None
    assert not h1.io and not h2.io
    assert h1.producers == ("0",) and h2.producers == ("2",)

    # the output layer is frozen because it is the model output
    assert out.io is True
    assert out.reason and "output" in out.reason

    # hidden layer 1: rows of 0.weight/0.bias, columns of 2.weight, identity coordinates
    i1, i2, i3 = (spec.index_of(n) for n in ("0", "2", "4"))
    for tensor, axis, role, point, dim in [
        ("0.weight", 0, "output", i1, 8),
        ("0.bias", 0, "output", i1, 8),
        ("2.weight", 1, "input", i1, 8),
        ("2.weight", 0, "output", i2, 6),
        ("2.bias", 0, "output", i2, 6),
        ("4.weight", 1, "input", i2, 6),
        ("4.weight", 0, "output", i3, 3),
        ("4.bias", 0, "output", i3, 3),
    ]:
        ax = _axis(spec, tensor, axis)
        assert ax.role == role, (tensor, axis)
        np.testing.assert_array_equal(ax.point_of, np.full(dim, point))
        np.testing.assert_array_equal(ax.local_of, np.arange(dim))
        assert ax.block is None

    # the first Linear reads the model input: its input axis is in no point
    _no_axis(spec, "0.weight", 1)

    assert spec.tensors_of("0") == ["0.bias", "0.weight", "2.weight"]
    assert spec.tensors_of("2") == ["2.bias", "2.weight", "4.weight"]
    assert spec.kind_counts() == {"linear": 2, "orthogonal": 0, "permutation": 0, "rotary": 0, "frozen": 1}
    assert spec.coverage() == 1.0  # the io point is left out of coverage
    assert spec.unused == []
    assert "frozen" in spec.table() and "model output" in spec.table()

    report = _assert_check(net, x)
    assert report.permuted == 2 and report.points == 3


def test_mlp_points_have_observation_sites():
    net = _mlp()
    spec = autoalign.find_merge_points(net, torch.randn(4, 5))
    p = spec.point("0")
    # features of hidden layer 1 are observed where the next Linear reads them (after ReLU)
    assert p.sites and p.sites[0].kind == "input"
    np.testing.assert_array_equal(p.sites[0].index, np.arange(8)[None])


def test_mlp_permuted_copy_is_a_real_permutation():
    """permute_model moves rows of layer k and columns of layer k+1 together."""
    net = _mlp()
    x = torch.randn(7, 5)
    spec = autoalign.find_merge_points(net, x)
    perm = autoalign.testing.permute_model(net, spec, seed=3)
    sd0, sd1 = net.state_dict(), perm.state_dict()
    assert not torch.equal(sd0["0.weight"], sd1["0.weight"])
    # same multiset of rows
    rows0 = sorted(map(tuple, sd0["0.weight"].tolist()))
    rows1 = sorted(map(tuple, sd1["0.weight"].tolist()))
    assert rows0 == rows1
    # output layer: rows stay in place (frozen point), columns are permuted
    assert torch.equal(sd0["4.bias"], sd1["4.bias"])
    assert torch.equal(sd0["4.weight"].sort(1).values, sd1["4.weight"].sort(1).values)
    torch.testing.assert_close(perm(x), net(x))


def test_mlp_transform_state_dict_with_an_invertible_matrix():
    """A linear point admits any invertible matrix: W1 <- M W1, b1 <- M b1, W2 <- W2 M^-1
    is exact when there is no nonlinearity in between."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    spec = autoalign.find_merge_points(net, x)
    assert spec.point("0").kind == "linear"
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    sd = autoalign.transform_state_dict(net.state_dict(), spec, {"0": (m, torch.linalg.inv(m))})
    torch.testing.assert_close(sd["0.weight"], m @ net[0].weight.detach())
    other = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)).double()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), net(x))


# ----------------------------------------------------------------------------- conv -> flatten -> linear


class ConvFlatten(nn.Module):
    def __init__(self, channels_last: bool = False, c: int = 4, h: int = 3, w: int = 2):
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c * h * w, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        return self.fc(torch.flatten(x, 1))


C, H, W = 4, 3, 2


def test_conv_flatten_linear_is_channel_major():
    torch.manual_seed(0)
    net = ConvFlatten()
    x = torch.randn(2, 3, H, W)
    spec = autoalign.find_merge_points(net, x)

    assert [p.name for p in spec.points] == ["conv", "fc"]
    conv = spec.point("conv")
    assert conv.dim == C and conv.kind == "linear"
    assert spec.point("fc").kind == "frozen" and spec.point("fc").io
    pc = spec.index_of("conv")

    for key in ("conv.weight", "conv.bias"):
        ax = _axis(spec, key, 0)
        assert ax.role == "output"
        np.testing.assert_array_equal(ax.point_of, np.full(C, pc))
        np.testing.assert_array_equal(ax.local_of, np.arange(C))

    fc_in = _axis(spec, "fc.weight", 1)
    assert fc_in.role == "input"
    assert fc_in.size == C * H * W
    np.testing.assert_array_equal(fc_in.point_of, np.full(C * H * W, pc))
    # channel-major: channel c occupies positions c*H*W ... (c+1)*H*W - 1
    np.testing.assert_array_equal(fc_in.local_of, np.repeat(np.arange(C), H * W))
    idx = fc_in.index(pc, C)
    assert idx.shape == (H * W, C)
    np.testing.assert_array_equal(idx, np.arange(C)[None, :] * H * W + np.arange(H * W)[:, None])

    # the conv's input (the image) is in no point
    _no_axis(spec, "conv.weight", 1)
    _assert_check(net, x)


def test_conv_flatten_linear_channels_last():
    torch.manual_seed(0)
    net = ConvFlatten(channels_last=True)
    x = torch.randn(2, 3, H, W)
    spec = autoalign.find_merge_points(net, x)
    pc = spec.index_of("conv")
    assert spec.point("conv").kind == "linear"

    fc_in = _axis(spec, "fc.weight", 1)
    np.testing.assert_array_equal(fc_in.point_of, np.full(C * H * W, pc))
    # channels-last: the channel index cycles fastest
    np.testing.assert_array_equal(fc_in.local_of, np.tile(np.arange(C), H * W))
    idx = fc_in.index(pc, C)
    assert idx.shape == (H * W, C)
    np.testing.assert_array_equal(idx, np.arange(H * W)[:, None] * C + np.arange(C)[None, :])
    _assert_check(net, x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_flatten_transform_with_a_dense_matrix_is_exact_without_nonlinearity(channels_last):
    """The Kronecker expansion of the input role: a dense transform of the conv's
    channels is undone in every spatial replica of the Linear's columns."""

    class Net(ConvFlatten):
        def forward(self, x):
            x = self.conv(x)
            if self.channels_last:
                x = x.permute(0, 2, 3, 1)
            return self.fc(torch.flatten(x, 1))

    torch.manual_seed(0)
    net = Net(channels_last).double()
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    spec = autoalign.find_merge_points(net, x)
    g = torch.Generator().manual_seed(1)
    m = torch.randn(C, C, generator=g, dtype=torch.float64) + 3 * torch.eye(C, dtype=torch.float64)
    sd = autoalign.transform_state_dict(net.state_dict(), spec, {"conv": (m, torch.linalg.inv(m))})
    other = Net(channels_last).double()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), net(x))


def test_conv_pool_flatten_linear_with_nn_flatten():
    """Global pooling collapses the replicas: the Linear's input axis is the channels once."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)
    )
    break_symmetry(net)
    x = torch.randn(2, 3, 5, 5)
    spec = autoalign.find_merge_points(net, x)
    p0 = spec.index_of("0")
    ax = _axis(spec, "5.weight", 1)
    np.testing.assert_array_equal(ax.point_of, np.full(6, p0))
    np.testing.assert_array_equal(ax.local_of, np.arange(6))
    assert ax.index(p0, 6).shape == (1, 6)
    _assert_check(net, x)


@pytest.mark.parametrize(
    "op, kind",
    [
        (lambda h: h + 1.0, "permutation"),
        (lambda h: 1.0 - h, "permutation"),
        (lambda h: h - torch.tensor(0.5), "permutation"),
        (lambda h: h + torch.ones(1), "permutation"),
        (lambda h: h + 0.0, "linear"),
        (lambda h: h * 3.0, "linear"),
        (lambda h: h / 2.0, "linear"),
    ],
)
def test_adding_a_constant_to_every_channel_allows_only_permutations(op, kind):
    """M (h + c 1) = M h + c M 1, which is M h + c 1 only when M 1 = 1: a nonzero
    constant added to every channel restricts the point to permutations, whether the
    constant is a python number or a tensor (python numbers used to be ignored)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(op(self.a(x)))

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    spec = autoalign.find_merge_points(net, x)
    p = spec.point("a")
    assert p.kind == kind
    if kind == "permutation":
        assert "same for every channel" in p.reason
    else:
        # a dense transform is exact, as the kind claims
        g = torch.Generator().manual_seed(0)
        m = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
        sd = autoalign.transform_state_dict(net.state_dict(), spec, {"a": (m, torch.linalg.inv(m))})
        other = Net().double()
        other.load_state_dict(sd)
        torch.testing.assert_close(other(x), net(x))
    _assert_check(net, x)


def test_adding_a_learned_scalar_allows_only_permutations():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.c = nn.Parameter(torch.tensor([0.7]))
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) + self.c)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 3)
    spec = autoalign.find_merge_points(net, x)
    p = spec.point("a")
    assert p.kind == "permutation" and "c, the same for every channel" in p.reason
    assert not [a for a in spec.axes if a.tensor == "c"]
    assert "c" not in spec.unused
    _assert_check(net, x)


# ----------------------------------------------------------------------------- tied weights


class TiedEmbedding(nn.Module):
    """An embedding and an output layer sharing one weight (language-model style)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(self.emb(t))


def test_tied_weights_permutation_check_passes():
    torch.manual_seed(0)
    net = TiedEmbedding()
    t = torch.randint(0, 10, (2, 5))
    _assert_check(net, t)


def test_tied_weights_take_a_transform_of_the_declared_kind_exactly():
    torch.manual_seed(0)
    net = TiedEmbedding().double()
    t = torch.randint(0, 10, (2, 5))
    spec = autoalign.find_merge_points(net, t)
    p = spec.point("emb")
    if p.kind == "frozen":
        return
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    m = {"linear": a + 3 * torch.eye(4, dtype=torch.float64), "orthogonal": torch.linalg.qr(a)[0]}.get(p.kind)
    if m is None:  # permutation
        m = torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]]
    sd = autoalign.transform_state_dict(net.state_dict(), spec, {"emb": (m, torch.linalg.inv(m))})
    other = TiedEmbedding().double()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(t), net(t))
