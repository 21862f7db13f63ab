"""A `.tflite` as exporters and vendors ship it, made readable for quantization engines, exactly.

Files in the wild differ from what today's converter writes: no SignatureDef (older converters,
TF1 exports), operator codes in ``deprecated_builtin_code`` with ``builtin_code`` 0 (readers must
take the larger), weights stored as float16 or sparse constants behind DEQUANTIZE / DENSIFY ops,
int8 weights of an already weight-quantized model, TFLite metadata and associated files (a zip
appended to the flatbuffer). :func:`engine_ready` rewrites such a file into the float model an
engine can quantize (same outputs, bit for bit: the constants are the values the interpreter
itself computes from them); :func:`carry_over` puts the metadata and associated files back into
whatever the engine made of it. The file as shipped stays the baseline.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field

import numpy as np

from pipeline_stage.engine.flatbuffer import _schema, dump_model, load_model, op_code_name, read, text
from pipeline_stage.engine.litert_runtime import make_interpreter

SIGNATURE_KEY = "serving_default"
# ops whose output a constant input fully decides: folded into a float constant
CONSTANT_OPS = ("DEQUANTIZE", "DENSIFY")
# metadata the runtime writes for the model it describes: never carried into another model
RUNTIME_METADATA = ("min_runtime_version", "CONVERSION_METADATA")


@dataclass
class Prepared:
    """The engine-ready float model and what was done to get it (for the report)."""

    model_bytes: bytes
    notes: list[str] = field(default_factory=list)


def quantization_state(model_bytes: bytes) -> str:
    """``float``, ``weights`` (integer weights, float activations: dynamic-range or weight-only
    quantization) or ``integer`` (integer activations: a fully quantized model)."""
    info = read(model_bytes)
    if any(d in ("INT8", "UINT8", "INT16") for d in info.activation_dtypes()):
        return "integer"
    return "weights" if any(d in ("INT8", "UINT8", "INT4") for d in info.constant_dtypes()) else "float"


def engine_ready(model_bytes: bytes, signature: str | None = None) -> Prepared:
    """The float model an engine can read, from a file as shipped (see the module docstring).

    :param signature: which SignatureDef is the model, for a file with several (None: the first).
    """
    model = load_model(model_bytes)
    notes: list[str] = []
    older = sum(1 for code in model.operatorCodes or [] if code.deprecatedBuiltinCode > code.builtinCode)
    for code in model.operatorCodes or []:
        code.builtinCode = max(code.builtinCode, code.deprecatedBuiltinCode)
    if older:
        notes.append(f"{older} operator code(s) written the older way (deprecated_builtin_code) normalized")
    folded = _fold_constants(model, model_bytes)
    if folded:
        what = ", ".join(f"{n} {op}" for op, n in sorted(folded.items()))
        notes.append(f"weights stored behind {what} op(s) rewritten as the float32 constants they compute")
    dequantized = _dequantize_weights(model)
    if dequantized:
        notes.append(f"{dequantized} int8 weight tensor(s) of an already weight-quantized model recovered as float32")
    if folded or dequantized:
        _drop_unused(model)
    if not model.signatureDefs:
        model.signatureDefs = [_signature_of(model)]
        notes.append(f"no SignatureDef: `{SIGNATURE_KEY}` added for the engines (inputs and outputs by tensor name)")
    elif signature is not None:
        keep = [s for s in model.signatureDefs if text(s.signatureKey) == signature]
        model.signatureDefs = keep or model.signatureDefs
    return Prepared(dump_model(model) if notes else bytes(model_bytes), notes)


def _signature_of(model):
    """A SignatureDef for subgraph 0's inputs and outputs, named after their tensors."""
    schema = _schema()
    graph = model.subgraphs[0]

    def tensor_map(index):
        entry = schema.TensorMapT()
        entry.name = text(graph.tensors[index].name) or f"tensor_{index}"
        entry.tensorIndex = int(index)
        return entry

    sig = schema.SignatureDefT()
    sig.signatureKey = SIGNATURE_KEY
    sig.subgraphIndex = 0
    sig.inputs = [tensor_map(i) for i in graph.inputs]
    sig.outputs = [tensor_map(i) for i in graph.outputs]
    return sig


def _constant(model, graph, index: int) -> bool:
    buffer = model.buffers[graph.tensors[index].buffer] if graph.tensors[index].buffer < len(model.buffers) else None
    return buffer is not None and buffer.data is not None and len(buffer.data) > 0


def _fold_constants(model, model_bytes: bytes) -> dict[str, int]:
    """Replace every DEQUANTIZE / DENSIFY whose inputs are constants (or such ops' outputs) by a
    float constant holding its output, as the interpreter computes it (no delegate: XNNPACK would
    fuse the op into its consumer and never write the tensor)."""
    graph = model.subgraphs[0]
    codes = [op_code_name(c) for c in model.operatorCodes or []]
    foldable: list[int] = []
    produced: set[int] = set()
    changed = True
    while changed:
        changed = False
        for k, op in enumerate(graph.operators or []):
            if k in foldable or codes[op.opcodeIndex] not in CONSTANT_OPS:
                continue
            if all(int(i) in produced or _constant(model, graph, int(i)) for i in op.inputs if i >= 0):
                foldable.append(k)
                produced.update(int(o) for o in op.outputs)
                changed = True
    if not foldable:
        return {}
    interpreter = make_interpreter(model_bytes, xnnpack=False, preserve_all_tensors=True)
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():  # the folded values do not depend on the inputs
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interpreter.invoke()
    schema = _schema()
    counts: dict[str, int] = {}
    for k in foldable:
        op = graph.operators[k]
        counts[codes[op.opcodeIndex]] = counts.get(codes[op.opcodeIndex], 0) + 1
        out = int(op.outputs[0])
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(np.ascontiguousarray(interpreter.get_tensor(out)).tobytes(), np.uint8)
        model.buffers.append(buffer)
        graph.tensors[out].buffer = len(model.buffers) - 1
    graph.operators = [op for k, op in enumerate(graph.operators) if k not in set(foldable)]
    return counts


def _dequantize_weights(model) -> int:
    """Int8 weight constants that float ops read directly (dynamic-range "hybrid" ops) as float32
    constants holding their dequantized values (scale per tensor or per channel)."""
    schema = _schema()
    graph = model.subgraphs[0]
    float32 = schema.TensorType.FLOAT32
    consumers: dict[int, list] = {}
    for op in graph.operators or []:
        for i in op.inputs:
            consumers.setdefault(int(i), []).append(op)
    count = 0
    for index, tensor in enumerate(graph.tensors):
        q = tensor.quantization
        if tensor.type != schema.TensorType.INT8 or not _constant(model, graph, index) or q is None or q.scale is None:
            continue
        readers = consumers.get(index, [])
        if not readers or not all(graph.tensors[int(o)].type == float32 for op in readers for o in op.outputs):
            continue
        values = np.frombuffer(bytes(model.buffers[tensor.buffer].data), np.int8).reshape(tuple(tensor.shape))
        scale = np.asarray(q.scale, np.float32)
        zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0] * len(scale), np.float32)
        if len(scale) > 1:
            shape = [1] * values.ndim
            shape[q.quantizedDimension] = len(scale)
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        dense = ((values.astype(np.float32) - zero) * scale).astype(np.float32)
        model.buffers[tensor.buffer].data = np.frombuffer(dense.tobytes(), np.uint8)
        tensor.type, tensor.quantization = float32, None
        count += 1
    return count


def _drop_unused(model) -> None:
    """Remove subgraph 0's tensors no op, input, output or signature uses any more, and the buffers
    no tensor or metadata entry uses (the float16 / sparse constants a fold replaced)."""
    graph = model.subgraphs[0]
    used = {int(i) for i in graph.inputs} | {int(i) for i in graph.outputs}
    for op in graph.operators or []:
        used |= {int(i) for i in op.inputs if i >= 0} | {int(i) for i in op.outputs}
        used |= {int(i) for i in (op.intermediates if op.intermediates is not None else [])}
    signatures = [s for s in model.signatureDefs or [] if s.subgraphIndex == 0]
    for sig in signatures:
        used |= {m.tensorIndex for m in [*(sig.inputs or []), *(sig.outputs or [])]}
    keep = sorted(used)
    new = {old: k for k, old in enumerate(keep)}
    graph.tensors = [graph.tensors[i] for i in keep]
    graph.inputs = [new[int(i)] for i in graph.inputs]
    graph.outputs = [new[int(i)] for i in graph.outputs]
    for op in graph.operators or []:
        op.inputs = [new[int(i)] if i >= 0 else -1 for i in op.inputs]
        op.outputs = [new[int(i)] for i in op.outputs]
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = [new[int(i)] for i in op.intermediates]
    for sig in signatures:
        for entry in [*(sig.inputs or []), *(sig.outputs or [])]:
            entry.tensorIndex = new[entry.tensorIndex]
    kept_buffers = sorted({0} | {t.buffer for g in model.subgraphs for t in g.tensors} | {m.buffer for m in model.metadata or []})
    moved = {old: k for k, old in enumerate(kept_buffers)}
    model.buffers = [model.buffers[i] for i in kept_buffers]
    for g in model.subgraphs:
        for t in g.tensors:
            t.buffer = moved[t.buffer]
    for entry in model.metadata or []:
        entry.buffer = moved[entry.buffer]


def associated_files(model_bytes: bytes) -> dict[str, bytes]:
    """The associated files (label maps, vocabularies) zipped onto the flatbuffer, by name."""
    try:
        with zipfile.ZipFile(io.BytesIO(model_bytes)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except zipfile.BadZipFile:
        return {}


def carry_over(shipped: bytes, converted: bytes) -> tuple[bytes, list[str]]:
    """`converted` (what an engine or the chain made of the file as shipped) with the shipped
    file's metadata entries it lacks (TFLite metadata: normalization, labels) and its associated
    files zipped onto it again; and what was carried, in words."""
    before, after = read(shipped).metadata, read(converted).metadata
    missing = {k: v for k, v in before.items() if k not in after and k not in RUNTIME_METADATA}
    out = converted
    if missing:
        from pipeline_stage.engine.flatbuffer import add_metadata

        for name, data in missing.items():
            out = add_metadata(out, name, data)
    files = associated_files(shipped)
    if files and not associated_files(out):
        buffer = io.BytesIO(out)
        buffer.seek(0, io.SEEK_END)
        with zipfile.ZipFile(buffer, "a") as archive:  # appended: the flatbuffer stays a valid prefix
            for name, data in files.items():
                archive.writestr(name, data)
        out = buffer.getvalue()
    notes = []
    if missing:
        notes.append(f"metadata carried over from the file as shipped: {', '.join(sorted(missing))}")
    if files:
        notes.append(f"associated files carried over: {', '.join(sorted(files))}")
    return out, notes
