"""Artifacts checked before they load, one writer per folder, disk and size problems as one-line user errors.

Each case runs the real CLI: in this process (`cli.main.main` with sys.argv) where nothing can kill the
test, in a subprocess (`faultkit.spofa`) where a fault kills the command or a crash would end the test.
The full and read-only disks are small tmpfs mounts where the test may mount one (root in a container);
elsewhere those tests skip, and `test_full_disk_stand_in` raises ENOSPC from the checkpoint write instead.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import faultkit as fk
from faultkit import DIGITS

TINY = ["--teacher", "test_vit", "--student", "test_resnet", "--workers", "0", "--device", "cpu", "--epochs", "1"]
BENCH_FAST = ["--no-accuracy", "--batch", "1", "--warmup-s", "0", "--min-s", "0.01", "--min-iters", "1", "--rounds", "1"]


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    import spofa_deploy.machine as machine

    monkeypatch.setattr(machine, "oversubscribed", lambda: None)


def _user_error(r, *needles: str) -> None:
    assert r.code == 2, r
    assert "Traceback" not in r.err and r.error().startswith("error: "), r
    for n in needles:
        assert n.lower() in r.error().lower(), r


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as `spofa distill` leaves it: an (untrained) test_resnet student and test_vit teacher."""
    folder = tmp_path_factory.mktemp("hardening") / "run"
    fk.make_model_file(folder / "teacher.safetensors", "test_vit", DIGITS, "digits", "teacher")
    fk.make_model_file(folder / "student.safetensors", "test_resnet", DIGITS, "digits", "student", method="kd",
                       teacher="test_vit", teacher_file="teacher.safetensors")
    return folder


@pytest.fixture(scope="module")
def onnx_export(run_dir) -> Path:
    from export.exporter import export_model
    from export.options import ExportOptions, ParityOptions

    return export_model(run_dir / "student.safetensors",
                        ExportOptions("onnx", dynamic_batch=(1, 2, 4), parity=ParityOptions(samples=8))).path


def _copy_pair(src: Path, folder: Path) -> Path:
    from spofa_deploy.artifacts import sidecar_path

    folder.mkdir(parents=True, exist_ok=True)
    for f in (src, sidecar_path(src)):
        shutil.copy(f, folder / f.name)
    return folder / src.name


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ integrity


def test_sidecars_record_the_digest_of_their_own_file(run_dir, onnx_export):
    from spofa_deploy.artifacts import file_digest, read_json, sidecar_path

    student = read_json(run_dir / "student.json")
    assert {k: student[k] for k in ("sha256", "size_bytes")} == file_digest(run_dir / "student.safetensors")
    side = read_json(sidecar_path(onnx_export))
    assert {k: side[k] for k in ("sha256", "size_bytes")} == file_digest(onnx_export)
    assert side["source_sha256"] == student["sha256"] != side["sha256"]
    assert not _hidden(run_dir)  # no lock, marker or temp file left by the export


def test_edited_onnx_is_refused_before_it_loads(onnx_export, tmp_path, spofa):
    art = _copy_pair(onnx_export, tmp_path)
    data = bytearray(art.read_bytes())
    data[-20] ^= 0xFF  # a weight byte near the end: still a loadable protobuf
    art.write_bytes(bytes(data))
    _user_error(spofa("bench", art, *BENCH_FAST), "sha-256", "--trust")


def test_edited_weights_refused_unless_trusted(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from spofa_deploy.artifacts import load_model
    from spofa_deploy.errors import UserError

    src = _copy_pair(run_dir / "student.safetensors", tmp_path)
    state = load_file(str(src))
    name = next(k for k in state if k.endswith("weight"))
    state[name] = state[name] + 1
    save_file(state, str(src), metadata={"format": "pt"})
    with pytest.raises(UserError, match="SHA-256 differs"):
        load_model(src)
    model, _ = load_model(src, trust=True)  # the user vouches for it: loaded as it is
    assert float((model.state_dict()[name] - load_file(str(run_dir / "student.safetensors"))[name]).mean()) == 1.0


_CONSTRUCTOR = r"""
#include <stdio.h>
__attribute__((constructor)) static void forged(void) {
    FILE *f = fopen(getenv("SPOFA_FORGED_MARK"), "w");
    if (f) { fputs("ran\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def pt2_export(run_dir) -> Path:
    from export.exporter import export_model
    from export.options import ExportOptions, ParityOptions

    return export_model(run_dir / "student.safetensors", ExportOptions("pt2", batch=1, parity=ParityOptions(samples=4))).path


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs the system C compiler (gcc) to build a forged library")
def test_forged_native_library_in_a_pt2_never_runs(pt2_export, tmp_path, spofa, monkeypatch):
    """The package's compiled library swapped for one whose constructor writes a file, the real sidecar beside it."""
    src = tmp_path / "forged.c"
    src.write_text("#include <stdlib.h>\n" + _CONSTRUCTOR)
    lib = tmp_path / "forged.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    forged = _copy_pair(pt2_export, tmp_path / "copy")
    with zipfile.ZipFile(pt2_export) as z_in, zipfile.ZipFile(forged, "w") as z_out:
        sos = [n for n in z_in.namelist() if n.endswith(".so")]
        assert sos, "an AOTInductor package holds its model as a shared library"
        for info in z_in.infolist():
            z_out.writestr(info, lib.read_bytes() if info.filename in sos else z_in.read(info))
    mark = tmp_path / "mark"
    monkeypatch.setenv("SPOFA_FORGED_MARK", str(mark))

    _user_error(spofa("bench", forged, *BENCH_FAST), "sha-256")
    assert not mark.exists(), "the forged library's constructor ran"
    # The control: with --trust the package is loaded, and the forged code runs (then the load fails).
    r = spofa("bench", forged, *BENCH_FAST, "--trust")
    assert mark.exists() and r.code != 0, r


# ------------------------------------------------------------------------------ atomic export pairs


def test_kill_between_the_two_renames_leaves_a_pair_every_reader_refuses(onnx_export, tmp_path, spofa):
    art = _copy_pair(onnx_export, tmp_path)
    shutil.copy(onnx_export.parent / "student.safetensors", tmp_path)
    shutil.copy(onnx_export.parent / "student.json", tmp_path)
    old = art.read_bytes()
    killed = fk.spofa(["export", tmp_path / "student.safetensors", "--format", "onnx", "--batch", "1", "--force",
                       "--out", art], fault={"kill_call": {"fn": "export.exporter:_after_artifact", "n": 0}},
                      fresh=True)
    assert killed.rc == -9, killed
    assert art.read_bytes() != old  # the new model is in place, under the old model's sidecar
    _user_error(spofa("bench", art, *BENCH_FAST), "sha-256")

    r = spofa("export", tmp_path / "student.safetensors", "--format", "onnx", "--batch", "1", "--out", art)
    assert r.code == 0 and "interrupted export" in r.err, r  # no --force needed: the half pair was removed (a warning, on stderr)
    assert not _hidden(tmp_path)
    assert spofa("bench", art, *BENCH_FAST).code == 0


# ------------------------------------------------------------------------------ one writer


@pytest.fixture
def holder(tmp_path):
    """Another process holding the write lock of a path (`hold(path)`), until the test ends."""
    procs = []

    def hold(lock_file: Path, target: Path, writer: str) -> subprocess.Popen:
        code = ("import sys; from pathlib import Path; from spofa_deploy.run_dirs import hold; "
                f"hold(Path({str(lock_file)!r}), Path({str(target)!r}), {writer!r}); print('held', flush=True); "
                "sys.stdin.read()")
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=fk.REPO)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_second_writer_of_a_run_folder_is_refused_naming_the_first(tmp_path, holder, spofa, run_dir):
    from spofa_deploy.run_dirs import lock_file

    out = tmp_path / "run"
    out.mkdir()
    first = holder(lock_file(out), out, "spofa distill")
    for args in (["distill", *TINY, "--teacher-ckpt", run_dir / "teacher.safetensors", "--out", out],
                 ["teacher", "--teacher", "test_vit", "--workers", "0", "--device", "cpu", "--out", out]):
        _user_error(spofa(*args), f"process {first.pid} (spofa distill)", "being written")
    assert list(out.iterdir()) == []  # nothing of the second writer's
    first.kill()
    first.wait()
    from spofa_deploy.run_dirs import new_run_dir, release_run

    release_run(new_run_dir(out, "x"))  # a killed holder's lock is free at once


def test_second_export_to_one_target_is_refused(onnx_export, tmp_path, holder, spofa):
    target = tmp_path / "student.onnx"
    first = holder(tmp_path / ".student.onnx.lock", target, "spofa export")
    _user_error(spofa("export", onnx_export.parent / "student.safetensors", "--format", "onnx", "--out", target),
                f"process {first.pid} (spofa export)")
    assert not target.exists()


# ------------------------------------------------------------------------------ runs, teachers, resumes


def test_teacher_refuses_an_existing_run(run_dir, tmp_path, spofa):
    import torch

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    torch.save({"epoch": 1}, out / "checkpoint-last.pt")
    before = fk.tree_hash(out)
    _user_error(spofa("teacher", "--teacher", "test_vit", "--workers", "0", "--device", "cpu", "--out", out),
                "already holds a run", "--resume")
    assert fk.tree_hash(out) == before


def test_resume_never_creates_a_folder(tmp_path, spofa, run_dir):
    out = tmp_path / "nothing-here"
    _user_error(spofa("distill", *TINY, "--teacher-ckpt", run_dir / "teacher.safetensors", "--resume", "--out", out),
                "--resume", str(out))
    assert not out.exists()


def test_teacher_weights_refused_when_a_teacher_of_other_weights_is_cached(tmp_path, spofa, monkeypatch):
    import torch

    from spofa_deploy.data.splits import DataOptions
    from spofa_deploy.teacher.stage import recipe_teacher_path

    monkeypatch.chdir(tmp_path)
    cached = recipe_teacher_path("test_vit", DataOptions("digits"))
    fk.make_model_file(cached, "test_vit", DIGITS, "digits", "teacher", source="random init")
    torch.save({"epoch": 1, "config": {"epochs": 1}}, cached.parent / "checkpoint-last.pt")
    weights = fk.make_model_file(tmp_path / "w" / "vit.safetensors", "test_vit", DIGITS, "digits", "teacher")
    _user_error(spofa("distill", *TINY, "--teacher-weights", weights, "--out", tmp_path / "r"),
                f"--teacher-weights {weights}", "random init")
    assert not (tmp_path / "r").exists()  # the early refusal leaves no empty run folder


def test_renamed_classes_named_and_no_empty_run_folder_left(tmp_path, spofa):
    letters = [chr(ord("a") + i) for i in range(10)]
    teacher = fk.make_model_file(tmp_path / "t" / "teacher.safetensors", "test_vit", letters, "digits", "teacher")
    out = tmp_path / "r"
    r = spofa("distill", *TINY, "--teacher-ckpt", teacher, "--out", out)
    _user_error(r, "other class names")
    assert "has 10 classes" in r.error() and not out.exists()


def test_a_pickle_checkpoint_is_refused_without_the_advice_to_run_it(tmp_path):
    import torch

    from spofa_deploy.errors import UserError
    from spofa_deploy.run_files import load_checkpoint

    path = tmp_path / "checkpoint-last.pt"
    torch.save({"epoch": 1, "obj": Path("a pickled object")}, path)  # a class weights_only refuses
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "could run code" in str(e.value) and "weights_only" not in str(e.value)


# ------------------------------------------------------------------------------ arguments and sidecar fields


@pytest.mark.parametrize("args, needle", [
    (["--img-size", "33"], "multiple of 16"),
    (["--img-size", "7"], "--img-size must be an integer from 8 to 1024"),
    (["--img-size", "100000"], "from 8 to 1024"),
    (["--img-size", "0"], "--img-size"),
    (["--workers", "-1"], "--workers must be"),
    (["--temperature", "0"], "--temperature must be a number > 0"),
    (["--kd-temperature", "-1", "--method", "kd"], "--kd-temperature"),
])
def test_distill_checks_sizes_and_counts_up_front(args, needle, tmp_path, spofa):
    out = tmp_path / "r"
    _user_error(spofa("distill", *TINY, *args, "--out", out), needle)
    assert not out.exists()


def test_export_refuses_an_opset_out_of_range_in_one_line(run_dir, tmp_path, spofa):
    r = spofa("export", run_dir / "student.safetensors", "--format", "onnx", "--opset", "99", "--out", tmp_path)
    _user_error(r, "--opset 99", "use 17 to")
    assert len(r.err.splitlines()) == 1 and not r.out.strip()  # no graph dump


@pytest.mark.parametrize("field, value, needle", [
    ("num_classes", "ten", "num_classes must be an integer"),
    ("img_size", -32, "img_size must be an integer from 1"),
    ("std", [0.5, 0.0, 0.5], "std must be > 0"),
    ("mean", [0.5], "mean must be a list of 3 numbers"),
])
def test_bad_sidecar_fields_are_named(field, value, needle, run_dir, tmp_path, spofa):
    art = _copy_pair(run_dir / "student.safetensors", tmp_path)
    side = tmp_path / "student.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), field: value}))
    _user_error(spofa("bench", art, *BENCH_FAST), f"student.json: {needle}")


# ------------------------------------------------------------------------------ disks


def _mount_tmpfs(where: Path, size: str, *options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """`mount(name, size, *options)`: a small tmpfs under tmp_path (the test skips where mounting is not allowed)."""
    mounted = []

    def mount(name: str, size: str = "64k", *options: str) -> Path:
        where = tmp_path / name
        if not _mount_tmpfs(where, size, *options):
            pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_export_to_a_full_disk_is_a_user_error_and_leaves_nothing(run_dir, tmpfs, spofa):
    full = tmpfs("full", "96k")  # room for the temp folder, not for the model
    _user_error(spofa("export", run_dir / "student.safetensors", "--format", "onnx", "--out", full / "s.onnx"),
                str(full / "s.onnx"), "disk is full")
    assert list(full.iterdir()) == []


def test_pt2_export_to_a_full_disk_is_a_user_error_not_an_abort(run_dir, tmpfs):
    full = tmpfs("full", "64k")
    r = fk.spofa(["export", run_dir / "student.safetensors", "--format", "pt2", "--batch", "1", "--out",
                  full / "s.pt2"], fresh=True)
    fk.assert_user_error(r, "disk is full")
    assert list(full.iterdir()) == []


def test_read_only_outputs_are_user_errors(run_dir, onnx_export, tmpfs, spofa):
    ro = tmpfs("ro", "64k", "ro")
    _user_error(spofa("export", run_dir / "student.safetensors", "--format", "onnx", "--out", ro / "s.onnx"),
                "not writable")
    _user_error(spofa("bench", onnx_export, *BENCH_FAST, "--json", ro / "b.json"), "--json", "not writable")
    _user_error(spofa("bench", onnx_export, *BENCH_FAST, "--plot", ro), "--plot", "is a folder")


def test_distill_on_a_full_disk_is_a_user_error_and_latest_stays(run_dir, tmpfs, spofa, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    before = tmp_path / "runs" / "before"
    before.mkdir(parents=True)
    (tmp_path / "runs" / "latest").symlink_to("before")
    full = tmpfs("full", "2m")  # the teacher's copy (1.2 MB) fits, the student and its checkpoint do not
    r = spofa("distill", *TINY, "--train-fraction", "0.05", "--teacher-ckpt", run_dir / "teacher.safetensors",
              "--out", full / "r")
    _user_error(r, str(full / "r"), "disk is full")
    assert os.readlink(tmp_path / "runs" / "latest") == "before"  # not the failed run: it has nothing to resume
    assert (full / "r" / "teacher.safetensors").is_file()
    assert not _hidden(full / "r") and not _hidden(full)  # no temp file, no lock


def test_full_disk_stand_in(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the checkpoint's write raises ENOSPC as a full disk would."""
    import torch

    from spofa_deploy import run_files
    from spofa_deploy.errors import UserError

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_files.torch, "save", full)
    path = tmp_path / "checkpoint-last.pt"
    with pytest.raises(UserError, match=f"cannot write {path}: the disk is full"):
        run_files.save_checkpoint(path, {"w": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []
