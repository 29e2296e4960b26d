"""The `.pt2` package (torch.export + AOTInductor) and the deployed torch-compile backend, on CPU.

An AOTInductor compile of a tiny model takes ~30 s on a busy 2-core machine (most of it g++
on the generated wrapper), so the suite builds two packages once (module fixtures): one
dynamic-batch, one fixed-batch, both fp32 on CPU.
"""
from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
import timm
import torch

from export.artifact import Artifact, BatchProfile
from export.bench.timing import TimingOptions, measure
from export.parity import compare_logits, torch_logits
from export.pt2 import Pt2Runner, check_package, check_pt2_meta, describe, export_pt2, load_pt2, package_facts
from export.pytorch import TorchRunner, check_compile_mode
from spofa_deploy.artifacts import file_digest, sidecar_path, write_json
from spofa_deploy.errors import MissingDependency, UserError

IMG = 32
CLASSES = 10


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=CLASSES, exportable=True).eval()


def _eager(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, IMG, IMG), dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    return _model()


def _package(tmp_path_factory, model, batch: BatchProfile, name: str) -> tuple:
    path = tmp_path_factory.mktemp("pt2") / f"{name}.pt2"
    facts = export_pt2(model, path, img_size=IMG, batch=batch)
    meta = {"model": "test_resnet", "num_classes": CLASSES, "img_size": IMG, "mean": [0.5] * 3, "std": [0.5] * 3,
            "format": "pt2", **facts, **file_digest(path)}
    write_json(sidecar_path(path), meta)
    return path, meta


@pytest.fixture(scope="module")
def dynamic_pkg(tmp_path_factory, model):
    return _package(tmp_path_factory, model, BatchProfile.dynamic_range(1, 4, 8), "dynamic")


@pytest.fixture(scope="module")
def fixed_pkg(tmp_path_factory, model):
    return _package(tmp_path_factory, model, BatchProfile.fixed(2), "fixed")


def _artifact(path, meta) -> Artifact:
    b = meta["batch"]
    return Artifact(path=path, format="pt2", meta=meta, precision=meta["precision"], size_bytes=path.stat().st_size,
                    batch_range=(b["min"], b["max"]))


# ------------------------------------------------------------------------------ export and load

def test_dynamic_package_runs_batches_1_and_5_like_eager(dynamic_pkg, model):
    path, meta = dynamic_pkg
    fn = load_pt2(path, "cpu")
    for b in (1, 5):
        x = torch.from_numpy(_images(b, seed=b))
        out = fn(x)
        assert out.shape == (b, CLASSES) and out.dtype == torch.float32
        torch.testing.assert_close(out, _eager(model, x), atol=1e-4, rtol=1e-4)


def test_sidecar_facts_and_embedded_facts(dynamic_pkg, fixed_pkg):
    path, meta = dynamic_pkg
    assert meta["torch"] == torch.__version__ and meta["device"] == "cpu" and meta["precision"] == "fp32"
    assert meta["batch"] == {"min": 1, "opt": 4, "max": 8, "dynamic": True} and meta["dynamic"] is True
    assert meta["num_classes"] == CLASSES and meta["compile_seconds"] > 0 and meta["inductor_configs"]["freezing"]
    assert meta["input"] == "images" and meta["output"] == "logits" and meta["cpu_isa"] and meta["warnings"] == []
    inside = package_facts(path)  # read from the zip, no code loaded
    assert inside["torch"] == torch.__version__ and inside["batch"] == meta["batch"] and inside["img_size"] == IMG
    assert inside["device"] == "cpu" and inside["cpu_isa"] == meta["cpu_isa"]
    assert fixed_pkg[1]["batch"] == {"min": 2, "opt": 2, "max": 2, "dynamic": False}


@pytest.mark.parametrize("which", ["dynamic", "fixed"])
def test_parity_against_eager(which, dynamic_pkg, fixed_pkg, model):
    path, meta = dynamic_pkg if which == "dynamic" else fixed_pkg
    b = meta["batch"]
    profile = BatchProfile(b["min"], b["opt"], b["max"], b["dynamic"])
    images = _images(13)  # 13: chunks of the max batch plus a short (padded) last one
    with Pt2Runner(_artifact(path, meta)) as runner:
        assert runner.batch_range == (profile.min, profile.max)
        p = compare_logits(torch_logits(model, images), runner.logits(images), "random", checked_on="aoti-cpu")
    assert p.passed and p.n == 13 and p.top1_agreement == 100.0 and p.max_abs_err < 1e-4
    assert p.checked_on.startswith("aoti-cpu")


# ------------------------------------------------------------------------------ runner

def test_runner_prepares_measures_and_matches_eager(fixed_pkg, model):
    path, meta = fixed_pkg
    r = Pt2Runner(_artifact(path, meta))
    assert (r.backend, r.device, r.precision, r.fixed_shapes) == ("aoti", "cpu", "fp32", False)
    assert r.batch_sizes_supported(2) and not r.batch_sizes_supported(1) and not r.batch_sizes_supported(3)
    st = measure(r.prepare(2), batch=2, timing=TimingOptions(warmup_s=0.0, min_s=0.0, min_iters=5))
    assert st.iters == 5 and st.gpu is None and st.median_ms > 0
    x = torch.from_numpy(_images(2, seed=3))
    torch.testing.assert_close(r(x), _eager(model, x), atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="outside"):  # AOTInductor itself would read out of bounds
        r(torch.from_numpy(_images(3)))
    r.release()


def test_dynamic_runner_accepts_its_range(dynamic_pkg):
    r = Pt2Runner(_artifact(*dynamic_pkg))
    assert [b for b in range(0, 10) if r.batch_sizes_supported(b)] == list(range(1, 9))
    assert r(torch.from_numpy(_images(7))).shape == (7, CLASSES)


# ------------------------------------------------------------------------------ bad input

def test_corrupt_or_foreign_file_is_a_user_error(dynamic_pkg, tmp_path):
    path, _ = dynamic_pkg
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip at all" * 100)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("archive/data.pkl", b"x")
    for bad in (garbage, truncated, foreign):
        with pytest.raises(UserError, match=bad.name) as e:
            load_pt2(bad, "cpu")
        assert "\n" not in str(e.value)


def test_other_torch_version_is_refused_with_both_named(dynamic_pkg):
    path, meta = dynamic_pkg
    with pytest.raises(UserError, match=r"torch 2\.0\.1 but torch .*is installed") as e:
        check_pt2_meta({**meta, "torch": "2.0.1"}, path)
    assert torch.__version__ in str(e.value)
    with pytest.raises(UserError, match="2.0.1"):
        check_package(path, {**meta, "torch": "2.0.1"})
    # Another build of the same release (+cpu vs +cu130) runs a CPU package.
    check_pt2_meta({**meta, "torch": torch.__version__.split("+")[0] + "+cpu"}, path)


def test_other_device_is_refused_with_both_named(dynamic_pkg):
    path, meta = dynamic_pkg
    with pytest.raises(UserError, match="built for cpu but is asked to run on cuda"):
        check_pt2_meta(meta, path, here={"torch": torch.__version__, "device": "cuda"})
    cuda_meta = {**meta, "device": "cuda", "gpu": "NVIDIA H200", "compute_capability": "9.0"}
    with pytest.raises(UserError, match="NVIDIA H200.*no CUDA GPU"):
        check_pt2_meta(cuda_meta, path, here={"torch": torch.__version__, "device": "cuda"})
    with pytest.raises(UserError, match="9.0.*8.6"):
        check_pt2_meta(cuda_meta, path, here={"torch": torch.__version__, "device": "cuda", "gpu": "RTX 3090",
                                              "compute_capability": "8.6"})
    with pytest.raises(UserError, match="sidecar does not belong"):  # the package itself says cpu
        check_package(path, cuda_meta)


def test_package_for_a_richer_cpu_is_refused(dynamic_pkg):
    path, meta = dynamic_pkg
    flags = open("/proc/cpuinfo", encoding="utf-8").read()
    if "amx_tile" in flags:
        pytest.skip("this CPU has AMX: no richer instruction set to refuse")
    with pytest.raises(UserError, match="AMX_TILE CPUs but this CPU lacks .*amx_tile"):
        check_pt2_meta({**meta, "cpu_isa": "AVX512 AVX512_VNNI AMX_TILE"}, path)


def test_missing_sidecar_is_refused_unless_trusted(dynamic_pkg, tmp_path):
    path, meta = dynamic_pkg
    bare = tmp_path / "bare.pt2"
    shutil.copy(path, bare)
    with pytest.raises(UserError, match="no sidecar bare.pt2.json.*--trust"):
        describe(bare)
    trusted = describe(bare, trust=True)
    assert trusted.trusted and trusted.img_size == IMG and trusted.meta["num_classes"] == CLASSES
    assert trusted.meta["batch"] == meta["batch"] and trusted.meta["torch"] == torch.__version__
    assert trusted.batch_range == (meta["batch"]["min"], meta["batch"]["max"])
    assert describe(path).meta["compile_seconds"] == meta["compile_seconds"]


def test_missing_compiler_is_a_missing_dependency_before_any_work(monkeypatch, tmp_path):
    import shutil as _shutil

    monkeypatch.setattr(_shutil, "which", lambda *a, **k: None)  # no g++ / $CXX on PATH
    calls = []
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(a))
    with pytest.raises(MissingDependency, match="C\\+\\+ compiler") as e:
        export_pt2(_model(), tmp_path / "m.pt2", img_size=IMG, batch=BatchProfile.fixed(1))
    assert "\n" not in str(e.value) and not calls and not (tmp_path / "m.pt2").exists()


def test_reduced_precision_on_a_cpu_without_its_arithmetic_is_flagged(monkeypatch):
    import export.pt2.package as pt2

    monkeypatch.setattr(pt2, "_cpu_flags", lambda: {"avx2", "fma"})
    assert "no native bf16" in pt2._precision_warnings("bf16", "cpu")[0]
    assert pt2._precision_warnings("fp32", "cpu") == [] and pt2._precision_warnings("bf16", "cuda") == []
    monkeypatch.setattr(pt2, "_cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert pt2._precision_warnings("bf16", "cpu") == []


def test_unsupported_precision_or_device_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="int8"):
        export_pt2(_model(), tmp_path / "m.pt2", img_size=IMG, batch=BatchProfile.fixed(1), precision="int8")
    with pytest.raises(UserError, match="tpu"):
        export_pt2(_model(), tmp_path / "m.pt2", img_size=IMG, batch=BatchProfile.fixed(1), device="tpu")


# ------------------------------------------------------------------------------ torch-compile, as deployed

def test_compile_mode_defaults_to_cuda_graphs_on_gpu_and_rejects_unknown_modes():
    assert check_compile_mode(None, "cuda") == "reduce-overhead" and check_compile_mode(None, "cpu") == "default"
    assert check_compile_mode("max-autotune", "cuda") == "max-autotune"
    with pytest.raises(UserError, match="unknown compile mode 'fastest'"):
        check_compile_mode("fastest", "cpu")


def test_torch_compile_runner_reports_compile_seconds_freezes_weights_and_matches_eager():
    model = _model()
    r = TorchRunner(model, backend="torch-compile", img_size=IMG, name="test_resnet")
    step = r.prepare(3)
    assert set(r.compile_seconds) == {3} and r.compile_seconds[3] > 0
    assert torch._inductor.config.freezing is False  # patched in for the compile only
    st = measure(step, batch=3, timing=TimingOptions(warmup_s=0.0, min_s=0.0, min_iters=3))
    assert st.iters == 3 and st.median_ms * 1e-3 < r.compile_seconds[3]  # compile time is not in the latency
    x = torch.from_numpy(_images(3, seed=7))
    reference = _eager(model, x)
    torch.testing.assert_close(r(x), reference, atol=1e-4, rtol=1e-4)
    # BatchNorm folded into the frozen convolution weights: a later edit of its statistics reaches eager only.
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_mean += 1.0
    assert not torch.allclose(_eager(model, x), reference, atol=1e-3)
    torch.testing.assert_close(r(x), reference, atol=1e-4, rtol=1e-4)
    assert TorchRunner(_model(), backend="torch-eager", img_size=IMG).compile_seconds == {}
