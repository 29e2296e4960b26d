"""Run folders, model files with JSON metadata, and atomic writes.

A model artifact is a pair: `<name>.safetensors` (only the timm model's own keys) and
`<name>.json` (everything needed to rebuild and feed it: timm name, classes, input
size, mean/std, ...). Every write goes to a temp file, is fsynced, then renamed, so
a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import UserError

RUNS_DIR = Path("runs")
LATEST = "latest"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    On any error the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        kept = " (the previous file is kept)" if path.exists() else ""
        raise UserError(f"cannot write {path}: {e.strerror}{kept}") from e
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

    from . import __version__

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
    """Write `model`'s state dict as safetensors and `meta` as its JSON sidecar."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        # One metadata key: safetensors writes this map in a per-process random (Rust HashMap) order, so two
        # keys give different bytes for the same weights. The timm name is in the JSON sidecar.
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(sidecar_path(path), {**meta, "versions": versions(), "saved_at": datetime.now().isoformat(timespec="seconds")})


REQUIRED_META = ("model", "num_classes", "img_size", "mean", "std")


def read_model_meta(path: str | Path, written_by: str = "spofa distill") -> dict:
    """Read and check the JSON sidecar of a model file or exported artifact."""
    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(f"{path} has no sidecar {side.name} beside it (it is written by `{written_by}`)")
    meta = read_json(side)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"{side} lacks {', '.join(missing)}: not a spofa metadata file")
    return meta


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


def load_model(path: str | Path, exportable: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a timm model from `<name>.safetensors` + `<name>.json`.

    Returns:
        (model in eval mode, metadata dict)
    """
    from .models import create_model

    meta = read_model_meta(path)
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


def new_run_dir(out: str | Path | None, prefix: str) -> Path:
    """Create the run folder (default `runs/<prefix>-<timestamp>`)."""
    if out is None:
        out = RUNS_DIR / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {out}: {e.strerror}") from e
    if not os.access(out, os.W_OK):
        raise UserError(f"run folder is not writable: {out}")
    return out


def mark_latest(run: Path, root: str | Path = RUNS_DIR) -> None:
    """Point `runs/latest` at `run`, wherever `--out` put it (a symlink, replaced atomically; a text file where
    links are not allowed), so `spofa export` and `--resume` find the run just made, never an older one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(Path(run).resolve(), root.resolve())
    link = root / LATEST
    tmp = root / f".{LATEST}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        (root / f"{LATEST}.txt").write_text(target + "\n")


def latest_run(root: str | Path = RUNS_DIR) -> Path:
    """The run folder `runs/latest` points at."""
    root = Path(root)
    link = root / LATEST
    if link.is_dir():
        return link.resolve()
    txt = root / f"{LATEST}.txt"
    if txt.is_file():
        return root / txt.read_text().strip()
    raise UserError(f"no run found under {root}/ (run `spofa distill` first, or name a file)")
