"""Input hardening through the real CLI: every bad input gets exit 2, one `error:` line, no traceback
(unless --debug), and leaves the files it was given, and any existing run folder, byte-for-byte as they were.

Inputs (built once, in `inputs`): an existing run folder (teacher + student artifacts), a PNG, a PNG
posing as a teacher (.safetensors + a valid sidecar), a truncated .safetensors, an ONNX whose graph
reads an undefined tensor, garbage bytes as .onnx and as .engine, image folders with a corrupt file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import faultkit as fk
from faultkit import DIGITS, job, spofa

BENCH_FAST = ["--no-accuracy", "--batch", "1", "--warmup-s", "0", "--min-s", "0.01", "--min-iters", "1", "--rounds", "1"]
TINY = ["--teacher", "test_vit", "--student", "test_resnet", "--workers", "0", "--device", "cpu", "--epochs", "1"]


def _images(folder: Path, counts: dict[str, int], corrupt: str | None = None) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", counts), ("val", {c: 3 for c in counts})):
        for c, n in per_class.items():
            d = folder / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (folder / "train" / corrupt / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG cut short
    return folder


def _vouch(artifact: Path) -> None:
    """The sidecar records the file's own digest, so the case reaches the check it is about (a file whose bytes
    differ from its sidecar's digest is refused before that: tests/faults/test_hardening.py)."""
    from spofa_deploy.artifacts import file_digest, sidecar_path

    side = sidecar_path(artifact)
    side.write_text(json.dumps({**json.loads(side.read_text()), **file_digest(artifact)}))


@job("inputs", priority=3)
def _inputs(ctx) -> dict:
    import onnx
    from onnx import TensorProto, helper
    from PIL import Image

    root = ctx.root / "inputs"
    existing = root / "existing"
    fk.make_model_file(existing / "teacher.safetensors", "test_vit", DIGITS, "digits", "teacher")
    student = fk.make_model_file(existing / "student.safetensors", "test_resnet", DIGITS, "digits", "student",
                                 method="spofa", teacher="test_vit", teacher_file="teacher.safetensors")
    meta = json.loads((existing / "student.json").read_text())

    png = root / "picture.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(png)
    fake = root / "png_teacher" / "teacher.safetensors"  # a PNG renamed, beside a valid teacher sidecar
    fake.parent.mkdir()
    shutil.copyfile(png, fake)
    shutil.copyfile(existing / "teacher.json", fake.with_suffix(".json"))
    _vouch(fake)

    trunc = root / "truncated" / "student.safetensors"
    trunc.parent.mkdir()
    data = student.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    shutil.copyfile(existing / "student.json", trunc.with_suffix(".json"))
    _vouch(trunc)

    onnx_side = {**meta, "format": "onnx", "precision": "fp32", "opset": 17, "source": "student.safetensors",
                 "batch": {"min": 1, "opt": 1, "max": 1, "dynamic": False}}
    broken = root / "onnx" / "broken.onnx"  # valid protobuf, but its only node reads a tensor nothing defines
    broken.parent.mkdir()
    graph = helper.make_graph([helper.make_node("Relu", ["undefined"], ["logits"])], "broken",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), broken)
    (root / "onnx" / "broken.onnx.json").write_text(json.dumps(onnx_side))
    _vouch(broken)
    garbage_onnx = root / "onnx" / "garbage.onnx"
    garbage_onnx.write_bytes(os.urandom(2048))
    (root / "onnx" / "garbage.onnx.json").write_text(json.dumps(onnx_side))
    _vouch(garbage_onnx)

    engines = root / "engines"
    engines.mkdir()
    (engines / "nosidecar.engine").write_bytes(os.urandom(4096))
    (engines / "foreign.engine").write_bytes(os.urandom(4096))
    (engines / "foreign.engine.json").write_text(json.dumps(
        {**meta, "format": "trt", "precision": "fp16", "opset": 17, "batch": {"min": 1, "opt": 1, "max": 1},
         "tensorrt": "9.9.9", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}))
    _vouch(engines / "foreign.engine")

    corrupt = _images(root / "imgs_corrupt", {"a": 7, "b": 8}, corrupt="a")  # 16 train files, 1 unreadable
    odd = _images(root / "imgs_17", {"a": 9, "b": 8})  # 17 train images: batch 4 leaves a last batch of 1
    ab_teacher = fk.make_model_file(root / "ab_teacher" / "teacher.safetensors", "test_vit", ["a", "b"],
                                    f"imagefolder:{corrupt}", "teacher")
    work = ctx.root / "work"
    work.mkdir()
    return {"root": root, "existing": existing, "student": student, "png": png, "png_teacher": fake, "trunc": trunc,
            "broken_onnx": broken, "garbage_onnx": garbage_onnx, "engine_nosidecar": engines / "nosidecar.engine",
            "engine_foreign": engines / "foreign.engine", "imgs_corrupt": corrupt, "imgs_17": odd,
            "ab_teacher": ab_teacher, "work": work}


# Each case: name -> build(ctx, inputs) -> dict(args, [fault], [cwd], [protect: extra paths that must not change]).
CASES = {
    "unknown_flag": lambda c, i: dict(args=["distill", "--bogus"]),
    "bad_int_value": lambda c, i: dict(args=["distill", "--epochs", "abc"]),
    "unknown_method": lambda c, i: dict(args=["distill", *TINY, "--method", "bogus", "--out", i["work"] / "m"]),
    "unknown_format": lambda c, i: dict(args=["export", i["student"], "--format", "bogus"]),
    "late_value": lambda c, i: dict(args=["distill", *TINY, "--data", "digits", "--teacher-ckpt", c.result("teacher"),
                                          "--on-nan", "maybe", "--out", _latest_root(i) / "new"],
                                    cwd=_latest_root(i).parent, protect=[_latest_root(i)]),
    "png_as_teacher": lambda c, i: dict(args=["distill", *TINY, "--data", "digits", "--teacher-ckpt", i["png_teacher"],
                                              "--out", i["work"] / "png_teacher"]),
    "png_as_teacher_debug": lambda c, i: dict(args=["--debug", "distill", *TINY, "--data", "digits", "--teacher-ckpt",
                                                    i["png_teacher"], "--out", i["work"] / "png_teacher_debug"]),
    "png_as_checkpoint": lambda c, i: dict(args=["distill", *TINY, "--data", "digits", "--resume",
                                                 "--out", _png_checkpoint_run(i)], protect=[_png_checkpoint_run(i)]),
    "truncated_safetensors": lambda c, i: dict(args=["export", i["trunc"], "--format", "onnx"]),
    "broken_onnx_bench": lambda c, i: dict(args=["bench", i["broken_onnx"], "--backend", "ort-cpu", *BENCH_FAST]),
    "broken_onnx_export": lambda c, i: dict(args=["export", i["broken_onnx"], "--format", "onnx"]),
    "garbage_onnx_bench": lambda c, i: dict(args=["bench", i["garbage_onnx"], "--backend", "ort-cpu", *BENCH_FAST]),
    "engine_no_sidecar": lambda c, i: dict(args=["bench", i["engine_nosidecar"], "--no-accuracy", "--batch", "1"]),
    "engine_no_sidecar_trust": lambda c, i: dict(args=["bench", i["engine_nosidecar"], "--trust", "--no-accuracy",
                                                       "--batch", "1"]),
    "engine_other_tensorrt": lambda c, i: dict(args=["bench", i["engine_foreign"], "--no-accuracy", "--batch", "1"],
                                               fault={"fake_trt": "10.3.0"}),
    "engine_without_tensorrt": lambda c, i: dict(args=["bench", i["engine_foreign"], *BENCH_FAST]),
    "corrupt_image": lambda c, i: dict(args=["distill", *TINY, "--data", f"imagefolder:{i['imgs_corrupt']}",
                                             "--img-size", "32", "--batch-size", "4", "--teacher-ckpt", i["ab_teacher"],
                                             "--out", i["work"] / "corrupt"]),
    "corrupt_image_skip": lambda c, i: dict(args=["distill", *TINY, "--data", f"imagefolder:{i['imgs_corrupt']}",
                                                  "--img-size", "32", "--batch-size", "4", "--teacher-ckpt",
                                                  i["ab_teacher"], "--skip-corrupt", "--out", i["work"] / "corrupt_skip"]),
    "corrupt_image_skip_teacher_stage": lambda c, i: dict(
        args=["distill", *TINY, "--data", f"imagefolder:{i['imgs_corrupt']}", "--img-size", "32", "--batch-size", "4",
              "--teacher-epochs", "1", "--no-pretrained", "--skip-corrupt", "--out", i["work"] / "corrupt_teacher"],
        cwd=_fresh(i["work"] / "corrupt_teacher_cwd")),
    "last_batch_of_one": lambda c, i: dict(args=["distill", *TINY, "--data", f"imagefolder:{i['imgs_17']}",
                                                 "--img-size", "32", "--batch-size", "4", "--teacher-ckpt",
                                                 i["ab_teacher"], "--out", i["work"] / "odd"]),
    "class_mismatch": lambda c, i: dict(args=["distill", *TINY, "--data", f"imagefolder:{i['imgs_corrupt']}",
                                              "--img-size", "32", "--teacher-ckpt", c.result("teacher"),
                                              "--out", i["work"] / "mismatch"]),
    "non_utf8_out": lambda c, i: dict(args=["distill", *TINY, "--data", "digits", "--train-fraction", "0.05",
                                            "--batch-size", "16", "--teacher-ckpt", c.result("teacher"),
                                            "--out", os.fsencode(i["work"]) + b"/run \xff\xfe"]),
    "non_utf8_missing_file": lambda c, i: dict(args=["bench", os.fsencode(i["work"]) + b"/nowhere\xff/student.onnx"]),
}


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _latest_root(i) -> Path:
    """runs/ (of the command's working folder) with a good run that runs/latest points at (a refused command
    must not repoint it)."""
    runs = i["work"] / "latest_cwd" / "runs"
    if not runs.exists():
        fk.copy_run(i["existing"], runs / "good")
        (runs / "latest").symlink_to("good", target_is_directory=True)
    return runs


def _png_checkpoint_run(i) -> Path:
    run = i["work"] / "png_checkpoint" / "run"
    if not run.exists():
        fk.copy_run(i["existing"], run)
        shutil.copyfile(i["png"], run / fk.CHECKPOINT)
    return run


def _run_case(name: str):
    def run(ctx):
        i = ctx.result("inputs")
        spec = CASES[name](ctx, i)
        protect = [i["root"], *spec.get("protect", [])]
        before = [fk.tree_hash(p) for p in protect]
        r = spofa(spec["args"], fault=spec.get("fault"), cwd=spec.get("cwd"))
        changed = [f"{p.name}/{f}" for p, b in zip(protect, before) for f in fk.changed(b, fk.tree_hash(p))]
        return {"result": r, "changed": changed, "inputs": i}
    return run


for _name in CASES:
    job(f"bad:{_name}")(_run_case(_name))


def _case(jobs, name: str) -> dict:
    c = jobs.result(f"bad:{name}")
    assert not c["changed"], f"files changed by a refused command: {c['changed']}\n{c['result']}"
    return c


def case(name: str, needles: list[str], *marks):
    return pytest.param(name, needles, marks=[pytest.mark.uses("teacher", "inputs", f"bad:{name}"), *marks], id=name)


USER_ERRORS = [
    case("unknown_flag", ["--bogus"]),
    case("bad_int_value", ["--epochs"]),
    case("unknown_method", ["unknown method 'bogus'"]),
    case("unknown_format", ["bogus"]),
    case("png_as_teacher", ["not a readable safetensors file"]),
    case("truncated_safetensors", ["not a readable safetensors file"]),
    case("broken_onnx_bench", ["broken.onnx"]),
    case("broken_onnx_export", [".safetensors"]),
    case("garbage_onnx_bench", ["not a readable ONNX file"]),
    case("engine_no_sidecar", ["no sidecar", "nosidecar.engine.json"]),
    case("engine_no_sidecar_trust", ["TensorRT"]),
    case("engine_other_tensorrt", ["TensorRT 9.9.9", "TensorRT 10.3.0"]),
    case("engine_without_tensorrt", ["TensorRT"]),
    case("corrupt_image", ["cannot read image", "bad.png", "--skip-corrupt"]),
    case("class_mismatch", ["10 classes", "has 2"]),
    case("non_utf8_missing_file", ["not found"]),
]


@pytest.mark.parametrize("name, needles", USER_ERRORS)
def test_refused_with_one_clear_line(jobs, name: str, needles: list[str]) -> None:
    c = _case(jobs, name)
    fk.assert_user_error(c["result"], *needles)


@pytest.mark.uses("teacher", "inputs", "bad:late_value")
def test_a_bad_training_value_writes_nothing(jobs) -> None:
    """Refused before the run folder, the teacher copy or runs/latest are written."""
    c = jobs.result("bad:late_value")
    fk.assert_user_error(c["result"], "--on-nan")
    runs = c["inputs"]["work"] / "latest_cwd" / "runs"
    assert os.readlink(runs / "latest") == "good"
    assert not (runs / "new").exists()


@pytest.mark.uses("teacher", "inputs", "bad:png_as_checkpoint")
def test_png_as_resume_checkpoint_is_refused(jobs) -> None:
    c = jobs.result("bad:png_as_checkpoint")
    fk.assert_user_error(c["result"], "not a readable spofa checkpoint")


@pytest.mark.uses("teacher", "inputs", "bad:png_as_checkpoint")
def test_png_as_resume_checkpoint_changes_no_file(jobs) -> None:
    _case(jobs, "png_as_checkpoint")


@pytest.mark.uses("teacher", "inputs", "bad:png_as_teacher_debug")
def test_debug_shows_the_traceback(jobs) -> None:
    c = _case(jobs, "png_as_teacher_debug")
    r = c["result"]
    assert r.rc != 0, r
    assert "Traceback" in r.err and "UserError" in r.err and "not a readable safetensors file" in r.err, r


@pytest.mark.uses("teacher", "inputs", "bad:corrupt_image_skip")
def test_corrupt_image_skipped_with_a_warning(jobs) -> None:
    c = _case(jobs, "corrupt_image_skip")
    r = c["result"]
    assert r.rc == 0, r
    assert "Traceback" not in r.err
    assert any("bad.png" in line for line in r.err_lines()), f"no warning names the skipped file\n{r}"
    fk.check_run_readable(c["inputs"]["work"] / "corrupt_skip")


@pytest.mark.uses("teacher", "inputs", "bad:corrupt_image_skip")
def test_corrupt_image_skip_reports_a_count(jobs) -> None:
    r = jobs.result("bad:corrupt_image_skip")["result"]
    assert any(("1 unreadable" in line or "skipped 1" in line) for line in r.err_lines()), r


@pytest.mark.uses("teacher", "inputs", "bad:corrupt_image_skip_teacher_stage")
def test_corrupt_image_skip_covers_the_teacher_stage(jobs) -> None:
    r = _case(jobs, "corrupt_image_skip_teacher_stage")["result"]
    assert r.rc == 0, r


@pytest.mark.uses("teacher", "inputs", "bad:last_batch_of_one")
def test_last_training_batch_of_one(jobs) -> None:
    r = _case(jobs, "last_batch_of_one")["result"]
    assert r.rc == 0, r


def _non_utf8_run(c) -> Path:
    return Path(os.fsdecode(os.fsencode(c["inputs"]["work"]) + b"/run \xff\xfe"))


@pytest.mark.uses("teacher", "inputs", "bad:non_utf8_out")
def test_non_utf8_and_space_in_the_output_path(jobs) -> None:
    c = _case(jobs, "non_utf8_out")
    assert c["result"].rc == 0, c["result"]
    run = _non_utf8_run(c)
    assert fk.check_run_readable(run, student=False)["epoch"] == 1
    assert json.loads((run / "student.json").read_text(encoding="utf-8"))["model"] == "test_resnet"


@pytest.mark.uses("teacher", "inputs", "bad:non_utf8_out")
def test_non_utf8_output_path_reads_back(jobs) -> None:
    c = jobs.result("bad:non_utf8_out")
    assert c["result"].rc == 0, c["result"]
    from spofa_deploy.artifacts import load_student

    load_student(_non_utf8_run(c) / "student.safetensors")


@pytest.mark.uses("inputs")
def test_read_only_output_folder(jobs, tmp_path) -> None:
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").write_text("x")
    except PermissionError:
        pass
    else:
        ro.chmod(0o755)
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 0o555 does not stop writes here, "
                    "so a read-only output folder cannot be simulated")
    i = jobs.result("inputs")
    try:
        for args in (["export", i["student"], "--format", "onnx", "--out", ro],
                     ["distill", *TINY, "--data", "digits", "--teacher-ckpt", i["existing"] / "teacher.safetensors",
                      "--out", ro / "run"]):
            r = spofa(args)
            fk.assert_user_error(r)
            assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
