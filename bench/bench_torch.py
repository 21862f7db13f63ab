"""Benchmark: the stage on a PyTorch model against a bare litert-torch script (bench/bare_torch.py:
convert, quantize with PT2E, evaluate), whole processes, alternating rounds, in one run: wall time
ratio and peak RSS, on the digits CNN (tests/torch_models.py, trained here on the offline digits)
and on torchvision's MobileNetV3-small with random weights (no download) at 224x224.

The stage reads the same torch.export archive logged to a local sqlite MLflow store with
`mlflow.pytorch.log_model` (`models:/`), runs `quantize: {mode: int8, engine: pt2e}` with the
fidelity gate (and accuracy on digits), and registers the result; the bare script does what a
team does by hand to check the same thing (PyTorch's reference, float and int8 conversions, both
evaluated one sample a call), without a registry.

    .venv/bin/python bench/bench_torch.py [--repeats 3]

torchvision is not a dependency of the package. torch 2.13's CPU build pairs with torchvision
0.28, whose only wheel here is a CUDA build: install it beside the venv and its C ops (NMS, which
MobileNetV3 does not use) are left unregistered:

    .venv/bin/pip install --no-deps --target /tmp/torchvision torchvision==0.28.0
    PYTHONPATH=/tmp/torchvision .venv/bin/python bench/bench_torch.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_stage import timed_process  # noqa: E402


def mobilenet_v3_small(x: np.ndarray):
    """torchvision's MobileNetV3-small, random weights, its BatchNorm statistics taken from `x`
    (with torchvision's initial running statistics the logits come out near 1e-10, where no
    quantization is meaningful)."""
    # the CUDA wheel's meta registrations look up its C ops, which do not load with a CPU torch
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch
    import torchvision

    module = torchvision.models.mobilenet_v3_small(weights=None)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # a cumulative average over the batches below
    module.train()
    with torch.no_grad():
        for start in range(0, len(x), 16):
            module(torch.from_numpy(x[start : start + 16]))
    return module.eval()


def images(n: int, seed: int) -> np.ndarray:
    """Smooth random 224x224 RGB images (NCHW, ImageNet-normalized ranges): low-frequency noise
    upsampled, so activations look like a photo's more than white noise does."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (n, 3, 7, 7)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 32, axis=2), 32, axis=3)


def prepare(tmp: Path, name: str, module, calib: np.ndarray, x: np.ndarray, y: np.ndarray | None, uri: str) -> Path:
    import mlflow
    import torch

    folder = tmp / name
    folder.mkdir()
    # a dynamic batch, as mlflow.pytorch.log_model exports it from an example of five
    program = torch.export.export(module, (torch.from_numpy(x[:5]),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, folder / "model.pt2")
    np.savez(folder / "calib.npz", x=calib)
    np.savez(folder / "eval.npz", **({"x": x, "y": y} if y is not None else {"x": x}))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        mlflow.pytorch.log_model(module, name="model", input_example=x[:5], registered_model_name=f"bench-torch-{name}")
    # random weights quantize badly (int8 keeps about 11 dB of MobileNetV3-small's): its gate only
    # makes sure the stage got there, the table compares the SQNR with the bare script's
    floor = 20 if y is not None else 5
    gates = f"  - {{metric: fidelity_sqnr_db, min: {floor}}}\n" + (
        "  - {metric: accuracy, max_drop: 0.03}\n" if y is not None else ""
    )
    metrics = "[fidelity_sqnr_db, size_bytes" + (", accuracy]" if y is not None else "]")
    (folder / "m.yaml").write_text(
        f"model: models:/bench-torch-{name}/1\n"
        f"data: {{calibration: {folder / 'calib.npz'}, evaluation: {folder / 'eval.npz'}}}\n"
        "chain:\n  - quantize: {mode: int8, engine: pt2e}\n"
        f"evaluation: {{metrics: {metrics}, per_step: []}}\n"
        f"gates:\n{gates}register: {{name: bench-torch-{name}-tflite}}\n"
    )
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from tests import torch_models

    tmp = Path(tempfile.mkdtemp(prefix="bench-torch-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    x, y = torch_models.digits_nchw()
    cnn = torch_models.train(torch_models.DigitsCNN(), (x[:1200],), y[:1200])
    cases = {
        "digits CNN (1x8x8)": prepare(tmp, "digits", cnn, x[:200], x[1200:1500], y[1200:1500], uri),
        "MobileNetV3-small (3x224x224)": prepare(
            tmp, "mobilenet", mobilenet_v3_small(images(64, 2)), images(64, 0), images(100, 1), None, uri
        ),
    }
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    rows = []
    for name, folder in cases.items():
        bare = [
            sys.executable,
            str(REPO / "bench" / "bare_torch.py"),
            *(str(folder / f) for f in ("model.pt2", "calib.npz", "eval.npz", "bare.tflite")),
        ]
        stage = [
            exe,
            "run",
            str(folder / "m.yaml"),
            "--tracking-uri",
            uri,
            "-q",
            "--report",
            str(folder / "r.json"),
            "--new-version",
        ]
        got = {"bare": [], "stage": [], "bare_rss": [], "stage_rss": []}
        for r in range(args.repeats + 1):
            for side, cmd in (("bare", bare), ("stage", stage)) if r % 2 == 0 else (("stage", stage), ("bare", bare)):
                wall, rss, out = timed_process(cmd, folder)
                if side == "bare":
                    bare_out = json.loads(out.strip().splitlines()[-1])
                if r:  # the first round warms the file cache
                    got[side].append(wall)
                    got[f"{side}_rss"].append(rss)
        report = json.loads((folder / "r.json").read_text())
        rows.append((name, got, report, bare_out))

    print(f"the stage vs a bare litert-torch script, whole processes, median of {args.repeats} alternating rounds")
    print(
        "| model | bare (s) | stage (s) | ratio | peak RSS bare / stage (MB) | int8 SQNR bare / stage (dB) | int8 size bare / stage (KB) |"
    )
    print("| --- | ---: | ---: | ---: | --- | --- | --- |")
    for name, got, report, bare_out in rows:
        b, s = statistics.median(got["bare"]), statistics.median(got["stage"])
        rss = f"{statistics.median(got['bare_rss']):.0f} / {statistics.median(got['stage_rss']):.0f}"
        sqnr = f"{bare_out['int8']['sqnr_db']:.1f} / {report['candidate']['fidelity_sqnr_db']:.1f}"
        size = f"{bare_out['int8']['size_bytes'] / 1000:.1f} / {report['candidate']['size_bytes'] / 1000:.1f}"
        print(f"| {name} | {b:.2f} | {s:.2f} | {s / b:.2f}x | {rss} | {sqnr} | {size} |")


if __name__ == "__main__":
    main()
