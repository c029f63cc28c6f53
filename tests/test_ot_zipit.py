"""The ``ot`` (Singh & Jaggi 2020) and ``zipit`` (Stoica et al. 2024) aligners."""

import sys

import pytest
import torch
from torch import nn

import autoalign
import autoalign.aligners.ot  # noqa: F401  (registers "ot")
import autoalign.aligners.zipit  # noqa: F401  (registers "zipit")
from autoalign.aligners.base import AlignProblem
from autoalign.aligners.linalg import is_permutation
from autoalign.aligners.zipit import zipit_groups, zipit_transforms
from autoalign.stats import collect_stats
from autoalign.testing import check_aligner, max_output_diff, permute_model
from autoalign.examples.zoo import break_symmetry

pytest.importorskip("ot")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.head = nn.Linear(12 * 2 * 2, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = _CNN()
    break_symmetry(m, seed=seed)
    return m.eval()


def _data(kind: str, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return [torch.randn(128, 6, generator=g) for _ in range(n)]
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _model(kind: str, seed: int) -> nn.Module:
    return _mlp(seed) if kind == "mlp" else _cnn(seed)


def _problem(models, data, needs="all_pairs"):
    spec = autoalign.find_merge_points(models[0], data[0][:2])
    stats = collect_stats(models, data, spec, needs=needs)
    n = len(models)
    sds = [m.state_dict() for m in models]
    return AlignProblem(spec, sds, 0, torch.full((n,), 1.0 / n, dtype=torch.float64), stats)


# ----------------------------------------------------------------------------- ot


def test_ot_conformance():
    check_aligner("ot")


def test_ot_sinkhorn_small_reg_conformance():
    # at the default reg=0.01 the soft plan blurs close features and merge([A]*3) is
    # off by ~8% of the output scale; at 1e-4 the plan is a permutation to 1e-6
    check_aligner("ot", method="sinkhorn", reg=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ot_emd_recovers_a_permuted_model(kind):
    a = _model(kind, 0)
    data = _data(kind)
    spec = autoalign.find_merge_points(a, data[0][:2])
    b = permute_model(a, spec, seed=3)
    res = autoalign.merge_with_report([a, b], data, aligner="ot", repair=None)
    with torch.no_grad():
        diff, scale = max_output_diff(a(data[0]), res.model(data[0]))
    assert diff <= 1e-5 * max(1.0, scale)
    assert all(p.used == "permutation" and p.projected is None for p in res.report.points)
    for pp in res.plan.points.values():
        assert all(is_permutation(m) for m in pp.merges)
        assert pp.score is not None and pp.score > 0.99


def test_ot_sinkhorn_plan_is_doubly_stochastic_with_inverse_unmerge():
    models = [_mlp(0), _mlp(1)]
    prob = _problem(models, _data("mlp"), needs="reference")
    al = autoalign.get_aligner("ot", method="sinkhorn", reg=0.05)
    plan = al.solve(prob)
    for pp in plan.points.values():
        assert pp.kind == "linear"
        m, u = pp.merges[1], pp.unmerges[1]
        torch.testing.assert_close(m.sum(1), torch.ones(m.shape[0], dtype=torch.float64))
        torch.testing.assert_close(m.sum(0), torch.ones(m.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
        assert bool((m >= 0).all())
        torch.testing.assert_close(m @ u, torch.eye(m.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    plan_t = autoalign.get_aligner("ot", method="sinkhorn", reg=0.05, unmerge="transpose").solve(prob)
    for pp in plan_t.points.values():
        torch.testing.assert_close(pp.unmerges[1], pp.merges[1].T)
    merged = autoalign.merge(models, _data("mlp"), aligner="ot", method="sinkhorn", reg=0.05)
    assert all(bool(torch.isfinite(v).all()) for v in merged.state_dict().values())


def test_ot_tiny_reg_sinkhorn_reaches_the_emd_cost():
    # near-ties between assignments let Sinkhorn settle on another (near-)optimal plan,
    # so compare transport costs, not plans
    from autoalign.aligners.ot import activation_cost

    models = [_mlp(0), _mlp(1)]
    prob = _problem(models, _data("mlp"), needs="reference")
    emd = autoalign.get_aligner("ot").solve(prob)
    sk = autoalign.get_aligner("ot", method="sinkhorn", reg=1e-2).solve(prob)
    for name, pp in emd.points.items():
        cost = activation_cost(prob.stats[name], 0, 1)
        c_emd = float((pp.merges[1] * cost).sum())
        c_sk = float((sk.points[name].merges[1] * cost).sum())
        assert c_emd <= c_sk * (1 + 1e-9)
        assert c_sk <= c_emd * (1 + 2e-2)


def test_ot_options_are_validated_and_missing_pot_is_explained(monkeypatch):
    with pytest.raises(ValueError, match="method"):
        autoalign.get_aligner("ot", method="greedy")
    with pytest.raises(ValueError, match="reg"):
        autoalign.get_aligner("ot", reg=0)
    monkeypatch.setitem(sys.modules, "ot", None)
    with pytest.raises(ImportError, match="pip install pot"):
        autoalign.merge([_mlp(0), _mlp(1)], _data("mlp"), aligner="ot")


# ----------------------------------------------------------------------------- zipit


def test_zipit_conformance():
    check_aligner("zipit")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zipit_without_within_model_merges_equals_permutation_matching(kind):
    a = _model(kind, 0)
    data = _data(kind)
    spec = autoalign.find_merge_points(a, data[0][:2])
    b = permute_model(a, spec, seed=3)
    prob = _problem([a, b], data)
    zp = autoalign.get_aligner("zipit", alpha=0.0, beta=0.0).solve(prob)
    pm = autoalign.get_aligner("permutation").solve(prob)
    assert zp.points.keys() == pm.points.keys()
    for name, pp in zp.points.items():
        assert pp.kind == "permutation"
        for m in range(2):
            assert torch.equal(pp.merges[m], pm.points[name].merges[m])
            assert torch.equal(pp.unmerges[m], pm.points[name].unmerges[m])
    res = autoalign.merge_with_report([a, b], data, aligner="zipit", alpha=0.0, beta=0.0, repair=None)
    with torch.no_grad():
        diff, scale = max_output_diff(a(data[0]), res.model(data[0]))
    assert diff <= 1e-5 * max(1.0, scale)


def test_zipit_three_models_gives_finite_params_and_valid_plans():
    models = [_mlp(s) for s in range(3)]
    data = _data("mlp")
    res = autoalign.merge_with_report(models, data, aligner="zipit", beta=0.5)
    assert all(bool(torch.isfinite(v).all()) for v in res.model.state_dict().values())
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    for pp in res.plan.points.values():
        d = pp.merges[0].shape[0]
        # every feature goes to exactly one merged feature; every merged feature is a weighted mean
        for u in pp.unmerges:
            assert torch.equal(u.sum(1), torch.ones(d, dtype=torch.float64))
        total = sum(w[m] * pp.merges[m] for m in range(3))
        torch.testing.assert_close(total.sum(1), torch.ones(d, dtype=torch.float64))
    with torch.no_grad():
        assert bool(torch.isfinite(res.model(data[0])).all())


def test_zipit_groups_budget_and_repeat_rules():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)
    x[:, 10:20] = x[:, 0:10] + 0.3 * torch.randn(200, 10, generator=g, dtype=torch.float64)
    corr = torch.corrcoef(x.T)
    d, n = 10, 3
    for beta in (0.0, 0.5, 1.0):
        groups, score, forced = zipit_groups(corr, n, alpha=0.0, beta=beta)
        assert len(groups) == d and score is not None
        assert sorted(f for gr in groups for f in gr) == [(m, a) for m in range(n) for a in range(d)]
        budget = int(beta * ((n - 1) * d // n))
        for m in range(n):
            within = sum(max(0, sum(1 for mm, _ in gr if mm == m) - 1) for gr in groups)
            assert within <= budget
        if beta == 0.0:
            assert forced == 0
            assert all(sorted(m for m, _ in gr) == [0, 1, 2] for gr in groups)
    groups, _, _ = zipit_groups(corr, n, alpha=0.5, beta=0.0)
    assert len(groups) == d


def test_zipit_transforms_weighted_means():
    groups = [[(0, 0), (1, 1)], [(0, 1), (0, 2), (1, 2)], [(1, 0)]]
    w = torch.tensor([0.75, 0.25], dtype=torch.float64)
    merges, unmerges, perm = zipit_transforms(groups, w, 3, reference=0)
    assert not perm
    x = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)]
    z = sum(w[m] * merges[m] @ x[m] for m in range(2))
    expect = torch.tensor(
        [(0.75 * 1 + 0.25 * 20) / 1.0, (0.75 * 2 + 0.75 * 3 + 0.25 * 30) / 1.75, 10.0], dtype=torch.float64
    )
    torch.testing.assert_close(z, expect)
    torch.testing.assert_close(unmerges[0], torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.float64))
    torch.testing.assert_close(unmerges[1], torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))
