"""Invariants of autoalign.merge and the built-in aligners (DESIGN.md, "Invariants")."""

import copy

import pytest
import torch
from torch import nn

import autoalign
from autoalign.testing import check_aligner, max_output_diff, permute_model
from autoalign.examples.zoo import torchvision_example


def _mlp(seed: int, d_in: int = 6, hidden: int = 12, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _data(n: int = 3, d_in: int = 6, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d_in, generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", autoalign.list_aligners())
def test_conformance_every_registered_aligner(name):
    check_aligner(name)


def test_conformance_catches_a_broken_aligner():
    class Broken(autoalign.PointwiseAligner):
        name = "broken-test"
        needs = "none"

        def solve_point(self, point, stats, problem):
            g = torch.Generator().manual_seed(0)
            m = torch.eye(point.dim, dtype=torch.float64) + torch.rand(point.dim, point.dim, generator=g, dtype=torch.float64)
            eye = torch.eye(point.dim, dtype=torch.float64)
            return autoalign.PointPlan([m] * problem.n_models, [eye] * problem.n_models, "linear")

    with pytest.raises(AssertionError, match="differs from A"):
        check_aligner(Broken)


def test_identity_is_plain_state_dict_average():
    models = [_mlp(s) for s in range(3)]
    merged = autoalign.merge(models, _data(), aligner="identity")
    for k, v in merged.state_dict().items():
        expect = sum(m.state_dict()[k] for m in models) / 3
        torch.testing.assert_close(v, expect)


def test_identity_with_batchnorm_does_not_fold():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)]
    for m in models:
        autoalign.examples.zoo.break_symmetry(m)
    merged = autoalign.merge(models, _data(d_in=4), aligner="identity", repair=None)
    for k, v in merged.state_dict().items():
        if torch.is_floating_point(v):
            torch.testing.assert_close(v, (models[0].state_dict()[k] + models[1].state_dict()[k]) / 2)


def test_weights_are_respected():
    models = [_mlp(s) for s in range(2)]
    merged = autoalign.merge(models, _data(), aligner="identity", weights=[3, 1])
    k = "0.weight"
    torch.testing.assert_close(merged.state_dict()[k], 0.75 * models[0].state_dict()[k] + 0.25 * models[1].state_dict()[k])


def test_inputs_untouched_and_result_class_and_keys():
    models = [_mlp(s) for s in range(3)]
    for m in models:
        m.train()
    before = [copy.deepcopy(m.state_dict()) for m in models]
    merged = autoalign.merge(models, _data(), aligner="cca")
    for m, sd in zip(models, before):
        assert m.training
        for k in sd:
            assert torch.equal(sd[k], m.state_dict()[k])
    assert type(merged) is type(models[0])
    assert list(merged.state_dict()) == list(models[0].state_dict())
    assert merged is not models[0]


def test_cca_recovers_exact_invertible_mixing_without_nonlinearity():
    # float64 models: their statistics are float64 products too (float32 models get float32
    # products, ~1e-7 relative, which cond(cov) ~1e5 here would amplify past the 1e-4 below)
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).double()
    q = torch.randn(8, 8, dtype=torch.float64) + 3 * torch.eye(8, dtype=torch.float64)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight.copy_(q @ a[0].weight)
        b[0].bias.copy_(q @ a[0].bias)
        b[1].weight.copy_(a[1].weight @ torch.linalg.inv(q))
    data = [t.double() for t in _data(n=4, d_in=16, batch=256)]
    x = data[0]
    torch.testing.assert_close(b(x), a(x), atol=1e-4, rtol=1e-4)  # same function, different hidden basis
    res = autoalign.merge_with_report([a, b], data, aligner="cca", ridge=0.0)
    merged = res.model
    diff, scale = max_output_diff(a(x), merged(x))
    assert diff <= 1e-4 * max(1.0, scale)
    # the transform found for model 1 undoes the mixing
    t = res.plan.points["0"].merges[1]
    torch.testing.assert_close(t, torch.linalg.inv(q), atol=1e-5, rtol=1e-4)
    # and the plain average (no alignment) does not compute a's function
    avg = autoalign.merge([a, b], data, aligner="identity")
    assert max_output_diff(a(x), avg(x))[0] > 1e-2


def test_cca_canonical_correlations_reported():
    models = [_mlp(s) for s in range(2)]
    rep = autoalign.merge_with_report(models, _data(), aligner="cca").report
    scores = [p.score for p in rep.points]
    assert all(s is not None and 0.0 <= s <= 1.0 + 1e-9 for s in scores)
    assert set(rep.timings) == {"discover", "statistics", "solve", "apply", "repair"}


def test_permutation_merge_of_permuted_mlp_is_exact():
    a = _mlp(0)
    spec = autoalign.find_merge_points(a, _data()[0])
    b = permute_model(a, spec, seed=5)
    data = _data()
    merged = autoalign.merge([a, b], data, aligner="permutation")
    assert max_output_diff(a(data[0]), merged(data[0]))[0] < 1e-5


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "vgg11_bn",
        "densenet121",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "shufflenet_v2_x0_5",
        "convnext_tiny",
        "vit_b_16",
    ],
)
def test_permutation_recovers_permuted_torchvision_model(name):
    a, x = torchvision_example(name, batch_size=8)
    if name == "vgg11_bn":
        # the 4096-wide classifier needs more samples than 8 images give to tell its features apart;
        # 32x32 inputs keep that cheap. With 256 samples for 4096 features many classifier
        # features are active on one sample only, so they are exactly proportional to each
        # other and only float64 statistics (float64 models) tell them apart from their partner
        x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        a = a.double()
    if name == "mobilenet_v3_small":
        # its squeeze-excitation points see one sample per image, 8 in all: several channels tie
        # with their partner to within 1e-5 in correlation, told apart only in float64
        a, x = a.double(), x.double()
    spec = autoalign.find_merge_points(a, x[:2])
    b = permute_model(a, spec, seed=1)
    data = [x]
    merged = autoalign.merge([a, b], data, aligner="permutation", spec=spec, repair=None)
    with torch.no_grad():
        ref, out = a(x), merged(x)
    diff, scale = max_output_diff(ref, out)
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)


def test_projection_onto_permutation_is_recorded():
    torch.manual_seed(0)
    models = []
    for s in range(2):
        torch.manual_seed(s)
        models.append(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)))
    rep = autoalign.merge_with_report(models, _data(), aligner="cca").report
    (p,) = [p for p in rep.points if p.name == "0"]
    assert p.allowed == "permutation" and p.used == "permutation" and p.projected == "permutation"


def test_reset_bn_repair_is_default_with_batchnorm():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)]
    rep = autoalign.merge_with_report(models, _data(), aligner="cca")
    assert rep.report.repair == "reset_bn"
    bn = rep.model[1]
    assert int(bn.num_batches_tracked) == 3
    h = rep.model[0](torch.cat(_data()))
    torch.testing.assert_close(bn.running_mean, h.mean(0), atol=1e-4, rtol=1e-4)
    none = autoalign.merge_with_report(models, _data(), aligner="cca", repair=None)
    assert none.report.repair is None


def test_reference_best_picks_lowest_loss():
    good = _mlp(0)
    bad = _mlp(1)
    with torch.no_grad():
        bad[-1].weight.mul_(50)
    x = torch.randn(64, 6)
    y = good(x).argmax(1)
    data = [(x, y)]
    rep = autoalign.merge_with_report([bad, good], data, aligner="cca", reference="best").report
    assert rep.reference == 1


def test_batches_as_tuples_and_dicts_and_input_fn():
    models = [_mlp(s) for s in range(2)]
    xs = _data()
    a = autoalign.merge(models, [(x, torch.zeros(len(x))) for x in xs], aligner="cca")
    b = autoalign.merge(models, [{"input": x} for x in xs], aligner="cca")
    c = autoalign.merge(models, [{"feats": x} for x in xs], aligner="cca", input_fn=lambda d: d["feats"])
    for m in (b, c):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(v, m.state_dict()[k])


def test_num_batches_limits_the_pass():
    models = [_mlp(s) for s in range(2)]
    res = autoalign.merge_with_report(models, _data(n=5), aligner="cca", num_batches=2)
    assert res.stats.batches == 2


def test_statistics_memory_is_linear_in_models_for_all_to_one():
    for n in (2, 4, 6):
        models = [_mlp(s) for s in range(n)]
        spec = autoalign.find_merge_points(models[0], _data()[0])
        ref = autoalign.collect_stats(models, _data(), spec, needs="reference")
        pairs = autoalign.collect_stats(models, _data(), spec, needs="all_pairs")
        active = len([p for p in spec.points if p.kind != "frozen"])
        # per point: n covariance blocks + (n - 1) cross blocks for all-to-one
        assert ref.n_blocks() == active * (2 * n - 1)
        assert pairs.n_blocks() == active * (n + n * (n - 1) // 2)


def test_stats_match_direct_computation():
    models = [_mlp(s) for s in range(2)]
    data = _data()
    spec = autoalign.find_merge_points(models[0], data[0])
    st = autoalign.collect_stats(models, data, spec, needs="reference")
    x = torch.cat(data)
    h0 = torch.relu(models[0][0](x)).double()
    h1 = torch.relu(models[1][0](x)).double()
    ps = st["0"]
    torch.testing.assert_close(ps.mean(0), h0.mean(0))
    torch.testing.assert_close(ps.cov(0), torch.cov(h0.T, correction=0))
    c01 = (h0 - h0.mean(0)).T @ (h1 - h1.mean(0)) / len(x)
    torch.testing.assert_close(ps.cov(0, 1), c01)


def test_unknown_aligner_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'cca'"):
        autoalign.get_aligner("cka")


def test_unknown_aligner_option_is_an_error():
    with pytest.raises(TypeError, match="rigde"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), aligner="cca", rigde=0.1)


def test_register_aligner_duplicate_and_replace():
    class Mine(autoalign.aligners.IdentityAligner):
        name = "mine-test"

    autoalign.register_aligner(Mine)
    try:
        assert "mine-test" in autoalign.list_aligners()
        assert autoalign.list_aligners("mine-*") == ["mine-test"]

        class Other(autoalign.aligners.IdentityAligner):
            name = "mine-test"

        with pytest.raises(ValueError, match="already registered"):
            autoalign.register_aligner(Other)
        autoalign.register_aligner(Other, replace=True)
        assert isinstance(autoalign.get_aligner("mine-test"), Other)
    finally:
        from autoalign.aligners import registry

        registry.unregister_aligner("mine-test")


def test_bad_inputs_are_named():
    with pytest.raises(autoalign.MergeError, match="at least one model"):
        autoalign.merge([], _data())
    with pytest.raises(autoalign.MergeError, match=r"parameter '0.weight' has shape"):
        autoalign.merge([_mlp(0), _mlp(1, hidden=10)], _data())
    with pytest.raises(autoalign.MergeError, match="weights has 3 entries"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), weights=[1, 1, 1])
    with pytest.raises(autoalign.MergeError, match="re-iterable"):
        autoalign.merge([_mlp(0), _mlp(1)], iter(_data()))
    with pytest.raises(autoalign.MergeError, match="no batch"):
        autoalign.merge([_mlp(0), _mlp(1)], [])
    with pytest.raises(autoalign.MergeError, match="reference"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), reference=5)


def test_single_model_returns_a_copy_with_warning():
    a = _mlp(0)
    with pytest.warns(UserWarning, match="single model"):
        m = autoalign.merge([a], _data())
    assert m is not a
    for k, v in a.state_dict().items():
        assert torch.equal(v, m.state_dict()[k])


class _OpaqueAct(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def test_merge_takes_channel_rules_for_one_call():
    from autoalign.graph.registry import registered_rules
    from autoalign.graph.rules import pointwise

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), _OpaqueAct(), torch.nn.Linear(8, 3))

    data = [torch.randn(16, 4) for _ in range(3)]
    before = registered_rules()
    plain = autoalign.merge_with_report([net(0), net(1)], data, aligner="permutation", leaf_modules=[_OpaqueAct])
    ruled = autoalign.merge_with_report(
        [net(0), net(1)], data, aligner="permutation", leaf_modules=[_OpaqueAct], rules={_OpaqueAct: pointwise}
    )
    kinds = lambda res: {p.name: p.kind for p in res.spec.points}  # noqa: E731
    assert kinds(plain)["0"] == "frozen"  # an opaque module without a rule freezes the features it reads
    assert kinds(ruled)["0"] == "linear"  # with the pointwise rule, the hidden layer is a merge point
    assert [p.name for p in ruled.report.points] == ["0"] and not plain.report.points
    assert registered_rules() == before


def test_a_device_without_index_means_the_current_one(monkeypatch):
    """``merge(device="cuda")`` must not copy models already on ``cuda:0`` (the current device):
    ``torch.device("cuda") != torch.device("cuda:0")``, so the index is resolved first."""
    from autoalign.merge import resolved_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolved_device("cuda") == torch.device("cuda:0") == resolved_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolved_device("cuda") == torch.device("cuda:1") != resolved_device("cuda:0")
    assert resolved_device("cpu") == torch.device("cpu")
