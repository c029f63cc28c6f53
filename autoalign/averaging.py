"""How the aligned models are averaged: uniform, Fisher-weighted, or with learned coefficients.

After alignment every model's state dict ``θ_m`` lives in the merged coordinates.
:func:`autoalign.merge` then combines them (``averaging=``):

``"uniform"``
    ``θ = Σ_m w_m θ_m`` with the merge weights ``w`` (the CCA Merge paper's).
``"fisher"``
    Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022): per parameter
    element ``θ = Σ_m w_m F_m θ_m / Σ_m w_m F_m`` with ``F_m`` the diagonal Fisher
    information of the aligned model ``m`` estimated on the calibration data
    (:func:`fisher_diagonals`). Equal Fishers give plain averaging.
``"learned"``
    Non-uniform, parameter-wise merging: ``θ = Σ_m α_m ⊙ θ_m`` with
    ``α = softmax(a)`` over models (so the coefficients sum to one per element),
    ``a`` initialised at ``log w`` (uniform averaging) and learned by gradient
    descent on the calibration data — cross-entropy to the labels when batches
    carry them, otherwise distillation to the ensemble of the aligned models
    (:func:`learn_coefficients`). ``granularity="layer"`` learns one coefficient per
    model and parameter tensor, ``"element"`` one per model and parameter element.

Buffers (BatchNorm running statistics, counters) are always averaged uniformly;
repair re-estimates them afterwards.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .apply import average_state_dicts
from .errors import MergeError
from .calibration import Calibration, class_targets
from .trace import eval_mode
from .vocab import AVERAGINGS, check_choice

__all__ = ["fisher_diagonals", "fisher_average", "learn_coefficients", "average_aligned"]

LEARNED_OPTIONS = {"granularity": "layer", "lr": 0.05, "epochs": 1, "objective": "auto", "temperature": 1.0}
FISHER_OPTIONS = {"labels": "model", "chunk": 16, "seed": 0}


def _check_options(options: dict[str, Any], allowed: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise MergeError(f"unknown averaging_options {unknown} for averaging={what!r}; valid: {sorted(allowed)}")
    return {**allowed, **options}


def _param_keys(model: nn.Module) -> dict[str, str]:
    """State-dict key → name of the (deduplicated) parameter it holds; buffers are left out."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {k: by_id[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in by_id}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise MergeError(
            "Fisher and learned averaging need a classifier whose output is logits of shape (batch, classes); "
            f"got {type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
        )
    return out


def fisher_diagonals(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    labels: str = "model",
    chunk: int = 16,
    seed: int = 0,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Diagonal Fisher information of each model's parameters on the calibration data.

    ``F[θ] = E_x E_y [(∂ log p(y|x) / ∂θ)²]`` estimated with per-sample gradients
    (``torch.func``): ``y`` is drawn from the model's own predictive
    distribution (``labels="model"``, the true Fisher; a fixed ``seed`` makes it
    deterministic) or taken from the batches (``labels="data"``, the empirical
    Fisher).

    Parameters
    ----------
    models : sequence of nn.Module
        Classifiers returning logits ``(batch, classes)``; not modified, run in eval mode.
    data : iterable of batches
        Calibration data (``(input, target)`` batches for ``labels="data"``).
    labels : {"model", "data"}
    chunk : int
        Samples per vectorised per-sample-gradient call (memory ∝ chunk × parameters).

    Returns
    -------
    list of dict of str to Tensor
        Per model, per parameter name, the Fisher diagonal (same shape, float64).

    Examples
    --------
    >>> import torch
    >>> from autoalign.averaging import fisher_diagonals
    >>> net = torch.nn.Linear(3, 2)
    >>> f = fisher_diagonals([net], [torch.randn(8, 3)])[0]
    >>> sorted(f), tuple(f["weight"].shape), bool((f["weight"] >= 0).all())
    (['bias', 'weight'], (2, 3), True)
    """
    from torch.func import functional_call, grad, vmap

    if labels not in ("model", "data"):
        raise MergeError(f"fisher labels must be 'model' or 'data', got {labels!r}")
    calib = Calibration.coerce(data, input_fn=input_fn, num_batches=num_batches, device=device)
    out: list[dict[str, torch.Tensor]] = []
    for model in models:
        dev = calib.device_for(model)
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b for n, b in model.named_buffers()}
        acc = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
        gen = torch.Generator(device="cpu").manual_seed(seed)
        count = 0

        def loss_one(p: dict[str, torch.Tensor], x: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor:
            logits = _logits(functional_call(model, (p, buffers), tuple(t.unsqueeze(0) for t in x)))
            return F.cross_entropy(logits, y.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
        with eval_mode(model):
            for inputs, batch in calib.labelled(dev):
                tensors = tuple(t for t in inputs if isinstance(t, torch.Tensor))
                if len(tensors) != len(inputs):
                    raise MergeError("Fisher averaging needs model inputs that are all tensors; pass input_fn=")
                bsz = tensors[0].shape[0]
                if labels == "data":
                    y = class_targets(batch, bsz)
                    if y is None:
                        raise MergeError("fisher labels='data' needs (input, target) batches with integer class targets")
                    y = y.to(dev)
                else:
                    with torch.no_grad():
                        probs = F.softmax(_logits(model(*inputs)).double(), dim=1).cpu()
                    y = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(dev)
                for s in range(0, bsz, chunk):
                    g = per_sample(params, tuple(t[s : s + chunk] for t in tensors), y[s : s + chunk])
                    for n, v in g.items():
                        acc[n] += (v.detach().to(torch.float64) ** 2).sum(0)
                count += bsz
        if count == 0:
            raise MergeError("Fisher averaging: the calibration data yielded no batch")
        out.append({n: v / count for n, v in acc.items()})
    return out


def fisher_average(
    state_dicts: Sequence[dict[str, torch.Tensor]],
    fishers: Sequence[dict[str, torch.Tensor]],
    param_of_key: dict[str, str],
    weights: Sequence[float],
    *,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """``Σ_m w_m F_m θ_m / Σ_m w_m F_m`` per parameter element; buffers averaged with ``w``.

    ``eps`` (relative to the largest mean Fisher of the tensor) is added to every
    Fisher so elements no model is sensitive to fall back to plain averaging.

    Examples
    --------
    >>> import torch
    >>> from autoalign.averaging import fisher_average
    >>> sds = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]
    >>> fs = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([1.0, 1.0])}]
    >>> fisher_average(sds, fs, {"w": "w"}, [0.5, 0.5])["w"].tolist()
    [0.5, 0.25]
    """
    w = [float(x) / float(sum(weights)) for x in weights]
    merged = average_state_dicts(list(state_dicts), w)  # buffers; parameters are replaced below
    for key, ref in state_dicts[0].items():
        name = param_of_key.get(key)
        if name is None or not ref.is_floating_point():
            continue
        fs = [f[name].to(torch.float64) for f in fishers]
        scale = max(float(f.mean()) for f in fs)
        e = eps * scale + 1e-30
        num = sum(wi * (f + e) * sd[key].to(torch.float64) for wi, f, sd in zip(w, fs, state_dicts))
        den = sum(wi * (f + e) for wi, f in zip(w, fs))
        merged[key] = (num / den).to(ref.dtype)
    return merged


def learn_coefficients(
    template: nn.Module,
    state_dicts: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    data: Iterable[Any],
    *,
    teachers: Sequence[nn.Module] | None = None,
    granularity: str = "layer",
    lr: float = 0.05,
    epochs: int = 1,
    objective: str = "auto",
    temperature: float = 1.0,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Learn per-model merging coefficients ``α = softmax(a)`` by gradient descent.

    Parameters
    ----------
    template : nn.Module
        A model of the architecture (its parameters are not used; run in eval mode).
    state_dicts : sequence of dict
        The aligned models' state dicts ``θ_m`` (same keys and shapes).
    weights : sequence of float
        Initial coefficients (``a = log w``): with ``lr=0`` the result is the
        uniform weighted average.
    data : iterable of batches
        Calibration data.
    teachers : sequence of nn.Module, optional
        Models whose mean logits are the distillation target (required for
        ``objective="distill"`` or when batches have no labels).
    granularity : {"layer", "element"}
        One coefficient per model and parameter tensor, or per element.
    lr : float
        Adam learning rate on the logits ``a``.
    epochs : int
        Passes over the calibration data.
    objective : {"auto", "labels", "distill"}
        Cross-entropy to the labels, KL divergence to the teachers' mean
        softmax (at ``temperature``), or labels when batches carry them.

    Returns
    -------
    merged : dict of str to Tensor
        The merged state dict.
    losses : list of float
        The training loss of every step.

    Examples
    --------
    >>> import torch
    >>> from autoalign.averaging import learn_coefficients
    >>> nets = [torch.nn.Linear(3, 2) for _ in range(2)]
    >>> sds = [n.state_dict() for n in nets]
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> merged, losses = learn_coefficients(nets[0], sds, [0.5, 0.5], data, lr=0.0)
    >>> torch.allclose(merged["weight"], (sds[0]["weight"] + sds[1]["weight"]) / 2), len(losses)
    (True, 1)
    """
    from torch.func import functional_call

    if granularity not in ("layer", "element"):
        raise MergeError(f"averaging_options granularity must be 'layer' or 'element', got {granularity!r}")
    if objective not in ("auto", "labels", "distill"):
        raise MergeError(f"averaging_options objective must be 'auto', 'labels' or 'distill', got {objective!r}")
    if not (isinstance(epochs, int) and epochs >= 0) or not lr >= 0:
        raise MergeError(f"averaging_options need epochs >= 0 (int) and lr >= 0, got epochs={epochs!r}, lr={lr!r}")
    calib = Calibration.coerce(data, input_fn=input_fn, num_batches=num_batches, device=device)
    model = copy.deepcopy(template)
    dev = calib.device_for(model)
    model.to(dev)
    n = len(state_dicts)
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float32, device=dev)
    w = w / w.sum()
    param_of_key = _param_keys(model)
    names = sorted(set(param_of_key.values()))
    key_of = {v: k for k, v in param_of_key.items()}
    stacked = {name: torch.stack([sd[key_of[name]].to(dev, torch.float32) for sd in state_dicts]) for name in names}
    logits = {}
    for name in names:
        shape = (n,) + ((1,) * (stacked[name].dim() - 1) if granularity == "layer" else tuple(stacked[name].shape[1:]))
        logits[name] = torch.log(w.clamp_min(1e-12)).reshape((n,) + (1,) * (len(shape) - 1)).expand(shape).clone().requires_grad_(True)
    averaged = average_state_dicts(list(state_dicts), w.tolist())
    buffers = {bname: averaged[bname].to(dev) for bname, _ in model.named_buffers()}

    def combined() -> dict[str, torch.Tensor]:
        return {name: (torch.softmax(logits[name], dim=0) * stacked[name]).sum(0) for name in names}

    opt = torch.optim.Adam(list(logits.values()), lr=lr) if lr > 0 else None
    losses: list[float] = []
    with eval_mode(model, *(teachers or ())):
        for _ in range(epochs):
            for inputs, batch in calib.labelled(dev):
                out = _logits(functional_call(model, (combined(), buffers), inputs))
                y = class_targets(batch, out.shape[0])
                use_labels = objective == "labels" or (objective == "auto" and y is not None)
                if use_labels:
                    if y is None:
                        raise MergeError("averaging_options objective='labels' needs (input, target) batches with class targets")
                    loss = F.cross_entropy(out, y.to(dev))
                else:
                    if not teachers:
                        raise MergeError("learned averaging without labels distils to the ensemble and needs teachers")
                    with torch.no_grad():
                        target = torch.stack([_logits(t(*inputs)) for t in teachers]).mean(0)
                    loss = F.kl_div(
                        F.log_softmax(out / temperature, dim=1), F.softmax(target / temperature, dim=1), reduction="batchmean"
                    )
                losses.append(float(loss.detach()))
                if opt is not None:
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    with torch.no_grad():
        params = combined()
    merged = average_state_dicts(list(state_dicts), w.tolist())  # buffers; parameters are replaced below
    for key, name in param_of_key.items():
        ref = state_dicts[0][key]
        merged[key] = params[name].to(ref.dtype).to(ref.device)
    return merged, losses


def average_aligned(
    averaging: str,
    template: nn.Module,
    state_dicts: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    data: Iterable[Any],
    *,
    options: dict[str, Any] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Combine aligned state dicts by ``averaging`` (see the module docstring).

    Returns
    -------
    merged : dict of str to Tensor
    info : dict
        What was done (e.g. ``losses`` of learned averaging).

    Examples
    --------
    >>> import torch
    >>> from autoalign.averaging import average_aligned
    >>> nets = [torch.nn.Linear(3, 2) for _ in range(2)]
    >>> sds = [n.state_dict() for n in nets]
    >>> merged, info = average_aligned("uniform", nets[0], sds, [0.5, 0.5], [])
    >>> torch.allclose(merged["bias"], (sds[0]["bias"] + sds[1]["bias"]) / 2)
    True
    """
    options = dict(options or {})
    check_choice("averaging", averaging, AVERAGINGS)
    calib = Calibration.coerce(data, input_fn=input_fn, num_batches=num_batches, device=device)
    if averaging == "uniform":
        if options:
            raise MergeError(f"averaging='uniform' takes no averaging_options, got {sorted(options)}")
        return average_state_dicts(list(state_dicts), list(weights)), {}
    aligned = []
    for sd in state_dicts:
        m = copy.deepcopy(template)
        m.load_state_dict(sd)
        aligned.append(m)
    if averaging == "fisher":
        opts = _check_options(options, FISHER_OPTIONS, averaging)
        fishers = fisher_diagonals(
            aligned, calib, labels=opts["labels"], chunk=int(opts["chunk"]), seed=int(opts["seed"]),
        )
        return fisher_average(state_dicts, fishers, _param_keys(template), weights), {"fisher_labels": opts["labels"]}
    opts = _check_options(options, LEARNED_OPTIONS, averaging)
    merged, losses = learn_coefficients(
        template, state_dicts, weights, calib, teachers=aligned, **opts,
    )
    return merged, {"losses": losses, **opts}
