"""The training loop's seams (`Hooks`) and the process-wide hooks installed from outside a run.

A caller passes its run's own `Hooks` to `fit(hooks=...)`. Code that does not call `fit` itself
(an extension, a profiler, the fault suite's injector in tests/faults/inject.py, which runs the
real CLI) installs hooks for every `fit` of the process with `add_hooks` or `installed_hooks`.
A `fit` takes the installed hooks as it starts (`active_hooks`): at each seam it calls the run's
own hook first, then the installed ones in the order they were added.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import torch
from torch import nn


@dataclass
class Hooks:
    """Callbacks at the training loop's seams; each is optional.

    The step callbacks get the run's global step (from 0; a resumed run continues its count).
    `on_best` is where a caller writes the shipped model (main rank only); `on_loss` is the
    place to scale or inspect a step's loss before its backward: it returns the loss to use
    (the NaN guard then sees what it returned).
    """

    before_update: Callable[[int], None] | None = None  # after backward, before the optimizer step
    on_eval: Callable[[int], None] | None = None  # before each end-of-epoch evaluation
    on_checkpoint: Callable[[int], None] | None = None  # before each checkpoint write
    on_best: Callable[[nn.Module, dict], None] | None = None  # (model, record) when val top-1 improves
    on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # (step, loss) -> loss, before backward
    # (kind, step, record) as the main rank writes each trace row ("trace") and each epoch's metrics ("epoch")
    on_record: Callable[[str, int, dict], None] | None = None


_INSTALLED: list[Hooks] = []


def add_hooks(hooks: Hooks) -> Callable[[], None]:
    """Install `hooks` for every `fit` this process starts from now on.

    Returns:
        A function that removes them again (runs already started keep them).
    """
    _INSTALLED.append(hooks)

    def remove() -> None:
        for i, h in enumerate(_INSTALLED):
            if h is hooks:  # identity: two equal Hooks objects are still two installations
                del _INSTALLED[i]
                return

    return remove


@contextmanager
def installed_hooks(hooks: Hooks) -> Iterator[Hooks]:
    """`add_hooks` for the duration of a `with` block."""
    remove = add_hooks(hooks)
    try:
        yield hooks
    finally:
        remove()


def active_hooks(own: Hooks | None = None, *more: Hooks | None) -> Hooks:
    """The hooks a run calls: its own, then `more` (the loop's own extensions), then the installed ones, as one
    `Hooks` (None where nobody hooks in)."""
    chain = [h for h in (own, *more, *_INSTALLED) if h is not None]
    return Hooks(**{f.name: _chained(f.name, [getattr(h, f.name) for h in chain if getattr(h, f.name)])
                    for f in fields(Hooks)})


def _chained(name: str, fns: list[Callable]) -> Callable | None:
    if len(fns) <= 1:
        return fns[0] if fns else None
    if name == "on_loss":  # each sees the loss the one before returned
        def on_loss(step: int, loss: torch.Tensor) -> torch.Tensor:
            for f in fns:
                loss = f(step, loss)
            return loss
        return on_loss

    def call(*args) -> None:
        for f in fns:
            f(*args)
    return call
