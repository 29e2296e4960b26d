"""Error types shared by the library and the CLI."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong data).

    The CLI prints the message as one line on stderr and exits with code 2.
    """


class MissingDependency(UserError):
    """An optional dependency (TensorRT, a CUDA provider, ...) is not installed."""


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN/Inf; the last good checkpoint is kept."""
