"""Benchmark: `pipeline-stage run` vs a bare script doing the same work, each as its own process,
and CLI start-up.

Three cases, full int8, in alternating rounds (the first dropped):
  digits          the demo's digits CNN, 597 evaluation samples, the model from a local file
  mnist-sized     an MNIST-sized 28x28 CNN of about 35k parameters, 3,000 evaluation samples, local file
  mnist-registry  the same model logged with `mlflow.tensorflow.log_model` and registered, the
                  manifest naming `models:/...`: the stage resolves and downloads it through the server
  bare   = `python bench/bare_script.py` on the local files (imports, float + int8 conversion,
           Keras / float / int8 accuracy, latency; what a careful engineer writes by hand)
  tuned  = the same with `--tuned`: the stage's two process-level savings (imports with the garbage
           collector paused, no interpreter teardown), so stage / tuned is what the stage's own
           work costs (MLflow, the manifest, the reports)
  stage  = `pipeline-stage run` against a real `mlflow server` on loopback (its run, params, the
           .tflite, the pyfunc, a new registered version and alias, the reports), `--new-version`
Prints whole-process wall time (median), the ratio, each side's phases (median; the stage's from
report.json `timing`), and each side's peak RSS (the process tree, from wait4). Then
`pipeline-stage validate` / `--help` start-up in a fresh process vs `python -c pass`.

    .venv/bin/python bench/bench_stage.py [--repeats 5] [--cases digits,mnist-sized,mnist-registry]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STAGE_PHASES = ("startup", "resolve", "model_download", "load", "baseline", "chain", "evaluate", "register", "reports")
BARE_PHASES = ("imports", "load", "baseline", "convert", "evaluate", "save")


# Runs the command as its child and writes "wall_seconds maxrss_kb" to the file in argv[1]. The
# launcher is a small process on purpose: Linux carries a process's peak RSS over fork and exec,
# so a command forked straight from this (TensorFlow-laden) benchmark would report the
# benchmark's own RSS as its floor.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - start} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed_process(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB of the process tree (wait4 in a small launcher: the command
    and the descendants it waited for), and stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("r") as usage:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, usage.name, *cmd], cwd=cwd, stdout=out, stderr=err, text=True)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.read()[-2000:]}")
        wall, maxrss_kb = (float(v) for v in Path(usage.name).read_text().split())
        return wall, maxrss_kb / 1024, out.read()


def prepare(tmp: Path, name: str, model, calib: np.ndarray, x: np.ndarray, y: np.ndarray) -> Path:
    folder = tmp / name
    folder.mkdir()
    model.save(folder / "model.keras")
    np.savez(folder / "calib.npz", x=calib)
    np.savez(folder / "eval.npz", x=x, y=y)
    manifest = folder / "m.yaml"
    manifest.write_text(
        f"model: {folder / 'model.keras'}\ndata: {{calibration: {folder / 'calib.npz'}, evaluation: {folder / 'eval.npz'}}}\n"
        "chain:\n  - quantize: {mode: int8}\nevaluation: {per_step: [], latency_runs: 100, threads: 2}\n"
        f"gates:\n  - {{metric: accuracy, max_drop: 0.05}}\nregister: {{name: bench-{name}, alias: bench}}\n"
    )
    return folder


def bare_command(folder: Path) -> list[str]:
    """bench/bare_script.py on the case's local files (model.keras, calib.npz, eval.npz)."""
    files = (str(folder / f) for f in ("model.keras", "calib.npz", "eval.npz"))
    return [sys.executable, str(REPO / "bench" / "bare_script.py"), *files]


def alternating_rounds(
    bare_cmd: list[str], stage_cmd: list[str], folder: Path, repeats: int, *, tuned: bool = False
) -> dict[str, list]:
    """`repeats` + 1 rounds of the commands as whole processes in `folder`, the order reversed every
    round and the first round dropped (it warms the file cache): each side's wall seconds, peak
    RSS (MB) and phases (a bare script's from its JSON line, the stage's from `r.json`'s timing).
    With `tuned`, the bare script also runs with `--tuned` (side "tuned")."""
    sides = [("bare", bare_cmd), ("stage", stage_cmd)] + ([("tuned", [*bare_cmd, "--tuned"])] if tuned else [])
    got: dict[str, list] = {f"{side}{k}": [] for side, _ in sides for k in ("", "_rss", "_phases")}
    for r in range(repeats + 1):
        for side, cmd in sides if r % 2 == 0 else sides[::-1]:
            wall, rss, out = timed_process(cmd, folder)
            if r == 0:
                continue
            got[side].append(wall)
            got[f"{side}_rss"].append(rss)
            if side == "stage":
                got["stage_phases"].append(json.loads((folder / "r.json").read_text())["timing"])
            else:
                got[f"{side}_phases"].append(json.loads(out.strip().splitlines()[-1])["phases"])
    return got


def from_registry(tmp: Path, name: str, model, local: Path, tracking_uri: str) -> Path:
    """The `local` case with its model in the registry instead of a file, as a training step leaves
    it: logged with `mlflow.tensorflow.log_model` to the server and registered; the manifest names
    `models:/bench-source-<name>/1`. The bare script keeps reading the local file."""
    import shutil

    import mlflow

    folder = tmp / name
    shutil.copytree(local, folder)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("bench-training")
    with mlflow.start_run():
        mlflow.tensorflow.log_model(model, name="model", registered_model_name=f"bench-source-{name}")
    text = (folder / "m.yaml").read_text().replace(f"model: {local / 'model.keras'}", f"model: models:/bench-source-{name}/1")
    (folder / "m.yaml").write_text(text.replace(f"bench-{local.name}", f"bench-{name}").replace(str(local), str(folder)))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="digits,mnist-sized,mnist-registry", help="comma-separated, of the default")
    args = ap.parse_args()

    from bench.bench_eval import mnist_sized_cnn
    from pipeline_stage.demo import digits_data, train_digits_cnn
    from tests.services import start_mlflow_server, stop_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-stage-"))
    server, uri = start_mlflow_server(tmp / "server")
    data = digits_data()
    digits = train_digits_cnn(data)
    mnist = mnist_sized_cnn()
    rng = np.random.default_rng(0)
    x_mnist = rng.uniform(0, 1, (3200, 28, 28, 1)).astype(np.float32)
    y_mnist = mnist.predict(x_mnist, verbose=0).argmax(-1)  # labels the float model gets right
    cases = {
        "digits": prepare(tmp, "digits", digits, data.calibration[0], *data.evaluation),
        "mnist-sized": prepare(tmp, "mnist-sized", mnist, x_mnist[:200], x_mnist[200:], y_mnist[200:]),
    }
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    rows = []
    try:
        cases["mnist-registry"] = from_registry(tmp, "mnist-registry", mnist, cases["mnist-sized"], uri)
        for name, folder in cases.items():
            if name not in args.cases.split(","):
                continue
            stage_cmd = [exe, "run", str(folder / "m.yaml"), "--tracking-uri", uri, "-q", "--report", str(folder / "r.json")]
            rounds = alternating_rounds(bare_command(folder), [*stage_cmd, "--new-version"], folder, args.repeats, tuned=True)
            rows.append((name, rounds))
    finally:
        stop_server(server)

    print(
        f"`pipeline-stage run` (real MLflow server) vs the bare script, whole processes, median of {args.repeats} alternating rounds"
    )
    print(
        "| model | bare script (s) | stage (s) | ratio | target | tuned bare (s) | stage / tuned | peak RSS bare / stage (MB) |"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    for name, got in rows:
        b, s, t = (statistics.median(got[side]) for side in ("bare", "stage", "tuned"))
        target = {"digits": "<= 1.3x", "mnist-sized": "<= 1.2x", "mnist-registry": "<= 1.25x"}[name]
        rss = f"{statistics.median(got['bare_rss']):.0f} / {statistics.median(got['stage_rss']):.0f}"
        print(f"| {name} | {b:.2f} | {s:.2f} | {s / b:.2f}x | {target} | {t:.2f} | {s / t:.2f}x | {rss} |")
    for name, got in rows:
        print()
        print(f"{name}: where the time goes (median seconds)")
        print("| stage phase | s | bare script phase | s |")
        print("| --- | ---: | --- | ---: |")
        stage = [(p, statistics.median(t.get(f"{p}_s") or 0.0 for t in got["stage_phases"])) for p in STAGE_PHASES]
        bare_rows = [(p, statistics.median(t.get(p, 0.0) for t in got["bare_phases"])) for p in BARE_PHASES]
        for i in range(max(len(stage), len(bare_rows))):
            left = f"{stage[i][0]} | {stage[i][1]:.2f}" if i < len(stage) else " | "
            right = f"{bare_rows[i][0]} | {bare_rows[i][1]:.2f}" if i < len(bare_rows) else " | "
            print(f"| {left} | {right} |")

    def startup(cmd: list[str]) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    v = startup([exe, "validate", str(REPO / "manifests/examples/digits-int8.yaml")])
    h = startup([exe, "--help"])
    py = startup([sys.executable, "-c", "pass"])
    print()
    print("| start-up | seconds | vs `python -c pass` | target |")
    print("| --- | ---: | ---: | --- |")
    print(f"| `pipeline-stage validate` | {v:.3f} | {v / py:.1f}x | < 1 s |")
    print(f"| `pipeline-stage --help` | {h:.3f} | {h / py:.1f}x | < 1 s |")


if __name__ == "__main__":
    main()
