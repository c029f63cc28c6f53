"""Rotary position embeddings: the ``rotary`` kind, discovered, self-checked and merged.

A small attention classifier on scikit-learn's digits (8 tokens of 8 pixels) applies
rotary embeddings to its queries and keys, written the two ways models write them
(``rotate_half``: pairs ``(i, i + d/2)``; interleaved: pairs ``(2i, 2i + 1)``). Its
query/key space must come out ``rotary`` with exactly those pairs, and the self-check
(which rotates every pair by a random angle) must pass. Variants that are *not* rotary
embeddings (a swap without the sign, both halves negated, frequencies not shared by a
pair's coordinates) and a gate that allows only permutations must freeze the space instead.
The merge invariants then hold for every aligner and repair mode on trained weights.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoalign
from autoalign.aligners.linalg import is_rotary, nearest_rotary, pair_rotations
from autoalign.errors import SpecError
from autoalign.spec import KINDS, MergePoint, kind_meet, kind_rank

from test_invariants_batchnorm import check_computes, digits, train_model  # noqa: F401  (digits: a fixture)

HEADS, HEAD_DIM, WIDTH = 2, 8, 16


class RopeNet(nn.Module):
    """Embedding, one pre-norm attention block with rotary embeddings, an MLP block, a head."""

    def __init__(self, rotate: str = "half", freqs: str = "paired", gated: bool = False) -> None:
        super().__init__()
        self.rotate, self.freqs, self.gated = rotate, freqs, gated
        self.embed = nn.Linear(8, WIDTH)
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 32), nn.ReLU(), nn.Linear(32, WIDTH))
        self.head = nn.Linear(WIDTH, 10)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM), persistent=False)

    def turn(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate == "interleaved":
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
        if self.rotate == "swap":  # a reflection of each pair, not a rotation
            return torch.cat((x2, x1), -1)
        if self.rotate == "both":  # both halves negated: again not a rotation
            return torch.cat((-x2, -x1), -1)
        return torch.cat((-x2, x1), -1)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], HEADS, HEAD_DIM).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(x.shape[0], 8, 8))
        a = self.norm1(h)
        q, k, v = self.heads(self.q(a)), self.heads(self.k(a)), self.heads(self.v(a))
        if self.gated:  # a product of features (SiLU written out): permutations only
            q, k = q * torch.sigmoid(q), k * torch.sigmoid(k)
        pos = torch.arange(h.shape[1], dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)
        if self.freqs == "unpaired":  # every coordinate its own frequency
            angles = torch.outer(pos, torch.linspace(0.1, 1.0, HEAD_DIM))
        elif self.rotate == "interleaved":
            angles = angles.repeat_interleave(2, -1)
        else:
            angles = torch.cat((angles, angles), -1)
        cos, sin = angles.cos(), angles.sin()
        q = q * cos + self.turn(q) * sin
        k = k * cos + self.turn(k) * sin
        att = F.scaled_dot_product_attention(q, k, v)
        h = h + self.o(att.transpose(1, 2).reshape(h.shape))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


def qk_points(spec: autoalign.MergeSpec) -> list[MergePoint]:
    """The points holding the query projection's rows (one per head)."""
    found = sorted({p for a in spec.axes if a.tensor == "q.weight" and a.role == "output" for p in a.points()})
    assert len(found) == HEADS, spec.table()
    return [spec.points[i] for i in found]


HALF_PAIRS = tuple((i, i + HEAD_DIM // 2) for i in range(HEAD_DIM // 2))
INTERLEAVED_PAIRS = tuple((2 * i, 2 * i + 1) for i in range(HEAD_DIM // 2))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("rotate, pairs", [("half", HALF_PAIRS), ("interleaved", INTERLEAVED_PAIRS)])
def test_rotary_embeddings_give_a_rotary_point_with_their_pairs(rotate, pairs, tracer):
    torch.manual_seed(0)
    net, x = RopeNet(rotate).eval(), torch.randn(4, 64)
    spec = autoalign.find_merge_points(net, x, tracer=tracer)
    for point in qk_points(spec):
        assert (point.kind, point.dim, point.pairs) == ("rotary", HEAD_DIM, pairs), spec.table()
        assert "rotary position embedding" in point.reason
    assert spec.coverage() == 1.0
    for seed in range(3):
        report = autoalign.check(net, x, spec=spec, seed=seed)
        assert report.ok, report


@pytest.mark.parametrize("variant", [dict(rotate="swap"), dict(rotate="both"), dict(freqs="unpaired"), dict(gated=True)],
                         ids=["swap", "both-negated", "unpaired-frequencies", "gated"])
def test_what_is_not_a_pair_rotation_freezes_the_query_key_space(variant):
    torch.manual_seed(0)
    net, x = RopeNet(**variant).eval(), torch.randn(4, 64)
    spec = autoalign.find_merge_points(net, x)
    for point in qk_points(spec):
        assert point.kind == "frozen" and not point.pairs, spec.table()
        if variant.get("gated"):  # both restrictions are named
            assert "rotary position embedding" in point.reason and "product of features" in point.reason, point.reason
    assert autoalign.check(net, x, spec=spec).ok


def test_the_self_check_fails_when_pairs_are_wrong():
    """The self-check is what proves the pairs: a spec with the pairs of the other convention fails it."""
    torch.manual_seed(0)
    net, x = RopeNet("half").eval(), torch.randn(4, 64)
    spec = autoalign.find_merge_points(net, x)
    good = qk_points(spec)[0]
    wrong = MergePoint(good.name, good.dim, "rotary", good.reason, good.io, good.producers, good.sites, INTERLEAVED_PAIRS)
    bad = autoalign.MergeSpec.from_dict({**spec.to_dict(), "points": [
        (wrong if p.name == good.name else p).to_dict() for p in spec.points]})
    assert not autoalign.check(net, x, spec=bad).ok


def test_kind_meet_keeps_rotations_and_permutations_apart():
    r = {k: kind_rank(k) for k in KINDS}
    assert kind_meet(r["rotary"], r["permutation"]) == r["frozen"]
    assert kind_meet(r["rotary"], r["orthogonal"]) == r["rotary"] == kind_meet(r["linear"], r["rotary"])
    assert kind_meet(r["permutation"], r["orthogonal"]) == r["permutation"]
    got = kind_meet(np.array([r["rotary"], r["permutation"], r["linear"]]), np.array([r["permutation"]] * 3))
    assert got.tolist() == [r["frozen"], r["permutation"], r["permutation"]]


def test_nearest_rotary_is_the_frobenius_projection():
    pairs = ((0, 3), (1, 2))
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    best = nearest_rotary(m, pairs)
    assert is_rotary(best, pairs) and not is_rotary(m, pairs)
    assert torch.allclose(best.T @ best, torch.eye(5, dtype=torch.float64))
    for _ in range(200):  # no rotation of the pairs is closer
        other = pair_rotations(5, pairs, torch.rand(2, generator=g, dtype=torch.float64) * 2 * math.pi)
        assert torch.linalg.norm(m - best) <= torch.linalg.norm(m - other) + 1e-12
    rot = pair_rotations(5, pairs, torch.tensor([0.3, -2.0], dtype=torch.float64))
    assert torch.allclose(nearest_rotary(rot, pairs), rot)


def test_rotary_points_carry_valid_pairs_through_json():
    with pytest.raises(SpecError, match="rotary"):
        MergePoint("p", 4, "orthogonal", pairs=((0, 1),))
    with pytest.raises(SpecError, match="rotary"):
        MergePoint("p", 4, "rotary")
    with pytest.raises(SpecError, match="disjoint"):
        MergePoint("p", 4, "rotary", pairs=((0, 1), (1, 2)))
    torch.manual_seed(0)
    net, x = RopeNet().eval(), torch.randn(4, 64)
    spec = autoalign.find_merge_points(net, x)
    again = autoalign.MergeSpec.from_json(spec.to_json())
    assert [p.pairs for p in qk_points(again)] == [HALF_PAIRS] * HEADS and again.to_dict() == spec.to_dict()


# ----------------------------------------------------------------------------- merging, trained


@pytest.fixture(scope="module")
def rope_models(digits):
    x, y = digits
    xtr, ytr, xte, yte = x[:1200], y[:1200], x[1200:1600], y[1200:1600]
    adam = lambda params: torch.optim.Adam(params, lr=5e-3)  # noqa: E731
    a, b = (train_model(RopeNet, s, xtr, ytr, epochs=10, optimizer=adam) for s in (0, 1))
    with torch.no_grad():
        acc = [float((m(xte).argmax(1) == yte).float().mean()) for m in (a, b)]
    assert min(acc) > 0.75, f"the rotary nets did not train: {acc}"  # 81-83 % measured; chance is 10 %
    calib = [(xtr[i : i + 512], ytr[i : i + 512]) for i in range(0, 1024, 512)]
    return a, b, calib, xte


@pytest.mark.parametrize("repair", [None, "repair"], ids=str)
@pytest.mark.parametrize("aligner", autoalign.list_aligners())
def test_merge_invariants_hold_through_rotary_points(rope_models, aligner, repair):
    a, b, calib, x = rope_models
    before = {k: v.clone() for k, v in a.state_dict().items()}
    merged = autoalign.merge([a, copy.deepcopy(a), copy.deepcopy(a)], calib, aligner=aligner, repair=repair)
    check_computes(a, merged, x, repair, f"merge([A] * 3), {aligner}, repair={repair}")
    merged = autoalign.merge([a, b], calib, aligner=aligner, repair=repair, weights=(1, 0))
    check_computes(a, merged, x, repair, f"weights=(1, 0), {aligner}, repair={repair}")
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


@pytest.mark.parametrize("aligner", autoalign.list_aligners())
def test_every_aligner_returns_pair_rotations_at_rotary_points(rope_models, aligner):
    a, b, calib, _ = rope_models
    result = autoalign.merge_with_report([a, b], calib, aligner=aligner, repair=None)
    for point in qk_points(result.spec):
        pp = result.plan.points.get(point.name)
        if pp is None:  # weight matching keeps rotary points at the identity
            assert aligner == "weight_matching"
            continue
        for m in range(2):
            assert is_rotary(pp.merges[m], point.pairs) and is_rotary(pp.unmerges[m], point.pairs)
            assert torch.allclose(pp.unmerges[m] @ pp.merges[m], torch.eye(point.dim, dtype=torch.float64))


def test_procrustes_solves_rotary_points_within_their_group(rope_models):
    """The default aligner maximises ``tr(Qᵀ C)`` among pair rotations, which is at least what
    projecting its unconstrained (orthogonal) answer onto the pairs gives."""
    from autoalign.aligners.procrustes import procrustes_transform

    a, b, calib, _ = rope_models
    result = autoalign.merge_with_report([a, b], calib, aligner="procrustes", repair=None)
    for point in qk_points(result.spec):
        c = result.stats.points[point.name].cov(0, 1)
        q = result.plan.points[point.name].merges[1]
        assert torch.allclose(q, nearest_rotary(c, point.pairs))
        projected = nearest_rotary(procrustes_transform(c)[0], point.pairs)
        assert float(torch.trace(q.T @ c)) >= float(torch.trace(projected.T @ c)) - 1e-12


def test_a_rule_cannot_ask_for_rotary_without_pairs():
    from autoalign.graph.rules.labels import pointwise

    class Spin(nn.Module):
        def forward(self, x):
            return x

    def rule(ctx):
        lab = pointwise(ctx)
        ctx.restrict(lab, "rotary", "no pairs given")
        return lab

    net = nn.Sequential(nn.Linear(3, 4), Spin(), nn.Linear(4, 2))
    with pytest.raises(SpecError, match="rotate_pairs"):
        autoalign.find_merge_points(net, torch.randn(2, 3), leaf_modules=[Spin], rules={Spin: rule})
