"""`spofa export` to ONNX (and TensorRT where installed): parity, batch handling, sidecars, bad input."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.artifact import describe
from export.exporter import export_model
from export.formats import FORMATS, artifact_name, format_for_path, get_format
from export.onnx import ort_session
from export.options import ExportOptions, GateOptions, Int8Options, ParityOptions, TrtOptions
from export.tensorrt import TrtEngine, check_engine_meta
from spofa_deploy.artifacts import load_model, save_model
from spofa_deploy.errors import MissingDependency, UserError
from spofa_deploy.models import create_model, data_config
from spofa_deploy.run_dirs import mark_latest

SIZE = 32


def _save(folder: Path, name: str, model_name: str, role: str, **extra) -> Path:
    torch.manual_seed(0)
    model = create_model(model_name, 10, img_size=SIZE)
    meta = {"model": model_name, "num_classes": 10, "classes": [str(i) for i in range(10)], "img_size": SIZE,
            **data_config(model), "data": "digits", "role": role, "method": "spofa", "teacher": "test_vit",
            "teacher_file": "teacher.safetensors", "top1": 0.0, "top5": 0.0, "saved": "model", **extra}
    path = folder / f"{name}.safetensors"
    save_model(path, model, meta)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with an (untrained) test_resnet student and test_vit teacher."""
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    folder.mkdir()
    _save(folder, "student", "test_resnet", "student")
    _save(folder, "teacher", "test_vit", "teacher")
    return folder


@pytest.fixture()
def student(run_dir, tmp_path) -> Path:
    """A private copy of the student, so each test sees its own folder."""
    for f in ("student.safetensors", "student.json"):
        (tmp_path / f).write_bytes((run_dir / f).read_bytes())
    return tmp_path / "student.safetensors"


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _torch_logits(path: Path, x: np.ndarray) -> np.ndarray:
    from spofa_deploy.artifacts import load_model

    model, _ = load_model(path)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# ------------------------------------------------------------------------------------------ ONNX

@pytest.mark.parametrize("model_name", ["test_resnet", "mobilenetv3_small_050"])
def test_onnx_export_two_families(tmp_path, model_name):
    src = _save(tmp_path, "student", model_name, "student")
    r = export_model(src, ExportOptions("onnx"))

    assert r.path == tmp_path / "student.onnx" and r.path.is_file()
    model = onnx.load(str(r.path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.opset_import[0].version >= 17
    # Default: a dynamic batch (1..256), so one file serves batch-1 latency and large-batch throughput.
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert r.parity.images == "val" and r.parity.n == 64
    assert r.parity.max_abs_err < 1e-4 and r.parity.top1_agreement == 100.0

    side = json.loads(r.sidecar.read_text())
    assert r.sidecar == tmp_path / "student.onnx.json"
    for key in ("model", "num_classes", "classes", "img_size", "mean", "std", "interpolation", "crop_pct", "data", "saved"):
        assert side[key] == json.loads((tmp_path / "student.json").read_text())[key]
    assert side["format"] == "onnx" and side["precision"] == "fp32" and side["opset"] >= 17
    assert side["batch"] == {"min": 1, "opt": 16, "max": 256, "dynamic": True}
    assert side["source"] == "student.safetensors"
    assert {"torch", "timm", "onnx", "onnxruntime"} <= set(side["versions"])
    assert side["parity"]["max_abs_err"] == pytest.approx(r.parity.max_abs_err)
    assert r.size_bytes == r.path.stat().st_size
    assert not [f for f in _files(tmp_path) if f.startswith(".")]  # no temp files left behind


def test_dynamic_batch_runs_batch_1_and_7(student):
    r = export_model(student, ExportOptions("onnx", dynamic_batch=(1, 4, 8)))
    dim0 = onnx.load(str(r.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert json.loads(r.sidecar.read_text())["batch"] == {"min": 1, "opt": 4, "max": 8, "dynamic": True}
    session = ort_session(r.path)
    rng = np.random.default_rng(0)
    for n in (1, 7):
        x = rng.standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)
        out = session.run(["logits"], {"images": x})[0]
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, _torch_logits(student, x), atol=1e-4)


def test_fixed_batch_graph_rejects_other_batches(student):
    r = export_model(student, ExportOptions("onnx", batch=2))
    session = ort_session(r.path)
    assert session.run(["logits"], {"images": np.zeros((2, 3, SIZE, SIZE), np.float32)})[0].shape == (2, 10)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(["logits"], {"images": np.zeros((7, 3, SIZE, SIZE), np.float32)})


def test_teacher_export_keeps_layernorm_one_node(run_dir, tmp_path):
    r = export_model(run_dir / "student.safetensors", ExportOptions("onnx", out=tmp_path), teacher=True)
    assert r.path == tmp_path / "teacher.onnx"
    ops = [n.op_type for n in onnx.load(str(r.path)).graph.node]
    assert ops.count("LayerNormalization") >= 2  # opset 17: one node per LayerNorm, not a decomposed chain
    side = json.loads(r.sidecar.read_text())
    assert side["model"] == "test_vit" and side["role"] == "teacher"
    assert side["source"] == str((run_dir / "teacher.safetensors").resolve())
    assert r.parity.max_abs_err < 1e-4


@pytest.mark.parametrize("where", ["runs/run-1", "elsewhere/run-1"])
def test_no_source_exports_the_latest_run(tmp_path, monkeypatch, run_dir, where):
    """runs/latest follows the newest run even when --out put it outside runs/."""
    old = tmp_path / "runs" / "run-0"
    run = tmp_path / where
    for r in (old, run):
        r.mkdir(parents=True)
        for f in ("student.safetensors", "student.json"):
            (r / f).write_bytes((run_dir / f).read_bytes())
    monkeypatch.chdir(tmp_path)
    mark_latest(old)
    mark_latest(run)
    r = export_model(None, ExportOptions("onnx"))
    assert r.path.resolve() == (run / "student.onnx").resolve()
    assert not (old / "student.onnx").exists()


def test_slim_off_and_on_keep_parity(student):
    plain = export_model(student, ExportOptions("onnx", slim=False, out=student.parent / "plain.onnx"))
    assert json.loads(plain.sidecar.read_text())["slim"] is False
    if importlib.util.find_spec("onnxslim"):
        slim = export_model(student, ExportOptions("onnx", slim=True))
        assert json.loads(slim.sidecar.read_text())["slim"] is True
        assert slim.parity.max_abs_err < 1e-4


def test_dynamo_exporter_switch(student):
    r = export_model(student, ExportOptions("onnx", exporter="dynamo", dynamic_batch=(1, 2, 8)))
    assert r.opset >= 18 and r.parity.max_abs_err < 1e-4
    assert _files(student.parent) == {"student.safetensors", "student.json", "student.onnx", "student.onnx.json"}


# ------------------------------------------------------------------------------------ bad input

def _refused(folder: Path, match: str, source, options: ExportOptions) -> UserError:
    before = _files(folder)
    with pytest.raises(UserError, match=match) as info:
        export_model(source, options)
    assert _files(folder) == before, "a failed export left files behind"
    return info.value


def test_refuses_student_without_metadata(student):
    (student.parent / "student.json").unlink()
    _refused(student.parent, "no sidecar", student, ExportOptions("onnx"))


def test_refuses_metadata_of_another_model(student):
    side = student.parent / "student.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "model": "mobilenetv3_small_050"}))
    _refused(student.parent, "does not match mobilenetv3_small_050", student, ExportOptions("onnx"))


def test_refuses_unknown_format_with_suggestion(student):
    _refused(student.parent, "did you mean 'onnx'", student, ExportOptions("onnxx"))


def test_refuses_unknown_precision_with_suggestion(student):
    _refused(student.parent, "did you mean 'fp16'", student, ExportOptions("onnx", "fp61"))


def test_refuses_precision_the_format_lacks(student):
    _refused(student.parent, "does not support bf16", student, ExportOptions("onnx", "bf16"))


def test_refuses_int8_without_calibration_data(student):
    _refused(student.parent, "calibration images", student,
             ExportOptions("onnx", "int8", int8=Int8Options(calib_data=f"imagefolder:{student.parent / 'no-such-folder'}")))
    side = student.parent / "student.json"
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "data"}))
    _refused(student.parent, "--calib-data", student, ExportOptions("onnx", "int8"))


def test_refuses_output_in_missing_folder(student):
    _refused(student.parent, "does not exist", student, ExportOptions("onnx", out=student.parent / "nope" / "m.onnx"))


def test_refuses_existing_output_unless_forced(student):
    first = export_model(student, ExportOptions("onnx"))
    stamp = first.path.stat().st_mtime_ns
    _refused(student.parent, "--force", student, ExportOptions("onnx"))
    assert first.path.stat().st_mtime_ns == stamp
    again = export_model(student, ExportOptions("onnx", force=True, dynamic_batch="1:2:4"))
    assert json.loads(again.sidecar.read_text())["batch"]["dynamic"] is True


@pytest.mark.parametrize("kwargs, match", [
    ({"out": "m.engine"}, r"does not end in \.onnx"),
    ({"opset": 16}, ">= 17"),
    ({"dynamic_batch": "8:4:2"}, "MIN <= OPT <= MAX"),
    ({"dynamic_batch": "1-8"}, "MIN:OPT:MAX"),
    ({"batch": 0}, ">= 1"),
])
def test_refuses_bad_options(student, kwargs, match):
    if "out" in kwargs:
        kwargs = {**kwargs, "out": student.parent / kwargs["out"]}
    _refused(student.parent, match, student, ExportOptions("onnx", **kwargs))


def test_refuses_exported_artifact_as_source(student):
    r = export_model(student, ExportOptions("onnx"))
    _refused(student.parent, "already an exported onnx", r.path, ExportOptions("onnx"))


def test_parity_failure_writes_nothing(student):
    err = _refused(student.parent, "differs from PyTorch", student, ExportOptions("onnx", parity=ParityOptions(atol=1e-12, rtol=0.0)))
    assert "nothing written" in str(err)


def test_batch_and_dynamic_batch_together_are_refused(student):
    _refused(student.parent, "not both", student, ExportOptions("onnx", batch=4, dynamic_batch="1:4:8"))


def _scaled_classifier(src: Path, factor: float) -> Path:
    """A copy of the model whose classifier is scaled by `factor`: logits of that order, same arg-max."""
    model, meta = load_model(src)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.mul_(factor)
        head.bias.mul_(factor)
    out = src.parent / "big" / "student.safetensors"
    out.parent.mkdir(exist_ok=True)
    save_model(out, model, meta)
    return out


def test_parity_scales_with_large_logits(student):
    """Logits ~1e4: fp32 rounding alone gives absolute errors above 1e-3, which must not refuse a valid model."""
    big = _scaled_classifier(student, 3e4)
    r = export_model(big, ExportOptions("onnx", force=True))
    p = r.parity
    assert p.logit_scale > 1e3 and p.passed and p.decisive_disagreements == 0 and p.top1_agreement == 100.0
    assert p.max_rel_err < 1e-5  # fp32 precision, relative to the logits' scale
    side = json.loads(r.sidecar.read_text())["parity"]
    assert side["passed"] and side["checked_on"] == "onnxruntime-cpu" and side["rtol"] == p.rtol


def test_a_real_mismatch_fails_parity(student, monkeypatch):
    """A graph that is really another model (one weight changed before export) is refused, not rounded away."""
    from export.onnx import graph

    real = graph.export_onnx

    def tampered(model, path, **kw):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.get_classifier().bias[0] += 0.5
        return real(twin, path, **kw)

    monkeypatch.setattr(graph, "export_onnx", tampered)
    err = _refused(student.parent, "differs from PyTorch beyond tolerance", student, ExportOptions("onnx"))
    assert "logit scale" in str(err) and "nothing written" in str(err)


def test_compare_logits_judges_scale_and_decisive_flips():
    from export.parity import compare_logits

    ref = np.array([[1e4, 0.0, -1e4], [1.0, 0.9999, 0.0]])
    ok = compare_logits(ref, ref + np.array([[0.5, 0.0, -0.5], [0.0, 0.0, 0.0]]), "random")
    assert ok.passed and ok.max_abs_err == 0.5 and ok.max_rel_err == pytest.approx(0.5e-4)
    near_tie = compare_logits(ref, ref[:, [0, 1, 2]] + np.array([[0, 0, 0], [-2e-4, 0, 0]]), "random")
    assert near_tie.top1_agreement == 50.0 and near_tie.decisive_disagreements == 0  # a 1e-4 margin may flip
    wrong = compare_logits(ref, ref[:, [1, 0, 2]], "random")
    assert not wrong.passed and wrong.decisive_disagreements == 1


# ------------------------------------------------------------------------------------ formats

def test_formats_table_drives_names_and_lookup():
    assert format_for_path("runs/x/student.int8.onnx") is FORMATS["onnx"]
    assert format_for_path("student.fp16.engine").name == "trt"
    assert format_for_path("student.safetensors").name == "torch"
    with pytest.raises(UserError, match="unknown model file type"):
        format_for_path("student.pt")
    assert artifact_name("student", FORMATS["onnx"], "int8") == "student.int8.onnx"
    assert artifact_name("student", FORMATS["trt"], "fp32") == "student.engine"
    assert set(FORMATS["trt"].precisions) == {"fp32", "fp16", "bf16", "int8"}
    assert "fp16" in FORMATS["onnx"].precisions and "modelopt" in FORMATS["onnx"].modules_for("fp16")
    with pytest.raises(UserError, match="unknown export format"):
        get_format("torch")  # a row, but not something `spofa export` produces


def test_every_format_has_a_home_with_the_one_protocol():
    """Each row of the table names a home that exports, describes and runs that format, by the same four
    functions (export.formats): adding a format is one home and one row."""
    import inspect

    protocol = {"check_export": ["options"], "export": ["job"], "describe": ["path", "trust"],
                "runner": ["art", "backend", "device", "precision", "options"]}
    for fmt in FORMATS.values():
        for name, params in protocol.items():
            fn = getattr(fmt.home, name, None)
            assert callable(fn), f"{fmt.module} has no {name}()"
            assert list(inspect.signature(fn).parameters) == params, f"{fmt.module}.{name}{inspect.signature(fn)}"


# ------------------------------------------------------------------------------------ CLI

def test_cli_export_prints_summary(student):
    import typer
    from typer.testing import CliRunner

    from cli.cmd_export import export

    app = typer.Typer()
    app.command()(export)
    wide = {"COLUMNS": "250"}  # rich wraps long paths at the default 80 columns
    res = CliRunner().invoke(app, [str(student), "--format", "onnx", "--dynamic-batch", "1:2:4"], env=wide)
    assert res.exit_code == 0, res.output
    assert "student.onnx" in res.output and "max abs err" in res.output
    bad = CliRunner().invoke(app, [str(student), "--format", "onnx", "--precision", "int4"])
    assert isinstance(bad.exception, UserError)


# Per command: its arguments, the library function it calls, and a valid non-default value of each flag that
# takes one and that a made-up value would not pass (the CLI checks these before the call).
FLAG_CASES = {
    "export": (["export", "--format", "onnx"], "export.exporter:export_model",
               {"--format": "pt2", "--precision": "fp16", "--dynamic-batch": "1:2:4", "--role": "teacher",
                "--device": "cuda", "--quantizer": "modelopt"}),
    "bench": (["bench", "student.onnx"], "export.bench.run:run_bench",
              {"--backend": "ort-cpu", "--batch": "2,4", "--precision": "fp16", "--device": "cpu",
               "--teacher-backend": "ort-cpu"}),
}


def _recorded_call(spofa, monkeypatch, target: str, args: list[str]):
    """The arguments `spofa ARGS` passes to `target` ("module:function"), replaced by a recorder."""
    import dataclasses
    import importlib

    calls = []

    def record(*a, **k):
        calls.append(repr([dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in (*a, *k.values())]))

    module, name = target.split(":")
    monkeypatch.setattr(importlib.import_module(module), name, record)
    monkeypatch.setattr("cli.bench_table.print_report", lambda report: None)
    monkeypatch.setattr("cli.cmd_export._print_result", lambda result: None)
    monkeypatch.setattr("spofa_deploy.machine.oversubscribed", lambda: None)
    r = spofa(*args)
    assert len(calls) == 1, f"spofa {' '.join(args)} did not reach {target}: {r}"
    return calls[0]


def _non_default(option, kind: type, values: dict, tmp_path: Path) -> list[str]:
    """The command-line words that give `option` (of Python type `kind`) a value other than its default."""
    flag = option.opts[0]
    if option.is_flag:
        return [option.secondary_opts[0] if option.default is True and option.secondary_opts else flag]
    if flag in values:
        return [flag, values[flag]]
    if kind is Path:
        return [flag, str(tmp_path / f"{option.name}.out")]
    if kind in (int, float):
        return [flag, str((option.default or 0) + 3)]
    return [flag, f"{option.name}-value"]


def _kind(hint) -> type:
    """`int` of `Annotated[Optional[int], ...]`."""
    import typing

    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
    args = [a for a in typing.get_args(base) if a is not type(None)]
    return args[0] if typing.get_origin(base) is typing.Union and len(args) == 1 else base


@pytest.mark.parametrize("command", sorted(FLAG_CASES))
def test_every_flag_reaches_the_library(command, spofa, monkeypatch, tmp_path):
    """Each flag of `spofa export` / `spofa bench`, given alone with a non-default value, changes what the
    library call receives: a flag that reaches no field fails here."""
    import importlib
    import typing

    import typer.main

    from cli.main import app

    base, target, values = FLAG_CASES[command]
    hints = typing.get_type_hints(getattr(importlib.import_module(f"cli.cmd_{command}"), command), include_extras=True)
    baseline = _recorded_call(spofa, monkeypatch, target, base)
    options = [p for p in typer.main.get_command(app).commands[command].params
               if p.param_type_name == "option" and p.name != "help"]
    assert len(options) >= 15
    for option in options:
        words = _non_default(option, _kind(hints[option.name]), values, tmp_path)
        got = _recorded_call(spofa, monkeypatch, target, [*base, *words])
        assert got != baseline, f"spofa {command} {option.opts[0]} reaches no field of {target}"


# ------------------------------------------------------------------------------------ TensorRT

def test_trt_missing_is_one_clear_error(student):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: the build test covers this machine")
    err = _refused(student.parent, "TensorRT|GPU", student, ExportOptions("trt", "fp16"))
    assert isinstance(err, MissingDependency)
    if importlib.util.find_spec("tensorrt") is None:
        assert "pip install 'tensorrt>=10'" in str(err)


def test_engine_without_sidecar_is_refused(tmp_path):
    from export import tensorrt

    engine = tmp_path / "x.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(UserError, match="no sidecar"):
        tensorrt.describe(engine)


def test_engine_from_other_tensorrt_or_gpu_is_refused(tmp_path):
    here = {"tensorrt": "10.13.3", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    check_engine_meta(dict(here), here, tmp_path / "a.engine")  # same machine: fine
    with pytest.raises(UserError, match=r"TensorRT 10\.9\.0.*TensorRT 10\.13\.3"):
        check_engine_meta({**here, "tensorrt": "10.9.0"}, here, tmp_path / "a.engine")
    with pytest.raises(UserError, match="NVIDIA L4.*NVIDIA H100"):
        check_engine_meta({**here, "gpu": "NVIDIA L4", "compute_capability": "8.9"}, here, tmp_path / "a.engine")


@pytest.fixture()
def trt_ready():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'tensorrt>=10' on a machine with an NVIDIA GPU")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU and none is visible")


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_trt_engine_build_and_run(trt_ready, student, tmp_path, precision):
    from export import tensorrt as trt_export

    if precision in ("fp16", "bf16") and trt_export.strongly_typed(precision) and importlib.util.find_spec("modelopt") is None:
        pytest.skip(f"{precision} on a strongly typed TensorRT needs ModelOpt AutoCast")
    cache = tmp_path / "timing.cache"
    r = export_model(student, ExportOptions("trt", precision, dynamic_batch=(1, 4, 8), int8=Int8Options(calib_samples=64),
                                            trt=TrtOptions(timing_cache=cache)))
    assert r.path.suffix == ".engine" and r.onnx_path.is_file() and cache.is_file()
    side = json.loads(r.sidecar.read_text())
    assert {"tensorrt", "gpu", "compute_capability"} <= set(side) and side["format"] == "trt"
    assert side["parity_engine"]["checked_on"].startswith("tensorrt") and r.parity_engine.top1_agreement >= 90.0
    runner = TrtEngine(r.path)
    assert runner.batch == {"min": 1, "opt": 4, "max": 8}
    tol = {"fp32": 1e-2, "fp16": 5e-2, "int8": 1.0}[precision]
    for n in (1, 7):
        x = torch.randn(n, 3, SIZE, SIZE)
        out = runner(x.cuda()).float().cpu()
        torch.cuda.synchronize()
        np.testing.assert_allclose(out.numpy(), _torch_logits(student, x.numpy()), atol=tol)
    with pytest.raises(UserError, match="outside the engine's profile"):
        runner(torch.randn(9, 3, SIZE, SIZE).cuda())
    os.remove(r.sidecar)
    with pytest.raises(UserError, match="no sidecar"):
        describe(r.path)
    assert describe(r.path, trust=True).batch_range == (1, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (checks the ONNX against the CUDA PyTorch model)")
def test_onnx_matches_cuda_pytorch(student, tmp_path):
    from export.onnx import run_onnx
    from spofa_deploy.artifacts import load_model

    r = export_model(student, ExportOptions("onnx", dynamic_batch=(1, 4, 8), out=tmp_path / "s.onnx"))
    model, _ = load_model(student)
    model = model.cuda().eval()
    x = torch.randn(7, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x.cuda()).float().cpu().numpy()
    got = run_onnx(ort_session(r.path), x.numpy())
    # cuDNN and ORT's CPU kernels sum in different orders: fp32 rounding only.
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)
    assert (got.argmax(1) == ref.argmax(1)).all()


# ------------------------------------------------------------------------------------ bf16 on TensorRT 11

def test_bf16_engine_is_checked_on_the_engine_not_in_ort_cpu(student, monkeypatch):
    """TensorRT 11 gets bf16 only from a ModelOpt AutoCast graph (opset 22), which ONNX Runtime's CPU
    provider cannot run (no bf16 Conv kernel): the exporter must not ask ORT CPU to run it, and must
    check the built engine instead. TensorRT is not installable here, so its two calls (build, run)
    are stood in for; the AutoCast conversion and everything around it are real."""
    pytest.importorskip("modelopt.onnx.autocast", reason="NVIDIA ModelOpt is not installed")
    import export.tensorrt as trt_home
    from export.onnx import graph
    from export.parity import torch_logits
    from export.runner import Runner

    opened: list[str] = []
    real_session = graph.ort_session

    def recording_session(path, **kw):
        opened.append(Path(path).name)
        return real_session(path, **kw)

    def fake_build(onnx_path, engine_path, precision, batch, **kw):
        graph_ = onnx.load(str(onnx_path))
        fake_build.opset = graph.model_opset(graph_)
        Path(engine_path).write_bytes(b"stand-in engine")
        return {"tensorrt": "11.0.0", "gpu": "NVIDIA H200", "compute_capability": "9.0", "build_seconds": 0.1}

    model, _ = load_model(student)

    class StandIn(Runner):
        """The engine's runner, stood in for by PyTorch itself."""

        def __init__(self, art):
            super().__init__(**self.of_artifact(art), backend="trt", device="cuda")

        def _load(self):
            pass

        def _prepare(self, batch):
            raise NotImplementedError

        def _infer(self, x):
            return torch.from_numpy(torch_logits(model, x.numpy()))

    monkeypatch.setattr(graph, "ort_session", recording_session)
    monkeypatch.setattr(trt_home, "check_export", lambda options: None)
    monkeypatch.setattr(trt_home, "onnx_precision_for", lambda p: p)  # TensorRT 11: strongly typed
    monkeypatch.setattr(trt_home, "build_engine", fake_build)
    monkeypatch.setattr(trt_home, "TrtRunner", StandIn)
    r = export_model(student, ExportOptions("trt", "bf16", gate=GateOptions(samples=64)))
    assert fake_build.opset >= 22  # the real bf16 AutoCast graph was built from
    assert opened == ["fp32.onnx"]  # ORT CPU ran the fp32 graph only, never the bf16 one
    assert r.parity is None and r.parity_engine.passed and "H200" in r.parity_engine.checked_on
    side = json.loads(r.sidecar.read_text())
    assert side.get("parity") is None and "checked on the engine" in side["parity_note"]
    assert side["parity_fp32"]["checked_on"] == "onnxruntime-cpu" and side["parity_engine"]["checked_on"].startswith("tensorrt")
    assert json.loads((student.parent / "student.bf16.onnx.json").read_text())["opset"] >= 22
    # The accuracy gate judged the engine (here the stand-in, PyTorch itself: no drop), not ORT CPU.
    assert "H200" in r.gate.checked_on and r.gate.drop == 0 and r.gate.n == 64 and side["gate"]["passed"]


def test_a_runner_that_fails_on_the_validation_images_fails_the_gate_not_skips_it(monkeypatch) -> None:
    """Only missing validation images skip the gate (with a warning); a runner's own error is the export's."""
    from types import SimpleNamespace

    import export.exporter as exporter
    import export.gate as gates

    job = SimpleNamespace(model=torch.nn.Linear(4, 3).eval(), meta={},
                          options=SimpleNamespace(gate=SimpleNamespace(samples=8), seed=0))
    images = [(np.random.default_rng(0).standard_normal((8, 4), dtype=np.float32), np.arange(8) % 3)]
    monkeypatch.setattr(gates, "validation_split", lambda meta: images)
    monkeypatch.setattr(gates, "draw", lambda ds, n, seed: None)
    monkeypatch.setattr(gates, "batches", lambda ds, idx: iter(ds))

    def fails(x):
        raise UserError("TensorRT refused the shape")

    with pytest.raises(UserError, match="TensorRT refused the shape"):
        exporter.ExportJob.scores(job, {"artifact": SimpleNamespace(logits=fails)})
    same = SimpleNamespace(logits=lambda x: job.model(torch.from_numpy(x)).detach().numpy())
    ok = exporter.ExportJob.scores(job, {"artifact": same})
    assert ok.n == 8 and ok.top1["artifact"] == ok.reference and ok.disagreement["artifact"] == 0

    def unavailable(meta):
        raise UserError("the model metadata names no data set")

    monkeypatch.setattr(gates, "validation_split", unavailable)
    assert exporter.ExportJob.scores(job, {"artifact": SimpleNamespace(logits=fails)}) is None


def test_a_refusal_advises_what_fits_its_precision() -> None:
    from export.gate import GateResult, refusal

    gate = GateResult(reference_top1=98.0, top1=90.0, disagreement=8.0, n=100, max_drop=1.0, checked_on="ort-cpu")
    assert "--calib-samples" in refusal(gate, "int8", "x.onnx") and "--calib-samples" not in refusal(gate, "fp16", "x")
    assert "try fp32, or --max-drop 0" in refusal(gate, "bf16", "x.onnx")


def test_what_a_killed_refusal_left_half_published_is_removed_by_the_next_export(student) -> None:
    """A refused export publishes under the aside name with the same marker protocol: its half pair is cleaned too."""
    from export.exporter import _pending, aside

    dest = student.parent / "student.onnx"
    kept, kept_side = aside(dest), student.parent / "student.refused.onnx.json"
    kept.write_bytes(b"new artifact")
    kept_side.write_text('{"sha256": "of the older artifact"}')
    _pending(kept).write_text("{}")
    export_model(student, ExportOptions("onnx", batch=2))
    assert dest.is_file() and not kept.exists() and not _pending(kept).exists() and not kept_side.exists()
