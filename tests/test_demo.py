"""``autoalign.examples.demo.run_demo``: a short run on scikit-learn digits."""

import math

import pytest

import autoalign
from autoalign.examples.demo import DemoResult, run_demo


def test_run_demo_digits_small(tmp_path):
    lines = []
    result = run_demo("digits", n_models=2, epochs=2, out_dir=tmp_path, progress=True, print_fn=lines.append)
    assert isinstance(result, DemoResult)
    archs = result.config["archs"]
    assert archs == ["mlp", "mlp_bn"]
    for arch in archs:
        kinds = [r.kind for r in result.rows if r.arch == arch]
        assert kinds.count("base") == 1 and kinds.count("ensemble") == 1
        merged = {r.method for r in result.merge_rows(arch)}
        assert merged == set(autoalign.list_aligners())  # every registered aligner
    # repair "none" and REPAIR everywhere; reset_bn only where there is BatchNorm
    assert {r.repair for r in result.merge_rows("mlp")} == {None, "repair"}
    assert {r.repair for r in result.merge_rows("mlp_bn")} == {None, "reset_bn", "repair"}
    for r in result.rows:
        assert 0.0 <= r.accuracy <= 1.0 and not math.isnan(r.accuracy)
    cca = [r for r in result.merge_rows() if r.method == "cca"]
    assert cca and all(isinstance(r.accuracy, float) and 0.0 <= r.accuracy <= 1.0 for r in cca)
    assert all(r.seconds is not None and r.seconds >= 0 for r in cca)
    base = next(r for r in result.rows if r.kind == "base" and r.arch == "mlp")
    assert len(result.base_accuracies["mlp"]) == 2
    assert base.accuracy == pytest.approx(sum(result.base_accuracies["mlp"]) / 2)
    # the table was printed, progress was shown, and the files were written
    printed = "\n".join(lines)
    assert "ensemble (mean of logits)" in printed and "merge: cca" in printed
    assert "trained mlp seed 1" in printed
    assert result.table_path.is_file() and "| mlp | merge: cca |" in result.table_path.read_text()
    assert result.json_path.is_file()
    if result.plot_path is not None:
        assert result.plot_path.is_file() and result.plot_path.stat().st_size > 1000


def test_run_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        run_demo("nosuchdata", out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="n_models"):
        run_demo("digits", n_models=0, out_dir=tmp_path, progress=False)
