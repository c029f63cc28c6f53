"""Every public function and class has a numpy-style docstring with a runnable example.

The objects checked are everything in ``autoalign.__all__`` that is callable
(functions and classes; for a class, the class docstring itself, not an
inherited one) plus :func:`autoalign.testing.check_aligner`. Each docstring must
have an ``Examples`` section, and its examples are run as doctests.
"""

from __future__ import annotations

import doctest
import inspect
import re

import pytest

import autoalign
import autoalign.testing

_EXAMPLES = re.compile(r"^Examples\n-{3,}\n", re.M)
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public_objects() -> dict[str, object]:
    out = {}
    for name in autoalign.__all__:
        obj = getattr(autoalign, name)
        if inspect.ismodule(obj) or not callable(obj):
            continue
        out[f"autoalign.{name}"] = obj
    out["autoalign.testing.check_aligner"] = autoalign.testing.check_aligner
    return out


PUBLIC = _public_objects()


def _own_docstring(obj: object) -> str:
    """The object's own docstring (a class does not inherit its base's here)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


@pytest.fixture
def restore_registries():
    """Examples may register aligners or channel rules: undo that afterwards."""
    with autoalign.testing.isolated_registries():
        yield


def test_the_list_of_public_objects_is_complete():
    assert "autoalign.merge" in PUBLIC and "autoalign.MergeSpec" in PUBLIC
    assert len(PUBLIC) == len([n for n in autoalign.__all__ if n != "aligners"]) + 1


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_docstring_has_examples_that_run(name, restore_registries):
    obj = PUBLIC[name]
    doc = _own_docstring(obj)
    assert doc, f"{name} has no docstring"
    assert _EXAMPLES.search(doc), f"{name}'s docstring has no numpy-style 'Examples' section"
    # only the object's own docstring: methods are not collected (recurse=False)
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
    examples = [ex for t in tests for ex in t.examples]
    assert examples, f"{name}'s 'Examples' section has no '>>>' example"
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    report: list[str] = []
    for t in tests:
        runner.run(t, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed\n" + "".join(report)


def _library_modules() -> list[str]:
    import pkgutil

    return sorted(m.name for m in pkgutil.walk_packages(autoalign.__path__, "autoalign."))


#: Modules that import an optional dependency (an extra), and the dependency.
OPTIONAL_DEPENDENCIES: dict[str, str] = {"autoalign.integrations.fusion_bench": "fusion_bench"}


@pytest.mark.parametrize("module", _library_modules())
def test_every_module_s_doctests_run(module, restore_registries):
    """Every example in the library's docstrings runs (not only the public objects')."""
    import importlib

    if module in OPTIONAL_DEPENDENCIES:
        pytest.importorskip(OPTIONAL_DEPENDENCIES[module])

    mod = importlib.import_module(module)
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    report: list[str] = []
    for t in doctest.DocTestFinder().find(mod, module):
        runner.run(t, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} doctest examples failed\n" + "".join(report)
