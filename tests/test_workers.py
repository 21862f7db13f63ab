"""Search trials run in long-lived worker processes (pipeline_stage.run.workers): several trials per
worker, a worker replaced after `trials_per_worker` trials, and a worker that dies fails only the
trial it was running (the next trial gets a fresh worker). Real processes, real trial folders."""

from __future__ import annotations

from pathlib import Path

from pipeline_stage.manifest.schema import ConversionSpec, EvaluationSpec
from pipeline_stage.run.trial_protocol import REQUEST, RESULT, TrialRequest, TrialResult
from pipeline_stage.run.workers import TrialWorkers


def _trial(folder: Path, index: int) -> Path:
    """A trial whose chain names no installed step: the worker answers with an error result, as for
    any chain that does not work on the model, and goes on."""
    folder.mkdir(parents=True)
    request = TrialRequest(
        index=index,
        chain=[("no_such_step", {})],
        source="m.keras",
        data={},
        evaluation=EvaluationSpec(),
        conversion=ConversionSpec(),
        metrics=[],
    )
    (folder / REQUEST).write_text(request.model_dump_json())
    return folder


def test_workers_run_trials_are_recycled_and_a_dead_worker_fails_only_its_trial(tmp_path):
    workers = TrialWorkers(1, seed=0, trials_per_worker=2)
    try:
        first, second = _trial(tmp_path / "t1", 1), _trial(tmp_path / "t2", 2)
        assert workers.run(first, timeout=120) is None and workers.run(second, timeout=120) is None
        for folder in (first, second):
            result = TrialResult.model_validate_json((folder / RESULT).read_text())
            assert "unknown step `no_such_step`" in result.error and (folder / "trial.log").exists()
        assert len(workers._all) == 2  # the first worker ran its 2 trials and was replaced
        # a trial folder that is not there: the worker crashes on it (an uncaught error, as a native crash would)
        why = workers.run(tmp_path / "missing", timeout=120)
        assert why is not None and "died" in why
        third = _trial(tmp_path / "t3", 3)
        assert workers.run(third, timeout=120) is None  # a fresh worker took the next trial
        assert TrialResult.model_validate_json((third / RESULT).read_text()).error is not None
        assert len(workers._all) == 3 and len({w.proc.pid for w in workers._all}) == 3
    finally:
        workers.close()
    assert all(w.proc.poll() is not None for w in workers._all)
