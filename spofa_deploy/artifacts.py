"""Run folders, model files with JSON metadata, and atomic writes.

A model artifact is a pair: `<name>.safetensors` (only the timm model's own keys) and
`<name>.json` (everything needed to rebuild and feed it: timm name, classes, input
size, mean/std, ...) and the file's SHA-256 and size, checked before the file is loaded. Every
write goes to a temp file, is fsynced, then renamed, so a crash never leaves a half-written file.

Run folders, their locks and `runs/latest` are `spofa_deploy.run_dirs`'s.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from spofa_deploy.errors import UserError, os_error
from spofa_deploy.limits import MAX_IMG_SIZE, check_int


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    On any error the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder: name a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (os_error(e, path) or e) from e
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        err = os_error(e, path)
        if err is None:
            raise
        kept = " (the previous file is kept)" if path.exists() else ""
        raise UserError(f"{err}{kept}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, a missing or read-only folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: name a file")
    if not path.parent.is_dir():
        raise UserError(f"{flag}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"{flag} {path}: its folder is not writable (read-only or no permission): write elsewhere")
    return path


def write_json(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"metadata file not found: {path}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a valid JSON metadata file: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a metadata object")
    return data


def versions() -> dict:
    """Versions of the libraries that shape a result, for metadata and reports."""
    import timm

    from spofa_deploy import __version__
    out = {"spofa_deploy": __version__, "torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "tensorrt"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


def sidecar_path(artifact: str | Path) -> Path:
    """`student.safetensors` -> `student.json`; `student.onnx` -> `student.onnx.json`."""
    artifact = Path(artifact)
    if artifact.suffix == ".safetensors":
        return artifact.with_suffix(".json")
    return artifact.with_name(artifact.name + ".json")


def save_model(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Write `model`'s state dict as safetensors and `meta` (with the file's digest) as its JSON sidecar."""
    from safetensors.torch import save

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes this map in a per-process random (Rust HashMap) order, so two
    # keys give different bytes for the same weights. The timm name is in the JSON sidecar.
    data = save(state, metadata={"format": "pt"})  # bytes written from Python: a full disk is an OSError
    with atomic_path(path) as tmp:
        write_bytes(data, tmp)
    write_json(sidecar_path(path), {**meta, **file_digest(path), "versions": versions(),
                                    "saved_at": datetime.now().isoformat(timespec="seconds")})


def write_bytes(data: bytes, path: str | Path) -> None:
    """Write `data` to `path` (the one place model files are written: the fault suite cuts writes here)."""
    Path(path).write_bytes(data)


# The sidecar keys that tie it to its artifact's bytes.
DIGEST_KEYS = ("sha256", "size_bytes")


def file_digest(path: str | Path) -> dict:
    """{"sha256": hex digest, "size_bytes": size} of a file, for its sidecar."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "size_bytes": Path(path).stat().st_size}


def verify_artifact(path: str | Path, meta: dict, *, trust: bool = False, native: bool = False) -> None:
    """Refuse a file whose bytes are not the ones its sidecar recorded, before anything is loaded from it.

    Args:
        path: the artifact.
        meta: its sidecar.
        trust: skip the check (`--trust`: the user vouches for the file).
        native: the file holds native code (a `.pt2`, an engine): a sidecar without a digest is refused too.
    """
    if trust:
        return
    path, side = Path(path), sidecar_path(path).name
    want = meta.get("sha256")
    if want is None:
        if native:
            raise UserError(f"{side} records no sha256 of {path.name}, which holds native code: re-export it with "
                            "`spofa export`, or run it with `spofa bench --trust` if you built this file yourself")
        return
    size = meta.get("size_bytes")
    if (size is not None and path.stat().st_size != size) or file_digest(path)["sha256"] != want:
        raise UserError(f"{path.name} is not the file its sidecar {side} was written for (its SHA-256 differs): "
                        "it was changed or replaced after it was written; write it again with the command that made "
                        "it, or run it with `spofa bench --trust` if you vouch for it")


REQUIRED_META = ("model", "num_classes", "img_size", "mean", "std")
INPUT_NAME, OUTPUT_NAME = "images", "logits"  # every exported model's one input and one output


def read_model_meta(path: str | Path, written_by: str = "spofa distill") -> dict:
    """Read and check the JSON sidecar of a model file or exported artifact."""
    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(f"{path} has no sidecar {side.name} beside it (it is written by `{written_by}`)")
    meta = read_json(side)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"{side} lacks {', '.join(missing)}: not a spofa metadata file")
    return check_meta(meta, side)


def check_meta(meta: dict, side: str | Path) -> dict:
    """`meta` with its sizes, counts and normalisation checked, each bad value named with its field.

    Raises:
        UserError: e.g. `student.json: num_classes must be an integer >= 1, got 'ten'`.
    """
    out = dict(meta)
    for key, lo, hi in (("num_classes", 1, None), ("img_size", 1, MAX_IMG_SIZE), ("in_chans", 1, 64)):
        if key in out:
            out[key] = check_int(out[key], f"{side}: {key}", lo, hi)
    chans = out.get("in_chans", 3)
    for key in ("mean", "std"):
        v = out.get(key)
        if v is None:
            continue
        if not (isinstance(v, list) and len(v) == chans and all(_number(x) for x in v)):
            raise UserError(f"{side}: {key} must be a list of {chans} numbers, got {v!r}")
        if key == "std" and not all(x > 0 for x in v):
            raise UserError(f"{side}: std must be > 0 for every channel, got {v!r}")
    classes = out.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != out["num_classes"]):
        raise UserError(f"{side}: classes must list num_classes ({out['num_classes']}) names")
    return out


def _number(x) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle), with a clear error for bad files."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        if not _utf8(path):
            return load(path.read_bytes())  # safetensors' Rust side refuses a file name that is not UTF-8
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from e


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_model(path: str | Path, exportable: bool = False, trust: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a timm model from `<name>.safetensors` + `<name>.json`, its digest checked first.

    Args:
        path: the `.safetensors` file.
        exportable: build layers that export cleanly.
        trust: load it even when its bytes differ from its sidecar's digest.

    Returns:
        (model in eval mode, metadata dict)
    """
    from spofa_deploy.models import create_model

    meta = read_model_meta(path)
    if not Path(path).is_file():
        raise UserError(f"model file not found: {path}")
    verify_artifact(path, meta, trust=trust)
    model = create_model(meta["model"], int(meta["num_classes"]), img_size=int(meta["img_size"]),
                         exportable=exportable)
    state = load_state(path)
    expected = set(model.state_dict())
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise UserError(f"{path} does not match {meta['model']} from its metadata "
                        f"({len(missing)} missing keys, {len(extra)} unexpected keys, e.g. {(missing + extra)[:2]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit {meta['model']} with {meta['num_classes']} classes: "
                        f"{str(e).splitlines()[-1].strip()}") from e
    return model.eval(), meta


def load_student(path: str | Path = "runs/latest/student.safetensors") -> nn.Module:
    """Rebuild the distilled student (a plain timm model, no projector heads)."""
    return load_model(path)[0]
