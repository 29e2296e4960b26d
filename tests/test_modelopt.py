"""ModelOpt INT8 through the project's calibration reader (real nvidia-modelopt, CPU).

ModelOpt's own `calibration_data=` path splits N images into int(N / B) chunks, which feeds a
fixed-batch graph chunks of B + 1 whenever N % B != 0 and raises when N < B. `quantize_int8`
hands ModelOpt our `ArrayReader` instead: full batches only on a fixed-batch graph, batches of
`CALIB_BATCH` on a dynamic one, and a one-line UserError when the images do not fill a batch.
These tests run ModelOpt for real; they are skipped only where it is not installed.
"""
from __future__ import annotations


import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("modelopt.onnx.quantization",
                    reason="NVIDIA ModelOpt is not installed: pip install 'nvidia-modelopt[onnx]==0.47.*'")

from calibration.quantize import CALIB_BATCH, ArrayReader, check_trt_qdq, quantize_int8  # noqa: E402
from export.onnx import BatchProfile, export_onnx, ort_session  # noqa: E402
from spofa_deploy.errors import UserError  # noqa: E402
from spofa_deploy.models import create_model  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict:
    """test_resnet (random init, 32 px) exported at fixed batch 1 and 3 and with a dynamic batch."""
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, img_size=SIZE).eval()
    root = tmp_path_factory.mktemp("modelopt")
    paths = {}
    for key, profile in {1: BatchProfile.fixed(1), 3: BatchProfile.fixed(3),
                         "dynamic": BatchProfile.dynamic_range(1, 32, 64)}.items():
        paths[key] = root / f"b{key}.onnx"
        export_onnx(model, paths[key], img_size=SIZE, batch=profile)
    return paths


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture
def batches_read(monkeypatch) -> list[int]:
    """Sizes of the batches the quantizer reads from our reader (observed, not altered)."""
    seen: list[int] = []
    real = ArrayReader.get_next

    def get_next(self):
        x = real(self)
        if x is not None:
            seen.append(len(x["images"]))
        return x

    monkeypatch.setattr(ArrayReader, "get_next", get_next)
    return seen


def _zero_points(model) -> list[np.ndarray]:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    return [{**inits, **consts}.get(n.input[2], np.zeros(1)) if len(n.input) > 2 and n.input[2] else np.zeros(1)
            for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [512, 510, 2])
def test_modelopt_int8_on_a_fixed_batch(graphs, tmp_path, batches_read, batch, n):
    dst = tmp_path / "int8.onnx"
    if n < batch:
        with pytest.raises(UserError, match=f"{n} calibration images do not fill one batch of {batch}") as e:
            quantize_int8(graphs[batch], dst, _images(n), quantizer="modelopt")
        assert "\n" not in str(e.value) and not dst.exists()
        return
    info = quantize_int8(graphs[batch], dst, _images(n), quantizer="modelopt")
    # Full batches only: 512 images at batch 3 are 170 batches of 3 (the last 2 images dropped).
    assert set(batches_read) == {batch} and sum(batches_read) == n // batch * batch == info.calib_samples
    assert info.quantizer == "modelopt" and info.method == "entropy"
    model = onnx.load(str(dst))
    zps = _zero_points(model)
    assert len(zps) > 10 and all(np.all(z == 0) for z in zps), "TensorRT wants symmetric Q/DQ (zero points 0)"
    assert check_trt_qdq(model) == []
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch  # still the fixed batch
    out = ort_session(dst, fused=False).run(["logits"], {"images": _images(batch)})[0]
    assert out.shape == (batch, 10) and np.isfinite(out).all()


def test_modelopt_int8_calibrates_a_dynamic_graph_in_batches(graphs, tmp_path, batches_read, capfd):
    info = quantize_int8(graphs["dynamic"], tmp_path / "int8.onnx", _images(70), quantizer="modelopt")
    assert "it/s" not in capfd.readouterr().err  # no progress bars of ModelOpt's own
    assert batches_read == [CALIB_BATCH, CALIB_BATCH, 70 - 2 * CALIB_BATCH]  # a dynamic graph takes the rest too
    assert info.calib_samples == 70
    assert check_trt_qdq(onnx.load(str(tmp_path / "int8.onnx"))) == []


def test_ort_quantizer_still_works_after_modelopt_in_the_same_process(graphs, tmp_path):
    # ModelOpt patches ONNX Runtime's calibrators process-wide; without undoing that, a later ORT
    # quantization calibrates nothing ("Quantization parameters are not specified for param images").
    images = _images(64)
    quantize_int8(graphs["dynamic"], tmp_path / "mo.onnx", images, quantizer="modelopt")
    for keep_ends in (True, False):
        info = quantize_int8(graphs["dynamic"], tmp_path / f"ort-{keep_ends}.onnx", images, quantizer="ort",
                             keep_ends=keep_ends)
        assert info.quantizer == "ort" and check_trt_qdq(onnx.load(str(tmp_path / f"ort-{keep_ends}.onnx"))) == []


def test_modelopt_without_a_reader_parameter_is_one_clear_error(graphs, tmp_path, monkeypatch):
    import modelopt.onnx.quantization as moq

    from spofa_deploy.errors import MissingDependency

    def old_quantize(onnx_path, quantize_mode="int8", calibration_data=None, **kwargs):  # an older signature
        raise AssertionError("must not be called")

    monkeypatch.setattr(moq, "quantize", old_quantize)
    with pytest.raises(MissingDependency, match=r"calibration_data_reader.*pip install 'nvidia-modelopt\[onnx\]==0.47"):
        quantize_int8(graphs[3], tmp_path / "x.onnx", _images(6), quantizer="modelopt")


def test_modelopt_int8_for_tensorrt_keeps_the_rest_in_fp16_and_runs_in_onnx_runtime(graphs, tmp_path):
    info = quantize_int8(graphs["dynamic"], tmp_path / "trt.onnx", _images(64), quantizer="auto", target="trt")
    assert (info.quantizer, info.high_precision, info.target) == ("modelopt", "fp16", "trt")
    model = onnx.load(str(tmp_path / "trt.onnx"))
    assert check_trt_qdq(model) == []
    fp16 = onnx.TensorProto.FLOAT16
    assert any(i.data_type == fp16 for i in model.graph.initializer)  # the layers without Q/DQ: fp16
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]  # I/O stay fp32
    out = ort_session(tmp_path / "trt.onnx", fused=False).run(["logits"], {"images": _images(3)})[0]
    assert out.shape == (3, 10) and out.dtype == np.float32
