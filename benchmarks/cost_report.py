"""Tables and plots of ``benchmarks/cost.py``'s results (MLP / small-net mode and torchvision mode)."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

from benchmarks.cost_measure import MODELS

__all__ = ["STAGES", "kilo", "stage_names", "to_markdown", "torchvision_markdown", "plot", "plot_stages"]

#: Stages of ``report.timings`` in pipeline order (others, if any, follow in name order).
STAGES = ("discover", "statistics", "solve", "apply", "averaging", "repair", "selection")


def _mib(b: float | None) -> str:
    return "–" if b is None else f"{b / 2**20:.1f}"


def _sec(s: float | None) -> str:
    return "–" if s is None else f"{s:.3f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def kilo(runs: Sequence[int | None] | None) -> str:
    """Page faults of each run in thousands, e.g. ``0/131/393`` ("–" where not recorded)."""
    if not runs or any(r is None for r in runs):
        return "–"
    return "/".join(f"{r / 1000:.0f}" for r in runs)


def stage_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The stages any row timed, in pipeline order (:data:`STAGES`), unknown ones after.

    Parameters
    ----------
    rows : sequence of dict
        Result rows with a ``timings`` mapping (rows without one are skipped).

    Returns
    -------
    list of str
    """
    seen = {k for r in rows for k in r.get("timings", {})}
    return [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))


def _header(result: dict[str, Any]) -> list[str]:
    versions = f"torch {result['torch']}" + (f", torchvision {result['torchvision']}" if result.get("torchvision") else "")
    return [f"Command: `{result['command']}`  ", f"Machine: {result['machine']}; {versions}; {result['date']}.  "]


def to_markdown(result: dict[str, Any]) -> str:
    """Markdown table of the MLP / small-net mode: every stage of the whole merge against the floor.

    Parameters
    ----------
    result : dict
        ``cost.json`` of that mode (older files without the whole-merge columns show "–").

    Returns
    -------
    str
    """
    repair = result.get("repair", "off")
    lines = _header(result) + [
        (f"Models: MLP {result['in_features']}-d-d-10" if result.get("model", "mlp") == "mlp"
         else f"Models: {MODELS[result['model']]}")
        + f" with random weights; calibration: {result['samples']} random "
        f"inputs in batches of {result['batch']}; repair: {repair}. Times are the best of {result['repeats']} "
        "runs, stage by stage; total is the whole `merge_with_report` call (wall clock), other is the best "
        "run's total minus its stages; peaks are from one extra (warm-up) run.",
        "",
        "| aligner | d | N | forward floor s | merge total s | total / floor | discover s | statistics s "
        "| stats / floor | solve s | apply s | repair s | other s | floor peak MiB | stats peak MiB "
        "| stats held MiB | merge peak MiB | floor faults k | merge faults k |",
        "|" + "---|" * 19,
    ]
    for r in result["rows"]:
        t = r["timings"]
        lines.append(
            f"| {r['aligner']} | {r['width']:g} | {r['n']} | {r['floor_seconds']:.3f} | {_sec(r.get('total_seconds'))} "
            f"| {_ratio(r.get('total_over_floor'))} | {_sec(t.get('discover'))} | {_sec(t.get('statistics'))} "
            f"| {r['stats_over_floor']:.2f} | {_sec(t.get('solve'))} | {_sec(t.get('apply'))} | {_sec(t.get('repair'))} "
            f"| {_sec(r.get('other_seconds'))} | {_mib(r.get('floor_peak_bytes'))} | {_mib(r['stats_peak_bytes'])} "
            f"| {_mib(r['stats_result_bytes'])} | {_mib(r['merge_peak_bytes'])} "
            f"| {kilo(r.get('floor_minor_faults'))} | {kilo(r.get('merge_minor_faults'))} |"
        )
    return "\n".join(lines) + "\n"


def torchvision_markdown(result: dict[str, Any]) -> str:
    """Markdown table of the torchvision mode: model, N, aligner, floor, total, ratio, every stage, peaks.

    Parameters
    ----------
    result : dict
        ``cost.json`` of the torchvision mode.

    Returns
    -------
    str
    """
    rows = result["rows"]
    stages = stage_names(rows)
    defaults = sorted({r["aligner_used"] for r in rows if r.get("aligner") == "default" and "aligner_used" in r})
    lines = _header(result) + [
        f"Models: `torchvision.models` builders with {result['num_classes']} classes, random initialisation "
        f"(seeds 0 … N − 1); calibration: {result['batches']} batches of {result['batch_size']} random "
        f"{result['image_size']}×{result['image_size']} images; device {result['device']}; repair: {result['repair']}"
        + (f"; default aligner: `{'`, `'.join(defaults)}`" if defaults else "") + ".  ",
        f"Floor: every model's forward pass over the same batches (best of {result['repeats']}). Total: wall clock "
        "of one whole `merge_with_report` (the run with the least total; not warmed up), its stages from "
        "`report.timings`, other = total − stages (validation, copies, checks). Peaks: memory above the level "
        "before the phase (resident set sampled every ms on CPU, `max_memory_allocated` on CUDA).",
        "",
        "Bound: the statistics pass's multiply-add bound, floor · (1 + G / F) with F the forward passes' and G "
        "the feature products' multiply-adds (`benchmarks/cost_bound.py`); stats / bound is what the implementation adds.",
        "",
        "| model | params M | N | aligner | floor s | total s | total / floor | "
        + "".join(f"{s} s | " for s in stages) + "other s | stats bound s | stats / bound | floor peak MiB | merge peak MiB |",
        "|" + "---|" * (12 + len(stages)),
    ]
    for r in rows:
        lead = f"| {r['torchvision']} | {_params(r)} | {r['n']} | {r['aligner']} |"
        if "error" in r:
            lines.append(lead + f" failed: {r['error']} |" + " – |" * (7 + len(stages)))
            continue
        t = r["timings"]
        lines.append(
            lead + f" {r['floor_seconds']:.3f} | {r['total_seconds']:.3f} | {r['total_over_floor']:.2f} | "
            + "".join(f"{_sec(t.get(s))} | " for s in stages)
            + f"{r['other_seconds']:.3f} | {_sec(r.get('statistics_bound_seconds'))} | {_ratio(r.get('statistics_over_bound'))} | "
            f"{_mib(r['floor_peak_bytes'])} | {_mib(r['merge_peak_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def _params(row: dict[str, Any]) -> str:
    return f"{row['params'] / 1e6:.1f}" if "params" in row else "–"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Three panels against d: statistics/floor ratio, solve seconds, statistics peak memory (per N).

    Parameters
    ----------
    result : dict
        ``cost.json`` of the MLP / small-net mode.
    path : path-like
        PNG to write.
    """
    plt = _pyplot()
    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    aligners = sorted({r["aligner"] for r in rows})
    styles = ["-", "--", ":", "-."]
    for ai, a in enumerate(aligners):
        for n in sorted({r["n"] for r in rows}):
            sel = sorted((r for r in rows if r["aligner"] == a and r["n"] == n), key=lambda r: r["width"])
            if not sel:
                continue
            ws = [r["width"] for r in sel]
            kw = dict(marker="o", linestyle=styles[ai % len(styles)], label=f"{a}, N={n}")
            axes[0].plot(ws, [r["stats_over_floor"] for r in sel], **kw)
            axes[1].plot(ws, [r["timings"].get("solve", 0) for r in sel], **kw)
            axes[2].plot(ws, [r["stats_peak_bytes"] / 2**20 for r in sel], **kw)
    axes[0].axhline(1.5, color="red", linewidth=0.8, label="1.5× target")
    axes[0].set_ylabel("statistics time / forward-pass time")
    axes[1].set_ylabel("solve seconds")
    axes[2].set_ylabel("statistics peak memory (MiB)")
    for ax in axes:
        ax.set_xlabel("width d")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_stages(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, x_key: str, x_label: str,
                panel_key: str) -> None:
    """Stacked bars of the whole merge's stage seconds against ``x_key``, with the forward floor.

    One panel per (aligner, ``panel_key`` value): rows of panels are aligners, columns
    models (torchvision mode: ``x_key="n"``, ``panel_key="torchvision"``) or N (MLP mode:
    ``x_key="width"``, ``panel_key="n"``). Each bar is one configuration, its segments the
    stages of ``report.timings`` and ``other``; the black line is the floor and the label
    above a bar total / floor.

    Parameters
    ----------
    rows : sequence of dict
        Result rows (failed rows and rows without ``total_seconds`` are left out).
    path : path-like
        PNG to write.
    x_key, x_label : str
        Row key on the x axis and its label.
    panel_key : str
        Row key that splits the panels' columns.
    """
    plt = _pyplot()
    ok = [r for r in rows if "error" not in r and r.get("total_seconds") is not None]
    aligners = list(dict.fromkeys(r["aligner"] for r in ok))
    panels = list(dict.fromkeys(r[panel_key] for r in ok))
    stages = stage_names(ok) + ["other"]
    fig, axes = plt.subplots(max(len(aligners), 1), max(len(panels), 1), squeeze=False,
                             figsize=(max(2.9 * len(panels) + 1.2, 6.5), 2.7 * max(len(aligners), 1) + 0.8))
    colours = plt.get_cmap("tab10")
    for i, a in enumerate(aligners):
        for j, pv in enumerate(panels):
            ax = axes[i][j]
            sel = sorted((r for r in ok if r["aligner"] == a and r[panel_key] == pv), key=lambda r: r[x_key])
            if not sel:
                ax.set_axis_off()
                continue
            xs = list(range(len(sel)))
            bottom = [0.0] * len(sel)
            for k, s in enumerate(stages):
                vals = [max(r.get("other_seconds") or 0.0, 0.0) if s == "other" else r["timings"].get(s, 0.0) for r in sel]
                ax.bar(xs, vals, bottom=bottom, width=0.6, color=colours(k % 10), label=s)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.plot(xs, [r["floor_seconds"] for r in sel], "k-o", markersize=3, linewidth=1, label="forward floor")
            for x, top, r in zip(xs, bottom, sel):
                ax.annotate(f"×{r['total_over_floor']:.1f}", (x, top), ha="center", va="bottom", fontsize=7)
            ax.set_xticks(xs, [f"{r[x_key]:g}" for r in sel])
            ax.set_xlim(-0.7, max(len(sel), 3) - 0.3)
            ax.set_xlabel(x_label)
            ax.set_title(f"{pv if panel_key != 'n' else f'N = {pv}'}, {a}", fontsize=9)
            ax.margins(y=0.15)
            ax.grid(alpha=0.3, axis="y")
            if j == 0:
                ax.set_ylabel("seconds")
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes.flat:  # the first panel with bars
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            break
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if len(labels) > 5 else 0.06, 1, 1))
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
