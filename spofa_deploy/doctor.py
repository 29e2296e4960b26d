"""`spofa doctor`: what is installed and usable here, with versions, and what each missing piece disables.

`diagnose()` returns one `Check` per component. Every probe is defensive: a library that is
absent, fails to import (a missing shared library, a broken install) or has no usable device
gives a record saying so, never an exception. Nothing here needs a network.
"""
from __future__ import annotations

import contextlib
import ctypes.util
import importlib
import importlib.metadata
import io
import os
import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Check:
    """One component.

    Attributes:
        component: what was checked ("torch", "CUDA", "ONNX Runtime: CUDA provider", ...).
        installed: the package (or build feature) is present.
        version: its version, when it has one.
        usable: it works here (imports, and finds the device it needs).
        detail: what was found, or why it is not usable.
        disables: what is unavailable while it is not usable ("" when nothing is).
        required: spofa-deploy does not work at all without it.
    """

    component: str
    installed: bool
    version: str | None
    usable: bool
    detail: str = ""
    disables: str = ""
    required: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _dist_version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def _import(module: str):
    """(module, None) or (None, one-line reason); import output (banners, warnings) is swallowed."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return importlib.import_module(module), None
    except Exception as e:  # ImportError, OSError (a missing .so), RuntimeError from a broken build
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"import {module} failed: {type(e).__name__}{': ' + first[:160] if first else ''}"


def _package(component: str, module: str, dists: tuple[str, ...], disables: str, *, required: bool = False,
             detail: str = "") -> tuple[Check, object]:
    mod, err = _import(module)
    version = getattr(mod, "__version__", None) if mod is not None else None
    version = str(version) if version else _dist_version(*dists)
    installed = mod is not None or version is not None or importlib.util.find_spec(module.split(".")[0]) is not None
    if mod is None:
        return Check(component, installed, version, False, err if installed else "not installed", disables, required), None
    return Check(component, True, version, True, detail, "", required), mod


def _torch_checks() -> tuple[list[Check], object]:
    out = []
    c, torch = _package("torch", "torch", ("torch",), "everything (training, export, benchmarks)", required=True)
    if torch is None:
        return [c], None
    cuda_build = getattr(torch.version, "cuda", None)
    out.append(Check("torch", True, c.version, True,
                     f"CUDA {cuda_build} build" if cuda_build else "CPU-only build", "", True))
    gpu_off = "GPU training and AMP (--device cuda), ort-cuda / trt / torch-cudagraph benchmarks, TensorRT export"
    if not cuda_build:
        out.append(Check("CUDA", False, None, False, "this torch is a CPU-only build (install a CUDA wheel)", gpu_off))
    else:
        try:
            available = torch.cuda.is_available()
            n = torch.cuda.device_count() if available else 0
        except Exception as e:  # a driver problem surfaces here
            available, n, why = False, 0, f"torch.cuda failed: {type(e).__name__}: {e}"
        else:
            why = "no CUDA GPU visible (driver missing, or CUDA_VISIBLE_DEVICES hides it)"
        if available and n:
            gpus = []
            for i in range(n):
                major, minor = torch.cuda.get_device_capability(i)
                gpus.append(f"{torch.cuda.get_device_name(i)} (sm {major}.{minor})")
            out.append(Check("CUDA", True, cuda_build, True, f"{n} GPU(s): {', '.join(gpus)}"))
        else:
            out.append(Check("CUDA", True, cuda_build, False, why, gpu_off))
    cuda_ok = out[-1].usable
    if cuda_ok:
        bf16 = bool(torch.cuda.is_bf16_supported())
        out.append(Check("bf16 on the GPU", True, None, bf16,
                         "supported" if bf16 else "this GPU has no bf16 (compute capability < 8.0)",
                         "" if bf16 else "--amp bf16 (auto falls back to fp16 with a grad scaler), bf16 exports"))
    else:
        out.append(Check("bf16 on the GPU", False, None, False, "no usable CUDA GPU",
                         "--amp bf16 and bf16 exports (CPU training runs in fp32)"))
    return out, torch


def _ort_checks(cuda_ok: bool) -> list[Check]:
    c, ort = _package("ONNX Runtime", "onnxruntime", ("onnxruntime-gpu", "onnxruntime"),
                      "spofa export (parity check, INT8 calibration), benchmarks of .onnx files")
    if ort is None:
        return [c]
    try:
        providers = list(ort.get_available_providers())
    except Exception as e:  # noqa: BLE001
        return [Check("ONNX Runtime", True, c.version, False, f"get_available_providers failed: {e}", c.disables)]
    out = [Check("ONNX Runtime", True, c.version, "CPUExecutionProvider" in providers,
                 f"providers: {', '.join(p.replace('ExecutionProvider', '') for p in providers)}",
                 "" if "CPUExecutionProvider" in providers else c.disables)]
    cpu = "CPUExecutionProvider" in providers
    out.append(Check("ONNX Runtime: CPU provider", cpu, c.version, cpu, "" if cpu else "not in this build",
                     "" if cpu else "ort-cpu benchmarks, export parity checks"))
    listed = "CUDAExecutionProvider" in providers
    if not listed:
        why = "not in this build (install onnxruntime-gpu)"
    elif not cuda_ok:
        why = "listed, but no usable CUDA GPU"
    else:
        why = _ort_cuda_probe(ort)
    out.append(Check("ONNX Runtime: CUDA provider", listed, c.version, why is None,
                     why or "a session runs on it", "" if why is None else "ort-cuda benchmarks"))
    listed = "TensorrtExecutionProvider" in providers
    libs = ctypes.util.find_library("nvinfer") is not None or importlib.util.find_spec("tensorrt_libs") is not None \
        or importlib.util.find_spec("tensorrt") is not None
    if not listed:
        why = "not in this build"
    elif not cuda_ok:
        why = "listed, but no usable CUDA GPU"
    elif not libs:
        why = "listed, but the TensorRT libraries (libnvinfer) are not installed"
    else:
        why = None
    # Informational: spofa builds and runs engines with the TensorRT Python API, not through this provider.
    out.append(Check("ONNX Runtime: TensorRT provider", listed, c.version, why is None,
                     why or "listed; TensorRT libraries and a GPU present"))
    return out


def _ort_cuda_probe(ort) -> str | None:
    """Open a one-node session on the CUDA provider; ORT silently falls back to CPU when its CUDA libraries fail."""
    try:
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
        if sess.get_providers()[0] != "CUDAExecutionProvider":
            return "listed, but its CUDA/cuDNN libraries did not load (ONNX Runtime fell back to CPU)"
    except Exception as e:  # noqa: BLE001
        return f"listed, but a session failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def diagnose() -> list[Check]:
    """Check every component spofa-deploy uses; never raises."""
    checks, torch = _torch_checks()
    cuda_ok = any(c.component == "CUDA" and c.usable for c in checks)
    checks.append(_package("timm", "timm", ("timm",), "everything (every teacher and student is a timm model)",
                           required=True)[0])
    checks.append(_package("ONNX", "onnx", ("onnx",), "spofa export (ONNX and TensorRT), benchmarks of .onnx files")[0])
    checks += _ort_checks(cuda_ok)
    c = _package("onnxslim", "onnxslim", ("onnxslim",), "ONNX graph simplification (export behaves as --no-slim)")[0]
    checks.append(c)

    c, trt = _package("TensorRT", "tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
                      "spofa export --format trt, benchmarks of .engine files (backend trt)")
    if trt is not None and not cuda_ok:
        c = Check("TensorRT", True, c.version, False, "installed, but no usable CUDA GPU to build or run engines",
                  c.disables)
    elif trt is not None:
        major = str(c.version or "0").split(".")[0]
        c = Check("TensorRT", True, c.version, True,
                  "strongly typed networks (precision from the ONNX)" if major.isdigit() and int(major) >= 11
                  else "weakly typed networks (builder precision flags)")
    checks.append(c)

    checks.append(_modelopt_check())

    c, skl = _package("scikit-learn", "sklearn.datasets", ("scikit-learn",),
                      "--data digits (the default, offline data set); use cifar10:DIR or imagefolder:DIR")
    if skl is not None:
        c = Check("scikit-learn", True, _dist_version("scikit-learn") or c.version, hasattr(skl, "load_digits"),
                  "digits data set available" if hasattr(skl, "load_digits") else "no load_digits",
                  "" if hasattr(skl, "load_digits") else c.disables)
    checks.append(c)

    with _headless():
        checks.append(_package("matplotlib", "matplotlib.pyplot", ("matplotlib",),
                               "trace.png, bench --plot, spofa compare figures (the numbers are still written)")[0])
    checks.append(_cpu_check(torch))
    if torch is None:  # keep a stable order: torch rows first even when torch is missing
        checks.sort(key=lambda c: c.component != "torch")
    return checks


MODELOPT_MIN = (0, 33)  # AutoCast's entry point `convert_to_mixed_precision` appears in 0.33 (0.31 calls it `convert`)


def _older_than(version: str, minimum: tuple[int, int]) -> bool:
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m[1]), int(m[2])) < minimum


def _modelopt_check() -> Check:
    """ModelOpt is usable when its AutoCast entry point and INT8 quantizer import, at a version >= 0.33."""
    disables = ("--quantizer modelopt (INT8 falls back to ONNX Runtime's quantizer), fp16/bf16 engines on "
                "TensorRT >= 11 (AutoCast)")
    c, mo = _package("ModelOpt", "modelopt", ("nvidia-modelopt",), disables)
    if mo is None:
        return c
    version = _dist_version("nvidia-modelopt") or c.version
    name = f"nvidia-modelopt {version or '(unknown version)'}"
    need = ".".join(map(str, MODELOPT_MIN))

    def unusable(why: str) -> Check:
        return Check("ModelOpt", True, version, False, f"{name} {why}", disables)

    autocast, err = _import("modelopt.onnx.autocast")
    if autocast is None:
        return unusable(f"installed, but {err}")
    if not callable(getattr(autocast, "convert_to_mixed_precision", None)):
        return unusable(f"has no modelopt.onnx.autocast.convert_to_mixed_precision (needs >= {need})")
    if version and _older_than(version, MODELOPT_MIN):
        return unusable(f"is older than {need}")
    if _import("modelopt.onnx.quantization")[0] is None:
        return unusable("installed, but modelopt.onnx.quantization does not import")
    return Check("ModelOpt", True, version, True, f"{name}: AutoCast convert_to_mixed_precision and INT8 quantizer")


CPU_COMPONENT = "CPU threads"


def _cpu_check(torch) -> Check:
    """The load average against the cores and PyTorch's default threads (see `machine.py`)."""
    from spofa_deploy.machine import cpu_load, usable_cores

    try:
        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - no (usable) torch: its default, one thread per core
        threads = usable_cores()
    load = cpu_load(threads)
    return Check(CPU_COMPONENT, True, None, not load.oversubscribed, load.line(),
                 f"full training speed with PyTorch's default threads (pass --threads {load.suggested_threads})"
                 if load.oversubscribed else "")


@contextlib.contextmanager
def _headless():
    """Import pyplot with a non-interactive backend (a doctor must not need a display)."""
    old = os.environ.get("MPLBACKEND")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MPLBACKEND", None)


def missing_summary(checks: list[Check]) -> list[str]:
    """One line per unusable component: what it disables."""
    return [f"{c.component}: {c.disables}" for c in checks if not c.usable and c.disables]
