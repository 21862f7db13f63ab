"""Built-in data loader for TFRecord files of `tf.train.Example` (what TensorFlow and TFX input
pipelines write), read as a stream: the stage never holds the set, whatever its size."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline_stage import DataLoader, Dataset, InputError, first_line, hookimpl, import_tensorflow

HINT = (
    "write one tf.train.Example per sample: a feature per model input, named after it (`x` for the only input), "
    "holding the flattened tensor as a float_list or int64_list (or a bytes_list with tf.io.serialize_tensor), "
    "and labels `y` (or `y.<output>`) as an int64_list or float_list"
)
LABEL = "y"


class TFRecordLoader(DataLoader):
    """`.tfrecord` / `.tfrecords`: one `tf.train.Example` per sample. A feature per model input,
    named after it (`x` for the only input), holding the flattened tensor as a `float_list` (read
    as float32) or `int64_list` (int64), which the stage reshapes to the model's static input
    shape, or a `bytes_list` holding one tensor serialized with `tf.io.serialize_tensor` (its own
    dtype and shape); labels `y` (one output) or `y.<output>`, an `int64_list` or `float_list` of
    one value per sample (or more, kept as a row). Every record has the features of the first.
    Read in batches: a file far bigger than memory is fine."""

    name = "tfrecord"
    suffixes = (".tfrecord", ".tfrecords")
    streams = True

    def load(self, path: Path, source: str) -> Dataset:
        parts = list(self.batches(path, source, 1024))
        if not parts:
            raise InputError(f"data `{source}`: `{path.name}` holds no records", hint=HINT)
        return Dataset(arrays={k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, source=source)

    def batches(
        self, path: Path, source: str, batch_size: int, names: list[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        tf = import_tensorflow()
        records = tf.data.TFRecordDataset([str(path)]).batch(batch_size)
        spec, start = None, 0
        iterator = iter(records)
        while True:
            try:
                serialized = next(iterator)
            except StopIteration:
                return
            except tf.errors.DataLossError as exc:
                raise InputError(
                    f"data `{source}`: `{path.name}` is not a readable TFRecord file (after record {start}): {first_line(exc)}",
                    hint="write it with tf.io.TFRecordWriter (uncompressed)",
                ) from None
            if spec is None:
                spec = _spec(tf, serialized[0].numpy(), path, source)
                if names is not None:
                    missing = [n for n in names if n not in spec]
                    if missing:
                        raise InputError(
                            f"data `{source}`: `{path.name}` has no feature {', '.join(f'`{m}`' for m in missing)} "
                            f"(the first record has {', '.join(f'`{k}`' for k in spec)})",
                            hint="map the stage's names to features the records have (`features: {x: <feature>, y: <feature>}`)",
                        )
                    spec = {k: v for k, v in spec.items() if k in names}
            n = int(serialized.shape[0])
            try:
                parsed = tf.io.parse_example(serialized, {k: f for k, (f, _) in spec.items()})
            except tf.errors.InvalidArgumentError as exc:
                raise InputError(
                    f"data `{source}`: `{path.name}`, records {start}-{start + n - 1}: {first_line(exc)} (the first record "
                    f"has {', '.join(f'`{k}`' for k in spec)})",
                    hint="give every record the same features, each with the same number of values",
                ) from None
            yield {k: _decode(tf, parsed[k], kind, k, path, source) for k, (_, kind) in spec.items()}
            start += n


def _spec(tf, first: bytes, path: Path, source: str) -> dict:
    """The parsing spec from the first record: each feature's kind and length."""
    try:
        example = tf.train.Example.FromString(first)
    except Exception as exc:  # a protobuf DecodeError: not a tf.train.Example
        raise InputError(
            f"data `{source}`: `{path.name}`: the first record is not a tf.train.Example ({exc})", hint=HINT
        ) from None
    spec = {}
    for key, feature in sorted(example.features.feature.items()):
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            spec[key] = (tf.io.FixedLenFeature([], tf.string), "tensor")
        elif kind in ("float_list", "int64_list"):
            values = getattr(feature, kind).value
            dtype = tf.float32 if kind == "float_list" else tf.int64
            spec[key] = (tf.io.FixedLenFeature([len(values)], dtype), "values")
    if not spec:
        raise InputError(f"data `{source}`: `{path.name}`: the first record has no features", hint=HINT)
    return spec


def _decode(tf, values, kind: str, key: str, path: Path, source: str) -> np.ndarray:
    if kind == "tensor":
        from tensorflow.core.framework import tensor_pb2

        try:
            return np.stack([tf.make_ndarray(tensor_pb2.TensorProto.FromString(s)) for s in values.numpy()])
        except Exception as exc:  # a DecodeError or a TypeError: bytes that are not one serialized tensor
            raise InputError(
                f"data `{source}`: `{path.name}`: feature `{key}` holds bytes that are not a tensor serialized with "
                f"tf.io.serialize_tensor ({type(exc).__name__})",
                hint="list the features the model needs, e.g. `evaluation: {uri: ..., features: {x: image, y: label}}`, "
                "or write the tensor with tf.io.serialize_tensor",
            ) from None
    array = values.numpy()
    is_label = key == LABEL or key.startswith(LABEL + ".")
    return array[:, 0] if is_label and array.shape[1] == 1 else array


@hookimpl
def register_data_loaders(register):
    register(TFRecordLoader)
