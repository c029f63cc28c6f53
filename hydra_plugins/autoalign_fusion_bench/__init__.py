"""Hydra search-path plug-in: puts autoalign's FusionBench configs (``method=autoalign/<aligner>``,
the example model and task pools) on the config search path of the ``fusion_bench`` command.

Hydra imports every plug-in in every Hydra application, so this module stays light: it imports
neither torch nor autoalign (it finds autoalign's folder with :func:`importlib.util.find_spec`,
which does not run the package), and it acts only when FusionBench's config is on the path.
"""

from __future__ import annotations

import importlib.util
import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

__all__ = ["AutoalignFusionBenchSearchPathPlugin"]

PROVIDER = "autoalign"


def _is_fusion_bench(path: str | None) -> bool:
    """Whether a search-path entry is FusionBench's config folder (or a copy of it in ``./config``)."""
    if not path:
        return False
    if "fusion_bench_config" in path:
        return True
    local = path[len("file://"):] if path.startswith("file://") else None
    return local is not None and os.path.isfile(os.path.join(local, "fabric_model_fusion.yaml"))


def config_folder() -> str | None:
    """autoalign's FusionBench config folder, or None when autoalign is not installed."""
    spec = importlib.util.find_spec("autoalign")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        folder = os.path.join(root, "integrations", "fusion_bench_config")
        if os.path.isdir(folder):
            return folder
    return None


class AutoalignFusionBenchSearchPathPlugin(SearchPathPlugin):
    """Appends ``autoalign/integrations/fusion_bench_config`` when FusionBench's config is on the path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        """Append autoalign's config folder (provider ``autoalign``) after FusionBench's."""
        if not any(_is_fusion_bench(e.path) for e in search_path.get_path()):
            return
        folder = config_folder()
        if folder is not None:
            search_path.append(provider=PROVIDER, path=f"file://{folder}")
