"""Fisher-weighted and learned averaging, and the hierarchical scheme (issue #8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoalign
from autoalign.apply import average_state_dicts
from autoalign.averaging import fisher_average, fisher_diagonals, learn_coefficients
from autoalign.errors import MergeError


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def labelled(seed: int = 0, batches: int = 2, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(size, 5, generator=g)
        out.append((x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()))
    return out


def sd_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol)


# ---------------------------------------------------------------- learned coefficients


@pytest.mark.parametrize("granularity", ["layer", "element"])
def test_learned_with_zero_learning_rate_is_uniform_averaging(granularity: str) -> None:
    models, data = [mlp(s) for s in range(3)], labelled()
    uniform = autoalign.merge(models, data, aligner="permutation", repair=None)
    learned = autoalign.merge(
        models, data, aligner="permutation", repair=None, averaging="learned",
        averaging_options={"lr": 0.0, "granularity": granularity},
    )
    sd_close(learned.state_dict(), uniform.state_dict())


def calibration_loss(model: nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


@pytest.mark.parametrize("granularity", ["layer", "element"])
def test_learned_coefficients_lower_the_calibration_loss_and_stay_convex(granularity: str) -> None:
    models, data = [mlp(s) for s in range(3)], labelled(batches=1, size=256)
    res_u = autoalign.merge_with_report(models, data, aligner="identity", repair=None)
    res_l = autoalign.merge_with_report(
        models, data, aligner="identity", repair=None, averaging="learned",
        averaging_options={"lr": 0.1, "epochs": 30, "granularity": granularity},
    )
    assert calibration_loss(res_l.model, data) < calibration_loss(res_u.model, data)
    losses = res_l.report.averaging_info["losses"]
    assert len(losses) == 30 and losses[-1] < losses[0]
    # coefficients are a softmax over models: every element lies between the models' values
    for k, v in res_l.model.state_dict().items():
        stack = torch.stack([m.state_dict()[k] for m in models])
        assert bool((v >= stack.min(0).values - 1e-6).all() and (v <= stack.max(0).values + 1e-6).all()), k


def test_learned_distils_to_the_ensemble_without_labels() -> None:
    models = [mlp(s) for s in range(2)]
    data = [x for x, _ in labelled(batches=1, size=128)]  # plain tensors: no labels
    res = autoalign.merge_with_report(
        models, data, aligner="permutation", repair=None, averaging="learned", averaging_options={"epochs": 20, "lr": 0.1},
    )
    losses = res.report.averaging_info["losses"]
    assert losses[-1] < losses[0]
    with pytest.raises(MergeError, match="objective='labels'"):
        autoalign.merge(models, data, aligner="permutation", averaging="learned", averaging_options={"objective": "labels"})


def test_learn_coefficients_rejects_bad_options() -> None:
    nets = [mlp(0), mlp(1)]
    sds = [n.state_dict() for n in nets]
    with pytest.raises(MergeError, match="granularity"):
        learn_coefficients(nets[0], sds, [0.5, 0.5], labelled(), granularity="neuron")
    with pytest.raises(MergeError, match="unknown averaging_options"):
        autoalign.merge(nets, labelled(), aligner="identity", averaging="learned", averaging_options={"steps": 3})
    with pytest.raises(MergeError, match="averaging must be one of"):
        autoalign.merge(nets, labelled(), aligner="identity", averaging="median")


# ---------------------------------------------------------------- Fisher


def test_fisher_diagonal_matches_a_per_sample_loop() -> None:
    net, (x, y) = mlp(0), labelled(batches=1, size=10)[0]
    f = fisher_diagonals([net], [(x, y)], labels="data", chunk=4)[0]
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in net.named_parameters()}
    for i in range(len(x)):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in net.named_parameters():
            ref[n] += p.grad.double() ** 2
    for n in ref:
        torch.testing.assert_close(f[n], ref[n] / len(x), atol=1e-9, rtol=1e-5)


def test_fisher_with_equal_fishers_is_plain_averaging() -> None:
    sds = [mlp(s).state_dict() for s in range(3)]
    keys = {k: k for k in sds[0]}
    same = {k: torch.rand(v.shape, dtype=torch.float64) for k, v in sds[0].items()}
    w = [0.2, 0.3, 0.5]
    sd_close(fisher_average(sds, [same] * 3, keys, w), average_state_dicts(sds, w))


def test_fisher_merge_of_identical_models_is_the_model_and_is_deterministic() -> None:
    base = mlp(0)
    data = labelled()
    res = autoalign.merge_with_report([base, mlp(0)], data, aligner="permutation", averaging="fisher", repair=None)
    sd_close(res.model.state_dict(), base.state_dict())
    again = autoalign.merge([mlp(0), mlp(1)], data, aligner="cca", averaging="fisher", repair=None)
    twice = autoalign.merge([mlp(0), mlp(1)], data, aligner="cca", averaging="fisher", repair=None)
    for k, v in again.state_dict().items():
        assert torch.equal(v, twice.state_dict()[k])


def test_fisher_weighting_follows_the_more_certain_model() -> None:
    sds = [{"w": torch.zeros(3)}, {"w": torch.ones(3)}]
    fs = [{"w": torch.tensor([100.0, 1.0, 0.0])}, {"w": torch.tensor([1.0, 100.0, 0.0])}]
    out = fisher_average(sds, fs, {"w": "w"}, [0.5, 0.5])["w"]
    assert out[0] < 0.05 and out[1] > 0.95 and abs(float(out[2]) - 0.5) < 1e-6  # no information: plain mean


# ---------------------------------------------------------------- hierarchical scheme


@pytest.mark.parametrize("aligner", ["cca", "permutation", "zipit", "weight_matching"])
@pytest.mark.parametrize("reference", [0, 1])
def test_hierarchical_with_two_models_equals_all_to_one(aligner: str, reference: int) -> None:
    models, data = [mlp(0), mlp(1)], labelled()
    a = autoalign.merge(models, data, aligner=aligner, reference=reference, repair=None)
    h = autoalign.merge_with_report(models, data, aligner=aligner, reference=reference, scheme="hierarchical", repair=None)
    assert h.report.scheme == "hierarchical" and h.report.iterations == 1
    sd_close(h.model.state_dict(), a.state_dict(), tol=1e-6)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_hierarchical_tree_depth_and_finite_result(n: int) -> None:
    models, data = [mlp(s) for s in range(n)], labelled()
    res = autoalign.merge_with_report(models, data, aligner="cca", scheme="hierarchical", repair="repair")
    assert res.report.iterations == math.ceil(math.log2(n))
    assert res.report.weights == pytest.approx([1.0 / n] * n)
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


def test_hierarchical_of_permuted_copies_is_the_model() -> None:
    base, data = mlp(0), labelled()
    spec = autoalign.find_merge_points(base, data[0][0][:2])
    models = [base] + [autoalign.testing.permute_model(base, spec, seed=s) for s in (1, 2, 3)]
    res = autoalign.merge(models, data, aligner="permutation", scheme="hierarchical", repair=None)
    x = torch.randn(8, 5)
    torch.testing.assert_close(res(x), base(x), atol=1e-5, rtol=1e-5)
