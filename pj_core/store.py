"""Old import path of :mod:`pj_core.personas.store`, kept for one release (see the README's
changelog): ``import pj_core.store`` gives that very module, so attributes read or patched
through the old path are the real ones."""

import sys

from pj_core.personas import store as _module
from pj_core.personas.store import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _module
