"""Fast tests of the benchmark scripts: cost.py, correlation.py, merge_accuracy.py and train.py's subset option.

Tiny MLPs on random data or scikit-learn's digits; the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import autoalign  # noqa: E402
from benchmarks import correlation, cost, merge_accuracy  # noqa: E402
from benchmarks.models import MLP  # noqa: E402
from benchmarks.train import make_config, subset_indices, train_models  # noqa: E402


def _data(n: int = 256, d_in: int = 6, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


# --------------------------------------------------------------------------- cost.py


def test_cost_measure_tiny_mlp(tmp_path: pathlib.Path) -> None:
    row = cost.measure(16, 2, "cca", samples=64, batch=32, in_features=8, repeats=1)
    assert set(row["timings"]) >= {"discover", "statistics", "solve", "apply"}
    assert row["floor_seconds"] > 0 and math.isfinite(row["stats_over_floor"])
    # two merge points of width 16; all-to-one: 2 squares + 1 cross block per point
    assert row["stats_blocks"] == 2 * 3
    assert row["stats_result_bytes"] >= 2 * 3 * 16 * 16 * 8
    assert row["stats_peak_bytes"] >= 0 and row["merge_peak_bytes"] >= 0
    assert len(row["floor_minor_faults"]) == len(row["merge_minor_faults"]) == 1
    assert all(isinstance(f, int) and f >= 0 for f in row["floor_minor_faults"] + row["merge_minor_faults"])
    result = {"command": "x", "machine": "m", "torch": torch.__version__, "date": "d", "samples": 64, "batch": 32,
              "in_features": 8, "repeats": 1, "rows": [row]}
    md = cost.to_markdown(result)
    assert "| cca | 16 | 2 |" in md
    header, rule, line = md.strip().splitlines()[-3:]
    assert header.count("|") == rule.count("|") == line.count("|")  # fault columns in header and rows
    cost.plot(result, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 0


def test_peak_memory_sees_a_tensor_allocation() -> None:
    with cost.PeakMemory("cpu") as mem:
        t = torch.ones(64 * 2**20 // 8, dtype=torch.float64)  # 64 MiB, touched
        float(t.sum())
    del t
    assert mem.peak > 32 * 2**20


def test_cost_all_pairs_aligner_holds_more_blocks() -> None:
    row = cost.measure(8, 3, "zipit", samples=48, batch=24, in_features=5, repeats=1)
    assert row["needs"] == "all_pairs"
    assert row["stats_blocks"] == 2 * (3 + 3)  # 3 squares + 3 pairs per point


def test_cost_measure_reports_the_whole_merge_against_the_floor(tmp_path: pathlib.Path) -> None:
    row = cost.measure(16, 2, "default", samples=64, batch=32, in_features=8, repeats=2)
    assert row["aligner_used"].startswith("ProcrustesAligner") and row["repair_used"] is None  # auto: no BatchNorm
    assert set(row["timings"]) >= {"discover", "statistics", "solve", "apply", "repair"}
    assert len(row["merge_runs"]) == 2 and row["total_seconds"] == min(r["seconds"] for r in row["merge_runs"])
    best = min(row["merge_runs"], key=lambda r: r["seconds"])
    assert best["seconds"] >= sum(best["timings"].values()) and best["other_seconds"] >= 0
    assert row["total_over_floor"] == pytest.approx(row["total_seconds"] / row["floor_seconds"])
    assert row["floor_peak_bytes"] >= 0 and row["other_seconds"] == best["other_seconds"]
    md = cost.to_markdown({"command": "x", "machine": "m", "torch": "t", "date": "d", "samples": 64, "batch": 32,
                           "in_features": 8, "repeats": 2, "repair": "auto", "rows": [row]})
    header, rule, line = md.strip().splitlines()[-3:]
    assert "merge total s" in header and "repair s" in header and "| default | 16 | 2 |" in line
    assert header.count("|") == rule.count("|") == line.count("|")
    cost.plot_stages([row], tmp_path / "stages.png", x_key="width", x_label="width d", panel_key="n")
    assert (tmp_path / "stages.png").stat().st_size > 0


@pytest.mark.filterwarnings("ignore:.*fewer samples than features")
def test_cost_torchvision_tiny_resnet18(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("torchvision")
    row = cost.measure_torchvision("resnet18", 2, "permutation", image_size=32, batches=2, batch_size=2)
    assert row["torchvision"] == "resnet18" and row["params"] > 10**7 and row["repair_used"] == "reset_bn"
    assert set(row["timings"]) >= {"discover", "statistics", "solve", "apply", "repair"}
    assert row["total_seconds"] >= sum(row["timings"].values()) and row["other_seconds"] >= 0
    assert row["floor_seconds"] > 0 and math.isfinite(row["total_over_floor"])
    assert row["merge_peak_bytes"] > 0 and row["floor_peak_bytes"] >= 0
    failed = {"torchvision": "vit_b_16", "n": 8, "aligner": "default", "error": "timeout after 60 s"}
    result = {"command": "x", "machine": "m", "torch": "t", "torchvision": "tv", "date": "d", "num_classes": 10,
              "batches": 2, "batch_size": 2, "image_size": 32, "device": "cpu", "repair": "auto", "repeats": 1,
              "rows": [row, failed]}
    md = cost.torchvision_markdown(result)
    header, rule, line, bad = md.strip().splitlines()[-4:]
    assert line.startswith("| resnet18 | 11.2 | 2 | permutation |") and "failed: timeout after 60 s" in bad
    assert header.count("|") == rule.count("|") == line.count("|") == bad.count("|")
    for stage in ("discover s", "statistics s", "solve s", "apply s", "repair s", "other s", "stats / bound", "merge peak MiB"):
        assert stage in header
    # the multiply-add bound: permutation takes the cross blocks only, 1 per point and row at N = 2
    assert row["forward_macs"] > 0 and row["gram_macs_repair_sites"] == 0
    assert row["floor_seconds"] < row["statistics_bound_seconds"] and row["statistics_over_bound"] > 0
    cost.plot_stages(result["rows"], tmp_path / "stages.png", x_key="n", x_label="N", panel_key="torchvision")
    assert (tmp_path / "stages.png").stat().st_size > 0


def test_cost_bound_counts_the_products_of_the_statistics_pass() -> None:
    from benchmarks.cost_bound import forward_macs, gram_macs

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)) for _ in range(3)]
    data = [torch.randn(10, 5), torch.randn(6, 5)]
    assert forward_macs(nets[0], data) == 16 * (5 * 8 + 8 * 3)
    spec = autoalign.find_merge_points(nets[0], data[0])
    full = autoalign.collect_stats(nets, data, spec)
    diag = autoalign.collect_stats(nets, data, spec, self_moments="diagonal", modules={"0": "full"})
    # 16 rows of 8 features: squares of all 3 models and 2 cross blocks, or the cross blocks only
    assert gram_macs(full, 3) == {"points": 16 * 64 * 5, "repair_sites": 0}
    assert gram_macs(diag, 3) == {"points": 16 * 64 * 2, "repair_sites": 16 * 64 * 3}


def test_cost_cuda_stages_wait_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoalign.report import Timings
    from benchmarks import cost_measure

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(1))
    original = Timings.stage
    with cost_measure.synchronized_stages("cpu"):
        assert Timings.stage is original
    with cost_measure.synchronized_stages("cuda:0"):
        t = Timings()
        with t.stage("solve"):
            assert len(calls) == 1  # before the clock starts
        assert len(calls) == 2 and t["solve"] >= 0  # and before it stops
    assert Timings.stage is original
    assert cost_measure.resolve_device("cpu") == "cpu" and cost_measure.resolve_device("cuda:1") == "cuda:1"


def test_cost_torchvision_sweep_records_a_timed_out_configuration(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "tv"
    assert cost.main(["--torchvision", "resnet18", "--n", "2", "--aligners", "permutation", "--timeout", "0.01",
                      "--out", str(out)]) == 0
    result = json.loads((out / "cost.json").read_text())
    assert result["rows"] == [{"torchvision": "resnet18", "n": 2, "aligner": "permutation", "error": "timeout after 0.01 s"}]
    assert result["image_size"] == 64 and result["batches"] == 8 and result["batch_size"] == 32 and result["repeats"] == 1
    assert result["logical_cpus"] == os.cpu_count() and result["torch"] == torch.__version__ and result["cpu"]
    assert "failed: timeout" in (out / "cost.md").read_text() and (out / "cost_stages.png").exists()


# --------------------------------------------------------------------------- correlation.py


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP(6, (12, 12), 3).eval()


def test_correlation_analysis_on_random_mlps(tmp_path: pathlib.Path) -> None:
    data = _data()
    res = correlation.analyse([_mlp(0), _mlp(1)], data, point="layers.0")
    assert res["point"] == "layers.0" and res["dim"] == 12 and res["samples"] == 256
    for key in ("corr_top1", "corr_top2", "cca_top1", "cca_top2"):
        assert len(res[key]) == 12
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in res[key])
    assert all(a >= b for a, b in zip(res["corr_top1"], res["corr_top2"]))
    assert all(a >= b for a, b in zip(res["cca_top1"], res["cca_top2"]))
    s = res["summary"]
    assert 0 <= s["frac_cca_argmax_equals_corr_argmax"] <= 1
    correlation.plot(res, tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").stat().st_size > 0
    json.dumps(res)  # serialisable


def test_correlation_of_a_model_with_itself_is_one_to_one() -> None:
    m = _mlp(0)
    twin = _mlp(0)
    res = correlation.analyse([m, twin], _data(), point="layers.2")
    alive = torch.tensor(res["alive"])
    c1 = torch.tensor(res["corr_top1"])[alive]
    t1 = torch.tensor(res["cca_top1"])[alive]
    t2 = torch.tensor(res["cca_top2"])[alive]
    assert torch.allclose(c1, torch.ones_like(c1), atol=1e-6)
    assert torch.allclose(t1, torch.ones_like(t1), atol=1e-6)  # CCA between identical features is the identity
    assert float(t2.max()) < 1e-6
    assert res["summary"]["frac_cca_argmax_equals_corr_argmax"] == 1.0


def test_correlation_rejects_unknown_point() -> None:
    with pytest.raises(ValueError, match="no alignable merge point"):
        correlation.analyse([_mlp(0), _mlp(1)], _data(), point="head")


# --------------------------------------------------------------------------- merge_accuracy.py


def test_methods_iterative_only_for_reference_aligners() -> None:
    methods = merge_accuracy.methods_for(["cca", "identity", "zipit"], ["all_to_one", "iterative"], ["none", "repair"])
    assert ("cca", "iterative", "repair") in methods
    assert not any(a in ("identity", "zipit") and s == "iterative" for a, s, _ in methods)
    assert len(methods) == 2 * 2 + 2 + 2
    # the authors' BatchNorm transform needs a repair: no row without one
    authors = merge_accuracy.methods_for(["cca:batchnorm=transform"], ["all_to_one"], ["none", "reset_bn"])
    assert authors == [("cca:batchnorm=transform", "all_to_one", "reset_bn")]


def test_method_variants_parse_options() -> None:
    assert merge_accuracy.parse_method("cca") == ("cca", {})
    assert merge_accuracy.parse_method("cca:ridge=1e-6,ridge_mode=absolute,batchnorm=transform") == (
        "cca", {"ridge": 1e-6, "ridge_mode": "absolute", "batchnorm": "transform"})
    assert merge_accuracy.parse_method("cca:ridge=auto") == ("cca", {"ridge": "auto"})
    with pytest.raises(SystemExit, match="key=value"):
        merge_accuracy.parse_method("cca:ridge")


def test_draws_are_distinct_and_capped() -> None:
    assert merge_accuracy.draws_for(8, 8, 3) == [list(range(8))]
    d = merge_accuracy.draws_for(8, 2, 3)
    assert len(d) == 3 and len({tuple(x) for x in d}) == 3
    # the first draws are the ones the MNIST table used
    assert d[0] == [0, 7]
    assert len(merge_accuracy.draws_for(3, 2, 10)) == 3


def test_merge_accuracy_end_to_end_on_digits(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    rc = merge_accuracy.main([
        "--dataset", "digits", "--arch", "mlp", "--width", "16", "--epochs", "1", "--seeds", "0", "1", "2",
        "--n", "2", "3", "--draws", "2", "--aligners", "identity", "cca", "cca:ridge=10,features=preactivation",
        "--schemes", "all_to_one",
        "--calibration", "200", "--batch-size", "100", "--threads", "1",
        "--checkpoints", str(tmp_path / "ck"), "--out", str(out),
    ])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    # N=2: 2 draws, N=3: 1 draw (only one set of 3 out of 3); 3 baselines + 3 methods each
    assert len(rows) == 3 * 6
    variant = "cca:ridge=10,features=preactivation"
    assert {r["method"] for r in rows} == {"base mean", "best base", "ensemble", "identity", "cca", variant}
    assert all(r["accuracy"] is not None and 0 <= r["accuracy"] <= 1 for r in rows)
    for r in rows:
        if r["method"] == "best base":
            mean = next(q for q in rows if q["method"] == "base mean" and q["models"] == r["models"])
            assert r["accuracy"] >= mean["accuracy"]
    assert sum(r["method"] == variant for r in rows) == 3
    md = (out / "results.md").read_text()
    assert "| cca | all_to_one | none |" in md and "Every draw" in md
    assert (out / "accuracy_vs_n.png").stat().st_size > 0


# --------------------------------------------------------------------------- train.py


def test_train_subset_is_in_the_config_only_when_set(tmp_path: pathlib.Path) -> None:
    plain = make_config("digits", "mlp", epochs=1, batch_size=32)
    assert "train_subset" not in plain
    sub = make_config("digits", "mlp", epochs=1, batch_size=32, train_subset=100)
    assert sub["train_subset"] == 100
    idx = subset_indices(1000, 100)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert torch.equal(idx, subset_indices(1000, 100))
    p_sub = train_models("digits", "mlp", [0], epochs=1, width=8, train_subset=100, out_dir=tmp_path)
    p_all = train_models("digits", "mlp", [0], epochs=1, width=8, out_dir=tmp_path)
    assert p_sub != p_all
    ck = torch.load(p_sub[0], weights_only=True)
    assert ck["config"]["train_subset"] == 100


def test_cost_profile_runs() -> None:
    text = cost.profile_stats(16, 2, samples=64, batch=32, in_features=8, top=5)
    assert "Gram x^T x in float32 (stats.py)" in text and "collect_stats" in text


def test_cost_measure_tiny_cnn() -> None:
    row = cost.measure(2, 2, "cca", samples=16, batch=8, repeats=1, model="smallcnn")
    assert row["model"] == "smallcnn" and row["floor_seconds"] > 0
    assert row["stats_blocks"] == 4 * 3  # four conv points, 2 squares + 1 cross each


def test_cost_measure_tiny_resnet20_records_every_repeat() -> None:
    row = cost.measure(0.25, 2, "cca", samples=8, batch=4, repeats=2, model="resnet20")
    assert row["model"] == "resnet20" and row["width"] == 0.25
    assert len(row["floor_runs"]) == 2 and row["floor_seconds"] == min(row["floor_runs"])
    assert len(row["statistics_runs"]) == 2 and row["timings"]["statistics"] == min(row["statistics_runs"])
    md = cost.to_markdown({"command": "x", "machine": "m", "torch": "t", "date": "d", "samples": 8, "batch": 4,
                           "in_features": 784, "model": "resnet20", "repeats": 2, "rows": [row]})
    assert "ResNet20 with width multiplier d" in md and "| cca | 0.25 | 2 |" in md


def test_merge_one_passes_a_variant_s_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(merge_accuracy.autoalign, "merge_with_report", lambda models, data, **kw: seen.update(kw))
    merge_accuracy.merge_one([], [], "cca:ridge=1e-6,ridge_mode=absolute,batchnorm=transform", "all_to_one", "reset_bn", "cpu")
    assert seen["aligner"] == "cca" and seen["ridge"] == 1e-6 and seen["ridge_mode"] == "absolute"
    assert seen["batchnorm"] == "transform" and seen["repair"] == "reset_bn"


def test_merge_accuracy_on_a_batchnorm_net_reports_the_recalibrated_bases(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    rc = merge_accuracy.main([
        "--dataset", "digits", "--arch", "resbn", "--width", "8", "--epochs", "1", "--seeds", "0", "1",
        "--n", "2", "--draws", "1", "--aligners", "permutation", "cca:batchnorm=transform", "--repairs", "none", "reset_bn",
        "--calibration", "200", "--batch-size", "100", "--calibration-augment", "--threads", "1",
        "--checkpoints", str(tmp_path / "ck"), "--out", str(out),
    ])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["calibration_augment"] is True and set(result["base_accuracy_reset_bn"]) == {"0", "1"}
    keys = [(r["method"], r["repair"]) for r in result["rows"]]
    assert ("base mean", "reset_bn") in keys and ("cca:batchnorm=transform", "reset_bn") in keys
    assert ("cca:batchnorm=transform", "none") not in keys
    assert all(r["accuracy"] is not None for r in result["rows"]), [r.get("error") for r in result["rows"]]
