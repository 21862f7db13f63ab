"""Read a .tflite flatbuffer: op codes, tensor types, weights and metadata (no TensorFlow needed)."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def _enum_names(enum_cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def text(value: Any) -> str:
    """A flatbuffer string field as str (the object API gives bytes; an absent one is "")."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _schema():
    """LiteRT's generated flatbuffer schema (a large module: imported once, as heavy_imports says)."""
    from pipeline_stage.engine.heavy_imports import import_heavy

    return import_heavy("ai_edge_litert.schema_py_generated")


@functools.lru_cache(maxsize=1)
def _builtin_names() -> dict[int, str]:
    schema = _schema()

    return _enum_names(schema.BuiltinOperator)


def op_code_name(op_code: Any) -> str:
    """`CONV_2D`, or `CUSTOM:<code>` for custom and TF Select ops, for an OperatorCodeT."""
    code = max(op_code.builtinCode, op_code.deprecatedBuiltinCode)
    name = _builtin_names().get(code, str(code))
    return f"CUSTOM:{text(op_code.customCode)}" if name == "CUSTOM" and op_code.customCode else name


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    is_constant: bool  # backed by a buffer with data: a weight / bias
    quant_bytes: int = 0  # quantization parameters stored with it: float32 scales + int64 zero points (+ min/max)
    scales: int = 0  # how many quantization scales: 1 per tensor, or one per channel
    block_size: int = 0  # blockwise quantization (LiteRT Quantizer int4): weights per scale; 0 otherwise


@dataclass(frozen=True)
class NodeInfo:
    op: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class ModelInfo:
    ops: Counter  # builtin (or custom) op name -> count, over all subgraphs
    tensors: list[TensorInfo]
    metadata: dict[str, bytes]
    signatures: list[str]
    nodes: list[NodeInfo]
    # the first subgraph's ops (the main graph; an accelerator compiler's partitions are further subgraphs)
    main_ops: Counter = field(default_factory=Counter)

    def constant_dtypes(self) -> Counter:
        return Counter(t.dtype for t in self.tensors if t.is_constant)

    def activation_dtypes(self) -> Counter:
        return Counter(t.dtype for t in self.tensors if not t.is_constant)

    def quantization_param_bytes(self) -> int:
        """Bytes of quantization parameters (scales, zero points) stored with the tensors."""
        return sum(t.quant_bytes for t in self.tensors)

    def tensor_name_bytes(self) -> int:
        return sum(len(t.name.encode()) for t in self.tensors)

    def summary(self) -> dict[str, Any]:
        return {
            "ops": dict(sorted(self.ops.items())),
            "weight_dtypes": dict(sorted(self.constant_dtypes().items())),
            "activation_dtypes": dict(sorted(self.activation_dtypes().items())),
            "metadata": sorted(self.metadata),
            "signatures": self.signatures,
        }


def read(model_bytes: bytes) -> ModelInfo:
    """Parse the flatbuffer with LiteRT's generated schema."""
    schema = _schema()

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    type_names = _enum_names(schema.TensorType)
    codes = [op_code_name(oc) for oc in model.operatorCodes or []]
    ops: Counter = Counter()
    tensors: list[TensorInfo] = []
    buffers = model.buffers or []

    def has_data(index: int) -> bool:
        if not 0 < index < len(buffers):
            return False
        buf = buffers[index]
        return (buf.data is not None and len(buf.data) > 0) or bool(getattr(buf, "size", 0))

    nodes: list[NodeInfo] = []
    main_ops: Counter = Counter()
    for index, sg in enumerate(model.subgraphs or []):
        local = []
        for t in sg.tensors or []:
            name = text(t.name)
            signature = t.shapeSignature if t.shapeSignature is not None and len(t.shapeSignature) else t.shape
            shape = tuple(int(d) for d in (signature if signature is not None else ()))
            q = t.quantization
            quant = (
                0
                if q is None
                else sum(
                    8 * len(v) if k == "zeroPoint" else 4 * len(v)
                    for k, v in (("scale", q.scale), ("zeroPoint", q.zeroPoint), ("min", q.min), ("max", q.max))
                    if v is not None
                )
            )
            scales = 0 if q is None or q.scale is None else len(q.scale)
            block = int(getattr(q.details, "blockSize", 0) or 0) if q is not None and q.details is not None else 0
            local.append(TensorInfo(name, type_names.get(t.type, str(t.type)), shape, has_data(t.buffer), quant, scales, block))
        tensors.extend(local)
        for op in sg.operators or []:
            ops[codes[op.opcodeIndex]] += 1
            if index == 0:
                main_ops[codes[op.opcodeIndex]] += 1
            ins = tuple(local[i] for i in (op.inputs if op.inputs is not None else ()) if i >= 0)
            outs = tuple(local[i] for i in (op.outputs if op.outputs is not None else ()) if i >= 0)
            nodes.append(NodeInfo(codes[op.opcodeIndex], ins, outs))
    metadata = {}
    for md in model.metadata or []:
        key = text(md.name)
        buf = buffers[md.buffer] if 0 <= md.buffer < len(buffers) else None
        metadata[key] = bytes(buf.data) if buf is not None and buf.data is not None else b""
    sigs = [text(sd.signatureKey) for sd in model.signatureDefs or []]
    return ModelInfo(ops=ops, tensors=tensors, metadata=metadata, signatures=sigs, nodes=nodes, main_ops=main_ops)


def load_model(model_bytes: bytes):
    """The flatbuffer as LiteRT's object API (ModelT), for steps that rewrite it.

    Buffers stored after the flatbuffer (offset/size: the LiteRT Quantizer writes them so once the
    weights pass 256 KB) are read in, so dump_model writes a complete file again."""
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))


def dump_model(model) -> bytes:
    """Serialize a ModelT from load_model (buffers inline)."""
    from ai_edge_litert.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def add_metadata(model_bytes: bytes, name: str, data: bytes) -> bytes:
    """Return the model with a metadata entry `name` holding `data` (replacing one of that name)."""
    import numpy as np

    schema = _schema()

    model = load_model(model_bytes)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    kept = [m for m in (model.metadata or []) if text(m.name) != name]
    model.metadata = kept + [entry]
    return dump_model(model)


def output_branches(model_bytes: bytes) -> dict[str, list[str]]:
    """For each output of the model's first signature, the nodes (by output tensor name, the names
    TF's quantization debugger denylists) that feed that output and no other one: the branch that
    keeping one output in float must keep in float. A single-output model's branch is every node."""
    schema = _schema()

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    signature = (model.signatureDefs or [None])[0]
    graph = model.subgraphs[signature.subgraphIndex if signature is not None else 0]
    if signature is not None:
        outputs = {text(m.name): m.tensorIndex for m in signature.outputs or []}
    else:
        outputs = {text(graph.tensors[i].name): int(i) for i in graph.outputs}
    operators = graph.operators or []
    producer = {int(t): k for k, op in enumerate(operators) for t in (op.outputs if op.outputs is not None else ())}

    def feeding(tensor: int) -> set[int]:
        seen: set[int] = set()
        stack = [tensor]
        while stack:
            k = producer.get(stack.pop())
            if k is None or k in seen:
                continue
            seen.add(k)
            stack.extend(int(t) for t in (operators[k].inputs if operators[k].inputs is not None else ()) if t >= 0)
        return seen

    ancestors = {name: feeding(index) for name, index in outputs.items()}
    branches = {}
    for name, ops in ancestors.items():
        shared = set().union(*(other for o, other in ancestors.items() if o != name))
        branches[name] = [text(graph.tensors[t].name) for k in sorted(ops - shared) for t in operators[k].outputs]
    return branches


def branch_nodes(model_bytes: bytes, outputs: list[str]) -> list[str]:
    """The nodes of `outputs`' branches (see output_branches), for `quantize.keep_float_outputs`."""
    from pipeline_stage.contract.errors import InputError

    branches = output_branches(model_bytes)
    unknown = [o for o in outputs if o not in branches]
    if unknown:
        raise InputError(
            f"quantize.keep_float_outputs names {', '.join(f'`{o}`' for o in unknown)}, not an output of the model",
            hint=f"the model's outputs: {', '.join(branches)}",
        )
    return [node for o in outputs for node in branches[o]]
