"""Calibration data sorted by class (an image folder read in order): detected, and the
training-mode BatchNorm pass is run again on the same samples in a fixed random order.

The merge of two resnet18s through FusionBench was at chance because its calibration loader
read an image folder class by class: BatchNorm statistics re-estimated on single-class batches
had a first-layer variance 15 times too small. The merge tests on trained nets are in
test_invariants_batchnorm.py (``merge([A, A])`` on sorted batches computes ``A``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoalign
from autoalign.calibration import Calibration, class_sorted


def _labels(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("n", "classes", "batch"), [(48, 2, 4), (64, 4, 8), (512, 10, 64), (100, 2, 10), (60, 20, 6)])
def test_class_sorted_tells_sorted_from_random_batches(n, classes, batch):
    for seed in range(20):
        y = _labels(n, classes, seed)
        assert not class_sorted(list(y.split(batch))), (seed, y.split(batch))
        assert class_sorted(list(y.sort(stable=True).values.split(batch))), seed


def test_class_sorted_decides_nothing_without_evidence():
    assert not class_sorted([torch.zeros(64, dtype=torch.long)] * 4)  # one class
    assert not class_sorted([torch.tensor([0, 0]), torch.tensor([1, 1])])  # 2 pairs < min_pairs
    assert not class_sorted([])


def _batches(kind: str) -> list:
    x = torch.arange(24.0).reshape(12, 2)
    y = torch.arange(12) // 6
    cuts = [(0, 4), (4, 8), (8, 12)]
    if kind == "tensor":
        return [x[a:b] for a, b in cuts]
    if kind == "tuple":
        return [(x[a:b], y[a:b]) for a, b in cuts]
    if kind == "list":
        return [[x[a:b], y[a:b]] for a, b in cuts]
    return [{"x": x[a:b], "y": y[a:b]} for a, b in cuts]


def _inputs(batch, kind: str) -> torch.Tensor:
    return batch if kind == "tensor" else (batch["x"] if kind == "dict" else batch[0])


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict"])
def test_shuffled_lists_keep_the_samples_the_sizes_and_the_pairs(kind):
    batches = _batches(kind)
    again = Calibration(batches).shuffled(seed=0)
    assert again is not None and again.num_batches is None
    out = list(again.data)
    assert [type(b) for b in out] == [type(b) for b in batches]
    assert [len(_inputs(b, kind)) for b in out] == [4, 4, 4]
    xs = torch.cat([_inputs(b, kind) for b in out])
    assert sorted(xs[:, 0].tolist()) == list(range(0, 24, 2))
    assert not torch.equal(xs, torch.cat([_inputs(b, kind) for b in batches]))
    if kind != "tensor":
        ys = torch.cat([b["y"] if kind == "dict" else b[1] for b in out])
        assert torch.equal(ys, (xs[:, 0] / 2).long() // 6)  # every input keeps its target
    repeat = Calibration(batches).shuffled(seed=0)
    assert repeat is not None and torch.equal(torch.cat([_inputs(b, kind) for b in repeat.data]), xs)


def test_shuffled_reads_only_the_first_num_batches():
    again = Calibration(_batches("tuple"), num_batches=2).shuffled()
    assert again is not None and sorted(torch.cat([b[0][:, 0] for b in again.data]).tolist()) == list(range(0, 16, 2))


def test_shuffled_data_loader_is_a_fixed_permutation_with_the_same_batching():
    ds = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10) // 5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, drop_last=True)
    again = Calibration(loader, num_batches=1).shuffled(seed=3)
    assert again is not None and again.num_batches == 1
    first, second = ([x.tolist() for x, _ in again.data] for _ in range(2))
    assert first == second and [len(b) for b in first] == [4, 4]  # the same order in every pass
    assert first != [x.tolist() for x, _ in loader] and len(set(sum(first, []))) == 8


def test_shuffled_gives_none_for_data_it_cannot_reorder():
    class Batches:
        def __iter__(self):
            return iter(_batches("tuple"))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(8))

    assert Calibration(Batches()).shuffled() is None
    assert Calibration(torch.utils.data.DataLoader(Stream(), batch_size=4)).shuffled() is None
    assert Calibration([(torch.zeros(4, 2), "labels")]).shuffled() is None
    assert Calibration([torch.zeros(4, 2), torch.zeros(4, 3)]).shuffled() is None  # trailing shapes differ


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _two_blobs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes that differ mostly in their mean (the colour-coded image folder's case)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(256) // 128
    x = 0.3 * torch.randn(256, 2, generator=g) + torch.stack([2.0 * y - 1.0, 1.0 - 2.0 * y], 1)
    return x, y


def test_reset_bn_on_a_sorted_data_loader_gives_the_statistics_of_random_batches():
    x, y = _two_blobs()
    ds = torch.utils.data.TensorDataset(x, y)
    ordered = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)
    mixed = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    want = autoalign.reset_bn(_net(), mixed)
    with pytest.warns(UserWarning, match="sorted by class.*estimated again"):
        got = autoalign.reset_bn(_net(), ordered)
    for name in ("1", "4"):
        w, g = want.get_submodule(name), got.get_submodule(name)
        torch.testing.assert_close(g.running_var, w.running_var, rtol=0.1, atol=1e-3)
        torch.testing.assert_close(g.running_mean, w.running_mean, rtol=0.1, atol=0.05 * float(w.running_var.sqrt().max()))
    assert int(got.get_submodule("1").num_batches_tracked) == 8


def test_reset_bn_warns_about_sorted_batches_it_cannot_reorder():
    x, y = _two_blobs()

    class Batches:  # re-iterable, but neither a list nor a DataLoader
        def __iter__(self):
            return iter([(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)])

    net = _net()
    with pytest.warns(UserWarning, match="sorted by class.*Pass the calibration data in a random order"):
        autoalign.reset_bn(net, Batches())
    first = net.get_submodule("1")
    mixed = autoalign.reset_bn(copy.deepcopy(net), [(x[i::8], y[i::8]) for i in range(8)]).get_submodule("1")
    assert float((first.running_var / mixed.running_var).median()) < 0.5  # the between-class variance is missing


def test_random_batches_raise_no_warning(recwarn):
    x, y = _two_blobs()
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    autoalign.reset_bn(_net(), [(x[order][i : i + 32], y[order][i : i + 32]) for i in range(0, 256, 32)])
    assert not [w for w in recwarn if "sorted by class" in str(w.message)]
