"""Merge points through torch.cat (issue 2): DenseNet / Inception concatenations along
channels keep each branch its own point; concatenation along tokens identifies features."""

import numpy as np
import pytest
import torch
from torch import nn

import autoalign


def _axis(spec, tensor, axis, block=None):
    found = [a for a in spec.axes if a.tensor == tensor and a.axis == axis and a.block == block]
    assert len(found) == 1, f"expected one role for {tensor} axis {axis} block {block}, got {found}"
    return found[0]


def _expect_axis(spec, tensor, axis, role, pieces):
    """``pieces`` is a list of ``(point name or None, locals)`` laid end to end along the axis."""
    ax = _axis(spec, tensor, axis)
    assert ax.role == role, (tensor, axis, ax.role)
    points = np.concatenate([np.full(len(loc), -1 if n is None else spec.index_of(n)) for n, loc in pieces])
    locals_ = np.concatenate([np.asarray(loc) if n is not None else np.full(len(loc), -1) for n, loc in pieces])
    np.testing.assert_array_equal(ax.point_of, points, err_msg=f"{tensor} axis {axis} points")
    np.testing.assert_array_equal(ax.local_of, locals_, err_msg=f"{tensor} axis {axis} locals")


def _check_ok(model, x):
    report = autoalign.check(model, x, seed=4)
    assert report.ok, str(report)
    return report


# ----------------------------------------------------------------------------- DenseNet-like


class DenseLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 2, 3, padding=1)
        self.c2 = nn.Conv2d(6, 3, 3, padding=1)
        self.trans = nn.Conv2d(9, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.c1(x))], 1)
        x = torch.cat([x, torch.relu(self.c2(x))], 1)
        x = torch.relu(self.trans(x))
        return self.fc(x.mean((2, 3)))


def test_densenet_like_concatenation():
    torch.manual_seed(0)
    net = DenseLike()
    x = torch.randn(2, 3, 4, 4)
    spec = autoalign.find_merge_points(net, x)

    assert [p.name for p in spec.points] == ["stem", "c1", "c2", "trans", "fc"]
    assert [p.dim for p in spec.points] == [4, 2, 3, 5, 2]
    assert [p.kind for p in spec.points[:4]] == ["linear"] * 4

    # every branch producer is its own point (rows)
    for name, dim in (("stem", 4), ("c1", 2), ("c2", 3), ("trans", 5)):
        _expect_axis(spec, f"{name}.weight", 0, "output", [(name, range(dim))])
        _expect_axis(spec, f"{name}.bias", 0, "output", [(name, range(dim))])

    # consumers read the concatenation: stem | c1 | c2 in order
    _expect_axis(spec, "c1.weight", 1, "input", [("stem", range(4))])
    _expect_axis(spec, "c2.weight", 1, "input", [("stem", range(4)), ("c1", range(2))])
    _expect_axis(spec, "trans.weight", 1, "input", [("stem", range(4)), ("c1", range(2)), ("c2", range(3))])
    _expect_axis(spec, "fc.weight", 1, "input", [("trans", range(5))])

    # the stem's features are read by three consumers
    assert spec.tensors_of("stem") == ["c1.weight", "c2.weight", "stem.bias", "stem.weight", "trans.weight"]
    trans_in = _axis(spec, "trans.weight", 1)
    np.testing.assert_array_equal(trans_in.index(spec.index_of("c1"), 2), [[4, 5]])
    np.testing.assert_array_equal(trans_in.index(spec.index_of("c2"), 3), [[6, 7, 8]])
    _check_ok(net, x)


def test_concatenation_with_the_model_input_leaves_those_positions_out():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(7, 2, 1)

        def forward(self, x):
            return self.b(torch.cat([x, torch.relu(self.a(x))], 1))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 2, 2)
    spec = autoalign.find_merge_points(net, x)
    assert spec.point("a").kind == "linear"
    _expect_axis(spec, "b.weight", 1, "input", [(None, range(3)), ("a", range(4))])
    _check_ok(net, x)


def test_concatenating_a_tensor_with_itself_gives_two_replicas():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(torch.cat([h, h], -1))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 3)
    spec = autoalign.find_merge_points(net, x)
    _expect_axis(spec, "b.weight", 1, "input", [("a", range(4)), ("a", range(4))])
    idx = _axis(spec, "b.weight", 1).index(spec.index_of("a"), 4)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3], [4, 5, 6, 7]])
    _check_ok(net, x)


# ----------------------------------------------------------------------------- Inception-like


class InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 2, 1)
        self.b2a = nn.Conv2d(4, 3, 1)
        self.b2b = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.b3 = nn.Conv2d(4, 2, 1)
        self.head = nn.Conv2d(7, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat(
            [torch.relu(self.b1(x)), torch.relu(self.b2b(torch.relu(self.b2a(x)))), torch.relu(self.b3(self.pool(x)))],
            dim=1,
        )
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


def test_inception_like_concatenation():
    torch.manual_seed(0)
    net = InceptionLike()
    x = torch.randn(2, 3, 4, 4)
    spec = autoalign.find_merge_points(net, x)

    assert [p.name for p in spec.points] == ["stem", "b1", "b2a", "b2b", "b3", "head", "fc"]
    assert all(p.kind == "linear" for p in spec.points[:-1])
    # all branches read the stem (the pool keeps the stem's coordinates)
    for consumer in ("b1", "b2a", "b3"):
        _expect_axis(spec, f"{consumer}.weight", 1, "input", [("stem", range(4))])
    _expect_axis(spec, "b2b.weight", 1, "input", [("b2a", range(3))])
    # the concatenation consumer: b1 | b2b | b3; the inner b2a point is not part of it
    _expect_axis(spec, "head.weight", 1, "input", [("b1", range(2)), ("b2b", range(3)), ("b3", range(2))])
    assert spec.point("b2a").dim == 3 and "head.weight" not in spec.tensors_of("b2a")
    _check_ok(net, x)


# ----------------------------------------------------------------------------- tokens


class TokenCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(4, 6)
        self.mix = nn.Linear(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x, y):
        t = torch.cat([self.a(x), self.b(y)], dim=1)  # (batch, Tx + Ty, 6)
        return self.out(torch.relu(self.mix(t))).mean(1)


def test_cat_along_tokens_identifies_features():
    torch.manual_seed(0)
    net = TokenCat()
    x = (torch.randn(2, 3, 3), torch.randn(2, 5, 4))
    spec = autoalign.find_merge_points(net, x)

    assert [p.name for p in spec.points] == ["a", "mix", "out"]
    feat = spec.point("a")
    assert feat.dim == 6 and feat.kind == "linear"
    # both producers write the same coordinates: row j of a and row j of b are one coordinate
    for key in ("a.weight", "a.bias", "b.weight", "b.bias"):
        _expect_axis(spec, key, 0, "output", [("a", range(6))])
    _expect_axis(spec, "mix.weight", 1, "input", [("a", range(6))])
    _check_ok(net, x)


def test_cat_along_tokens_with_an_untracked_tensor_freezes_with_a_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x, y):
            return self.b(torch.cat([self.a(x), y], 1))

    torch.manual_seed(0)
    net = Net()
    x = (torch.randn(2, 3, 3), torch.randn(2, 2, 4))
    spec = autoalign.find_merge_points(net, x)
    p = spec.point("a")
    assert p.kind == "frozen" and not p.io
    assert "cat" in p.reason and "untracked" in p.reason
    assert spec.coverage() == 0.0
    _check_ok(net, x)


@pytest.mark.parametrize("dim, batch", [(0, 5), (0, 4), (1, 5), (-1, 5)])
def test_stack_along_a_new_axis_identifies_features(dim, batch):
    """torch.stack inserts a new (non-feature) axis: like a token concatenation, the
    operands' features are identified, and the feature axis shifts when the new axis
    comes before it (this used to crash for dim=0 and freeze for dim=1)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(3, 4)
            self.c = nn.Linear(4, 2)

        def forward(self, x):
            s = torch.stack([self.a(x), self.b(x)], dim)
            if dim == -1:  # (B, 4, 2): features on axis 1
                return self.c(s.sum(-1))
            return self.c(s).mean(dim)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(batch, 3)
    spec = autoalign.find_merge_points(net, x)
    assert [p.name for p in spec.points] == ["a", "c"]
    assert spec.point("a").kind == "linear"
    for key in ("a.weight", "a.bias", "b.weight", "b.bias"):
        _expect_axis(spec, key, 0, "output", [("a", range(4))])
    _expect_axis(spec, "c.weight", 1, "input", [("a", range(4))])
    _check_ok(net, x)
