"""Accelerator compilers: what compiles a portable ``.tflite`` ahead of time for one accelerator
target (a vendor's SoC), each a class a plugin registers.

A manifest's ``compile: {targets: [<compiler>/<soc>, ...]}`` names them. After the chain (and the
search) settle the portable model, the stage hands each target's compiler the model's bytes: the
compiler says which ops its target takes (:meth:`AcceleratorCompiler.compile` returns a
:class:`Partition` with the compiled bytes) and, where this machine can execute the compiled model
(:meth:`AcceleratorCompiler.runner`), the stage evaluates it like any candidate: the same metrics
and gates on the same data. The compiled files are registered beside the portable model in the
same version, their sha256 recorded. The built-in compilers (LiteRT's vendor compiler plugins:
``intel_openvino``, ``qualcomm``, ``mediatek``, ``google_tensor``) are registered by
the ``compile_litert`` plugin with the same API. Nothing here imports TensorFlow or LiteRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.plugin_class import PluginClass
from pipeline_stage.contract.steps import Params


@dataclass(frozen=True)
class Partition:
    """What a target's compiler takes of a model: ops offloaded to the accelerator out of all ops
    (of the main subgraph), in how many partitions, and the ops left on the CPU by op name."""

    ops: int
    offloaded: int
    partitions: int
    on_cpu: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """Ops offloaded over all ops, 0..1 (1.0: the accelerator takes the whole model)."""
        return round(self.offloaded / self.ops, 4) if self.ops else 0.0

    def record(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "offloaded": self.offloaded,
            "share": self.share,
            "partitions": self.partitions,
            "on_cpu": dict(self.on_cpu),
        }


@dataclass(frozen=True)
class Compiled:
    """A compiled model: its bytes, what the compiler took, what the file says it is for (its
    stamp: manufacturer and SoC, read back from the file), and the compiler SDK that made it."""

    model_bytes: bytes
    partition: Partition
    stamp: dict[str, str]
    sdk: str


class CompileRejected(Exception):
    """The target's compiler refused this model (an op or shape it cannot take): that target's
    failure, shown in the report; the other targets and the portable model go on."""


class AcceleratorCompiler(PluginClass):
    """Base class of an accelerator compiler; plugins subclass it and register the subclass.

    Subclasses set ``name`` (what ``compile.targets`` names before the slash; unique), ``socs`` (the
    SoC models it compiles for), ``sdk`` (what it needs installed, as a user would ask for it) and
    ``install_hint`` (how an install or an image gets it), optionally ``Params`` (per-target
    options, from ``{target: <name>/<soc>, options: {...}}``), and implement :meth:`unavailable`,
    :meth:`partition` and :meth:`compile`; :meth:`runner` where this machine can run what it makes.
    """

    name: ClassVar[str] = ""
    socs: ClassVar[tuple[str, ...]] = ()
    sdk: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def unavailable(self, soc: str, options: Params) -> str | None:
        """Why this target cannot be compiled on this machine (its compiler or SDK is missing), or
        None when it can. Called before any work: the stage refuses the run (exit 2) on a reason."""
        return None

    def refuse(self, soc: str, reason: str) -> InputError:
        """The error for a target whose compiler is missing: what is missing and how to get it."""
        return InputError(
            f"compile target `{self.name}/{soc}` cannot be compiled here: {reason} (needs {self.sdk})",
            hint=self.install_hint,
        )

    def partition(self, model_bytes: bytes, soc: str) -> Partition:
        """Which ops of the model the target takes, without compiling them. Raise
        :class:`~pipeline_stage.contract.errors.InputError` when the compiler cannot run here."""
        raise NotImplementedError

    def compile(self, model_bytes: bytes, soc: str, options: Params) -> Compiled:
        """The model compiled for `soc`. Raise :class:`CompileRejected` when the compiler refuses
        this model (the message says why); the stage reports it as that target's failure."""
        raise NotImplementedError

    def runner(self, compiled: Compiled, soc: str, options: Params) -> "Callable[[Any], dict] | None":
        """A function running the compiled model on one batch of inputs (an array, or arrays by
        input name) and returning its outputs by name, where this machine can execute it; None
        where it cannot (the report then says "not evaluated here", never that it passed)."""
        return None
