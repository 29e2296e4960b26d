"""What a model file is: `Artifact` (the file, its format and its checked sidecar), `BatchProfile`, and the one
sidecar reader every format's home describes its files with.

`describe(path)` turns a path (a `.safetensors`, `.onnx`, `.pt2`, `.engine` or a run folder) into an
`Artifact`: the format is found by the file's suffix (`export.formats`) and that format's home reads and
checks the rest (`<home>.describe`). A missing file or sidecar, or a sidecar that describes another file,
is a `UserError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.formats import FORMATS, format_for_path
from spofa_deploy.artifacts import read_model_meta, sidecar_path, verify_artifact
from spofa_deploy.errors import UserError
from spofa_deploy.limits import check_int


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an artifact accepts: fixed (min == opt == max) or a dynamic range."""

    min: int
    opt: int
    max: int
    dynamic: bool = False

    @classmethod
    def fixed(cls, batch: int) -> "BatchProfile":
        if batch < 1:
            raise UserError(f"--batch must be >= 1, got {batch}")
        return cls(batch, batch, batch, dynamic=False)

    @classmethod
    def dynamic_range(cls, lo: int, opt: int, hi: int) -> "BatchProfile":
        if not 1 <= lo <= opt <= hi:
            raise UserError(f"--dynamic-batch needs 1 <= MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")
        return cls(lo, opt, hi, dynamic=True)

    @classmethod
    def parse(cls, spec: str) -> "BatchProfile":
        """Parse `MIN:OPT:MAX` (e.g. `1:8:32`)."""
        try:
            lo, opt, hi = (int(v) for v in spec.split(":"))
        except ValueError:
            raise UserError(f"--dynamic-batch takes MIN:OPT:MAX (e.g. 1:8:32), got '{spec}'") from None
        return cls.dynamic_range(lo, opt, hi)

    @classmethod
    def of_meta(cls, meta: dict) -> "BatchProfile | None":
        """The profile of a sidecar's `batch` entry (None where it has none)."""
        b = meta.get("batch")
        if not b:
            return None
        return cls(int(b["min"]), int(b["opt"]), int(b["max"]), bool(b.get("dynamic", b["min"] != b["max"])))

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max, "dynamic": self.dynamic}


@dataclass
class Artifact:
    """A model file with its checked metadata: what bench runs and what an export's checks run.

    Attributes:
        path: the file.
        format: a key of `export.formats.FORMATS`: torch | onnx | trt | pt2.
        meta: its sidecar (model, classes, preprocessing, and what the export recorded).
        precision: the artifact's own precision (None for PyTorch weights: chosen at run time).
        size_bytes: bytes on disk (with external ONNX weights).
        batch_range: (min, max) batch sizes it accepts; None for any.
        source: the `.safetensors` an export came from (the file itself for PyTorch weights).
        onnx: what an ONNX graph declares (ONNX files only).
    """

    path: Path
    format: str
    meta: dict
    precision: str | None
    size_bytes: int
    batch_range: tuple[int, int] | None
    source: Path | None = None
    onnx: object | None = None  # `export.onnx.info.OnnxInfo` of an ONNX file

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def img_size(self) -> int:
        return int(self.meta["img_size"])

    @property
    def in_chans(self) -> int:
        return int(self.meta.get("in_chans", 3))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        return self.in_chans, self.img_size, self.img_size

    @property
    def trusted(self) -> bool:
        """Run on the user's word (`--trust`): no sidecar, described by the file itself."""
        return bool(self.meta.get("trusted_without_sidecar"))


def model_file(path: str | Path, role: str = "student") -> Path:
    """The model file a path names: a folder means its `student.safetensors` (or `teacher.safetensors`).

    Raises:
        UserError: nothing there, or a folder without that file.
    """
    path = Path(path)
    if path.is_dir():
        cand = path / f"{role}.safetensors"
        if not cand.is_file():
            raise UserError(f"{path} is a folder without {cand.name}: name the model file to bench")
        path = cand
    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    return path


def describe(path: str | Path, *, role: str = "student", trust: bool = False) -> Artifact:
    """The `Artifact` a path names, described by its format's home (`export.formats`).

    Args:
        path: a model file, or a run folder (its `<role>.safetensors`).
        role: which model of a run folder.
        trust: accept a native file (engine, `.pt2`) without its sidecar, or one whose bytes differ from it.
    """
    file = model_file(path, role)
    fmt = format_for_path(file)
    return fmt.home.describe(file, trust=trust)


def read_sidecar(path: Path, fmt: str, *, trust: bool = False, native: bool = False,
                 unknown_origin: str | None = None) -> dict | None:
    """The sidecar of a model file, checked: its fields, its digest, and that it describes a file of `fmt`.

    The one reader of sidecars: every format's `describe` reads through it.

    Args:
        path: the model file.
        fmt: its format (a key of `export.formats.FORMATS`).
        trust: `--trust`: skip the digest; a native file may then have no sidecar (None is returned).
        native: the file holds native code (an engine, a `.pt2`): a digest is required.
        unknown_origin: the message tail for a native file without a sidecar (default: the generic one).

    Raises:
        UserError: no sidecar (and not a trusted native file), a malformed one, another file's, or one
            written for another format.
    """
    side = sidecar_path(path)
    if not side.is_file():
        if native and trust:
            return None
        if native and unknown_origin:
            raise UserError(f"{path} has no sidecar {side.name}: {unknown_origin}")
    meta = read_model_meta(path) if fmt == "torch" else read_model_meta(path, written_by="spofa export")
    # Before anything reads the file: a `.pt2` or an engine is native code, run as soon as it is loaded.
    verify_artifact(path, meta, trust=trust, native=native)
    declared = meta.get("format")
    if declared is None and fmt != "torch":
        raise UserError(f"{side} has no 'format' entry: it was not written for {path.name}")
    if declared is not None and str(declared).lower() != fmt:
        raise UserError(f"sidecar {side.name} describes a '{declared}' artifact but {path.name} is "
                        f"{FORMATS[fmt].title}: the sidecar does not belong to this file (re-export it)")
    try:
        int(meta["img_size"]), int(meta["num_classes"])
    except (TypeError, ValueError):
        raise UserError(f"{side} has a non-integer img_size or num_classes") from None
    return meta


def sidecar_batch(meta: dict, path: Path) -> tuple[int, int] | None:
    """(min, max) of a sidecar's `batch` entry, checked; None where it has none."""
    b = meta.get("batch")
    if b is None:
        return None
    side = sidecar_path(path)
    if not isinstance(b, dict) or not {"min", "max"} <= set(b):
        raise UserError(f"{side} has a malformed 'batch' entry {b!r} (expected min/opt/max)")
    lo, hi = check_int(b["min"], f"{side}: batch.min", 1), check_int(b["max"], f"{side}: batch.max", 1)
    if lo > hi:
        raise UserError(f"{side}: batch.min {lo} is above batch.max {hi}")
    return lo, hi


def export_source(meta: dict, artifact: Path) -> Path | None:
    """The `.safetensors` an export was made from (its sidecar's `source`), where it still exists."""
    src = meta.get("source")
    if not src:
        return None
    p = Path(src)
    for cand in ([p] if p.is_absolute() else [artifact.parent / p, artifact.parent / p.name, p]):
        if cand.is_file():
            return cand
    return None


def exported(path: Path, fmt: str, meta: dict, **fields) -> Artifact:
    """The `Artifact` of an exported file whose sidecar `meta` has been read: precision, size, batch range
    from the sidecar and the source it came from (any of them overridden by `fields`)."""
    if "batch_range" not in fields:
        fields["batch_range"] = sidecar_batch(meta, path)
    values = dict(precision=str(meta.get("precision", "fp32")).lower(), size_bytes=path.stat().st_size,
                  source=export_source(meta, path))
    return Artifact(path=path, format=fmt, meta=meta, **{**values, **fields})
