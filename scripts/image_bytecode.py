"""Image build step: precompile the bytecode of what the stage imports, and only that.

The image runs with PYTHONDONTWRITEBYTECODE (a pod starts from the image every time, so bytecode
written at run time is lost anyway). Without .pyc files every run compiles TensorFlow's, Keras',
MLflow's and pandas' Python from source first: a digits int8 run took 10.7 s instead of 5.5 s
(bench/bench_image.py). Compiling the whole venv would add about 270 MB; compiling what the
stage's code paths import adds about 90 MB.

How: a real `pipeline-stage run` (full int8, a tiny Keras model, a throwaway file store) and the
imports of the other code paths (prune / qat through tfmot, the LiteRT Quantizer, search workers,
the KFP executor), with bytecode writing on; then every .pyc is rewritten as checked-hash, so that
it stays valid whatever file times the copy into the final stage gives, and a derived image that
upgrades a package never runs stale bytecode.

    python scripts/image_bytecode.py SITE_PACKAGES
"""

from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OTHER_PATHS = [
    "pipeline_stage.run.trial",  # search workers
    "pipeline_stage.kfp_components",
    "kfp.dsl.executor_main",  # how KFP starts a Python component in this image
    "tensorflow_model_optimization.sparsity.keras",  # prune
    "tensorflow_model_optimization.quantization.keras",  # qat
    "tf_keras",
    "litert_quantizer",  # engine: litert
]

TINY_RUN = """
import numpy as np, keras
rng = np.random.default_rng(0)
x = rng.uniform(0, 1, (64, 8, 8, 1)).astype("float32")
y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("int64")
model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                          keras.layers.Flatten(), keras.layers.Dense(2)])
model.save("model.keras")
np.savez("calib.npz", x=x[:32])
np.savez("eval.npz", x=x, y=y)
open("m.yaml", "w").write(
    "model: model.keras\\ndata: {calibration: calib.npz, evaluation: eval.npz}\\n"
    "chain:\\n  - quantize: {mode: int8}\\nevaluation: {latency_runs: 5}\\n"
    "gates:\\n  - {metric: accuracy, max_drop: 1.0}\\nregister: {name: warmup, alias: warmup}\\n"
)
"""


def warm(site_packages: Path) -> None:
    for cache in list(site_packages.rglob("__pycache__")):  # pip's, from the install: all of it
        shutil.rmtree(cache)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # a throwaway store; MLflow 3 refuses file stores otherwise
    with tempfile.TemporaryDirectory() as tmp:
        run = [sys.executable, "-c", TINY_RUN]
        subprocess.run(run, cwd=tmp, env=env, check=True)
        stage = [sys.executable, "-m", "pipeline_stage.cli", "run", "m.yaml", "--tracking-uri", f"file://{tmp}/mlruns", "-q"]
        subprocess.run(stage, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
        imports = [sys.executable, "-c", "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)", *OTHER_PATHS]
        subprocess.run(imports, cwd=tmp, env=env, check=True)

    count = 0
    for pyc in site_packages.rglob("__pycache__/*.pyc"):
        source = pyc.parent.parent / (pyc.name.split(".", 1)[0] + ".py")
        if source.exists():
            py_compile.compile(
                str(source), cfile=str(pyc), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH
            )
            count += 1
        else:
            pyc.unlink()
    print(f"image_bytecode: {count} modules precompiled (checked-hash)")


if __name__ == "__main__":
    warm(Path(sys.argv[1]))
