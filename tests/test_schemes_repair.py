"""``scheme="iterative"`` and ``repair="repair"`` (issue #4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoalign
from autoalign.errors import MergeError
from autoalign.repair import output_channel_stats, repair_sites
from autoalign.testing import permute_model


def mlp(seed: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 24, bias=bias), nn.ReLU(), nn.Linear(24, 24, bias=bias), nn.ReLU(), nn.Linear(24, 3)
    ).eval()


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def bnnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = BNNet()
    # non-trivial BatchNorm statistics and affines, as after training
    with torch.no_grad():
        for bn in (net.b1, net.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net.eval()


def measured(model: nn.Module, names: list[str], data: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return output_channel_stats([model], names, data)


# ---------------------------------------------------------------- repair


def test_repair_sites_skip_frozen_outputs_and_folded_producers() -> None:
    net = bnnet(0)
    spec = autoalign.find_merge_points(net, torch.randn(2, 3, 8, 8))
    producers, bns = repair_sites(net, spec)
    assert producers == ["fc1"]  # c1/c2 feed BatchNorms (repaired there); fc2's output is the model output
    assert bns == ["b1", "b2"]


@pytest.mark.parametrize("aligner", ["permutation", "cca", "identity"])
def test_repair_restores_the_targets_it_computed_without_batchnorm(aligner: str) -> None:
    torch.manual_seed(0)
    data = [torch.randn(256, 6)]  # one batch: the hooks' batch statistics are the data statistics
    models = [mlp(s) for s in range(3)]
    res = autoalign.merge_with_report(models, data, aligner=aligner, repair="repair")
    targets = res.repair_targets
    assert sorted(targets) == ["0", "2"]
    got = measured(res.model, sorted(targets), data)
    for name, (mt, st) in targets.items():
        mg, sg = got[name]
        torch.testing.assert_close(mg, mt, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sg, st, atol=1e-4, rtol=1e-4)
    assert res.report.repair == "repair" and res.report.repair_notes == {}


def test_repair_targets_are_the_aligned_models_average_statistics() -> None:
    torch.manual_seed(1)
    data = [torch.randn(128, 6)]
    base = mlp(0)
    spec = autoalign.find_merge_points(base, data[0][:2])
    twin = permute_model(base, spec, seed=3)
    res = autoalign.merge_with_report([base, twin], data, aligner="permutation", repair="repair")
    # the permuted twin aligns back exactly, so the targets are the base model's own statistics
    own = measured(base, ["0", "2"], data)
    for name in ("0", "2"):
        torch.testing.assert_close(res.repair_targets[name][0], own[name][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.repair_targets[name][1], own[name][1], atol=1e-5, rtol=1e-5)
    # and the merged model is the base model: REPAIR must not change it
    x = torch.randn(16, 6)
    torch.testing.assert_close(res.model(x), base(x), atol=1e-4, rtol=1e-4)


def test_repair_over_several_batches_is_close_to_the_targets() -> None:
    torch.manual_seed(2)
    data = [torch.randn(128, 6) for _ in range(4)]
    res = autoalign.merge_with_report([mlp(s) for s in range(4)], data, aligner="identity", repair="repair")
    got = measured(res.model, ["0", "2"], data)
    for name, (mt, st) in res.repair_targets.items():
        assert torch.allclose(got[name][0], mt, atol=0.05 * float(st.mean()))
        assert torch.allclose(got[name][1], st, rtol=0.05, atol=1e-3)


def test_repair_without_bias_matches_the_std_and_says_so() -> None:
    torch.manual_seed(3)
    data = [torch.randn(256, 6)]
    res = autoalign.merge_with_report([mlp(s, bias=False) for s in range(2)], data, aligner="identity", repair="repair")
    assert set(res.report.repair_notes) == {"0", "2"}
    assert all("no bias" in v for v in res.report.repair_notes.values())
    got = measured(res.model, ["0"], data)  # the first layer sees the raw input: its std is matched exactly
    torch.testing.assert_close(got["0"][1], res.repair_targets["0"][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("aligner", ["permutation", "cca"])
def test_repair_with_batchnorm_hits_the_targets(aligner: str) -> None:
    torch.manual_seed(4)
    data = [torch.randn(64, 3, 8, 8)]
    models = [bnnet(s) for s in range(3)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    res = autoalign.merge_with_report(models, data, aligner=aligner, repair="repair")
    assert sorted(res.repair_targets) == ["b1", "b2", "fc1"]
    got = measured(res.model, ["b1", "b2", "fc1"], data)
    for name, (mt, st) in res.repair_targets.items():
        torch.testing.assert_close(got[name][0], mt, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(got[name][1], st, atol=1e-3, rtol=1e-3)
    for m, sd in zip(models, before):  # inputs untouched
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values() if v.is_floating_point())


def test_repair_keeps_dead_channels_finite() -> None:
    torch.manual_seed(5)
    models = [mlp(s) for s in range(2)]
    for m in models:  # kill four units of the first layer in every model
        with torch.no_grad():
            m[0].weight[:4] = 0.0
            m[0].bias[:4] = -1.0
    res = autoalign.merge_with_report(models, [torch.randn(64, 6)], aligner="cca", repair="repair")
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


# ---------------------------------------------------------------- iterative scheme


@pytest.mark.parametrize("aligner", ["permutation", "cca", "ot"])
def test_iterative_on_permuted_copies_converges_at_once_to_the_model(aligner: str) -> None:
    torch.manual_seed(6)
    data = [torch.randn(128, 6) for _ in range(2)]
    base = mlp(0)
    spec = autoalign.find_merge_points(base, data[0][:2])
    models = [base] + [permute_model(base, spec, seed=s) for s in (1, 2)]
    res = autoalign.merge_with_report(models, data, aligner=aligner, scheme="iterative", repair=None)
    assert res.report.scheme == "iterative"
    assert res.report.iterations == 1 and res.report.plan_change is not None and res.report.plan_change < 1e-3
    x = torch.randn(8, 6)
    torch.testing.assert_close(res.model(x), base(x), atol=1e-4, rtol=1e-4)


def test_iterative_stops_at_a_fixed_point_or_the_round_limit() -> None:
    torch.manual_seed(7)
    data = [torch.randn(128, 6) for _ in range(2)]
    models = [mlp(s) for s in range(4)]
    res = autoalign.merge_with_report(models, data, aligner="permutation", scheme="iterative", max_iterations=6, repair=None)
    r = res.report
    assert 1 <= r.iterations <= 6
    assert r.iterations == 6 or r.plan_change <= 1e-3
    one = autoalign.merge_with_report(models, data, aligner="permutation", scheme="iterative", max_iterations=1, repair=None)
    assert one.report.iterations == 1
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())
    # the plan maps every model into the merged model's coordinates: N merge matrices per point
    assert all(len(pp.merges) == 4 for pp in res.plan.points.values())


def test_iterative_with_batchnorm_and_repair() -> None:
    torch.manual_seed(8)
    data = [torch.randn(32, 3, 8, 8) for _ in range(2)]
    res = autoalign.merge_with_report([bnnet(s) for s in range(3)], data, aligner="cca", scheme="iterative", max_iterations=3)
    assert res.report.repair == "reset_bn" and res.report.iterations >= 1
    assert torch.isfinite(res.model(data[0])).all()


@pytest.mark.parametrize("aligner", ["zipit", "mcca", "weight_matching", "identity"])
def test_iterative_needs_a_reference_aligner(aligner: str) -> None:
    with pytest.raises(MergeError, match="needs='reference'"):
        autoalign.merge([mlp(0), mlp(1)], [torch.randn(8, 6)], aligner=aligner, scheme="iterative")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"scheme": "tree"}, "scheme must be one of"), ({"scheme": "iterative", "max_iterations": 0}, "max_iterations"),
     ({"repair": "bn"}, "repair must be one of")],
)
def test_bad_scheme_and_repair_options(kwargs: dict, match: str) -> None:
    with pytest.raises(MergeError, match=match):
        autoalign.merge([mlp(0), mlp(1)], [torch.randn(8, 6)], aligner="permutation", **kwargs)


@pytest.mark.parametrize("aligner", ["cca", "permutation", "procrustes"])
def test_iterative_plans_are_in_the_reference_frame(aligner: str) -> None:
    torch.manual_seed(9)
    data = [torch.randn(128, 6) for _ in range(2)]
    res = autoalign.merge_with_report([mlp(s) for s in range(3)], data, aligner=aligner, scheme="iterative",
                                      max_iterations=2, reference=1, repair=None)
    for pp in res.plan.points.values():
        eye = torch.eye(pp.merges[1].shape[0], dtype=torch.float64)
        assert torch.equal(pp.merges[1], eye) and torch.equal(pp.unmerges[1], eye)
        for m in (0, 2):  # merge and unmerge stay inverse to each other
            torch.testing.assert_close(pp.unmerges[m] @ pp.merges[m], eye, atol=1e-6, rtol=1e-6)
        if aligner == "permutation":
            assert all(bool(((m == 0) | (m == 1)).all()) for m in pp.merges)


def test_repair_targets_come_from_the_statistics_pass():
    """The moments ``collect_stats(modules=...)`` takes of a site give the same REPAIR target as
    a pass of the models with the site's (dense or permutation) merge matrix applied per batch."""
    from autoalign.repair_sites import mapped_moments

    nets = [bnnet(s) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(3)]
    spec = autoalign.find_merge_points(nets[0], data[0])
    stats = autoalign.collect_stats(nets, data, spec, modules={"b1": "full", "b2": "diagonal", "fc1": "full"})
    assert sorted(stats.modules) == ["b1", "b2", "fc1"] and stats.modules["b2"].squares[0].shape == (8,)
    dense = [None, torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)]
    perm = [None, torch.eye(8, dtype=torch.float64)[torch.randperm(8, generator=g)], None]
    for name, maps in (("b1", dense), ("b2", perm), ("fc1", [None, None, torch.randn(16, 16, generator=g, dtype=torch.float64)])):
        want = output_channel_stats(nets, [name], data, weights=[1, 2, 3], maps=[{} if p is None else {name: p} for p in maps])[name]
        mean, std = mapped_moments(stats.modules[name], maps, [1, 2, 3])
        torch.testing.assert_close(mean, want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std, want[1], rtol=1e-5, atol=1e-6)
    assert mapped_moments(stats.modules["b2"], dense[:2] + [None], [1, 1, 1]) is None  # variances only: no dense map


@pytest.mark.parametrize("aligner", ["cca", "permutation", "zipit"])
@pytest.mark.parametrize("repair", ["auto", "repair"])
def test_default_merge_runs_each_input_model_once(aligner, repair):
    """Statistics and repair targets share one pass: every input model sees the calibration data
    once (the reference also runs two-sample examples for discovery)."""
    nets = [bnnet(s) for s in range(3)]
    data = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    seen: dict[int, int] = {}
    for net in nets:
        net.c1.register_forward_hook(lambda mod, i, o: seen.__setitem__(id(mod), seen.get(id(mod), 0) + o.shape[0]))
    autoalign.merge(nets, data, aligner=aligner, repair=repair)
    total = sum(len(x) for x in data)
    assert [seen.get(id(net.c1), 0) for net in nets[1:]] == [total, total]
    assert total <= seen[id(nets[0].c1)] <= total + 3 * 2
