"""Float edges on an integer model: a QUANTIZE op after each integer input, a DEQUANTIZE before
each integer output, so the model takes and gives float tensors as a float model does (what the
converter and the LiteRT Quantizer give with float I/O; engines that leave integer edges use it)."""

from __future__ import annotations

from pipeline_stage.engine.flatbuffer import _schema, dump_model, load_model

INTEGER = ("INT8", "UINT8", "INT16")


def float_edges(model_bytes: bytes) -> bytes:
    """`model_bytes` with float32 inputs and outputs where they were integer (subgraph 0; its
    signatures follow the new tensors). A model without integer edges comes back unchanged."""
    schema = _schema()
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = load_model(model_bytes)
    graph = model.subgraphs[0]
    integer = lambda i: names.get(graph.tensors[i].type) in INTEGER  # noqa: E731
    inputs = [int(i) for i in graph.inputs if integer(int(i))]
    outputs = [int(i) for i in graph.outputs if integer(int(i))]
    if not inputs and not outputs:
        return bytes(model_bytes)

    def opcode(builtin: int) -> int:
        for k, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and not code.customCode:
                return k
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def float_twin(index: int, suffix: str) -> int:
        old = graph.tensors[index]
        twin = schema.TensorT()
        twin.name = (old.name.decode() if isinstance(old.name, bytes) else str(old.name)) + suffix
        twin.shape, twin.shapeSignature, twin.type, twin.buffer = old.shape, old.shapeSignature, schema.TensorType.FLOAT32, 0
        graph.tensors.append(twin)
        return len(graph.tensors) - 1

    moved: dict[int, int] = {}
    added = []
    for index in inputs:
        twin = float_twin(index, "/float")
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.QUANTIZE), [twin], [index]
        added.append(op)
        moved[index] = twin
    graph.operators = added + list(graph.operators)
    for index in outputs:
        twin = float_twin(index, "/float")
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.DEQUANTIZE), [index], [twin]
        graph.operators.append(op)
        moved[index] = twin
    graph.inputs = [moved.get(int(i), int(i)) for i in graph.inputs]
    graph.outputs = [moved.get(int(i), int(i)) for i in graph.outputs]
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == 0:
            for entry in [*(sig.inputs or []), *(sig.outputs or [])]:
                entry.tensorIndex = moved.get(entry.tensorIndex, entry.tensorIndex)
    return dump_model(model)
