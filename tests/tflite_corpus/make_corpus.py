"""Make the `.tflite` corpus the shipped-files tests run: float models written the ways other
exporters write them, as vendors ship them for on-device vision (an image input of fixed batch 1,
one to three outputs, PReLU and hard-swish, float16 or sparse weights, no SignatureDef, operator
codes the older way, TFLite metadata with a label file, a custom op).

``python -m tests.tflite_corpus.make_corpus`` rewrites the files beside this script with today's
TensorFlow converter, then edits the flatbuffers the way older converters and metadata writers
leave them (no TensorFlow is needed to read them; the tests never run this). Each model has fixed
random weights (seeded); :func:`images` gives the real images the tests feed them (the offline
digits, upscaled to 32x32x3)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZE = 32


def images(n: int = 240) -> np.ndarray:
    """Real images: the offline digits, upscaled to 32x32 and put in three channels, in 0..1."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:n] / 16.0
    big = np.kron(digits, np.ones((4, 4)))  # 8x8 -> 32x32
    rgb = np.stack([big, np.roll(big, 1, axis=1), big[:, ::-1]], axis=-1)
    return rgb.astype(np.float32)


def _trunk(keras, inp, width: int = 24):
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same")(inp)
    x = keras.layers.PReLU(shared_axes=[1, 2])(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Activation(keras.activations.hard_swish)(x)
    x = keras.layers.Conv2D(2 * width, 1, activation="relu")(x)
    x = keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu")(x)
    return keras.layers.GlobalAveragePooling2D()(x)


def vision_model(keras, outputs: tuple[str, ...], seed: int, hidden: int = 64):
    """A small image model with fixed batch 1 and one to three heads (scores, boxes, landmarks)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 3), batch_size=1, name="image")
    features = keras.layers.Dense(hidden, activation="relu")(_trunk(keras, inp))
    heads = {
        "scores": keras.layers.Dense(10, activation="softmax", name="scores"),
        "boxes": keras.layers.Dense(4, name="boxes"),
        "landmarks": keras.layers.Dense(10, name="landmarks"),
    }
    return keras.Model(inp, [heads[name](features) for name in outputs])


def convert(tf, model, *, float16: bool = False, sparse: bool = False) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    optimizations = []
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    if float16:
        optimizations.append(tf.lite.Optimize.DEFAULT)
        converter.target_spec.supported_types = [tf.float16]
    converter.optimizations = optimizations
    return bytes(converter.convert())


def prune(model, fraction: float = 0.5) -> None:
    """Zero the smallest weights of every Conv2D and Dense kernel, as magnitude pruning leaves them
    (the converter's sparsity optimization then stores them sparse, each behind a DENSIFY op)."""
    for layer in model.layers:
        if type(layer).__name__ in ("Conv2D", "Dense"):
            kernel, bias = layer.get_weights()
            kernel[np.abs(kernel) < np.quantile(np.abs(kernel), fraction)] = 0
            layer.set_weights([kernel, bias])


def without_signature(model_bytes: bytes) -> bytes:
    from pipeline_stage.engine.flatbuffer import dump_model, load_model

    model = load_model(model_bytes)
    model.signatureDefs = []
    return dump_model(model)


def older_op_codes(model_bytes: bytes) -> bytes:
    """Operator codes as converters before TF 2.4 wrote them: only `deprecated_builtin_code`."""
    from pipeline_stage.engine.flatbuffer import dump_model, load_model

    model = load_model(model_bytes)
    for code in model.operatorCodes:
        if code.builtinCode < 127:
            code.deprecatedBuiltinCode, code.builtinCode = code.builtinCode, 0
    return dump_model(model)


def model_metadata(name: str, description: str, label_file: str) -> bytes:
    """A TFLite ModelMetadata flatbuffer (identifier M001, as the metadata writers make it) naming
    the model and its label file (an associated file of type TENSOR_AXIS_LABELS)."""
    import flatbuffers

    builder = flatbuffers.Builder(256)
    file_name, file_description = builder.CreateString(label_file), builder.CreateString("Labels of the scores, one per line.")
    builder.StartObject(5)  # AssociatedFile {name, description, type, locale, version}
    builder.PrependUOffsetTRelativeSlot(0, file_name, 0)
    builder.PrependUOffsetTRelativeSlot(1, file_description, 0)
    builder.PrependUint8Slot(2, 2, 0)  # TENSOR_AXIS_LABELS
    associated = builder.EndObject()
    builder.StartVector(4, 1, 4)
    builder.PrependUOffsetTRelative(associated)
    files = builder.EndVector()
    model_name, model_description = builder.CreateString(name), builder.CreateString(description)
    version = builder.CreateString("v1")
    builder.StartObject(
        8
    )  # ModelMetadata {name, description, version, subgraph_metadata, author, license, associated_files, min_parser_version}
    builder.PrependUOffsetTRelativeSlot(0, model_name, 0)
    builder.PrependUOffsetTRelativeSlot(1, model_description, 0)
    builder.PrependUOffsetTRelativeSlot(2, version, 0)
    builder.PrependUOffsetTRelativeSlot(6, files, 0)
    builder.Finish(builder.EndObject(), b"M001")
    return bytes(builder.Output())


def with_metadata(model_bytes: bytes, labels: list[str]) -> bytes:
    """The model with TFLite metadata and its label file zipped onto it, as the metadata populator does."""
    from pipeline_stage.engine.flatbuffer import add_metadata

    data = add_metadata(model_bytes, "TFLITE_METADATA", model_metadata("digits-32", "Ten digit classes.", "labels.txt"))
    buffer = io.BytesIO(data)
    buffer.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("labels.txt", "\n".join(labels) + "\n")
    return buffer.getvalue()


def with_custom_op(model_bytes: bytes) -> bytes:
    """The model's `scores` also written through `odml.update_kv_cache`, a custom op whose kernel
    ships in ai-edge-litert behind a registerer (`pywrap_genai_ops.GenAIOpsRegisterer`) that the
    plain interpreter does not load: the file runs only where a plugin registers it."""
    from flatbuffers import flexbuffers

    from pipeline_stage.engine.flatbuffer import _schema, dump_model, load_model

    schema = _schema()
    model = load_model(model_bytes)
    graph = model.subgraphs[0]
    scores = int(graph.outputs[0])  # [1, 10]

    def tensor(name: str, shape: list[int], ttype: int, data: bytes | None = None) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type = name, shape, ttype
        t.buffer = 0
        if data is not None:
            buf = schema.BufferT()
            buf.data = np.frombuffer(data, np.uint8)
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def code(builtin: int, custom: str | None = None) -> int:
        c = schema.OperatorCodeT()
        c.builtinCode = builtin
        c.deprecatedBuiltinCode = min(builtin, 127)
        c.customCode = custom
        c.version = 1
        model.operatorCodes.append(c)
        return len(model.operatorCodes) - 1

    f32, i32, i64 = schema.TensorType.FLOAT32, schema.TensorType.INT32, schema.TensorType.INT64
    shape = tensor("kv/shape", [4], i32, np.array([1, 1, 2, 5], np.int32).tobytes())
    key = tensor("kv/key", [1, 1, 2, 5], f32)
    position = tensor("kv/position", [1], i64, np.array([0], np.int64).tobytes())
    cache_k, cache_v = tensor("kv/cache_k", [1, 4, 2, 5], f32), tensor("kv/cache_v", [1, 4, 2, 5], f32)
    reshape = schema.OperatorT()
    reshape.opcodeIndex, reshape.inputs, reshape.outputs = code(schema.BuiltinOperator.RESHAPE), [scores, shape], [key]
    cache = schema.OperatorT()
    cache.opcodeIndex = code(schema.BuiltinOperator.CUSTOM, "odml.update_kv_cache")
    cache.inputs, cache.outputs = [position, key, key], [cache_k, cache_v]
    cache.customOptions = list(flexbuffers.Dumps({"kv_cache_max": 4, "num_layers": 1, "layer_index": 0}))
    cache.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
    graph.operators += [reshape, cache]
    graph.outputs = [*graph.outputs, cache_k]
    sig = model.signatureDefs[0]
    entry = schema.TensorMapT()
    entry.name, entry.tensorIndex = "cache", cache_k
    sig.outputs = [*sig.outputs, entry]
    return dump_model(model)


def main() -> None:
    import keras
    import tensorflow as tf

    files = {
        # float16 weights behind DEQUANTIZE, no SignatureDef, fixed batch 1, PReLU and hard-swish, two heads
        "vision_f16_nosig.tflite": without_signature(convert(tf, vision_model(keras, ("scores", "boxes"), 1), float16=True)),
        # sparse float16 weights behind DENSIFY and DEQUANTIZE (a pruned model, exported with the sparsity optimization)
        "vision_f16_sparse.tflite": None,
        # float32 written by an older converter: op codes in deprecated_builtin_code, no SignatureDef
        "vision_old_schema.tflite": older_op_codes(without_signature(convert(tf, vision_model(keras, ("scores",), 3)))),
        # three outputs on one trunk, with a SignatureDef
        "vision_three_heads.tflite": convert(tf, vision_model(keras, ("scores", "boxes", "landmarks"), 4)),
        # TFLite metadata (name, description, label file) and labels.txt zipped onto the flatbuffer
        "vision_metadata.tflite": with_metadata(convert(tf, vision_model(keras, ("scores",), 5)), [str(d) for d in range(10)]),
        # a custom op the plain interpreter cannot run
        "vision_custom_op.tflite": with_custom_op(convert(tf, vision_model(keras, ("scores",), 6))),
    }
    pruned = vision_model(keras, ("scores", "boxes"), 2, hidden=128)
    prune(pruned)
    files["vision_f16_sparse.tflite"] = convert(tf, pruned, float16=True, sparse=True)
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    sizes = {name: len(data) for name, data in files.items()}
    (HERE / "sizes.json").write_text(json.dumps(sizes, indent=2) + "\n")
    print(json.dumps(sizes, indent=2), sum(sizes.values()))


if __name__ == "__main__":
    main()
