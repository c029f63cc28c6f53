"""aligner="auto" and ridge="auto": candidates scored by the merged model's held-out loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoalign
from autoalign.select import RIDGE_GRID, split_batches


def _trained_mlp(seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def setup():
    from autoalign.examples.datasets import load_dataset

    x, y = load_dataset("digits")
    x = (x - x.mean()) / x.std()
    models = [_trained_mlp(s, x[:600], y[:600]) for s in (0, 1)]
    batches = [(x[i : i + 160], y[i : i + 160]) for i in range(600, 1400, 160)]  # 5 batches: 4 fit, 1 held out
    return models, batches


def test_auto_merges_with_the_candidate_of_lowest_heldout_loss(setup):
    models, batches = setup
    result = autoalign.merge_with_report(models, batches, aligner="auto", repair=None)
    sel = result.report.selection
    assert sel.option == "aligner" and sel.loss == "cross_entropy"
    assert set(sel.losses) == {"procrustes", "cca", "permutation"} and (sel.fit_batches, sel.heldout_batches) == (4, 1)
    assert sel.chosen == min(sel.losses, key=sel.losses.get)
    assert result.report.aligner == repr(autoalign.get_aligner(sel.chosen))
    # the reported losses are what a merge on the first four batches scores on the fifth
    x, y = batches[-1]
    for name, loss in sel.losses.items():
        merged = autoalign.merge(models, batches[:4], aligner=name, repair=None)
        with torch.no_grad():
            assert F.cross_entropy(merged(x), y).item() == pytest.approx(loss, rel=1e-5), name
    # and the final model is the chosen aligner's merge on all batches
    again = autoalign.merge(models, batches, aligner=sel.chosen, repair=None)
    torch.testing.assert_close(again(x), result.model(x))
    assert "*" in sel.table()


def test_ridge_auto_chooses_from_the_grid(setup):
    models, batches = setup
    result = autoalign.merge_with_report(models, batches, aligner="cca", ridge="auto", repair=None)
    sel = result.report.selection
    assert sel.option == "ridge" and list(sel.losses) == [f"ridge={r:g}" for r in RIDGE_GRID]
    assert sel.chosen == min(sel.losses, key=sel.losses.get)
    assert result.report.aligner == repr(autoalign.get_aligner("cca", ridge=float(sel.chosen.split("=")[1])))


def test_unlabelled_batches_are_scored_against_the_ensemble(setup):
    models, batches = setup
    sel = autoalign.merge_with_report(models, [x for x, _ in batches], aligner="auto", candidates=["identity", "permutation"]).report.selection
    assert sel.loss == "ensemble_kl" and set(sel.losses) == {"identity", "permutation"}
    assert all(v >= 0 for v in sel.losses.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"aligner": "auto", "candidates": []}, "non-empty list"),
        ({"aligner": "auto", "candidates": "cca"}, "non-empty list"),
        ({"aligner": "cca", "candidates": ["cca"]}, 'pass aligner="auto"'),
        ({"aligner": "auto", "ridge": "auto"}, "cannot be combined"),
        ({"aligner": "permutation", "ridge": "auto"}, "has no option 'ridge'"),
    ],
)
def test_bad_selection_options_are_named(setup, kwargs, match):
    models, batches = setup
    with pytest.raises(autoalign.MergeError, match=match):
        autoalign.merge(models, batches, **kwargs)


def test_one_batch_is_not_enough_to_choose(setup):
    models, batches = setup
    with pytest.raises(autoalign.MergeError, match="at least 2 calibration batches"):
        autoalign.merge(models, batches[:1], aligner="auto")
    fit, held = split_batches(autoalign.Calibration(batches, num_batches=3))
    assert (len(fit), len(held)) == (2, 1) and list(held.batches())[0] is batches[2]
