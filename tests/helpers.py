"""What the tests share besides fixtures: the one manifest builder, the one way to run the stage,
and small readers. Test modules use them through the fixtures of the same names in conftest.py
(`manifest`, `run_stage`, `invoke`, `versions_of`); module-scoped fixtures call them directly."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "manifests" / "examples"
_RUNS = itertools.count(1)  # numbers each run's report and .tflite, unique in the session


def manifest_yaml(text: str | None = None, *, extra: str = "", **sections: Any) -> str:
    """Manifest text: `text` as it is, then each section in the order given (None: left out), then
    `extra` (YAML text) as it is. A string section is YAML as written (indented lines: the block
    under the key); anything else is dumped as flow-style YAML."""
    out = text or ""
    for key, value in sections.items():
        if value is None:
            continue
        if isinstance(value, str):
            out += f"{key}:\n{value}" if value.startswith("  ") else f"{key}: {value}\n"
            out += "" if out.endswith("\n") else "\n"
        else:
            out += f"{key}: {yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()}\n"
    return out + extra


def write_manifest(folder: Path, text: str | None = None, *, name: str = "m.yaml", **sections: Any) -> Path:
    """:func:`manifest_yaml`'s text written to `folder` / `name`; its path."""
    path = Path(folder) / name
    path.write_text(manifest_yaml(text, **sections))
    return path


@dataclass
class StageResult:
    """One `pipeline-stage run`: its exit code and output, and where its report and .tflite went."""

    exit_code: int
    output: str  # stdout and stderr, as the console shows them
    stdout: str
    stderr: str
    report_path: Path | None
    output_path: Path | None

    @property
    def report(self) -> dict:
        """report.json, as the run wrote it."""
        return read_report(self.report_path)

    @property
    def model_bytes(self) -> bytes:
        """The final .tflite (`--output`)."""
        return self.output_path.read_bytes()


def run_stage(folder: Path, path: Path | str, *args: str, report: bool = True, output: bool = True) -> StageResult:
    """`pipeline-stage run PATH ARGS` in this process (TensorFlow stays imported between tests),
    with `--report` and `--output` into `folder` (numbered per run there) unless turned off."""
    n = next(_RUNS)
    report_path = Path(folder) / f"report-{n}.json" if report else None
    output_path = Path(folder) / f"model-{n}.tflite" if output else None
    extra = [*(["--report", str(report_path)] if report_path else []), *(["--output", str(output_path)] if output_path else [])]
    result = invoke("run", str(path), *extra, *args)
    return StageResult(result.exit_code, result.output, result.stdout, result.stderr, report_path, output_path)


def invoke(*args: str):
    """Run `pipeline-stage ARGS` in this process (TensorFlow stays imported between tests)."""
    from click.testing import CliRunner

    from pipeline_stage.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `pipeline-stage` executable in a process of its own."""
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout
    )


def versions_of(name: str) -> list:
    import mlflow

    return mlflow.MlflowClient().search_model_versions(f"name='{name}'")


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def digits_manifest(register_name: str, chain: str = "{mode: dynamic}") -> str:
    """The digits CNN from the session's source (`digits-cnn@champion`), dynamic range by default, one
    accuracy gate, registered as `register_name` with alias `prod`: the run the fault tests break."""
    return manifest_yaml(
        model="models:/digits-cnn@champion",
        data={"evaluation": "runs:/${source.run_id}/data/eval.npz"},
        chain=f"  - quantize: {chain}\n",
        gates="  - {metric: accuracy, max_drop: 0.02}\n",
        register={"name": register_name, "alias": "prod"},
    )


@contextlib.contextmanager
def pointed_at(uri: str, env: dict[str, str] | None = None):
    """This process's MLflow client pointed at `uri`, with `env` set, both restored afterwards."""
    import mlflow

    before = mlflow.get_tracking_uri()
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)


def kfp_manifest(name: str, mode: str = "int8", max_ratio: float = 0.9) -> str:
    """The manifest the KFP component gets (no `model:`: the pipeline passes --model-uri)."""
    return manifest_yaml(
        data={"calibration": "runs:/${source.run_id}/data/calib.npz", "evaluation": "runs:/${source.run_id}/data/eval.npz"},
        chain=[{"quantize": {"mode": mode}}],
        gates=[{"metric": "accuracy", "max_drop": 0.02}, {"metric": "size_bytes", "max_ratio": max_ratio}],
        register={"name": name},
    )


def tflite_of(registered: dict) -> bytes:
    """The raw .tflite a registered version's `tflite_uri` names, downloaded."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=registered["tflite_uri"])
    return Path(local).read_bytes()


def demo_tflite_case(folder: Path, name: str, build) -> dict:
    """A float .tflite that `build()` (a pipeline_stage.demo builder: the flatbuffer and `inputs(n)`)
    makes, written to `folder` with 200 calibration and 300 evaluation samples: the file's path
    (`model`), its bytes (`float`), the evaluation inputs (`eval`) and the manifest's `data`."""
    import numpy as np

    flatbuffer, inputs = build()
    (folder / f"{name}.tflite").write_bytes(flatbuffer)
    np.savez(folder / "calib.npz", x=inputs(200))
    evaluation = inputs(300)
    np.savez(folder / "eval.npz", x=evaluation)
    data = {"calibration": str(folder / "calib.npz"), "evaluation": str(folder / "eval.npz")}
    return {"model": folder / f"{name}.tflite", "float": flatbuffer, "eval": evaluation, "data": data}


def signature_outputs(model_bytes: bytes, inputs: dict) -> dict:
    """Every output of a .tflite by signature name on `inputs` (by input name), run by the LiteRT
    interpreter itself one sample a call: the tests' own check, independent of the stage's runtime."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model_bytes).get_signature_runner()
    rows = [runner(**{k: v[i : i + 1] for k, v in inputs.items()}) for i in range(len(next(iter(inputs.values()))))]
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}


def sqnr(reference, candidate) -> float:
    """SQNR in dB of `candidate` against `reference` (float64; an exact match gives 300 dB, not infinity)."""
    import numpy as np

    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum((reference - candidate) ** 2), 1e-30)))


def sqnr_db(reference: dict, candidate: dict) -> dict[str, float]:
    """:func:`sqnr` of each output of `reference` (by name) against the same output of `candidate`."""
    return {name: sqnr(value, candidate[name]) for name, value in reference.items()}


def dist_info(root: Path, dist: str, version: str, entry_points: str, modules: dict[str, str]) -> Path:
    """A distribution as pip leaves it in site-packages: modules plus a .dist-info folder."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[pipeline_stage]\n{entry_points}\n")
    for name, code in modules.items():
        (root / f"{name}.py").write_text(code)
    return root
