"""Accuracy-aware search: trials in child processes, nested MLflow runs, the winner registered,
nothing failing promoted. On the BN-after-ReLU model whose plain int8 collapses."""

from __future__ import annotations

import mlflow
import pytest

from pipeline_stage import SearchMove, edited, hookimpl, step_params
from tests import helpers
from tests.helpers import EXAMPLES


@pytest.fixture(scope="module")
def auto_run(collapse_source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    result = helpers.run_stage(tmp, EXAMPLES / "search-auto.yaml", "--workdir", str(tmp / "w"))
    return result, result.report, tmp


def test_auto_search_finds_a_passing_chain_where_int8_fails(auto_run):
    result, report, _ = auto_run
    assert result.exit_code == 0, result.output
    search = report["search"]
    trials = {t["index"]: t for t in search["trials"]}
    first = trials[1]
    assert first["origin"] == "as written" and first["status"] == "failed"
    assert first["metrics"]["accuracy"] < report["baseline"]["accuracy"] - 0.1
    winner = trials[search["winner"]]
    assert winner["status"] == "passed" and report["passed"]
    assert report["candidate"]["accuracy"] >= report["baseline"]["accuracy"] - 0.01
    # Close to int8 speed: the winner is full int8 (every conv int8) and near plain int8's size.
    assert report["candidate"]["size_bytes"] <= 1.2 * first["metrics"]["size_bytes"]
    assert "[search] trial 1/" in result.output  # progress on the console
    assert "fuse" in search["chain"] and "fold BatchNorm" in winner["origin"]


def test_each_trial_times_its_latency_beside_the_baseline(auto_run):
    """The objective's latency is timed in alternating rounds with the baseline in the trial's own
    worker, and ranked on one scale: the trial's ratio times the stage's one baseline value."""
    _, report, _ = auto_run
    trials = [t for t in report["search"]["trials"] if t["status"] != "error"]
    assert len(trials) >= 2
    scales = []
    for t in trials:
        (timed,) = t["timed"]
        assert timed["metric"] == "latency_p50_ms"
        assert len(timed["baseline_rounds"]) == len(timed["candidate_rounds"]) == timed["rounds"] == 5
        assert timed["ratio"] == pytest.approx(timed["candidate"] / timed["baseline"])
        assert timed["spread"] >= 0
        scales.append(t["metrics"]["latency_p50_ms"] / timed["ratio"])
    assert max(scales) == pytest.approx(min(scales), rel=1e-9)  # every trial on the same baseline value


def test_every_trial_is_a_nested_run_and_the_winner_is_registered(auto_run):
    _, report, _ = auto_run
    client = mlflow.MlflowClient()
    parent = client.get_run(report["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{report['run_id']}'")
    by_trial = {int(r.data.tags["pipeline_stage.trial"]): r for r in children}
    assert sorted(by_trial) == [t["index"] for t in report["search"]["trials"]]
    for t in report["search"]["trials"]:
        run = by_trial[t["index"]]
        assert run.data.tags["pipeline_stage.trial.status"] == t["status"]
        assert run.data.params["chain"] == t["chain"]
        assert run.data.metrics["accuracy"] == pytest.approx(t["metrics"]["accuracy"])
    version = client.get_model_version(report["registered"]["name"], report["registered"]["version"])
    assert version.tags["pipeline_stage.search.trial"] == str(report["search"]["winner"])
    assert version.tags["pipeline_stage.chain"].startswith("fuse -> quantize")
    assert client.get_model_version_by_alias(report["registered"]["name"], "edge-candidate").version == version.version


def test_search_is_deterministic(auto_run, tmp_path, run_stage):
    _, first, _ = auto_run
    result = run_stage(EXAMPLES / "search-auto.yaml", "--new-version")
    assert result.exit_code == 0, result.output
    second = result.report

    def outline(report):
        return [
            (t["origin"], t["chain"], t["status"], t["metrics"].get("accuracy"), t["metrics"].get("size_bytes"))
            for t in report["search"]["trials"]
        ]

    assert outline(second) == outline(first)
    assert second["search"]["chain"] == first["search"]["chain"]


SEARCH = (
    "model: models:/digits-bn-raw@champion\n"
    "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
    "chain:\n  - quantize: {mode: int8}\n"
    "evaluation: {metrics: [accuracy, size_bytes, latency_p50_ms]}\n"
    "gates:\n%s"
    "search:\n%s"
    "register: {name: search-tests, alias: best}\n"
)


def test_auto_keeps_the_worst_ops_in_float_when_fuse_is_not_allowed(collapse_source, tmp_path, run_stage, manifest):
    text = SEARCH % (
        "  - {metric: accuracy, max_drop: 0.01}\n",
        "  strategy: auto\n  moves: [keep_float_nodes]\n  budget: {trials: 10}\n",
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    trials = report["search"]["trials"]
    assert trials[0]["status"] == "failed" and all("fuse" not in t["chain"] for t in trials)
    winner = next(t for t in trials if t["index"] == report["search"]["winner"])
    assert "keep_float_ops" in winner["chain"] or "keep_float_nodes" in winner["chain"]
    assert report["candidate"]["accuracy"] >= report["baseline"]["accuracy"] - 0.01
    # Only what was kept is float: the convolutions are still int8.
    from pipeline_stage.engine.flatbuffer import read as read_flatbuffer
    from tests.helpers import tflite_of

    info = read_flatbuffer(tflite_of(report["registered"]))
    assert "INT8" in info.summary()["weight_dtypes"]


def test_when_nothing_passes_nothing_is_promoted_and_the_closest_is_reported(
    collapse_source, tmp_path, run_stage, manifest, versions_of
):
    text = SEARCH % (
        "  - {metric: accuracy, max_drop: 0.01}\n  - {metric: size_bytes, max_ratio: 0.05}\n",
        "  strategy: candidates\n  candidates:\n    - [{fuse: {}}, {quantize: {mode: int8}}]\n"
        "    - [{quantize: {mode: dynamic}}]\n",
    )
    before = len(versions_of("search-tests"))
    result = run_stage(manifest(text))
    assert result.exit_code == 3, result.output
    report = result.report
    search = report["search"]
    assert search["winner"] is None and search["closest"] is not None
    assert "not promoted" in search["why"]
    assert [t["status"] for t in search["trials"]] == ["failed"] * 3
    closest = next(t for t in search["trials"] if t["index"] == search["closest"])
    assert closest["shortfall"] == min(t["shortfall"] for t in search["trials"])
    assert len(versions_of("search-tests")) == before  # on_failure: skip registers nothing


def test_candidates_run_cheapest_first_and_the_objective_picks(collapse_source, tmp_path, run_stage, manifest):
    text = SEARCH % (
        "  - {metric: accuracy, max_drop: 0.02}\n",
        "  strategy: candidates\n  objective: [size_bytes]\n  candidates:\n"
        "    - [{prune: {target_sparsity: 0.3, epochs: 1}}, {fuse: {}}, {quantize: {mode: int8}}]\n"
        "    - [{fuse: {}}, {quantize: {mode: int8}}]\n"
        "    - [{quantize: {mode: float16}}]\n",
    )
    text = text.replace("data: {", "data: {training: 'runs:/${source.run_id}/data/train.npz', ")
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    trials = result.report["search"]["trials"]
    assert [t["origin"] for t in trials] == ["as written", "candidate 3", "candidate 2", "candidate 1"]  # prune fine-tunes: last
    passing = [t for t in trials if t["status"] == "passed"]
    best = min(t["metrics"]["size_bytes"] for t in passing)
    winner = result.report["search"]["winner"]
    assert next(t for t in trials if t["index"] == winner)["metrics"]["size_bytes"] <= best * 1.05


def test_html_report_renders_with_its_plots_in_headless_chromium(auto_run, tmp_path):
    """Open report.html in a real browser: every plot decodes, and the page is not blank."""
    import shutil
    import subprocess

    import matplotlib.image
    import numpy as np

    result, report, tmp = auto_run
    page = result.report_path.with_suffix(".html")
    text = page.read_text()
    assert "Search" in text and "Pareto front" not in text  # the legend is inside the PNG, not the HTML
    assert "http://" not in text.split("<body>")[1] and "https://" not in text  # self-contained
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed: apt-get install chromium (.ci/run installs it)"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    plots = text.count("<img class='plot'")
    assert plots == 5  # accuracy vs size, vs latency, latency per variant, per-layer error before and after
    assert f'data-plots-rendered="{plots}/{plots}"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert np.mean(pixels.min(axis=-1) < 0.9) > 0.03  # text, tables and plots: not a blank page
    # The same page is logged to the stage's MLflow run.
    logged = mlflow.artifacts.load_text(f"runs:/{report['run_id']}/report.html")
    assert logged.count("<img class='plot'") == plots


def test_a_trial_that_errors_is_recorded_and_the_search_goes_on(collapse_source, tmp_path, run_stage, manifest):
    text = SEARCH % (
        "  - {metric: accuracy, max_drop: 0.01}\n",
        "  strategy: candidates\n  objective: [size_bytes]\n  stop_at_first_pass: true\n  parallel: 2\n  candidates:\n"
        "    - [{quantize: {mode: int8, engine: litert, keep_float_ops: [NOT_AN_OP]}}]\n"
        "    - [{fuse: {}}, {quantize: {mode: int8}}]\n"
        "    - [{fuse: {}}, {quantize: {mode: float16}}]\n",
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    search = result.report["search"]
    trials = {t["origin"]: t for t in search["trials"]}
    bad = trials["candidate 1"]
    assert bad["status"] == "error" and "NOT_AN_OP" in bad["error"]
    run = mlflow.MlflowClient().get_run(bad["run_id"])
    assert run.info.status == "FAILED" and "NOT_AN_OP" in run.data.tags["pipeline_stage.trial.error"]
    # stop_at_first_pass: batches of 2 in cost order; the second batch has a passing chain, so it stops there
    assert search["stopped_because"] == "passed" and len(search["trials"]) == 4
    # ranked by size, which no CPU changes: full int8 (fuse -> int8) is far smaller than float16
    assert next(t for t in search["trials"] if t["index"] == search["winner"])["origin"] == "candidate 2"


def test_the_trial_budget_stops_the_search(collapse_source, tmp_path, run_stage, manifest):
    text = SEARCH % ("  - {metric: accuracy, max_drop: 0.01}\n", "  strategy: auto\n  budget: {trials: 1}\n")
    result = run_stage(manifest(text))
    assert result.exit_code == 3, result.output
    search = result.report["search"]
    assert [t["origin"] for t in search["trials"]] == ["as written"]
    assert search["stopped_because"] == "budget.trials" and search["closest"] == 1


class Float16Instead(SearchMove):
    """A third-party plugin's search move: quantize to float16 where the chain asks for int8."""

    name = "float16_instead"
    kind = "alternative"
    requirement = "`quantize: {mode: int8}`"

    def applies(self, chain):
        return (step_params(chain, "quantize") or {}).get("mode", "int8") == "int8"

    def propose(self, chain, facts):
        return [("float16 instead (fake plugin)", edited(chain, "quantize", mode="float16"))]


class FakeMoves:
    @hookimpl
    def register_search_moves(self, register):
        register(Float16Instead)


def test_hook_register_search_moves_a_plugin_move_is_used_by_auto(collapse_source, tmp_path, run_stage, manifest):
    from pipeline_stage import use_plugins

    text = SEARCH % ("  - {metric: accuracy, max_drop: 0.01}\n", "  strategy: auto\n  moves: [float16_instead]\n")
    with use_plugins(FakeMoves()):
        result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    trials = report["search"]["trials"]
    assert [t["origin"] for t in trials] == ["as written", "float16 instead (fake plugin)"]
    assert trials[0]["status"] == "failed" and trials[1]["status"] == "passed"
    assert report["search"]["winner"] == 2 and "float16" in report["search"]["chain"]
    assert report["conversion"]["settings"]["quantization"] == "float16"
