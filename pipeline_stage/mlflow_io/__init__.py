"""MLflow in and out: the tracking server, the source model's resolution and download, the stage's
run, the model registry (versions, aliases) and the pyfunc wrapper of a registered .tflite."""
