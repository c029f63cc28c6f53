"""The ``mcca`` aligner: multi-view (MAXVAR generalised) CCA Merge."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import autoalign
import autoalign.aligners.mcca  # noqa: F401  (registers "mcca")
from autoalign.aligners.cca import cca_transform
from autoalign.aligners.mcca import MCCAAligner, mcca_transforms
from autoalign.stats import PointStats
from autoalign.testing import check_aligner

D64 = torch.float64


def _covs(xs):
    xs = [x - x.mean(0) for x in xs]
    n = xs[0].shape[0]
    return [[a.T @ b / n for b in xs] for a in xs]


def _mixed_copy(model: nn.Sequential, seed: int):
    """``model`` with its hidden units mixed by a random invertible Q: same function."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(8, 8, generator=g, dtype=D64) + 2 * torch.eye(8, dtype=D64)
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.copy_((q @ model[0].weight.double()).float())
        out[0].bias.copy_((q @ model[0].bias.double()).float())
        out[1].weight.copy_((model[1].weight.double() @ torch.linalg.inv(q)).float())
    return out, q


@pytest.fixture(scope="module")
def linear_trio():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    b, qb = _mixed_copy(a, 1)
    c, qc = _mixed_copy(a, 2)
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(64, 16, generator=g) for _ in range(4)]
    return (a, b, c), (qb, qc), data


def test_conformance():
    check_aligner("mcca")


def test_registered_with_options():
    al = autoalign.get_aligner("mcca", ridge=0.1, frame="reference")
    assert isinstance(al, MCCAAligner) and al.needs == "all_pairs" and al.ridge == 0.1
    assert "mcca" in autoalign.list_aligners()


@pytest.mark.parametrize(
    "opts", [{"ridge": -1.0}, {"ridge_mode": "weird"}, {"blocks": "weird"}, {"frame": "weird"}, {"unknown": 1}]
)
def test_bad_options_raise(opts):
    with pytest.raises((ValueError, TypeError)):
        MCCAAligner(**opts)


@pytest.mark.parametrize("opts", [{}, {"blocks": "raw"}, {"frame": "reference"}])
def test_linear_mixed_copies_merge_exactly(linear_trio, opts):
    (a, b, c), (qb, qc), data = linear_trio
    res = autoalign.merge_with_report([a, b, c], data, aligner="mcca", ridge=0.0, **opts)
    with torch.no_grad():
        for x in data:
            ya, ym = a(x), res.model(x)
            assert float((ya - ym).abs().max()) <= 1e-4 * float(ya.abs().max())
    assert len(res.plan.points) == 1
    pp = next(iter(res.plan.points.values()))
    assert pp.kind == "linear" and pp.projected is None
    ma, mb, mc = pp.merges
    # every model lands in the same merged frame
    torch.testing.assert_close(mb @ qb, ma, rtol=0, atol=1e-5 * float(ma.norm()))
    torch.testing.assert_close(mc @ qc, ma, rtol=0, atol=1e-5 * float(ma.norm()))
    for m, u in zip(pp.merges, pp.unmerges):
        torch.testing.assert_close(m @ u, torch.eye(8, dtype=D64), rtol=0, atol=1e-8)
    assert pp.score == pytest.approx(1.0, abs=1e-6)
    if opts.get("frame") == "reference":
        torch.testing.assert_close(ma, torch.eye(8, dtype=D64), rtol=0, atol=1e-8)


def test_mean_frame_keeps_the_models_mean_scale(linear_trio):
    # ‖y‖² = Σ_m w_m ‖x_m‖² sample by sample when the models agree: merged features have the mean scale
    (a, b, c), _, data = linear_trio
    res = autoalign.merge_with_report([a, b, c], data, aligner="mcca", ridge=0.0)
    name, pp = next(iter(res.plan.points.items()))
    st = res.stats[name]
    merged_var = float(torch.trace(pp.merges[0] @ st.cov(0) @ pp.merges[0].T))
    mean_var = sum(float(torch.trace(st.cov(m))) for m in range(3)) / 3
    assert merged_var == pytest.approx(mean_var, rel=1e-6)


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_two_models_relative_map_is_cca_merge(ridge):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 10, generator=g, dtype=D64)
    xs = [torch.relu(z @ torch.randn(10, 6, generator=g, dtype=D64)) + 0.3 * torch.randn(1000, 6, generator=g, dtype=D64) for _ in range(2)]
    cov = _covs(xs)
    merges, unmerges, rho = mcca_transforms(cov, ridge=ridge)
    t, _, rho_cca = cca_transform(cov[0][0], cov[1][1], cov[0][1], ridge=ridge)
    torch.testing.assert_close(torch.linalg.solve(merges[0], merges[1]), t, rtol=0, atol=1e-6 * float(t.norm()))
    torch.testing.assert_close(rho, rho_cca, rtol=0, atol=1e-6)
    ref, _, _ = mcca_transforms(cov, ridge=ridge, frame="reference", reference=0)
    torch.testing.assert_close(ref[1], t, rtol=0, atol=1e-6 * float(t.norm()))


def test_identical_models_get_identity():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 5, generator=g, dtype=D64) @ torch.randn(5, 5, generator=g, dtype=D64)
    merges, unmerges, rho = mcca_transforms(_covs([x, x, x]), weights=[0.2, 0.3, 0.5])
    for m, u in zip(merges, unmerges):
        torch.testing.assert_close(m, torch.eye(5, dtype=D64), rtol=0, atol=1e-7)
        torch.testing.assert_close(u, torch.eye(5, dtype=D64), rtol=0, atol=1e-7)
    assert bool(((rho > 0.5) & (rho < 1)).all())  # the ridge lowers the correlations of small-variance directions
    assert float(mcca_transforms(_covs([x, x, x]), ridge=0.0)[2].min()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("ridge", [0.0, 0.01])
def test_rank_deficient_features_stay_finite_and_invertible(ridge):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(300, 6, generator=g, dtype=D64)
    xs = []
    for _ in range(3):
        x = z @ torch.randn(6, 6, generator=g, dtype=D64) + 0.5 * torch.randn(300, 6, generator=g, dtype=D64)
        x[:, 2] = 1.5  # a dead (constant) feature
        xs.append(x)
    merges, unmerges, rho = mcca_transforms(_covs(xs), ridge=ridge)
    for m, u in zip(merges, unmerges):
        assert bool(torch.isfinite(m).all()) and bool(torch.isfinite(u).all())
        torch.testing.assert_close(m @ u, torch.eye(6, dtype=D64), rtol=0, atol=1e-6)
    assert bool(((rho >= 0) & (rho <= 1)).all())


def test_plan_does_not_depend_on_the_eigenbasis():
    # a data set with exactly tied canonical correlations (two views related by an orthogonal map)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 4, generator=g, dtype=D64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / 400)).T  # white: all canonical correlations are 1
    o = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=D64))[0]
    merges, _, rho = mcca_transforms(_covs([x, x @ o.T, 2 * x]), ridge=0.0)
    torch.testing.assert_close(merges[1] @ o, merges[0], rtol=0, atol=1e-8)
    torch.testing.assert_close(merges[2] * 2, merges[0], rtol=0, atol=1e-8)
    assert float(rho.min()) == pytest.approx(1.0, abs=1e-9)


def _point_stats(xs):
    n = xs[0].shape[0]
    cross = {(i, j): xs[i].T @ xs[j] for i in range(len(xs)) for j in range(i + 1, len(xs))}
    return PointStats(n, [x.sum(0) for x in xs], [x.T @ x for x in xs], cross)


def test_single_model_and_constant_features_get_identity():
    al = MCCAAligner()
    point = SimpleNamespace(dim=3, name="p")
    x = torch.randn(50, 3, dtype=D64)
    one = SimpleNamespace(n_models=1, weights=torch.ones(1, dtype=D64), reference=0)
    pp = al.solve_point(point, _point_stats([x]), one)
    assert pp.note and all(bool((m == torch.eye(3, dtype=D64)).all()) for m in pp.merges)
    m1, u1, rho1 = mcca_transforms([[x.T @ x]])
    assert bool((m1[0] == torch.eye(3, dtype=D64)).all()) and bool((rho1 == 1).all())
    two = SimpleNamespace(n_models=2, weights=torch.full((2,), 0.5, dtype=D64), reference=0)
    pp = al.solve_point(point, _point_stats([x, torch.ones(50, 3, dtype=D64)]), two)
    assert "constant" in pp.note and len(pp.merges) == 2
