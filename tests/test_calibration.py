"""INT8 calibration: the calibration set, TensorRT-compatible Q/DQ, and accuracy on digits."""
from __future__ import annotations

import importlib.util
import logging
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from calibration.dataset import calibration_set, load_images
from calibration.quantize import (boundary_nodes, check_trt_qdq, high_precision_for, modelopt_problem, qdq_constants,
                                  quantize_int8, resolve_quantizer)
from export.exporter import export_model
from export.options import ExportOptions, GateOptions, Int8Options
from export.onnx import ort_session
from spofa_deploy.artifacts import save_model
from spofa_deploy.errors import MissingDependency, UserError
from spofa_deploy.models import create_model, data_config
from spofa_deploy.models import Preprocessing

SIZE = 32


def _meta(model: torch.nn.Module, name: str, top1: float) -> dict:
    return {"model": name, "num_classes": 10, "classes": [str(i) for i in range(10)], "img_size": SIZE,
            **data_config(model), "data": "digits", "role": "student", "method": "none", "teacher": "",
            "top1": top1, "top5": 100.0, "saved": "model"}


@pytest.fixture(scope="session")
def trained_student(tmp_path_factory) -> Path:
    """test_resnet trained on digits at 32 px for 3 epochs (Adam, one-cycle): ~98% val top-1 in ~8 s."""
    from spofa_deploy.data.splits import load_splits

    torch.manual_seed(0)
    model = create_model("test_resnet", 10, img_size=SIZE)
    cfg = data_config(model)
    splits = load_splits("digits", Preprocessing.from_meta(cfg, SIZE), train_aug=False)

    def tensors(ds):
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs), torch.tensor(ys)

    (x, y), (xv, yv) = tensors(splits.train), tensors(splits.val)
    epochs, batch = 3, 64
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(x) // batch), pct_start=0.2)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        top1 = float((model(xv).argmax(1) == yv).float().mean() * 100)
    assert top1 > 90, f"the fixture's student did not train ({top1:.1f}%)"
    path = tmp_path_factory.mktemp("trained") / "student.safetensors"
    save_model(path, model, _meta(model, "test_resnet", top1))
    return path


def _meta_of(path: Path) -> dict:
    from spofa_deploy.artifacts import read_model_meta

    return read_model_meta(path)


# ----------------------------------------------------------------------------- calibration set

def test_calibration_set_is_seeded_stratified_and_preprocessed(trained_student):
    meta = _meta_of(trained_student)
    a = calibration_set(meta, n=50, seed=0)
    b = calibration_set(meta, n=50, seed=0)
    c = calibration_set(meta, n=50, seed=1)
    assert a.images.shape == (50, 3, SIZE, SIZE) and a.images.dtype == np.float32
    assert a.split == "train" and a.spec == "digits"
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert np.bincount(a.labels, minlength=10).tolist() == [5] * 10  # stratified: 5 per digit
    # Eval transform with the model's mean/std: normalised, not raw [0, 1] pixels, no augmentation.
    assert a.images.min() < -0.5
    val = load_images(meta, "val", None)
    assert len(val) == 359 and val.split == "val"


def test_calibration_set_refuses_unloadable_data(trained_student):
    with pytest.raises(UserError, match="--calib-data"):
        calibration_set(_meta_of(trained_student), spec="imagefolder:/no/such/dir", n=8)
    with pytest.raises(UserError, match=">= 1"):
        calibration_set(_meta_of(trained_student), n=0)


# ----------------------------------------------------------------------------- INT8 Q/DQ

def _qdq_zero_points(model) -> list[np.ndarray]:
    """Zero points of every QuantizeLinear/DequantizeLinear node (a missing input means 0)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zps = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zps.append(inits[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros(1, np.int8))
    return zps


def test_int8_export_is_symmetric_per_channel_and_accurate(trained_student):
    r = export_model(trained_student, ExportOptions("onnx", "int8", dynamic_batch=(1, 32, 64), int8=Int8Options(quantizer="ort")))
    assert r.path.name == "student.int8.onnx"
    model = onnx.load(str(r.path))
    onnx.checker.check_model(model)

    zps = _qdq_zero_points(model)
    assert len(zps) > 20
    assert all(np.all(z == 0) for z in zps), "TensorRT rejects non-zero zero points"
    weights = [v for _, role, v in qdq_constants(model) if role == "data" and v.dtype == np.int8]
    assert weights and min(int(w.min()) for w in weights) >= -127  # TensorRT's int8 weight range
    assert not [v for _, role, v in qdq_constants(model) if role == "data" and v.dtype == np.int32]
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel, "weights should carry per-channel scales"
    assert check_trt_qdq(model) == []

    # The first conv and the classifier stay fp32 by default: their weights are float initializers.
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert convs[0].input[1] in floats and convs[-1].input[1] in floats
    assert convs[1].input[1] not in floats
    assert r.quantization["excluded_nodes"] == [convs[0].name, convs[-1].name]

    # Runs in ONNX Runtime (fused kernels) at any batch, and keeps top-1 within 2 points of fp32.
    out = ort_session(r.path).run(["logits"], {"images": np.zeros((7, 3, SIZE, SIZE), np.float32)})[0]
    assert out.shape == (7, 10)
    assert r.eval_samples == 359
    assert r.fp32_top1 > 90
    assert r.int8_top1 >= r.fp32_top1 - 2.0, (r.int8_top1, r.fp32_top1)
    assert r.int8_top1_ort_kernels is not None


def test_quantize_ends_option_quantizes_first_conv(trained_student, tmp_path):
    meta = _meta_of(trained_student)
    fp32 = export_model(trained_student, ExportOptions("onnx", dynamic_batch=(1, 8, 16), out=tmp_path / "m.onnx")).path
    calib = calibration_set(meta, n=64)
    info = quantize_int8(fp32, tmp_path / "all.onnx", calib.images, quantizer="ort", keep_ends=False)
    assert info.excluded_nodes == []
    model = onnx.load(str(tmp_path / "all.onnx"))
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers.get(first.input[1]) == "DequantizeLinear"
    graph = onnx.load(str(fp32))
    linear = [n.name for n in graph.graph.node if n.op_type in ("Conv", "Gemm")]
    assert boundary_nodes(graph) == [linear[0], linear[-1]]


def test_trt_check_catches_asymmetric_and_unquantized_graphs(trained_student, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from calibration.quantize import ArrayReader

    fp32 = export_model(trained_student, ExportOptions("onnx", dynamic_batch=(1, 8, 16), out=tmp_path / "m.onnx")).path
    assert check_trt_qdq(onnx.load(str(fp32))) == ["no QuantizeLinear/DequantizeLinear nodes"]
    images = calibration_set(_meta_of(trained_student), n=32).images
    # ORT's defaults (uint8 activations with zero points, int32 biases) are what TensorRT refuses.
    quantize_static(str(fp32), str(tmp_path / "asym.onnx"), ArrayReader(images, 16), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    problems = check_trt_qdq(onnx.load(str(tmp_path / "asym.onnx")))
    assert any("non-zero zero point" in p for p in problems)
    assert any("int32" in p for p in problems)


def test_calibration_reader_batches(tmp_path):
    from calibration.quantize import CALIB_BATCH, ArrayReader, calibration_reader
    from export.onnx import BatchProfile, export_onnx

    images = np.arange(7 * 3 * 2 * 2, dtype=np.float32).reshape(7, 3, 2, 2)
    fixed = ArrayReader(images, 3, fixed=True)
    assert fixed.get_first()["images"].shape == (3, 3, 2, 2)
    assert [len(b["images"]) for b in iter(fixed.get_next, None)] == [3, 3]  # the partial batch of 1 is dropped
    assert fixed.samples == 6 and fixed.get_first() is not None  # get_first does not advance or exhaust
    fixed.rewind()
    np.testing.assert_array_equal(fixed.get_next()["images"], images[:3])
    assert [len(b["images"]) for b in iter(ArrayReader(images, 3).get_next, None)] == [3, 3, 1]

    model = create_model("test_resnet", 10, img_size=SIZE).eval()
    for name, profile in (("b4", BatchProfile.fixed(4)), ("dyn", BatchProfile.dynamic_range(1, 8, 64))):
        export_onnx(model, tmp_path / f"{name}.onnx", img_size=SIZE, batch=profile)
    x = np.zeros((10, 3, SIZE, SIZE), np.float32)
    r = calibration_reader(tmp_path / "b4.onnx", x)
    assert (r.batch, r.fixed, r.samples) == (4, True, 8)
    r = calibration_reader(tmp_path / "dyn.onnx", x)
    assert (r.batch, r.fixed, r.samples) == (CALIB_BATCH, False, 10)
    with pytest.raises(UserError, match="^3 calibration images do not fill one batch of 4: raise --calib-samples$"):
        calibration_reader(tmp_path / "b4.onnx", x[:3])


def test_quantizer_choice_by_target():
    with pytest.raises(UserError, match="unknown --quantizer"):
        resolve_quantizer("tensorrt")
    assert resolve_quantizer("ort", "trt") == "ort"
    assert resolve_quantizer("auto", "onnx") == "ort"  # ONNX Runtime CPU: int8 weights, int8 kernels
    if modelopt_problem() is None:
        assert resolve_quantizer("auto", "trt") == "modelopt"
    else:
        with pytest.raises(MissingDependency, match=r"pip install 'nvidia-modelopt\[onnx\]==0.47"):
            resolve_quantizer("modelopt")


def test_auto_falls_back_before_the_export_when_modelopt_cannot_quantize_onnx(monkeypatch, caplog):
    """A plain nvidia-modelopt install lacks onnx_graphsurgeon: found before any export work, not after it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx_graphsurgeon" else real(name, *a))
    monkeypatch.setattr("calibration.quantize.modelopt_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="calibration"):
        assert resolve_quantizer("auto", "trt") == "ort"  # a check before the export: nothing said yet
        assert caplog.messages == []
        assert resolve_quantizer("auto", "trt", announce=True) == "ort"  # where it quantizes: said once
    assert caplog.messages == ["--quantizer auto: ONNX Runtime's quantizer instead of ModelOpt (ModelOpt's ONNX "
                               "quantizer needs onnx_graphsurgeon, which is not installed: pip install "
                               "'nvidia-modelopt[onnx]==0.47.*' (or use --quantizer ort))"]
    with pytest.raises(MissingDependency, match="^--quantizer modelopt: ModelOpt's ONNX quantizer needs onnx_graphsurgeon"):
        resolve_quantizer("modelopt", "trt")


def test_high_precision_is_fp16_for_tensorrt_and_fp32_for_onnx_runtime():
    assert high_precision_for("trt") == "fp16" and high_precision_for("onnx") == "fp32"


def test_modelopt_int8_is_trt_compatible(trained_student, tmp_path):
    pytest.importorskip("modelopt.onnx.quantization", reason="NVIDIA ModelOpt is not installed: pip install 'nvidia-modelopt[onnx]==0.47.*'")
    r = export_model(trained_student, ExportOptions("onnx", "int8", dynamic_batch=(1, 32, 64), out=tmp_path / "mo.int8.onnx",
                                                    int8=Int8Options(quantizer="modelopt"), gate=GateOptions(samples=200)))
    assert r.quantization["quantizer"] == "modelopt" and r.quantization["high_precision"] == "fp32"
    assert check_trt_qdq(onnx.load(str(r.path))) == []
    assert r.int8_top1 >= r.fp32_top1 - 2.0


# ----------------------------------------------------------------------------- accuracy gate

def _grey_folder(root: Path) -> str:
    """An image folder of flat grey images, one per digit class: a calibration set unlike any real digit."""
    from PIL import Image

    for split in ("train", "val"):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True)
            Image.new("RGB", (SIZE, SIZE), (128, 128, 128)).save(root / split / str(c) / "0.png")
    return f"imagefolder:{root}"


def test_gate_refuses_an_int8_export_calibrated_on_the_wrong_images(trained_student, tmp_path):
    out = tmp_path / "student.int8.onnx"
    with pytest.raises(UserError, match=r"^int8 export refused: val top-1 .* PyTorch .*--max-drop 1\. Kept aside as "
                                        r"student\.int8\.refused\.onnx, not installed") as err:
        export_model(trained_student, ExportOptions("onnx", "int8", dynamic_batch=(1, 32, 64), out=out,
                                                    int8=Int8Options(quantizer="ort", calib_data=_grey_folder(tmp_path / "grey")),
                                                    gate=GateOptions(samples=200)))
    assert "\n" not in str(err.value)
    assert not out.exists() and not out.with_name(out.name + ".json").exists()
    aside = tmp_path / "student.int8.refused.onnx"
    side = json.loads((tmp_path / "student.int8.refused.onnx.json").read_text())
    assert aside.is_file() and side["refused"] is True
    gate = side["gate"]
    assert gate["passed"] is False and gate["n"] == 200 and gate["drop"] > 1.0
    assert gate["disagreement"] > 0 and gate["checked_on"].startswith("onnxruntime-cpu")

    # The same broken set with the gate off: installed, its drop still measured and recorded.
    r = export_model(trained_student, ExportOptions("onnx", "int8", dynamic_batch=(1, 32, 64), out=out,
                                                    int8=Int8Options(quantizer="ort", calib_data=_grey_folder(tmp_path / "grey2")),
                                                    gate=GateOptions(samples=200, max_drop=0)))
    assert r.path == out and out.is_file()
    assert r.gate.max_drop == 0 and r.gate.passed and r.gate.drop == pytest.approx(gate["drop"])


def test_gate_passes_a_good_int8_export_and_records_it(trained_student, tmp_path):
    r = export_model(trained_student, ExportOptions("onnx", "int8", dynamic_batch=(1, 32, 64), out=tmp_path / "s.int8.onnx",
                                                    int8=Int8Options(quantizer="ort"), gate=GateOptions(samples=100)))
    assert r.gate.passed and r.gate.n == 100 and r.gate.drop <= 1.0
    assert r.fp32_top1 == r.gate.reference_top1 and r.int8_top1 == r.gate.top1
    side = json.loads(r.sidecar.read_text())
    assert side["gate"]["passed"] is True and side["gate"]["max_drop"] == 1.0
    assert side["int8"]["target"] == "onnx" and side["int8"]["high_precision"] == "fp32"


def test_gate_options_are_checked_up_front(trained_student):
    with pytest.raises(UserError, match="--max-drop must be >= 0"):
        export_model(trained_student, ExportOptions("onnx", "int8", gate=GateOptions(max_drop=-1)))
    with pytest.raises(UserError, match="--gate-samples must be >= 1"):
        export_model(trained_student, ExportOptions("onnx", "int8", gate=GateOptions(samples=0)))


def test_int8_for_onnx_runtime_is_smaller_and_its_latency_is_reported(trained_student, tmp_path):
    r = export_model(trained_student, ExportOptions("onnx", "int8", dynamic_batch=(1, 16, 64), out=tmp_path / "a.int8.onnx",
                                                    gate=GateOptions(samples=64)))
    assert r.quantization["quantizer"] == "ort"  # auto, for ONNX Runtime: int8 weights
    p = r.payoff
    assert p["backend"] == "onnxruntime-cpu" and set(p["latency_ms"]) == {"1", "32"}
    assert p["int8_bytes"] < p["fp32_bytes"]
    for b, ms in p["latency_ms"].items():
        assert ms["int8"] > 0 and ms["fp32"] > 0
        said = any(f"not faster than fp32 in ONNX Runtime CPU on this machine at batch {b}" in w for w in r.warnings)
        assert said == (ms["int8"] >= ms["fp32"])


def test_an_image_folder_is_split_by_the_runs_seed_for_export_and_bench(tmp_path) -> None:
    """An image folder without val/ is split by the run's seed: export's parity, gate and calibration (and bench's
    accuracy) must read the split the model was trained with, not seed 0's (whose val holds its training images)."""
    from PIL import Image

    from calibration.dataset import load_split
    from export.bench.plan import ValSets
    from spofa_deploy.data.splits import load_splits, split_seed

    for c in ("a", "b"):
        (tmp_path / "imgs" / "train" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "imgs" / "train" / c / f"{i}.png")
    spec = f"imagefolder:{tmp_path / 'imgs'}"
    meta = {"img_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0,
            "data": spec, "train": {"seed": 3}}
    prep = Preprocessing.from_meta(meta, 8)
    trained = {str(p) for p in load_splits(spec, prep, seed=3).train.paths}
    val, _ = load_split(meta, "val")
    assert split_seed(meta) == 3 and not trained & {str(p) for p in val.paths}
    assert {str(p) for p in load_splits(spec, prep, seed=0).val.paths} & trained  # what seed 0 would have read
    assert ValSets(spec).seed == 0 and split_seed({}) == 0  # models from before the seed was recorded
    assert split_seed({"split_seed": 5, "train": {"seed": 1}}) == 5  # a teacher's own record first
