"""Smoke test of benchmarks/transformers_merge.py (issue 20, item 3) on toy sizes.

Runs each subcommand once on a toy config (two optimiser steps, a few hundred examples):
checkpoints are cached and reused, the result files carry every seed and pair, and merge
errors are recorded rather than raised. No accuracy thresholds: the toy models are
untrained.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import transformers_merge as tm  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REAL_DATA_ROOT = pathlib.Path(os.environ.get("AUTOALIGN_DATA") or REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(tmp_path, *args):
    common = ["--toy", "--seeds", "0", "1", "--checkpoints", str(tmp_path / "ck"), "--results-dir", str(tmp_path / "res")]
    assert tm.main([*args, *common]) == 0


def test_vocab_and_text():
    ids = tm.encode_text("ab\n\u00e9")
    assert ids.tolist() == [tm.CHAR_TO_ID["a"], tm.CHAR_TO_ID["b"], 1, 0]
    assert len(tm.VOCAB) == tm.TASKS["gpt2-chars"]["model"]["vocab_size"]
    config = tm.task_config("gpt2-chars", toy=True)
    data = tm.load_text(config)
    assert data["info"]["files"] == sorted(data["info"]["files"])
    assert len(data["train"]) + len(data["val"]) == data["info"]["characters"]
    assert tm.load_text(config)["info"]["sha256"] == data["info"]["sha256"]


def test_groups_cover_every_pair():
    assert tm.groups_of([0, 1, 2, 3], None) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (0, 1, 2, 3)]
    assert tm.groups_of([0, 1], None) == [(0, 1)]


def test_gpt2_chars_train_evaluate_merge(tmp_path):
    _run(tmp_path, "train", "--task", "gpt2-chars")
    ckpts = sorted((tmp_path / "ck").glob("gpt2-chars_*_seed*.pt"))
    assert [p.name.rsplit("_", 1)[1] for p in ckpts] == ["seed0.pt", "seed1.pt"]
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    _run(tmp_path, "train", "--task", "gpt2-chars")  # cached: not retrained
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes

    _run(tmp_path, "evaluate", "--task", "gpt2-chars")
    res = json.loads((tmp_path / "res" / "evaluate_gpt2-chars_toy.json").read_text())
    assert set(res["base"]) == {"0", "1"} and res["machine"]["torch"] == torch.__version__
    (group,) = res["groups"]
    assert group["seeds"] == [0, 1]
    for m in (group["ensemble"], group["plain_average"]["metrics"], *group["base"].values()):
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1

    _run(tmp_path, "merge", "--task", "gpt2-chars", "--aligners", "identity", "cca")
    res = json.loads((tmp_path / "res" / "merge_gpt2-chars_toy.json").read_text())
    assert [r["aligner"] for r in res["merges"]] == ["identity", "cca"]
    for r in res["merges"]:  # either a merged model's metrics or a recorded error
        assert ("metrics" in r) if r["ok"] else r["error"]["type"]

    table = tm.report_markdown(tmp_path / "res", "gpt2-chars", toy=True)
    assert "| 0 1 |" in table and "| cca |" in table


@pytest.mark.skipif(not (REAL_DATA_ROOT / "MNIST" / "raw").is_dir(), reason="MNIST not available")
def test_vit_mnist_train_evaluate(tmp_path):
    _run(tmp_path, "train", "--task", "vit-mnist", "--data-root", str(REAL_DATA_ROOT))
    _run(tmp_path, "evaluate", "--task", "vit-mnist", "--data-root", str(REAL_DATA_ROOT))
    res = json.loads((tmp_path / "res" / "evaluate_vit-mnist_toy.json").read_text())
    (group,) = res["groups"]
    assert 0 <= group["ensemble"]["accuracy"] <= 1 and 0 <= group["plain_average"]["metrics"]["accuracy"] <= 1
    model, ckpt = tm.load_model(res["checkpoints"]["0"])
    assert type(model).__name__ == "ViTForImageClassification" and ckpt["seed"] == 0
