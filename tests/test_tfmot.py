"""prune and qat: tensorflow-model-optimization through the Keras 3 -> tf_keras bridge."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipeline_stage.contract.errors import InputError
from pipeline_stage.engine.flatbuffer import read as read_flatbuffer
from tests import helpers
from tests.helpers import EXAMPLES


def test_bridge_round_trip_is_exact(digits_model, digits_data, tmp_path):
    """Sequential and functional (with a skip connection, LeakyReLU, LayerNormalization) models rebuild in
    tf_keras with equal outputs."""
    import keras

    from pipeline_stage.engine.tfmot_bridge import run_task

    inp = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(8, 3, padding="same")(inp)
    c = keras.layers.BatchNormalization()(keras.layers.LeakyReLU(negative_slope=0.2)(a))  # tf_keras calls it alpha
    flat = keras.layers.LayerNormalization(center=False)(keras.layers.Flatten()(keras.layers.Add()([a, c])))
    out = keras.layers.Dense(10, activation="softmax")(flat)
    functional = keras.Model(inp, out)
    functional.layers[-2].set_weights([np.linspace(0.5, 1.5, 512, dtype=np.float32)])  # a non-trivial gamma
    x = digits_data.evaluation[0][:64]
    np.savez(tmp_path / "x.npz", x=x)
    for model in (digits_model, functional):
        folder = tmp_path / model.name
        run_task({"task": "roundtrip", "data": str(tmp_path / "x.npz")}, model, folder)
        assert np.max(np.abs(np.load(folder / "outputs.npy") - model.predict(x, verbose=0))) < 1e-5


def test_bridge_worker_past_its_time_limit_is_stopped(digits_model, digits_data, tmp_path):
    """The limit holds while the child is still running (its lines are read as they come)."""
    import time

    from pipeline_stage.contract.errors import PluginError
    from pipeline_stage.engine.tfmot_bridge import run_task

    np.savez(tmp_path / "x.npz", x=digits_data.evaluation[0][:8])
    started = time.perf_counter()
    with pytest.raises(PluginError, match=r"ran past 0.5 s and was stopped"):
        run_task({"task": "roundtrip", "data": str(tmp_path / "x.npz")}, digits_model, tmp_path / "w", timeout_s=0.5)
    assert time.perf_counter() - started < 5  # TensorFlow's import alone takes longer: it was not waited for


def test_bridge_rejects_custom_layers_by_name(tmp_path):
    import keras

    from pipeline_stage.engine.tfmot_bridge import describe_graph

    class Scale(keras.layers.Layer):
        def call(self, x):
            return x * 2

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), Scale(name="my_scale")])
    with pytest.raises(InputError, match=r"`my_scale` \(Scale\) has no tf_keras counterpart"):
        describe_graph(model)
    rms = keras.Sequential([keras.Input((4,)), keras.layers.LayerNormalization(rms_scaling=True, name="rms")])
    with pytest.raises(InputError, match=r"`rms` \(LayerNormalization\) uses `rms_scaling`, which tf_keras does not have"):
        describe_graph(rms)


def test_every_bridgeable_layer_deserializes_in_tf_keras(tmp_path):
    """Each layer class the bridge claims to carry, as Keras 3 configures it by default, is a valid tf_keras
    layer config (the InputLayer is rebuilt from its shape, not its config)."""
    import json
    import os
    import subprocess
    import sys

    import keras

    from pipeline_stage.engine.tfmot_bridge import BRIDGEABLE, tf_keras_config

    args = {
        "Conv1D": (4, 3),
        "Conv2D": (4, 3),
        "DepthwiseConv2D": (3,),
        "SeparableConv2D": (4, 3),
        "Dense": (4,),
        "Activation": ("relu",),
        "Reshape": ((4,),),
        "Rescaling": (1 / 255,),
        "Embedding": (10, 4),
        "Permute": ((2, 1),),
        "Dropout": (0.1,),
        "AveragePooling1D": (2,),
        "AveragePooling2D": (2,),
        "MaxPooling1D": (2,),
        "MaxPooling2D": (2,),
    }
    configs = {
        name: tf_keras_config(name, name, getattr(keras.layers, name)(*args.get(name, ())).get_config())
        for name in sorted(BRIDGEABLE - {"InputLayer"})
    }
    (tmp_path / "configs.json").write_text(json.dumps(configs, default=str))
    script = (
        "import json, sys, tf_keras\n"
        "failed = []\n"
        "for name, cfg in json.load(open(sys.argv[1])).items():\n"
        "    try:\n"
        "        tf_keras.layers.deserialize({'class_name': name, 'config': cfg})\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {str(exc).splitlines()[-1]}')\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "configs.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert len(configs) == len(BRIDGEABLE) - 1


def test_qat_refuses_a_layer_tfmot_cannot_quantize(digits_data, tmp_path):
    """The bridge carries LayerNormalization; tfmot's QAT registry does not: a clear error naming it."""
    import keras

    from pipeline_stage import ConversionSettings, QuantizationJob, QuantizationRequest
    from pipeline_stage.contract.data import Dataset
    from pipeline_stage.contract.report import SourceRef
    from pipeline_stage_plugins.quantize.converter_engine import ConverterEngine
    from pipeline_stage_plugins.quantize.params import QuantizeParams
    from pipeline_stage_plugins.source_tensorflow import KerasSource

    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    data = Dataset(digits_data.train[0][:64], digits_data.train[1][:64], "training")
    request = QuantizationRequest(
        engine="converter",
        settings=QuantizeParams(mode="qat", qat_epochs=1),
        mode="qat",
        calibration_data="calibration",
        training_data="training",
    )
    job = QuantizationJob(
        request=request,
        conversion=ConversionSettings(quantization=request),
        source=KerasSource(SourceRef(uri="test"), tmp_path / "model.keras", model),
        model=model,
        load_data=lambda name: data,
        workdir=tmp_path,
        log_path=tmp_path / "convert.log",
        log=lambda line: None,
        convert_float=lambda: b"",
    )
    with pytest.raises(InputError) as caught:
        ConverterEngine().quantize(job)
    assert "tfmot cannot make this model quantization-aware" in str(caught.value) and "LayerNormalization" in str(caught.value)
    assert "mode: int8" in caught.value.hint and "fuse" not in caught.value.hint  # no BN here: fuse would not help


@pytest.fixture(scope="module")
def prune_run(digits_source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    result = helpers.run_stage(tmp, EXAMPLES / "digits-prune.yaml", "--workdir", str(tmp / "work"))
    return result, result.report, tmp


def test_prune_reaches_target_sparsity_and_shrinks_gzip(prune_run):
    result, report, tmp = prune_run
    assert result.exit_code == 0, result.output
    notes = report["steps"][0]["notes"]
    assert notes["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert all(v == pytest.approx(0.5, abs=0.03) for v in notes["per_layer_sparsity"].values())
    # The sparsity is in the shipped weights: the int8 kernels are half zeros.
    tflite = (tmp / "work" / "model.tflite").read_bytes()
    assert report["candidate"]["gzip_size_bytes"] == len(gzip.compress(tflite, compresslevel=9, mtime=0))
    assert report["candidate"]["gzip_size_bytes"] < 0.35 * report["baseline"]["gzip_size_bytes"]
    assert report["candidate"]["accuracy"] >= report["baseline"]["accuracy"] - 0.02
    assert "[prune] prune: epoch 4/4" in result.output  # fine-tuning progress reaches the console


def test_pruned_int8_weights_are_sparse_in_the_flatbuffer(prune_run):
    from ai_edge_litert.interpreter import Interpreter

    _, _, tmp = prune_run
    interp = Interpreter(model_content=(tmp / "work" / "model.tflite").read_bytes())
    kernels = [
        interp.get_tensor(t["index"])
        for t in interp.get_tensor_details()
        if t["dtype"] == np.int8 and len(t["shape"]) in (2, 4) and t["shape"][0] > 1 and "conv2d" in t["name"].lower()
    ]
    assert kernels
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)
    assert zeros >= 0.45


def test_qat_fine_tunes_and_converts_to_int8(digits_source, tmp_path, run_stage, versions_of):
    result = run_stage(EXAMPLES / "digits-qat.yaml", "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 0, result.output
    report = result.report
    assert report["conversion"]["settings"]["quantization"] == "qat"
    assert (tmp_path / "w" / "qat" / "worker.log").exists()
    info = read_flatbuffer((tmp_path / "w" / "model.tflite").read_bytes())
    summary = info.summary()
    assert "INT8" in summary["weight_dtypes"] and "INT8" in str(summary["activation_dtypes"])
    assert report["candidate"]["accuracy"] >= report["baseline"]["accuracy"] - 0.005
    assert versions_of("digits-cnn-tflite")


def test_litert_quantizer_engine_writes_int8(digits_source, tmp_path, run_stage):
    result = run_stage(EXAMPLES / "digits-litert-quantizer.yaml", "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 0, result.output
    report = result.report
    model_bytes = (tmp_path / "w" / "model.tflite").read_bytes()
    summary = read_flatbuffer(model_bytes).summary()
    assert "INT8" in summary["weight_dtypes"] and "INT8" in str(summary["activation_dtypes"])
    # io: float (the default) keeps float inputs and outputs, as with the converter engine
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    assert [d["dtype"] for d in interpreter.get_input_details() + interpreter.get_output_details()] == [np.float32] * 2
    assert summary["ops"]["QUANTIZE"] >= 1 and summary["ops"]["DEQUANTIZE"] >= 1
    assert report["candidate"]["size_bytes"] < 0.5 * report["baseline"]["size_bytes"]
    assert report["candidate"]["accuracy"] >= report["baseline"]["accuracy"] - 0.01
