"""Merge points around depthwise/grouped convolutions and GroupNorm (issue 2)."""

import numpy as np
import torch
from torch import nn

import autoalign
from autoalign.examples.zoo import break_symmetry


def _axis(spec, tensor, axis, block=None):
    found = [a for a in spec.axes if a.tensor == tensor and a.axis == axis and a.block == block]
    assert len(found) == 1, f"expected one role for {tensor} axis {axis} block {block}, got {found}"
    return found[0]


def _check_ok(model, x):
    report = autoalign.check(model, x, seed=6)
    assert report.ok, str(report)
    return report


def _model(*layers):
    torch.manual_seed(0)
    return break_symmetry(nn.Sequential(*layers)), torch.randn(2, 3, 4, 4)


def test_depthwise_conv_makes_the_stream_a_permutation_point():
    net, x = _model(
        nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(), nn.Conv2d(6, 2, 1)
    )
    spec = autoalign.find_merge_points(net, x)
    assert [p.name for p in spec.points] == ["0", "4"]
    p = spec.point("0")
    assert p.dim == 6 and p.kind == "permutation"
    # the reason names the depthwise conv (module path "2")
    assert p.reason.startswith("2:") and "depthwise" in p.reason
    p0 = spec.index_of("0")

    # the depthwise filters are per-channel vectors of the point, not producer rows
    for key in ("2.weight", "2.bias"):
        ax = _axis(spec, key, 0)
        assert ax.role == "channel"
        np.testing.assert_array_equal(ax.point_of, np.full(6, p0))
        np.testing.assert_array_equal(ax.local_of, np.arange(6))
    # its axis 1 (size 1: one input channel per group) is in no point
    assert not [a for a in spec.axes if a.tensor == "2.weight" and a.axis == 1]
    # the pointwise conv after it reads the same point
    ax = _axis(spec, "4.weight", 1)
    assert ax.role == "input"
    np.testing.assert_array_equal(ax.point_of, np.full(6, p0))
    assert spec.tensors_of("0") == ["0.bias", "0.weight", "2.bias", "2.weight", "4.weight"]
    _check_ok(net, x)


def test_mobilenet_block_depthwise_with_batchnorm():
    net, x = _model(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 2, 1),
    )
    spec = autoalign.find_merge_points(net, x)
    assert [p.name for p in spec.points] == ["0", "6", "9"]
    assert spec.point("0").kind == "permutation"
    assert spec.point("6").kind == "linear"
    p0 = spec.index_of("0")
    # BN after the depthwise conv cannot fold (the depthwise conv creates no coordinates)
    assert {f.running_mean for f in spec.folds} == {"1.running_mean", "7.running_mean"}
    for k in ("weight", "bias", "running_mean", "running_var"):
        ax = _axis(spec, f"4.{k}", 0)
        assert ax.role == "channel"
        np.testing.assert_array_equal(ax.point_of, np.full(4, p0))
    _check_ok(net, x)


def test_grouped_conv_splits_input_and_output_per_group():
    net, x = _model(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(12, 2, 1)
    )
    spec = autoalign.find_merge_points(net, x)
    names = [p.name for p in spec.points]
    assert names == [f"0[{g}]" for g in range(4)] + [f"2[{g}]" for g in range(4)] + ["4"]
    for g in range(4):
        # the grouped conv's input: 4 points of C/4 = 2
        pin = spec.point(f"0[{g}]")
        assert pin.dim == 2 and pin.kind == "linear" and pin.producers == ("0",)
        # its output: 4 points of 12/4 = 3 (rows of one group see only that group's inputs)
        assert spec.point(f"2[{g}]").dim == 3 and spec.point(f"2[{g}]").kind == "linear"

    # producer 0: rows 2g, 2g+1 are group g
    ax = _axis(spec, "0.weight", 0)
    np.testing.assert_array_equal(ax.point_of, np.repeat([spec.index_of(f"0[{g}]") for g in range(4)], 2))
    np.testing.assert_array_equal(ax.local_of, np.tile(np.arange(2), 4))

    # one input-axis role per group, each with a block over the output rows of that group
    for g in range(4):
        ax = _axis(spec, "2.weight", 1, block=(0, 3 * g, 3 * (g + 1)))
        assert ax.role == "input"
        assert ax.size == 2  # the weight's axis 1 has C/groups entries
        np.testing.assert_array_equal(ax.point_of, np.full(2, spec.index_of(f"0[{g}]")))
        np.testing.assert_array_equal(ax.local_of, np.arange(2))
    assert sum(1 for a in spec.axes if a.tensor == "2.weight" and a.axis == 1) == 4

    out = _axis(spec, "2.weight", 0)
    np.testing.assert_array_equal(out.point_of, np.repeat([spec.index_of(f"2[{g}]") for g in range(4)], 3))
    np.testing.assert_array_equal(out.local_of, np.tile(np.arange(3), 4))
    _check_ok(net, x)


def test_grouped_conv_block_transform_with_dense_matrices_is_exact():
    """Dense transforms of each group (no nonlinearity): the blocks say which rows
    of the grouped weight each input transform applies to."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.Conv2d(12, 2, 1)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    spec = autoalign.find_merge_points(net, x)
    g = torch.Generator().manual_seed(0)
    transforms = {}
    for p in spec.points:
        if p.kind == "frozen":
            continue
        m = torch.randn(p.dim, p.dim, generator=g, dtype=torch.float64) + 3 * torch.eye(p.dim, dtype=torch.float64)
        transforms[p.name] = (m, torch.linalg.inv(m))
    assert len(transforms) == 8
    sd = autoalign.transform_state_dict(net.state_dict(), spec, transforms)
    other = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.Conv2d(12, 2, 1)).double()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), net(x))


def test_depthwise_with_channel_multiplier_is_a_grouped_conv():
    net, x = _model(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(8, 2, 1))
    spec = autoalign.find_merge_points(net, x)
    assert [(p.name, p.dim, p.kind) for p in spec.points[:8]] == (
        [(f"0[{g}]", 1, "linear") for g in range(4)] + [(f"2[{g}]", 2, "linear") for g in range(4)]
    )
    _check_ok(net, x)


def test_groupnorm_splits_per_group_and_is_permutation():
    net, x = _model(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    spec = autoalign.find_merge_points(net, x)
    assert [p.name for p in spec.points] == ["0[0]", "0[1]", "3"]
    for g in range(2):
        p = spec.point(f"0[{g}]")
        assert p.dim == 4 and p.kind == "permutation"
        assert p.reason.startswith("1:") and "GroupNorm" in p.reason
    ids = np.repeat([spec.index_of("0[0]"), spec.index_of("0[1]")], 4)
    for key, role in (("0.weight", "output"), ("0.bias", "output"), ("1.weight", "channel"), ("1.bias", "channel"),
                      ("3.weight", "input")):
        ax = _axis(spec, key, 1 if key == "3.weight" else 0)
        assert ax.role == role, key
        np.testing.assert_array_equal(ax.point_of, ids, err_msg=key)
        np.testing.assert_array_equal(ax.local_of, np.tile(np.arange(4), 2), err_msg=key)
    _check_ok(net, x)


def test_permuting_across_groupnorm_groups_would_break_the_function():
    """The split matters: a permutation that swaps channels between groups changes the output."""
    net, x = _model(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    spec = autoalign.find_merge_points(net, x)
    merged_points = autoalign.MergeSpec(
        points=[
            autoalign.MergePoint("0", 8, "permutation", "test"),
            spec.point("3"),
        ],
        axes=[
            autoalign.AxisRole(a.tensor, a.axis, a.role,
                               np.where(a.point_of == 2, 1, np.where(a.point_of >= 0, 0, -1)),
                               np.where(a.point_of == 1, a.local_of + 4, a.local_of), a.block)
            for a in spec.axes
        ],
    )
    assert merged_points.point("0").dim == 8
    assert autoalign.check(net, x, spec=merged_points, seed=0).ok is False
