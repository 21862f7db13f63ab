"""The pyfunc wrapper logged with every registered .tflite (MLflow "models from code").

``mlflow.pyfunc.load_model("models:/name/N").predict(batch)`` runs the flatbuffer through the
LiteRT interpreter. Logged from code rather than pickled, so loading it executes no pickle.
"""

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

try:
    from pipeline_stage.engine.litert_runtime import TFLiteModel
except ImportError:  # a consumer without pipeline-stage: the file ships in the model's code/
    from litert_runtime import TFLiteModel


class TFLitePyfunc(PythonModel):
    """Predict with the model's .tflite artifact (first input, first output)."""

    def load_context(self, context):
        with open(context.artifacts["tflite"], "rb") as fh:
            self._model = TFLiteModel(fh.read(), threads=1)

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "to_numpy"):
            model_input = model_input.to_numpy()
        batch = np.asarray(model_input, dtype=np.float32)
        return self._model.predict(batch, batch_size=int((params or {}).get("batch_size", 64)))


set_model(TFLitePyfunc())
