"""Old module paths, kept for one release (the README's changelog lists them).

``import pj_core.kv`` (an old path) gives the moved module itself,
:mod:`pj_core.backends.hf.kv`: the same object under both names, so reading or patching an
attribute through the old path reaches the real module. The finder is installed when
``pj_core`` is imported and only answers for the names in :data:`MOVED`; the new module is
imported on first use of the old name, nothing earlier.

Example:
    >>> import importlib
    >>> importlib.import_module("pj_core.kv") is importlib.import_module("pj_core.backends.hf.kv")
    True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

MOVED: dict[str, str] = {
    **{
        f"pj_core.{name}": f"pj_core.decoding.{name}"
        for name in (
            "sampling",
            "rounds",
            "speculative",
            "lockstep",
            "pool",
            "logits",
            "guidance",
            "stopping",
            "strategy_choice",
            "generation_config",
        )
    },
    **{
        f"pj_core.{name}": f"pj_core.backends.hf.{name}"
        for name in ("models", "model_cache", "cpu_linear", "kv")
    },
    "pj_core.store": "pj_core.personas.store",
    "pj_core.catalog": "pj_core.personas.catalog",
}
"""Old module path -> where the module lives now."""


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path of :data:`MOVED` to the moved module object."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        # The moved module itself: its __name__ and __spec__ stay those of the new path.
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the moved module was executed under its new name."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
