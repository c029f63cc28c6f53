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

        registry.unregister_aligner("procrustes-example")


def test_readme_schemes_averaging_repair_block_runs_on_small_models():
    import torch

    (code,) = [b for b in _blocks() if 'scheme="hierarchical"' in b]
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)) for _ in range(3)]
    calib = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    exec(compile(code, "README.md", "exec"), {"autoalign": autoalign, "models": models, "calib": calib})
