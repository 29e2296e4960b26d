"""An ONNX file and its sidecar, read and held against each other: what the graph declares (`OnnxInfo`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.artifact import Artifact, exported, read_sidecar, sidecar_batch
from spofa_deploy.artifacts import sidecar_path
from spofa_deploy.errors import UserError


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


def describe(path: Path, trust: bool = False) -> Artifact:
    """An ONNX file whose sidecar belongs to it: same input channels and size, classes and batch.

    A dynamic-batch graph runs any batch in ONNX Runtime (the sidecar's profile is for TensorRT); a
    fixed-batch graph runs its own batch only.
    """
    meta = read_sidecar(path, "onnx", trust=trust)
    declared = sidecar_batch(meta, path)
    info = onnx_info(path)
    _check_against_sidecar(path, info, meta, declared)
    size = path.stat().st_size
    for name in info.external_files:
        ext = path.parent / name
        if not ext.is_file():
            raise UserError(f"{path.name} keeps its weights in {name}, which is missing beside it")
        size += ext.stat().st_size
    batch = (info.fixed_batch, info.fixed_batch) if info.fixed_batch else None
    return exported(path, "onnx", meta, size_bytes=size, batch_range=batch, onnx=info)


def onnx_info(path: Path) -> OnnxInfo:
    """Read what the graph declares, without its external weights."""
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


def _check_against_sidecar(path: Path, info: OnnxInfo, meta: dict, batch_range: tuple[int, int] | None) -> None:
    side = sidecar_path(path)
    img, classes = int(meta["img_size"]), int(meta["num_classes"])
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
