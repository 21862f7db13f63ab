"""Small PyTorch models of the project's own, trained on the offline digits (NCHW, as PyTorch
trains them), and logged the ways teams log them: ``mlflow.pytorch.log_model`` with MLflow 3's
``pt2`` (a torch.export archive, dynamic batch from an input example of five) and MLflow 2's
``pickle`` (cloudpickle, the module's code pickled by value as from a notebook), with the run's
calibration and evaluation data beside the model.

Used by tests/test_pytorch.py and bench/bench_torch.py; it imports torch, so only they import it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def digits_nchw() -> tuple[np.ndarray, np.ndarray]:
    """The digits set (1,797 8x8 images, offline in scikit-learn) as NCHW float32 in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)


def extra_features(x: np.ndarray) -> np.ndarray:
    """A second input for the two-input model: each image's row means of its top half (N, 4)."""
    return x[:, 0, :4, :].mean(axis=2).astype(np.float32)


class DigitsCNN(nn.Module):
    """Two convolutions, a pool and a classifier: 10 logits; any batch (flatten keeps axis 0)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class TwoInTwoOut(nn.Module):
    """An image and four side features in; the digit's logits and a 2-vector (a box-like regression) out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.logits = nn.Linear(16 * 4 + 4, 10)
        self.box = nn.Linear(16 * 4 + 4, 2)

    def forward(self, image, side):
        features = torch.cat([torch.flatten(self.pool(torch.relu(self.conv(image))), 1), side], dim=1)
        return self.logits(features), torch.sigmoid(self.box(features))


def train(module: nn.Module, inputs: tuple[np.ndarray, ...], y: np.ndarray, epochs: int = 8, seed: int = 0) -> nn.Module:
    """Adam on the first output's cross-entropy, batches of 64; the module in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    tensors = [torch.from_numpy(a) for a in inputs]
    labels = torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 64):
            batch = order[start : start + 64]
            out = module(*[t[batch] for t in tensors])
            logits = out[0] if isinstance(out, tuple) else out
            loss = nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return module.eval()


def outputs(module: nn.Module, inputs: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """PyTorch's own outputs on `inputs`, as float64 arrays."""
    with torch.no_grad():
        out = module(*[torch.from_numpy(a) for a in inputs])
    return [o.double().numpy() for o in (out if isinstance(out, tuple) else (out,))]


def signature(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]):
    """An MLflow signature of named tensors (what ``pt2`` needs for a module of several inputs,
    which MLflow cannot infer from a tuple), dynamic batch."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(arrays):
        return Schema([TensorSpec(a.dtype, (-1, *a.shape[1:]), name) for name, a in arrays.items()])

    return ModelSignature(inputs=schema(inputs), outputs=schema(outputs))


def log(
    module: nn.Module,
    example: tuple[np.ndarray, ...],
    fmt: str,
    name: str,
    data: dict[str, dict],
    folder: Path,
    signature=None,
) -> str:
    """Log `module` in a run as teams do (`fmt`: pt2 or pickle; `signature` where MLflow cannot
    infer one), its data sets beside it (data/<set>.npz), registered as `name`; the run id."""
    import cloudpickle
    import mlflow

    cloudpickle.register_pickle_by_value(__import__(__name__))  # code pickled with the model, as from a notebook
    Path(folder).mkdir(parents=True, exist_ok=True)
    with mlflow.start_run() as run:
        for set_name, arrays in data.items():
            path = Path(folder) / f"{set_name}.npz"
            np.savez(path, **arrays)
            mlflow.log_artifact(str(path), artifact_path="data")
        mlflow.pytorch.log_model(
            module,
            name="model",
            input_example=example if len(example) > 1 else example[0],
            serialization_format=fmt,
            signature=signature,
            registered_model_name=name,
        )
    return run.info.run_id
