"""Small model zoo for the merging experiments.

Every model is a plain :class:`torch.nn.Module` without data-dependent control
flow, built from ``torch.nn`` leaf modules (one module instance per use, no
functional activations), so :func:`torch.fx.symbolic_trace` and
:func:`autoalign.trace.trace` see every layer as a named module.

``build_model(arch, dataset, **kw)`` picks the input channels and size from the
data set name (``digits`` 1x8x8, ``mnist`` / ``fashion-mnist`` 1x28x28,
``cifar10`` 3x32x32).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "DATASET_SHAPES",
    "MLP",
    "SmallCNN",
    "VGG11",
    "ResNet20",
    "BasicBlock",
    "MobileNet",
    "build_model",
    "canonical_arch",
    "input_shape",
]

#: ``(channels, height, width)`` and number of classes per data set. Kept here (and
#: equal to ``autoalign.examples.datasets.DATASET_INFO``) so that the zoo does not depend on
#: the library.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}

#: Architecture names accepted by :func:`build_model`.
ARCHITECTURES: tuple[str, ...] = ("mlp", "smallcnn", "vgg11", "resnet20", "resbn", "mobilenet")

_ARCH_ALIASES = {"mobilenetv2": "mobilenet", "mobilenet_v2": "mobilenet", "cnn": "smallcnn", "small_cnn": "smallcnn", "vgg": "vgg11", "resnet": "resnet20"}
_DATASET_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}


def _scaled(channels: int, multiplier: float) -> int:
    return max(1, int(round(channels * multiplier)))


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs.

    Parameters
    ----------
    in_features : int
        Size of the flattened input (e.g. 784 for 1x28x28).
    hidden : sequence of int
        Width of each hidden layer, e.g. ``(512, 512)``.
    num_classes : int
        Number of outputs.

    Notes
    -----
    Input ``(b, *)`` with ``prod(*) == in_features``; output ``(b, num_classes)``.
    Layers are ``flatten``, then ``layers.{2i}`` (Linear) / ``layers.{2i+1}`` (ReLU)
    and ``head`` (Linear).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.hidden = tuple(int(h) for h in hidden)
        self.num_classes = int(num_classes)
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        prev = self.in_features
        for h in self.hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(prev, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))


def _conv_bn_relu(cin: int, cout: int, *, batchnorm: bool = True) -> list[nn.Module]:
    if batchnorm:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks with two max-pools, global average pool, linear head.

    Parameters
    ----------
    in_channels : int
        Image channels (1 or 3).
    num_classes : int
        Number of outputs.
    width : int
        Channels of the first two blocks; the last two have ``2 * width``.

    Notes
    -----
    Input ``(b, in_channels, H, W)`` with ``H, W >= 4``; output ``(b, num_classes)``.
    Structure: ``[w, w, pool, 2w, 2w, pool, avgpool(1), flatten, linear]``.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = int(width)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w),
            *_conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))


_VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """CIFAR-style VGG11: eight 3x3 conv(-BN)-ReLU layers, five max-pools, one linear.

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_classes : int
        Number of outputs.
    width_multiplier : float
        Scales every conv's channels (64 .. 512 at 1).
    batchnorm : bool
        Put a BatchNorm2d after every conv (the conv then has no bias).
    input_size : int
        Height (= width) of the input. Max-pools that would shrink the map below
        1x1 are left out (32 -> 5 pools, 28 -> 4, 8 -> 3), so the classifier
        always sees a 1x1 map.

    Notes
    -----
    Input ``(b, in_channels, input_size, input_size)``; output ``(b, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width_multiplier: float = 1,
        batchnorm: bool = True,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        n_pools = min(5, int(math.floor(math.log2(max(1, input_size)))))
        # Keep the first n_pools pools (the later ones are dropped for small inputs).
        layers: list[nn.Module] = []
        cin = in_channels
        pools_seen = 0
        for item in _VGG11_CFG:
            if item == "M":
                if pools_seen < n_pools:
                    layers.append(nn.MaxPool2d(2))
                pools_seen += 1
            else:
                cout = _scaled(int(item), width_multiplier)
                layers += _conv_bn_relu(cin, cout, batchnorm=batchnorm)
                cin = cout
        self.features = nn.Sequential(*layers)
        size = input_size
        for _ in range(n_pools):
            size //= 2
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 conv + BN when the stride or the
    channel count changes (``shortcut`` is then an ``nn.Sequential``, else ``None``).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + identity)


class ResNet20(nn.Module):
    """CIFAR ResNet-20: a 3x3 stem and three stages of three basic blocks.

    Parameters
    ----------
    num_classes : int
        Number of outputs.
    width_multiplier : float
        Stage widths are ``16, 32, 64`` times this.
    in_channels : int
        Image channels.

    Notes
    -----
    Input ``(b, in_channels, H, W)``; output ``(b, num_classes)``. Stages 2 and 3
    downsample by 2; a global average pool precedes the linear head.
    """

    def __init__(self, num_classes: int = 10, width_multiplier: float = 1, in_channels: int = 3) -> None:
        super().__init__()
        widths = [_scaled(c, width_multiplier) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(3):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, w, stride))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class ResidualBNCNN(nn.Module):
    """The small residual BatchNorm CNN of issue 16: a stem conv-BN-ReLU (``width``
    channels), one residual block ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``, a
    strided conv-BN-ReLU to ``2 · width``, a second block, global average pool, linear head.

    Input ``(b, in_channels, H, W)``; output ``(b, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w2 = 2 * width
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width))
        self.block1 = BasicBlock(width, width)
        self.down = nn.Sequential(nn.Conv2d(width, w2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU())
        self.block2 = BasicBlock(w2, w2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 projection-BN,
    plus the input when the shape is kept (no ReLU after the sum)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNet(nn.Module):
    """A CIFAR-sized MobileNetV2 (Sandler et al., CVPR 2018): a 3x3 stem, inverted residual
    stages ``(expand, channels, blocks, stride)`` = (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2),
    (6, 64, 2, 2), a 1x1 conv to 256, average pool, linear head; every width times
    ``width_multiplier`` (fewer and earlier-strided stages than ImageNet's, to train on a CPU). Its depthwise convolutions leave the expanded channels only
    permutations, while the residual streams take dense maps.

    Notes
    -----
    Input ``(b, in_channels, 32, 32)``; output ``(b, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, width_multiplier: float = 1, in_channels: int = 3) -> None:
        super().__init__()
        stem = _scaled(32, width_multiplier)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())
        blocks: list[nn.Module] = []
        cin = stem
        for expand, c, n, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2)):
            cout = _scaled(c, width_multiplier)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        last = _scaled(256, width_multiplier)
        self.head = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.head(self.blocks(self.stem(x))))))


def _canonical_dataset(dataset: str) -> str:
    key = _DATASET_ALIASES.get(dataset.strip().lower(), dataset.strip().lower())
    if key not in DATASET_SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_SHAPES)}")
    return key


def canonical_arch(arch: str) -> str:
    """Normalise an architecture name (``"cnn"`` -> ``"smallcnn"``, ...)."""
    key = _ARCH_ALIASES.get(arch.strip().lower(), arch.strip().lower())
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return key


def input_shape(dataset: str) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one image of ``dataset``."""
    return DATASET_SHAPES[_canonical_dataset(dataset)][0]


def build_model(arch: str, dataset: str, *, width: float | None = None, **kw: Any) -> nn.Module:
    """Build a zoo model sized for a data set.

    Parameters
    ----------
    arch : {"mlp", "smallcnn", "vgg11", "resnet20", "resbn", "mobilenet"}
        Architecture (``"cnn"`` is an alias of ``"smallcnn"``).
    dataset : {"digits", "mnist", "fashion-mnist", "cifar10"}
        Sets the input channels / size and the number of classes.
    width : float or None
        One generic width knob: hidden size of every MLP layer (default 512),
        SmallCNN ``width`` (default 32), or VGG11 / ResNet20 ``width_multiplier``
        (default 1). ``None`` keeps the default.
    **kw
        Passed to the constructor, e.g. ``hidden=(256, 128)`` or ``depth=3`` for
        the MLP (``depth`` hidden layers of ``width``, default 2),
        ``batchnorm=False`` for VGG11.

    Returns
    -------
    torch.nn.Module
        Maps ``(b, C, H, W)`` to ``(b, num_classes)`` logits.
    """
    a = canonical_arch(arch)
    (c, h, w), num_classes = DATASET_SHAPES[_canonical_dataset(dataset)]
    num_classes = int(kw.pop("num_classes", num_classes))
    if a == "mlp":
        depth = int(kw.pop("depth", 2))
        hidden = kw.pop("hidden", None)
        if hidden is None:
            hidden = [int(width if width is not None else 512)] * depth
        elif width is not None:
            raise ValueError("give the MLP either hidden= or width=, not both")
        return MLP(c * h * w, hidden, num_classes, **kw)
    if a == "smallcnn":
        return SmallCNN(c, num_classes, width=int(width if width is not None else kw.pop("width", 32)), **kw)
    if a == "vgg11":
        wm = width if width is not None else kw.pop("width_multiplier", 1)
        return VGG11(c, num_classes, width_multiplier=wm, input_size=h, **kw)
    if a == "resbn":
        return ResidualBNCNN(c, num_classes, width=int(width if width is not None else kw.pop("width", 32)))
    wm = width if width is not None else kw.pop("width_multiplier", 1)
    if a == "mobilenet":
        return MobileNet(num_classes, width_multiplier=wm, in_channels=c, **kw)
    return ResNet20(num_classes, width_multiplier=wm, in_channels=c, **kw)
