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

    def update(self, state, chunk) -> None:
        if chunk.labels is None:
            raise ValueError("no labels for this output (`y.<output>`)")
        preds = np.asarray(chunk.predictions)
        labels = np.asarray(chunk.labels)
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
        _add(state, correct=int(np.sum(predicted == labels.reshape(labels.shape[0]))), n=len(predicted))

    def result(self, state) -> float:
        return state["correct"] / state["n"] if state.get("n") else float("nan")


def _add(state: dict, **sums) -> None:
    for key, value in sums.items():
        state[key] = state.get(key, 0) + value


def _errors(chunk) -> np.ndarray:
    """Prediction minus label, per value, for a regression output."""
    if chunk.labels is None:
        raise ValueError("no labels for this output (`y.<output>`)")
    preds = np.asarray(chunk.predictions, dtype=np.float64)
    labels = np.asarray(chunk.labels, dtype=np.float64)
    if preds.size != labels.size:
        per = labels[:1].size, preds[:1].size
        raise ValueError(f"labels of {per[0]} value(s) per sample do not fit outputs of {per[1]} per sample")
    return preds.reshape(-1) - labels.reshape(-1)


class MeanAbsoluteError(Metric):
    """Mean absolute error against the labels (regression outputs)."""

    name = "mae"
    higher_is_better = False
    needs_labels = True

    def update(self, state, chunk) -> None:
        errors = _errors(chunk)
        _add(state, total=float(np.sum(np.abs(errors))), n=errors.size)

    def result(self, state) -> float:
        return state["total"] / state["n"] if state.get("n") else float("nan")


class RootMeanSquaredError(Metric):
    """Root mean squared error against the labels (regression outputs)."""

    name = "rmse"
    higher_is_better = False
    needs_labels = True

    def update(self, state, chunk) -> None:
        errors = _errors(chunk)
        _add(state, total=float(np.sum(errors**2)), n=errors.size)

    def result(self, state) -> float:
        return float(np.sqrt(state["total"] / state["n"])) if state.get("n") else float("nan")


def _comparable(chunk) -> tuple[np.ndarray, np.ndarray]:
    """The candidate's outputs and the baseline's on the same inputs, flattened, as the LiteRT
    Quantizer's comparison functions take them (float32; NaN and infinities replaced as it does)."""
    candidate = np.asarray(chunk.predictions, dtype=np.float32)
    reference = np.asarray(chunk.reference, dtype=np.float32)
    if candidate.shape != reference.shape:
        raise ValueError(f"outputs of shape {candidate.shape[1:]} cannot be compared with the baseline's {reference.shape[1:]}")
    return tuple(np.nan_to_num(a.reshape(-1), nan=1e-9, neginf=-1e9, posinf=1e9) for a in (candidate, reference))


class FidelitySqnr(Metric):
    """Outputs' signal-to-noise ratio vs the baseline's on the same inputs, in dB; no labels needed.

    10·log10(mean ref² / (mean (ref - candidate)² + 1e-9)), the LiteRT Quantizer's SNR
    (`validation_utils.signal_to_noise_ratio`) accumulated over the data: 20 dB is an error a
    tenth of the signal; identical outputs give a large finite number rather than infinity."""

    name = "fidelity_sqnr_db"
    higher_is_better = True
    unit = "dB"

    def update(self, state, chunk) -> None:
        candidate, reference = _comparable(chunk)
        noise = (candidate - reference).astype(np.float64)
        _add(
            state,
            signal=float(np.dot(reference.astype(np.float64), reference)),
            noise=float(np.dot(noise, noise)),
            n=reference.size,
        )

    def result(self, state) -> float:
        n = state.get("n", 0)
        ratio = (state["signal"] / n) / (state["noise"] / n + 1e-9) if n else 0.0
        return float(10.0 * np.log10(max(ratio, 1e-12)))


class FidelityCosine(Metric):
    """Cosine similarity of the outputs with the baseline's on the same inputs (1: same); no labels
    needed. The LiteRT Quantizer's (`validation_utils.cosine_similarity`), accumulated."""

    name = "fidelity_cosine"
    higher_is_better = True

    def update(self, state, chunk) -> None:
        candidate, reference = (a.astype(np.float64) for a in _comparable(chunk))
        _add(
            state,
            dot=float(np.dot(candidate, reference)),
            cc=float(np.dot(candidate, candidate)),
            rr=float(np.dot(reference, reference)),
            n=candidate.size,
        )

    def result(self, state) -> float:
        if not state.get("n"):
            return 0.0
        norm_c, norm_r = np.sqrt(state["cc"]), np.sqrt(state["rr"])
        if norm_c == 0 and norm_r == 0:
            return 1.0
        if norm_c == 0 or norm_r == 0:
            return 0.0
        return float(state["dot"] / (norm_c * norm_r))


class Top1Agreement(Metric):
    """Share of samples whose top-1 class matches the baseline's (classification outputs; no labels needed)."""

    name = "top1_agreement"
    higher_is_better = True

    def update(self, state, chunk) -> None:
        candidate = np.asarray(chunk.predictions, dtype=np.float32)
        reference = np.asarray(chunk.reference, dtype=np.float32)
        if candidate.shape != reference.shape:
            raise ValueError(
                f"outputs of shape {candidate.shape[1:]} cannot be compared with the baseline's {reference.shape[1:]}"
            )
        candidate, reference = candidate.reshape(len(candidate), -1), reference.reshape(len(reference), -1)
        if candidate.shape[1] < 2:
            raise ValueError("top1_agreement needs a classification output (one score per class)")
        _add(state, agree=int(np.sum(candidate.argmax(axis=1) == reference.argmax(axis=1))), n=len(candidate))

    def result(self, state) -> float:
        return state["agree"] / state["n"] if state.get("n") else float("nan")


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
