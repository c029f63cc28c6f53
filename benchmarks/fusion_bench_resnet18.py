"""Two torchvision resnet18s trained on a CIFAR-10 subset, for the FusionBench run of
docs/fusion_bench.md.

Command line (run from the repository root)::

    python benchmarks/fusion_bench_resnet18.py --data-root ../shared/data --seeds 0 1

writes a CIFAR-10 subset as an image folder, ``<cache>/cifar10_folder_<train>_<test>/{train,val}/<class>/NNNN.jpg``
(the JPEGs of the data root's tarball, ``--train-per-class`` and ``--test-per-class`` images
per class, a fixed random choice), trains one ``torchvision.models.resnet18(num_classes=10)`` per
seed on its ``train`` folder (32 x 32 pixels, the transform of
``autoalign.integrations.datasets.image_folder``, random crops and flips) and saves its state
dict to ``<cache>/checkpoints/fb_resnet18_<hash>_seed<seed>.pt``; ``<cache>`` is
``~/.cache/autoalign`` (or ``AUTOALIGN_CACHE``). A second call with the same settings reuses
both. It prints the folder, the checkpoints, their accuracy on the ``val`` folder and the CPU
seconds of training, as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import random
import sys
import tarfile
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from autoalign.examples.datasets import resolve_cache_dir, resolve_data_root  # noqa: E402
from autoalign.integrations.datasets import image_folder  # noqa: E402

__all__ = ["write_image_folder", "train_resnet18", "main"]

TARBALL = "CIFAR-10-jpg/cifar10-jpg.tar.gz"


def write_image_folder(data_root: pathlib.Path, out: pathlib.Path, train_per_class: int, test_per_class: int) -> pathlib.Path:
    """Copy a fixed random subset of CIFAR-10's JPEGs into ``out/{train,val}/<class>/``.

    Parameters
    ----------
    data_root : pathlib.Path
        Holds ``CIFAR-10-jpg/cifar10-jpg.tar.gz`` (see ``../shared/data/README.md``).
    out : pathlib.Path
        The image folder; left as it is when its ``.done`` marker exists.
    train_per_class, test_per_class : int
        Images per class from the train and the test split.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    if (out / ".done").exists():
        return out
    with tarfile.open(data_root / TARBALL) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_folder: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            _, split, cls, _ = m.name.split("/")
            by_folder.setdefault((split, cls), []).append(m)
        rng = random.Random(0)
        keep: list[tuple[tarfile.TarInfo, pathlib.Path]] = []
        for (split, cls), group in sorted(by_folder.items()):
            group.sort(key=lambda m: m.name)
            folder = out / ("train" if split == "train" else "val") / cls
            folder.mkdir(parents=True, exist_ok=True)
            keep += [(m, folder) for m in rng.sample(group, train_per_class if split == "train" else test_per_class)]
        for m, folder in sorted(keep, key=lambda k: k[0].offset):  # in archive order: a gzip stream seeks forward only
            (folder / pathlib.Path(m.name).name).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
    (out / ".done").touch()
    return out


def _tensors(root: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An image folder's images (the 32-pixel ``image_folder`` transform) and labels."""
    ds = image_folder(str(root), image_size=32)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


def train_resnet18(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, lr: float, batch_size: int) -> torch.nn.Module:
    """A torchvision resnet18 trained with SGD (Nesterov momentum 0.9, weight decay 5e-4,
    one-cycle schedule), random 4-pixel-padded crops and horizontal flips; the seed sets the
    initialisation, the order and the augmentation.

    Parameters
    ----------
    x : torch.Tensor
        ``(n, 3, 32, 32)`` normalised images.
    y : torch.Tensor
        ``(n,)`` class indices.
    seed : int
    epochs : int
    lr : float
        The schedule's peak learning rate.
    batch_size : int

    Returns
    -------
    torch.nn.Module
        In eval mode.
    """
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=int(y.max()) + 1)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    per_epoch = (len(y) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.25)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            xb = F.pad(x[idx], (4, 4, 4, 4))
            dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
            xb = xb[:, :, dy : dy + 32, dx : dx + 32]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, in chunks of 500 images."""
    return float(torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, len(y), 500)]).eq(y).float().mean())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line (see the module docstring).

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    dict
        What it prints: the folder, the settings and, per seed, the checkpoint's path, its
        accuracy on ``val`` and the CPU seconds of training (None when it was reused).
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=None, help="holds CIFAR-10-jpg/ (default: $AUTOALIGN_DATA)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cache = resolve_cache_dir(None)
    folder = write_image_folder(resolve_data_root(args.data_root), cache / f"cifar10_folder_{args.train_per_class}_{args.test_per_class}",
                                args.train_per_class, args.test_per_class)
    config = {k: getattr(args, k) for k in ("train_per_class", "test_per_class", "epochs", "lr", "batch_size")}
    tag = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    (cache / "checkpoints").mkdir(parents=True, exist_ok=True)
    xtr, ytr = _tensors(folder / "train")
    xva, yva = _tensors(folder / "val")
    out: dict[str, Any] = {"folder": str(folder), "config": config, "models": {}}
    for seed in args.seeds:
        path = cache / "checkpoints" / f"fb_resnet18_{tag}_seed{seed}.pt"
        cpu = None
        if not path.exists():
            t0 = time.process_time()
            net = train_resnet18(xtr, ytr, seed, args.epochs, args.lr, args.batch_size)
            cpu = round(time.process_time() - t0, 1)
            torch.save(net.state_dict(), path)
        import torchvision

        net = torchvision.models.resnet18(num_classes=10)
        net.load_state_dict(torch.load(path, weights_only=True))
        out["models"][f"seed{seed}"] = {"path": str(path), "val_accuracy": _accuracy(net.eval(), xva, yva), "train_cpu_s": cpu}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
