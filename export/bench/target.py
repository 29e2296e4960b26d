"""What `spofa bench` is given: the model file, its format, its sidecar, and the checks that they belong together.

`resolve_artifact` turns a path (a `.engine`, `.onnx`, `.safetensors` or a run folder) into an
`Artifact`; a missing file or sidecar, or a sidecar that describes another file, is a `UserError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.formats import FORMATS, format_for_path
from spofa_deploy.artifacts import read_model_meta, sidecar_path, verify_artifact
from spofa_deploy.errors import UserError
from spofa_deploy.limits import check_int


@dataclass(frozen=True)
class OnnxInfo:
    """What the ONNX graph itself declares (checked against the sidecar)."""

    input_name: str
    input_shape: tuple  # ints for static dims, strings for symbolic ones
    output_name: str
    output_shape: tuple
    fixed_batch: int | None
    external_files: tuple[str, ...]
    qdq: bool


@dataclass
class Artifact:
    """A model file to bench, with its checked metadata."""

    path: Path
    format: str  # a key of export.formats.FORMATS: torch | onnx | trt | pt2
    meta: dict
    precision: str | None  # the artifact's own precision (None for PyTorch weights: chosen at run time)
    size_bytes: int
    batch_range: tuple[int, int] | None  # None: any batch size
    source: Path | None = None  # the safetensors an export came from
    onnx: OnnxInfo | None = None

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


def _onnx_info(path: Path) -> OnnxInfo:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a bad file
        raise UserError(f"{path} is not a readable ONNX file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1 or not m.graph.output:
        raise UserError(f"{path.name} has {len(inputs)} inputs: spofa bench runs image classifiers with one input")

    def dims(v) -> tuple:
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim)

    ishape, oshape = dims(inputs[0]), dims(m.graph.output[0])
    external = sorted({e.value for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    fixed = ishape[0] if ishape and isinstance(ishape[0], int) and ishape[0] > 0 else None
    return OnnxInfo(inputs[0].name, ishape, m.graph.output[0].name, oshape, fixed, tuple(external), qdq)


def _sidecar_batch(meta: dict, side: Path) -> tuple[int, int] | None:
    b = meta.get("batch")
    if b is None:
        return None
    if not isinstance(b, dict) or not {"min", "max"} <= set(b):
        raise UserError(f"{side} has a malformed 'batch' entry {b!r} (expected min/opt/max)")
    lo, hi = check_int(b["min"], f"{side}: batch.min", 1), check_int(b["max"], f"{side}: batch.max", 1)
    if lo > hi:
        raise UserError(f"{side}: batch.min {lo} is above batch.max {hi}")
    return lo, hi


def _resolve_source(meta: dict, artifact: Path) -> Path | None:
    src = meta.get("source")
    if not src:
        return None
    p = Path(src)
    for cand in ([p] if p.is_absolute() else [artifact.parent / p, artifact.parent / p.name, p]):
        if cand.is_file():
            return cand
    return None


def _trusted_engine(path: Path) -> Artifact:
    """An engine without a sidecar, run on the user's word (--trust): input and classes read from the engine."""
    from export.tensorrt import TrtEngine

    r = TrtEngine(path, trust=True)  # MissingDependency where TensorRT or a GPU is missing
    c, h, _ = (int(d) for d in r.input_shape)
    classes = int(tuple(r.engine.get_tensor_shape(r.output_name))[-1])
    meta = {"model": path.stem, "format": "trt", "img_size": h, "in_chans": c, "num_classes": classes,
            "batch": r.batch, "trusted_without_sidecar": True}
    return Artifact(path=path, format="trt", meta=meta, precision="unknown", size_bytes=path.stat().st_size,
                    batch_range=(r.min_batch, r.max_batch))


def _trusted_pt2(path: Path, trust: bool) -> Artifact:
    """A package without its sidecar: refused unless trusted, then described by the facts inside it."""
    from export.pt2 import read_pt2_meta

    meta = read_pt2_meta(path, trust)  # UserError naming --trust when not trusted
    b = meta["batch"]
    return Artifact(path=path, format="pt2", meta=meta, precision=meta.get("precision", "fp32"),
                    size_bytes=path.stat().st_size, batch_range=(int(b["min"]), int(b["max"])))


def resolve_artifact(path: str | Path, role: str = "student", trust: bool = False) -> Artifact:
    """Find and check the artifact: file kind, sidecar, and that the two belong together.

    A folder means its `student.safetensors` (or `teacher.safetensors` for role="teacher").

    Raises:
        UserError: missing file or sidecar, or a sidecar that does not match the file.
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
    fmt = format_for_path(path).name
    side = sidecar_path(path)
    if fmt == "trt" and trust and not side.is_file():
        return _trusted_engine(path)
    if fmt == "pt2" and not side.is_file():
        return _trusted_pt2(path, trust)
    meta = read_model_meta(path) if fmt == "torch" else read_model_meta(path, written_by="spofa export")
    # Before anything reads the file: a `.pt2` or an engine is native code, run as soon as it is loaded.
    verify_artifact(path, meta, trust=trust, native=fmt in ("pt2", "trt"))
    declared = meta.get("format")
    if declared is None and fmt != "torch":
        raise UserError(f"{side} has no 'format' entry: it was not written for {path.name}")
    if declared is not None and str(declared).lower() != fmt:
        raise UserError(f"sidecar {side.name} describes a '{declared}' artifact but {path.name} is {FORMATS[fmt].title}: "
                        f"the sidecar does not belong to this file (re-export it)")
    try:
        img = int(meta["img_size"])
        classes = int(meta["num_classes"])
    except (TypeError, ValueError):
        raise UserError(f"{side} has a non-integer img_size or num_classes") from None
    batch_range = _sidecar_batch(meta, side) if fmt != "torch" else None
    size = path.stat().st_size
    info = None
    if fmt == "onnx":
        info = _onnx_info(path)
        _check_onnx_against_sidecar(path, side, info, meta, img, classes, batch_range)
        for name in info.external_files:
            ext = path.parent / name
            if not ext.is_file():
                raise UserError(f"{path.name} keeps its weights in {name}, which is missing beside it")
            size += ext.stat().st_size
        # A dynamic-batch ONNX runs any batch in ONNX Runtime; the sidecar's profile is for TensorRT.
        batch_range = (info.fixed_batch, info.fixed_batch) if info.fixed_batch else None
    precision = str(meta.get("precision", "fp32")).lower() if fmt != "torch" else None
    return Artifact(path=path, format=fmt, meta=meta, precision=precision, size_bytes=size, batch_range=batch_range,
                    source=_resolve_source(meta, path) if fmt != "torch" else path, onnx=info)


def _check_onnx_against_sidecar(path, side, info: OnnxInfo, meta, img, classes, batch_range) -> None:
    shape = info.input_shape
    if len(shape) != 4:
        raise UserError(f"{path.name} takes a rank-{len(shape)} input {shape}; an image classifier takes (N, C, H, W)")
    chans = int(meta.get("in_chans", 3))
    if isinstance(shape[1], int) and shape[1] > 0 and shape[1] != chans:
        raise UserError(f"{path.name} takes {shape[1]} channels but its sidecar {side.name} implies {chans}: "
                        "the sidecar does not belong to this file")
    hw = [d for d in shape[2:] if isinstance(d, int) and d > 0]
    if hw and any(d != img for d in hw):
        raise UserError(f"{path.name} takes {shape[2]}x{shape[3]} images but its sidecar {side.name} says img_size {img}: "
                        "the sidecar does not belong to this file")
    out = info.output_shape
    if len(out) >= 2 and isinstance(out[-1], int) and out[-1] > 0 and out[-1] != classes:
        raise UserError(f"{path.name} outputs {out[-1]} classes but its sidecar {side.name} says {classes}: "
                        "the sidecar does not belong to this file")
    if info.fixed_batch and batch_range and not batch_range[0] <= info.fixed_batch <= batch_range[1]:
        raise UserError(f"{path.name} has a fixed batch of {info.fixed_batch} but its sidecar {side.name} says "
                        f"batch {batch_range[0]}..{batch_range[1]}: the sidecar does not belong to this file")
