"""Merge points of residual networks (issue 2): a residual stream is one point."""

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


def _in_point(spec, tensor, axis, name, role, dim=None):
    """Every position of the axis holds coordinate j of point ``name`` at position j."""
    ax = _axis(spec, tensor, axis)
    p = spec.index_of(name)
    dim = spec.points[p].dim if dim is None else dim
    assert ax.role == role, (tensor, axis, ax.role)
    np.testing.assert_array_equal(ax.point_of, np.full(dim, p), err_msg=f"{tensor} axis {axis}")
    np.testing.assert_array_equal(ax.local_of, np.arange(dim), err_msg=f"{tensor} axis {axis}")


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, projection=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) if projection else None
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        sc = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(y + sc)


class ResNetTiny(nn.Module):
    def __init__(self, projection=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
        self.layer2 = BasicBlock(4, 6, projection=True) if projection else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6 if projection else 4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer1(x)
        if self.layer2 is not None:
            x = self.layer2(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _model(projection=False):
    torch.manual_seed(0)
    return break_symmetry(ResNetTiny(projection), seed=0), torch.randn(2, 3, 5, 5)


def test_identity_residual_stream_is_one_point():
    net, x = _model()
    spec = autoalign.find_merge_points(net, x)

    assert [p.name for p in spec.points] == ["stem", "layer1.0.conv1", "layer1.1.conv1", "fc"]
    stream = spec.point("stem")
    assert stream.dim == 4 and stream.kind == "linear" and stream.reason is None

    # rows of the stem conv and of both blocks' second conv (and their BN bias) are ONE point
    for conv, bn in [("stem", "bn"), ("layer1.0.conv2", "layer1.0.bn2"), ("layer1.1.conv2", "layer1.1.bn2")]:
        _in_point(spec, f"{conv}.weight", 0, "stem", "output")
        _in_point(spec, f"{bn}.bias", 0, "stem", "output")
        for k in ("weight", "running_mean", "running_var"):
            _in_point(spec, f"{bn}.{k}", 0, "stem", "folded")
    # every reader of the stream: both blocks' conv1 and the classifier
    for consumer in ("layer1.0.conv1.weight", "layer1.1.conv1.weight", "fc.weight"):
        _in_point(spec, consumer, 1, "stem", "input")

    # the sub-stream points (inside each block) are separate
    for blk in ("layer1.0", "layer1.1"):
        name = f"{blk}.conv1"
        p = spec.point(name)
        assert p.dim == 4 and p.kind == "linear"
        _in_point(spec, f"{blk}.conv1.weight", 0, name, "output")
        _in_point(spec, f"{blk}.bn1.bias", 0, name, "output")
        _in_point(spec, f"{blk}.conv2.weight", 1, name, "input")
        assert spec.tensors_of(name) == sorted(
            [f"{blk}.conv1.weight", f"{blk}.conv2.weight"]
            + [f"{blk}.bn1.{k}" for k in ("bias", "running_mean", "running_var", "weight")]
        )
    assert spec.index_of("layer1.0.conv1") != spec.index_of("layer1.1.conv1")

    assert len(spec.folds) == 5  # every BN follows a conv used only by it
    report = autoalign.check(net, x, seed=2)
    assert report.ok, str(report)
    assert report.permuted == 3


def test_projection_shortcut_joins_the_stream():
    net, x = _model(projection=True)
    spec = autoalign.find_merge_points(net, x)

    names = [p.name for p in spec.points]
    assert names == ["stem", "layer1.0.conv1", "layer1.1.conv1", "layer2.conv1", "layer2.conv2", "fc"]
    # the first stream (width 4) ends at layer2's inputs: conv1 and the 1x1 shortcut read it
    _in_point(spec, "layer2.conv1.weight", 1, "stem", "input")
    _in_point(spec, "layer2.shortcut.0.weight", 1, "stem", "input")

    # the new stream (width 6): conv2's rows and the shortcut conv's rows are one point
    new = spec.point("layer2.conv2")
    assert new.dim == 6 and new.kind == "linear"
    _in_point(spec, "layer2.conv2.weight", 0, "layer2.conv2", "output")
    _in_point(spec, "layer2.shortcut.0.weight", 0, "layer2.conv2", "output")
    _in_point(spec, "layer2.shortcut.1.bias", 0, "layer2.conv2", "output")
    _in_point(spec, "layer2.shortcut.1.running_var", 0, "layer2.conv2", "folded")
    _in_point(spec, "fc.weight", 1, "layer2.conv2", "input")

    # layer2's inner point stays its own
    _in_point(spec, "layer2.conv1.weight", 0, "layer2.conv1", "output")
    _in_point(spec, "layer2.conv2.weight", 1, "layer2.conv1", "input")
    assert spec.point("layer2.conv1").dim == 6

    assert spec.point("stem").dim == 4
    assert "layer2.shortcut.0.weight" in spec.tensors_of("stem")
    assert "layer2.shortcut.0.weight" in spec.tensors_of("layer2.conv2")
    report = autoalign.check(net, x, seed=3)
    assert report.ok, str(report)


def test_stream_point_lists_every_producer():
    net, x = _model(projection=True)
    spec = autoalign.find_merge_points(net, x)
    assert set(spec.point("stem").producers) == {"stem", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(spec.point("layer2.conv2").producers) == {"layer2.conv2", "layer2.shortcut.0"}


def test_residual_add_without_batchnorm_and_with_linear_layers():
    """A pre-activation-free residual MLP: x + f(x) identifies the Linear rows with the stream."""

    class ResMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 5)
            self.f1 = nn.Linear(5, 7)
            self.f2 = nn.Linear(7, 5)
            self.g1 = nn.Linear(5, 7)
            self.g2 = nn.Linear(7, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            x = self.inp(x)
            x = x + self.f2(torch.relu(self.f1(x)))
            x = x + self.g2(torch.relu(self.g1(x)))
            return self.out(x)

    torch.manual_seed(0)
    net = ResMLP()
    x = torch.randn(6, 3)
    spec = autoalign.find_merge_points(net, x)
    assert [p.name for p in spec.points] == ["inp", "f1", "g1", "out"]
    for key in ("inp.weight", "inp.bias", "f2.weight", "f2.bias", "g2.weight", "g2.bias"):
        _in_point(spec, key, 0, "inp", "output")
    for key in ("f1.weight", "g1.weight", "out.weight"):
        _in_point(spec, key, 1, "inp", "input")
    _in_point(spec, "f2.weight", 1, "f1", "input")
    _in_point(spec, "g2.weight", 1, "g1", "input")
    assert spec.point("inp").kind == "linear"
    assert autoalign.check(net, x).ok

    # a dense transform of the stream is exact here only if every stream tensor moves:
    # check that the dense version is exact once the hidden points are left alone and the
    # nonlinearity sits only inside the branches (stream transform passes through adds)
    net = net.double()
    x = x.double()
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64)
    sd = autoalign.transform_state_dict(net.state_dict(), spec, {"inp": (m, torch.linalg.inv(m))})
    other = ResMLP().double()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), net(x))
