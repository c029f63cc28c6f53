"""The README's code that can run offline does run."""

import pathlib
import re

import autoalign

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_custom_aligner_example_runs_and_passes_conformance():
    (code,) = [b for b in _blocks() if "register_aligner" in b]
    try:
        exec(compile(code, "README.md", "exec"), {})
        assert "procrustes-example" in autoalign.list_aligners()
    finally:
        from autoalign.aligners import registry

        registry._REGISTRY.pop("procrustes-example", None)
