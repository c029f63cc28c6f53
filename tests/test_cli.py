"""The ``autoalign`` command line, driven as a user would: ``python -m autoalign ...``."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import autoalign
from autoalign.cli import main, parse_option, parse_shape
from autoalign.spec import MergeSpec

TINY_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_mlp():
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def make_convnet():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
        )

    not_a_model = 3
    """
)


def run_cli(*args, cwd=None, pythonpath=None, timeout=120):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "autoalign", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )


@pytest.fixture
def tiny_module(tmp_path):
    (tmp_path / "tinymodels.py").write_text(TINY_MODULE)
    return tmp_path


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("autoalign: error:") or "error:" in proc.stderr, proc.stderr
    for f in fragments:
        assert f in proc.stderr, (f, proc.stderr)


# ----------------------------------------------------------------------------- inspect


def test_inspect_resnet18(tmp_path):
    out = tmp_path / "spec.json"
    proc = run_cli("inspect", "resnet18", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "layer1.0.conv1" in proc.stdout
    assert "coverage" in proc.stdout
    assert "self-check ok" in proc.stdout
    assert "12 linear" in proc.stdout  # counts per kind
    spec = MergeSpec.from_json(out.read_text())
    assert "layer1.0.conv1" in [p.name for p in spec.points]


def test_inspect_module_callable(tiny_module):
    proc = run_cli("inspect", "tinymodels:make_convnet", "--input-shape", "2,3,8,8", pythonpath=tiny_module)
    assert proc.returncode == 0, proc.stderr
    assert "coverage: 1.000" in proc.stdout
    assert "self-check ok" in proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "dim", "kind"]


@pytest.mark.parametrize(
    "target, extra, fragments",
    [
        ("tinymodels:make_convnet", [], ["--input-shape"]),  # required for module:callable
        ("tinymodels:make_convnett", ["--input-shape", "2,3,8,8"], ["make_convnett", "did you mean make_convnet"]),
        ("tinymodels:not_a_model", ["--input-shape", "2,4"], ["not a callable"]),
        ("no_such_module_xyz:make", ["--input-shape", "2,4"], ["no_such_module_xyz", "PYTHONPATH"]),
    ],
    ids=["no-input-shape", "typo", "not-callable", "no-module"],
)
def test_inspect_module_callable_errors(tiny_module, target, extra, fragments):
    assert_user_error(run_cli("inspect", target, *extra, pythonpath=tiny_module), *fragments)


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("nosuchmodel", ["nosuchmodel", "not a torchvision classifier", "resnet18", "module:callable"]),
        ("resnet19", ["resnet19", "did you mean resnet18"]),
    ],
)
def test_inspect_unknown_model(name, fragments):
    assert_user_error(run_cli("inspect", name), *fragments)


# ----------------------------------------------------------------------------- aligners


def test_aligners_lists_builtins():
    proc = run_cli("aligners")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    for name in ("cca", "permutation", "identity"):
        assert name in names
    assert "CCA" in proc.stdout  # descriptions are printed


# ----------------------------------------------------------------------------- merge


def _make_checkpoints(tmp_path):
    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    a, b = mlp(0), mlp(1)
    torch.save(a.state_dict(), tmp_path / "a.pt")  # a plain state dict
    torch.save({"state_dict": b.state_dict(), "epoch": 3, "arch": "tinymodels:make_mlp"}, tmp_path / "b.pt")  # as train.py writes
    torch.save(torch.randn(96, 4, generator=torch.Generator().manual_seed(0)), tmp_path / "calib.pt")
    return a, b


def _merge_cli(tmp, *extra):
    """``autoalign merge`` on the two checkpoints of :func:`_make_checkpoints` with extra arguments."""
    return run_cli(
        "merge", "--arch", "tinymodels:make_mlp", "--checkpoint", tmp / "a.pt", "--checkpoint", tmp / "b.pt",
        "--data", f"tensor:{tmp / 'calib.pt'}", *extra, pythonpath=tmp,
    )


def test_merge_end_to_end(tiny_module):
    tmp = tiny_module
    a, b = _make_checkpoints(tmp)
    out = tmp / "merged.pt"
    proc = _merge_cli(tmp, "--aligner", "cca", "--option", "ridge=0.1", "--batch-size", "32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "point" in proc.stdout and "timings" in proc.stdout
    # the progress display is on by default, on stderr, in plain lines (stderr is a pipe here)
    assert "autoalign: statistics: batch 3/3, model 2/2" in proc.stderr and "\r" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("autoalign: done in "), proc.stderr
    saved = torch.load(out, weights_only=True)
    assert saved["arch"] == "tinymodels:make_mlp"
    assert saved["aligner"] == "cca"
    assert saved["aligner_options"] == {"ridge": 0.1}
    assert "point" in saved["report"]
    sys.path.insert(0, str(tmp))
    try:
        import tinymodels

        model = tinymodels.make_mlp()
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop("tinymodels", None)
    model.load_state_dict(saved["state_dict"])  # strict: same keys and shapes
    x = torch.randn(5, 4)
    assert torch.isfinite(model(x)).all()
    # the merge is a real merge: not a copy of either input
    assert not torch.equal(saved["state_dict"]["0.weight"], a.state_dict()["0.weight"])
    assert not torch.equal(saved["state_dict"]["0.weight"], b.state_dict()["0.weight"])


def test_merge_precision_reaches_the_statistics(tiny_module):
    """``--precision float64`` gives the merge that ``merge(..., precision="float64")`` gives."""
    models = _make_checkpoints(tiny_module)
    calib = torch.load(tiny_module / "calib.pt", weights_only=True)
    want = autoalign.merge(list(models), list(calib.split(32)), aligner="cca", precision="float64").state_dict()
    proc = _merge_cli(tiny_module, "--aligner", "cca", "--batch-size", "32", "--precision", "float64", "--out", tiny_module / "m64.pt")
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tiny_module / "m64.pt", weights_only=True)["state_dict"]
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=k)
    bad = _merge_cli(tiny_module, "--precision", "float16", "--out", tiny_module / "m16.pt")
    assert bad.returncode != 0 and "--precision" in bad.stderr and "float16" in bad.stderr
    assert not (tiny_module / "m16.pt").exists()


def test_merge_auto_prints_and_saves_the_choice(tiny_module):
    """``--aligner auto`` (unlabelled tensor data: scored against the ensemble) and ``ridge=auto``."""
    _make_checkpoints(tiny_module)
    proc = _merge_cli(tiny_module, "--aligner", "auto", "--batch-size", "16", "--out", tiny_module / "auto.pt")
    assert proc.returncode == 0, proc.stderr
    assert "aligner chosen by held-out ensemble_kl" in proc.stdout and "permutation" in proc.stdout
    saved = torch.load(tiny_module / "auto.pt", weights_only=True)
    assert saved["chosen"] in ("permutation", "cca")
    proc = _merge_cli(tiny_module, "--aligner", "cca", "--option", "ridge=auto", "--batch-size", "16",
                      "--out", tiny_module / "ridge.pt")
    assert proc.returncode == 0, proc.stderr
    assert "ridge chosen by held-out" in proc.stdout
    assert torch.load(tiny_module / "ridge.pt", weights_only=True)["chosen"].startswith("ridge=")


def test_merge_bad_aligner_name(tiny_module):
    tmp = tiny_module
    _make_checkpoints(tmp)
    proc = run_cli(
        "merge", "--arch", "tinymodels:make_mlp", "--checkpoint", tmp / "a.pt", "--checkpoint", tmp / "b.pt",
        "--data", f"tensor:{tmp / 'calib.pt'}", "--aligner", "ccaa", "--out", tmp / "m.pt", pythonpath=tmp,
    )
    assert_user_error(proc, "ccaa", "cca", "identity", "permutation")
    assert not (tmp / "m.pt").exists()


def test_merge_missing_checkpoint(tiny_module):
    tmp = tiny_module
    _make_checkpoints(tmp)
    proc = run_cli(
        "merge", "--arch", "tinymodels:make_mlp", "--checkpoint", tmp / "a.pt", "--checkpoint", tmp / "nope.pt",
        "--data", f"tensor:{tmp / 'calib.pt'}", "--out", tmp / "m.pt", pythonpath=tmp,
    )
    assert_user_error(proc, "nope.pt")


def test_merge_checkpoint_of_wrong_architecture(tiny_module):
    tmp = tiny_module
    _make_checkpoints(tmp)
    torch.save(nn.Linear(4, 3).state_dict(), tmp / "wrong.pt")
    proc = run_cli(
        "merge", "--arch", "tinymodels:make_mlp", "--checkpoint", tmp / "a.pt", "--checkpoint", tmp / "wrong.pt",
        "--data", f"tensor:{tmp / 'calib.pt'}", "--out", tmp / "m.pt", pythonpath=tmp,
    )
    assert_user_error(proc, "wrong.pt", "does not fit the architecture")


# ----------------------------------------------------------------------------- in-process: parsing and help


@pytest.mark.parametrize("command", ["inspect", "aligners", "merge", "demo"])
def test_help_of_every_subcommand(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "example" in text
    assert f"autoalign {command}" in text


def test_argparse_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["merge", "--data", "digits"]) == 2  # --checkpoint and --out missing
    assert "required" in capsys.readouterr().err


def test_bad_option_and_bad_data_spec(capsys, tmp_path):
    assert main(["merge", "--arch", "torchvision:resnet18", "--checkpoint", "a", "--checkpoint", "b",
                 "--data", "digits", "--option", "ridge", "--out", str(tmp_path / "m.pt")]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["merge", "--arch", "torchvision:resnet18", "--checkpoint", "a", "--checkpoint", "b",
                 "--data", "digits", "--option", "no_such_option=1", "--out", str(tmp_path / "m.pt")]) == 2
    assert "no_such_option" in capsys.readouterr().err


def test_parse_option_and_shape():
    assert parse_option("ridge=0.1") == ("ridge", 0.1)
    assert parse_option("iters=3") == ("iters", 3)
    assert parse_option("exact=true") == ("exact", True)
    assert parse_option("mode=absolute") == ("mode", "absolute")
    assert parse_option("x=none") == ("x", None)
    assert parse_shape("2,3,64,64") == (2, 3, 64, 64)
    assert parse_shape("2x3x8x8") == (2, 3, 8, 8)


def test_imagefolder_data_is_read_in_a_fixed_random_order(tmp_path):
    """An image folder lists its images class by class; calibration batches of one class spoil
    BatchNorm statistics estimated in training mode (and --num-batches would see one class)."""
    from PIL import Image

    from autoalign.cli import make_data

    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(8):
            Image.new("RGB", (4, 4), (255 * c, 0, 0)).save(tmp_path / f"class{c}" / f"{i}.png")
    labels = [[int(t) for t in y] for _, y in make_data(f"imagefolder:{tmp_path}", batch_size=4)]
    assert sorted(sum(labels, [])) == [0] * 8 + [1] * 8 and sum(labels, []) != sorted(sum(labels, []))
    assert labels == [[int(t) for t in y] for _, y in make_data(f"imagefolder:{tmp_path}", batch_size=4)]
