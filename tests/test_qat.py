"""`spofa qat`: INT8 fake quantization (real ModelOpt, CPU), KD fine-tuning, resume, Q/DQ export and its parity.

A tiny run made here (random test_resnet student and test_efficientnet teacher on digits, 32 px):
the mechanics are under test, not the accuracy (benchmarks/qat_evidence.py measures that).
"""
from __future__ import annotations

import builtins
import importlib.util
import logging
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

# Skipped only where ModelOpt is absent: an install that fails to import (one without requests, say) fails here.
if importlib.util.find_spec("modelopt") is None:
    pytest.skip("NVIDIA ModelOpt is not installed", allow_module_level=True)

from calibration.qat import (QAT_FOLDER, default_train, end_layers, insert_fake_quant, load_qat_model,  # noqa: E402
                             qat, quantizers, require_modelopt)
from calibration.quantize import check_trt_qdq  # noqa: E402
from export.exporter import export_model  # noqa: E402
from export.options import ExportOptions, GateOptions, ParityOptions  # noqa: E402
from export.onnx import ort_session, run_onnx, torch_logits  # noqa: E402
from spofa_deploy.artifacts import save_model  # noqa: E402
from spofa_deploy.method.distillers import KD, DistillConfig  # noqa: E402
from spofa_deploy.errors import MissingDependency, UserError  # noqa: E402
from spofa_deploy.train.hooks import Hooks, installed_hooks  # noqa: E402
from spofa_deploy.models import Preprocessing, create_model, data_config  # noqa: E402
from spofa_deploy.train.loop import train_step  # noqa: E402

SIZE = 32
FAST = replace(default_train(), epochs=1, batch_size=128, device="cpu", workers=0, log_every=5)


def _save(path: Path, name: str, role: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = create_model(name, 10, SIZE)
    prep = Preprocessing.from_meta(data_config(model), SIZE)
    save_model(path, model, {"role": role, "model": name, "num_classes": 10, "classes": [str(i) for i in range(10)],
                             "img_size": SIZE, **prep.meta(), "data": "digits", "teacher_file": "teacher.safetensors",
                             "method": "kd", "loss": DistillConfig(method="kd").to_dict()})


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder as `spofa distill` leaves it: student and teacher with their sidecars."""
    _save(tmp_path / "student.safetensors", "test_resnet", "student", 0)
    _save(tmp_path / "teacher.safetensors", "test_efficientnet", "teacher", 1)
    return tmp_path


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32))


def test_fake_quant_is_inserted_and_calibrated_with_the_ends_in_float() -> None:
    model = create_model("test_resnet", 10, SIZE, exportable=True)
    ends = end_layers(model, _images(1))
    assert ends == ["conv1.0", "fc"]  # the stem conv and the classifier, by execution order
    q = insert_fake_quant(model, _images(64))
    names = quantizers(q)
    assert names and not [n for n in names if n.split(".input_quantizer")[0].split(".weight_quantizer")[0] in ends]
    amax = dict(q.named_buffers())["layer1.0.conv1.input_quantizer._amax"]
    assert float(amax) > 0  # calibrated on the images
    assert q.layer1[0].conv1.weight_quantizer.axis == 0  # per output channel; activations per tensor
    assert q.layer1[0].conv1.input_quantizer.axis is None


def test_one_kd_step_with_the_teacher_logits_moves_the_fake_quant_student() -> None:
    student = insert_fake_quant(create_model("test_resnet", 10, SIZE, exportable=True), _images(64))
    teacher = create_model("test_efficientnet", 10, SIZE)
    task = KD(student, teacher, DistillConfig(method="kd"))
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(task.trainable(), lr=0.1)
    out, loss, finite = train_step(task.train(), _images(8, 1), torch.arange(8) % 10, opt,
                                   torch.amp.GradScaler("cpu", enabled=False), None)
    assert finite and float(out.stats["loss_kd"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_qat_writes_the_student_and_exports_qdq_that_onnx_runtime_runs_like_pytorch(run: Path) -> None:
    r = qat(run, train=FAST, calib_samples=64)
    assert r.teacher == "test_efficientnet" and r.fit.epochs_run == 1
    meta = json.loads((run / "student.qat.json").read_text())
    assert meta["qat"] is True and meta["qat_settings"]["method"] == "kd"
    assert meta["qat_settings"]["train"]["lr"] == FAST.lr and meta["qat_settings"]["kept_float"] == ["conv1.0", "fc"]
    assert (run / QAT_FOLDER / "checkpoint-last.pt").is_file()

    e = export_model(run / "student.qat.safetensors",
                     ExportOptions("onnx", "int8", parity=ParityOptions(samples=32), gate=GateOptions(samples=64)))
    assert e.path.name == "student.qat.int8.onnx"
    graph = onnx.load(str(e.path))
    assert check_trt_qdq(graph) == []
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) >= 10
    side = json.loads(e.sidecar.read_text())
    assert side["qat"] is True and side["precision"] == "int8" and side["int8"]["quantizer"] == "qat"
    # Parity with the fake-quant PyTorch model, independently of the export's own check.
    model, _ = load_qat_model(e.path.with_name("student.qat.safetensors"))
    x = _images(32, 2).numpy()
    ref, got = torch_logits(model, x), run_onnx(ort_session(e.path, fused=False), x)
    per_image = np.abs(ref - got).max(1)
    assert np.median(per_image) < 1e-4  # equal but for a rounding tie on an image or two
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9
    with pytest.raises(UserError, match="QAT student: it exports at --precision int8 only"):
        export_model(run / "student.qat.safetensors", ExportOptions("onnx", "fp32"))


def test_without_a_teacher_qat_uses_the_labels_and_says_so_once(run: Path, caplog) -> None:
    (run / "teacher.safetensors").unlink()
    with caplog.at_level(logging.INFO, logger="calibration"):  # (the library's one output channel)
        r = qat(run, train=FAST, calib_samples=64)
    assert r.teacher is None and r.meta["qat_settings"]["method"] == "none"
    assert caplog.text.count("no teacher beside") == 1


def test_a_killed_fine_tuning_resumes_from_its_checkpoint(run: Path) -> None:
    class Killed(Exception):
        pass

    def kill(step: int) -> None:
        if (run / QAT_FOLDER / "checkpoint-last.pt").is_file():
            raise Killed  # the second epoch's evaluation: the first epoch's checkpoint is on disk

    cfg = replace(FAST, epochs=2)
    with installed_hooks(Hooks(on_eval=kill)), pytest.raises(Killed):
        qat(run, train=cfg, calib_samples=64)
    with pytest.raises(UserError, match="--resume"):
        qat(run, train=cfg, calib_samples=64)
    r = qat(run, train=cfg, calib_samples=64, resume=True)
    lines = (run / QAT_FOLDER / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2] and r.fit.epochs_run == 2


def test_missing_modelopt_is_one_line_naming_the_install(monkeypatch) -> None:
    real = builtins.__import__

    def no_modelopt(name, *args, **kwargs):
        if name.startswith("modelopt"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_modelopt)
    with pytest.raises(MissingDependency, match=r"pip install 'nvidia-modelopt\[onnx\]==0.47") as e:
        require_modelopt()
    assert "\n" not in str(e.value)


def test_a_model_with_nothing_to_quantize_is_refused() -> None:
    with pytest.raises(UserError, match="no layer INT8 fake quantization applies to"):
        insert_fake_quant(nn.Sequential(nn.ReLU(), nn.Flatten()), _images(4))


def _distill_with_cache(tmp_path: Path, cache: Path) -> Path:
    """A 1-epoch KD distillation of test_resnet from the fixture's teacher on a tenth of digits, with a teacher cache."""
    from spofa_deploy.pipeline import DataOptions, TeacherCacheOptions, TeacherOptions, distill
    from spofa_deploy.train.loop import TrainConfig

    (tmp_path / "t").mkdir()
    _save(tmp_path / "t" / "teacher.safetensors", "test_efficientnet", "teacher", 1)
    r = distill(student="test_resnet", teacher=TeacherOptions(name="test_efficientnet",
                                                             checkpoint=str(tmp_path / "t" / "teacher.safetensors")),
                method="kd", data=DataOptions(train_fraction=0.1),
                train=TrainConfig(epochs=1, batch_size=64, device="cpu", workers=0, log_every=5),
                cache=TeacherCacheOptions(cache), out=tmp_path / "run", latest=False)
    return r.run_dir


def test_qat_reads_the_teacher_logits_from_the_distillations_cache(tmp_path: Path, monkeypatch, caplog) -> None:
    cache = tmp_path / "cache"
    run = _distill_with_cache(tmp_path, cache)
    calls = []  # the teacher's own forward passes (not the pass-through of logits it is handed)
    real = KD.teacher_logits
    monkeypatch.setattr(KD, "teacher_logits", lambda self, x, t=None: (t is None and calls.append(1)) or real(self, x, t))

    # The distillation's seed, batch and tenth of the data (the key's split and size): QAT's epoch 1 is the
    # distillation's epoch 1, image for image.
    r = qat(run, train=replace(FAST, batch_size=64, seed=0), calib_samples=64, teacher_cache=cache)
    assert calls == [] and r.teacher == "test_efficientnet"
    assert r.meta["qat_settings"]["teacher_cache"]["epochs_cached_at_start"] == [0]
    assert len(list(cache.glob("*/manifest.json"))) == 1

    # Another seed draws other augmented views: a miss, said once, and the teacher runs.
    (run / "student.qat.safetensors").unlink()
    shutil.rmtree(run / QAT_FOLDER)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="calibration"):  # (the library's one output channel)
        qat(run, train=replace(FAST, batch_size=64, seed=1), calib_samples=64, teacher_cache=cache)
    assert calls and caplog.text.count("teacher cache miss") == 1
    assert "seed (0 here, 1 now)" in caplog.text
