"""Choosing an aligner, or an aligner's ridge, by the merged model's loss on held-out calibration data.

``merge(..., aligner="auto")`` tries a short list of aligners (``procrustes``,
``cca`` and ``permutation`` unless ``candidates=[...]`` says otherwise); ``merge(..., aligner="cca",
ridge="auto")`` tries a grid of ridges (any aligner with a ``ridge`` option). Each
candidate merges the models on the first part of the calibration batches (80 %, at
least one batch), with every other option as given (scheme, repair, weights, ...);
the merged model's loss on the remaining batches decides, and the winner is merged
again on all of them. Nothing is chosen on test data (the CCA Merge authors chose
their ridge by test accuracy; Horoi et al., ICML 2024).

The held-out loss is the cross-entropy against the batch's labels when batches are
``(input, target)`` pairs with integer targets and the model returns ``(b, C)``
logits; otherwise it is the KL divergence from the input models' ensemble (the mean
of their softmax outputs) for ``(b, C)`` outputs, or the mean squared distance to
the ensemble's mean output for anything else — so unlabelled data works too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MergeError
from .calibration import Calibration, class_targets
from .trace import eval_mode

__all__ = ["Selection", "AUTO_CANDIDATES", "RIDGE_GRID", "selection_candidates", "split_batches", "heldout_loss"]

#: Aligners ``aligner="auto"`` tries by default.
AUTO_CANDIDATES: tuple[str, ...] = ("procrustes", "cca", "permutation")
#: Ridges ``ridge="auto"`` tries (in the aligner's own ridge units, relative for ``cca``).
RIDGE_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: Fraction of the calibration batches held out to score the candidates.
HELDOUT_FRACTION = 0.2


@dataclass
class Selection:
    """What ``aligner="auto"`` / ``ridge="auto"`` tried and chose.

    Attributes
    ----------
    option : str
        ``"aligner"`` or ``"ridge"``.
    chosen : str
        The chosen candidate (an aligner name, or ``"ridge=<value>"``).
    losses : dict of str to float
        Held-out loss of every candidate (``inf`` when its merge failed).
    loss : str
        ``"cross_entropy"``, ``"ensemble_kl"`` or ``"ensemble_mse"``.
    fit_batches, heldout_batches : int
        How the calibration batches were split.
    errors : dict of str to str
        Candidates whose merge raised, and the message.
    """

    option: str
    chosen: str
    losses: dict[str, float]
    loss: str
    fit_batches: int
    heldout_batches: int
    errors: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """One line per candidate, the chosen one marked."""
        rows = [f"{'*' if k == self.chosen else ' '} {k:<24} {v:.4f}" for k, v in self.losses.items()]
        return f"{self.option} chosen by held-out {self.loss} ({self.heldout_batches} batches):\n" + "\n".join(rows)


def selection_candidates(aligner: Any, options: dict[str, Any]) -> tuple[str, list[tuple[str, Any, dict[str, Any]]]] | None:
    """The candidates to try, or None when nothing is ``"auto"``.

    Returns
    -------
    (option, [(label, aligner, options), ...]) or None

    Raises
    ------
    MergeError
        For ``candidates=`` without ``aligner="auto"``, an empty or non-string list,
        or ``ridge="auto"`` together with ``aligner="auto"``.
    """
    opts = dict(options)
    if aligner == "auto":
        cands = opts.pop("candidates", AUTO_CANDIDATES)
        if isinstance(cands, str) or not cands or not all(isinstance(c, str) and c != "auto" for c in cands):
            raise MergeError(f"candidates must be a non-empty list of aligner names, got {cands!r}")
        if opts.get("ridge") == "auto":
            raise MergeError('ridge="auto" chooses the ridge of one aligner; it cannot be combined with aligner="auto"')
        return "aligner", [(str(c), c, dict(opts)) for c in cands]
    if "candidates" in opts:
        raise MergeError('candidates= lists the aligners that aligner="auto" tries; pass aligner="auto" too')
    if opts.get("ridge") == "auto":
        from .aligners import get_aligner

        get_aligner(aligner, **{**opts, "ridge": RIDGE_GRID[0]})  # an aligner without a ridge fails here, by name
        return "ridge", [(f"ridge={r:g}", aligner, {**opts, "ridge": r}) for r in RIDGE_GRID]
    return None


def split_batches(calib: Calibration) -> tuple[Calibration, Calibration]:
    """``(fit, held_out)``: the first batches and the last ``HELDOUT_FRACTION`` of them (at least one).

    Raises
    ------
    MergeError
        When there are fewer than two batches.
    """
    try:
        total = len(calib)
    except TypeError:
        total = sum(1 for _ in calib.batches())
    if total < 2:
        raise MergeError(
            f"choosing by held-out loss needs at least 2 calibration batches (one to merge on, one to score), "
            f"got {total}; pass more data or smaller batches"
        )
    held = max(1, int(math.floor(HELDOUT_FRACTION * total)))
    return calib.window(0, total - held), calib.window(total - held, total)


def heldout_loss(
    merged: nn.Module,
    models: Sequence[nn.Module],
    held: Calibration,
    *,
    ensemble: list[torch.Tensor] | None = None,
) -> tuple[float, str, list[torch.Tensor]]:
    """Mean held-out loss of ``merged`` (see the module docstring), the loss's name, and the
    ensemble outputs per batch (pass them back in as ``ensemble`` to reuse them)."""
    dev = held.device_for(merged)
    total, count, kind = 0.0, 0, ""
    keep = ensemble if ensemble is not None else []
    with torch.no_grad(), eval_mode(merged, *models):
        for k, (inputs, batch) in enumerate(held.labelled(dev)):
            out = merged(*inputs)
            if not isinstance(out, torch.Tensor):
                raise MergeError(f"choosing by held-out loss needs a model that returns a tensor, got {type(out).__name__}")
            y = class_targets(batch)
            if y is not None and out.dim() == 2 and y.shape[0] == out.shape[0]:
                kind = "cross_entropy"
                total += float(F.cross_entropy(out.float(), y.to(dev), reduction="sum"))
                count += int(y.shape[0])
                continue
            if ensemble is None:
                outs = [m(*inputs).float() for m in models]
                ref = torch.stack([o.softmax(-1) for o in outs]).mean(0) if out.dim() == 2 else torch.stack(outs).mean(0)
                keep.append(ref)
            ref = keep[k]
            if out.dim() == 2:
                kind = "ensemble_kl"
                total += float(F.kl_div(out.float().log_softmax(-1), ref, reduction="sum"))
                count += int(out.shape[0])
            else:
                kind = "ensemble_mse"
                total += float(((out.float() - ref) ** 2).sum())
                count += int(out.numel())
    if count == 0:
        raise MergeError("the held-out calibration batches were empty")
    return total / count, kind, keep
