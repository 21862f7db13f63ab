"""The bare litert-torch script bench_torch.py times the stage against: what a team writes by hand
to get an int8 LiteRT model out of a PyTorch module and check it. Loads the torch.export archive,
takes PyTorch's outputs on the evaluation data, converts to float and quantizes with PT2E (static
int8, calibrated), runs both .tflite files with the LiteRT interpreter one sample a call, and prints
one JSON line: SQNR of each against PyTorch, accuracy where there are labels, sizes.

    python bench/bare_torch.py model.pt2 calib.npz eval.npz out.tflite
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np


def main(model_path: str, calib_path: str, eval_path: str, out_path: str) -> None:
    import litert_torch
    import torch
    from ai_edge_litert.interpreter import Interpreter
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    module = torch.export.load(model_path).module()
    calib, data = np.load(calib_path)["x"], np.load(eval_path)
    x, y = data["x"], data["y"] if "y" in data else None
    with torch.no_grad():
        reference = np.concatenate([module(torch.from_numpy(x[i : i + 64])).numpy() for i in range(0, len(x), 64)])
    sample = (torch.from_numpy(x[:1]),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(module, sample).module(), quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            prepared(torch.from_numpy(calib[i : i + 1]))
    with tempfile.TemporaryDirectory() as tmp:
        litert_torch.convert(module, sample).export(f"{tmp}/float.tflite")
        litert_torch.convert(
            convert_pt2e(prepared, fold_quantize=False), sample, quant_config=QuantConfig(pt2e_quantizer=quantizer)
        ).export(out_path)
        float_bytes = open(f"{tmp}/float.tflite", "rb").read()
    result = {}
    for name, model_bytes in (("float", float_bytes), ("int8", open(out_path, "rb").read())):
        interpreter = Interpreter(model_content=model_bytes)
        runner = interpreter.get_signature_runner()
        (scale_in, zero_in), dtype_in = (
            runner.get_input_details()["args_0"]["quantization"],
            runner.get_input_details()["args_0"]["dtype"],
        )
        (scale_out, zero_out) = next(iter(runner.get_output_details().values()))["quantization"]
        feed = (
            x if not scale_in else np.clip(np.round(x / scale_in + zero_in), -128, 127).astype(dtype_in)
        )  # PT2E leaves int8 edges
        out = np.concatenate([next(iter(runner(args_0=feed[i : i + 1]).values())) for i in range(len(x))]).astype(np.float64)
        out = out if not scale_out else (out - zero_out) * scale_out
        noise = np.sum((reference - out) ** 2)
        result[name] = {
            "sqnr_db": float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30))),
            "size_bytes": len(model_bytes),
            **({"accuracy": float((out.argmax(1) == y).mean())} if y is not None else {}),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:5])
