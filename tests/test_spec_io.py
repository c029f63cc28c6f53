"""MergeSpec serialisation, and the self-check catching wrong specs (issue 2)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import autoalign
from autoalign import AxisRole, MergePoint, MergeSpec, SpecError
from autoalign.examples.zoo import break_symmetry


class Block(nn.Module):
    def __init__(self, c, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class Net(nn.Module):
    """Residual stream, folded BNs, a grouped conv (blocks), a chunk, a flatten head and
    a LayerNorm + additive vector: most spec features in one small model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, groups=2), Block(8))
        self.split = nn.Conv2d(8, 12, 1)
        self.shift = nn.Parameter(torch.randn(6))
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6 * 2 * 2, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer1(x)
        a, b = torch.relu(self.split(x)).chunk(2, dim=1)
        x = torch.nn.functional.adaptive_avg_pool2d(a * 0.5 + b, 2)  # (B, 6, 2, 2)
        x = self.ln(x.permute(0, 2, 3, 1) + self.shift)  # channels-last
        return self.fc(x.flatten(1))


def _model():
    torch.manual_seed(0)
    return break_symmetry(Net()), torch.randn(2, 3, 4, 4)


def _points_dict(spec):
    return [p.to_dict() for p in spec.points]


def _axes_tuple(spec):
    return [(a.tensor, a.axis, a.role, a.point_of.tolist(), a.local_of.tolist(), a.block) for a in spec.axes]


def test_the_model_covers_the_spec_features():
    net, x = _model()
    spec = autoalign.find_merge_points(net, x)
    assert spec.folds, "expected folded BatchNorms"
    assert any(a.block is not None for a in spec.axes), "expected blocks"
    assert any(a.role == "additive" for a in spec.axes)
    assert any(a.role == "channel" for a in spec.axes)
    assert any(a.role == "folded" for a in spec.axes)
    fc_in = next(a for a in spec.axes if a.tensor == "fc.weight" and a.axis == 1)
    assert fc_in.index(fc_in.points()[0], 6).shape == (4, 6)  # flatten replicas
    assert {"permutation", "linear", "frozen"} <= {p.kind for p in spec.points}
    report = autoalign.check(net, x, spec=spec)
    assert report.ok, str(report)


def test_json_round_trip_preserves_everything():
    net, x = _model()
    spec = autoalign.find_merge_points(net, x)
    text = spec.to_json()
    json.loads(text)  # plain JSON
    spec2 = MergeSpec.from_json(text)

    assert spec2 is not spec
    assert _points_dict(spec2) == _points_dict(spec)
    for p, q in zip(spec.points, spec2.points):
        assert (p.name, p.dim, p.kind, p.reason, p.io, p.producers) == (q.name, q.dim, q.kind, q.reason, q.io, q.producers)
        assert len(p.sites) == len(q.sites)
        for s, t in zip(p.sites, q.sites):
            assert (s.node, s.axis, s.kind) == (t.node, t.axis, t.kind)
            np.testing.assert_array_equal(s.index, t.index)
            assert t.index.dtype == np.int64
    assert _axes_tuple(spec2) == _axes_tuple(spec)
    for a in spec2.axes:
        assert a.point_of.dtype == np.int64 and a.local_of.dtype == np.int64
        assert a.block is None or isinstance(a.block, tuple)
    assert spec2.folds == spec.folds
    assert spec2.unused == spec.unused
    assert spec2.model_class == spec.model_class and spec2.model_class.endswith("Net")
    assert spec2.coverage() == spec.coverage()
    assert spec2.kind_counts() == spec.kind_counts()
    assert spec2.table() == spec.table()
    for p in spec.points:
        assert spec2.tensors_of(p.name) == spec.tensors_of(p.name)
    # serialising again gives the same text
    assert spec2.to_json() == text

    report = autoalign.check(net, x, spec=spec2, seed=11)
    assert report.ok, str(report)
    assert report.spec is spec2


def test_json_round_trip_of_an_attention_model():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.ln = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.inp(x)], 1)
            y = self.ln(h)
            return self.out(h + self.attn(y, y, y, need_weights=False)[0])

    torch.manual_seed(0)
    net = break_symmetry(Tiny())
    x = torch.randn(2, 4, 3)
    spec = autoalign.find_merge_points(net, x)
    spec2 = MergeSpec.from_json(spec.to_json(indent=1))
    assert _points_dict(spec2) == _points_dict(spec)
    assert _axes_tuple(spec2) == _axes_tuple(spec)
    assert autoalign.check(net, x, spec=spec2).ok


def test_run_length_encoding_round_trips_irregular_axes():
    """Arbitrary point/local patterns (not only runs) survive the encoding."""
    rng = np.random.default_rng(0)
    points = [MergePoint("a", 5, "linear"), MergePoint("b", 3, "permutation", "test")]
    axes = []
    for i in range(20):
        n = int(rng.integers(1, 40))
        pt = rng.integers(-1, 2, size=n)
        lo = np.where(pt == 0, rng.integers(0, 5, size=n), np.where(pt == 1, rng.integers(0, 3, size=n), -1))
        axes.append(AxisRole(f"t{i}", 0, "input", pt, lo, (1, 0, 2) if i % 3 == 0 else None))
    spec = MergeSpec(points=points, axes=axes)
    spec2 = MergeSpec.from_json(spec.to_json())
    assert _axes_tuple(spec2) == _axes_tuple(spec)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        "{}",
        json.dumps({"format": "something else", "version": 1, "points": [], "axes": []}),
        json.dumps({"format": "autoalign.MergeSpec", "version": 999, "points": [], "axes": []}),
        json.dumps({"format": "autoalign.MergeSpec", "version": 1, "axes": [],
                    "points": [{"name": "a", "dim": 2, "kind": "bogus"}]}),
        json.dumps({"format": "autoalign.MergeSpec", "version": 1,
                    "points": [{"name": "a", "dim": 2, "kind": "linear"}, {"name": "a", "dim": 2, "kind": "linear"}],
                    "axes": []}),
        json.dumps({"format": "autoalign.MergeSpec", "version": 1, "points": [{"name": "a", "dim": 2, "kind": "linear"}],
                    "axes": [{"tensor": "w", "axis": 0, "role": "bogus", "size": 2, "runs": [[0, 2, 0, 0, 1]]}]}),
        json.dumps({"format": "autoalign.MergeSpec", "version": 1, "points": [{"name": "a", "dim": 2, "kind": "linear"}],
                    "axes": [{"tensor": "w", "axis": 0, "role": "output", "size": 2, "runs": [[0, 2, 3, 0, 1]]}]}),
        json.dumps({"format": "autoalign.MergeSpec", "version": 1, "points": [{"name": "a", "dim": 2, "kind": "linear"}],
                    "axes": [{"tensor": "w", "axis": 0, "role": "output", "size": 2, "runs": [[0, 2, 0, 5, 1]]}]}),
    ],
)
def test_from_json_rejects_garbage_with_spec_error(text):
    with pytest.raises(SpecError):
        MergeSpec.from_json(text)


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        "null",
        '"a string"',
        json.dumps({"format": "autoalign.MergeSpec", "version": 1}),
        json.dumps({"format": "autoalign.MergeSpec", "version": 1, "axes": [], "points": [{"name": "a"}]}),
        json.dumps({"format": "autoalign.MergeSpec", "version": 1, "points": [], "axes": [], "folds": [{"x": 1}]}),
    ],
)
def test_from_json_rejects_malformed_structure_with_spec_error(text):
    with pytest.raises(SpecError):
        MergeSpec.from_json(text)


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        MergeSpec.from_json("nope")


# ----------------------------------------------------------------------------- the self-check catches wrong specs


def _rebuild(spec, points=None, axes=None):
    return MergeSpec(
        points=list(spec.points if points is None else points),
        axes=list(spec.axes if axes is None else axes),
        folds=list(spec.folds),
        unused=list(spec.unused),
        model_class=spec.model_class,
    )


def _copy_axis(ax, point_of=None, local_of=None):
    return AxisRole(
        ax.tensor, ax.axis, ax.role,
        ax.point_of.copy() if point_of is None else point_of,
        ax.local_of.copy() if local_of is None else local_of,
        ax.block,
    )


def test_check_catches_a_residual_stream_split_into_two_points():
    net, x = _model()
    spec = autoalign.find_merge_points(net, x)
    # the grouped conv (groups=2) reading the stream splits it into two points of 4
    assert [(p.name, p.dim) for p in spec.points[:2]] == [("stem[0]", 4), ("stem[1]", 4)]
    s = spec.index_of("stem[0]")
    # the second block's conv2/bn2 rows of stem[0] go to a new point: the stream is split in two
    new = len(spec.points)
    points = spec.points + [dataclasses.replace(spec.points[s], name="stem[0]-split")]
    axes = []
    n_changed = 0
    for ax in spec.axes:
        if ax.tensor.startswith(("layer1.1.conv2.", "layer1.1.bn2.")) and ax.axis == 0:
            assert np.count_nonzero(ax.point_of == s) == 4
            ax = _copy_axis(ax, point_of=np.where(ax.point_of == s, new, ax.point_of))
            n_changed += 1
        axes.append(ax)
    assert n_changed == 5  # conv2 weight, bn2 weight/bias/mean/var
    bad = _rebuild(spec, points, axes)
    assert autoalign.check(net, x, spec=bad).ok is False
    # the genuine spec passes with the same seed
    assert autoalign.check(net, x, spec=spec).ok


def test_check_catches_a_consumer_axis_in_the_wrong_point():
    net, x = _model()
    spec = autoalign.find_merge_points(net, x)
    stream = spec.index_of("stem[0]")
    inner = spec.index_of("layer1.0.conv1[0]")  # same dim (4), a different point
    assert spec.points[inner].dim == spec.points[stream].dim
    axes = []
    n_changed = 0
    for ax in spec.axes:
        if ax.tensor == "split.weight" and ax.axis == 1:
            assert np.count_nonzero(ax.point_of == stream) == 4
            ax = _copy_axis(ax, point_of=np.where(ax.point_of == stream, inner, ax.point_of))
            n_changed += 1
        axes.append(ax)
    assert n_changed == 1
    bad = _rebuild(spec, axes=axes)
    assert bad.tensors_of("stem[0]").count("split.weight") == 0
    assert autoalign.check(net, x, spec=bad).ok is False


def test_check_catches_wrong_coordinates_within_the_right_point():
    net, x = _model()
    spec = autoalign.find_merge_points(net, x)
    axes = []
    for ax in spec.axes:
        if ax.tensor == "layer1.1.conv1.weight" and ax.axis == 1:
            ax = _copy_axis(ax, local_of=ax.local_of[::-1].copy())
        axes.append(ax)
    assert autoalign.check(net, x, spec=_rebuild(spec, axes=axes)).ok is False


@pytest.mark.parametrize(
    "tensor, axis",
    [
        ("layer1.1.conv1.weight", 1),  # a consumer's input axis
        ("fc.weight", 1),  # the flatten head's input axis
        ("layer1.0.bn1.bias", 0),  # a folded BN's bias (output role)
        ("shift", 0),  # an additive vector
        ("ln.weight", 0),  # a per-channel vector
    ],
)
def test_check_catches_a_dropped_axis_role(tensor, axis):
    net, x = _model()
    spec = autoalign.find_merge_points(net, x)
    kept = [a for a in spec.axes if not (a.tensor == tensor and a.axis == axis)]
    assert len(kept) == len(spec.axes) - 1, f"{tensor} axis {axis} not in the spec"
    assert autoalign.check(net, x, spec=_rebuild(spec, axes=kept)).ok is False


def test_check_catches_a_dropped_grouped_block():
    net, x = _model()
    spec = autoalign.find_merge_points(net, x)
    blocks = [a for a in spec.axes if a.block is not None]
    assert len(blocks) == 2  # layer1.0.conv1 has groups=2
    kept = [a for a in spec.axes if a is not blocks[1]]
    assert autoalign.check(net, x, spec=_rebuild(spec, axes=kept)).ok is False


def test_spec_names_only_keys_of_the_model_state_dict():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) + torch.arange(4.0))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 3)
    spec = autoalign.find_merge_points(net, x)
    keys = set(net.state_dict())
    assert {a.tensor for a in spec.axes} <= keys
    assert set(spec.unused) <= keys
    assert autoalign.check(net, x, spec=spec).ok


def test_specs_compare_by_value_including_their_index_arrays():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    a = autoalign.find_merge_points(net, torch.randn(2, 4))
    assert a == autoalign.find_merge_points(net, torch.randn(3, 4))
    assert a == MergeSpec.from_json(a.to_json())
    assert a.points[0] == MergeSpec.from_json(a.to_json()).points[0]
    site = a.points[0].sites[0]
    moved = dataclasses.replace(site, index=site.index[:, ::-1].copy())
    assert moved != site
    wider = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Flatten(), nn.Linear(9, 3))
    assert a != autoalign.find_merge_points(wider, torch.randn(2, 4))
