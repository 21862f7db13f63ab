"""MLflow's permissions (`mlflow server --app-name basic-auth`): a user who may read the source but
not create versions of the target name gets exit 2 before anything is downloaded or written; the
same user registers once granted EDIT. Passwords appear in no output."""

from __future__ import annotations

import mlflow
import pytest
import requests

from tests import helpers
from tests.helpers import pointed_at
from tests.services import start_mlflow_server, stop_server

ADMIN, ADMIN_PASSWORD = "admin", "admin-Secret-4242"
USER, USER_PASSWORD = "alice", "alice-Secret-4242"
SOURCE, TARGET, EXPERIMENT = "digits-auth", "digits-auth-tflite", "auth-stage"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, digits_model, digits_data):
    """A basic-auth server (sqlite stores; every user may READ by default) where the admin logged
    the source and created the target model, and user `alice` exists with no grants."""
    from pipeline_stage.demo import log_source_model

    root = tmp_path_factory.mktemp("auth-server")
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server_env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key"}
    proc, uri = start_mlflow_server(root, app="basic-auth", env=server_env)
    admin = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    with pointed_at(uri, admin):
        log_source_model(digits_model, digits_data, name=SOURCE, alias="champion")
        mlflow.MlflowClient().create_registered_model(TARGET)
        answer = requests.post(
            f"{uri}/api/2.0/mlflow/users/create", json={"username": USER, "password": USER_PASSWORD}, auth=(ADMIN, ADMIN_PASSWORD)
        )
        assert answer.status_code == 200, answer.text
    yield uri
    stop_server(proc)


def _as_alice(uri: str, folder):
    folder.mkdir()
    path = helpers.write_manifest(
        folder,
        model=f"models:/{SOURCE}@champion",
        data={"evaluation": "runs:/${source.run_id}/data/eval.npz"},
        experiment=EXPERIMENT,
        chain=[{"quantize": {"mode": "dynamic"}}],
        gates=[{"metric": "accuracy", "max_drop": 0.02}],
        register={"name": TARGET, "alias": "prod"},
    )
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": USER_PASSWORD}
    return helpers.run_cli("run", str(path), "--report", str(folder / "r.json"), env=env)


@pytest.mark.slow
def test_a_reader_is_refused_before_any_work_then_registers_once_granted(auth_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)  # restored after the test
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    refused = _as_alice(auth_server, tmp_path / "refused")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"MLflow user `{USER}` may not create versions of registered model `{TARGET}`" in refused.stderr
    assert "EDIT" in refused.stderr and "PERMISSION_DENIED" in refused.stderr
    assert "downloading" not in refused.stderr.lower()  # refused before the source was fetched
    client = mlflow.MlflowClient(auth_server, registry_uri=auth_server)  # as the admin (the environment above)
    assert client.get_experiment_by_name(EXPERIMENT) is None  # no run, no experiment: nothing written
    assert client.search_model_versions(f"name='{TARGET}'") == []  # the probe created nothing

    from mlflow.server import get_app_client

    get_app_client("basic-auth", tracking_uri=auth_server).grant_user_permission(USER, "registered_model", TARGET, "EDIT")
    registered = _as_alice(auth_server, tmp_path / "granted")
    assert registered.returncode == 0, registered.stderr[-3000:]
    versions = client.search_model_versions(f"name='{TARGET}'")
    assert [v.version for v in versions] == ["1"] and client.get_model_version_by_alias(TARGET, "prod").version == "1"
    for out in (refused.stdout, refused.stderr, registered.stdout, registered.stderr):
        assert USER_PASSWORD not in out and ADMIN_PASSWORD not in out
