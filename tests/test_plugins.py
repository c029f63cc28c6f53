"""Third-party aligners are discovered through the ``autoalign.aligners`` entry-point group."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch

import autoalign
from autoalign.aligners import registry

PLUGIN = textwrap.dedent(
    '''
    import torch
    import autoalign

    class HalfwayAligner(autoalign.PointwiseAligner):
        """Test plug-in: identity transforms (plain averaging)."""
        name = "halfway"
        needs = "none"
        description = "test plug-in"

        def solve_point(self, point, stats, problem):
            eye = torch.eye(point.dim, dtype=torch.float64)
            return autoalign.PointPlan([eye] * problem.n_models, [eye] * problem.n_models, "permutation")
    '''
)


def _make_distribution(root):
    pkg = root / "aa_test_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PLUGIN)
    dist = root / "aa_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aa-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[autoalign.aligners]\nhalfway = aa_test_plugin:HalfwayAligner\n")
    (dist / "RECORD").write_text("")


def test_entry_point_plugin_is_listed_and_usable(tmp_path, monkeypatch):
    _make_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry.reload_plugins()
        assert "halfway" in autoalign.list_aligners()
        torch.manual_seed(0)
        models = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)) for _ in range(2)]
        merged = autoalign.merge(models, [torch.randn(8, 4)], aligner="halfway")
        expect = (models[0][0].weight + models[1][0].weight) / 2
        torch.testing.assert_close(merged[0].weight, expect)
    finally:
        registry.unregister_aligner("halfway")


def test_plugin_in_a_fresh_interpreter(tmp_path):
    _make_distribution(tmp_path)
    code = "import autoalign; print('halfway' in autoalign.list_aligners())"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_broken_plugin_warns_instead_of_breaking(tmp_path, monkeypatch):
    dist = tmp_path / "aa_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aa-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[autoalign.aligners]\nbroken = aa_no_such_module:Nothing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="could not load aligner plug-in 'broken'"):
        registry.reload_plugins()
    assert "broken" not in autoalign.list_aligners()
    assert "cca" in autoalign.list_aligners()


@pytest.mark.parametrize(
    "attrs, words",
    [
        ({"needs": "refrence"}, "needs='refrence'"),
        ({"self_moments": "half"}, "self_moments='half'"),
        ({"name": ""}, "has no name"),
    ],
)
def test_register_aligner_checks_what_it_is_given(attrs, words):
    base = {"name": "checked-example", "solve": lambda self, problem: autoalign.Plan()}
    cls = type("Checked", (autoalign.Aligner,), {**base, **attrs})
    with autoalign.testing.isolated_registries():
        with pytest.raises(autoalign.OptionError, match=re.escape(words)):
            autoalign.register_aligner(cls)
        assert "checked-example" not in autoalign.list_aligners()


def test_register_aligner_needs_a_solve_and_an_aligner_class():
    with autoalign.testing.isolated_registries():
        with pytest.raises(autoalign.OptionError, match="does not implement solve"):
            autoalign.register_aligner(type("NoSolve", (autoalign.Aligner,), {"name": "no-solve-example"}))
        with pytest.raises(autoalign.OptionError, match="expects an Aligner subclass"):
            autoalign.register_aligner(object)
