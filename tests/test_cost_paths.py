"""The cheaper paths of issue 18 compute what the slower ones did.

* ``procrustes`` at permutation points: the assignment maximising ``tr(Pᵀ C)``, from
  cross-covariances and variances only (no (d, d) self-products, no SVD);
* the low-rank polar factor (fewer samples than features) against the full SVD;
* dense transforms applied in float32 to float32 weights against float64.
"""

import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoalign
from autoalign.aligners.linalg import polar_nearest_identity, psd_noise
from autoalign.aligners.low_rank import low_rank_polar_nearest_identity
from autoalign.aligners.procrustes import permutation_procrustes

D64 = torch.float64
apply_module = sys.modules["autoalign.apply"]


def _eye(d):
    return torch.eye(d, dtype=D64)


# --- the low-rank polar factor ------------------------------------------------------------------


def _statistics(d, n, seed=0):
    """Cross-covariance and covariances of n samples of d related features, from float32
    products as the statistics pass takes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D64)
    y = x @ torch.randn(d, d, generator=g, dtype=D64) / d**0.5 + 0.5 * torch.randn(n, d, generator=g, dtype=D64)
    x, y = (x - x.mean(0)).float(), (y - y.mean(0)).float()
    cxy, cxx, cyy = ((a.T @ b).double() / n for a, b in ((x, y), (x, x), (y, y)))
    return cxy, cxx, cyy, 10 * max(psd_noise(cxx), psd_noise(cyy))


@pytest.mark.parametrize("d, n", [(96, 5), (200, 20), (256, 40)])
@pytest.mark.parametrize("which", ["cross", "self"])
def test_low_rank_polar_factor_is_the_full_one(d, n, which):
    cxy, cxx, _, tol = _statistics(d, n)
    m = cxy if which == "cross" else cxx
    fast = low_rank_polar_nearest_identity(m, n - 1, 1e-10, tol)
    assert fast is not None  # the sketch captured m: the fast path was taken
    q, s, rank = fast
    q_full, s_full, rank_full = polar_nearest_identity(m, 1e-10, tol)
    assert rank == rank_full == n - 1
    assert float((q - q_full).abs().max()) < 1e-9
    assert float((q.T @ q - _eye(d)).abs().max()) < 1e-12
    assert torch.allclose(s[:rank], s_full[:rank], rtol=1e-10, atol=0)
    if which == "self":  # a model against its own copy: the identity, null directions included
        assert float((q - _eye(d)).abs().max()) < 1e-12
    # and polar_nearest_identity takes that path by itself when given the bound
    assert torch.equal(polar_nearest_identity(m, 1e-10, tol, rank_bound=n - 1)[0], q)


def test_low_rank_polar_factor_refuses_a_wrong_rank_bound():
    cxy, _, _, tol = _statistics(128, 60)
    assert low_rank_polar_nearest_identity(cxy, 5, 1e-10, tol) is None  # rank 59, not ≤ 5
    q_full = polar_nearest_identity(cxy, 1e-10, tol)[0]
    q = polar_nearest_identity(cxy, 1e-10, tol, rank_bound=5)[0]  # falls back to the full SVD
    assert float((q - q_full).abs().max()) < 1e-12


def test_low_rank_polar_factor_of_zero_is_the_identity():
    q, s, rank = low_rank_polar_nearest_identity(torch.zeros(80, 80, dtype=D64), 3, 1e-10, 0.0)
    assert rank == 0 and torch.equal(q, _eye(80)) and not bool(s.any())


# --- procrustes within the permutations ---------------------------------------------------------


def test_permutation_procrustes_is_the_best_assignment():
    g = torch.Generator().manual_seed(3)
    c = torch.randn(6, 6, generator=g, dtype=D64)
    best = max(itertools.permutations(range(6)), key=lambda p: sum(float(c[i, p[i]]) for i in range(6)))
    assert permutation_procrustes(c).argmax(1).tolist() == list(best)


def test_permutation_procrustes_keeps_tied_units_in_place():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 8, generator=g, dtype=D64)
    x[:, 2] = x[:, 5]  # duplicated units
    x[:, 0] = 0.0  # and two dead ones
    x[:, 7] = 0.0
    c = torch.cov(x.T)
    assert torch.equal(permutation_procrustes(c), _eye(8))


class _Depthwise(nn.Module):
    """conv-BN-ReLU, depthwise conv-BN-ReLU (a permutation point), pointwise conv, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.stem(x))).mean((2, 3)))


def _models(n):
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = _Depthwise()
        for mod in net.modules():  # BatchNorms with statistics of their own
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        nets.append(net.eval())
    return nets


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(3)]


def test_procrustes_assigns_at_permutation_points_from_variances():
    nets = _models(3)
    res = autoalign.merge_with_report(nets, _data(), aligner="procrustes", repair=None)
    kinds = {p.name: p.kind for p in res.spec.points}
    assert "permutation" in kinds.values() and "linear" in kinds.values()
    for name, pp in res.plan.points.items():
        squares = res.stats[name].squares[1]
        if kinds[name] == "permutation":
            assert pp.kind == "permutation" and pp.projected is None  # solved in the group, nothing projected
            assert squares.dim() == 1  # variances only: no (d, d) self-product was taken
            st = res.stats[name]
            for m in (1, 2):
                assert torch.equal(pp.merges[m], permutation_procrustes(st.cov(0, m)))
        else:
            assert pp.kind == "orthogonal" and squares.dim() == 2
    # the former behaviour on request: the dense polar factor, projected by the engine
    old = autoalign.merge_with_report(nets, _data(), aligner=autoalign.get_aligner("procrustes", permutation_points="project"), repair=None)
    for name, pp in old.plan.points.items():
        if kinds[name] == "permutation":
            assert pp.projected == "permutation" and old.stats[name].squares[1].dim() == 2


def test_procrustes_maps_a_copy_onto_itself_at_permutation_points():
    net = _models(1)[0]
    res = autoalign.merge_with_report([net, net], _data(), aligner="procrustes", repair=None)
    for pp in res.plan.points.values():
        assert torch.allclose(pp.merges[1], _eye(pp.merges[1].shape[0]), atol=1e-9)
    x = _data()[0]
    assert torch.allclose(res.model(x), net(x), atol=1e-5)


def test_procrustes_option_is_checked():
    with pytest.raises(autoalign.OptionError, match="permutation_points"):
        autoalign.get_aligner("procrustes", permutation_points="nearest")


def test_per_point_self_moments_are_checked():
    nets = _models(2)
    spec = autoalign.find_merge_points(nets[0], _data()[0])
    with pytest.raises(autoalign.OptionError, match="'nowhere'.*not a merge point"):
        autoalign.collect_stats(nets, _data(), spec, self_moments={"nowhere": "diagonal"})
    name = next(p.name for p in spec.points if p.kind != "frozen")
    with pytest.raises(autoalign.OptionError, match="self_moments"):
        autoalign.collect_stats(nets, _data(), spec, self_moments={name: "half"})
    st = autoalign.collect_stats(nets, _data(), spec, self_moments={name: "diagonal"})
    assert st[name].squares[0].dim() == 1
    assert all(st[p].squares[0].dim() == 2 for p in st.points if p != name)


# --- dense transforms in the weights' precision --------------------------------------------------


def _dense_transforms(spec, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in spec.points:
        if p.kind == "linear":
            m = _eye(p.dim) + 0.3 * torch.randn(p.dim, p.dim, generator=g, dtype=D64) / p.dim**0.5
            out[p.name] = (m, torch.linalg.inv(m))
    return out


def test_float32_weights_are_transformed_in_float32_to_float32_accuracy(monkeypatch):
    net = _models(1)[0]
    net.stem[1].weight.data.uniform_(0.5, 1.5)
    spec = autoalign.find_merge_points(net, _data()[0])
    tr = _dense_transforms(spec)
    assert tr and apply_module.product_dtype(torch.float32) == torch.float32
    fast = autoalign.transform_state_dict(net.state_dict(), spec, tr)
    monkeypatch.setattr(apply_module, "product_dtype", lambda dtype: D64)
    exact = autoalign.transform_state_dict(net.state_dict(), spec, tr)
    changed = 0
    for k, v in exact.items():
        assert fast[k].dtype == v.dtype
        if torch.is_floating_point(v) and v.numel():
            err = float((fast[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30))
            assert err < 1e-6, k
            changed += not torch.equal(v, net.state_dict()[k])
    assert changed  # the transforms did act
    # and the transformed model computes the same function as its float64 counterpart
    a, b = _models(1)[0], _models(1)[0]
    a.load_state_dict(fast)
    b.load_state_dict(exact)
    x = _data()[0]
    assert torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_products_keep_float64_and_lift_half_precision():
    want = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32, D64: D64}
    assert {dt: apply_module.product_dtype(dt) for dt in want} == want


# --- one projection per attention node ----------------------------------------------------------


def test_heads_share_one_projection_of_their_node():
    """Every head's query/key point is read through the fused in-projection of its attention
    input; the statistics pass projects each node once, not once per head."""
    from autoalign.stats.moments import site_view

    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(5, 16), attn, nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))

    net = Net().eval()
    x = torch.randn(2, 6, 5)
    spec = autoalign.find_merge_points(net, x)
    by_node = {}
    for p in spec.points:
        for s in p.sites:
            if s.kind == "projected":
                by_node.setdefault(s.node, []).append(s)
    node, sites = max(by_node.items(), key=lambda kv: len(kv[1]))
    assert len(sites) >= 4  # a query/key point per head
    params = dict(net.state_dict())
    value = torch.randn(2, 6, 16)
    cache = {}
    shared = [site_view(value, s, params, cache)[0] for s in sites]
    alone = [site_view(value, s, params)[0] for s in sites]
    assert len(cache) == len({(s.weight, s.bias, s.axis) for s in sites}) < len(sites)
    assert all(torch.equal(a, b) for a, b in zip(shared, alone))
