"""Run folders: where they go (`runs/`), one writer per folder, `runs/latest`, and what a failed command leaves.

One writer per folder: a run folder (and an export target) is written under an advisory lock
(`filelock`); a second writer is refused, naming the process that holds it. A command that fails
removes the empty run folders it made and points `runs/latest` back where it pointed (`abandon_runs`).
"""
from __future__ import annotations

import contextlib
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Iterator

from spofa_deploy.errors import UserError, os_error

RUNS_DIR = Path("runs")
LATEST = "latest"

_HELD: dict[Path, object] = {}  # lock file -> this process's FileLock (taking it twice is a no-op)
_CREATED: set[Path] = set()  # run folders this process created
_LATEST_UNDO: dict = {}  # how runs/latest pointed before this process moved it


def new_run_dir(out: str | Path | None, prefix: str, *, resume: bool = False, writer: str = "spofa") -> Path:
    """Create the run folder (default `runs/<prefix>-<timestamp>`) and take its writer's lock.

    Args:
        out: the folder (`--out`), or None for a new one under `runs/`.
        prefix: the default folder's name before its timestamp.
        resume: the folder must exist already (a resume never creates one); without it, a folder
            that holds a run (its checkpoint) is refused.
        writer: the command writing it, named to a second writer that is refused.

    Raises:
        UserError: a folder that cannot be made or written, a missing folder to resume, or one
            another process is writing.
    """
    if out is None:
        out = RUNS_DIR / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if resume and not out.is_dir():
        raise UserError(f"--resume: there is no run folder {out} to continue")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise UserError(f"cannot create run folder {out}: a file of that name exists") from e
    except OSError as e:
        raise (os_error(e, out, verb="create run folder") or e) from e
    if not os.access(out, os.W_OK):
        raise UserError(f"run folder is not writable: {out}")
    if os.environ.get("RANK", "0") == "0":  # one lock per run: the main process of a torchrun job takes it
        hold(lock_file(out), out, writer)
    if not resume and _holds_run(out):  # a teacher stage or a distillation is never overwritten
        release(lock_file(out))
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if created:
        _CREATED.add(out.resolve())
    return out


def _holds_run(folder: Path) -> bool:
    from spofa_deploy.run_files import CHECKPOINT

    return (folder / CHECKPOINT).is_file()


def lock_file(target: str | Path) -> Path:
    """The lock of a run folder or an export target: `.<name>.lock` beside it (outside a folder, so a refused
    or killed writer never changes what is inside), named after the real path, whatever link led to it."""
    real = Path(target).resolve()
    return real.parent / f".{real.name}.lock"


def hold(lock: Path, target: Path, writer: str) -> None:
    """Take the advisory write lock of `target` for this process, or refuse naming the process that holds it.

    The lock is the kernel's (flock through `filelock`): a killed holder releases it at once. The
    file records who holds it, for the refusal's message, and is removed on release, so a finished
    command leaves no trace of it.
    """
    from filelock import FileLock, Timeout

    key = Path(os.path.abspath(lock))
    if key in _HELD:
        return
    for _ in range(5):  # a holder removing the file as we lock it: lock the new file
        lock = FileLock(str(key), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"{target} is being written by {_holder(key)}: wait for it to finish, or write "
                            "elsewhere") from None
        except OSError as e:
            raise (os_error(e, target, verb="lock") or e) from e
        if _locked_file_in_place(lock, key):
            break
        lock.release()
    _HELD[key] = lock
    with contextlib.suppress(OSError):  # (the lock holds without the note)
        key.write_text(f"process {os.getpid()} ({writer}) on {platform.node()} since "
                       f"{datetime.now().isoformat(timespec='seconds')}\n")


def _locked_file_in_place(lock, key: Path) -> bool:
    """The file `lock` holds is still the one at `key` (a releasing holder unlinks it)."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    try:
        here = os.stat(key)
        return fd is None or os.path.samestat(here, os.fstat(fd))
    except OSError:
        return False


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def release(lock: Path) -> None:
    """Give up this process's lock (a no-op when it holds none)."""
    key = Path(os.path.abspath(lock))
    lock = _HELD.pop(key, None)
    if lock is not None:
        key.unlink(missing_ok=True)  # before the release: a waiter then finds the file gone and locks anew
        lock.release()


def release_run(run: Path) -> None:
    """The run is finished (or safely resumable): release its folder's lock."""
    release(lock_file(run))
    _CREATED.discard(Path(run).resolve())
    if _LATEST_UNDO.get("run") == str(run):
        _LATEST_UNDO.clear()


@contextlib.contextmanager
def writing(target: Path, writer: str) -> Iterator[None]:
    """Hold the write lock of one output file (`lock_file`) for the duration of a block."""
    lock = lock_file(target)
    hold(lock, target, writer)
    try:
        yield
    finally:
        release(lock)


def abandon_runs() -> None:
    """After a command failed: undo what it left that helps nobody, and release its locks.

    A run folder it created that still holds nothing is removed; `runs/latest` moved to a run
    without a checkpoint (nothing to resume) points where it pointed before.
    """
    from spofa_deploy.run_files import CHECKPOINT

    undo = dict(_LATEST_UNDO)
    if undo and not (Path(undo["run"]) / CHECKPOINT).is_file():
        _restore_latest(Path(undo["root"]), undo["previous"])
    for key in list(_HELD):
        release(key)
    for run in list(_CREATED):
        with contextlib.suppress(OSError):
            run.rmdir()  # only when empty
    _CREATED.clear()
    _LATEST_UNDO.clear()


def _restore_latest(root: Path, previous: str | None) -> None:
    with contextlib.suppress(OSError):
        if previous is None:
            (root / LATEST).unlink(missing_ok=True)
        else:
            _point_latest(root, previous)


def mark_latest(run: Path, root: str | Path = RUNS_DIR) -> None:
    """Point `runs/latest` at `run`, wherever `--out` put it (a symlink, replaced atomically; a text file where
    links are not allowed), so `spofa export` and `--resume` find the run just made, never an older one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    link = root / LATEST
    previous = os.readlink(link) if link.is_symlink() else None
    _LATEST_UNDO.update(root=str(root), previous=previous, run=str(run))
    _point_latest(root, os.path.relpath(Path(run).resolve(), root.resolve()))


def _point_latest(root: Path, target: str) -> None:
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
