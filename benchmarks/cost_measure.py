"""Measurements behind ``benchmarks/cost.py``: peak memory, forward floors, timed merges.

Each ``measure*`` function builds its models and calibration data, runs the forward
floor and the merge, and returns one JSON-ready row; ``benchmarks/cost.py`` runs
each in a fresh subprocess so that memory figures start clean.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pathlib
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from benchmarks.cost_bound import statistics_bound  # noqa: E402

__all__ = [
    "PeakMemory", "MODELS", "TORCHVISION", "best_of", "make_models", "make_data", "forward_floor", "measure",
    "make_torchvision", "make_images", "measure_torchvision", "synchronized_stages", "resolve_device",
]

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE
    except OSError:  # not Linux: fall back to the lifetime maximum
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    """Hand memory the process freed back to the OS (glibc ``malloc_trim``), so the next
    phase's allocations raise the resident size instead of reusing freed pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may then read low
        pass


class PeakMemory:
    """Context manager: peak memory above the level at entry, in bytes (``.peak``).

    CPU: resident set size sampled every ``interval`` seconds by a thread, after freed memory is
    handed back to the OS (``malloc_trim``). CUDA:
    ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: str = "cpu", interval: float = 0.001) -> None:
        self.cuda = str(device).startswith("cuda")
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _trim()
            self.base = _rss()
            self._max = self.base
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss())
            self.peak = self._max - self.base


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``), or None where unavailable."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except (ImportError, OSError):
        return None


def _faults_during(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    before = _minor_faults()
    out = fn()
    after = _minor_faults()
    return out, None if before is None or after is None else after - before


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def best_of(repeats: int, fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


#: Models ``--model`` can build, and what ``--widths`` means for each.
MODELS = {
    "mlp": "MLP in_features-d-d-10 (d = width)",
    "smallcnn": "SmallCNN of width d (channels d, d, 2d, 2d) on 3x32x32 inputs",
    "resnet20": "ResNet20 with width multiplier d (stage widths 16d, 32d, 64d) on 3x32x32 inputs",
    "vgg11": "VGG11 with width multiplier d (64d ... 512d channels) on 3x32x32 inputs",
}


def make_models(width: float, n: int, in_features: int, device: str, model: str = "mlp") -> list[torch.nn.Module]:
    """``n`` models with different random initialisations (see :data:`MODELS` for ``width``)."""
    from benchmarks.models import MLP, ResNet20, SmallCNN, VGG11

    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        if model == "smallcnn":
            m = SmallCNN(3, 10, width=int(width))
        elif model == "resnet20":
            m = ResNet20(10, width_multiplier=width)
        elif model == "vgg11":
            m = VGG11(3, 10, width_multiplier=width, input_size=32)
        else:
            m = MLP(in_features, (int(width), int(width)), 10)
        models.append(m.to(device).eval())
    return models


def make_data(samples: int, batch: int, in_features: int, device: str, model: str = "mlp") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random calibration batches ``(x, y)`` (a list: re-iterable, already on ``device``)."""
    g = torch.Generator().manual_seed(0)
    shape = (in_features,) if model == "mlp" else (3, 32, 32)
    x = torch.randn(samples, *shape, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return [(x[i : i + batch].to(device), y[i : i + batch].to(device)) for i in range(0, samples, batch)]


def forward_floor(models: Sequence[torch.nn.Module], data: Sequence[Any]) -> None:
    """What statistics collection cannot beat: every model's forward pass over every batch."""
    with torch.no_grad():
        for x, _ in data:
            for m in models:
                m(x)


#: The aligner ``merge_with_report`` uses when none is given (what ``--aligners default`` runs).
DEFAULT_ALIGNER: str = inspect.signature(autoalign.merge_with_report).parameters["aligner"].default


def merge_kwargs(aligner: str, repair: str | None, device: str) -> dict[str, Any]:
    """Keyword arguments of ``merge_with_report``: ``aligner="default"`` leaves the aligner to the
    library, ``repair="auto"`` is the library's default, ``"none"`` turns repair off."""
    kw: dict[str, Any] = {"device": device, "repair": None if repair in (None, "none") else repair}
    if aligner != "default":
        kw["aligner"] = aligner
    return kw


def _timed_merge(models: Sequence[torch.nn.Module], data: Sequence[Any], kwargs: dict[str, Any],
                 device: str, memory: bool = True) -> tuple[dict[str, Any], Any]:
    """One whole ``merge_with_report``: wall-clock seconds, its stages' seconds, minor faults and
    (``memory``) peak memory, sampled by :class:`PeakMemory`'s thread (else ``peak_bytes`` is None)."""
    with PeakMemory(device) if memory else contextlib.nullcontext() as mem:
        (sec, res), faults = _faults_during(
            lambda: best_of(1, lambda: autoalign.merge_with_report(models, data, **kwargs), device))
    stages = {k: float(v) for k, v in res.report.timings.items()}
    run = {"seconds": sec, "timings": stages, "other_seconds": sec - sum(stages.values()),
           "peak_bytes": int(mem.peak) if memory else None, "minor_faults": faults}
    return run, res


def _timed_floor(models: Sequence[torch.nn.Module], data: Sequence[Any], device: str) -> dict[str, Any]:
    """One forward floor: seconds, peak memory, minor faults."""
    with PeakMemory(device) as mem:
        (sec, _), faults = _faults_during(lambda: best_of(1, lambda: forward_floor(models, data), device))
    return {"seconds": sec, "peak_bytes": int(mem.peak), "minor_faults": faults}


def resolve_device(device: str) -> str:
    """``"cuda"`` becomes ``"cuda:<current index>"``; other devices are returned as ``str(torch.device(...))``.

    The merge compares the models' device with ``device=`` by ``==``, and
    ``torch.device("cuda") != torch.device("cuda:0")``: with a bare ``"cuda"`` it would copy
    every model (time and memory the benchmark would wrongly count).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


@contextlib.contextmanager
def synchronized_stages(device: str) -> Iterator[None]:
    """On CUDA, make every ``report.timings`` stage wait for the GPU at its start and end.

    The library times its stages on the host; with asynchronous kernels a stage's seconds
    would partly land in the next one. The benchmark wraps ``Timings.stage`` with
    ``torch.cuda.synchronize()`` (nothing changes on CPU).
    """
    if not str(device).startswith("cuda"):
        yield
        return
    from autoalign.report import Timings

    original = Timings.stage

    @contextlib.contextmanager
    def stage(self: Timings, name: str) -> Iterator[None]:
        torch.cuda.synchronize()
        with original(self, name):
            yield
            torch.cuda.synchronize()

    Timings.stage = stage  # type: ignore[method-assign]
    try:
        yield
    finally:
        Timings.stage = original  # type: ignore[method-assign]


def measure(
    width: float,
    n: int,
    aligner: str,
    *,
    samples: int = 5000,
    batch: int = 500,
    in_features: int = 784,
    repeats: int = 2,
    device: str = "cpu",
    model: str = "mlp",
    repair: str | None = "auto",
) -> dict[str, Any]:
    """Time and memory of one ``(width, N, aligner)`` merge (run it in a fresh process for clean memory figures).

    Parameters
    ----------
    width : float
        MLP / SmallCNN width, or ResNet20 / VGG11 width multiplier (see :data:`MODELS`).
    n : int
        Number of models (seeds ``0 .. n - 1``).
    aligner : str
        Aligner name, or ``"default"`` for the library's default.
    samples, batch, in_features : int
        Random calibration inputs, their batch size and (MLP) input width.
    repeats : int
        Floor and whole merge are run interleaved this many times; the best of each is kept.
    device : str
        ``"cpu"`` or a CUDA device.
    model : str
        A key of :data:`MODELS`.
    repair : str or None
        ``repair`` of the merge (``"auto"``, the library's default; ``"none"`` for off).

    Returns
    -------
    dict
        JSON-ready row: best stage seconds (``timings``), ``floor_seconds``, ``total_seconds``
        (wall clock of the whole merge), ``total_over_floor``, ``stats_over_floor``, peak memory
        of the statistics alone, of the whole merge and of the floor, every run's raw numbers.
    """
    models = make_models(width, n, in_features, device, model)
    data = make_data(samples, batch, in_features, device, model)
    forward_floor(models, data[:1])  # warm-up
    spec = autoalign.find_merge_points(models[0], data[0][0])
    al = autoalign.get_aligner(DEFAULT_ALIGNER if aligner == "default" else aligner)

    with PeakMemory(device) as mem_stats:  # the statistics merge() collects for this aligner
        stats = autoalign.collect_stats(models, data, spec, needs=al.needs, reference=0, self_moments=al.self_moments)
    stats_bytes = 0
    for p in stats.points.values():
        stats_bytes += sum(t.numel() * t.element_size() for t in [*p.sums, *p.squares, *p.cross.values()])
    n_blocks = stats.n_blocks()
    del stats

    kwargs = merge_kwargs(aligner, repair, device)
    with synchronized_stages(device):
        first, res = _timed_merge(models, data, kwargs, device)  # warm-up; its peak is the merge's peak
        repair_used = res.report.repair
        del res
        floor_first = _timed_floor(models, data, device)  # the floor's peak
        # forward floor and merge interleaved, best of each: a machine shared with other jobs
        # slows both alike within a repeat, and the best repeat is the least disturbed
        timings: dict[str, float] = {}
        floors: list[float] = []
        runs: list[dict[str, Any]] = []
        floor_faults: list[int | None] = []
        for _ in range(repeats):
            (sec, _), faults = _faults_during(lambda: best_of(1, lambda: forward_floor(models, data), device))
            floors.append(sec)
            floor_faults.append(faults)
            run, res = _timed_merge(models, data, kwargs, device, memory=False)
            del res
            runs.append(run)
            for k, v in run["timings"].items():
                timings[k] = min(timings.get(k, float("inf")), v)
    floor = min(floors)
    best = min(runs, key=lambda r: r["seconds"])
    total = best["seconds"]
    nan = float("nan")
    return {
        "model": model,
        "width": width,
        "n": n,
        "aligner": aligner,
        "aligner_used": repr(al),
        "needs": al.needs,
        "self_moments": al.self_moments,
        "repair": repair,
        "repair_used": repair_used,
        "samples": samples,
        "batch": batch,
        "device": device,
        "threads": torch.get_num_threads(),
        "timings": timings,
        "floor_seconds": floor,
        "floor_runs": floors,
        "total_seconds": total,
        "other_seconds": best["other_seconds"],  # the best run's total minus its stages
        "merge_runs": runs,
        "statistics_runs": [r["timings"].get("statistics", nan) for r in runs],
        # minor page faults (getrusage) during each floor run and each whole merge run: on CPU,
        # touching memory the allocator got fresh from the OS costs one per 4 KiB page
        "floor_minor_faults": floor_faults,
        "merge_minor_faults": [r["minor_faults"] for r in runs],
        "stats_over_floor": timings.get("statistics", nan) / floor if floor > 0 else nan,
        "total_over_floor": total / floor if floor > 0 else nan,
        "stats_peak_bytes": int(mem_stats.peak),
        "merge_peak_bytes": first["peak_bytes"],
        "floor_peak_bytes": floor_first["peak_bytes"],
        "stats_result_bytes": int(stats_bytes),
        "stats_blocks": int(n_blocks),
    }


#: torchvision models ``--torchvision`` can build (any ``torchvision.models`` builder taking
#: ``num_classes`` works; ViTs also get ``image_size``).
TORCHVISION = ("resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "vit_b_16")


def make_torchvision(name: str, n: int, image_size: int, device: str, num_classes: int = 10) -> list[torch.nn.Module]:
    """``n`` randomly initialised ``torchvision.models.<name>`` (seeds ``0 .. n - 1``), in eval mode on ``device``.

    Parameters
    ----------
    name : str
        Builder name in ``torchvision.models``, e.g. ``"resnet18"``.
    n : int
        Number of models.
    image_size : int
        Input side; passed to ViT builders (``vit_*``), whose position embeddings depend on it.
    device : str
        Where the models go.
    num_classes : int
        Width of the classifier.

    Returns
    -------
    list of torch.nn.Module
    """
    import torchvision

    builder = getattr(torchvision.models, name)
    extra = {"image_size": image_size} if name.startswith("vit") else {}
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(builder(num_classes=num_classes, **extra).to(device).eval())
    return models


def make_images(batches: int, batch_size: int, image_size: int, device: str,
                num_classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` random batches ``(x, y)``, ``x`` of shape ``(batch_size, 3, image_size, image_size)``, on ``device``."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
             torch.randint(0, num_classes, (batch_size,), generator=g).to(device)) for _ in range(batches)]


def measure_torchvision(
    name: str,
    n: int,
    aligner: str = "default",
    *,
    image_size: int = 64,
    batches: int = 8,
    batch_size: int = 32,
    repeats: int = 1,
    device: str = "cpu",
    repair: str | None = "auto",
    num_classes: int = 10,
) -> dict[str, Any]:
    """Whole merge of ``n`` torchvision models against their forward floor (run it in a fresh process).

    Each repeat runs the floor (every model's forward pass over every calibration batch),
    then one whole ``merge_with_report``, each under :class:`PeakMemory`. The merge is not
    warmed up (a user runs it once per process: tracing and library start-up count), the
    floor is, by one batch.

    Parameters
    ----------
    name : str
        ``torchvision.models`` builder.
    n : int
        Number of models.
    aligner : str
        Aligner name, or ``"default"`` for the library's default.
    image_size, batches, batch_size : int
        Calibration data: ``batches`` batches of ``batch_size`` random images.
    repeats : int
        Floor and merge pairs; the row reports the best floor and the merge run with the
        least wall-clock time (its stages add up to it, with ``other`` the rest).
    device : str
        ``"cpu"`` or a CUDA device (times then wait for the GPU; memory is
        ``torch.cuda.max_memory_allocated`` above the level before).
    repair : str or None
        ``repair`` of the merge (``"auto"`` is the library's default).
    num_classes : int
        Classifier width.

    Returns
    -------
    dict
        JSON-ready row with the raw runs (``floor_runs``, ``merge_runs``) and the summary
        (``floor_seconds``, ``total_seconds``, ``timings``, ``other_seconds``, ``total_over_floor``,
        ``floor_peak_bytes``, ``merge_peak_bytes``) and the statistics pass's multiply-add
        bound (:mod:`benchmarks.cost_bound`: ``forward_macs``, ``gram_macs_points``,
        ``gram_macs_repair_sites``, ``statistics_bound_seconds``, ``statistics_over_bound``).
    """
    models = make_torchvision(name, n, image_size, device, num_classes)
    data = make_images(batches, batch_size, image_size, device, num_classes)
    cuda = str(device).startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else _rss()
    forward_floor(models, data[:1])  # warm-up
    kwargs = merge_kwargs(aligner, repair, device)
    floors: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    bound: dict[str, Any] | None = None
    with synchronized_stages(device):
        for _ in range(repeats):
            floors.append(_timed_floor(models, data, device))
            run, res = _timed_merge(models, data, kwargs, device)
            runs.append(run)
            report = res.report
            if bound is None and res.stats is not None:
                bound = statistics_bound(models[0], data, res.stats, n)
            del res
    best = min(runs, key=lambda r: r["seconds"])
    floor = min(f["seconds"] for f in floors)
    if bound is not None:  # the bound in seconds, against the best floor
        bound["statistics_bound_seconds"] = bound["bound_over_floor"] * floor
        bound["statistics_over_bound"] = best["timings"].get("statistics", float("nan")) / bound["statistics_bound_seconds"]
    return {
        "torchvision": name,
        "params": sum(p.numel() for p in models[0].parameters()),
        "n": n,
        "aligner": aligner,
        "aligner_used": report.aligner,
        "repair": repair,
        "repair_used": report.repair,
        "points": len(report.points),
        "image_size": image_size,
        "batches": batches,
        "batch_size": batch_size,
        "device": device,
        "threads": torch.get_num_threads(),
        "resident_before_bytes": int(before),  # models + data (RSS on CPU, allocated on CUDA)
        "floor_runs": floors,
        "merge_runs": runs,
        "floor_seconds": floor,
        "total_seconds": best["seconds"],
        "timings": best["timings"],
        "other_seconds": best["other_seconds"],
        "total_over_floor": best["seconds"] / floor if floor > 0 else float("nan"),
        "floor_peak_bytes": max(f["peak_bytes"] for f in floors),
        "merge_peak_bytes": max(r["peak_bytes"] for r in runs),
        **(bound or {}),
    }
