"""BatchNorm folding and its limits (issue 2)."""

import copy

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


def _roles(spec, prefix):
    return {a.tensor[len(prefix) + 1 :]: a.role for a in spec.axes if a.tensor.startswith(prefix + ".")}


def _check_ok(model, x):
    report = autoalign.check(model, x, seed=7)
    assert report.ok, str(report)
    return report


def _conv_bn(bias=True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    return break_symmetry(net), torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds(bias):
    net, x = _conv_bn(bias)
    spec = autoalign.find_merge_points(net, x)
    assert [p.name for p in spec.points] == ["0", "3"]
    p = spec.point("0")
    assert p.kind == "linear" and p.reason is None

    assert spec.folds == [
        autoalign.FoldedNorm(
            producer_weight="0.weight",
            producer_bias="0.bias" if bias else None,
            weight="1.weight",
            bias="1.bias",
            running_mean="1.running_mean",
            running_var="1.running_var",
            eps=1e-5,
        )
    ]
    assert _roles(spec, "1") == {"weight": "folded", "running_mean": "folded", "running_var": "folded", "bias": "output"}
    i = spec.index_of("0")
    for k in ("weight", "bias", "running_mean", "running_var"):
        ax = _axis(spec, f"1.{k}", 0)
        np.testing.assert_array_equal(ax.point_of, np.full(4, i))
        np.testing.assert_array_equal(ax.local_of, np.arange(4))
    # num_batches_tracked is reached but has no feature axis
    assert "1.num_batches_tracked" not in spec.unused
    assert not [a for a in spec.axes if a.tensor == "1.num_batches_tracked"]
    _check_ok(net, x)


def test_linear_bn1d_folds():
    torch.manual_seed(0)
    net = break_symmetry(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)))
    x = torch.randn(6, 3)
    spec = autoalign.find_merge_points(net, x)
    assert spec.point("0").kind == "linear"
    assert [f.producer_weight for f in spec.folds] == ["0.weight"]
    _check_ok(net, x)


def test_folded_point_takes_a_dense_transform_exactly():
    """With the BN folded, a dense invertible M on the conv's point is exact (no ReLU)."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).double()

    net = break_symmetry(make())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    spec = autoalign.find_merge_points(net, x)
    g = torch.Generator().manual_seed(0)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    sd = autoalign.transform_state_dict(net.state_dict(), spec, {"0": (m, torch.linalg.inv(m))})
    # the BN was reset to the identity normalisation; its bias was transformed
    torch.testing.assert_close(sd["1.weight"], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(sd["1.running_mean"], torch.zeros(4, dtype=torch.float64))
    other = make()
    other.load_state_dict(sd)
    net.eval()
    other.eval()
    torch.testing.assert_close(other(x), net(x))


class BNAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.a(x) + self.b(x)))).mean((2, 3))


class BNInputHasTwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.side = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return (self.head(torch.relu(self.bn(y))) + self.side(y)).mean((2, 3))


@pytest.mark.parametrize("cls, point", [(BNAfterAdd, "a"), (BNInputHasTwoUsers, "conv")])
def test_bn_that_cannot_fold_makes_the_point_a_permutation(cls, point):
    torch.manual_seed(0)
    net = break_symmetry(cls())
    x = torch.randn(2, 3, 3, 3)
    spec = autoalign.find_merge_points(net, x)
    assert spec.folds == []
    p = spec.point(point)
    assert p.dim == 4 and p.kind == "permutation"
    assert p.reason.startswith("bn:") and "BatchNorm" in p.reason
    assert _roles(spec, "bn") == {k: "channel" for k in ("weight", "bias", "running_mean", "running_var")}
    i = spec.index_of(point)
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(_axis(spec, f"bn.{k}", 0).point_of, np.full(4, i))
    _check_ok(net, x)


def test_bn_after_residual_add_in_a_stream():
    """x -> conv -> (+ conv2(relu(conv))) -> BN: the BN sits on the stream (the add),
    so it cannot fold and the whole stream becomes a permutation point."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.c1 = nn.Conv2d(4, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            x = self.stem(x)
            x = self.bn(x + self.c2(torch.relu(self.c1(x))))
            return self.head(torch.relu(x)).mean((2, 3))

    torch.manual_seed(0)
    net = break_symmetry(Net())
    x = torch.randn(2, 3, 4, 4)
    spec = autoalign.find_merge_points(net, x)
    assert spec.point("stem").kind == "permutation" and "bn" in spec.point("stem").reason
    assert spec.point("c1").kind == "linear"
    i = spec.index_of("stem")
    for key in ("stem.weight", "c2.weight", "bn.running_var"):
        np.testing.assert_array_equal(_axis(spec, key, 0).point_of, np.full(4, i))
    _check_ok(net, x)


@pytest.mark.parametrize(
    "make, offset",
    [
        # affine=False: the folded offset goes to the producer's bias, or to the running mean
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 2, 1)), "0.bias"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 2, 1)),
         "1.running_mean"),
        # a transposed convolution's outputs are its weight's axis 1
        (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)), "1.bias"),
        (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 2, 1)),
         "1.running_mean"),
    ],
    ids=["affine-false", "affine-false-no-bias", "conv-transpose", "conv-transpose-affine-false-no-bias"],
)
def test_more_batchnorms_fold_and_take_a_dense_transform_exactly(make, offset):
    torch.manual_seed(0)
    net = break_symmetry(make().double())
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    spec = autoalign.find_merge_points(net, x)
    assert spec.point("0").kind == "linear" and len(spec.folds) == 1
    assert _axis(spec, offset, 0).role == "output"
    _check_ok(net.float(), x.float())
    net = net.double().eval()
    folded = copy.deepcopy(net)
    folded.load_state_dict(autoalign.fold_batchnorm(net.state_dict(), spec))
    torch.testing.assert_close(folded(x), net(x))
    g = torch.Generator().manual_seed(1)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    other = copy.deepcopy(net)
    other.load_state_dict(autoalign.transform_state_dict(net.state_dict(), spec, {"0": (m, torch.linalg.inv(m))}))
    torch.testing.assert_close(other(x), net(x))


def test_merging_affine_free_batchnorm_models_with_cca_folds_and_repairs():
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, affine=False), nn.ReLU(), nn.Conv2d(6, 4, 3),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()

    data = [torch.randn(16, 3, 8, 8)]
    for repair in ("auto", "repair"):
        res = autoalign.merge_with_report([make(s) for s in range(3)], data, aligner="cca", repair=repair)
        assert res.report.folded_batchnorms == 1
        assert torch.isfinite(res.model(data[0])).all()


def test_fold_batchnorm_keeps_the_eval_function_and_resets_the_bn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
        nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 2),
    ).double()
    break_symmetry(net)
    # realistic, non-trivial statistics
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[4].running_mean.normal_()
        net[4].running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    spec = autoalign.find_merge_points(net, x)
    assert len(spec.folds) == 2
    sd = net.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    folded = autoalign.fold_batchnorm(sd, spec)

    # the input state dict is untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k

    for bn, eps in (("1", 1e-3), ("4", 1e-5)):
        torch.testing.assert_close(folded[f"{bn}.weight"], torch.ones_like(sd[f"{bn}.weight"]), rtol=0, atol=0)
        torch.testing.assert_close(folded[f"{bn}.running_mean"], torch.zeros_like(sd[f"{bn}.running_mean"]), rtol=0, atol=0)
        torch.testing.assert_close(folded[f"{bn}.running_var"], torch.full_like(sd[f"{bn}.running_var"], 1 - eps), rtol=0, atol=0)
    torch.testing.assert_close(folded["0.bias"], torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)
    # W' = diag(gamma / sqrt(var + eps)) W
    s = sd["1.weight"] / torch.sqrt(sd["1.running_var"] + 1e-3)
    torch.testing.assert_close(folded["0.weight"], sd["0.weight"] * s[:, None, None, None])
    torch.testing.assert_close(folded["1.bias"], s * (sd["0.bias"] - sd["1.running_mean"]) + sd["1.bias"])

    other = copy.deepcopy(net)
    other.load_state_dict(folded)
    net.eval()
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), net(x), rtol=1e-12, atol=1e-12)


def test_fold_batchnorm_with_an_empty_fold_list_is_a_copy():
    net, x = _conv_bn()
    spec = autoalign.find_merge_points(net, x)
    sd = net.state_dict()
    out = autoalign.fold_batchnorm(sd, spec, folds=[])
    assert out.keys() == sd.keys()
    assert all(torch.equal(out[k], sd[k]) for k in sd)
