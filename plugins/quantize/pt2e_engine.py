"""Quantization engine `pt2e`: litert-torch's PT2E quantizer on a PyTorch source (extra `[torch]`).

The module is exported (``torch.export``, a batch of one), prepared with litert-torch's
``PT2EQuantizer`` (symmetric int8 weights, per channel unless ``per_channel: false``), calibrated
on the first ``calibration_samples`` of the calibration data (mode ``int8``: static integer
activations) or not at all (mode ``dynamic``: activations quantized at run time), and converted by
``litert_torch.convert`` with that quantizer, channels last where the manifest asks. A static
model's edges are int8 as PT2E leaves them; with ``io: float`` (the default) the stage puts float
edges on it (a QUANTIZE at each input, a DEQUANTIZE at each output), as the other engines give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_stage import InputError, QuantizationEngine, first_line


class PT2EEngine(QuantizationEngine):
    """litert-torch's PT2E quantizer on the PyTorch module: static int8 (calibrated) or dynamic."""

    name = "pt2e"
    modes = ("int8", "dynamic")
    source_kinds = ("pytorch",)

    @staticmethod
    def check_params(p: Any) -> None:
        """What the PT2E quantizer takes of the quantize step's params (raise ValueError naming the rest)."""
        if p.mode not in PT2EEngine.modes:
            raise ValueError(
                f"engine pt2e offers modes {', '.join(PT2EEngine.modes)}, not `{p.mode}`; use engine litert (or auto)"
            )
        asked = [f for f in ("keep_float_ops", "keep_float_nodes", "keep_float_outputs") if getattr(p, f)]
        if p.weight_bits != 8 or p.algorithm != "min_max" or p.block_size or p.recipe is not None or asked:
            raise ValueError(
                "engine pt2e quantizes every op it can to 8 bits with min-max ranges: weight_bits, block_size, algorithm, "
                "recipe and keep_float_* are the LiteRT Quantizer's; use engine litert (or auto)"
            )

    def quantize(self, job) -> bytes:
        import tempfile

        import litert_torch
        import torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        from pipeline_stage import captured_output, float_edges

        p, source, dynamic = job.request.settings, job.source, job.request.mode == "dynamic"
        quantizer = PT2EQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=p.per_channel, is_dynamic=dynamic)
        )
        data = None if dynamic else job.calibration()
        if not dynamic and data is None:
            raise InputError("engine pt2e mode int8 needs calibration data", hint="add `data: {calibration: <URI>}`")
        try:
            with captured_output(job.log_path):
                sample = source.torch_args(source.feed(source.sample_inputs(1)))
                prepared = prepare_pt2e(torch.export.export(source.module, sample).module(), quantizer)
                with torch.no_grad():
                    if data is None:
                        prepared(*sample)  # dynamic: the observers need one pass before convert, any input
                    else:
                        job.log(f"pt2e: calibrating on {len(data)} samples")
                        arrays = data.inputs(source.input_names)
                        for i in range(len(data)):  # exported with a batch of one
                            prepared(*source.torch_args({k: v[i : i + 1] for k, v in arrays.items()}))
                module, sample = source.for_litert(convert_pt2e(prepared, fold_quantize=False))
                with tempfile.TemporaryDirectory(prefix="pt2e-") as tmp:
                    litert_torch.convert(module, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
                        f"{tmp}/m.tflite"
                    )
                    out = source.named(Path(f"{tmp}/m.tflite").read_bytes())
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"litert-torch's PT2E quantizer failed ({job.request.mode}): {type(exc).__name__}: {first_line(exc)}",
                hint=f"try engine litert (the LiteRT Quantizer on the float model); the log: {job.log_path}",
            ) from None
        if job.conversion.inference_input_type == "float32" and job.conversion.inference_output_type == "float32":
            out = float_edges(out)
        return out
