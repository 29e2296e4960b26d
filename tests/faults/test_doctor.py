"""`spofa doctor`: one record per component, never an exception, and a clear line for what is missing.

In-process (it only inspects this environment); missing or broken libraries and a GPU are simulated.
"""
from __future__ import annotations

import json
import sys

import pytest

from spofa_deploy import doctor as d
COMPONENTS = ["torch", "CUDA", "bf16 on the GPU", "timm", "ONNX", "ONNX Runtime", "ONNX Runtime: CPU provider",
              "ONNX Runtime: CUDA provider", "ONNX Runtime: TensorRT provider", "onnxslim", "TensorRT", "ModelOpt",
              "scikit-learn", "matplotlib", "CPU threads"]


def _by_name(checks) -> dict:
    return {c.component: c for c in checks}


def test_every_component_is_reported() -> None:
    checks = d.diagnose()
    assert [c.component for c in checks] == COMPONENTS
    got = _by_name(checks)
    for name in ("torch", "timm"):
        assert got[name].required and got[name].usable and got[name].version
    assert got["ONNX Runtime: CPU provider"].usable
    assert got["scikit-learn"].usable and got["matplotlib"].usable
    for c in checks:
        assert isinstance(c.installed, bool) and isinstance(c.usable, bool)
        assert c.usable or c.detail, f"{c.component}: unusable without a reason"
        if not c.usable and c.component not in ("ONNX Runtime: TensorRT provider",):
            assert c.disables, f"{c.component}: unusable, but what it disables is not said"
    json.dumps([c.to_dict() for c in checks])


def test_missing_and_broken_libraries(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    real = d._import

    def broken(module):
        if module.startswith("modelopt"):
            return None, "import modelopt failed: OSError: libcudart.so.12: cannot open shared object file"
        return real(module)

    monkeypatch.setattr(d, "_import", broken)
    monkeypatch.setattr(d, "_dist_version", lambda *names: "0.33.0" if "nvidia-modelopt" in names else None)
    got = _by_name(d.diagnose())
    trt = got["TensorRT"]
    assert not trt.usable and "--format trt" in trt.disables
    mo = got["ModelOpt"]
    assert mo.installed and mo.version == "0.33.0" and not mo.usable
    assert "libcudart" in mo.detail and "--quantizer modelopt" in mo.disables


def _fake_modelopt(monkeypatch, version: str, autocast) -> None:
    """ModelOpt `version` whose `modelopt.onnx.autocast` is `autocast` (the rest of the environment is real)."""
    from types import SimpleNamespace

    fakes = {"modelopt": SimpleNamespace(), "modelopt.onnx.autocast": autocast,
             "modelopt.onnx.quantization": SimpleNamespace()}
    real, real_version = d._import, d._dist_version
    monkeypatch.setattr(d, "_import", lambda m: (fakes[m], None) if m in fakes else real(m))
    monkeypatch.setattr(d, "_dist_version", lambda *names: version if "nvidia-modelopt" in names else real_version(*names))


def test_modelopt_needs_the_autocast_entry_point_of_0_33(monkeypatch) -> None:
    from types import SimpleNamespace

    def entry(*a, **k):
        return None

    _fake_modelopt(monkeypatch, "0.31.0", SimpleNamespace(convert=entry))  # 0.31 calls it `convert`
    mo = _by_name(d.diagnose())["ModelOpt"]
    assert mo.installed and not mo.usable and mo.version == "0.31.0"
    assert "nvidia-modelopt 0.31.0" in mo.detail and "convert_to_mixed_precision" in mo.detail and "0.33" in mo.detail
    assert "--quantizer modelopt" in mo.disables
    _fake_modelopt(monkeypatch, "0.32.1", SimpleNamespace(convert_to_mixed_precision=entry))
    mo = _by_name(d.diagnose())["ModelOpt"]
    assert not mo.usable and "nvidia-modelopt 0.32.1 is older than 0.33" in mo.detail
    _fake_modelopt(monkeypatch, "0.33.0", SimpleNamespace(convert_to_mixed_precision=entry))
    mo = _by_name(d.diagnose())["ModelOpt"]
    assert mo.usable and "nvidia-modelopt 0.33.0" in mo.detail


def test_the_installed_modelopt() -> None:
    import importlib.metadata

    try:
        version = importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nvidia-modelopt is not installed")
    mo = _by_name(d.diagnose())["ModelOpt"]
    assert mo.version == version and f"nvidia-modelopt {version}" in mo.detail
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision  # noqa: F401
        importable = True
    except Exception:  # noqa: BLE001 - a broken install: the doctor must say so
        importable = False
    assert mo.usable == importable, mo


def test_a_gpu_machine(monkeypatch) -> None:
    """A simulated H100 (a fake `torch` seen only by the doctor: the real one is not touched)."""
    from types import SimpleNamespace

    import torch

    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                           get_device_name=lambda i=0: "NVIDIA H100 80GB HBM3",
                           get_device_capability=lambda i=0: (9, 0), is_bf16_supported=lambda *a, **k: True)
    fake = SimpleNamespace(__version__=torch.__version__, version=SimpleNamespace(cuda="13.0"), cuda=cuda)
    real = d._import
    monkeypatch.setattr(d, "_import", lambda m: (fake, None) if m == "torch" else real(m))
    got = _by_name(d.diagnose())
    assert got["CUDA"].usable and "H100" in got["CUDA"].detail and "sm 9.0" in got["CUDA"].detail
    assert got["bf16 on the GPU"].usable
    # The ONNX Runtime CUDA probe session is real here: it must report (usable or why not), never raise.
    ort_cuda = got["ONNX Runtime: CUDA provider"]
    assert isinstance(ort_cuda.usable, bool) and ort_cuda.detail


def test_spofa_doctor_through_the_cli() -> None:
    import faultkit as fk
    from cli.main import app

    if "doctor" not in [c.name for c in app.registered_commands]:
        pytest.skip("`doctor` is not registered in cli.main yet")
    r = fk.spofa(["doctor"])
    assert r.rc == 0, r
    assert "spofa doctor" in r.out and "TensorRT" in r.out and "Traceback" not in r.err


def test_the_command_prints_a_table_and_json(capsys) -> None:
    pytest.importorskip("rich")
    from cli.cmd_doctor import doctor

    doctor()
    out = capsys.readouterr().out
    assert "spofa doctor" in out and "TensorRT" in out and "usable" in out
    doctor(json_out=True)
    rows = json.loads(capsys.readouterr().out)
    assert [r["component"] for r in rows] == COMPONENTS
