"""Import TensorFlow quietly and only when needed (validate/plugins/schema never call this)."""

from __future__ import annotations

import contextlib
import os
import sys


def import_tf():
    """Return the ``tensorflow`` module with its C++ and absl chatter turned down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # bit-identical results across runs
    from pipeline_stage.engine.heavy_imports import import_heavy

    tf = import_heavy("tensorflow")  # deliberately lazy

    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
    tf.get_logger().setLevel("ERROR")
    return tf


@contextlib.contextmanager
def captured_output(log_path):
    """Send everything written to fd 1 and 2 (TF's C++ logs included) to `log_path`.

    The converter prints MLIR diagnostics from C++, which no Python redirect catches; the log is
    kept next to the model and quoted when a conversion fails.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def stdout_to_stderr():
    """Keras export and the converter print to stdout; keep stdout for the stage's own output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
