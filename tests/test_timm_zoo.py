"""The self-check on timm's models (benchmarks/timm_sweep.py runs the whole zoo;
docs/coverage_timm.md has the results).

The rule tests run by default; ``pytest -m zoo`` adds a representative sample of
timm's architecture modules (CNN, ViT, hybrid), one small model each.
"""

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import autoalign  # noqa: E402
from autoalign.apply import transform_state_dict  # noqa: E402
from autoalign.examples.zoo import break_symmetry  # noqa: E402
from benchmarks.timm_sweep import build  # noqa: E402

from timm.layers import BatchNormAct2d  # noqa: E402


def _dense_transforms(spec, seed=0):
    """A random invertible matrix for every ``linear`` point, a random orthogonal matrix for
    ``orthogonal`` ones, a random permutation for ``permutation`` ones."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in spec.points:
        if p.kind == "frozen":
            continue
        if p.kind == "linear":
            m = torch.eye(p.dim, dtype=torch.float64) + 0.3 * torch.randn(p.dim, p.dim, generator=g, dtype=torch.float64)
        elif p.kind == "orthogonal":
            m, _ = torch.linalg.qr(torch.randn(p.dim, p.dim, generator=g, dtype=torch.float64))
        else:
            m = torch.eye(p.dim, dtype=torch.float64)[torch.randperm(p.dim, generator=g)]
        out[p.name] = (m, torch.linalg.inv(m))
    return out


def _same_function_after(model, x, transforms, spec):
    sd = transform_state_dict(model.state_dict(), spec, transforms)
    other = copy.deepcopy(model)
    other.load_state_dict(sd)
    with torch.no_grad():
        a, b = model(x), other(x)
    return float((a - b).abs().max()), float(a.abs().max())


class _ConvBNAct(nn.Module):
    """conv → BatchNormAct2d (no activation) → conv → BatchNormAct2d(ReLU) → pooled head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.n1 = BatchNormAct2d(8, apply_act=False)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.n2 = BatchNormAct2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.n2(self.c2(self.n1(self.c1(x))))
        return self.head(x.mean((2, 3)))


def test_batchnormact_folds_into_its_conv():
    """timm's BatchNormAct2d traces to F.batch_norm behind an ``x.ndim`` assertion: it folds
    like nn.BatchNorm2d, so its points admit dense transforms, and a dense transform of the
    point between c1 and c2 (no nonlinearity there) keeps the function."""
    torch.manual_seed(0)
    net = break_symmetry(_ConvBNAct().eval())
    x = torch.randn(2, 3, 10, 10)
    report = autoalign.check(net, x)
    assert report.ok, report
    assert report.spec.kind_counts()["linear"] == 2, report.spec.table()
    assert len(report.spec.folds) == 2
    spec = report.spec
    # a dense transform only where no nonlinearity intervenes: the point after n1
    t = {k: v for k, v in _dense_transforms(spec).items() if k.startswith("c1") or k.startswith("n1")}
    assert t, [p.name for p in spec.points]
    diff, scale = _same_function_after(net, x, t, spec)
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)


def test_batchnorm_function_with_batch_statistics_stays_per_channel():
    """F.batch_norm with training=True normalises with batch statistics: nothing to fold."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 5, 1)
            self.w = nn.Parameter(torch.rand(5) + 0.5)
            self.b = nn.Parameter(torch.randn(5))
            self.o = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            y = torch.nn.functional.batch_norm(self.c(x), None, None, self.w, self.b, True)
            return self.o(y)

    report = autoalign.check(Net().eval(), torch.randn(4, 3, 6, 6))
    assert report.ok, report
    kinds = report.spec.kind_counts()
    assert kinds["permutation"] == 1 and kinds["linear"] == 0, report.spec.table()


# ----------------------------------------------------------------------------- the zoo sample

# one small model per module: CNNs, ViTs and hybrids; all pass in docs/coverage_timm.md
SAMPLE = {
    "resnet": "resnet10t",
    "efficientnet": "mobilenetv2_035",
    "convnext": "convnext_zepto_rms",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "cspnet": "cs3darknet_focus_s",
    "fasternet": "fasternet_t0",
    "byobnet": "mobileone_s1",
    "deit": "deit_tiny_patch16_224",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "efficientformer": "efficientformer_l1",
    "edgenext": "edgenext_xx_small",
}


@pytest.mark.zoo
@pytest.mark.parametrize("module,name", sorted(SAMPLE.items()))
def test_timm_self_check_sample(module, name):
    assert name in timm.list_models(module=module)
    model, x = build(name)
    report = autoalign.check(model, x)
    if not report.ok:  # float32 rounding in deep random nets; the same spec in float64 is exact
        report = autoalign.check(model.double(), x.double(), spec=report.spec)
    assert report.ok, f"{name}: {report}"
    assert report.output_scale > 1e-3
    assert report.coverage >= 0.6, f"{name}: coverage {report.coverage:.3f}"


class _RegisterTokens(nn.Module):
    """A class token and 4 register tokens concatenated before the patch tokens (DINOv2/v3, EVA)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.reg_token = nn.Parameter(torch.randn(1, 4, 8))
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), x], dim=1)
        x = x + self.mlp(x)
        return self.head(x[:, 0])


def test_concatenated_register_tokens_are_additive():
    """Several parameter tokens concatenated along the token axis (not only one class token)
    take the stream's coordinates (role "additive"); discovery used to crash on them."""
    torch.manual_seed(0)
    net = _RegisterTokens().eval()
    report = autoalign.check(net, torch.randn(2, 5, 6))
    assert report.ok, report
    assert report.coverage == 1.0, report.spec.table()
    roles = {(a.tensor, a.role) for a in report.spec.axes}
    assert {("cls_token", "additive"), ("reg_token", "additive")} <= roles, roles


class _SharedUnderTwoNames(nn.Module):
    """A depthwise conv registered twice (CoaT's ``cpe1`` is also ``serial_blocks1.0.cpe``):
    the traced graph reaches one of its names only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.cpe = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.blocks = nn.ModuleList([nn.ModuleDict({"cpe": self.cpe, "mlp": nn.Conv2d(6, 6, 1)}) for _ in range(2)])
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b["cpe"](x)
            x = x + b["mlp"](x)
        return self.head(x)


def test_module_registered_under_two_names_is_permuted_once_for_all_its_keys():
    """The spec lists the model's other keys of a tensor the graph uses as aliases, so the
    self-check's permuted copy does not load an untransformed copy over it (CoaT failed)."""
    torch.manual_seed(0)
    net = break_symmetry(_SharedUnderTwoNames().eval())
    report = autoalign.check(net, torch.randn(2, 3, 5, 5))
    assert report.ok, report
    assert report.permuted == 1
    names = {k for k in net.state_dict() if k.endswith("cpe.weight")}
    assert len(names) == 3
    assert names - set(report.spec.aliases) == {next(iter(names - set(report.spec.aliases)))}


class _NormAndRepeat(nn.Module):
    """``x.norm`` over the spatial axes (a global-response-norm-like gate) and
    ``repeat_interleave`` over the batch (GCViT's global query)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.q = nn.Parameter(torch.randn(1, 6, 1, 1))
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.a(x)
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        x = x * g + x
        q = self.q.repeat_interleave(x.shape[0], dim=0)
        return self.b(x + q)


def test_norm_over_spatial_axes_and_repeat_interleave_keep_coordinates():
    torch.manual_seed(0)
    net = _NormAndRepeat().eval()
    report = autoalign.check(net, torch.randn(3, 3, 5, 5))
    assert report.ok, report
    assert report.coverage == 1.0, report.spec.table()


class _TokenMixing(nn.Module):
    """MLP-Mixer's token MLP and gMLP's spatial gating: Linear layers over the token axis."""

    def __init__(self, tokens=5, dim=6):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.norm = nn.LayerNorm(dim)
        self.tok1 = nn.Linear(tokens, 7)
        self.tok2 = nn.Linear(7, tokens)
        self.gate = nn.Linear(tokens, tokens)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.tok2(torch.nn.functional.gelu(self.tok1(self.norm(x).transpose(1, 2)))).transpose(1, 2)
        u, v = x.chunk(2, dim=-1)
        v = self.gate(v.transpose(-1, -2)).transpose(-1, -2)
        return self.head(torch.cat([u * v, x[..., 3:]], -1))


def test_linear_over_the_token_axis_keeps_channel_coordinates():
    """A Linear applied across tokens acts on every channel alike: the stream is not frozen
    (gmlp_ti16 had coverage 0.01); its bias allows permutations only."""
    torch.manual_seed(0)
    net = break_symmetry(_TokenMixing().eval())
    report = autoalign.check(net, torch.randn(2, 5, 4))
    assert report.ok, report
    assert report.coverage == 1.0, report.spec.table()
    assert report.spec.kind_counts()["frozen"] == 1  # the logits


class _TimmLeaves(nn.Module):
    """timm's SAME-padded and weight-standardised convolutions and SAME pooling."""

    def __init__(self):
        from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d
        from timm.layers.pool2d_same import AvgPool2dSame

        super().__init__()
        self.a = Conv2dSame(3, 8, 3, stride=2)
        self.b = StdConv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c = ScaledStdConv2d(8, 6, 1)
        self.pool = AvgPool2dSame(3, stride=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.bn(self.b(x)))
        return self.head(self.pool(torch.relu(self.c(x))))


def test_timm_leaf_modules_have_rules():
    """As leaves, timm's Conv2dSame / StdConv2d / ScaledStdConv2d / AvgPool2dSame keep every
    point (fx fails on Conv2dSame and freezes traced std-convs); standardised filters allow
    permutations only and take no BatchNorm fold."""
    from autoalign.graph.rules.timm import timm_leaf_modules

    torch.manual_seed(0)
    net = break_symmetry(_TimmLeaves().eval())
    x = torch.randn(2, 3, 15, 15)
    with pytest.raises(autoalign.TraceError):
        autoalign.check(net, x, tracer="fx")
    assert autoalign.check(net, x).ok  # tracer="auto": torch.export takes over
    leaves = timm_leaf_modules()
    assert {c.__name__ for c in leaves} >= {"Conv2dSame", "StdConv2d", "ScaledStdConv2d", "AvgPool2dSame"}
    report = autoalign.check(net, x, leaf_modules=leaves)
    assert report.ok, report
    assert report.coverage == 1.0, report.spec.table()
    kinds = {p.name: p.kind for p in report.spec.points}
    assert kinds["a"] == "permutation" and kinds["b"] == "permutation" and kinds["c"] == "permutation", kinds
    assert not report.spec.folds
    assert ("c.gain", "channel") in {(a.tensor, a.role) for a in report.spec.axes}


class _SplitSum(nn.Module):
    """ResNeSt's split attention: a conv makes ``radix`` branches, reshaped to
    (B, radix, C, H, W), gated and summed over the radix axis."""

    def __init__(self, radix=2, c=4):
        super().__init__()
        self.radix, self.c = radix, c
        self.conv = nn.Conv2d(3, radix * c, 3, padding=1)
        self.gate = nn.Conv2d(c, radix * c, 1)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        b, _, h, w = x.shape
        x = x.reshape(b, self.radix, self.c, h, w)
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        a = torch.sigmoid(self.gate(gap)).reshape(b, self.radix, self.c, 1, 1)
        return self.out((x * a).sum(dim=1))


def test_sum_over_feature_slices_identifies_them():
    """Summing the radix slices combines coordinates elementwise: both branches must take
    one transform (the self-check of resnest14d failed: each branch was its own point and
    the sum's output was untracked, so the consumer's columns never moved)."""
    torch.manual_seed(0)
    net = break_symmetry(_SplitSum().eval())
    report = autoalign.check(net, torch.randn(2, 3, 6, 6))
    assert report.ok, report
    dims = sorted(p.dim for p in report.spec.points if p.kind != "frozen")
    assert 4 in dims and report.coverage == 1.0, report.spec.table()


def test_beit_qkv_bias_concatenated_with_a_zero_key_bias_keeps_the_stream():
    """BEiT's qkv bias is ``cat(q_bias, k_bias, v_bias)`` with ``k_bias`` a zero buffer: each
    parameter piece is a producer bias, so nothing hidden is frozen."""
    torch.manual_seed(0)
    m = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=2,
                          embed_dim=96, num_heads=4).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.1)
            if n.startswith("head."):  # outputs of order ten: the check could fail
                p.normal_(0, 1.0)
    report = autoalign.check(m, torch.randn(2, 3, 64, 64))
    assert report.ok and report.output_scale > 1.0, str(report)
    assert report.coverage == 1.0, report.spec.table()
