"""The ``lstsq`` and ``procrustes`` ablation aligners (issue #8): least-squares and orthogonal maps."""

import copy
import doctest
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import autoalign
from autoalign.aligners import CCAAligner, LstsqAligner, ProcrustesAligner, cca_transform
from autoalign.aligners import lstsq as lstsq_module
from autoalign.aligners import procrustes as procrustes_module
from autoalign.aligners.lstsq import lstsq_transform, truncated_inverse
from autoalign.aligners.procrustes import procrustes_transform
from autoalign.stats import PointStats
from autoalign.testing import check_aligner, permute_model

D64 = torch.float64


def _eye(d):
    return torch.eye(d, dtype=D64)


def _point_stats(xs, reference=0):
    """PointStats of raw feature samples, cross terms of every model with the reference."""
    n = xs[0].shape[0]
    cross = {(reference, m): xs[reference].T @ xs[m] for m in range(len(xs)) if m != reference}
    return PointStats(n, [x.sum(0) for x in xs], [x.T @ x for x in xs], cross)


def _problem(n_models, reference=0):
    return SimpleNamespace(n_models=n_models, reference=reference, weights=torch.full((n_models,), 1.0 / n_models, dtype=D64))


def _covs(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]
    return x.T @ x / n, y.T @ y / n, x.T @ y / n


def _related_features(n=2000, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=D64)
    x = torch.relu(z @ torch.randn(d, d, generator=g, dtype=D64)) + 0.3 * torch.randn(n, d, generator=g, dtype=D64)
    y = torch.relu(z @ torch.randn(d, d, generator=g, dtype=D64)) * 3.0 + 0.3 * torch.randn(n, d, generator=g, dtype=D64)
    return x, y


def _close(a, b, tol):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# --- registry, options, conformance ---------------------------------------------------------


@pytest.mark.parametrize("name", ["lstsq", "procrustes"])
def test_conformance(name):
    check_aligner(name)


def test_registered_as_builtins():
    assert {"lstsq", "procrustes"} <= set(autoalign.list_aligners())
    al = autoalign.get_aligner("lstsq", ridge=0.1, ridge_mode="absolute", rcond=1e-6)
    assert isinstance(al, LstsqAligner) and al.needs == "reference" and (al.ridge, al.ridge_mode, al.rcond) == (0.1, "absolute", 1e-6)
    al = autoalign.get_aligner("procrustes", standardize=True)
    assert isinstance(al, ProcrustesAligner) and al.needs == "reference" and al.standardize is True
    desc = autoalign.aligners.describe_aligners()
    assert "least-squares" in desc["lstsq"] and "Procrustes" in desc["procrustes"]


@pytest.mark.parametrize("name, option", [("lstsq", "ridg"), ("lstsq", "standardize"), ("procrustes", "standardise"), ("procrustes", "ridge")])
def test_unknown_option_is_named(name, option):
    with pytest.raises(autoalign.OptionError, match=f"has no option '{option}'"):
        autoalign.get_aligner(name, **{option: 1})


@pytest.mark.parametrize(
    "name, opts, match",
    [
        ("lstsq", {"ridge": -1.0}, "ridge must be"),
        ("lstsq", {"ridge": float("nan")}, "ridge must be"),
        ("lstsq", {"ridge_mode": "weird"}, "ridge_mode must be"),
        ("lstsq", {"rcond": 1.0}, "rcond must be"),
        ("lstsq", {"rcond": -0.1}, "rcond must be"),
        ("procrustes", {"standardize": 1}, "standardize must be"),
        ("procrustes", {"standardize": "yes"}, "standardize must be"),
    ],
)
def test_bad_option_values_raise(name, opts, match):
    with pytest.raises(autoalign.OptionError, match=match):
        autoalign.get_aligner(name, **opts)
    with pytest.raises(ValueError, match=match):
        autoalign.aligners.registry.aligner_class(name)(**opts)


# --- exact recovery ---------------------------------------------------------------------------


def _mixed_copy(model: nn.Sequential, q: torch.Tensor) -> nn.Sequential:
    """``model`` with its (linear) hidden layer mixed by the invertible ``q``: the same function."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.copy_((q @ model[0].weight.double()).float())
        out[0].bias.copy_((q @ model[0].bias.double()).float())
        out[1].weight.copy_((model[1].weight.double() @ torch.linalg.inv(q)).float())
    return out


def _linear_net_and_data():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))  # identity activation: any invertible mixing is a symmetry
    g = torch.Generator().manual_seed(3)
    return a, [torch.randn(64, 16, generator=g) for _ in range(4)]


def _assert_same_function(a, merged, data, tol=1e-4):
    with torch.no_grad():
        for x in data:
            ya, ym = a(x), merged(x)
            assert float((ya - ym).abs().max()) <= tol * max(1.0, float(ya.abs().max()))


def test_lstsq_recovers_an_exact_linear_mixing():
    a, data = _linear_net_and_data()
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(8, 8, generator=g, dtype=D64) + 2 * _eye(8) for _ in range(2)]
    models = [a] + [_mixed_copy(a, q) for q in qs]
    res = autoalign.merge_with_report(models, data, aligner="lstsq")
    _assert_same_function(a, res.model, data)
    (pp,) = res.plan.points.values()
    assert pp.kind == "linear" and pp.projected is None and pp.note is None
    assert torch.equal(pp.merges[0], _eye(8)) and torch.equal(pp.unmerges[0], _eye(8))
    for q, m, u in zip(qs, pp.merges[1:], pp.unmerges[1:]):
        # model m's hidden features are q h, the reference's h: T_m = q⁻¹ maps them back, T_m⁻¹ = q
        assert _close(m, torch.linalg.inv(q), 1e-5)
        assert _close(u, q, 1e-5)
        assert _close(m @ u, _eye(8), 1e-10)
    assert pp.score == pytest.approx(1.0, abs=1e-5)
    # for an exact linear relation least squares and CCA (ridge 0) coincide
    cca = autoalign.merge_with_report(models, data, aligner="cca", ridge=0.0)
    (pc,) = cca.plan.points.values()
    for m, mc in zip(pp.merges, pc.merges):
        assert _close(m, mc, 1e-5)


def test_lstsq_equals_least_squares_on_the_samples():
    x, y = _related_features()
    cxx, cyy, cxy = _covs(x, y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = torch.linalg.lstsq(yc, xc).solution.T  # argmin ‖xc − yc Tᵀ‖
    assert _close(lstsq_transform(cyy, cxy), direct, 1e-8)
    # the ridge: relative to tr(C_yy)/d by default, absolute on request
    lam = 0.1 * float(torch.trace(cyy)) / 6
    ridge_direct = cxy @ torch.linalg.inv(cyy + lam * _eye(6))
    assert _close(lstsq_transform(cyy, cxy, ridge=0.1), ridge_direct, 1e-10)
    assert _close(lstsq_transform(cyy, cxy, ridge=lam, relative=False), ridge_direct, 1e-10)
    # the regression map shrinks: T C_yy Tᵀ ⪯ C_xx (CCA's would match C_xx)
    t = lstsq_transform(cyy, cxy)
    assert float(torch.linalg.eigvalsh(cxx - t @ cyy @ t.T).min()) >= -1e-10


def test_lstsq_is_cca_with_the_canonical_correlations_inserted():
    x, y = _related_features(seed=4)
    cxx, cyy, cxy = _covs(x, y)
    t_cca, _, rho = cca_transform(cxx, cyy, cxy, ridge=0.0)
    hx, hy = _sym_power(cxx, 0.5), _sym_power(cyy, 0.5)
    u, s, vt = torch.linalg.svd(torch.linalg.inv(hx) @ cxy @ torch.linalg.inv(hy))
    assert _close(s, rho, 1e-10) and _close(hx @ u @ vt @ torch.linalg.inv(hy), t_cca, 1e-8)
    t = lstsq_transform(cyy, cxy)
    assert _close(t, hx @ u @ torch.diag(rho) @ vt @ torch.linalg.inv(hy), 1e-8)
    assert _close(t_cca @ cyy @ t_cca.T, cxx, 1e-8) and not _close(t @ cyy @ t.T, cxx, 1e-2)


def _sym_power(c, p):
    ev, evec = torch.linalg.eigh(c)
    return (evec * ev.pow(p)) @ evec.T


def _orthogonal(d, g):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    return q * torch.sign(torch.diagonal(r))


def test_procrustes_recovers_an_exact_orthogonal_mixing():
    a, data = _linear_net_and_data()
    g = torch.Generator().manual_seed(2)
    qs = [_orthogonal(8, g) for _ in range(2)]
    models = [a] + [_mixed_copy(a, q) for q in qs]
    res = autoalign.merge_with_report(models, data, aligner="procrustes")
    _assert_same_function(a, res.model, data)
    (pp,) = res.plan.points.values()
    assert pp.kind == "orthogonal" and pp.projected is None
    for q, m, u in zip(qs, pp.merges[1:], pp.unmerges[1:]):
        assert _close(m, q.T, 1e-6) and _close(u, q, 1e-6)
    assert pp.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("standardize", [False, True])
def test_procrustes_recovers_an_exact_permutation(standardize):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(128, 6, generator=g) for _ in range(3)]
    spec = autoalign.find_merge_points(a, data[0][:2])
    models = [a, permute_model(a, spec, seed=1), permute_model(a, spec, seed=2)]
    res = autoalign.merge_with_report(models, data, aligner="procrustes", standardize=standardize, repair=None)
    _assert_same_function(a, res.model, data)
    perm = autoalign.merge_with_report(models, data, aligner="permutation", repair=None)
    assert len(res.plan.points) == 2
    for name, pp in res.plan.points.items():
        for m, p in zip(pp.merges, perm.plan.points[name].merges):
            # the recovered map is the permutation activation matching finds, to float32 rounding
            assert _close(m, p, 1e-6)
        # and the score is the mean matched correlation, as the permutation aligner reports it
        assert pp.score == pytest.approx(perm.plan.points[name].score, abs=1e-6)


# --- the large-ridge limit of CCA ---------------------------------------------------------------


def test_cca_tends_to_procrustes_as_the_ridge_grows():
    x, y = _related_features()
    cxx, cyy, cxy = _covs(x, y)
    q, rank = procrustes_transform(cxy)
    assert rank == 6 and _close(q.T @ q, _eye(6), 1e-12)
    scale = (torch.trace(cxx) / torch.trace(cyy)).sqrt()  # relative ridge: γ_x/γ_y = tr C_xx / tr C_yy
    errs = []
    for ridge in (1e2, 1e4, 1e6):
        t, t_inv, _ = cca_transform(cxx, cyy, cxy, ridge=ridge)
        errs.append(float((t / scale - q).norm()) / float(q.norm()))
        assert float((t_inv * scale - q.T).norm()) / float(q.norm()) <= 10 * errs[-1] + 1e-12
    # O(1/ridge): each factor 100 in the ridge divides the error by about 100
    assert errs[2] < 1e-5 and errs[1] < errs[0] / 30 and errs[2] < errs[1] / 30
    # with an absolute ridge γ_x = γ_y, so no scale is left
    t, _, _ = cca_transform(cxx, cyy, cxy, ridge=1e6 * float(torch.trace(cxx)), relative=False)
    assert float((t - q).norm()) / float(q.norm()) < 1e-5
    # at the default ridge the maps differ (the relation is a limit, not an identity)
    t, _, _ = cca_transform(cxx, cyy, cxy)
    assert float((t / scale - q).norm()) / float(q.norm()) > 0.05
    # standardised Procrustes is not the limit (the features' variances differ)
    d = torch.diagonal(cxx).rsqrt()[:, None] * cxy * torch.diagonal(cyy).rsqrt()[None, :]
    assert float((procrustes_transform(d)[0] - q).norm()) > 1e-3


def test_cca_aligner_with_a_huge_ridge_gives_the_procrustes_plan():
    x, y = _related_features(seed=1)
    stats = _point_stats([x, y, 0.5 * y + 0.1 * x])
    point, problem = SimpleNamespace(dim=6, name="p"), _problem(3)
    cca = CCAAligner(ridge=1e7).solve_point(point, stats, problem)
    pro = ProcrustesAligner().solve_point(point, stats, problem)
    for m in (1, 2):
        scale = (torch.trace(stats.cov(0)) / torch.trace(stats.cov(m))).sqrt()
        assert float((cca.merges[m] / scale - pro.merges[m]).norm()) < 1e-5
        assert float((cca.unmerges[m] * scale - pro.unmerges[m]).norm()) < 1e-5


# --- degenerate statistics ---------------------------------------------------------------------


def _degenerate_features(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=D64)
    xs = []
    for _ in range(3):
        x = z @ torch.randn(d, d, generator=g, dtype=D64) + 0.3 * torch.randn(n, d, generator=g, dtype=D64)
        x[:, 2] = 1.5  # a dead (constant) unit
        x[:, 5] = 0.0  # and another
        xs.append(x)
    return xs


@pytest.mark.parametrize("n", [5, 200])  # fewer samples than channels / dead units only
@pytest.mark.parametrize(
    "aligner",
    [LstsqAligner(), LstsqAligner(ridge=0.01), LstsqAligner(rcond=0.0), ProcrustesAligner(), ProcrustesAligner(standardize=True)],
    ids=repr,
)
def test_rank_deficient_features_give_finite_transforms(n, aligner):
    xs = _degenerate_features(n)
    point, problem = SimpleNamespace(dim=8, name="p"), _problem(3)
    pp = aligner.solve_point(point, _point_stats(xs), problem)
    for m, u in zip(pp.merges, pp.unmerges):
        assert bool(torch.isfinite(m).all()) and bool(torch.isfinite(u).all())
    assert pp.score is None or -1.0 <= pp.score <= 1.0 + 1e-9
    if isinstance(aligner, ProcrustesAligner):
        for m in pp.merges:
            assert _close(m.T @ m, _eye(8), 1e-10)
    # identical models still get the identity, dead units included (the solution nearest I)
    if not (isinstance(aligner, LstsqAligner) and aligner.ridge > 0):
        same = aligner.solve_point(point, _point_stats([xs[0]] * 3), problem)
        for m, u in zip(same.merges, same.unmerges):
            assert _close(m, _eye(8), 1e-6) and _close(u, _eye(8), 1e-6)


def test_lstsq_notes_an_ill_conditioned_map():
    x, y = _related_features(seed=2)
    x[:, 3] = 0.7  # a dead reference unit: nothing of y predicts it, so T has a zero row
    stats = _point_stats([x, y])
    pp = LstsqAligner().solve_point(SimpleNamespace(dim=6, name="p"), stats, _problem(2))
    assert "1 of 6 singular values" in pp.note and "pseudo-inverse" in pp.note
    m, u = pp.merges[1], pp.unmerges[1]
    assert float(m[3].abs().max()) < 1e-10
    p = m @ u  # a projector of rank 5 instead of I
    assert _close(p @ p, p, 1e-8) and round(float(torch.trace(p))) == 5
    t_inv, dropped = truncated_inverse(m, 1e-12)
    assert dropped == 1 and bool(torch.isfinite(t_inv).all())


def test_constant_reference_gives_identity():
    x, y = _related_features(seed=3)
    for al in (LstsqAligner(), ProcrustesAligner()):
        pp = al.solve_point(SimpleNamespace(dim=6, name="p"), _point_stats([torch.ones_like(x), y]), _problem(2))
        assert "constant" in pp.note and all(torch.equal(m, _eye(6)) for m in pp.merges)


# --- end to end ---------------------------------------------------------------------------------


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _cnn(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    autoalign.examples.zoo.break_symmetry(net, seed=seed)
    return net


@pytest.mark.parametrize("name", ["lstsq", "procrustes"])
def test_merge_end_to_end_mlp_and_cnn_with_batchnorm(name):
    g = torch.Generator().manual_seed(0)
    mlp_data = [torch.randn(64, 6, generator=g) for _ in range(3)]
    cnn_data = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
    merged = autoalign.merge([_mlp(s) for s in range(3)], mlp_data, aligner=name)
    assert all(bool(torch.isfinite(v).all()) for v in merged.state_dict().values())
    with torch.no_grad():
        assert merged(mlp_data[0]).shape == (64, 3)

    res = autoalign.merge_with_report([_cnn(s) for s in range(3)], cnn_data, aligner=name)
    assert res.report.folded_batchnorms > 0  # dense (non-permutation) maps engage BatchNorm folding
    kinds = {p.used for p in res.report.points}
    assert kinds == {"linear" if name == "lstsq" else "orthogonal"}
    assert all(bool(torch.isfinite(v).all()) for v in res.model.state_dict().values() if torch.is_floating_point(v))
    res.model.eval()
    with torch.no_grad():
        out = res.model(cnn_data[0])
    assert out.shape == (8, 3) and bool(torch.isfinite(out).all())


def test_merge_with_few_samples_stays_finite():
    models = [_mlp(s) for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer samples than features"
        for name in ("lstsq", "procrustes"):
            merged = autoalign.merge(models, [torch.randn(5, 6)], aligner=name)
            assert all(bool(torch.isfinite(v).all()) for v in merged.state_dict().values())


# --- docstrings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [LstsqAligner, ProcrustesAligner, lstsq_transform, procrustes_transform, truncated_inverse, lstsq_module.matched_correlation],
    ids=lambda o: o.__name__,
)
def test_docstring_examples_run(obj):
    assert "Examples\n    --------" in obj.__doc__
    tests = doctest.DocTestFinder(recurse=False).find(obj, obj.__name__, globs=dict(vars(sys.modules[obj.__module__])))
    assert sum(len(t.examples) for t in tests) > 0
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for t in tests:
        runner.run(t, out=report.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(report)


def test_module_docstrings_cite_the_papers():
    assert "Horoi" in lstsq_module.__doc__ and "Li et al. 2016" in lstsq_module.__doc__
    assert "Schönemann 1966" in procrustes_module.__doc__ and "Horoi" in procrustes_module.__doc__
