"""Integrations of autoalign with other toolkits.

Each integration lives in its own module and imports its toolkit only when that module is
imported, so ``import autoalign`` never pulls in a toolkit:

- :mod:`autoalign.integrations.fusion_bench`: autoalign as a FusionBench method
  (``pip install "autoalign[fusion-bench]"``), see ``docs/fusion_bench.md``.
- :mod:`autoalign.integrations.checkpoints`: build a model from an architecture name and a
  checkpoint file (the model-pool target of the FusionBench configs; needs no toolkit).
"""

__all__: list[str] = []
