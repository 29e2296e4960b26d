"""The home of the pt2 format (`export.formats`): PyTorch's own deployable artifact, a `torch.export` +
AOTInductor package run from Python.

    package.py    compile a package, read the facts inside it, check it against this machine, load it
    aoti.py       `Pt2Runner`: the package on its device
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from export.artifact import Artifact, exported, read_sidecar
from export.runner import RunOptions
from spofa_deploy.errors import UserError

from .package import (check_package, check_pt2_meta, check_precision, export_pt2, load_pt2, machine_facts,
                      package_facts, require_toolchain, trusted_meta)
from .aoti import Pt2Runner

if TYPE_CHECKING:
    from export.exporter import ExportJob
    from export.options import ExportOptions

__all__ = ["Pt2Runner", "check_export", "check_package", "check_pt2_meta", "describe", "export", "export_pt2",
           "load_pt2", "machine_facts", "package_facts", "runner", "trusted_meta"]
_log = logging.getLogger(__name__)
UNKNOWN_ORIGIN = ("refusing to load a .pt2 of unknown origin (a package is compiled code; pass --trust only for "
                  "packages you built)")


def check_export(options: "ExportOptions") -> None:
    """Refuse, before any work, a package this machine cannot compile (no C++ compiler, GPU or Triton;
    a precision the device lacks)."""
    require_toolchain(options.device)
    check_precision(options.precision, options.device)


def export(job: "ExportJob") -> None:
    """Compile the `.pt2` in a temp folder, check and gate it against PyTorch, publish it with its sidecar."""
    device, precision, result = job.options.device, job.precision, job.result
    with job.work() as work:
        pkg = work / "model.pt2"
        facts = export_pt2(job.model, pkg, img_size=int(job.meta["img_size"]), batch=job.profile, precision=precision,
                           device=device, in_chans=int(job.meta.get("in_chans", 3)))
        for line in facts.pop("warnings"):
            _log.warning(line)
        for k in ("precision", "batch", "input", "output"):  # the sidecar has these already
            facts.pop(k)
        where = f"aoti-{device} (torch {torch.__version__})"
        built = job.built(pkg, "pt2", precision, (job.profile.min, job.profile.max), **facts)
        with Pt2Runner(built, device=device) as run:
            result.parity = job.parity(run, where)
            if precision == "fp32" and not result.parity.passed:
                raise UserError(f"the .pt2 package differs from PyTorch beyond tolerance: {result.parity.describe()}"
                                f"{result.parity.flips()}: nothing written")
            if result.parity.top1_agreement < 99.0:
                _log.warning(f".pt2 top-1 agrees with PyTorch on {result.parity.top1_agreement:.1f}% "
                             f"of {result.parity.n} images only")
            if precision != "fp32":
                result.gate = job.judge(run, where)
        job.install([(pkg, job.dest, job.sidecar("pt2", precision, job.dest, parity=result.parity.to_dict(), **facts))])


def describe(path: Path, trust: bool = False) -> Artifact:
    """A package checked against its sidecar and this machine (torch release, device, GPU or CPU).

    Without a sidecar it is refused unless `trust`; it is then described by the facts inside it.
    """
    meta = read_sidecar(path, "pt2", trust=trust, native=True, unknown_origin=UNKNOWN_ORIGIN)
    if meta is None:
        meta = trusted_meta(path)
    check_package(path, meta)
    return exported(path, "pt2", meta)


def runner(art: Artifact, backend: str, device: str, precision: str, options: RunOptions) -> Pt2Runner:
    """The package on the device it was built for (`aoti`)."""
    return Pt2Runner(art, device=device)
