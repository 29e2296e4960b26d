"""Error types shared by the library and the CLI."""
from __future__ import annotations

import errno
import os


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong data).

    The CLI prints the message as one line on stderr and exits with code 2.
    """


class MissingDependency(UserError):
    """An optional dependency (TensorRT, a CUDA provider, ...) is not installed."""


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN/Inf; the last good checkpoint is kept."""


def check_choice(value: str, choices, flag: str, *, noun: str | None = None) -> str:
    """`value` stripped and lower-cased when it is one of `choices`; the one "unknown choice" message.

    Raises:
        UserError: e.g. `unknown method 'kd2' for --method: choose from spofa, ofa, kd, none (did you mean 'kd'?)`;
            `noun` (default: the flag's word) says what the value names; up to two close choices are suggested.
    """
    import difflib

    choices = list(choices)
    key = value.strip().lower()
    if key in choices:
        return key
    close = difflib.get_close_matches(key, choices, n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise UserError(f"unknown {noun or flag.lstrip('-')} '{value}' for {flag}: choose from {', '.join(choices)}{hint}")


# What a user can do about an OS error on a path they gave (the errors a disk or a folder raises).
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space there or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: write elsewhere or fix the folder's permissions",
    errno.EPERM: "operation not permitted: write elsewhere or fix the folder's permissions",
    errno.EISDIR: "it is a folder: name a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EFBIG: "the file is too large for that file system",
}


def os_error(e: OSError, path: str | os.PathLike | None = None, *, verb: str = "write") -> UserError | None:
    """The one-line UserError for an OS error a user can fix (full, read-only, a folder, no permission), else None.

    Args:
        e: the error.
        path: the path the user gave (default: the one the error names).
        verb: what was being done to it ("write", "read", "create").
    """
    advice = _OS_ADVICE.get(e.errno)
    if advice is None:
        return None
    where = path if path is not None else (e.filename or "a file")
    return UserError(f"cannot {verb} {where}: {advice}")


def load_error_line(e: BaseException) -> str:
    """The first line of why a file did not load, for a one-line message.

    torch's refusal of a pickle with code in it advises `weights_only=False`, which would run that code:
    that advice is replaced by what the refusal means.
    """
    import pickle

    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
        return "it holds Python objects beyond tensors and plain data: refused, since loading them could run code"
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
