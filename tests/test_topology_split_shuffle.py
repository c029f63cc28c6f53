"""Merge points through chunk/split/slicing and channel shuffles (issue 2)."""

import numpy as np
import pytest
import torch
from torch import nn

import autoalign


def _axis(spec, tensor, axis, block=None):
    found = [a for a in spec.axes if a.tensor == tensor and a.axis == axis and a.block == block]
    assert len(found) == 1, f"expected one role for {tensor} axis {axis} block {block}, got {found}"
    return found[0]


def _pairs(spec, tensor, axis):
    """``[(point name, local), ...]`` along an axis (``None`` where no point)."""
    ax = _axis(spec, tensor, axis)
    return [(spec.points[p].name, int(l)) if p >= 0 else None for p, l in zip(ax.point_of, ax.local_of)]


def _check_ok(model, x):
    report = autoalign.check(model, x, seed=5)
    assert report.ok, str(report)
    return report


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


# ----------------------------------------------------------------------------- chunk / split


class ChunkNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        u, v = torch.relu(self.conv(x)).chunk(2, dim=1)
        return (self.a(u) + self.b(v)).mean((2, 3))


def test_chunk_splits_a_producer_into_two_points():
    torch.manual_seed(0)
    net = ChunkNet()
    x = torch.randn(2, 3, 2, 2)
    spec = autoalign.find_merge_points(net, x)

    assert [p.name for p in spec.points] == ["conv[0]", "conv[1]", "a"]
    p0, p1 = spec.point("conv[0]"), spec.point("conv[1]")
    assert (p0.dim, p1.dim) == (3, 3)
    assert p0.kind == p1.kind == "linear"
    assert p0.producers == p1.producers == ("conv",)

    # rows 0..2 of the conv are conv[0], rows 3..5 are conv[1]
    assert _pairs(spec, "conv.weight", 0) == [("conv[0]", 0), ("conv[0]", 1), ("conv[0]", 2),
                                              ("conv[1]", 0), ("conv[1]", 1), ("conv[1]", 2)]
    assert _pairs(spec, "conv.bias", 0) == _pairs(spec, "conv.weight", 0)
    assert _pairs(spec, "a.weight", 1) == [("conv[0]", j) for j in range(3)]
    assert _pairs(spec, "b.weight", 1) == [("conv[1]", j) for j in range(3)]
    assert spec.tensors_of("conv[0]") == ["a.weight", "conv.bias", "conv.weight"]
    assert spec.tensors_of("conv[1]") == ["b.weight", "conv.bias", "conv.weight"]

    # a.out + b.out: the two heads write one (output) point
    assert _pairs(spec, "b.weight", 0) == [("a", 0), ("a", 1)]
    assert spec.point("a").io
    _check_ok(net, x)


@pytest.mark.parametrize("how", ["split", "slice", "narrow"])
def test_unequal_split_and_slicing(how):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.a = nn.Linear(2, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            if how == "split":
                u, v = torch.split(h, [2, 4], dim=-1)
            elif how == "slice":
                u, v = h[:, :2], h[:, 2:]
            else:
                u, v = h.narrow(1, 0, 2), h.narrow(1, 2, 4)
            return self.a(u) * 2 + self.b(v)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 4)
    spec = autoalign.find_merge_points(net, x)
    assert [(p.name, p.dim) for p in spec.points[:2]] == [("fc[0]", 2), ("fc[1]", 4)]
    assert _pairs(spec, "fc.weight", 0) == [("fc[0]", 0), ("fc[0]", 1)] + [("fc[1]", j) for j in range(4)]
    assert _pairs(spec, "a.weight", 1) == [("fc[0]", 0), ("fc[0]", 1)]
    assert _pairs(spec, "b.weight", 1) == [("fc[1]", j) for j in range(4)]
    _check_ok(net, x)


# ----------------------------------------------------------------------------- shuffle


class ShuffleThenChunk(nn.Module):
    """Two producers concatenated, shuffled (view -> transpose -> view), then chunked."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.left = nn.Conv2d(4, 3, 1)
        self.right = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.c1(x)), torch.relu(self.c2(x))], 1)
        a, b = channel_shuffle(y, 2).chunk(2, dim=1)
        return self.left(a).mean((2, 3)), self.right(b).mean((2, 3))


def test_channel_shuffle_then_chunk():
    torch.manual_seed(0)
    net = ShuffleThenChunk()
    x = torch.randn(2, 3, 2, 2)
    spec = autoalign.find_merge_points(net, x)

    # after the shuffle the channels are c1_0 c2_0 c1_1 c2_1 | c1_2 c2_2 c1_3 c2_3:
    # rows 0,1 of each producer go left, rows 2,3 go right
    assert [p.name for p in spec.points] == ["c1[0]", "c1[1]", "c2[0]", "c2[1]", "left", "right"]
    assert all(spec.point(n).dim == 2 and spec.point(n).kind == "linear" for n in ("c1[0]", "c1[1]", "c2[0]", "c2[1]"))
    assert _pairs(spec, "c1.weight", 0) == [("c1[0]", 0), ("c1[0]", 1), ("c1[1]", 0), ("c1[1]", 1)]
    assert _pairs(spec, "c2.weight", 0) == [("c2[0]", 0), ("c2[0]", 1), ("c2[1]", 0), ("c2[1]", 1)]
    assert _pairs(spec, "left.weight", 1) == [("c1[0]", 0), ("c2[0]", 0), ("c1[0]", 1), ("c2[0]", 1)]
    assert _pairs(spec, "right.weight", 1) == [("c1[1]", 0), ("c2[1]", 0), ("c1[1]", 1), ("c2[1]", 1)]
    _check_ok(net, x)


class Unit(nn.Module):
    """A ShuffleNetV2 unit (without stride): split, transform one half, concat, shuffle."""

    def __init__(self, c):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.ReLU(), nn.Conv2d(c // 2, c // 2, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)


class ShuffleNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.u1 = Unit(4)
        self.u2 = Unit(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.u2(self.u1(torch.relu(self.stem(x))))).mean((2, 3))


def test_shufflenet_v2_units():
    torch.manual_seed(0)
    net = ShuffleNetLike()
    x = torch.randn(2, 3, 2, 2)
    spec = autoalign.find_merge_points(net, x)
    # stem s0..s3: u1 passes s0,s1 and transforms s2,s3 into B0,B1;
    # shuffle -> s0 B0 s1 B1; u2 passes s0,B0 and transforms s1,B1 into C0,C1;
    # shuffle -> s0 C0 B0 C1.
    assert [(p.name, p.dim) for p in spec.points] == [
        ("stem[0]", 1), ("stem[1]", 1), ("stem[2]", 2), ("u1.branch.0", 2), ("u1.branch.2[0]", 1),
        ("u1.branch.2[1]", 1), ("u2.branch.0", 2), ("u2.branch.2", 2), ("head", 2),
    ]
    assert _pairs(spec, "stem.weight", 0) == [("stem[0]", 0), ("stem[1]", 0), ("stem[2]", 0), ("stem[2]", 1)]
    assert _pairs(spec, "u1.branch.0.weight", 1) == [("stem[2]", 0), ("stem[2]", 1)]
    assert _pairs(spec, "u1.branch.2.weight", 0) == [("u1.branch.2[0]", 0), ("u1.branch.2[1]", 0)]
    assert _pairs(spec, "u2.branch.0.weight", 1) == [("stem[1]", 0), ("u1.branch.2[1]", 0)]
    assert _pairs(spec, "head.weight", 1) == [
        ("stem[0]", 0), ("u2.branch.2", 0), ("u1.branch.2[0]", 0), ("u2.branch.2", 1)
    ]
    assert spec.kind_counts()["linear"] == 8
    _check_ok(net, x)


def test_nn_channel_shuffle_keeps_one_point_and_permutes_the_consumer_columns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.ChannelShuffle(3), nn.Conv2d(6, 2, 1))
    x = torch.randn(2, 3, 2, 2)
    spec = autoalign.find_merge_points(net, x)
    assert spec.point("0").dim == 6 and spec.point("0").kind == "linear"
    # groups of 2: [0 1 | 2 3 | 4 5] -> 0 2 4 1 3 5
    assert _pairs(spec, "3.weight", 1) == [("0", j) for j in (0, 2, 4, 1, 3, 5)]
    _check_ok(net, x)
