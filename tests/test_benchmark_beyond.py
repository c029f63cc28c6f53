"""benchmarks/beyond.py: every experiment's core function on tiny synthetic models and data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import beyond
from benchmarks.models import build_model
from benchmarks.train import make_config

import autoalign


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    centres = torch.randn(10, 1, 8, 8, generator=g)
    x = (0.5 + 0.3 * centres[y] + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def ctx() -> beyond.Context:
    xtr, ytr = _data(400, 0)
    xte, yte = _data(100, 1)
    models = []
    for s in range(3):
        torch.manual_seed(s)
        m = build_model("mlp", "digits", hidden=[12])
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(m((xtr - 0.5) / 0.3), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(m.eval())
    norm = lambda x: (x - 0.5) / 0.3  # noqa: E731
    calib = [(norm(xtr[i : i + 100]), ytr[i : i + 100]) for i in range(0, 200, 100)]
    test = [(norm(xte), yte)]
    return beyond.Context(models, calib, test, xtr, ytr, "digits", "cpu", {"calibration_samples": 200, "test_samples": 100})


def _ok(rows, methods):
    got = {r["method"] for r in rows}
    assert set(methods) <= got, got
    for r in rows:
        assert r.get("error") is None, r
        assert 0.0 <= r["accuracy"] <= 1.0


def test_ablation_rows(ctx):
    aligners = [a for a in ("cca", "lstsq", "procrustes", "permutation") if a in autoalign.list_aligners()]
    rows = beyond.run_ablation(ctx, [2], 1, aligners=aligners)
    _ok(rows, ["parent mean", "ensemble", *aligners])
    rows += [dict(r, n=3) for r in rows]
    md = beyond.to_markdown({"item": "ablation", "command": "c", "machine": "m", "torch": "t", "date": "d", "rows": rows})
    assert "| method | N=2 | N=3 |" in md and "| cca |" in md


def test_learned_rows_withhold_labels(ctx, monkeypatch):
    seen = []
    real = autoalign.merge_with_report

    def spy(models, data, **kw):
        seen.append((kw.get("averaging_options") or {}, data))
        return real(models, data, **kw)

    monkeypatch.setattr(beyond.autoalign, "merge_with_report", spy)
    rows = beyond.run_learned(ctx, [2], 1, aligners=("permutation",), epochs=1)
    _ok(rows, [f"permutation / {label}" for label, *_ in beyond.learned_variants(1, 0.05)])
    for opts, data in seen:
        if opts.get("objective") == "distill":
            assert all(isinstance(b, torch.Tensor) for b in data)  # no labels
        else:
            assert all(isinstance(b, tuple) for b in data)


def test_hierarchical_and_fisher_rows(ctx):
    rows = beyond.run_hierarchical(ctx, [3], 1, aligners=("permutation",), schemes=("hierarchical", "iterative"))
    _ok(rows, ["permutation / hierarchical", "permutation / iterative"])
    rows = beyond.run_hierarchical(ctx, [3], 1, aligners=("identity",))
    _ok(rows, ["identity / all_to_one", "identity / hierarchical"])
    assert "identity / iterative" not in {r["method"] for r in rows}
    rows = beyond.run_fisher(ctx, [2], 1, aligners=("identity",), chunk=50)
    _ok(rows, ["identity / uniform", "identity / fisher"])


def test_finetune_same_batches_and_rows(ctx):
    a = beyond.finetune(ctx.models[0], ctx.train_x, ctx.train_y, steps=3, lr=1e-3, batch_size=32, seed=5, dataset="digits")
    b = beyond.finetune(ctx.models[0], ctx.train_x, ctx.train_y, steps=3, lr=1e-3, batch_size=32, seed=5, dataset="digits")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[1].weight if isinstance(a, torch.nn.Sequential) else next(a.parameters()),
                           next(ctx.models[0].parameters()))
    rows = beyond.run_finetune(ctx, [2], 1, aligners=("identity", "permutation"), steps=3, batch_size=32)
    _ok(rows, ["identity merge", "identity merge + 3 steps", "permutation merge + 3 steps"])
    _ok(rows, ["reference parent", "reference parent + 3 steps"])


def test_split_indices():
    y = torch.arange(1000) % 10
    groups = beyond.class_groups(10, 4, seed=0)
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert sorted(sum(beyond.class_groups(10, 4, seed=3), [])) == list(range(10))
    parts = beyond.class_split_indices(y, beyond.class_groups(10, 2))
    assert set(y[parts[0]].tolist()) == {0, 1, 2, 3, 4} and set(y[parts[1]].tolist()) == {5, 6, 7, 8, 9}
    d1 = beyond.dirichlet_split_indices(y, 4, 0.5, seed=1)
    d2 = beyond.dirichlet_split_indices(y, 4, 0.5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(d1, d2))
    allidx = torch.cat(d1).sort().values
    assert torch.equal(allidx, torch.arange(1000))  # a partition
    counts = torch.stack([torch.bincount(y[p], minlength=10) for p in d1])
    assert counts.float().std(0).mean() > 5  # skewed, not uniform


def test_splits_end_to_end(ctx, tmp_path):
    config = make_config("digits", "mlp", epochs=1, batch_size=64, arch_kw={"hidden": [12]})
    saved = []
    rows = beyond.run_splits(ctx, [2], 1, aligners=["permutation", "identity"], config=config, cache=tmp_path,
                             save=lambda r: saved.append(len(r)))
    _ok(rows, ["parent 0", "parent 1", "best parent", "ensemble", "permutation", "identity"])
    assert {r["kind"] for r in rows} == {"disjoint", "dirichlet"}
    assert len(list(tmp_path.glob("*.pt"))) == 4 and saved
    again = beyond.run_splits(ctx, [2], 1, kinds=("disjoint",), aligners=["identity"], config=config, cache=tmp_path)
    first = {r["method"]: r["accuracy"] for r in rows if r["kind"] == "disjoint"}
    assert all(math.isclose(first[r["method"]], r["accuracy"]) for r in again)  # cached models reused
    md = beyond.to_markdown({"item": "splits", "command": "c", "machine": "m", "torch": "t", "date": "d", "rows": rows})
    assert "disjoint N=2" in md and "dirichlet N=2" in md
    json.dumps(rows)


def test_failure_is_a_row(ctx):
    row = beyond.merge_row(ctx, ctx.models[:2], "bad", {"n": 2, "draw": 0, "models": [0, 1]}, aligner="no-such-aligner")
    assert row["accuracy"] is None and "no-such-aligner" in row["error"]


def test_parse_aligner():
    assert beyond.parse_aligner("cca") == ("cca", {})
    assert beyond.parse_aligner("lstsq:rcond=0.1,ridge_mode=absolute") == ("lstsq", {"rcond": 0.1, "ridge_mode": "absolute"})


def test_report_and_plot(tmp_path):
    rows = [dict(item="ablation", n=n, draw=d, models=[0, 1], method=m, accuracy=0.9 + 0.01 * d, seconds=0.0)
            for n in (2, 4) for d in range(2) for m in ("parent mean", "ensemble", "cca", "lstsq")]
    result = {"item": "ablation", "question": "q", "command": "python benchmarks/beyond.py ablation", "machine": "m",
              "torch": "t", "date": "d", "setup": "s", "rows": rows}
    (tmp_path / "ablation").mkdir()
    (tmp_path / "ablation" / "results.json").write_text(json.dumps(result))
    beyond.write_report(tmp_path, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "## 1. Ablation" in text and "90.50 ± 0.71 (90.00, 91.00)" in text
    assert (tmp_path / "img" / "beyond_ablation.png").stat().st_size > 1000
