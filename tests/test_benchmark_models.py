"""Tests of the benchmark model zoo (benchmarks/models.py) and trainer (benchmarks/train.py)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.fx as fx

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import train as train_mod  # noqa: E402
from benchmarks.models import (  # noqa: E402
    ARCHITECTURES,
    DATASET_SHAPES,
    MLP,
    VGG11,
    ResNet20,
    SmallCNN,
    build_model,
    input_shape,
)
from benchmarks.train import evaluate, load_checkpoint, train_models  # noqa: E402

# Small widths keep every case well under a second.
_SMALL = {"mlp": 32, "smallcnn": 8, "vgg11": 0.125, "resnet20": 0.5, "resbn": 4, "mobilenet": 0.25}


@pytest.mark.parametrize("dataset", sorted(DATASET_SHAPES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_forward_and_fx_trace(arch, dataset):
    torch.manual_seed(0)
    model = build_model(arch, dataset, width=_SMALL[arch]).eval()
    x = torch.randn(3, *input_shape(dataset))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, DATASET_SHAPES[dataset][1])
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.allclose(traced(x), out, atol=1e-5)
    # Every layer is a module call, so the merge tracer sees named modules.
    ops = {n.op for n in traced.graph.nodes}
    assert "call_module" in ops


def test_mobilenet_has_permutation_and_dense_points():
    """The MobileNet's depthwise convolutions leave its expanded channels permutations only,
    while its residual streams take dense maps (what the benchmark uses it for)."""
    import autoalign

    model = build_model("mobilenet", "cifar10", width=0.25).eval()
    spec = autoalign.find_merge_points(model, torch.randn(2, 3, 32, 32))
    kinds = [p.kind for p in spec.points]
    assert kinds.count("permutation") >= 5 and kinds.count("linear") >= 3
    assert spec.coverage() == 1.0


def test_default_sizes_and_constructors():
    assert build_model("mlp", "mnist").hidden == (512, 512)
    assert build_model("mlp", "mnist", hidden=[64, 32, 16]).hidden == (64, 32, 16)
    assert build_model("mlp", "digits", width=100, depth=3).hidden == (100, 100, 100)
    assert MLP(784, [16], 10)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert SmallCNN(3, 7, width=4)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    vgg = VGG11(3, 10, width_multiplier=0.25, batchnorm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules())
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    full = VGG11()
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and convs[-1].out_channels == 512
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in full.modules()) == 5
    r = ResNet20(num_classes=10, width_multiplier=2)
    convs = [m for m in r.modules() if isinstance(m, torch.nn.Conv2d)]
    # 19 3x3 convs + 2 1x1 shortcut convs; widest stage 128 at multiplier 2.
    assert sum(c.kernel_size == (3, 3) for c in convs) == 19
    assert sum(c.kernel_size == (1, 1) for c in convs) == 2
    assert r.fc.in_features == 128


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("transformer", "mnist")
    with pytest.raises(ValueError, match="cifar10"):
        build_model("mlp", "svhn")


def test_train_models_digits_and_cache(tmp_path, monkeypatch, capsys):
    kw = dict(epochs=1, batch_size=32, lr=3e-3, device="cpu", out_dir=tmp_path, hidden=[64])
    paths = train_models("digits", "mlp", [0], **kw)
    assert len(paths) == 1 and paths[0].is_file()
    ckpt = torch.load(paths[0], weights_only=True)
    assert {"state_dict", "config", "test_accuracy", "train_seconds"} <= set(ckpt)
    assert ckpt["config"]["arch"] == "mlp" and ckpt["config"]["arch_kw"] == {"hidden": [64]}
    assert ckpt["test_accuracy"] > 0.5
    assert "trained" in capsys.readouterr().out

    # The same config and seed is served from the cache, without training.
    def _no_training(*args, **kwargs):
        raise AssertionError("retrained instead of using the cached checkpoint")

    monkeypatch.setattr(train_mod, "train_one", _no_training)
    mtime = paths[0].stat().st_mtime_ns
    again = train_models("digits", "mlp", [0], **kw)
    assert again == paths and paths[0].stat().st_mtime_ns == mtime
    assert "cached" in capsys.readouterr().out

    # A different config gets a different file; the checkpoint rebuilds.
    other = train_mod.checkpoint_path(tmp_path, train_mod.make_config("digits", "mlp", epochs=2, batch_size=32), 0)
    assert other != paths[0]
    model, loaded = load_checkpoint(paths[0])
    from autoalign.examples.datasets import load_dataset, make_loader

    x, y = load_dataset("digits", split="test")
    acc = evaluate(model, make_loader(x, y, batch_size=128, shuffle=False, dataset="digits"))
    assert acc == pytest.approx(loaded["test_accuracy"])
