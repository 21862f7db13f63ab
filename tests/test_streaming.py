"""Data bigger than memory: TFRecord files and globs of shards read as a stream into memory-mapped
files, `.npy` read memory-mapped, remote shards listed and downloaded one at a time; the same
metrics and the same content digest as the `.npz` the data came from; bad records refused with the
file, the records and the fix; pages handed back as the data is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline_stage import Metric

SHARDS = 3


def _example(tf, features: dict) -> bytes:
    def feature(value):
        value = np.asarray(value)
        if value.dtype.kind == "f":
            return tf.train.Feature(float_list=tf.train.FloatList(value=value.reshape(-1)))
        if value.dtype.kind in "iu":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=value.reshape(-1)))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(value.item())]))

    return tf.train.Example(features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})).SerializeToString()


def write_shards(
    folder: Path, x: np.ndarray, y: np.ndarray | None, shards: int = SHARDS, *, serialized: bool = False
) -> list[Path]:
    """x (flattened float_list, or a serialized tensor) and y (int64_list) as TFRecord shards."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    paths, per = [], -(-len(x) // shards)
    for s in range(shards):
        path = folder / f"eval-{s:02d}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for i in range(s * per, min(len(x), (s + 1) * per)):
                sample = tf.io.serialize_tensor(x[i]).numpy() if serialized else x[i]
                features = {"x": np.array(sample, dtype=object) if serialized else sample}
                if y is not None:
                    features["y"] = np.int64(y[i])
                writer.write(_example(tf, features))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def digits_files(digits_data, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("streaming")
    x, y = digits_data.evaluation
    np.savez(folder / "calib.npz", x=digits_data.calibration[0])
    np.savez(folder / "eval.npz", x=x, y=y)
    write_shards(folder / "shards", x, y)
    np.save(folder / "eval-x.npy", x)
    return {
        "folder": folder,
        "calib": folder / "calib.npz",
        "npz": folder / "eval.npz",
        "glob": folder / "shards" / "eval-*.tfrecord",
    }


@pytest.fixture(scope="module")
def keras_path(digits_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("streaming-model") / "digits.keras"
    digits_model.save(path)
    return path


LABELLED = ["accuracy", "fidelity_sqnr_db", "fidelity_cosine", "top1_agreement", "size_bytes"]


def _sections(model: Path, calib: Path, evaluation: str, gates: str, metrics: list[str] = LABELLED) -> dict:
    """The stage these tests run: full int8 of `model`, measured on `evaluation` (a file, a glob, a URI)."""
    return dict(
        model=str(model),
        data={"calibration": str(calib), "evaluation": evaluation},
        chain=[{"quantize": {"mode": "int8"}}],
        evaluation={"per_step": [], "metrics": metrics},
        gates=gates,
    )


def _metrics(report: dict) -> dict[str, float]:
    return {f"{side}.{k}": v for side in ("baseline", "candidate") for k, v in report[side].items() if isinstance(v, float)}


def test_tfrecord_shards_stream_and_give_the_npz_metrics_and_digest(
    digits_files, keras_path, mlflow_server, tmp_path, run_stage, manifest
):
    """A glob of TFRecord shards (flattened float_list features, reshaped to the model's 8x8x1 input)
    measures what the `.npz` of the same samples measures, to 1e-6; the run logs the same content
    digest for both; the report says the data was streamed."""
    import mlflow

    gates = "  - {metric: accuracy, max_drop: 0.05}\n"
    npz = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(digits_files["npz"]), gates), name="npz.yaml"))
    assert npz.exit_code == 0, npz.output
    tfr = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(digits_files["glob"]), gates), name="tfr.yaml"))
    assert tfr.exit_code == 0, tfr.output
    assert "data.evaluation: reading 3 file(s) as a stream (tfrecord)" in tfr.stderr
    expected, got = _metrics(npz.report), _metrics(tfr.report)
    assert set(got) == set(expected) and len(got) >= 8
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert any("read as a stream, 597 samples, memory-mapped" in n for n in tfr.report["evaluation_notes"])

    def evaluation_input(report):
        inputs = mlflow.MlflowClient().get_run(report["run_id"]).inputs.dataset_inputs
        return next(i.dataset for i in inputs if any(t.value == "evaluation" for t in i.tags))

    npz_data, tfr_data = evaluation_input(npz.report), evaluation_input(tfr.report)
    assert json.loads(tfr_data.profile) == json.loads(npz_data.profile)  # same samples, same sha256
    assert json.loads(tfr_data.schema) == {
        "arrays": {"x": {"dtype": "float32", "shape": [597, 8, 8, 1]}, "y": {"dtype": "int64", "shape": [597]}}
    }
    assert tfr_data.name == "eval-*.tfrecord" and json.loads(tfr_data.source)["uri"] == str(digits_files["glob"])


def test_remote_shards_are_listed_downloaded_one_at_a_time_and_feed_a_search(
    digits_files, keras_path, mlflow_server, tmp_path, run_stage, manifest
):
    """`runs:/<id>/data/eval-*.tfrecord` on the production server (S3 artifacts): the shards are
    listed in the store, read one at a time, and a search's trials read the streamed files (the
    trials measure what the stage measures for the same chain)."""
    import mlflow

    with mlflow.start_run() as run:
        for path in sorted(digits_files["glob"].parent.glob("eval-*.tfrecord")):
            mlflow.log_artifact(str(path), "data")
    uri = f"runs:/{run.info.run_id}/data/eval-*.tfrecord"
    result = run_stage(
        manifest(
            **_sections(keras_path, digits_files["calib"], uri, "  - {metric: accuracy, max_drop: 0.05}\n"),
            extra="search: {strategy: auto, budget: {trials: 2}, parallel: 1}\n",
        )
    )
    assert result.exit_code == 0, result.output
    assert "reading 3 file(s) as a stream (tfrecord) one at a time" in result.stderr
    # the winner, not the first trial: the default objective ranks by latency first, so which of two
    # passing trials wins depends on the CPU's timing (the trials' accuracies differ)
    search = result.report["search"]
    winner = next(t for t in search["trials"] if t["index"] == search["winner"])
    assert winner["status"] == "passed" and winner["metrics"]["accuracy"] == pytest.approx(
        result.report["candidate"]["accuracy"], rel=1e-6
    )
    missing = run_stage(
        manifest(
            **_sections(
                keras_path, digits_files["calib"], uri.replace("eval-*", "holdout-*"), "  - {metric: accuracy, max_drop: 0.05}\n"
            )
        )
    )
    assert missing.exit_code == 2 and "matches `holdout-*.tfrecord` (there: eval-00.tfrecord, eval-01.tfrecord" in missing.stderr


def test_npy_is_read_memory_mapped_and_serialized_tensors_decode(
    digits_data, keras_path, digits_files, mlflow_server, tmp_path, run_stage, manifest
):
    """One `.npy` of inputs (no labels: a fidelity gate) is read memory-mapped; TFRecord features
    holding `tf.io.serialize_tensor` bytes decode to the same samples."""
    from pipeline_stage_plugins.data_npy import NpyLoader

    npy = digits_files["folder"] / "eval-x.npy"
    loaded = NpyLoader().load(npy, "data.evaluation")
    assert isinstance(loaded.x, np.memmap) and loaded.memory_mapped
    fidelity, unlabelled = "  - {metric: fidelity_sqnr_db, min: 20}\n", ["fidelity_sqnr_db", "size_bytes"]
    result = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(npy), fidelity, unlabelled), name="npy.yaml"))
    assert result.exit_code == 0, result.output
    x = digits_data.evaluation[0]
    write_shards(tmp_path / "tensors", x, None, shards=1, serialized=True)
    tensors = run_stage(
        manifest(
            **_sections(keras_path, digits_files["calib"], str(tmp_path / "tensors" / "eval-00.tfrecord"), fidelity, unlabelled),
            name="t.yaml",
        )
    )
    assert tensors.exit_code == 0, tensors.output
    assert tensors.report["candidate"]["fidelity_sqnr_db"] == pytest.approx(
        result.report["candidate"]["fidelity_sqnr_db"], rel=1e-6
    )


def test_bad_records_and_shards_are_refused_naming_the_file_and_the_fix(
    digits_data, keras_path, digits_files, mlflow_server, tmp_path, run_stage, manifest
):
    import tensorflow as tf

    x, y = digits_data.evaluation
    gates = "  - {metric: accuracy, max_drop: 0.05}\n"
    # a record without the label the first one had
    bad = tmp_path / "bad"
    bad.mkdir()
    with tf.io.TFRecordWriter(str(bad / "eval.tfrecord")) as writer:
        writer.write(_example(tf, {"x": x[0], "y": np.int64(y[0])}))
        writer.write(_example(tf, {"x": x[1]}))
    result = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(bad / "eval.tfrecord"), gates)))
    assert result.exit_code == 2, result.output
    assert "`eval.tfrecord`, records 0-1:" in result.stderr and "(the first record has `x`, `y`)" in result.stderr
    assert "fix: give every record the same features" in result.stderr and "[baseline]" not in result.stderr
    # not a TFRecord file at all
    (bad / "junk.tfrecord").write_bytes(b"not a record file" * 10)
    result = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(bad / "junk.tfrecord"), gates)))
    assert result.exit_code == 2 and "`junk.tfrecord` is not a readable TFRecord file" in result.stderr, result.output
    # shards that disagree: the second has no labels
    mixed = tmp_path / "mixed"
    write_shards(mixed, x[:100], y[:100], shards=1)
    (mixed / "eval-00.tfrecord").rename(mixed / "eval-a.tfrecord")
    write_shards(mixed, x[100:200], None, shards=1)
    result = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(mixed / "eval-*.tfrecord"), gates)))
    assert result.exit_code == 2, result.output
    assert "`eval-a.tfrecord` has arrays x, y, but the data before had x" in result.stderr
    # a glob that matches nothing, and one that matches two kinds of file
    result = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(tmp_path / "nothing-*.tfrecord"), gates)))
    assert result.exit_code == 2 and "no file matches" in result.stderr, result.output
    np.savez(mixed / "eval-z.npz", x=x[:10], y=y[:10])
    result = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(mixed / "eval-*"), gates)))
    assert result.exit_code == 2 and "of several kinds (.npz, .tfrecord)" in result.stderr, result.output


def test_reading_memory_mapped_data_hands_its_pages_back(tmp_path):
    """Hashing (and batching) a memory-mapped array leaves almost none of it resident: the pages
    read are handed back (Linux: the mapping's Rss in /proc/self/smaps)."""
    from pipeline_stage.contract.data import bytes_digest

    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(4096, 4096))  # 64 MB
    big[:] = 1.0
    big.flush()
    del big
    mapped = np.load(path, mmap_mode="r")

    def resident_kb() -> int:
        lines = Path("/proc/self/smaps").read_text().splitlines()
        for i, line in enumerate(lines):
            if line.endswith(str(path)):
                return next(int(v.split()[1]) for v in lines[i + 1 :] if v.startswith("Rss:"))
        raise AssertionError("mapping not found")

    np.asarray(mapped[:2048]).sum()  # a plain read leaves what it touched resident
    assert resident_kb() > 30_000
    assert bytes_digest(mapped) == bytes_digest(np.ones((4096, 4096), np.float32))
    assert resident_kb() < 20_000  # at most one 16 MB chunk


def test_a_data_mapping_names_the_format_the_features_and_a_sample_limit(
    digits_data, keras_path, digits_files, mlflow_server, tmp_path, run_stage, manifest, invoke
):
    """`evaluation: {uri, format, features, max_samples}`: a TFRecord named `.rec` whose features
    are `image` and `label` beside a string `id` reads as `x` and `y`, only the first 300 samples;
    without the mapping the string feature is refused naming it and the fix; an unknown format is
    refused at `validate`."""
    import tensorflow as tf

    x, y = digits_data.evaluation
    path = tmp_path / "eval.rec"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(len(x)):
            writer.write(_example(tf, {"image": x[i], "label": np.int64(y[i]), "id": np.array(f"s{i}".encode(), dtype=object)}))
    np.savez(tmp_path / "first300.npz", x=x[:300], y=y[:300])
    gates = "  - {metric: accuracy, max_drop: 0.05}\n"
    entry = f"{{uri: {path}, format: tfrecord, features: {{x: image, y: label}}, max_samples: 300}}"
    sections = _sections(keras_path, digits_files["calib"], "", gates)
    mapped = manifest(
        **{**sections, "data": f"{{calibration: {digits_files['calib']}, evaluation: {entry}}}"}, name="mapped.yaml"
    )
    assert invoke("validate", str(mapped)).exit_code == 0
    result = run_stage(mapped)
    assert result.exit_code == 0, result.output
    expected = run_stage(
        manifest(**_sections(keras_path, digits_files["calib"], str(tmp_path / "first300.npz"), gates), name="e.yaml")
    )
    got, want = _metrics(result.report), _metrics(expected.report)
    assert expected.exit_code == 0 and set(got) == set(want)
    assert all(got[k] == pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in want.items()), (got, want)
    # the same file without the mapping: the string feature cannot be an array
    plain = mapped.read_text().replace(entry, f"{{uri: {path}, format: tfrecord}}")
    result = run_stage(manifest(plain, name="plain.yaml"))
    assert result.exit_code == 2 and "feature `id` holds bytes that are not a tensor" in result.stderr, result.output
    assert "features: {x: image, y: label}" in result.stderr
    # a feature the records do not have
    wrong = mapped.read_text().replace("x: image", "x: pixels")
    result = run_stage(manifest(wrong, name="wrong.yaml"))
    assert result.exit_code == 2 and "has no feature `pixels` (the first record has `id`, `image`, `label`)" in result.stderr
    # an unknown format, at validate
    unknown = mapped.read_text().replace("format: tfrecord", "format: parquet")
    checked = invoke("validate", str(manifest(unknown, name="unknown.yaml")))
    assert checked.exit_code == 2 and "no data loader is named `parquet` (known: arrays, npy, npz, tfrecord)" in checked.stderr


def test_metrics_accumulated_a_block_at_a_time_equal_their_whole_array_values():
    """Every built-in metric on predictions, summed block by block (a few samples at a time), gives
    what the whole-array formula gives (the LiteRT Quantizer's SNR and cosine; numpy's means) to
    1e-6: classification scores, a regression output, with and without labels."""
    from litert_quantizer.utils.validation_utils import cosine_similarity, signal_to_noise_ratio

    from pipeline_stage.contract.metrics import Evaluation
    from pipeline_stage_plugins import metrics as builtin

    rng = np.random.default_rng(7)
    reference = rng.normal(size=(1003, 10)).astype(np.float32)
    candidate = reference + rng.normal(scale=0.05, size=reference.shape).astype(np.float32)
    labels = rng.integers(0, 10, size=1003)
    regression = {"ref": rng.normal(size=(1003, 1)).astype(np.float32), "y": rng.normal(size=1003)}

    def evaluation(preds, ref, y):
        return Evaluation(
            model_bytes=b"", x=preds, labels=y, predict=lambda _: preds, latencies=lambda: None, reference=lambda: ref
        )

    def blockwise(metric, ev):
        state: dict = {}
        for chunk in ev.chunks(chunk_bytes=7 * preds_bytes(ev)):  # 7 samples a block: 144 blocks
            metric.update(state, chunk)
        return metric.result(state)

    def preds_bytes(ev):
        return ev.predictions[:1].nbytes

    ev = evaluation(candidate, reference, labels)
    whole = {
        "accuracy": np.mean(candidate.argmax(1) == labels),
        "top1_agreement": np.mean(candidate.argmax(1) == reference.argmax(1)),
        "fidelity_sqnr_db": 10 * np.log10(signal_to_noise_ratio(candidate, reference)),
        "fidelity_cosine": cosine_similarity(candidate, reference),
    }
    for name, expected in whole.items():
        metric = next(c for c in vars(builtin).values() if getattr(c, "name", None) == name)()
        assert blockwise(metric, ev) == pytest.approx(float(expected), rel=1e-6), name
        assert metric.compute(ev) == pytest.approx(float(expected), rel=1e-6), name  # compute runs the blocks
    reg = evaluation(regression["ref"] + 0.1, regression["ref"], regression["y"])
    errors = (regression["ref"] + 0.1).reshape(-1).astype(np.float64) - regression["y"]
    assert blockwise(builtin.MeanAbsoluteError(), reg) == pytest.approx(np.mean(np.abs(errors)), rel=1e-6)
    assert blockwise(builtin.RootMeanSquaredError(), reg) == pytest.approx(np.sqrt(np.mean(errors**2)), rel=1e-6)


class MeanScore(Metric):
    """Mean score of the first output (a whole-array metric, as a third party writes one)."""

    name = "mean_score"

    def compute(self, evaluation) -> float:
        return float(np.mean(np.asarray(evaluation.predictions)))


def test_a_whole_array_metric_works_on_streamed_data_that_fits_and_is_refused_when_it_would_not(
    digits_files, keras_path, mlflow_server, tmp_path, monkeypatch, run_stage, manifest
):
    """A third-party metric with only `compute` gets whole (memory-mapped) arrays on streamed data
    that fits; where the outputs would take more than half the memory left (here: the memory the
    stage may count on set to 32 KB), it is refused by name, exit 2, before it runs."""
    from pipeline_stage import hookimpl, use_plugins

    class Plugin:
        @hookimpl
        def register_metrics(self, register):
            register(MeanScore)

    gates = "  - {metric: accuracy, max_drop: 0.05}\n"
    metrics = ["accuracy", "mean_score"]
    with use_plugins((Plugin(), "whole-array-metric")):
        fits = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(digits_files["glob"]), gates, metrics)))
        assert fits.exit_code == 0, fits.output
        assert 0.0 < fits.report["candidate"]["mean_score"] < 1.0  # softmax scores: a tenth on average
        monkeypatch.setenv("PIPELINE_STAGE_MEMORY_BYTES", str(32 << 10))  # the outputs and labels: 29 KB
        refused = run_stage(manifest(**_sections(keras_path, digits_files["calib"], str(digits_files["glob"]), gates, metrics)))
    assert refused.exit_code == 2, refused.output
    assert "metric `mean_score` (distribution `whole-array-metric`) reads whole arrays" in refused.stderr
    assert "more than half the memory left (0.03 MB)" in refused.stderr and "update(state, chunk)" in refused.stderr


def test_pruning_fine_tunes_on_the_streamed_training_files_themselves(
    digits_data, digits_files, keras_path, mlflow_server, tmp_path, run_stage, manifest
):
    """Training data given as TFRecord shards: prune's tf_keras child is handed the stage's own
    memory-mapped spool files (no re-saved copy of the set) and reads them a batch at a time; the
    pruned model still reaches its target sparsity and passes its accuracy gate."""
    write_shards(tmp_path / "train", *digits_data.train)
    work = tmp_path / "work"
    path = manifest(
        f"model: {keras_path}\n"
        f"data: {{training: '{tmp_path / 'train' / 'eval-*.tfrecord'}', calibration: {digits_files['calib']}, "
        f"evaluation: {digits_files['npz']}}}\n"
        "chain:\n  - prune: {target_sparsity: 0.5, epochs: 2}\n  - quantize: {mode: int8}\n"
        "evaluation: {per_step: []}\ngates:\n  - {metric: accuracy, max_drop: 0.05}\n"
    )
    result = run_stage(path, "--workdir", str(work))
    assert result.exit_code == 0, result.output
    assert "data.training: reading 3 file(s) as a stream (tfrecord)" in result.stderr
    report = result.report
    assert report["steps"][0]["notes"]["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    training = json.loads((work / "prune" / "task.json").read_text())["training"]
    assert set(training) == {"x", "y"}
    for name, file in training.items():
        assert Path(file).is_relative_to(work) and not Path(file).is_relative_to(work / "prune"), file
        mapped = np.load(file, mmap_mode="r")
        assert mapped.shape[0] == len(digits_data.train[0])
    assert not (work / "prune" / "training").exists() and not (work / "prune" / "train.npz").exists()
    np.testing.assert_array_equal(np.load(training["y"]), digits_data.train[1])
