"""Built-in metrics: top-1 accuracy, model size (raw and gzip), and single-thread latency."""

from __future__ import annotations

import numpy as np

from pipeline_stage import Metric, hookimpl


class Accuracy(Metric):
    """Top-1 accuracy on the evaluation data (argmax of the outputs; 0.5 threshold for one output)."""

    name = "accuracy"
    higher_is_better = True
    needs_labels = True

    def compute(self, evaluation) -> float:
        preds = np.asarray(evaluation.predictions)
        labels = np.asarray(evaluation.labels)
        if preds.ndim > 1 and preds.shape[-1] > 1:
            predicted = preds.reshape(preds.shape[0], -1).argmax(axis=-1)
        else:
            predicted = (preds.reshape(preds.shape[0]) > 0.5).astype(np.int64)
        if labels.ndim > 1 and labels.shape[-1] > 1:  # one-hot labels
            labels = labels.argmax(axis=-1)
        return float(np.mean(predicted == labels.reshape(labels.shape[0])))


class SizeBytes(Metric):
    """Size of the .tflite flatbuffer in bytes."""

    name = "size_bytes"
    higher_is_better = False
    uses = "flatbuffer"
    runs_model = False
    unit = "B"

    def compute(self, evaluation) -> float:
        return float(len(evaluation.model_bytes))


class GzipSizeBytes(Metric):
    """Size of the .tflite after gzip -9: what a download costs; where pruning's zeros pay off."""

    name = "gzip_size_bytes"
    higher_is_better = False
    uses = "flatbuffer"
    runs_model = False
    unit = "B"

    def compute(self, evaluation) -> float:
        import gzip

        return float(len(gzip.compress(evaluation.model_bytes, compresslevel=9, mtime=0)))


class LatencyP50(Metric):
    """Median latency of one invocation in ms (batch 1, 1 thread, XNNPACK)."""

    name = "latency_p50_ms"
    higher_is_better = False
    uses = "flatbuffer"
    unit = "ms"

    def compute(self, evaluation) -> float:
        return float(np.percentile(evaluation.latencies_ms, 50))


@hookimpl
def register_metrics(register):
    register(Accuracy)
    register(SizeBytes)
    register(GzipSizeBytes)
    register(LatencyP50)
