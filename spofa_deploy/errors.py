"""Error types shared by the library and the CLI."""


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
