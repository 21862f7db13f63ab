"""The first import of a heavy package (TensorFlow, Keras, MLflow, LiteRT's flatbuffer schema)
with Python's cyclic garbage collector paused, and what it built frozen afterwards.

Those imports create millions of objects and almost no garbage (some 3,600 objects of cycles over
TensorFlow, Keras and MLflow together); the collector, triggered by the growth alone, walks the
growing heap again and again, and every full collection later in the run walks it once more
(0.3 s each). Paused during the import and frozen after it (``gc.freeze``: the objects stay
where they are, refcounting still frees them, collections skip them), MLflow + TensorFlow +
Keras import in 3.0-3.3 s instead of 4.1-4.2 s here (bench/RESULTS.md, *The model from the
registry*). A process that never imports them is unaffected.
"""

from __future__ import annotations

import gc
import importlib
import sys
from types import ModuleType


def import_heavy(name: str) -> ModuleType:
    """``importlib.import_module(name)``; when this imports it for the first time, with the
    collector paused and everything alive frozen afterwards (see the module docstring)."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    enabled = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
