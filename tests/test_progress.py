"""The one progress display of a merge (autoalign.progress): silent by default, on stderr when
asked, one line per stage and pass without a terminal, one redrawn line on one, on in the CLI."""

import copy
import io
import pickle
import textwrap

import pytest
import torch
from torch import nn

import autoalign
import autoalign.progress
from autoalign.cli import main
from autoalign.progress import make_progress

STAGES = ("discover", "statistics", "solve", "apply", "repair")


def _nets(n: int = 2, batchnorm: bool = False) -> list[nn.Module]:
    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if batchnorm:
            return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    return [net(s) for s in range(n)]


def _data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def _starts(lines: list[str], stage: str) -> bool:
    """Whether a line says the stage starts: ``autoalign: solve`` or ``autoalign: solve (2 points)``."""
    return any(line == f"autoalign: {stage}" or line.startswith(f"autoalign: {stage} (") for line in lines)


def test_library_calls_are_silent_by_default(capsys):
    result = autoalign.merge_with_report(_nets(), _data(), aligner="cca")
    autoalign.collect_stats(_nets(), _data(), result.spec)
    autoalign.reset_bn(_nets(batchnorm=True)[0], _data())
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert not autoalign.Calibration(_data()).progress
    assert not result.report.timings.progress


def test_progress_names_every_stage_and_the_batch_counts(capsys):
    autoalign.merge(_nets(3, batchnorm=True), _data(), aligner="cca", repair="repair", progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err  # stderr is not a terminal here: plain lines
    assert all(line.startswith("autoalign: ") for line in lines), err
    for stage in STAGES:
        assert _starts(lines, stage), (stage, err)
    assert "autoalign: solve (1 point)" in lines
    assert any(line.startswith("autoalign: statistics: batch 3/3, model 3/3 (") for line in lines), err
    assert any(line.startswith("autoalign: repair") and ": batch 3/3" in line for line in lines), err
    # the last line: the seconds of every stage
    assert lines[-1].startswith("autoalign: done in ") and all(f"{stage} " in lines[-1] for stage in STAGES)


def test_schemes_and_selection_label_their_rounds_pairs_and_candidates():
    out = io.StringIO()
    autoalign.merge(_nets(3), _data(), aligner="cca", scheme="iterative", max_iterations=2, progress=autoalign.LineProgress(out, tty=False))
    assert "autoalign: statistics (round 1/2)" in out.getvalue().splitlines()
    out = io.StringIO()
    autoalign.merge(_nets(3), _data(), scheme="hierarchical", progress=autoalign.LineProgress(out, tty=False))
    assert "autoalign: pair 2/2 | solve (2 points)" in out.getvalue().splitlines()
    out = io.StringIO()
    result = autoalign.merge_with_report(_nets(), _data(5), aligner="auto", reference="best", progress=autoalign.LineProgress(out, tty=False))
    text = out.getvalue()
    assert "autoalign: aligner 1/3: procrustes | statistics" in text
    assert f"autoalign: chosen: {result.report.selection.chosen} | repair" in text
    assert "reference: batch" in text and "held-out loss: batch" in text
    assert text.count("done in") == 1 and "selection" in text.splitlines()[-1]


def test_on_a_terminal_one_line_is_redrawn_then_ended_by_the_summary():
    out = io.StringIO()
    autoalign.merge(_nets(), _data(), progress=autoalign.LineProgress(out, tty=True, refresh=0.0))
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "\rautoalign: statistics: batch 2/3, model 2/2" in text
    assert text.rsplit("\r", 1)[-1].startswith("autoalign: done in ")


def test_a_long_pass_writes_a_line_every_interval_without_a_terminal():
    out = io.StringIO()
    calib = autoalign.Calibration(_data(4), progress=autoalign.LineProgress(out, tty=False, interval=0.0))
    assert len(list(calib.batches("count"))) == 4
    lines = out.getvalue().splitlines()
    assert lines[:4] == [f"autoalign: count: batch {i}/4" for i in (1, 2, 3, 4)]
    assert len(lines) == 5 and lines[4].startswith("autoalign: count: batch 4/4 (")  # the pass's end, with its time
    out = io.StringIO()
    calib = autoalign.Calibration(_data(4), progress=autoalign.LineProgress(out, tty=False))  # default: every 10 s
    assert len(list(calib.batches("count"))) == 4
    lines = out.getvalue().splitlines()  # the first batch (no stage line before it said what runs) and the end
    assert len(lines) == 2 and lines[0] == "autoalign: count: batch 1/4" and lines[1].startswith("autoalign: count: batch 4/4 (")


def test_a_standalone_pass_reports_too(capsys):
    nets = _nets()
    spec = autoalign.find_merge_points(nets[0], torch.randn(2, 4))
    autoalign.collect_stats(nets, _data(2), spec, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "autoalign: statistics: batch 1/2" and lines[1].startswith("autoalign: statistics: batch 2/2, model 2/2 (")


def test_only_rank_0_draws(monkeypatch):
    monkeypatch.setattr(autoalign.progress, "rank_and_world", lambda: (1, 2))
    out = io.StringIO()
    autoalign.merge(_nets(), _data(), progress=autoalign.LineProgress(out, tty=False))
    assert out.getvalue() == ""


def test_the_display_is_not_part_of_the_record():
    out = io.StringIO()
    result = autoalign.merge_with_report(_nets(), _data(), progress=autoalign.LineProgress(out, tty=False))
    timings = result.report.timings
    for copied in (pickle.loads(pickle.dumps(timings)), copy.deepcopy(timings)):
        assert copied == timings and not copied.progress
    assert make_progress(False).__class__ is autoalign.Progress and make_progress(True)
    data = _data()
    assert autoalign.Calibration(data) == autoalign.Calibration(data)  # silent displays are interchangeable
    # a Calibration that shows progress may be passed with progress=True, not with progress=False's opposite
    calib = autoalign.Calibration(_data(), progress=autoalign.LineProgress(out, tty=False))
    autoalign.merge(_nets(), calib, progress=True)
    with pytest.raises(autoalign.OptionError, match="progress"):
        autoalign.merge(_nets(), autoalign.Calibration(_data()), progress=True)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    (tmp_path / "progressmodels.py").write_text(textwrap.dedent(
        """
        from torch import nn

        def make_mlp():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    for k, net in enumerate(_nets()):
        torch.save(net.state_dict(), tmp_path / f"m{k}.pt")
    torch.save(torch.randn(96, 4, generator=torch.Generator().manual_seed(0)), tmp_path / "calib.pt")
    return [
        "merge", "--arch", "progressmodels:make_mlp", "--checkpoint", str(tmp_path / "m0.pt"), "--checkpoint",
        str(tmp_path / "m1.pt"), "--data", f"tensor:{tmp_path / 'calib.pt'}", "--batch-size", "32",
        "--out", str(tmp_path / "merged.pt"),
    ]


def test_cli_merge_shows_the_display_by_default(checkpoints, capsys):
    assert main(checkpoints) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    for stage in ("load",) + STAGES:
        assert _starts(lines, stage), (stage, captured.err)
    assert "autoalign: statistics: batch 3/3, model 2/2" in captured.err
    assert lines[-1].startswith("autoalign: done in ") and "load " in lines[-1]
    assert "timings: load" in captured.out  # the report is on stdout, as before


def test_cli_merge_quiet_turns_it_off_and_progress_is_still_accepted(checkpoints, capsys):
    assert main(checkpoints + ["--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "timings: load" in captured.out
    assert main(checkpoints + ["--progress"]) == 0
    assert "autoalign: done in" in capsys.readouterr().err
