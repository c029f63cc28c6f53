"""autoalign as a FusionBench method (``pip install "autoalign[fusion-bench]"``).

Importing this module imports FusionBench; ``import autoalign`` does not. The method configs
``method=autoalign/<aligner>`` reach FusionBench through the Hydra search-path plug-in shipped
with autoalign (``hydra_plugins/autoalign_fusion_bench``), so a run is::

    fusion_bench method=autoalign/cca modelpool=<pool> taskpool=<task pool>

- :class:`AutoAlignAlgorithm`: the method. It loads the pool's models, reads calibration batches
  from the pool's train dataset, merges with :func:`autoalign.merge.run` and returns a dict:
  ``merged`` (the merged model), optionally each input model and their ``ensemble``, and
  ``autoalign`` (the report), which FusionBench evaluates and writes to its JSON report.
- :class:`AutoAlignModelPool`: a ``BaseModelPool`` that saves the ``merged`` entry of such a
  dict when ``merged_model_save_path`` is set.
- :class:`AccuracyTaskPool`: top-1 accuracy and loss of a classifier on a dataset.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.method import BaseAlgorithm
from fusion_bench.mixins import SimpleProfilerMixin, auto_register_config
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.taskpool import BaseTaskPool

from ..errors import OptionError
from ..merge import run as merge_run
from ..options import MergeOptions
from ..report import MergeReport

__all__ = ["AutoAlignAlgorithm", "AutoAlignModelPool", "AccuracyTaskPool", "EnsembleModel", "report_dict"]


def _plain(value: Any) -> Any:
    """A Hydra ``DictConfig``/``ListConfig`` as plain dicts and lists (other values as they are)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with FusionBench
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class EnsembleModel(nn.Module):
    """The output ensemble of several models: the mean of their softmax probabilities.

    Examples
    --------
    >>> import torch
    >>> ens = EnsembleModel([torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)])
    >>> ens(torch.randn(4, 3)).shape
    torch.Size([4, 2])
    """

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the mean probability (usable as logits)."""
        probs = torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


def report_dict(report: MergeReport, opts: MergeOptions) -> dict[str, Any]:
    """A merge report as JSON-ready data: the choices, per-point outcomes, table and timings.

    Parameters
    ----------
    report : MergeReport
    opts : MergeOptions
        The options of the merge (their plain values are copied under ``options``).

    Returns
    -------
    dict
    """
    keys = ("aligner", "aligner_options", "reference", "weights", "scheme", "max_iterations", "averaging",
            "averaging_options", "repair", "batchnorm", "features", "precision", "num_batches", "device")
    options = {k: getattr(opts, k) for k in keys}
    options = {k: (list(v) if isinstance(v, tuple) else v if v is None or isinstance(v, (str, int, float, bool, list, dict)) else str(v))
               for k, v in options.items()}
    sel = report.selection
    return {
        "aligner": report.aligner,
        "reference": report.reference,
        "weights": list(report.weights),
        "scheme": report.scheme,
        "iterations": report.iterations,
        "averaging": report.averaging,
        "repair": report.repair,
        "folded_batchnorms": report.folded_batchnorms,
        "repair_notes": dict(report.repair_notes),
        "timings": {k: round(float(v), 6) for k, v in report.timings.items()},
        # by name (FusionBench's console printer cannot show an empty list)
        "points": {
            p.name: {"dim": p.dim, "allowed": p.allowed, "used": p.used, "projected": p.projected,
                     "score": p.score, "seconds": round(p.seconds, 6), "note": p.note}
            for p in report.points
        },
        "table": report.table(),
        "selection": None if sel is None else str(sel),
        "options": options,
    }


@auto_register_config
class AutoAlignAlgorithm(SimpleProfilerMixin, BaseAlgorithm):
    """Merge a pool of models trained from different seeds with autoalign.

    Every merge option of :func:`autoalign.merge` is a config key; ``aligner_options`` holds the
    aligner's own hyperparameters (e.g. ``{ridge: 0.1}`` for CCA).

    Parameters
    ----------
    aligner : str, default "procrustes"
        A registered aligner (:func:`autoalign.list_aligners`) or ``"auto"``.
    aligner_options : dict, optional
    reference : int or "best", default 0
    weights : list of float, optional
    scheme, max_iterations, averaging, averaging_options, repair, batchnorm, features, precision :
        As for :func:`autoalign.merge`.
    batch_size : int, default 64
        Calibration batch size.
    num_batches : int, optional
        Calibration batches read per pass (default: the whole dataset, read in a fixed random
        order, so that the first batches hold every class).
    dataset : str, optional
        The pool's train dataset to calibrate on (default: the first one).
    device : str, optional
        Where the merge runs (default: where the models are).
    evaluate_inputs : bool, default True
        Also return the input models and their ensemble, so that the task pool reports them next
        to the merged model.
    num_workers : int, default 0
        DataLoader workers.

    Examples
    --------
    >>> import torch
    >>> from autoalign.integrations.fusion_bench import AutoAlignAlgorithm
    >>> from fusion_bench.modelpool import BaseModelPool
    >>> nets = {f"m{i}": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for i in range(2)}
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.zeros(32, dtype=torch.long))
    >>> pool = BaseModelPool(nets, train_datasets={"calib": data})
    >>> out = AutoAlignAlgorithm(aligner="cca", batch_size=16, evaluate_inputs=False).run(pool)
    >>> sorted(out), list(out["autoalign"]["points"])
    (['autoalign', 'merged'], ['0'])
    """

    def __init__(
        self,
        aligner: str = "procrustes",
        aligner_options: Mapping[str, Any] | None = None,
        reference: int | str = 0,
        weights: list[float] | None = None,
        scheme: str = "all_to_one",
        max_iterations: int = 10,
        averaging: str = "uniform",
        averaging_options: Mapping[str, Any] | None = None,
        repair: str | None = "auto",
        batchnorm: str = "fold",
        features: str = "activation",
        precision: str | None = None,
        batch_size: int = 64,
        num_batches: int | None = None,
        dataset: str | None = None,
        device: str | None = None,
        evaluate_inputs: bool = True,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.merge_options = self.options()  # bad options fail here, before any model is loaded
        self.last_report: dict[str, Any] | None = None

    def options(self) -> MergeOptions:
        """The :class:`~autoalign.MergeOptions` this config asks for, checked.

        Raises
        ------
        OptionError
            Naming the first bad option.
        """
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OptionError(f"batch_size must be a positive int, got {self.batch_size!r}")
        aligner_options = _plain(self.aligner_options) or {}
        if not isinstance(aligner_options, dict):
            raise OptionError(f"aligner_options must be a mapping, got {aligner_options!r}")
        opts = MergeOptions(
            aligner=self.aligner, aligner_options=dict(aligner_options), reference=self.reference,
            weights=_plain(self.weights), scheme=self.scheme, max_iterations=self.max_iterations,
            averaging=self.averaging, averaging_options=_plain(self.averaging_options), repair=self.repair,
            batchnorm=self.batchnorm, features=self.features, precision=self.precision,
            num_batches=self.num_batches, device=self.device,
        )
        opts.check(n_models=max(2, 1 + (opts.reference if isinstance(opts.reference, int) and not isinstance(opts.reference, bool) else 0)))
        from ..aligners import get_aligner, list_aligners

        if isinstance(opts.aligner, str) and opts.aligner != "auto":
            if opts.aligner not in list_aligners():
                raise OptionError(f"aligner must be one of {tuple(list_aligners()) + ('auto',)}, got {opts.aligner!r}")
            if not any(v == "auto" for v in opts.aligner_options.values()):  # "auto" values are searched at run time
                get_aligner(opts.aligner, **opts.aligner_options)  # unknown or bad aligner options fail here
        return opts

    def calibration_loader(self, modelpool: BaseModelPool) -> torch.utils.data.DataLoader:
        """A DataLoader over the pool's train dataset (``dataset``, default the first one), in a
        fixed random order (``torch.randperm`` under seed 0) unless it is a stream (an iterable
        dataset, or one without a length), which is read as it comes."""
        names = list(modelpool.train_dataset_names)
        if not names:
            raise OptionError("the model pool has no train_datasets: autoalign needs calibration data (modelpool.train_datasets)")
        name = self.dataset if self.dataset is not None else names[0]
        if name not in names:
            raise OptionError(f"dataset must be one of the pool's train datasets {names}, got {name!r}")
        given = (getattr(modelpool, "_train_datasets", None) or {}).get(name)  # a dataset object, not a config
        data = given if isinstance(given, torch.utils.data.Dataset) else modelpool.load_train_dataset(name)
        if not isinstance(data, torch.utils.data.IterableDataset) and hasattr(data, "__len__"):
            # a fixed random order (the same in every pass): an image folder lists its images class
            # by class, and single-class batches bias num_batches and BatchNorm statistics
            data = torch.utils.data.Subset(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist())
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> dict[str, Any]:
        """Merge the pool's models.

        Returns
        -------
        dict
            ``merged``: the merged model; with ``evaluate_inputs``, each input model under its
            name and ``ensemble``; ``autoalign``: the report (:func:`report_dict`).
        """
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(dict(modelpool))
        names = list(modelpool.model_names)
        if len(names) < 2:
            raise OptionError(f"autoalign merges two or more models; the pool has {names}")
        with self.profile("load models"):
            models = [modelpool.load_model(n) for n in names]
        for m in models:
            m.eval()
        with self.profile("calibration data"):
            loader = self.calibration_loader(modelpool)
        with self.profile("merge"), torch.enable_grad():
            result = merge_run(models, loader, self.merge_options)
        self.last_report = report_dict(result.report, self.merge_options)
        self.last_report["model_names"] = names
        out: dict[str, Any] = {"merged": result.model.eval()}
        if self.evaluate_inputs:
            out.update({f"model/{n}": m for n, m in zip(names, models)})
            out["ensemble"] = EnsembleModel(models).eval()
        out["autoalign"] = self.last_report
        return out


class AutoAlignModelPool(BaseModelPool):
    """A ``BaseModelPool`` that saves the ``merged`` entry of :class:`AutoAlignAlgorithm`'s result."""

    def save_model(self, model: nn.Module | Mapping[str, Any], path: str, *args: Any, **kwargs: Any) -> None:
        """Save the state dict of ``model`` (or of ``model["merged"]``) to ``path``."""
        if isinstance(model, Mapping):
            model = model["merged"]
        super().save_model(model, path, *args, **kwargs)


class AccuracyTaskPool(BaseTaskPool):
    """Top-1 accuracy and mean cross-entropy of a classifier on one dataset.

    Parameters
    ----------
    test_dataset : dataset or config
        A map-style dataset of ``(input, label)`` pairs, or a config with ``_target_``.
    batch_size : int, default 256
    num_workers : int, default 0
    device : str, optional
        Where to evaluate (default: where the model is).
    """

    def __init__(self, test_dataset: Any, batch_size: int = 256, num_workers: int = 0, device: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test_dataset = test_dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device

    def _dataset(self) -> Any:
        from omegaconf import DictConfig

        if isinstance(self.test_dataset, (DictConfig, Mapping)):
            from fusion_bench.utils import instantiate

            self.test_dataset = instantiate(self.test_dataset)
        return self.test_dataset

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``{"accuracy": ..., "loss": ..., "num_samples": ...}`` of ``model``."""
        loader = torch.utils.data.DataLoader(self._dataset(), batch_size=self.batch_size, num_workers=self.num_workers)
        device = torch.device(self.device) if self.device else next((p.device for p in model.parameters()), torch.device("cpu"))
        model.eval()
        correct, loss, n = 0, 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            n += int(y.numel())
        return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "num_samples": n}
