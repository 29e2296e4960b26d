"""PyTorch's own deployable artifact: `torch.export` + AOTInductor into one `.pt2` package.

The package holds the model compiled ahead of time into a shared library (C++ kernels on
CPU, Triton kernels on CUDA) with its weights frozen in: BatchNorm folded into the
convolutions, constants folded (`freezing`). It runs from Python through
`torch._inductor.aoti_load_package` and from C++ through `AOTIModelPackageLoader`, without
the model's source code. Contract, as for the ONNX export: float32 `images` (N, C, H, W)
in, float32 `logits` out, whatever the precision inside.

A package is compiled code bound to what built it, like a TensorRT engine:
- the torch version (the library links libtorch; its ABI is not stable across releases);
- the device: a CPU package is C++ for one instruction set (AVX2, AVX512, ...), a CUDA one
  carries kernels for one GPU architecture.
Both are recorded beside it (the JSON sidecar) and inside it (AOTInductor metadata, read
from the zip without loading any code), and `check_pt2_meta` refuses a mismatch with both
named. A package without its sidecar is refused unless trusted, and so is one whose bytes are
not the ones its sidecar's SHA-256 records: loading a package runs the native code inside it
(its library's constructors first), so it is only as trustworthy as whoever built it.

Compiling needs a C++ compiler (CPU and CUDA: the wrapper is C++), checked first and cheaply.
"""
from __future__ import annotations

import copy
import io
import json
import platform
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from export.artifact import BatchProfile
from spofa_deploy.artifacts import INPUT_NAME, OUTPUT_NAME
from spofa_deploy.errors import MissingDependency, UserError

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inductor settings of every package: weights become constants, so BatchNorm folds into the
# convolutions and weight-only subgraphs are computed once at compile time.
INDUCTOR_CONFIGS = {"freezing": True}
_META_PREFIX = "spofa_"
# What an inductor CPU ISA name needs from the CPU (Linux /proc/cpuinfo flag names).
_ISA_FLAGS = {"AVX2": ("avx2", "fma"), "AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
              "AVX512_VNNI": ("avx512_vnni",), "AMX_TILE": ("amx_tile", "amx_bf16", "amx_int8")}


# ------------------------------------------------------------------------------ preconditions

def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use (`$CXX` or g++), found on PATH without running it."""
    from torch._inductor import config

    for cxx in config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    return None


def require_toolchain(device: str) -> None:
    """Raise MissingDependency where this machine cannot compile a package for `device`.

    Cheap (PATH lookups only), so `spofa export` calls it before any work.
    """
    if device not in DEVICES:
        raise UserError(f"a .pt2 package runs on {' or '.join(DEVICES)}, not '{device}'")
    if cxx_compiler() is None:
        raise MissingDependency("compiling a .pt2 package needs a C++ compiler (g++ or $CXX) on PATH: "
                                "install one (e.g. apt-get install g++) or export to ONNX instead")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise MissingDependency("a CUDA .pt2 package is compiled on the GPU it runs on, and no CUDA GPU is "
                                    "visible (check nvidia-smi and CUDA_VISIBLE_DEVICES), or export --device cpu")
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise MissingDependency("a CUDA .pt2 package needs Triton: pip install triton")


def check_precision(precision: str, device: str) -> torch.dtype:
    """The dtype of `precision` on `device`, or a UserError where the device lacks it."""
    if precision not in DTYPES:
        raise UserError(f"a .pt2 package holds {', '.join(DTYPES)}, not '{precision}'")
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise UserError(f"bf16 needs a GPU of compute capability >= 8.0; {name} has not: use --precision fp16")
    return DTYPES[precision]


# ------------------------------------------------------------------------------ export

class _Deployable(nn.Module):
    """float32 images in, float32 logits out; the model inside runs at its own dtype.

    The casts are part of the exported graph, so callers of every precision feed and read
    float32, exactly like the ONNX artifacts.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.dtype)).float()


def _example_batch(batch: BatchProfile) -> tuple[int, bool]:
    """(example batch size, dynamic?): torch.export specialises a dynamic dim traced at size 1."""
    if not batch.dynamic or batch.max < 2:
        return batch.opt, False
    return min(max(batch.opt, 2), batch.max), True


def machine_facts(device: str) -> dict:
    """What a package built here is bound to (also this machine's side of `check_pt2_meta`)."""
    facts = {"torch": torch.__version__, "device": device, "machine": platform.machine()}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        facts.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}")
    return facts


def export_pt2(model: nn.Module, path: str | Path, *, img_size: int, batch: BatchProfile, precision: str = "fp32",
               device: str = "cpu", in_chans: int = 3) -> dict:
    """Compile `model` into one AOTInductor package at `path`.

    Args:
        model: the timm model (eval mode is set here); moved to `device` and `precision`.
        path: the file to write (any name: the caller writes a temp file and renames it).
        img_size: square input size.
        batch: fixed batch, or a dynamic range (the package accepts min..max).
        precision: fp32 | bf16 | fp16 (the weights and compute; input and output stay float32).
        device: "cpu" or "cuda" (the package runs only there).
        in_chans: input channels.

    Returns:
        Facts for the sidecar: torch version, device (and GPU or CPU ISA), precision, batch,
        input/output names, export and compile seconds, and `warnings` (a list of lines for the
        user, e.g. bf16 on a CPU without bf16 arithmetic; pop it before writing the sidecar).

    On CPU a fixed batch compiles to markedly faster code than a dynamic range (measured
    1.9-2.6x on mobilenetv3_large_100, see benchmarks/pt2_cpu.py).

    Raises:
        MissingDependency: no C++ compiler (or, for cuda, no GPU / Triton).
        UserError: a precision the device lacks, or a model torch.export cannot capture.
    """
    require_toolchain(device)
    dtype = check_precision(precision, device)
    n, dynamic = _example_batch(batch)
    # A copy: `.to()` works in place, and the caller still needs its fp32 CPU model (the parity reference).
    net = _Deployable(copy.deepcopy(model).eval(), dtype).to(device=device, dtype=dtype).eval()
    example = torch.randn(n, in_chans, img_size, img_size, device=device)
    shapes = ({0: torch.export.Dim("batch", min=batch.min, max=batch.max)},) if dynamic else None
    t0 = time.perf_counter()
    with torch.no_grad():  # freezing applies to inference graphs only
        try:
            ep = torch.export.export(net, (example,), dynamic_shapes=shapes)
        except Exception as e:  # torch.export raises many types for unsupported Python in a model
            raise UserError(f"torch.export cannot capture this model: {_first_line(e)}") from e
        t1 = time.perf_counter()
        classes = int(net(example).shape[-1])
        facts = {**machine_facts(device), "precision": precision, "batch": batch.to_dict(), "dynamic": dynamic,
                 "img_size": img_size, "in_chans": in_chans, "num_classes": classes}
        configs = {**INDUCTOR_CONFIGS, "aot_inductor.metadata": _embedded(facts)}
        # Packaged in memory, then written from Python: torch's zip writer aborts the process on a full
        # disk (a C++ abort, exit 134), a Python write raises OSError. (A file object: aoti wants a `.pt2`
        # suffix on paths only.)
        package = io.BytesIO()
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=package, inductor_configs=configs)
        except Exception as e:
            if type(e).__name__ == "InvalidCxxCompiler":
                raise MissingDependency(f"inductor found no working C++ compiler: {_first_line(e)}") from e
            raise
        with open(path, "wb") as f:
            f.write(package.getbuffer())
    t2 = time.perf_counter()
    return {**facts, **_package_isa(path), "input": INPUT_NAME, "output": OUTPUT_NAME,
            "inductor_configs": dict(INDUCTOR_CONFIGS), "export_seconds": round(t1 - t0, 2),
            "compile_seconds": round(t2 - t1, 2), "warnings": _precision_warnings(precision, device)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _embedded(facts: dict) -> dict[str, str]:
    """Facts stored inside the package (AOTInductor metadata: str -> str)."""
    return {_META_PREFIX + k: json.dumps(v) for k, v in facts.items()}


def _package_isa(path: str | Path) -> dict:
    isa = package_facts(path).get("cpu_isa")
    return {"cpu_isa": isa} if isa else {}


# ------------------------------------------------------------------------------ package facts

def package_facts(path: str | Path) -> dict:
    """What a `.pt2` says about itself, read from the zip without loading any code.

    Returns the facts `export_pt2` embedded (torch, device, precision, batch, img_size, ...)
    plus AOTInductor's own: device, cpu_isa, compute_capability.

    Raises:
        UserError: not a readable AOTInductor package (corrupt, truncated, another format).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".wrapper_metadata.json") and "/aotinductor/" in n]
            if not names:
                raise UserError(f"{path.name} is a zip but not an AOTInductor package (no compiled model inside)")
            raw = json.loads(z.read(names[0]))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:  # ValueError: bad JSON
        raise UserError(f"{path.name} is not a readable .pt2 package ({_first_line(e)}): re-export it") from None
    facts = {}
    for k, v in raw.items():
        if k.startswith(_META_PREFIX):
            try:
                facts[k[len(_META_PREFIX):]] = json.loads(v)
            except json.JSONDecodeError:
                facts[k[len(_META_PREFIX):]] = v
    facts["device"] = raw.get("AOTI_DEVICE_KEY") or facts.get("device")
    if raw.get("AOTI_CPU_ISA") and facts["device"] == "cpu":
        facts["cpu_isa"] = raw["AOTI_CPU_ISA"]
    if raw.get("AOTI_COMPUTE_CAPABILITY"):
        cc = str(raw["AOTI_COMPUTE_CAPABILITY"])
        facts["compute_capability"] = cc if "." in cc else f"{cc[:-1]}.{cc[-1]}"
    return facts


def trusted_meta(path: str | Path) -> dict:
    """A sidecar-like dict for a package without sidecar, from the facts embedded in it."""
    path = Path(path)
    facts = package_facts(path)
    missing = [k for k in ("img_size", "num_classes", "batch") if k not in facts]
    if missing:
        raise UserError(f"{path.name} was not written by `spofa export` (no {', '.join(missing)} inside) "
                        "and has no sidecar: re-export it")
    return {"model": path.stem, "format": "pt2", "mean": None, "std": None, **facts,
            "trusted_without_sidecar": True}


def _cpu_flags() -> set[str] | None:
    """This CPU's feature flags (Linux /proc/cpuinfo), None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), None)


def _missing_cpu_features(isa: str) -> list[str]:
    """CPU flags the package's instruction set needs that this CPU lacks ([] where unknown)."""
    flags = _cpu_flags()
    if flags is None:
        return []
    need = [f for part in isa.upper().split() for f in _ISA_FLAGS.get(part, ())]
    return [f for f in need if f not in flags]


def _precision_warnings(precision: str, device: str) -> list[str]:
    """Why a reduced-precision CPU package may be slower than fp32 here."""
    native = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}.get(precision)
    flags = _cpu_flags() if device == "cpu" and native else None
    if flags is None or any(f in flags for f in native):
        return []
    return [f"this CPU has no native {precision} arithmetic ({' or '.join(native)}): the {precision} package runs "
            "through conversions and may be slower than fp32 (measured up to 5x on AVX2)"]


def _torch_key(version: str, device: str) -> str:
    # A CPU package runs in any build of the same release (+cpu, +cu130); a CUDA one links the CUDA runtime too.
    return str(version) if device == "cuda" else str(version).split("+")[0]


def check_pt2_meta(meta: dict, path: str | Path, here: dict | None = None) -> None:
    """Refuse a package built by another torch version, or for another device, GPU or CPU.

    Args:
        meta: the package's sidecar (or `trusted_meta`): torch, device, gpu, compute_capability, cpu_isa.
        path: the package, for messages.
        here: this machine's side (default: `machine_facts` of the device the package wants),
            plus `device`, the device it is asked to run on.
    """
    name = Path(path).name
    device = str(meta.get("device") or "cpu")
    here = here or machine_facts(device)
    built = meta.get("torch")
    if built and _torch_key(built, device) != _torch_key(here["torch"], device):
        raise UserError(f"{name} was built with torch {built} but torch {here['torch']} is installed: a .pt2 runs "
                        "only with the torch release that built it (re-export it with `spofa export --format pt2`)")
    if device != here["device"]:
        raise UserError(f"{name} was built for {device} but is asked to run on {here['device']}: "
                        f"re-export it with `spofa export --format pt2 --device {here['device']}`")
    if device == "cuda":
        if "gpu" not in here:
            raise UserError(f"{name} was built for cuda ({meta.get('gpu', 'a GPU')}) but this machine has no CUDA GPU")
        cc = meta.get("compute_capability")
        if cc and str(cc) != str(here["compute_capability"]):
            raise UserError(f"{name} was built for {meta.get('gpu')} (compute capability {cc}) but this GPU is "
                            f"{here['gpu']} (compute capability {here['compute_capability']}): re-export it here")
        return
    machine = meta.get("machine")
    if machine and here.get("machine") and machine != here["machine"]:
        raise UserError(f"{name} was built for {machine} CPUs but this one is {here.get('machine')}: re-export it here")
    lacking = _missing_cpu_features(str(meta.get("cpu_isa") or ""))
    if lacking:
        raise UserError(f"{name} was built for {meta['cpu_isa']} CPUs but this CPU lacks {', '.join(lacking)}: "
                        "re-export it here")


# ------------------------------------------------------------------------------ load and run

def load_pt2(path: str | Path, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Load a package: a callable from float32 images on `device` to float32 logits there.

    Only the file's own device is checked here; `check_pt2_meta` checks torch and machine.

    Raises:
        UserError: a corrupt or foreign file, or a package for another device.
    """
    path = Path(path)
    built_for = package_facts(path)["device"]
    if built_for != device:
        raise UserError(f"{path.name} was built for {built_for} but is asked to run on {device}")
    index = torch.cuda.current_device() if device == "cuda" else -1
    try:
        return torch._inductor.aoti_load_package(str(path), device_index=index)
    except Exception as e:  # the C++ loader raises RuntimeError with multi-line context
        raise UserError(f"torch {torch.__version__} cannot load {path.name}: {_first_line(e)}") from e


def check_package(path: str | Path, meta: dict) -> None:
    """Refuse a package whose sidecar `meta` is another file's, or that another torch or machine built.

    Raises:
        UserError: a sidecar naming another device than the package itself, another torch version,
            device, GPU or CPU instruction set than this machine's, or a corrupt file.
    """
    path = Path(path)
    built_for = package_facts(path)["device"]
    side_device = meta.get("device", built_for)
    if side_device != built_for:
        raise UserError(f"{path.name} is a {built_for} package but its sidecar says {side_device}: "
                        "the sidecar does not belong to this file")
    check_pt2_meta(meta, path, here=machine_facts(built_for))
