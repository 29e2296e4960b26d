"""INT8 vs fp32 val top-1 of one trained student, ONNX Runtime and ModelOpt quantizers side by side.

Both quantizers get the same fp32 ONNX (dynamic batch), the same calibration images (seeded,
stratified training images, as `spofa export` draws them) and the same validation images; each
row prints val top-1 of the Q/DQ graph as written (ORT_ENABLE_BASIC: the arithmetic TensorRT
runs) and through ONNX Runtime's fused int8 CPU kernels, the number of QuantizeLinear nodes
(activations plus weights quantized) and the time the quantizer took.

    cd /tmp && spofa distill --teacher test_vit --student mobilenetv3 --data digits --epochs 3 --out /tmp/int8run
    python benchmarks/int8_quantizers.py /tmp/int8run --seeds 0,1,2 --ends keep,quantize
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import calibration.quantize as q
from calibration.dataset import calibration_set, load_images
from export.onnx import BatchProfile, export_onnx, ort_session, run_onnx
from spofa_deploy.artifacts import load_model


def top1(path: Path, images: np.ndarray, labels: np.ndarray, fused: bool) -> float:
    logits = run_onnx(ort_session(path, fused=fused), images)
    return float((logits.argmax(1) == labels).mean() * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", type=Path, help="student .safetensors or its run folder")
    ap.add_argument("--quantizers", default="ort,modelopt")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--seeds", default="0", help="calibration draws, comma separated")
    ap.add_argument("--ends", default="keep", help="keep (first conv + classifier fp32) and/or quantize")
    ap.add_argument("--modelopt-methods", default="entropy", help="ModelOpt calibration: entropy and/or max")
    a = ap.parse_args()
    path = a.student / "student.safetensors" if a.student.is_dir() else a.student
    model, meta = load_model(path, exportable=True)
    val = load_images(meta, "val", None)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32, img_size=int(meta["img_size"]), batch=BatchProfile.dynamic_range(1, 32, 64))
        fp = top1(fp32, val.images, val.labels, fused=True)
        print(f"{meta['model']} on {val.spec}: {len(val)} val images, {a.calib_samples} calibration images, "
              f"fp32 top-1 {fp:.2f}%\n")
        print(f"{'quantizer':<10} {'method':<8} {'ends':<9} {'seed':>4} {'int8 Q/DQ':>10} {'ORT kernels':>12} "
              f"{'vs fp32':>8} {'Q nodes':>8} {'seconds':>8}")
        rows = [(name, method) for name in a.quantizers.split(",")
                for method in (a.modelopt_methods.split(",") if name == "modelopt" else ["minmax"])]
        for seed in (int(s) for s in a.seeds.split(",")):
            calib = calibration_set(meta, n=a.calib_samples, seed=seed)
            for ends in a.ends.split(","):
                for name, method in rows:
                    if name == "modelopt":
                        q.MODELOPT_METHOD = method  # a module setting, not a CLI option: set it for this row
                    dst = Path(tmp) / f"{name}-{method}-{ends}-{seed}.onnx"
                    t = time.perf_counter()
                    q.quantize_int8(fp32, dst, calib.images, quantizer=name, keep_ends=ends == "keep")
                    secs = time.perf_counter() - t
                    qdq, kern = (top1(dst, val.images, val.labels, fused=f) for f in (False, True))
                    quant = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(dst)).graph.node)
                    print(f"{name:<10} {method:<8} {ends:<9} {seed:>4} {qdq:>9.2f}% {kern:>11.2f}% "
                          f"{qdq - fp:>+8.2f} {quant:>8} {secs:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
