"""Built-in metrics: top-1 accuracy, MAE and RMSE (labels), fidelity to the baseline's outputs (no labels needed:
SQNR, cosine, top-1 agreement), model size (raw and gzip), and single-thread latency."""

from __future__ import annotations

import numpy as np

from pipeline_stage import Metric, hookimpl


class Accuracy(Metric):
    """Top-1 accuracy on the evaluation data (argmax of the outputs; 0.5 threshold for one output)."""

    name = "accuracy"
    higher_is_better = True
    needs_labels = True

    def compute(self, evaluation) -> float:
        if evaluation.labels is None:
            raise ValueError("no labels for this output (`y.<output>`)")
        preds = np.asarray(evaluation.predictions)
        labels = np.asarray(evaluation.labels)
        if np.issubdtype(labels.dtype, np.floating) and not np.all(labels == np.round(labels)):
            raise ValueError("a regression output (its labels are not class ids): use mae or rmse")
        if preds.ndim > 1 and preds.shape[-1] > 1:
            predicted = preds.reshape(preds.shape[0], -1).argmax(axis=-1)
        elif labels.ndim == 1 and labels.size and labels.max() > 1:
            raise ValueError(f"the labels have {int(labels.max()) + 1} classes but this output gives one score")
        else:
            predicted = (preds.reshape(preds.shape[0]) > 0.5).astype(np.int64)
        if labels.ndim > 1 and labels.shape[-1] > 1:  # one-hot labels
            labels = labels.argmax(axis=-1)
        return float(np.mean(predicted == labels.reshape(labels.shape[0])))


def _errors(evaluation) -> np.ndarray:
    """Prediction minus label, per value, for a regression output."""
    if evaluation.labels is None:
        raise ValueError("no labels for this output (`y.<output>`)")
    preds = np.asarray(evaluation.predictions, dtype=np.float64)
    labels = np.asarray(evaluation.labels, dtype=np.float64)
    if preds.size != labels.size:
        raise ValueError(f"labels of shape {labels.shape} do not fit outputs of shape {preds.shape}")
    return preds.reshape(-1) - labels.reshape(-1)


class MeanAbsoluteError(Metric):
    """Mean absolute error against the labels (regression outputs)."""

    name = "mae"
    higher_is_better = False
    needs_labels = True

    def compute(self, evaluation) -> float:
        return float(np.mean(np.abs(_errors(evaluation))))


class RootMeanSquaredError(Metric):
    """Root mean squared error against the labels (regression outputs)."""

    name = "rmse"
    higher_is_better = False
    needs_labels = True

    def compute(self, evaluation) -> float:
        return float(np.sqrt(np.mean(_errors(evaluation) ** 2)))


def _comparable(evaluation) -> tuple[np.ndarray, np.ndarray]:
    """The candidate's outputs and the baseline's on the same inputs, one row per sample."""
    candidate = np.asarray(evaluation.predictions, dtype=np.float32)
    reference = np.asarray(evaluation.reference, dtype=np.float32)
    if candidate.shape != reference.shape:
        raise ValueError(f"outputs of shape {candidate.shape} cannot be compared with the baseline's {reference.shape}")
    return candidate.reshape(len(candidate), -1), reference.reshape(len(reference), -1)


class FidelitySqnr(Metric):
    """Outputs' signal-to-noise ratio vs the baseline's on the same inputs, in dB; no labels needed.

    10·log10(sum ref² / sum (ref - candidate)²): 20 dB is an error a tenth of the signal."""

    name = "fidelity_sqnr_db"
    higher_is_better = True
    unit = "dB"

    def compute(self, evaluation) -> float:
        from litert_quantizer.utils.validation_utils import signal_to_noise_ratio

        candidate, reference = _comparable(evaluation)
        # LiteRT Quantizer's SNR is a power ratio, mean(ref²) / (mse + 1e-9): identical outputs give a
        # large finite number rather than infinity.
        return float(10.0 * np.log10(max(signal_to_noise_ratio(candidate, reference), 1e-12)))


class FidelityCosine(Metric):
    """Cosine similarity of the outputs with the baseline's on the same inputs (1: same); no labels needed."""

    name = "fidelity_cosine"
    higher_is_better = True

    def compute(self, evaluation) -> float:
        from litert_quantizer.utils.validation_utils import cosine_similarity

        candidate, reference = _comparable(evaluation)
        return float(cosine_similarity(candidate, reference))


class Top1Agreement(Metric):
    """Share of samples whose top-1 class matches the baseline's (classification outputs; no labels needed)."""

    name = "top1_agreement"
    higher_is_better = True

    def compute(self, evaluation) -> float:
        candidate, reference = _comparable(evaluation)
        if candidate.shape[1] < 2:
            raise ValueError("top1_agreement needs a classification output (one score per class)")
        return float(np.mean(candidate.argmax(axis=1) == reference.argmax(axis=1)))


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
    timed = True
    unit = "ms"

    def compute(self, evaluation) -> float:
        return float(np.percentile(evaluation.latencies_ms, 50))


@hookimpl
def register_metrics(register):
    register(Accuracy)
    register(MeanAbsoluteError)
    register(RootMeanSquaredError)
    register(FidelitySqnr)
    register(FidelityCosine)
    register(Top1Agreement)
    register(SizeBytes)
    register(GzipSizeBytes)
    register(LatencyP50)
