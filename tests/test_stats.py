"""Feature statistics (``autoalign.collect_stats``) against a float64 oracle.

The pass takes its products chunk by chunk, in float32 for float32 models, on
features minus a per-model shift, through two layouts (conv maps copied
feature-major, ``(channels, samples·positions)``; rows of features otherwise).
The oracle
gathers every site's features in float64 the direct way and computes the
moments in one go.
"""

import sys

import pytest
import torch
from torch import nn

import autoalign
import autoalign.stats.moments as moments_mod
from autoalign.capture import feature_module
from autoalign.stats import sites_for


class Net(nn.Module):
    """Conv maps with more positions than channels (8 at 8x8), a residual stream (a point with
    several sites), a map with more channels than positions (32 at 2x2) whose features are
    mean-dominated (mean 50, spread ~0.05: float32 raw moments would cancel), and a Linear."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 32, 4, stride=4)
        self.fc = nn.Linear(32 * 4, 16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.down.weight.mul_(0.01)
            self.down.bias.fill_(50.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        h = h + torch.relu(self.c2(h))
        h = self.down(h)
        h = torch.relu(self.fc(h.flatten(1)))
        return self.head(h)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(20, 3, 8, 8, generator=g).to(dtype) for _ in range(3)]


def _oracle(models, data, spec, point):
    """Every site's features of ``point`` in float64, stacked: one (samples, d) matrix per model."""
    sites = sites_for(point)
    nodes = sorted({s.node for s in sites})
    feats = []
    for m in models:
        fm = feature_module(m, data[0], nodes)
        rows = []
        with torch.no_grad():
            for x in data:
                outs = dict(zip(nodes, fm(x)))
                for s in sites:
                    v = outs[s.node].double().movedim(s.axis, -1)
                    if s.kind == "projected":  # attention values: the projection's outputs, then the index
                        sd = m.state_dict()
                        v = nn.functional.linear(v, sd[s.weight].double(), sd[s.bias].double() if s.bias else None)
                    rows.append(v[..., torch.as_tensor(s.index).reshape(-1)].reshape(-1, point.dim))
        feats.append(torch.cat(rows))
    return feats


def _check(stats, models, data, spec, rtol):
    checked = 0
    for name, ps in stats.points.items():
        xs = _oracle(models, data, spec, spec.point(name))
        assert ps.n == xs[0].shape[0], name
        for i, x in enumerate(xs):
            mu = x.mean(0)
            torch.testing.assert_close(ps.mean(i), mu, rtol=rtol, atol=rtol * float(mu.abs().max()), msg=name)
            var = ((x - mu) ** 2).mean(0)
            torch.testing.assert_close(ps.var(i), var, rtol=rtol, atol=rtol * float(var.max()), msg=f"{name} var({i})")
            diagonal = ps.squares[i].dim() == 1  # self_moments="diagonal": variances only
            for j, y in enumerate(xs):
                if (i == j and diagonal) or (i != j and (i, j) not in ps.cross and (j, i) not in ps.cross):
                    continue
                want = (x - mu).T @ (y - y.mean(0)) / x.shape[0]
                got = ps.cov(i, j)
                scale = float(want.abs().max())
                torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=f"{name} cov({i}, {j})")
                checked += 1
    return checked


@pytest.mark.parametrize("needs,reference", [("reference", 0), ("reference", 2), ("all_pairs", 0), ("all_pairs", 1), ("self", 1)])
def test_float32_products_match_float64_oracle(needs, reference):
    """Models are fed one at a time, the reference first; a later model's chunk shares a buffer
    with an earlier one's (one product gives its square and a cross block), other pairs are
    separate products: every way round must give the oracle's blocks."""
    models = [Net(s) for s in range(3)]
    data = _data()
    spec = autoalign.find_merge_points(models[0], data[0])
    st = autoalign.collect_stats(models, data, spec, needs=needs, reference=reference)
    assert st.pairs == autoalign.stats.pairs_for(needs, 3, reference)
    assert all(set(ps.cross) == set(st.pairs) for ps in st.points.values())
    kinds = {name: spec.point(name) for name in st.points}
    assert len(kinds) >= 3  # c1 / residual stream, down, fc
    assert _check(st, models, data, spec, rtol=2e-5) >= 3 * len(kinds)


def test_mean_dominated_features_need_the_shift():
    """The ``down`` point's features have mean 50 and spread ~0.05: float32 products of the raw
    features would give covariances off by far more than the 2e-5 the shifted ones reach."""
    models = [Net(s) for s in range(2)]
    data = _data()
    spec = autoalign.find_merge_points(models[0], data[0])
    st = autoalign.collect_stats(models, data, spec, points=["down"])
    (x, y) = _oracle(models, data, spec, spec.point("down"))
    assert float(x.mean()) > 40 and float(x.std(0).max()) < 0.5
    want = (x - x.mean(0)).T @ (x - x.mean(0)) / x.shape[0]
    got = st["down"].cov(0)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())
    # what an unshifted float32 product gives (a floor on the error the shift avoids)
    x32 = x.float()
    raw = (x32.T @ x32).double() / x.shape[0] - torch.outer(x.mean(0), x.mean(0))
    assert float((raw - want).abs().max()) > 100 * float((got - want).abs().max())


@pytest.mark.parametrize("needs", ["reference", "all_pairs"])
def test_chunking_does_not_change_the_moments(monkeypatch, needs):
    models = [Net(s) for s in range(3)]
    data = _data()
    spec = autoalign.find_merge_points(models[0], data[0])
    whole = autoalign.collect_stats(models, data, spec, needs=needs, reference=1)
    monkeypatch.setattr(moments_mod, "CHUNK", 300)  # a few samples per chunk, the last one short
    chunked = autoalign.collect_stats(models, data, spec, needs=needs, reference=1)
    for name, ps in whole.points.items():
        assert chunked[name].n == ps.n
        for i, j in ps.cross:
            want = ps.cov(i, j)
            torch.testing.assert_close(chunked[name].cov(i, j), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert _check(chunked, models, data, spec, rtol=2e-5) > 0


def test_uneven_batches_match_the_oracle(monkeypatch):
    """Batches of 20, 7 and 13 samples with tiny chunks: kept buffers of different shapes per
    batch, the moments still match the oracle."""
    models = [Net(s) for s in range(3)]
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(b, 3, 8, 8, generator=g) for b in (20, 7, 13)]
    spec = autoalign.find_merge_points(models[0], data[0])
    monkeypatch.setattr(moments_mod, "CHUNK", 300)
    for needs in ("reference", "all_pairs"):
        st = autoalign.collect_stats(models, data, spec, needs=needs, reference=2)
        assert _check(st, models, data, spec, rtol=2e-5) > 0


def test_float64_models_and_precision_float64_are_exact():
    # 1e-8, not 1e-12: the moments are returned raw, and cov = Q/n − μμᵀ of the mean-dominated
    # `down` features ((mean / spread)² ~ 1e6) cancels that much even in float64
    models64 = [Net(s).double() for s in range(2)]
    data64 = _data(torch.float64)
    spec = autoalign.find_merge_points(models64[0], data64[0])
    assert _check(autoalign.collect_stats(models64, data64, spec), models64, data64, spec, rtol=1e-8) > 0
    models32 = [Net(s) for s in range(2)]
    data32 = _data()
    forced = autoalign.collect_stats(models32, data32, spec, precision="float64")
    assert _check(forced, models32, data32, spec, rtol=1e-8) > 0


def test_bad_precision_is_an_option_error():
    models = [Net(s) for s in range(2)]
    data = _data()
    spec = autoalign.find_merge_points(models[0], data[0])
    with pytest.raises(autoalign.OptionError, match="precision"):
        autoalign.collect_stats(models, data, spec, precision="float16")


def test_attention_projected_sites_match_the_oracle():
    """Attention value heads are observed through the in-projection ("projected" sites) and
    then indexed per head: both steps must happen before the products."""
    class Attention(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.embed = nn.Linear(16, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            x = self.embed(x)
            return self.fc(torch.relu(x + self.attn(x, x, x, need_weights=False)[0]))

    models = [Attention(s) for s in range(2)]
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(6, 5, 16, generator=g) for _ in range(2)]
    spec = autoalign.find_merge_points(models[0], data[0])
    st = autoalign.collect_stats(models, data, spec)
    projected = [name for name in st.points if any(s.kind == "projected" for s in sites_for(spec.point(name)))]
    assert projected  # the value heads
    assert _check(st, models, data, spec, rtol=2e-5) >= 3 * len(st.points)


@pytest.mark.parametrize("needs,reference,kept", [("reference", 2, {2}), ("self", 0, set()), ("all_pairs", 1, {1, 0, 2})])
def test_only_features_a_later_model_pairs_with_are_kept(monkeypatch, needs, reference, kept):
    """Feature memory must not grow with N for all-to-one aligners: models run one at a time, the
    reference first, and only the reference's chunks outlive its own forward pass."""
    calls = []
    original = moments_mod.Moments.add_model

    def spy(self, m, x, channels_first, **kw):
        calls.append((m, kw["keep"], kw["count"]))
        return original(self, m, x, channels_first, **kw)

    monkeypatch.setattr(moments_mod.Moments, "add_model", spy)
    models = [Net(s) for s in range(4)]
    data = _data()
    spec = autoalign.find_merge_points(models[0], data[0])
    st = autoalign.collect_stats(models, data, spec, needs=needs, reference=reference)
    assert {m for m, keep, _ in calls if keep} == (kept - {3})  # the last model fed is never kept
    assert {m for m, _, count in calls if count} == {reference}  # samples counted once, by the first model fed
    assert calls[0][0] == reference
    assert st.n_models == 4


# --------------------------------------------------------------------------- self_moments="diagonal"


@pytest.mark.parametrize("needs,reference", [("reference", 0), ("reference", 2), ("all_pairs", 1)])
@pytest.mark.parametrize("chunk", [None, 300])
def test_diagonal_self_moments_match_the_oracle(monkeypatch, needs, reference, chunk):
    """With ``self_moments="diagonal"`` every cross block is still taken (no shared buffer with a
    square any more), each model keeps only its variances; uneven batches and tiny chunks too."""
    if chunk is not None:
        monkeypatch.setattr(moments_mod, "CHUNK", chunk)
    models = [Net(s) for s in range(3)]
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(b, 3, 8, 8, generator=g) for b in (20, 7, 13)]
    spec = autoalign.find_merge_points(models[0], data[0])
    diag = autoalign.collect_stats(models, data, spec, needs=needs, reference=reference, self_moments="diagonal")
    assert diag.pairs == autoalign.stats.pairs_for(needs, 3, reference)
    assert all(set(ps.cross) == set(diag.pairs) for ps in diag.points.values())
    assert diag.n_blocks() == len(diag.points) * len(diag.pairs)  # no (d, d) squares
    assert all(q.shape == (ps.dim,) for ps in diag.points.values() for q in ps.squares)
    assert _check(diag, models, data, spec, rtol=2e-5) >= 2 * len(diag.points) * len(diag.pairs)  # (i, j) and (j, i)
    full = autoalign.collect_stats(models, data, spec, needs=needs, reference=reference)
    for name, ps in diag.points.items():
        for i in sorted(set(range(3)) - {reference}):
            torch.testing.assert_close(ps.corr(reference, i), full[name].corr(reference, i), rtol=1e-4, atol=1e-5)


def test_diagonal_self_moments_refuse_a_covariance():
    models = [Net(s) for s in range(2)]
    data = _data()
    spec = autoalign.find_merge_points(models[0], data[0])
    st = autoalign.collect_stats(models, data, spec, self_moments="diagonal")
    ps = next(iter(st.points.values()))
    with pytest.raises(KeyError, match="only the variances of model 1.*self_moments='full'"):
        ps.cov(1)
    with pytest.raises(autoalign.OptionError, match="self_moments"):
        autoalign.collect_stats(models, data, spec, self_moments="variances")


def test_recentred_diagonal_moments_equal_the_full_ones():
    """The distributed all-reduce re-centres moments on the global means first: the diagonal
    formula must agree with the diagonal of the full one."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 3, 6, generator=g, dtype=torch.float64) * 2 + 5  # two models, conv-like (samples, d, positions)
    moms = {}
    for diagonal in (False, True):
        mom = moments_mod.Moments(2, 3, [(0, 1)], torch.device("cpu"), diagonal)
        chunks = mom.add_model(0, x[0], True, count=True, keep=True)[1]
        mom.add_model(1, x[1], True, partners={0: chunks})
        mom.recentre([torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)])
        moms[diagonal] = mom.point_stats()
    for m in range(2):
        torch.testing.assert_close(moms[True].squares[m], torch.diagonal(moms[False].squares[m]), rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(moms[True].var(m), moms[False].var(m), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(moms[True].cov(0, 1), moms[False].cov(0, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("aligner", ["permutation", "ot"])
def test_merge_collects_only_variances_for_correlation_aligners(aligner):
    """permutation and ot declare ``self_moments="diagonal"``: merge() collects no (d, d)
    self-covariance for them, and their plans are as good as the plans solved on full statistics
    (the same objective: ``fc`` has dead features, which tie, so the permutations may differ)."""
    if aligner == "ot":
        pytest.importorskip("ot")
    models = [Net(s) for s in range(3)]
    data = _data()
    al = autoalign.get_aligner(aligner)
    assert al.self_moments == "diagonal" and autoalign.get_aligner("cca").self_moments == "full"
    res = autoalign.merge_with_report(models, data, aligner=aligner, repair=None)
    assert all(q.dim() == 1 for ps in res.stats.points.values() for q in ps.squares)
    full = autoalign.collect_stats(models, data, res.spec, needs=al.needs, reference=0)
    sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    plan = al.solve(autoalign.AlignProblem(res.spec, sds, 0, w, full))
    assert set(plan.points) == set(res.plan.points)
    from autoalign.aligners.ot import activation_cost

    for name, pp in plan.points.items():
        for m, (a, b) in enumerate(zip(pp.merges, res.plan.points[name].merges)):
            assert a.shape == b.shape and bool(((b == 0) | (b == 1)).all()), name
            if m == 0:  # the reference
                continue
            # the objective each aligner optimises, on the full statistics
            c = activation_cost(full[name], 0, m) if aligner == "ot" else -full[name].corr(0, m)
            assert float((a * c).sum()) == pytest.approx(float((b * c).sum()), rel=1e-9, abs=1e-9), (name, m)


# --------------------------------------------------------------------------- merge(precision=...)


@pytest.mark.parametrize("scheme", ["all_to_one", "iterative", "hierarchical"])
def test_merge_passes_precision_to_every_statistics_pass(monkeypatch, scheme):
    stages_mod = sys.modules["autoalign.stages"]
    seen = []
    original = stages_mod.collect_stats

    def spy(*args, **kw):
        seen.append(kw.get("precision"))
        return original(*args, **kw)

    monkeypatch.setattr(stages_mod, "collect_stats", spy)
    models = [Net(s) for s in range(3)]
    data = _data()
    res = autoalign.merge_with_report(models, data, aligner="cca", scheme=scheme, repair=None, precision="float64", max_iterations=2)
    # all_to_one: one pass; iterative: one more per round; hierarchical: one per pair
    assert len(seen) >= (1 if scheme == "all_to_one" else 2) and set(seen) == {"float64"}
    if scheme == "all_to_one":
        want = original(models, data, res.spec, precision="float64")
        plain = original(models, data, res.spec)
        for name, ps in want.points.items():
            assert torch.equal(res.stats[name].cross[(0, 1)], ps.cross[(0, 1)])  # the same pass, bit for bit
        assert any(not torch.equal(plain[n].cross[(0, 1)], want[n].cross[(0, 1)]) for n in want.points)


def test_merge_rejects_a_bad_precision_before_any_work():
    models = [Net(s) for s in range(2)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    with pytest.raises(autoalign.OptionError, match="precision must be None, 'float32' or 'float64', not 'half'"):
        autoalign.merge(models, _data(), precision="half")
    for m, sd in zip(models, before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
