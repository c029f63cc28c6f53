"""What the demo reports: one row per model or merge (:class:`DemoRow`), the whole result
(:class:`DemoResult`), and the table, markdown and bar plot written from them."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["DemoRow", "DemoResult", "format_table", "format_markdown", "plot_rows"]


@dataclass
class DemoRow:
    """One line of the demo table.

    Attributes
    ----------
    arch : str
        ``"mlp"``, ``"mlp_bn"`` or ``"cnn_bn"``.
    kind : str
        ``"base"`` (mean of the base models), ``"ensemble"`` (mean of logits) or ``"merge"``.
    method : str
        ``"base models"``, ``"ensemble"`` or the aligner's registered name.
    repair : str or None
        Repair applied after merging (``None``: none).
    accuracy : float
        Test accuracy in [0, 1] (the mean over models for ``kind="base"``).
    accuracy_std : float or None
        Standard deviation over the base models (``kind="base"`` only).
    seconds : float or None
        Wall-clock time of the merge (``kind="merge"``) or of training all models (``kind="base"``).
    """

    arch: str
    kind: str
    method: str
    repair: str | None
    accuracy: float
    accuracy_std: float | None = None
    seconds: float | None = None

    @property
    def label(self) -> str:
        if self.kind == "base":
            return "base models (mean ± std)"
        if self.kind == "ensemble":
            return "ensemble (mean of logits)"
        return f"merge: {self.method}"

    def accuracy_text(self) -> str:
        if self.accuracy_std is not None:
            return f"{self.accuracy:.4f} ± {self.accuracy_std:.4f}"
        return f"{self.accuracy:.4f}"


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes
    ----------
    dataset : str
    rows : list of DemoRow
        Per architecture: the base models, the ensemble, then one row per
        (aligner, repair).
    base_accuracies : dict of str to list of float
        Test accuracy of every base model, per architecture.
    table : str
        The printed plain-text table.
    markdown : str
        The same table in markdown (also written to ``table_path``).
    plot_path : pathlib.Path or None
        The bar plot (None when matplotlib is not installed).
    table_path : pathlib.Path
        The markdown file.
    json_path : pathlib.Path
        All rows and the configuration as JSON.
    seconds : float
        Wall-clock time of the whole run.
    config : dict
        Data set, models, epochs, hidden widths, seeds, device and calibration size.
    """

    dataset: str
    rows: list[DemoRow]
    base_accuracies: dict[str, list[float]]
    table: str
    markdown: str
    plot_path: pathlib.Path | None
    table_path: pathlib.Path
    json_path: pathlib.Path
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def merge_rows(self, arch: str | None = None) -> list[DemoRow]:
        """The rows of merged models (optionally of one architecture)."""
        return [r for r in self.rows if r.kind == "merge" and (arch is None or r.arch == arch)]


def format_table(rows: Sequence[DemoRow]) -> str:
    header = ("model", "method", "repair", "test acc", "time")
    lines = [header]
    for r in rows:
        repair = "" if r.kind != "merge" else (r.repair or "none")
        secs = "" if r.seconds is None else f"{r.seconds:.2f} s"
        lines.append((r.arch, r.label, repair, r.accuracy_text(), secs))
    w = [max(len(l[i]) for l in lines) for i in range(len(header))]
    out = []
    for k, l in enumerate(lines):
        out.append("  ".join(c.ljust(w[i]) for i, c in enumerate(l)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w[i] for i in range(len(header))))
    return "\n".join(out)


def format_markdown(rows: Sequence[DemoRow], title: str) -> str:
    lines = [f"# {title}", "", "| model | method | repair | test accuracy | time |", "|---|---|---|---:|---:|"]
    for r in rows:
        repair = "" if r.kind != "merge" else (r.repair or "none")
        secs = "" if r.seconds is None else f"{r.seconds:.2f} s"
        lines.append(f"| {r.arch} | {r.label} | {repair} | {r.accuracy_text()} | {secs} |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: Sequence[DemoRow], archs: Sequence[str], path: pathlib.Path, title: str) -> pathlib.Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        merges = [r for r in rows if r.arch == arch and r.kind == "merge"]
        base = next(r for r in rows if r.arch == arch and r.kind == "base")
        ens = next(r for r in rows if r.arch == arch and r.kind == "ensemble")
        labels = [f"{r.method}\n({r.repair or 'no repair'})" for r in merges]
        colors = ["tab:blue" if r.method == "cca" else "tab:gray" for r in merges]
        bars = ax.bar(range(len(merges)), [r.accuracy for r in merges], color=colors)
        for b, r in zip(bars, merges):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, f"{r.accuracy:.3f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(base.accuracy, color="tab:green", ls="--", lw=1.2, label=f"base models mean {base.accuracy:.3f}")
        ax.axhline(ens.accuracy, color="tab:red", ls=":", lw=1.4, label=f"ensemble {ens.accuracy:.3f}")
        ax.set_xticks(range(len(merges)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("test accuracy")
        ax.set_title(arch)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the demo
