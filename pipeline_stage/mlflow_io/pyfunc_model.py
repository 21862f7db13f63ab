"""The pyfunc wrapper logged with every registered .tflite (MLflow "models from code").

``mlflow.pyfunc.load_model("models:/name/N").predict(batch)`` runs the flatbuffer through the
LiteRT interpreter. Logged from code rather than pickled, so loading it executes no pickle.
Loading checks the model's files against the sha256 the stage recorded when it registered them
(the model's ``model_config``) and refuses files that differ.
"""

import hashlib
from pathlib import Path

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

try:
    from pipeline_stage.engine.litert_runtime import TFLiteModel
except ImportError:  # a consumer without pipeline-stage: the file ships in the model's code/
    from litert_runtime import TFLiteModel


class TFLitePyfunc(PythonModel):
    """Predict with the model's .tflite artifact: an array (or a DataFrame) for a single-input model,
    a dict of arrays by input name (or a DataFrame with one column per input) for several inputs;
    an array back for a single-output model, a dict by output name for several outputs."""

    def load_context(self, context):
        config = context.model_config or {}
        tflite = Path(context.artifacts["tflite"])
        check_files(tflite.parents[1], config.get("pipeline_stage.sha256") or {})
        # custom ops' kernels, as the stage's plugins registered them (their modules must be installed here too)
        self._model = TFLiteModel(
            tflite.read_bytes(), threads=1, op_registerers=config.get("pipeline_stage.op_registerers") or []
        )

    # MLflow takes a predict hint of list[...] (which it would validate against and convert to) or one
    # of a few types it leaves alone; np.ndarray is one of those, so the logged tensor signature stays
    # what validates the input. After that validation a several-input model receives a dict of arrays.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        batch_size = int((params or {}).get("batch_size", 64))
        names = self._model.input_names
        if len(names) > 1 and hasattr(model_input, "columns"):  # a DataFrame, one column per input
            model_input = {n: np.stack(model_input[n].to_numpy()) for n in names}
        if isinstance(model_input, dict):
            feed = {n: np.asarray(model_input[n], dtype=np.float32) for n in names}
        else:
            feed = np.asarray(model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input, dtype=np.float32)
        outputs = self._model.predict_outputs(feed, batch_size=batch_size)
        return outputs if len(outputs) > 1 else next(iter(outputs.values()))


class ModelFilesAltered(Exception):
    """A file of the loaded model is not the one pipeline-stage registered."""


def check_files(root: Path, expected: dict) -> None:
    """Raise ModelFilesAltered unless every file in `expected` (path in the model -> sha256) has
    that digest under `root`. (Its own hashing, not mlflow_io.integrity's: this file ships inside
    the model and runs where pipeline-stage may not be installed.)"""
    for rel, want in sorted(expected.items()):
        path = root / rel
        if not path.is_file():
            raise ModelFilesAltered(f"model file {rel} is missing (expected sha256 {want}); refusing to load this model")
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != want:
            raise ModelFilesAltered(
                f"model file {rel} does not match what pipeline-stage registered: sha256 {digest.hexdigest()}, "
                f"expected {want}; refusing to load this model (check it with `pipeline-stage verify`)"
            )


set_model(TFLitePyfunc())
