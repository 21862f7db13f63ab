"""Quantization-aware training (``quantize: {mode: qat}``, engine ``converter``): tfmot makes a
quantization-aware copy of the Keras model, fine-tunes it on the training data and the TFLite
converter turns it into full int8, all in the tf_keras child (tfmot needs tf_keras; the bridge,
``run_tf_keras_task``, carries the model across)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline_stage import (
    ConversionSettings,
    Dataset,
    EpochProgress,
    InputError,
    build_converter,
    build_tf_keras_model,
    compile_for_fine_tuning,
    fine_tuning_arrays,
    fine_tuning_batches,
    run_tf_keras_task,
)
from pipeline_stage_plugins.quantize.converter_settings import configure_quantization


def quantize_aware(job) -> bytes:
    """Fine-tune a quantization-aware copy of the job's Keras model in the tf_keras child and
    convert it to int8 there; the child's log becomes the conversion's."""
    p, request = job.request.settings, job.request
    if job.model is None:
        raise InputError(
            f"quantize mode qat fine-tunes a Keras model, but the source is {job.source.title or job.source.name}",
            hint="log the model with mlflow.tensorflow.log_model, or use mode int8",
        )
    calibration = job.calibration()
    if request.training_data is None or calibration is None:
        raise InputError("quantize mode qat needs `training` and calibration data", hint="add them under `data:`")
    folder = job.log_path.parent / "qat"
    folder.mkdir(parents=True, exist_ok=True)
    # by reference (Dataset.files): the child reads the training set a batch at a time
    training_files = job.load_data(request.training_data).files(folder / "training")
    calibration_files = calibration.files(folder / "calibration")
    conversion = job.conversion
    run_tf_keras_task(
        {
            "task": f"{__name__}:qat_in_tf_keras",
            "training": training_files,
            "calibration": calibration_files,
            "params": {
                "epochs": p.qat_epochs,
                "learning_rate": p.qat_learning_rate,
                "batch_size": p.qat_batch_size,
                "seed": p.seed,
            },
            # the child converts the quantization-aware model as full int8 with these settings
            "conversion": {
                "inference_input_type": conversion.inference_input_type,
                "inference_output_type": conversion.inference_output_type,
                "allow_select_tf_ops": conversion.allow_select_tf_ops,
                "allow_custom_ops": conversion.allow_custom_ops,
                "hints": conversion.hints,
                "per_channel": p.per_channel,
            },
            "seed": p.seed,
        },
        job.model,
        folder,
        log=job.log,
    )
    job.log_path.write_text((folder / "worker.log").read_text(errors="replace"))
    return (folder / "model.tflite").read_bytes()


def qat_in_tf_keras(folder: Path, task: dict) -> dict:
    """The tf_keras child's task (pipeline_stage.engine.tfmot_worker): quantization-aware training
    with tfmot, fine-tuned, then converted to full int8 (model.tflite)."""
    import tensorflow_model_optimization as tfmot

    p = task["params"]
    model = build_tf_keras_model(folder)
    x, y = fine_tuning_arrays(task["training"])
    try:
        q_model = tfmot.quantization.keras.quantize_model(model)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0]
        hint = "use post-training `quantize: {mode: int8}`"
        if "BatchNormalization" in first:  # tfmot quantizes BN only right after a conv/dense
            hint += ", or run `fuse` first so no BatchNormalization follows an activation"
        raise InputError(f"tfmot cannot make this model quantization-aware: {first}", hint=hint) from None
    compile_for_fine_tuning(q_model, p, x, y)
    q_model.fit(
        fine_tuning_batches(x, y, p["batch_size"], task.get("seed", 0)),
        epochs=p["epochs"],
        verbose=0,
        callbacks=[EpochProgress("qat", p["epochs"])],
    )
    cx, _ = fine_tuning_arrays(task["calibration"])
    cx = np.asarray(cx, dtype=np.float32)  # calibration_samples rows: small
    spec = dict(task["conversion"])
    per_channel = spec.pop("per_channel")
    settings = ConversionSettings(**spec)
    converter = build_converter(settings, keras_model=q_model)
    names = [getattr(t, "name", None) or f"input_{i}" for i, t in enumerate(q_model.inputs)]
    configure_quantization(converter, "int8", per_channel, settings.hints, Dataset(cx, None, "calibration"), names[:1])
    print("qat: converting the quantization-aware model to int8", file=sys.__stdout__, flush=True)
    (folder / "model.tflite").write_bytes(converter.convert())
    return {}
