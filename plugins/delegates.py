"""Built-in step `delegates` and metrics `delegate_coverage.<target>` and
`npu_ops_offloaded.<compiler>_<soc>`: which hardware delegates and NPUs would take the model, a
measured XNNPACK benchmark, and the plan embedded in the .tflite.

NPU coverage (`npu: [<compiler>/<soc>]`) comes from the vendor's own compiler plugin (LiteRT's,
through the `compile_litert` compilers): it partitions the model and says which ops it takes. Where
the vendor's plugin does not load (its SDK is not installed), the int8 NPU op-set table stands in,
labelled as such in the plan and the report. Delegate coverage (`targets`) comes from op-set rules:
the builtin ops (and tensor types) each delegate documents as supported. They say what a delegate
can take, not how fast a given phone runs it. TensorFlow's GPU analyzer
(`tf.lite.experimental.Analyzer`, `gpu_compatibility=True`) is not used: in the TF 2.21 / LiteRT 2.3
builds here it reports every model compatible, TF Select ops included.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from typing import Callable, Literal

import numpy as np
from pydantic import Field, field_validator

from pipeline_stage import (
    CompileRejected,
    InputError,
    Metric,
    Params,
    Phase,
    Step,
    TFLiteModel,
    add_metadata,
    hookimpl,
    read_flatbuffer,
)
from pipeline_stage_plugins.compile_litert import COMPILERS

PLAN_METADATA = "pipeline_stage.delegate_plan"

# The op-set tables stay dense, as in the delegates' docs they are checked against.
# fmt: off
_COMMON = {"ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "LOGISTIC",
           "MAX_POOL_2D", "MEAN", "MUL", "PAD", "RELU", "RELU6", "RESHAPE", "RESIZE_BILINEAR", "SOFTMAX", "SUB", "TANH"}
# XNNPACK (delegate README: float32, fp16 weights, and signed int8 operators)
XNNPACK = _COMMON | {"ABS", "BATCH_MATMUL", "CEIL", "DEQUANTIZE", "DIV", "ELU", "FLOOR", "HARD_SWISH", "LEAKY_RELU",
                     "MAXIMUM", "MINIMUM", "NEG", "PRELU", "QUANTIZE", "RESIZE_NEAREST_NEIGHBOR", "ROUND", "RSQRT",
                     "SLICE", "SPLIT", "SQRT", "SQUARE", "SQUARED_DIFFERENCE", "STRIDED_SLICE", "TRANSPOSE",
                     "TRANSPOSE_CONV", "GELU", "EXP", "LOG"}
# GPU delegate (OpenCL/OpenGL/Metal builtin op list); it dequantizes int8 weights itself
GPU = _COMMON | {"ABS", "BATCH_MATMUL", "CAST", "COS", "DEQUANTIZE", "DIV", "ELU", "EXP", "FLOOR", "FLOOR_DIV",
                 "HARD_SWISH", "LEAKY_RELU", "LOG", "MAXIMUM", "MINIMUM", "NEG", "POW", "PRELU", "QUANTIZE",
                 "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SIN", "SLICE", "SPLIT", "SPLIT_V", "SQRT", "SQUARE",
                 "SQUARED_DIFFERENCE", "STRIDED_SLICE", "TRANSPOSE", "TRANSPOSE_CONV", "SPACE_TO_DEPTH",
                 "DEPTH_TO_SPACE", "REDUCE_MAX", "REDUCE_MIN", "SUM"}
# NNAPI (Android NN API 1.2 operations mapped by the NNAPI delegate)
NNAPI = _COMMON | {"DEQUANTIZE", "QUANTIZE", "DIV", "STRIDED_SLICE", "TRANSPOSE", "SQUEEZE", "L2_NORMALIZATION",
                   "SPACE_TO_DEPTH", "DEPTH_TO_SPACE", "PRELU", "MAXIMUM", "MINIMUM", "HARD_SWISH", "ABS", "EXP",
                   "LOG", "RSQRT", "SQRT", "SLICE", "SPLIT", "TRANSPOSE_CONV", "LEAKY_RELU", "RESIZE_NEAREST_NEIGHBOR"}
# Edge TPU / NPU-style: int8-only operators, static shapes (Coral's supported-ops table)
EDGETPU = _COMMON | {"L2_NORMALIZATION", "PACK", "SPLIT", "SQUEEZE", "STRIDED_SLICE", "TRANSPOSE_CONV",
                     "RESIZE_NEAREST_NEIGHBOR", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE", "QUANTIZE", "DEQUANTIZE",
                     "HARD_SWISH", "PRELU", "LEAKY_RELU", "SLICE", "TRANSPOSE", "MAXIMUM", "MINIMUM"}
# fmt: on
RULES = {"xnnpack": XNNPACK, "gpu": GPU, "nnapi": NNAPI, "edgetpu": EDGETPU}
# int4 weights, per channel or blockwise (what the LiteRT Quantizer writes for weight_bits 4): the
# ops that take them. XNNPACK documents 4-bit fully-connected filters (its qc4w and qb4w kernels);
# a DEQUANTIZE of int4 weights (weight-only int4) and every other delegate here are int8 / float16
# at best, so those nodes stay on the CPU. From the delegates' docs, not measured on a device here.
INT4_OPS = {"xnnpack": {"FULLY_CONNECTED"}, "gpu": set(), "nnapi": set(), "edgetpu": set()}
INTEGER = {"INT8", "UINT8", "INT32"}  # int32 for biases and shape operands
Target = Literal["xnnpack", "gpu", "nnapi", "edgetpu"]


def _blocker(target: str, node) -> str | None:
    """Why `target` would not take this node, or None."""
    if node.op not in RULES[target]:
        return f"op {node.op} not supported"
    tensors = node.inputs + node.outputs
    if any(t.dtype == "INT4" or t.block_size for t in tensors):
        if node.op not in INT4_OPS[target]:
            blockwise = " (blockwise)" if any(t.block_size for t in tensors) else ""
            return f"op {node.op} with int4{blockwise} weights"
        tensors = tuple(t for t in tensors if t.dtype != "INT4")
    if any(t.dtype not in ("FLOAT32", "FLOAT16", "INT8", "UINT8", "INT32") for t in tensors):
        return f"op {node.op} on {sorted({t.dtype for t in tensors})} tensors"
    if target == "edgetpu":
        if any(not t.is_constant and t.dtype not in INTEGER for t in tensors) and node.op not in ("QUANTIZE", "DEQUANTIZE"):
            return f"op {node.op} on float tensors (the Edge TPU runs int8 only)"
        if any(-1 in t.shape for t in tensors if not t.is_constant):
            return f"op {node.op} with a dynamic dimension (the Edge TPU needs static shapes)"
    return None


def delegate_plan(model_bytes: bytes, targets: list[str]) -> dict:
    """Per target: coverage (nodes it would take / all nodes), and what stays on the CPU and why."""
    nodes = read_flatbuffer(model_bytes).nodes
    plan = {}
    for target in targets:
        reasons = Counter(r for r in (_blocker(target, n) for n in nodes) if r)
        left = sum(reasons.values())
        plan[target] = {
            "coverage": round((len(nodes) - left) / len(nodes), 4) if nodes else 0.0,
            "nodes": len(nodes),
            "on_cpu": left,
            "blockers": dict(reasons.most_common()),
        }
    return plan


def _compiler(target: str):
    """The LiteRT vendor compiler and SoC of `<compiler>/<soc>`; ValueError naming what exists."""
    vendor, _, soc = target.partition("/")
    if vendor not in COMPILERS:
        raise ValueError(f"`{target}`: unknown compiler `{vendor}`; LiteRT's are {', '.join(COMPILERS)}")
    compiler = COMPILERS[vendor]()
    if soc not in compiler.socs:
        raise ValueError(f"`{target}`: `{vendor}` knows SoCs {', '.join(compiler.socs)}")
    return compiler, soc


def npu_plan(model_bytes: bytes, targets: list[str]) -> dict:
    """Per NPU target: what its vendor's compiler plugin takes (ops offloaded, partitions, ops left
    on the CPU), or, where the plugin does not load, the int8 NPU op-set table's guess, labelled."""
    plan = {}
    fallback = functools.cache(lambda: delegate_plan(model_bytes, ["edgetpu"])["edgetpu"])
    for target in targets:
        compiler, soc = _compiler(target)
        try:
            part = compiler.partition(model_bytes, soc)
            plan[target] = {"from": f"{compiler.name}'s compiler plugin (LiteRT {_litert_version()})", **part.record()}
        except (InputError, CompileRejected) as exc:
            table = fallback()
            reason = exc.message if isinstance(exc, InputError) else str(exc)
            plan[target] = {
                "from": f"fallback: the int8 NPU op-set table (edgetpu rules), not the vendor's compiler ({reason})",
                "ops": table["nodes"],
                "offloaded": table["nodes"] - table["on_cpu"],
                "share": table["coverage"],
                "partitions": None,
                "on_cpu": table["blockers"],
            }
    return plan


def _litert_version() -> str:
    from importlib.metadata import version

    return version("ai-edge-litert")


def _p50(model_bytes: bytes, sample, xnnpack: bool, runs: int) -> float:
    """Median latency on the first real sample (an array, or arrays by input name)."""
    return float(np.percentile(TFLiteModel(model_bytes, threads=1, xnnpack=xnnpack).latencies_ms(sample, runs), 50))


class DelegatesParams(Params):
    targets: list[Target] = Field(
        default_factory=lambda: ["xnnpack", "gpu"],
        description="Delegates to plan for: xnnpack, gpu, nnapi, edgetpu (int8-only NPU rules).",
    )
    benchmark: bool = Field(True, description="Measure CPU latency with and without XNNPACK (1 thread, batch 1).")
    runs: int = Field(100, ge=5, le=100000, description="Invocations per benchmark side.")
    embed: bool = Field(True, description=f"Embed the plan in the .tflite as metadata `{PLAN_METADATA}`.")
    npu: list[str] = Field(
        default_factory=list,
        description="NPU targets `<compiler>/<soc>` (as `compile.targets` names them, e.g. `intel_openvino/LNL`): "
        "partitioned by the vendor's own compiler plugin where it loads (ops offloaded, partitions, ops left on the "
        "CPU), by the int8 NPU op-set table otherwise, labelled as such.",
    )
    digest_since = frozenset({"npu"})

    @field_validator("npu")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        for target in value:
            _compiler(target)
        return value


class Delegates(Step):
    """Plan hardware delegates: coverage per target, XNNPACK speedup, plan embedded and tagged."""

    name = "delegates"
    phase = Phase.TFLITE
    Params = DelegatesParams

    def apply(self, model_bytes, ctx):
        p = self.params
        plan = {"targets": delegate_plan(model_bytes, list(p.targets))}
        if p.npu:
            plan["npu"] = npu_plan(model_bytes, list(p.npu))
        if p.benchmark:
            sample = ctx.samples()  # a real input: the evaluation (or calibration) data
            without, with_x = _p50(model_bytes, sample, False, p.runs), _p50(model_bytes, sample, True, p.runs)
            plan["xnnpack_benchmark"] = {
                "p50_ms_without": round(without, 5),
                "p50_ms_with": round(with_x, 5),
                "speedup": round(without / with_x, 3) if with_x > 0 else None,
            }
        findings = []
        for target, info in plan["targets"].items():
            ctx.tags[f"delegate.{target}.coverage"] = f"{info['coverage']:.4g}"
            if info["on_cpu"]:
                findings.append(
                    f"{target}: {info['on_cpu']} of {info['nodes']} nodes stay on the CPU ("
                    + "; ".join(f"{r} x{n}" for r, n in info["blockers"].items())
                    + ")"
                )
        for target, info in plan.get("npu", {}).items():
            ctx.tags[f"npu.{target.replace('/', '_')}.ops_offloaded"] = f"{info['share']:.4g}"
            if info["on_cpu"]:
                left = "; ".join(f"{op} x{n}" for op, n in info["on_cpu"].items())
                findings.append(
                    f"{target}: {info['ops'] - info['offloaded']} of {info['ops']} ops stay on the CPU ({left}), per {info['from']}"
                )
        plan["findings"] = findings
        ctx.notes.update(plan)
        if p.embed:
            model_bytes = add_metadata(model_bytes, PLAN_METADATA, json.dumps(plan, sort_keys=True).encode())
        return model_bytes


def _share_metric(metric_name: str, doc: str, class_name: str, share: Callable[[bytes], float]) -> type[Metric]:
    """A metric of the .tflite itself: `share(model_bytes)`, a share 0..1, higher is better."""

    class Share(Metric):
        __doc__ = doc
        name = metric_name
        higher_is_better = True
        uses = "flatbuffer"
        runs_model = False

        def compute(self, evaluation) -> float:
            return float(share(evaluation.model_bytes))

    Share.__name__ = Share.__qualname__ = class_name
    return Share


def _coverage_metric(target: str) -> type[Metric]:
    return _share_metric(
        f"delegate_coverage.{target}",
        f"Share of the model's nodes the {target} delegate would take (op-set rules), 0..1.",
        f"DelegateCoverage_{target}",
        lambda model_bytes: delegate_plan(model_bytes, [target])[target]["coverage"],
    )


def _npu_metric(compiler, soc: str) -> type[Metric]:
    name = f"npu_ops_offloaded.{compiler.name}_{soc}"

    def offloaded(model_bytes: bytes) -> float:
        try:
            return compiler().partition(model_bytes, soc).share
        except CompileRejected as exc:
            raise InputError(
                f"metric `{name}`: {exc}", hint="gate on `delegate_coverage.edgetpu` where no NPU compiler takes the model"
            ) from None

    return _share_metric(
        name,
        f"Share of the model's ops {compiler.name}'s compiler plugin offloads to the {soc} NPU, 0..1 (the vendor's own partition).",
        f"NpuOpsOffloaded_{compiler.name}_{soc}",
        offloaded,
    )


@hookimpl
def register_steps(register):
    register(Delegates)


@hookimpl
def register_metrics(register):
    for target in RULES:
        register(_coverage_metric(target))
    for compiler in COMPILERS.values():
        for soc in compiler.socs:
            register(_npu_metric(compiler, soc))
