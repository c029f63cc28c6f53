"""Merge points of attention models (issue 2): a tiny ViT with nn.MultiheadAttention,
and a hand-written einsum attention."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoalign
from autoalign.examples.zoo import break_symmetry

D, HEADS = 8, 2
HD = D // HEADS


def _axis(spec, tensor, axis, block=None):
    found = [a for a in spec.axes if a.tensor == tensor and a.axis == axis and a.block == block]
    assert len(found) == 1, f"expected one role for {tensor} axis {axis} block {block}, got {found}"
    return found[0]


def _random_transforms(spec, kinds, seed=0):
    """A random transform of the given kinds for every point of those kinds."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in spec.points:
        if p.kind not in kinds:
            continue
        a = torch.randn(p.dim, p.dim, generator=g, dtype=torch.float64)
        if p.kind == "orthogonal":
            m = torch.linalg.qr(a)[0]
        else:
            m = a + 3 * torch.eye(p.dim, dtype=torch.float64)
        out[p.name] = (m, torch.linalg.inv(m))
    return out


# ----------------------------------------------------------------------------- ViT with nn.MultiheadAttention


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    def __init__(self, d=D, h=HEADS, patch=2, tokens=4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, d))
        self.blocks = nn.Sequential(Block(d, h), Block(d, h))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.blocks(x)
        return self.head(self.ln(x)[:, 0])


def _vit():
    torch.manual_seed(0)
    return break_symmetry(TinyViT()), torch.randn(2, 3, 4, 4)


def test_vit_residual_stream_is_one_permutation_point():
    net, x = _vit()
    spec = autoalign.find_merge_points(net, x)
    stream = spec.point("patch")
    assert spec.points[0] is stream
    assert stream.dim == D and stream.kind == "permutation"
    assert "LayerNorm" in stream.reason and stream.reason.startswith("blocks.0.ln1")
    s = spec.index_of("patch")

    def in_stream(tensor, axis, role, block=None):
        ax = _axis(spec, tensor, axis, block)
        assert ax.role == role, (tensor, axis, ax.role)
        np.testing.assert_array_equal(ax.point_of, np.full(D, s), err_msg=tensor)
        np.testing.assert_array_equal(ax.local_of, np.arange(D), err_msg=tensor)

    # class token and position embedding: additive on their last axis
    in_stream("cls", 2, "additive")
    in_stream("pos", 2, "additive")
    assert not [a for a in spec.axes if a.tensor in ("cls", "pos") and a.axis != 2]

    # writers of the stream
    for key in ("patch.weight", "patch.bias"):
        in_stream(key, 0, "output")
    for b in ("blocks.0", "blocks.1"):
        for key in (f"{b}.attn.out_proj.weight", f"{b}.attn.out_proj.bias", f"{b}.fc2.weight", f"{b}.fc2.bias"):
            in_stream(key, 0, "output")
        for ln in ("ln1", "ln2"):
            in_stream(f"{b}.{ln}.weight", 0, "channel")
            in_stream(f"{b}.{ln}.bias", 0, "channel")
        # readers: the fused q/k/v projection (three blocks of rows) and fc1
        for part in range(3):
            in_stream(f"{b}.attn.in_proj_weight", 1, "input", block=(0, part * D, (part + 1) * D))
        in_stream(f"{b}.fc1.weight", 1, "input")
    in_stream("ln.weight", 0, "channel")
    in_stream("head.weight", 1, "input")
    assert spec.point("head").io and spec.point("head").kind == "frozen"

    report = autoalign.check(net, x, seed=8)
    assert report.ok, str(report)


def test_vit_per_head_points():
    net, x = _vit()
    spec = autoalign.find_merge_points(net, x)
    for b in ("blocks.0", "blocks.1"):
        prefix = f"{b}.attn"
        for h in range(HEADS):
            qk, v = spec.point(f"{prefix}.qk/h{h}"), spec.point(f"{prefix}.v/h{h}")
            assert (qk.dim, qk.kind) == (HD, "orthogonal")
            assert "query/key" in qk.reason and qk.reason.startswith(prefix)
            assert (v.dim, v.kind) == (HD, "linear") and v.reason is None
        assert spec.point(f"{b}.fc1").kind == "linear" and spec.point(f"{b}.fc1").dim == 2 * D

        # in_proj rows: [q heads | k heads | v heads]; q and k rows of head h share the point
        qk = [spec.index_of(f"{prefix}.qk/h{h}") for h in range(HEADS)]
        vv = [spec.index_of(f"{prefix}.v/h{h}") for h in range(HEADS)]
        rows = _axis(spec, f"{prefix}.in_proj_weight", 0)
        assert rows.role == "output"
        expect = np.concatenate([np.repeat(qk, HD), np.repeat(qk, HD), np.repeat(vv, HD)])
        np.testing.assert_array_equal(rows.point_of, expect)
        np.testing.assert_array_equal(rows.local_of, np.tile(np.arange(HD), 3 * HEADS))
        # the q and k rows of a head are two replicas of the same coordinates
        assert rows.index(qk[1], HD).shape == (2, HD)
        np.testing.assert_array_equal(rows.index(qk[1], HD), [np.arange(HD, 2 * HD), np.arange(D + HD, D + 2 * HD)])
        bias = _axis(spec, f"{prefix}.in_proj_bias", 0)
        np.testing.assert_array_equal(bias.point_of, expect)
        # out_proj reads the value heads
        cols = _axis(spec, f"{prefix}.out_proj.weight", 1)
        assert cols.role == "input"
        np.testing.assert_array_equal(cols.point_of, np.repeat(vv, HD))
        np.testing.assert_array_equal(cols.local_of, np.tile(np.arange(HD), HEADS))
    assert spec.kind_counts() == {"linear": 6, "orthogonal": 4, "permutation": 1, "rotary": 0, "frozen": 1}


def test_vit_orthogonal_and_linear_head_transforms_are_exact():
    """qk points take any orthogonal matrix, v points any invertible matrix: exactly."""
    net, x = _vit()
    net = net.double()
    x = x.double()
    spec = autoalign.find_merge_points(net, x)
    transforms = {n: t for n, t in _random_transforms(spec, ("orthogonal", "linear")).items() if "/h" in n}
    assert len(transforms) == 8
    sd = autoalign.transform_state_dict(net.state_dict(), spec, transforms)
    other = TinyViT().double()
    other.load_state_dict(sd)
    net.eval()
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), net(x))
        # a dense (non-orthogonal) map on a qk point is NOT exact: the kind matters
        g = torch.Generator().manual_seed(1)
        m = torch.randn(HD, HD, generator=g, dtype=torch.float64) + 3 * torch.eye(HD, dtype=torch.float64)
        bad = autoalign.transform_state_dict(net.state_dict(), spec, {"blocks.0.attn.qk/h0": (m, torch.linalg.inv(m))})
        other.load_state_dict(bad)
        assert not torch.allclose(other(x), net(x), atol=1e-6)


# ----------------------------------------------------------------------------- einsum attention


class EinsumAttention(nn.Module):
    def __init__(self, d=D, h=HEADS):
        super().__init__()
        self.h = h
        self.inp = nn.Linear(3, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        x = self.inp(x)
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.reshape(b, t, self.h, d // self.h)
        k = k.reshape(b, t, self.h, d // self.h)
        v = v.reshape(b, t, self.h, d // self.h)
        a = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.h) ** -0.5
        a = a.softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d)
        x = x + self.proj(o)
        return self.out(torch.relu(x)).mean(1)


def test_einsum_attention():
    torch.manual_seed(0)
    net = EinsumAttention()
    x = torch.randn(2, 5, 3)
    spec = autoalign.find_merge_points(net, x)
    assert [(p.name, p.dim, p.kind) for p in spec.points] == [
        ("inp", D, "linear"),
        ("qkv[0]", HD, "orthogonal"),
        ("qkv[1]", HD, "orthogonal"),
        ("qkv[2]", HD, "linear"),
        ("qkv[3]", HD, "linear"),
        ("out", 2, "frozen"),
    ]
    assert "einsum" in spec.point("qkv[0]").reason
    rows = _axis(spec, "qkv.weight", 0)
    qk0, qk1, v0, v1 = (spec.index_of(f"qkv[{i}]") for i in range(4))
    np.testing.assert_array_equal(rows.point_of, np.repeat([qk0, qk1, qk0, qk1, v0, v1], HD))
    np.testing.assert_array_equal(_axis(spec, "proj.weight", 1).point_of, np.repeat([v0, v1], HD))
    # the residual stream: inp rows and proj rows
    s = spec.index_of("inp")
    np.testing.assert_array_equal(_axis(spec, "proj.weight", 0).point_of, np.full(D, s))
    np.testing.assert_array_equal(_axis(spec, "qkv.weight", 1).point_of, np.full(D, s))
    report = autoalign.check(net, x, seed=9)
    assert report.ok, str(report)




@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_with_key_padding_mask_and_batch_first_flag(batch_first):
    """A mask is not a feature tensor; the MHA rule handles both layouts."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, D)
            self.attn = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)
            self.out = nn.Linear(D, 2)

        def forward(self, x, mask):
            h = self.inp(x)
            return self.out(self.attn(h, h, h, key_padding_mask=mask, need_weights=False)[0])

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, -1] = True
    spec = autoalign.find_merge_points(net, (x, mask))
    assert spec.point("inp").kind == "linear"
    assert spec.point("attn.qk/h0").kind == "orthogonal"
    assert spec.point("attn.v/h1").kind == "linear"
    report = autoalign.check(net, (x, mask), seed=10)
    assert report.ok, str(report)


# ----------------------------------------------------------------------------- F.scaled_dot_product_attention


class SDPAttention(nn.Module):
    """Separate q/k/v projections, heads on axis 1, ``F.scaled_dot_product_attention``."""

    def __init__(self, d=D, h=HEADS, causal=False):
        super().__init__()
        self.h, self.causal = h, causal
        self.inp = nn.Linear(3, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        x = self.inp(x)
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=self.causal)
        x = x + self.proj(o.transpose(1, 2).reshape(b, t, d))
        return self.out(torch.relu(x)).mean(1)


@pytest.mark.parametrize("causal", [False, True])
def test_scaled_dot_product_attention_is_head_aware(causal):
    torch.manual_seed(0)
    net = SDPAttention(causal=causal)
    x = torch.randn(2, 5, 3)
    spec = autoalign.find_merge_points(net, x)
    kinds = {p.name: (p.dim, p.kind) for p in spec.points}
    assert kinds["inp"] == (D, "linear")
    qk = [p for p in spec.points if p.kind == "orthogonal"]
    vs = [p for p in spec.points if p.name.startswith("v")]
    assert len(qk) == HEADS and all(p.dim == HD for p in qk)
    assert len(vs) == HEADS and all(p.dim == HD and p.kind == "linear" for p in vs)
    assert "scaled_dot_product_attention" in qk[0].reason
    qi = [spec.index_of(p.name) for p in qk]
    np.testing.assert_array_equal(_axis(spec, "q.weight", 0).point_of, np.repeat(qi, HD))
    np.testing.assert_array_equal(_axis(spec, "k.weight", 0).point_of, np.repeat(qi, HD))
    report = autoalign.check(net, x, seed=3)
    assert report.ok, str(report)


@pytest.mark.parametrize("cls", [EinsumAttention, SDPAttention], ids=["einsum", "sdpa"])
def test_attention_head_transforms_are_exact(cls):
    torch.manual_seed(0)
    net = cls().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    spec = autoalign.find_merge_points(net, x)
    transforms = _random_transforms(spec, ("orthogonal", "linear"))
    transforms.pop("inp")  # the stream goes through a ReLU before the head
    sd = autoalign.transform_state_dict(net.state_dict(), spec, transforms)
    other = cls().double()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), net(x))


class ConcatBiasAttention(nn.Module):
    """Attention whose qkv bias is ``cat(q_bias, zeros, v_bias)`` (BEiT, EVA): the key bias is a
    zero buffer, outside the state dict."""

    def __init__(self, d: int = 8, heads: int = 2, zeros: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(4, d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.register_buffer("k_bias", torch.zeros(d) if zeros else torch.randn(d), persistent=False)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        b, t, d = h.shape
        qkv = F.linear(h, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.head(torch.relu(h + self.proj(att)).mean(1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_bias_concatenated_from_parameters_and_zeros_is_a_producer_bias(tracer):
    torch.manual_seed(0)
    net, x = ConcatBiasAttention().eval(), torch.randn(5, 6, 4)
    report = autoalign.check(net, x, tracer=tracer)
    assert report.ok and report.output_scale > 0.1, str(report)
    roles = {(a.tensor, a.role) for a in report.spec.axes}
    assert {("q_bias", "output"), ("v_bias", "output")} <= roles
    assert report.coverage == 1.0 and report.spec.kind_counts()["orthogonal"] == 2, report.spec.table()
    # a key bias that is not zero cannot follow a map of the key coordinates: frozen, named
    torch.manual_seed(0)
    spec = autoalign.find_merge_points(ConcatBiasAttention(zeros=False).eval(), x, tracer=tracer)
    assert spec.coverage() < 1.0 and any("concatenated" in (p.reason or "") for p in spec.points)


@pytest.mark.parametrize("aligner", ["cca", "procrustes", "permutation", "zipit"])
def test_merging_through_a_concatenated_bias_keeps_a_copy(aligner):
    torch.manual_seed(0)
    a, b = ConcatBiasAttention().eval(), ConcatBiasAttention().eval()
    data = [torch.randn(32, 6, 4) for _ in range(2)]
    merged = autoalign.merge([a, b], data, aligner=aligner, weights=(1, 0), repair=None)
    with torch.no_grad():
        assert torch.allclose(merged(data[0]), a(data[0]), atol=1e-4)
    assert torch.equal(merged.k_bias, torch.zeros(8))
