"""Built-in accelerator compilers: LiteRT's own vendor compiler plugins, as the ai-edge-litert wheel
ships them (``ai_edge_litert.aot``), one compiler per vendor: ``intel_openvino``, ``qualcomm``,
``mediatek``, ``google_tensor`` (the wheel's Samsung plugin has no SDK package to install it with). Their SoC models are the wheel's own target lists.

Partitioning runs the wheel's ``apply_plugin_main --cmd=partition`` (the vendor's plugin says which
ops it takes; no code is generated), compiling runs ``aot_compile``. A plugin loads only where its
vendor's SDK libraries are installed: Intel's needs OpenVINO (``pipeline-stage[intel]``), the others
their ``ai-edge-litert-sdk-<vendor>`` package, which fetches the SDK from the vendor at install time
(an image build can; docs/accelerators.md). What needs which, and what is checked where:
docs/accelerators.md.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field

from pipeline_stage import (
    AcceleratorCompiler,
    Compiled,
    CompileRejected,
    InputError,
    Params,
    Partition,
    hookimpl,
    read_flatbuffer,
)

DISPATCH = "CUSTOM:DISPATCH_OP"  # what a compiled partition becomes in the main graph
STAMP = "LiteRtStamp"  # metadata a compiled model carries: manufacturer and SoC, 125 bytes each
OPENVINO = "2026.3.1"  # the OpenVINO the wheel's Intel plugin links (libopenvino.so.2631)


def _litert_dir() -> Path:
    import ai_edge_litert

    return Path(ai_edge_litert.__file__).parent


def read_stamp(model_bytes: bytes) -> dict[str, str]:
    """What a compiled model says it is for: {"manufacturer", "soc"} from its LiteRtStamp, or {}."""
    raw = read_flatbuffer(model_bytes).metadata.get(STAMP, b"")
    if len(raw) < 250:
        return {}
    return {"manufacturer": raw[:125].split(b"\0")[0].decode(), "soc": raw[125:250].split(b"\0")[0].decode()}


def partition_of(source: bytes, partitioned: bytes) -> Partition:
    """Ops offloaded, partitions and ops left on the CPU, from the main graph before and after."""
    before, after = read_flatbuffer(source).main_ops, read_flatbuffer(partitioned).main_ops
    on_cpu = Counter({op: n for op, n in after.items() if op != DISPATCH})
    total = sum(before.values())
    return Partition(
        ops=total,
        offloaded=total - sum(on_cpu.values()),
        partitions=after.get(DISPATCH, 0),
        on_cpu=dict(on_cpu.most_common()),
    )


class _LiteRtVendor(AcceleratorCompiler):
    """A vendor's compiler plugin from the ai-edge-litert wheel."""

    folder = ""  # ai_edge_litert/vendors/<folder> and ai_edge_litert.aot.vendors.<folder>
    sdk_package = ""  # the ai-edge-litert-sdk-* module that brings the vendor's SDK libraries

    @classmethod
    def _target_module(cls):
        return importlib.import_module(f"ai_edge_litert.aot.vendors.{cls.folder}.target")

    @classmethod
    def manufacturer(cls) -> str:
        return next(iter(cls._target_module().SocManufacturer)).value

    def sdk_libs(self) -> str | None:
        """Directories the vendor's SDK libraries are loaded from (LD_LIBRARY_PATH), or None."""
        try:
            sdk = importlib.import_module(self.sdk_package.replace("-", "_"))
        except ImportError:
            return None
        path = getattr(sdk, "path_to_sdk_libs", lambda: None)()
        return str(path) if path else None

    def _tool(self, *args: str) -> subprocess.CompletedProcess:
        """The wheel's apply_plugin_main with this vendor's plugin and SDK libraries."""
        from ai_edge_litert.aot.core import common

        env = os.environ.copy()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (self.sdk_libs(), common.construct_ld_library_path()) if p)
        binary = common.get_resource(Path("tools/apply_plugin_main"))
        libs = _litert_dir() / "vendors" / self.folder / "compiler"
        return subprocess.run(
            [str(binary), *args, f"--libs={libs}", f"--soc_manufacturer={self.manufacturer()}"],
            check=False,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=600,
        )

    @property
    def load_failure(self) -> str | None:
        """Why the vendor's compiler plugin does not load here (its SDK libraries missing), or None."""
        return self._load_failure()

    @classmethod
    @functools.cache
    def _load_failure(cls) -> str | None:  # once per process: the libraries do not come and go
        out = cls()._tool("--cmd=info", f"--soc_model={cls.socs[0]}").stdout
        missing = re.findall(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", out)
        if missing:
            return f"its SDK library {missing[0]} is not installed"
        if "Loaded 0 plugins" in out or "Failed to load" in out:
            return "the compiler plugin did not load: " + _errors(out)
        return None

    def unavailable(self, soc: str, options: Params) -> str | None:
        if self.sdk_package and self.sdk_libs() is None:
            return f"`{self.sdk_package}` is not installed"
        return self.load_failure

    def partition(self, model_bytes: bytes, soc: str) -> Partition:
        if self.load_failure:
            raise InputError(f"{self.name}'s compiler plugin does not load: {self.load_failure}", hint=self.install_hint)
        with tempfile.TemporaryDirectory(prefix="pipeline-stage-partition-") as tmp:
            src, dst = Path(tmp) / "model.tflite", Path(tmp) / "partitioned.tflite"
            src.write_bytes(model_bytes)
            done = self._tool("--cmd=partition", f"--model={src}", f"--o={dst}", f"--soc_model={soc}", "--err=--")
            if done.returncode or not dst.is_file() or not dst.stat().st_size:
                raise CompileRejected(f"{self.name}/{soc} partition failed: {_errors(done.stdout)}")
            return partition_of(model_bytes, dst.read_bytes())

    def aot_options(self, options: Params) -> dict[str, Any]:
        """Extra flags for the vendor's plugin (`aot_compile`'s keyword arguments)."""
        return {}

    def sdk_version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{self.sdk_package} {version(self.sdk_package)}"
        except PackageNotFoundError:
            return "unknown"

    def compile(self, model_bytes: bytes, soc: str, options: Params) -> Compiled:
        from ai_edge_litert.aot.aot_compile import aot_compile

        target = self._target_module().Target(self._target_module().SocModel(soc))
        with tempfile.TemporaryDirectory(prefix="pipeline-stage-compile-") as tmp:
            src = Path(tmp) / "model.tflite"
            src.write_bytes(model_bytes)
            result = aot_compile(
                str(src), output_dir=Path(tmp) / "out", target=target, keep_going=True, **self.aot_options(options)
            )
            if result.failed_backends or not result.models_with_backend:
                message = result.failed_backends[0][1] if result.failed_backends else "no model came back"
                raise CompileRejected(_errors(_log_of(message)) or message)
            model = result.models_with_backend[0][1]
            compiled = model.model_bytes if model.in_memory else Path(model.path).read_bytes()
        return Compiled(compiled, partition_of(model_bytes, compiled), read_stamp(compiled), self.sdk_version())


def _log_of(message: str) -> str:
    """The log file aot_compile names in its failure message, read (it leaves one per failure)."""
    found = re.search(r"See (\S+\.error)", message)
    if not found or not Path(found.group(1)).is_file():
        return message
    path = Path(found.group(1))
    try:
        return path.read_text(errors="replace")
    finally:
        path.unlink(missing_ok=True)


def _errors(log: str) -> str:
    """The lines of the tool's output that say what went wrong (its banner and INFO lines dropped)."""
    lines = [
        line.strip()
        for line in log.splitlines()
        if line.startswith(("ERROR", "Check '")) or "Exception" in line or "was called on" in line
    ]
    if lines:
        return " | ".join(dict.fromkeys(lines))[:1500]
    rest = [line.strip() for line in log.splitlines() if line.strip()]
    return rest[-1] if rest else "no output"


class IntelParams(Params):
    graph_backend: Literal["npu", "cpu"] = Field(
        "npu",
        description="`npu`: NPU code (needs OpenVINO's NPU compiler); `cpu`: OpenVINO's CPU graph backend, which "
        "an x86 host runs through the Intel dispatch library: a compiled model whose fidelity can be checked "
        "here, not NPU code.",
    )


class IntelOpenVino(_LiteRtVendor):
    """Intel NPUs (Lunar Lake, Panther Lake) through OpenVINO; the CPU graph backend runs here."""

    name = "intel_openvino"
    folder = "intel_openvino"
    socs = ("LNL", "PTL")
    sdk = f"OpenVINO {OPENVINO}; NPU code also needs OpenVINO's NPU compiler (ai-edge-litert-sdk-intel)"
    install_hint = (
        "`pip install 'pipeline-stage[intel]'` installs OpenVINO; for NPU code build the image's `intel` "
        "variant (docs/accelerators.md), or compile with `options: {graph_backend: cpu}` to check the "
        "compiled model on this CPU"
    )
    sdk_package = "ai-edge-litert-sdk-intel"
    Params = IntelParams

    def sdk_libs(self) -> str | None:
        dirs = []
        try:
            import ai_edge_litert_sdk_intel as sdk  # the NPU compiler, fetched at install time

            dirs.append(str(sdk.path_to_sdk_libs() or ""))
        except ImportError:
            pass
        try:
            import openvino

            dirs.append(str(Path(openvino.__file__).parent / "libs"))
        except ImportError:
            pass
        return os.pathsep.join(d for d in dirs if d) or None

    def unavailable(self, soc: str, options: Params) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return f"OpenVINO {OPENVINO} is not installed"
        if self.load_failure:
            return self.load_failure
        if options.graph_backend == "npu" and not self._npu_compiler():
            return "OpenVINO's NPU compiler (libopenvino_intel_npu_compiler.so) is not installed"
        return None

    def _npu_compiler(self) -> bool:
        return any(
            (Path(d) / "libopenvino_intel_npu_compiler.so").is_file() for d in (self.sdk_libs() or "").split(os.pathsep) if d
        )

    def aot_options(self, options: Params) -> dict[str, Any]:
        return {"intel_openvino_graph_backends": options.graph_backend} if options.graph_backend != "npu" else {}

    def sdk_version(self) -> str:
        import openvino

        return f"OpenVINO {openvino.__version__.split('-')[0]}"

    def runner(self, compiled: Compiled, soc: str, options: Params) -> "Callable[[Any], dict] | None":
        if options.graph_backend != "cpu":
            return None  # NPU code runs on the NPU only
        return _DispatchRunner(compiled.model_bytes, _litert_dir() / "vendors" / self.folder / "dispatch")


class _DispatchRunner:
    """A compiled model run through its vendor's dispatch library (LiteRT's CompiledModel), the ops
    the compiler left on the CPU on LiteRT's CPU accelerator, one sample at a time."""

    def __init__(self, model_bytes: bytes, dispatch_dir: Path):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.environment import Environment
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator

        env = Environment.create(runtime_path=str(_litert_dir()), dispatch_library_path=str(dispatch_dir))
        self._model = CompiledModel.from_buffer(
            model_bytes, hardware_accel=HardwareAccelerator.NPU | HardwareAccelerator.CPU, environment=env
        )
        self._key = next(iter(self._model.get_signature_list()))
        self._inputs = self._model.get_input_tensor_details(self._key)
        self._outputs = self._model.get_output_tensor_details(self._key)
        # one set of buffers for every sample: written, run, read back in turn
        self._in_buffers = self._model.create_input_buffers(0)
        self._out_buffers = self._model.create_output_buffers(0)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        names = list(self._inputs)
        feed = batch if isinstance(batch, dict) else {names[0]: batch}
        count = len(next(iter(feed.values())))
        rows: dict[str, list[np.ndarray]] = {k: [] for k in self._outputs}
        for i in range(count):
            for buffer, name in zip(self._in_buffers, names):
                buffer.write(np.ascontiguousarray(feed[name][i : i + 1], dtype=self._inputs[name]["dtype"]))
            self._model.run_by_index(0, self._in_buffers, self._out_buffers)
            for buffer, (name, detail) in zip(self._out_buffers, self._outputs.items()):
                shape = [1, *detail["shape"][1:]]
                rows[name].append(buffer.read(int(np.prod(shape)), detail["dtype"]).reshape(shape))
        return {k: np.concatenate(v) for k, v in rows.items()}


def _vendor(name: str, package: str, socs: tuple[str, ...], doc: str) -> type[_LiteRtVendor]:
    return type(
        f"LiteRt_{name}",
        (_LiteRtVendor,),
        {
            "__doc__": doc,
            "name": name,
            "folder": name,
            "socs": socs,
            "sdk_package": package,
            "sdk": f"{package}, which fetches the vendor's SDK libraries when it installs",
            "install_hint": f"build the image's `{name}` variant, which installs `{package}` (docs/accelerators.md); "
            "a machine without access to the vendor's servers cannot",
        },
    )


# The SoC models of ai-edge-litert 2.3's target lists (ai_edge_litert.aot.vendors.<vendor>.target),
# written out so that validating a manifest imports no LiteRT; a test holds them equal to the wheel's.
# fmt: off
QUALCOMM = ("SA8255", "SA8295", "SM8350", "SM8450", "SM8475", "SM8550", "SM8650", "SM8750", "SM8845", "SM8850")
MEDIATEK = ("MT6853", "MT6877", "MT6878", "MT6879", "MT6886", "MT6893", "MT6895", "MT6897", "MT6983", "MT6985",
            "MT6989", "MT6991", "MT8171", "MT8188", "MT8189", "MT6993")
GOOGLE_TENSOR = ("Tensor_G3", "Tensor_G4", "Tensor_G5", "Tensor_G6")
# fmt: on
COMPILERS: dict[str, type[_LiteRtVendor]] = {
    cls.name: cls
    for cls in (
        IntelOpenVino,
        _vendor("qualcomm", "ai-edge-litert-sdk-qualcomm", QUALCOMM, "Qualcomm Snapdragon NPUs (HTP) through QNN."),
        _vendor("mediatek", "ai-edge-litert-sdk-mediatek", MEDIATEK, "MediaTek Dimensity NPUs through NeuroPilot."),
        _vendor("google_tensor", "ai-edge-litert-sdk-google-tensor", GOOGLE_TENSOR, "Google Tensor TPUs (G3-G6)."),
    )
}


@hookimpl
def register_compilers(register):
    for cls in COMPILERS.values():
        register(cls)
