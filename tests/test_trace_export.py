"""The torch.export front end (issue 20): the same spec as torch.fx where both trace,
models only export can trace, and the merge invariants through it for every aligner
and every repair mode on trained BatchNorm nets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoalign
from autoalign.capture import module_nodes
from autoalign.trace import trace
from test_invariants_batchnorm import REPAIRS, TOPOLOGIES, check_computes, train_model

ALIGNERS = autoalign.list_aligners()


def spec_key(spec: autoalign.MergeSpec) -> tuple:
    """Points, every parameter axis position by position, and folds, as comparable data."""
    names = [p.name for p in spec.points]
    axes = sorted(
        (a.tensor, a.axis, a.role, str(a.block), tuple(names[p] if p >= 0 else "-" for p in a.point_of.tolist()),
         tuple(a.local_of.tolist()))
        for a in spec.axes
    )
    return [(p.name, p.dim, p.kind) for p in spec.points], axes, sorted(map(str, spec.folds))


class Attention(nn.Module):
    """A pre-norm transformer block with a fused qkv projection and F.scaled_dot_product_attention."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        h = h + self.proj(a)
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(h.mean(1))


class ShapeBranch(nn.Module):
    """Python control flow on a shape: ``torch.fx`` cannot trace it, ``torch.export`` can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # accept unbatched images too
            x = x.unsqueeze(0)
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(F.relu(self.fc1(h)))


@pytest.mark.parametrize(
    "make, shape",
    [(TOPOLOGIES["residual"], (4, 1, 8, 8)), (TOPOLOGIES["depthwise_se"], (4, 1, 8, 8)), (TOPOLOGIES["mlp"], (4, 1, 8, 8)),
     (Attention, (4, 5, 6))],
    ids=["residual_bn", "depthwise_se", "mlp_bn", "attention"],
)
def test_export_gives_the_fx_spec(make, shape):
    model, x = make().eval(), torch.randn(*shape)
    via_fx = autoalign.find_merge_points(model, x, tracer="fx")
    via_export = autoalign.find_merge_points(model, x, tracer="export")
    assert spec_key(via_export) == spec_key(via_fx)
    assert autoalign.check(model, x, spec=via_export).ok


def test_export_gives_the_fx_spec_on_resnet18():
    import torchvision

    from autoalign.examples.zoo import break_symmetry

    model = break_symmetry(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    via_export = autoalign.find_merge_points(model, x, tracer="export")
    assert spec_key(via_export) == spec_key(autoalign.find_merge_points(model, x, tracer="fx"))
    assert via_export.point("conv1").kind == "linear" and len(via_export.folds) == 20


def test_auto_falls_back_to_export_when_fx_fails():
    model, x = ShapeBranch().eval(), torch.randn(4, 1, 8, 8)
    with pytest.raises(autoalign.TraceError, match="ShapeBranch"):
        autoalign.trace(model, x, tracer="fx")
    gm = autoalign.trace(model, x)
    assert gm.meta["autoalign_frontend"] == "export"
    report = autoalign.check(model, x)
    assert report.ok and report.coverage == 1.0
    assert [p.name for p in report.spec.points] == ["conv", "fc1", "fc2"]
    assert report.spec.point("conv").kind == "linear" and len(report.spec.folds) == 1


def test_exported_graph_runs_any_batch_and_reads_the_models_parameters():
    model = ShapeBranch().eval()
    gm = trace(model, torch.randn(2, 1, 8, 8), tracer="export")
    for n in (1, 7):
        x = torch.randn(n, 1, 8, 8)
        torch.testing.assert_close(gm(x), model(x))
    assert gm.get_parameter("conv.weight") is model.conv.weight
    assert [n.target for n in module_nodes(gm, "fc1")] == [torch.ops.aten.linear.default]


class Doubler(nn.Module):
    """A custom layer (outside torch.nn) whose registered rule is stricter than its ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class WithDoubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), Doubler(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_a_module_rule_applies_to_its_call_in_an_exported_graph():
    def only_permutations(ctx):
        lab = ctx.label(ctx.arg(0))
        ctx.restrict(ctx.channels(lab, -1), "permutation", f"{ctx.name}: said so by its rule")
        return lab

    model, x = WithDoubler().eval(), torch.randn(3, 4)
    plain = autoalign.find_merge_points(model, x, tracer="export")
    assert plain.point("fc1").kind == "linear"  # 2 * x alone: any map passes
    ruled = autoalign.find_merge_points(model, x, tracer="export", rules={Doubler: only_permutations})
    assert ruled.point("fc1").kind == "permutation" and ruled.point("fc1").reason == "act: said so by its rule"
    # fx applies a module rule to the modules it keeps opaque: the same spec
    via_fx = autoalign.find_merge_points(model, x, tracer="fx", leaf_modules=[Doubler], rules={Doubler: only_permutations})
    assert spec_key(ruled) == spec_key(via_fx)


def test_tracer_options_are_checked():
    model, x = ShapeBranch(), torch.randn(2, 1, 8, 8)
    with pytest.raises(autoalign.OptionError, match="tracer must be one of"):
        autoalign.find_merge_points(model, x, tracer="dynamo")
    with pytest.raises(autoalign.OptionError, match="tracer"):
        autoalign.merge([model, model], [x], tracer="jit")
    with pytest.raises(autoalign.OptionError, match="leaf_modules"):
        autoalign.trace(model, x, tracer="export", leaf_modules=[nn.Conv2d])
    with pytest.raises(autoalign.TraceError, match="torch.export needs example inputs"):
        autoalign.trace(model, (), tracer="export")


def test_export_failure_names_both_front_ends():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 2 and bool(x.sum() > 0):  # a branch on data: neither front end can follow it
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(autoalign.TraceError, match="torch.export fallback failed too"):
        autoalign.trace(DataDependent(), torch.randn(2, 4))


@pytest.fixture(scope="module")
def trained_export(digits) -> dict[str, tuple[nn.Module, nn.Module, list, torch.Tensor]]:
    """Two trained, calibrated models per topology (as in test_invariants_batchnorm)."""
    x, y = digits
    xtr, ytr, xte = x[:1200], y[:1200], x[1200:1600]
    calib = [(xtr[i : i + 512], ytr[i : i + 512]) for i in range(0, 1024, 512)]
    out = {}
    for name in ("residual", "mlp"):
        a, b = (autoalign.reset_bn(train_model(TOPOLOGIES[name], s, xtr, ytr), calib).eval() for s in (0, 1))
        out[name] = (a, b, calib, xte)
    return out


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from autoalign.examples.datasets import load_dataset

    x, y = load_dataset("digits")
    return (x - x.mean()) / x.std(), y


# one dense, one permutation and one multi-model aligner in the default suite; the rest of the
# grid (every aligner x every repair mode) runs in `make test-transformers` (-m slow)
FAST = {"cca", "permutation", "zipit"}
GRID = [pytest.param(a, marks=() if a in FAST else pytest.mark.slow) for a in ALIGNERS]


@pytest.mark.parametrize("repair", REPAIRS, ids=str)
@pytest.mark.parametrize("aligner", GRID)
@pytest.mark.parametrize("topology", ["residual", "mlp"])
def test_merge_invariants_through_export(trained_export, topology, aligner, repair):
    """``merge([A, A])`` computes ``A`` and ``weights=(1, 0)`` gives ``A`` through the export
    front end, with BatchNorm folding, reset_bn (training-mode pass on the real modules) and
    REPAIR (forward hooks); the inputs are not modified."""
    a, b, calib, x = trained_export[topology]
    before = {k: v.clone() for k, v in a.state_dict().items()}
    merged = autoalign.merge([a, copy.deepcopy(a)], calib, aligner=aligner, repair=repair, tracer="export")
    check_computes(a, merged, x, repair, f"merge([A, A]) via export, {aligner}, repair={repair}")
    assert type(merged) is type(a) and list(merged.state_dict()) == list(a.state_dict())
    merged = autoalign.merge([a, b], calib, aligner=aligner, repair=repair, weights=(1, 0), tracer="export")
    check_computes(a, merged, x, repair, f"weights=(1, 0) via export, {aligner}, repair={repair}")
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_export_merge_of_two_models_matches_fx(trained_export):
    """Where both front ends trace, a merge through either gives the same model."""
    a, b, calib, x = trained_export["residual"]
    via_fx = autoalign.merge([a, b], calib, aligner="cca", tracer="fx")
    via_export = autoalign.merge([a, b], calib, aligner="cca", tracer="export")
    with torch.no_grad():
        torch.testing.assert_close(via_export(x), via_fx(x), rtol=1e-4, atol=1e-4)


class AddmmNet(nn.Module):
    """A GPT-2 style ``Conv1D`` producer (``addmm`` with an ``(in, out)`` weight): no REPAIR site."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.zeros(8))
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(torch.addmm(self.b, x, self.w)))


def test_addmm_is_a_producer_and_repair_without_sites_warns():
    model, x = AddmmNet(), torch.randn(16, 4)
    spec = autoalign.find_merge_points(model, x, tracer="export")
    assert [(p.name, p.kind) for p in spec.points] == [("addmm", "linear"), ("out", "frozen")]
    roles = {(a.tensor, a.axis): a.role for a in spec.axes}
    assert roles[("w", 1)] == "output" and roles[("b", 0)] == "output" and roles[("out.weight", 1)] == "input"
    assert autoalign.check(model, x, tracer="export").ok
    with pytest.warns(UserWarning, match="found no site to correct"):
        autoalign.merge([model, AddmmNet()], [x, x], aligner="permutation", repair="repair", tracer="export")


class RMSNormed(nn.Module):
    """``F.rms_norm`` with and without a weight (exported as ``aten.rms_norm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.w = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(self.fc1(x), (8,))
        return self.fc3(F.rms_norm(self.fc2(h), (8,), self.w))


def test_rms_norm_without_a_weight_allows_orthogonal_maps():
    model, x = RMSNormed().eval(), torch.randn(6, 4)
    spec = autoalign.find_merge_points(model, x, tracer="export")
    assert spec.point("fc1").kind == "orthogonal" and spec.point("fc2").kind == "permutation"
    assert autoalign.check(model, x, spec=spec).ok
    assert spec_key(spec) == spec_key(autoalign.find_merge_points(model, x, tracer="fx"))


def test_a_merge_exports_once_and_reuses_the_graph_for_every_model(monkeypatch):
    """Inside a merge the graph exported for the reference serves the other models (their own
    parameters swapped in): one torch.export call for 3 models, and the merge invariants hold."""
    import sys

    export_module = sys.modules["autoalign.trace.export"]
    calls = []
    real = export_module._export
    monkeypatch.setattr(export_module, "_export", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    others = [copy.deepcopy(net) for _ in range(2)]
    data = [torch.randn(32, 6) for _ in range(2)]
    merged = autoalign.merge([net, *others], data, tracer="export", repair=None)
    assert len(calls) == 1
    with torch.no_grad():
        assert torch.allclose(merged(data[0]), net(data[0]), atol=1e-5)


def test_a_reused_graph_must_compute_the_model_or_it_is_exported_afresh():
    """Same class, same parameter names and shapes, different forward (a flag): the second model
    gets its own graph, which computes its own function."""
    from autoalign.trace.reuse import reuse_exports

    class Flagged(nn.Module):
        def __init__(self, flip: bool) -> None:
            super().__init__()
            self.flip, self.fc = flip, nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return -y if self.flip else y

    a, b = Flagged(False), Flagged(True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 4)
    with reuse_exports():
        ga = trace(a, x, tracer="export")
        gb = trace(b, x, tracer="export")
    with torch.no_grad():
        assert torch.equal(ga(x), a(x)) and torch.equal(gb(x), b(x)) and not torch.equal(gb(x), a(x))


def test_advanced_indexing_moves_labels_through_export():
    """``y[:, idx]`` with an index buffer exports as ``aten.index.Tensor``: the gathered tokens keep
    their channel coordinates, as ``getitem`` does under fx."""

    class Gather(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            self.register_buffer("idx", torch.tensor([2, 0, 1, 1]))

        def forward(self, x):
            return self.b(torch.relu(self.a(x))[:, self.idx]).sum(1)

    torch.manual_seed(0)
    net, x = Gather().eval(), torch.randn(2, 3, 4)
    gm = trace(net, x, tracer="export")
    assert any(n.target is torch.ops.aten.index.Tensor for n in gm.graph.nodes)
    report = autoalign.check(net, x, tracer="export")
    assert report.ok and report.coverage == 1.0 and report.permuted == 1, report.spec.table()
