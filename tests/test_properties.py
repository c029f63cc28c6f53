"""Property tests: random small MLPs and CNNs, random data, every registered aligner.

For any architecture drawn (random widths and depths, optional BatchNorm, dead or
duplicated units) and any data (random scale, possibly fewer samples than
channels), :func:`autoalign.merge`

* returns a model whose parameters and buffers are all finite, of the inputs'
  class, keys and dtypes;
* leaves the input models' state dicts byte-identical and their train/eval flags
  as they were.
"""

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import autoalign

ALIGNERS = autoalign.list_aligners()
SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)


def _degrade(linear_or_conv: nn.Module, mode: str) -> None:
    """Make some units dead (never fire after ReLU) or duplicated."""
    with torch.no_grad():
        w, b = linear_or_conv.weight, linear_or_conv.bias
        half = w.shape[0] // 2
        if mode == "dead" and half:
            w[:half] = 0
            b[:half] = -1
        elif mode == "duplicated" and half:
            w[1::2] = w[0::2][: w[1::2].shape[0]]
            b[1::2] = b[0::2][: b[1::2].shape[0]]


@st.composite
def architectures(draw):
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    widths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    return {
        "kind": kind,
        "widths": widths,
        "bn": draw(st.booleans()),
        "degrade": draw(st.sampled_from(["none", "dead", "duplicated"])),
        "d_in": draw(st.integers(1, 5)),
        "d_out": draw(st.integers(1, 4)),
    }


def _build(arch: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = arch["d_in"]
    for i, w in enumerate(arch["widths"]):
        if arch["kind"] == "mlp":
            layers.append(nn.Linear(c, w))
            if arch["bn"]:
                layers.append(nn.BatchNorm1d(w))
        else:
            layers.append(nn.Conv2d(c, w, 3, padding=1))
            if arch["bn"]:
                layers.append(nn.BatchNorm2d(w))
        if i == 0 and arch["degrade"] != "none":
            _degrade(layers[-2] if arch["bn"] else layers[-1], arch["degrade"])
        layers.append(nn.ReLU())
        c = w
    if arch["kind"] == "cnn":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(c, arch["d_out"]))
    return nn.Sequential(*layers)


@st.composite
def calibration(draw, arch):
    n_batches = draw(st.integers(1, 3))
    batch = draw(st.integers(2, 12))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    shape = (batch, arch["d_in"]) if arch["kind"] == "mlp" else (batch, arch["d_in"], 4, 4)
    return [scale * torch.randn(*shape, generator=g) for _ in range(n_batches)]


def _snapshot(model: nn.Module) -> dict[str, bytes]:
    return {k: (str(v.dtype), tuple(v.shape), v.detach().cpu().contiguous().numpy().tobytes()) for k, v in model.state_dict().items()}


@SETTINGS
@given(data=st.data(), arch=architectures(), aligner=st.sampled_from(ALIGNERS), n_models=st.integers(2, 3), train=st.booleans())
def test_merge_is_finite_and_leaves_inputs_untouched(data, arch, aligner, n_models, train):
    models = [_build(arch, seed) for seed in range(n_models)]
    for m in models:
        m.train(train)
    calib = data.draw(calibration(arch))
    before = [_snapshot(m) for m in models]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-deficiency warnings are expected here
        merged = autoalign.merge(models, calib, aligner=aligner)
    for m, snap in zip(models, before):
        assert _snapshot(m) == snap
        assert all(sub.training == train for sub in m.modules())
    assert type(merged) is type(models[0])
    ref = models[0].state_dict()
    out = merged.state_dict()
    assert list(out) == list(ref)
    for k, v in out.items():
        assert v.dtype == ref[k].dtype and v.shape == ref[k].shape, k
        if v.is_floating_point():
            assert bool(torch.isfinite(v).all()), (aligner, arch, k)
    x = calib[0]
    with torch.no_grad():
        assert bool(torch.isfinite(merged.eval()(x)).all())
