"""Which fake-quantization library for `spofa qat`: NVIDIA ModelOpt vs PyTorch PT2E (torchao), measured.

For one trained student it prints, per backend: the fp32 and fake-quant training step time (batch 64,
CPU), val top-1 after calibration alone (PTQ in PyTorch), and whether the exported ONNX is a Q/DQ
graph TensorRT accepts (`calibration.quantize.check_trt_qdq`) that ONNX Runtime runs, with its
parity to the fake-quant PyTorch model.

PT2E lives in torchao since torch 2.6 removed `torch.ao.quantization.quantize_pt2e`; it is not a
dependency of spofa: `pip install torchao` (or --target a folder on PYTHONPATH) to measure it.

    OMP_NUM_THREADS=1 python benchmarks/qat_backends.py /tmp/qat/run-kd --steps 10
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from calibration.dataset import calibration_set, load_images
from calibration.qat import insert_fake_quant
from calibration.quantize import check_trt_qdq
from export.onnx import compare_logits, ort_session, run_onnx, torch_logits
from spofa_deploy.artifacts import load_model


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median seconds of one SGD training step (forward, backward, update)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100)


def modelopt_model(path: Path, calib: np.ndarray) -> torch.nn.Module:
    model, _ = load_model(path, exportable=True)
    return insert_fake_quant(model.eval(), torch.from_numpy(calib))


def pt2e_model(path: Path, calib: np.ndarray, qat: bool):
    """PT2E with torchao's XNNPACK quantizer: symmetric per-channel weights (the closest preset to TensorRT's)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    model, _ = load_model(path, exportable=True)
    example = (torch.from_numpy(calib[:64]),)
    batch = ({0: torch.export.Dim("batch", min=1, max=1024)},)  # any batch (calibration's last one is partial)
    graph = torch.export.export(model.train() if qat else model.eval(), example, dynamic_shapes=batch).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=qat))
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer)
    if qat:  # an exported graph refuses .train()/.eval() (which `fit` calls) unless allowed
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        allow_exported_model_train_eval(prepared)
    with torch.no_grad():
        for i in range(0, len(calib), 64):
            prepared(torch.from_numpy(calib[i:i + 64]))
    return prepared, convert_pt2e


def onnx_check(model, images: np.ndarray, dynamo: bool) -> str:
    """Export `model`, then: TensorRT Q/DQ problems, ORT parity vs the PyTorch model, or why it failed."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "m.onnx"
        x = torch.from_numpy(images[:8])
        try:
            if dynamo:
                torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, external_data=False,
                                  input_names=["images"], output_names=["logits"])
            else:
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                                  input_names=["images"], output_names=["logits"])
        except Exception as e:  # the measurement reports it
            return f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        g = onnx.load(str(path))
        n_q = sum(n.op_type == "QuantizeLinear" for n in g.graph.node)
        problems = check_trt_qdq(g)
        ref = torch_logits(model, images[:8]) if not dynamo else model(x).detach().numpy()
        p = compare_logits(ref, run_onnx(ort_session(path, fused=False), images[:8], fixed_batch=8), "val")
        ops = sorted({n.op_type for n in g.graph.node if "quant" in n.op_type.lower() or n.domain})
        return (f"{n_q} QuantizeLinear, TensorRT check: {'; '.join(problems[:2]) or 'ok'}; ORT max abs err "
                f"{p.max_abs_err:.1e}, top-1 agreement {p.top1_agreement:.0f}%; quant ops {ops}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", type=Path, help="student .safetensors or its run folder")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calib-samples", type=int, default=512)
    a = ap.parse_args()
    torch.manual_seed(0)
    path = a.student / "student.safetensors" if a.student.is_dir() else a.student
    fp32, meta = load_model(path, exportable=True)
    calib = calibration_set(meta, n=a.calib_samples).images
    val = load_images(meta, "val", None)
    x, y = torch.from_numpy(calib[:64]), torch.randint(0, int(meta["num_classes"]), (64,))
    print(f"{meta['model']} {meta['img_size']}px, {torch.get_num_threads()} thread(s), {len(val)} val images")
    print(f"fp32: step {step_seconds(fp32, x, y, a.steps) * 1e3:.0f} ms, val top-1 "
          f"{top1(torch_logits(fp32.eval(), val.images), val.labels):.2f}%")

    mo = modelopt_model(path, calib)
    print(f"modelopt PTQ val top-1 {top1(torch_logits(mo, val.images), val.labels):.2f}%; "
          f"ONNX: {onnx_check(mo.eval(), val.images, dynamo=False)}")
    print(f"modelopt QAT step {step_seconds(mo, x, y, a.steps) * 1e3:.0f} ms")

    try:
        ptq, convert = pt2e_model(path, calib, qat=False)
    except ImportError as e:
        print(f"pt2e: not measured ({e}): pip install torchao")
        return
    ptq = convert(ptq)
    print(f"pt2e PTQ val top-1 {top1(ptq(torch.from_numpy(val.images)).detach().numpy(), val.labels):.2f}%; "
          f"ONNX: {onnx_check(ptq, val.images, dynamo=True)}")
    qat, _ = pt2e_model(path, calib, qat=True)
    print(f"pt2e QAT step {step_seconds(qat, x, y, a.steps) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
