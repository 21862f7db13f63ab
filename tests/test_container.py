"""The image, built for real with podman (scripts/build-image.sh), run against the host's MLflow."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import mlflow
import pytest

from tests.helpers import REPO
from tests.services import _wait, stop_server

TAG = "localhost/pipeline-stage:test"
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "scripts" / "containers.conf")}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="building images here needs root (apt-get, debootstrap); CI runs as root",
)


def _work(tmp_path, manifest: str):
    """A folder for /work with the manifest m.yaml, writable by the container's user (uid 1000)."""
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    (work / "m.yaml").write_text(manifest)
    return work


def podman(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def image():
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-image.sh"), TAG], capture_output=True, text=True, env=ENV, timeout=1800
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout.strip().splitlines()[-1])  # "built ... in N s; size M MB"
    return TAG


def test_image_lists_plugins_as_non_root(image):
    result = podman("run", "--rm", image, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    steps = {s["name"]: s for s in json.loads(result.stdout)["steps"]}
    assert steps["quantize"]["distribution"] == "pipeline-stage 0.1.0"
    who = podman("run", "--rm", "--entrypoint", "id", image)
    assert "uid=1000(stage)" in who.stdout
    checks = podman(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "for p in /wheels /root/.cache/pip /home/stage/.cache/pip /var/lib/apt/lists/deb* "
        "/opt/venv/lib/python3.11/site-packages/tensorflow/include; do test -e $p && echo left:$p; done; "
        "command -v gcc cc make || true; test -x /opt/venv/bin/pip && echo pip-ok",
    )
    assert checks.stdout.strip() == "pip-ok", checks.stdout  # no build tools, caches or wheelhouse left
    dists = podman(
        "run",
        "--rm",
        "--entrypoint",
        "python",
        image,
        "-c",
        "import importlib.metadata as m, re; print(sorted(re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() for d in m.distributions()))",
    )
    installed = set(json.loads(dists.stdout.replace("'", '"')))
    # the CPU-only TensorFlow wheel, and not the full one beside it (tf-keras asks for `tensorflow`)
    assert "tensorflow-cpu" in installed and "tensorflow" not in installed, sorted(installed)
    # MLflow's client only: no server, sqlite store, pyarrow or scikit-learn (the `local` extra)
    assert "mlflow-skinny" in installed and not {"mlflow", "pyarrow", "scikit-learn", "sqlalchemy", "flask"} & installed
    # the S3 and GCS clients, botocore's service models cut to S3 and STS; no Azure client (an extra)
    assert {"boto3", "google-cloud-storage"} <= installed and "azure-storage-blob" not in installed
    stores = podman(
        "run", "--rm", "--entrypoint", "python", image, "-c",
        "import os, botocore; from pipeline_stage.mlflow_io.object_store import STORES, missing_modules; "
        "print(sorted(os.listdir(os.path.join(os.path.dirname(botocore.__file__), 'data')))); "
        "print([s.extra for s in STORES if missing_modules(s)])",
    )  # fmt: skip
    models, missing = stores.stdout.strip().splitlines()
    assert [m for m in eval(models) if "." not in m] == ["s3", "sts"] and eval(missing) == ["azure"], stores.stdout
    # At most 1.6 GB as built (2.57 GB with the full TensorFlow wheel and the full MLflow).
    size = int(podman("image", "inspect", image, "--format", "{{.Size}}").stdout)
    assert size <= 1.6e9, f"image {size / 1e9:.2f} GB as built"


def test_what_a_run_imports_is_precompiled_bytecode(image):
    """The image runs with PYTHONDONTWRITEBYTECODE: without shipped .pyc files every run compiles
    TensorFlow's and MLflow's Python first. Checked-hash .pyc files stay valid after the copy."""
    probe = (
        "import importlib.util, sys\n"
        "for name in ('tensorflow', 'mlflow', 'pandas', 'pipeline_stage.run.stage', 'keras'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    data = open(importlib.util.cache_from_source(spec.origin), 'rb').read(8)\n"
        "    print(name, int.from_bytes(data[4:8], 'little'))\n"
        "print('dont_write', sys.flags.dont_write_bytecode)"
    )
    result = podman("run", "--rm", "--entrypoint", "python", image, "-c", probe)
    assert result.returncode == 0, result.stderr[-2000:]
    flags = dict(line.split() for line in result.stdout.strip().splitlines())
    assert flags.pop("dont_write") == "1"
    assert flags == dict.fromkeys(("tensorflow", "mlflow", "pandas", "pipeline_stage.run.stage", "keras"), "3"), flags


def test_a_local_store_in_the_image_is_refused_with_the_fix(image, tmp_path):
    """No tracking URI means a local sqlite store, which the client-only MLflow cannot open."""
    work = _work(tmp_path, "model: /work/none.keras\nchain:\n  - quantize: {mode: dynamic}\n")
    result = podman("run", "--rm", "-v", f"{work}:/work", "-w", "/work", image, "run", "/work/m.yaml")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "sqlite:///mlflow.db" in result.stderr and "pipeline-stage[local]" in result.stderr
    assert "--tracking-uri" in result.stderr and not (work / "mlflow.db").exists()


@pytest.mark.parametrize(
    "chain",
    [
        "  - prune: {epochs: 1, target_sparsity: 0.5}\n  - quantize: {mode: dynamic}\n",
        "  - quantize: {mode: qat, qat_epochs: 1}\n",
    ],
    ids=["prune", "qat"],
)
def test_prune_and_qat_run_in_the_image_with_tensorflow_cpu(chain, image, digits_source, mlflow_server, tmp_path):
    """tfmot (through tf_keras, in its child process) on the CPU-only TensorFlow wheel."""
    work = _work(
        tmp_path,
        "model: models:/digits-cnn@champion\n"
        "data: {training: 'runs:/${source.run_id}/data/train.npz', calibration: 'runs:/${source.run_id}/data/calib.npz',"
        " evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        f"chain:\n{chain}gates:\n  - {{metric: accuracy, max_drop: 0.1}}\n",
    )
    result = podman(
        "run", "--rm", "--network", "host", "-e", f"MLFLOW_TRACKING_URI={mlflow_server}", "-v", f"{work}:/work",
        image, "run", "/work/m.yaml", "--report", "/work/report.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    if "prune" in chain:
        assert report["steps"][0]["notes"]["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    else:
        assert report["conversion"]["settings"]["quantization"] == "qat"
        assert "INT8" in report["conversion"]["flatbuffer"]["weight_dtypes"]


def test_stage_runs_in_the_container_against_the_host_server(image, digits_source, mlflow_server, tmp_path):
    work = _work(
        tmp_path,
        "model: models:/digits-cnn@champion\n"
        "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - quantize: {mode: int8}\ngates:\n  - {metric: accuracy, max_drop: 0.02}\n"
        "register: {name: digits-from-container, alias: edge}\n",
    )
    result = podman(
        "run",
        "--rm",
        "--network",
        "host",
        "-e",
        f"MLFLOW_TRACKING_URI={mlflow_server}",
        "-v",
        f"{work}:/work",
        image,
        "run",
        "/work/m.yaml",
        "--report",
        "/work/report.json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered: models:/digits-from-container/1" in result.stdout
    assert "git executable" not in result.stderr  # GitPython's advice, from MLflow's run context, silenced
    version = mlflow.MlflowClient().get_model_version_by_alias("digits-from-container", "edge")
    assert version.version == "1" and version.tags["pipeline_stage.passed"] == "true"
    assert json.loads((work / "report.json").read_text())["passed"] is True


def test_the_image_reads_and_writes_the_object_store_itself(image, direct, tmp_path):
    """The direct layout from the image: boto3 in it, the pod given the tracking URI, the keys
    and the endpoint."""
    uri, s3 = direct
    work = _work(
        tmp_path,
        "model: models:/digits-direct@champion\n"
        "data: {evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - quantize: {mode: dynamic}\ngates:\n  - {metric: accuracy, max_drop: 0.02}\n"
        "register: {name: digits-direct-image}\n",
    )
    env = [arg for key, value in {**s3.env, "MLFLOW_TRACKING_URI": uri}.items() for arg in ("-e", f"{key}={value}")]
    result = podman("run", "--rm", "--network", "host", *env, "-v", f"{work}:/work", image, "run", "/work/m.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered: models:/digits-direct-image/1" in result.stdout
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="direct").get("Contents", [])]
    run_id = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version("digits-direct-image", "1").run_id
    assert any(run_id in k and k.endswith("model.tflite") for k in keys)  # written by the container, into the bucket


def test_two_line_derived_image_adds_an_in_house_plugin(image, tmp_path):
    wheels = tmp_path / "ctx"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO / "tests" / "plugin_pkg"),
        ],
        check=True,
    )
    (wheels / "Dockerfile").write_text(
        f"FROM {image}\n"
        "RUN --mount=type=bind,source=.,target=/plugin pip install --no-index --find-links /plugin pipeline-stage-stamp\n"
    )
    build = podman("build", "-q", "-t", "localhost/pipeline-stage-with-stamp:test", str(wheels))
    assert build.returncode == 0, build.stderr
    result = podman("run", "--rm", "localhost/pipeline-stage-with-stamp:test", "plugins", "--json")
    assert result.returncode == 0, result.stderr
    stamp = next(s for s in json.loads(result.stdout)["steps"] if s["name"] == "stamp")
    assert stamp["distribution"] == "pipeline-stage-stamp 0.3.0"
    who = podman("run", "--rm", "--entrypoint", "id", "localhost/pipeline-stage-with-stamp:test", "-u")
    assert who.stdout.strip() == "1000"


@pytest.fixture(scope="module")
def docker_api(tmp_path_factory):
    """podman's Docker-compatible API on a socket of our own: what kfp.local.DockerRunner's docker
    client talks to (DOCKER_HOST)."""
    import docker

    sock = tmp_path_factory.mktemp("podman-api") / "podman.sock"
    log = sock.with_name("service.log")
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env=ENV,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def answers() -> bool:
        try:
            return sock.exists() and docker.DockerClient(base_url=f"unix://{sock}").ping()
        except Exception:
            return False

    _wait(answers, "podman system service", proc, log, seconds=60)
    yield f"unix://{sock}"
    stop_server(proc)


@pytest.fixture
def docker_runner(image, docker_api, tmp_path, monkeypatch):
    """kfp.local on DockerRunner (through kfp_support.docker_runner, which keeps a failed
    container's exit status): the component's own image (tagged as its base_image), host networking
    to reach the server on 127.0.0.1, and the host's uid so the task's outputs in the pipeline root
    are the caller's files."""
    from kfp import local

    from pipeline_stage.kfp_components import IMAGE
    from pipeline_stage.kfp_support import docker_runner

    assert podman("tag", image, IMAGE).returncode == 0
    monkeypatch.setenv("DOCKER_HOST", docker_api)
    root = tmp_path / "kfp-root"
    root.mkdir()
    local.init(runner=docker_runner(network_mode="host", user=f"{os.getuid()}:{os.getgid()}"), pipeline_root=str(root))
    return local


def test_the_component_runs_in_its_image_under_kfp_docker_runner(docker_runner, digits_source, mlflow_server, capfd):
    """KFP's own executor path in the container: the component's command through the image's
    entrypoint, the executor input and output files, the artifact URIs."""
    from pipeline_stage.kfp_components import optimize_tflite
    from tests.helpers import kfp_manifest

    task = optimize_tflite(
        manifest=kfp_manifest("digits-docker"), model_uri="models:/digits-cnn@champion", tracking_uri=mlflow_server
    )
    assert task.outputs["passed"] is True and task.outputs["model_version"] == "1"
    model = task.outputs["tflite"]
    data = open(model.path, "rb").read()
    assert data[4:8] == b"TFL3" and model.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    tags = mlflow.MlflowClient().get_model_version("digits-docker", "1").tags
    assert tags["pipeline_stage.sha256.model/artifacts/model.tflite"].split()[0] == model.metadata["sha256"]
    assert task.outputs["metrics"].metadata["gate.accuracy.max_drop"] == 1.0
    assert "<img class='plot'" in open(task.outputs["report_html"].path).read()

    failed = optimize_tflite(
        manifest=kfp_manifest("digits-docker-fail", max_ratio=0.01),
        model_uri="models:/digits-cnn@champion",
        tracking_uri=mlflow_server,
    )
    assert failed.outputs["passed"] is False and failed.outputs["model_version"] == ""
    assert mlflow.MlflowClient().search_model_versions("name='digits-docker-fail'") == []

    capfd.readouterr()
    with pytest.raises(RuntimeError):
        optimize_tflite(
            manifest=kfp_manifest("digits-docker-bad", mode="int9"),
            model_uri="models:/digits-cnn@champion",
            tracking_uri=mlflow_server,
        )
    logs = capfd.readouterr()
    assert "`chain[0].quantize.mode`: Input should be" in logs.out + logs.err and "(found 'int9')" in logs.out + logs.err
