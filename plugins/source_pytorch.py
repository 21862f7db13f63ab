"""Built-in model source `pytorch`: a PyTorch model as MLflow logs it (extra `pipeline-stage[torch]`).

``mlflow.pytorch.log_model`` writes the `pytorch` flavor: MLflow 3's default ``pt2`` (a
``torch.export`` archive: checked free of pickled code with MLflow's own check, then loaded with
``torch.export.load``) or MLflow 2's ``pickle`` (loading it runs code from the registry: refused
unless the manifest sets ``allow_unsafe_deserialization: true``). A bare ``.pt2`` file is read the
same way.

The baseline is PyTorch itself: its outputs are the reference, so the conversion's own error
shows in the fidelity gates. The float ``.tflite`` comes from `litert-torch`
(``litert_torch.convert``), with the inputs in the layout the training run logged (NCHW), or
channels last where the manifest asks (``conversion: {io_layout: channels_last}``, with
``litert_torch.to_channel_last_io``: the data stays as logged, :meth:`PyTorchSource.feed`
transposes it). Inputs and outputs are named after the MLflow signature (else ``x`` and
``output_<i>``), their shapes come from it (or the archive's example inputs). litert-torch
converts with a fixed batch of one; the stage then feeds the model one sample a call.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage import InputError, ModelSource, captured_output, dump_flatbuffer, first_line, hookimpl, load_flatbuffer

EXTRA = "pip install 'pipeline-stage[torch]' (or run the image pipeline-stage:<version>-torch)"
CHANNELS_LAST = "channels_last"


def _mlmodel(folder: Path) -> tuple[Path, dict]:
    """The MLmodel file nearest under `folder` (its folder, its content); (folder, {}) without one."""
    import yaml

    found = sorted(folder.rglob("MLmodel"), key=lambda p: len(p.parts))
    if not found:
        return folder, {}
    return found[0].parent, (yaml.safe_load(found[0].read_text()) or {})


def _tensor_specs(spec_json: str | None, default: str) -> list[dict]:
    """An MLflow signature's tensor specs as [{name, dtype, shape}] (the JSON the MLmodel holds);
    unnamed ones are `default` (the only one) or `<default>_<k>`."""
    import json

    entries = json.loads(spec_json) if spec_json else []
    out = []
    for k, entry in enumerate(entries):
        tensor = entry.get("tensor-spec") or {}
        name = entry.get("name") or (default if len(entries) == 1 else f"{default}_{k}")
        out.append({"name": name, "dtype": tensor.get("dtype", "float32"), "shape": tuple(tensor.get("shape") or ())})
    return out


def _checked_pt2(path: Path, uri: str):
    """The torch.export program in `path`, once MLflow's check found no pickled code in it."""
    import torch
    from mlflow.pytorch import _validate_pt2_archive_is_pickle_free

    try:
        _validate_pt2_archive_is_pickle_free(str(path))
    except Exception as exc:
        raise InputError(
            f"model `{uri}` ({path.name}) holds more than tensors and metadata: {first_line(exc)}",
            hint="log it again with mlflow.pytorch.log_model(..., serialization_format='pt2') from the model's code",
        ) from None
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise InputError(f"model `{uri}` ({path.name}) could not be loaded: {type(exc).__name__}: {first_line(exc)}") from None


def _fixed_batch(program) -> int | None:
    """The batch a torch.export program was exported with when it is fixed (an input example of
    one sample makes it so: torch.export specializes a size-1 dimension), else None."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in user_inputs else None
        if value is not None and len(value.shape) and isinstance(value.shape[0], int):
            return int(value.shape[0])
    return None


class PyTorchSource(ModelSource):
    """A PyTorch model logged with mlflow.pytorch (torch.export `pt2`, or a pickled module when allowed)."""

    name = "pytorch"
    title = "a PyTorch model"
    flavors = ("pytorch",)
    suffixes = (".pt2",)
    layouts = ("source", CHANNELS_LAST)
    install_hint = EXTRA
    edit_hint = (
        "drop the step: prune or fuse the module in PyTorch before logging it (torch.nn.utils.prune, "
        "torch.ao.quantization.fuse_modules), and quantize it here (`quantize`, engine auto, litert or pt2e)"
    )

    def __init__(
        self, info, path: Path, module, inputs: list[dict], outputs: list[str], layout: str, fixed_batch: int | None = None
    ):
        super().__init__(info, path)
        self.module = module
        self.inputs, self.outputs = inputs, outputs
        self.fixed_batch = fixed_batch  # the archive's batch, when torch.export fixed it
        if fixed_batch:
            self.notes.append(
                f"the torch.export archive has a fixed batch of {fixed_batch}: PyTorch is run {fixed_batch} sample(s) a call"
            )
        # the 4-D inputs channels_last transposes (NCHW -> NHWC); none in the source's own layout
        self.transposed = [s["name"] for s in inputs if len(s["shape"]) == 4] if layout == CHANNELS_LAST else []
        if layout == CHANNELS_LAST:
            self.notes.append(
                f"registered channels last: input(s) {', '.join(self.transposed) or 'none (no 4-D input)'} NHWC, "
                "the data transposed from the NCHW the model was trained on"
            )

    @classmethod
    def unavailable(cls) -> str | None:
        missing = [m for m in ("torch", "litert_torch") if importlib.util.find_spec(m) is None]
        return f"reading it needs {' and '.join(missing)}, which this install lacks" if missing else None

    @classmethod
    def locate(cls, root: Path) -> Path | None:
        if root.is_file():
            return root if root.suffix == ".pt2" else None
        return root if "pytorch" in (_mlmodel(root)[1].get("flavors") or {}) else None

    @classmethod
    def open(cls, path: Path, info, options) -> "PyTorchSource":
        """The module, loaded safely: a pt2 archive once checked free of pickled code; a pickled
        module only with ``allow_unsafe_deserialization``."""
        why = cls.unavailable()
        if why:
            raise InputError(f"model `{info.uri}` is a PyTorch model: {why}", hint=EXTRA)
        if path.is_file():  # a bare torch.export archive
            program = _checked_pt2(path, info.uri)
            example = program.example_inputs[0] if program.example_inputs else ()
            inputs = [
                {"name": "x" if len(example) == 1 else f"x_{k}", "dtype": "float32", "shape": (-1, *t.shape[1:])}
                for k, t in enumerate(example)
            ]
            return cls._opened(info, path, program.module(), inputs, [], options, _fixed_batch(program))
        folder, mlmodel = _mlmodel(path)
        data = folder / mlmodel["flavors"]["pytorch"].get("model_data", "data")
        signature = mlmodel.get("signature") or {}
        inputs = _tensor_specs(signature.get("inputs"), "x")
        outputs = [s["name"] for s in _tensor_specs(signature.get("outputs"), "output")]
        if not inputs:
            raise InputError(
                f"model `{info.uri}` has no MLflow signature with tensor inputs: the stage cannot tell its inputs' shapes",
                hint="log it with an input_example (a numpy array, or a tuple of them) in mlflow.pytorch.log_model",
            )
        if (data / "model.pt2").exists():
            program = _checked_pt2(data / "model.pt2", info.uri)
            return cls._opened(info, path, program.module(), inputs, outputs, options, _fixed_batch(program))
        return cls._opened(info, path, cls._unpickled(folder, info, options), inputs, outputs, options)

    @classmethod
    def _unpickled(cls, folder: Path, info, options):
        if not options.allow_unsafe_deserialization:
            raise InputError(
                f"model `{info.uri}` is a pickled PyTorch model (serialization_format pickle): loading it runs code "
                "from the registry inside this pod",
                hint="log it with mlflow.pytorch.log_model(..., serialization_format='pt2') (MLflow 3's default), or, "
                "for a model you trust, set `allow_unsafe_deserialization: true` in the manifest",
            )
        import mlflow.pytorch

        try:
            return mlflow.pytorch.load_model(str(folder), map_location="cpu")
        except Exception as exc:
            raise InputError(
                f"model `{info.uri}` could not be unpickled: {type(exc).__name__}: {first_line(exc)}",
                hint="the module's code must be importable here (log it with code_paths=...) or pickled by value",
            ) from None

    @classmethod
    def _opened(cls, info, path, module, inputs, outputs, options, fixed_batch: int | None = None) -> "PyTorchSource":
        if hasattr(module, "eval") and not isinstance(module, type):
            try:
                module.eval()
            except (NotImplementedError, RuntimeError):
                pass  # an exported program's module has no train mode to leave
        return cls(info, path, module, inputs, outputs, options.io_layout, fixed_batch)

    # -- the loaded model --------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        if not self.outputs:  # no output signature: as many as the module returns
            self.outputs = [f"output_{k}" for k in range(len(_flat(self.run_module(self.feed(self.sample_inputs(1))))))]
            if len(self.outputs) == 1:
                self.outputs = ["output"]
        return self.outputs

    @property
    def input_shapes(self) -> dict[str, tuple]:
        return {spec["name"]: tuple(int(d) for d in spec["shape"][1:]) for spec in self.inputs}

    def sample_inputs(self, n: int) -> dict[str, np.ndarray]:
        """`n` samples of seeded noise in the inputs' shapes and dtypes (what the model is traced
        with; a dynamic dimension other than the batch is 1). The data's layout, not the feed's."""
        rng = np.random.default_rng(0)
        return {
            s["name"]: rng.normal(size=(n, *[max(1, int(d)) for d in s["shape"][1:]])).astype(s["dtype"]) for s in self.inputs
        }

    def feed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.transpose(v, (0, 2, 3, 1)) if k in self.transposed else v for k, v in inputs.items()}

    def logged_layout(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fed inputs (:meth:`feed`) back in the layout the module takes."""
        return {k: np.transpose(v, (0, 3, 1, 2)) if k in self.transposed else v for k, v in inputs.items()}

    def torch_args(self, inputs: dict[str, np.ndarray]) -> tuple:
        """Fed inputs as the module's positional tensors, in its layout."""
        import torch

        arrays = self.logged_layout(inputs)
        return tuple(torch.from_numpy(np.ascontiguousarray(arrays[s["name"]], dtype=s["dtype"])) for s in self.inputs)

    def run_module(self, inputs: dict[str, np.ndarray]):
        """The module's raw outputs on fed inputs (:meth:`feed`)."""
        import torch

        with torch.no_grad():
            return self.module(*self.torch_args(inputs))

    def predict_batch(self, inputs, model: Any = None) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        step = self.fixed_batch or n
        chunks = []
        for start in range(0, n, step):
            part = {k: v[start : start + step] for k, v in inputs.items()}
            short = step - len(next(iter(part.values())))
            if short:  # a fixed batch: the last call padded with its own first sample, the padding dropped
                part = {k: np.concatenate([v, np.repeat(v[:1], short, axis=0)]) for k, v in part.items()}
            values = [v.detach().cpu().numpy() for v in _flat(self.run_module(part))]
            chunks.append([v[: step - short] for v in values])
        return {name: np.concatenate([c[k] for c in chunks]) for k, name in enumerate(self.output_names)}

    def for_litert(self, module: Any = None):
        """(module, sample args) as litert-torch converts them: the module wrapped channels last
        where the manifest asks, and a batch of one as the converted model is fed (:meth:`feed`)."""
        import litert_torch
        import torch

        module = module if module is not None else self.module
        fed = self.feed(self.sample_inputs(1))
        sample = tuple(torch.from_numpy(np.ascontiguousarray(fed[n])) for n in self.input_names)
        if self.transposed:  # the wrapper takes NHWC and permutes back to what the module takes
            module = litert_torch.to_channel_last_io(module, args=[self.input_names.index(n) for n in self.transposed])
        return module, sample

    def named(self, model_bytes: bytes) -> bytes:
        """A litert-torch conversion with its SignatureDef's inputs and outputs named as the MLflow
        signature names them (litert-torch names them `args_<k>` and `output_<k>`), so data by
        input name feeds it and its outputs line up with PyTorch's."""
        flatbuffer = load_flatbuffer(model_bytes)
        names = {"args": self.input_names, "output": self.output_names}
        for signature in flatbuffer.signatureDefs or []:
            for entry in [*(signature.inputs or []), *(signature.outputs or [])]:
                found = re.fullmatch(
                    r"(args|output)_(\d+)", entry.name.decode() if isinstance(entry.name, bytes) else str(entry.name)
                )
                if found and int(found.group(2)) < len(names[found.group(1)]):
                    entry.name = names[found.group(1)][int(found.group(2))]
        return dump_flatbuffer(flatbuffer)

    def to_float_tflite(self, conversion, model: Any, log_path: Path) -> bytes:
        import tempfile

        import litert_torch

        try:
            with captured_output(log_path), tempfile.TemporaryDirectory(prefix="litert-torch-") as tmp:
                module, sample = self.for_litert()
                litert_torch.convert(module, sample).export(f"{tmp}/model.tflite")
                return self.named(Path(f"{tmp}/model.tflite").read_bytes())
        except Exception as exc:
            raise InputError(
                f"litert-torch could not convert `{self.info.uri}`: {type(exc).__name__}: {first_line(exc)}",
                hint=f"the converter's log: {log_path}",
            ) from None


def _flat(out) -> list:
    """A module's outputs as a list (a tensor, a tuple or list of them, or a dict in its order)."""
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


@hookimpl
def register_sources(register):
    register(PyTorchSource)
