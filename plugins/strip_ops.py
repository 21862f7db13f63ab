"""Built-in step `strip_ops` (selective execution): keep only the outputs and signatures the
manifest names, drop what the runtime never reads, and write the operator list (`ops.json`) a
selective LiteRT build registers instead of every builtin kernel."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from pipeline_stage import (
    InputError,
    Params,
    Phase,
    Step,
    dump_flatbuffer,
    flatbuffer_text,
    hookimpl,
    load_flatbuffer,
    op_code_name,
)

DEBUG_METADATA = ("CONVERSION_METADATA",)


class StripParams(Params):
    outputs: list[str] | None = Field(
        None,
        description="Signature outputs to keep (e.g. [probabilities]); the ops "
        "and weights that only fed the others are removed. Default: all.",
    )
    signatures: list[str] | None = Field(None, description="Signatures to keep (default: all).")
    drop_metadata: list[str] = Field(
        default_factory=lambda: list(DEBUG_METADATA), description="Metadata entries to remove (conversion metadata by default)."
    )
    drop_names: bool = Field(
        False,
        description=(
            "Clear tensor and subgraph names and the model description (LiteRT's strip_strings, but the "
            "signatures stay: they carry their own input/output names, so signature runners keep working). "
            "Saves about 5% of an int8 MobileNetV2; tools that show tensor names then show none."
        ),
    )


class StripOps(Step):
    """Keep only the named outputs and signatures, drop debug metadata, write ops.json."""

    name = "strip_ops"
    phase = Phase.TFLITE
    Params = StripParams

    def apply(self, model_bytes, ctx):
        import numpy as np

        p = self.params
        model = load_flatbuffer(model_bytes)
        sigs = model.signatureDefs or []
        known_sigs = [flatbuffer_text(s.signatureKey) for s in sigs]
        if p.signatures is not None:
            missing = sorted(set(p.signatures) - set(known_sigs))
            if missing:
                raise InputError(f"strip_ops: no signature {missing} in the model (it has {known_sigs})")
            sigs = [s for s in sigs if flatbuffer_text(s.signatureKey) in p.signatures]
            model.signatureDefs = sigs
        removed_outputs: list[str] = []
        if p.outputs is not None:
            if len(sigs) != 1:
                raise InputError(
                    f"strip_ops: `outputs` needs exactly one signature, the model has {len(sigs)}",
                    hint="pick one with `signatures: [serving_default]`",
                )
            sig = sigs[0]
            names = [flatbuffer_text(o.name) for o in sig.outputs]
            missing = sorted(set(p.outputs) - set(names))
            if missing:
                raise InputError(
                    f"strip_ops: no output {missing} in signature `{flatbuffer_text(sig.signatureKey)}` (outputs: {names})"
                )
            removed_outputs = [n for n in names if n not in p.outputs]
            sig.outputs = [o for o in sig.outputs if flatbuffer_text(o.name) in p.outputs]
            graph = model.subgraphs[sig.subgraphIndex]
            graph.outputs = np.array([o.tensorIndex for o in sig.outputs], dtype=np.int32)
            self._prune(graph)
        dropped_metadata = [flatbuffer_text(m.name) for m in (model.metadata or []) if flatbuffer_text(m.name) in p.drop_metadata]
        model.metadata = [m for m in (model.metadata or []) if flatbuffer_text(m.name) not in p.drop_metadata]
        self._clear_unused_buffers(model)
        names_bytes = 0
        if p.drop_names:
            names_bytes = self._drop_names(model)
        out = dump_flatbuffer(model)

        # what the remaining operators use: (name, version) is what a selective build registers
        used = {
            (op_code_name(model.operatorCodes[o.opcodeIndex]), int(model.operatorCodes[o.opcodeIndex].version))
            for g in model.subgraphs
            for o in (g.operators or [])
        }
        ops = {
            "builtin_ops": [{"op": op, "version": v} for op, v in sorted(used) if not op.startswith("CUSTOM")],
            "custom_ops": sorted(op.split(":", 1)[1] for op, _ in used if op.startswith("CUSTOM:")),
        }
        path = Path(ctx.workdir) / "ops.json"
        path.write_text(json.dumps(ops, indent=2))
        ctx.artifacts["ops.json"] = path
        ctx.notes.update(
            {
                "ops": ops,
                "removed_outputs": removed_outputs,
                "dropped_metadata": dropped_metadata,
                "dropped_name_bytes": names_bytes,
                "bytes_before": len(model_bytes),
                "bytes_after": len(out),
                "bytes_saved": len(model_bytes) - len(out),
            }
        )
        return out

    @staticmethod
    def _drop_names(model) -> int:
        """What flatbuffer_utils.strip_strings clears, less the signatures; returns the name bytes."""
        dropped = len(model.description or b"")
        model.description = None
        for graph in model.subgraphs:
            dropped += len(graph.name or b"")
            graph.name = None
            for tensor in graph.tensors or []:
                dropped += len(tensor.name or b"")
                tensor.name = None
        return dropped

    @staticmethod
    def _prune(graph) -> None:
        """Remove operators that no kept output depends on."""
        needed = set(int(i) for i in graph.outputs)
        kept = []
        for op in reversed(graph.operators or []):
            outs = [int(i) for i in (op.outputs if op.outputs is not None else [])]
            if any(o in needed for o in outs):
                kept.append(op)
                needed.update(int(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0)
        graph.operators = list(reversed(kept))

    @staticmethod
    def _clear_unused_buffers(model) -> None:
        """Empty the buffers no remaining operator, input or output reads (their bytes are the saving)."""
        used_tensors = {}
        for g_index, g in enumerate(model.subgraphs):
            ids = set(int(i) for i in (g.inputs if g.inputs is not None else []))
            ids |= set(int(i) for i in (g.outputs if g.outputs is not None else []))
            for op in g.operators or []:
                ids |= {int(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0}
                ids |= {int(i) for i in (op.outputs if op.outputs is not None else [])}
            used_tensors[g_index] = ids
        used_buffers = {0}
        for g_index, g in enumerate(model.subgraphs):
            for t_index, t in enumerate(g.tensors or []):
                if t_index in used_tensors[g_index]:
                    used_buffers.add(t.buffer)
        used_buffers |= {m.buffer for m in (model.metadata or [])}
        for b_index, buf in enumerate(model.buffers or []):
            if b_index not in used_buffers and buf.data is not None:
                buf.data = None


@hookimpl
def register_steps(register):
    register(StripOps)
