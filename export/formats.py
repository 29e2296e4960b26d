"""The one table of model formats: suffix, precisions, what each needs, what runs it, and its home.

`spofa export` validates `--format` / `--precision` against it and hands the work to the format's
home; `spofa bench` finds a file's format from its suffix (`format_for_path`), has the home describe
it, and runs it on the backends of its row (`BACKENDS` is their union). Adding a format means one
home and one row here.

A format's home (`Format.home`: `export.pytorch`, `export.onnx`, `export.pt2`, `export.tensorrt`) is
one module or folder holding its export, the description of its files and its runner, behind one
small protocol of four functions:

    check_export(options: ExportOptions) -> None          refuse, before any work, what this machine lacks
    export(job: ExportJob) -> None                        build, check, gate and publish (`job.install`)
    describe(path: Path, trust: bool = False) -> Artifact read and check a file and its sidecar, here
    runner(art, backend, device, precision, options: RunOptions) -> Runner    made, not yet activated
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from spofa_deploy.errors import MissingDependency, UserError, check_choice

PRECISIONS = ("fp32", "fp16", "bf16", "int8")

# What each optional module is and how to install it, for one-line errors.
INSTALL: dict[str, tuple[str, str]] = {
    "tensorrt": ("TensorRT", "pip install 'tensorrt>=10' on a machine with an NVIDIA GPU"),
    "modelopt": ("NVIDIA ModelOpt", "pip install 'nvidia-modelopt[onnx]==0.47.*'"),
    "onnxslim": ("onnxslim", "pip install onnxslim"),
    "onnxruntime": ("ONNX Runtime", "pip install onnxruntime-gpu (or onnxruntime)"),
}


@dataclass(frozen=True)
class Format:
    """One row of the format table.

    Attributes:
        name: the `--format` value.
        suffix: file suffix of the artifact (`.onnx`, `.engine`, ...).
        precisions: precisions this format can hold.
        needs: top-level modules needed to produce and run it.
        precision_needs: extra modules a precision needs, as (precision, modules) pairs.
        backends: the `spofa bench` backends that run it (`--backend`), the preferred first.
        exportable: whether `spofa export` produces it.
        note: one line for help texts.
        title: what a file of this format is, for messages ("an ONNX model").
        module: the format's home (`FormatHome`).
        native: a file holds native code (run as soon as it is loaded): its sidecar's digest is required.
    """

    name: str
    suffix: str
    precisions: tuple[str, ...]
    needs: tuple[str, ...] = ()
    precision_needs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    backends: tuple[str, ...] = ()
    exportable: bool = True
    note: str = ""
    title: str = ""
    module: str = ""
    native: bool = False

    @property
    def home(self) -> ModuleType:
        """The format's home module (the protocol above), imported on first use."""
        return importlib.import_module(self.module)

    def modules_for(self, precision: str | None = None) -> tuple[str, ...]:
        """Modules needed for this format (and precision, if given)."""
        extra = dict(self.precision_needs).get(precision, ()) if precision else ()
        return self.needs + tuple(m for m in extra if m not in self.needs)

    def missing(self, precision: str | None = None) -> list[str]:
        """Needed modules that are not importable here."""
        return [m for m in self.modules_for(precision) if importlib.util.find_spec(m) is None]

    def check_precision(self, precision: str) -> str:
        """Return `precision` normalised, or raise a UserError naming what is allowed."""
        p = check_choice(precision, PRECISIONS, "--precision", noun="precision")
        if p not in self.precisions:
            raise UserError(f"format '{self.name}' does not support {p}: use one of {', '.join(self.precisions)}")
        return p

    def require(self, precision: str | None = None) -> None:
        """Raise MissingDependency with an install hint if a needed module is missing."""
        missing = self.missing(precision)
        if not missing:
            return
        label, cmd = INSTALL.get(missing[0], (missing[0], f"pip install {missing[0]}"))
        if missing[0] in self.needs:
            raise MissingDependency(f"{label} is not installed: {cmd}")
        raise MissingDependency(f"{precision} {self.name} needs {label}: {cmd}")


FORMATS: dict[str, Format] = {
    "torch": Format(
        "torch", ".safetensors", ("fp32", "bf16", "fp16"), needs=("torch", "timm", "safetensors"),
        backends=("torch-eager", "torch-compile", "torch-cudagraph"), exportable=False,
        note="the trained timm model (source of every export)", title="a PyTorch model (.safetensors)",
        module="export.pytorch"),
    "onnx": Format(
        "onnx", ".onnx", ("fp32", "fp16", "int8"), needs=("onnx", "onnxruntime"),
        # fp16 is an AutoCast mixed-precision graph; int8 is a Q/DQ graph (ORT quantize_static or ModelOpt).
        precision_needs=(("fp16", ("modelopt",)),),
        backends=("ort-cuda", "ort-cpu"),
        note="fp32; int8 = Q/DQ ONNX; fp16 via ModelOpt AutoCast", title="an ONNX model", module="export.onnx"),
    "pt2": Format(
        "pt2", ".pt2", ("fp32", "bf16", "fp16"), needs=("torch",), backends=("aoti",),
        note="torch.export + AOTInductor package, for the torch release and device (CPU ISA / GPU) that built it",
        title="a PyTorch AOTInductor package (.pt2)", module="export.pt2", native=True),
    "trt": Format(
        "trt", ".engine", ("fp32", "fp16", "bf16", "int8"), needs=("tensorrt",),
        backends=("trt",),
        note="TensorRT engine for the GPU and TensorRT version that built it", title="a TensorRT engine",
        module="export.tensorrt", native=True),
}


# Every `spofa bench --backend` value but "auto", in table order.
BACKENDS: tuple[str, ...] = tuple(dict.fromkeys(b for f in FORMATS.values() for b in f.backends))


def get_format(name: str) -> Format:
    """The exportable format called `name`, with a suggestion on a typo."""
    return FORMATS[check_choice(name, [k for k, f in FORMATS.items() if f.exportable], "--format", noun="export format")]


def format_for_path(path: str | Path) -> Format:
    """The format of an artifact, by its suffix (`student.int8.onnx` -> onnx)."""
    suffix = Path(path).suffix.lower()
    for fmt in FORMATS.values():
        if fmt.suffix == suffix:
            return fmt
    known = ", ".join(f.suffix for f in FORMATS.values())
    raise UserError(f"{path}: unknown model file type '{suffix or '(none)'}' (expected one of {known})")


def artifact_name(stem: str, fmt: Format, precision: str) -> str:
    """Default file name: `student.onnx`, `student.int8.onnx`, `student.fp16.engine`."""
    return f"{stem}{fmt.suffix}" if precision == "fp32" else f"{stem}.{precision}{fmt.suffix}"
