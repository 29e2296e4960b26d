"""Several files of one student benched side by side (`spofa bench A --with B --with C`).

The files are described like the main one, checked to be the same model (model, classes, input size,
and the weights they were trained as: `origin`), and one of them, or those weights, is the fp32 reference
whose top-1 each student's agreement (`agreement_fp32`) is measured against (`fp32_reference`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from export.artifact import Artifact, describe, export_source
from export.bench.variants import Candidate, artifact_candidate, file_key
from export.runner import RunOptions
from spofa_deploy.artifacts import read_json, sidecar_path
from spofa_deploy.errors import UserError

# What two files of one student share, as their sidecars record it.
SAME_MODEL = ("model", "num_classes", "img_size", "classes")


def describe_others(student: Artifact, paths: Sequence[str | Path], *, trust: bool = False) -> list[Artifact]:
    """The `--with` files described by their formats' homes; the same file twice is benched once.

    Raises:
        UserError: a file that is missing, unreadable, or of another model (`check_same_model`).
    """
    out: list[Artifact] = []
    seen = {student.path.resolve()}
    for p in paths:
        art = describe(p, trust=trust)
        if art.path.resolve() in seen:
            continue
        check_same_model(student, art)
        if any(a.path.name == art.path.name for a in (student, *out)):  # the table and the keys name files
            raise UserError(f"--with {art.path}: another file named {art.path.name} is already benched; rename one")
        seen.add(art.path.resolve())
        out.append(art)
    return out


def origin(art: Artifact) -> Path | None:
    """The `.safetensors` a student was trained as: an export's source, followed from a QAT student back to the
    weights it was fine-tuned from (its sidecar's `source`); None where a file on the way is missing."""
    path = art.path if art.format == "torch" else art.source
    for _ in range(8):  # (a chain of sources is short; this only guards against a loop)
        if path is None:
            return None
        side = sidecar_path(path)
        meta = read_json(side) if side.is_file() else {}
        if not meta.get("qat"):
            return path.resolve()
        path = export_source(meta, path)
    return None


def check_same_model(student: Artifact, other: Artifact) -> None:
    """Refuse, in one line, a `--with` file that is not the main student's model."""
    for key in SAME_MODEL:
        a, b = student.meta.get(key), other.meta.get(key)
        if a != b:
            what = f"{key} differ" if isinstance(a, list) or isinstance(b, list) else f"{key} {b} != {a}"
            raise UserError(f"--with {other.path.name} is another model than {student.path.name} ({what}): "
                            "bench files of one student together")
    a, b = origin(student), origin(other)
    if a != b:
        raise UserError(f"--with {other.path.name} comes from {b or 'unknown weights'}, {student.path.name} from "
                        f"{a or 'unknown weights'}: bench files of one student together")


def fp32_reference(students: list[Artifact]) -> tuple[Artifact | None, str]:
    """The fp32 student whose predictions the others are compared with, and the note that names it.

    The first fp32 export among the files given; else the PyTorch weights they came from (run in fp32).
    """
    ref = next((a for a in students if a.format != "torch" and a.precision == "fp32"), None)
    if ref is not None:
        return ref, (f"agree fp32: top-1 agreement of each student with {ref.path.name} (the fp32 {ref.format} "
                     "student among the files given), on the same images")
    src = origin(students[0])
    if src is None:
        return None, "agree fp32: not measured (no fp32 file given, and the weights the students came from are gone)"
    return describe(src), (f"agree fp32: top-1 agreement of each student with {src.name} (the PyTorch weights the "
                           "students came from, torch-eager fp32), on the same images")


def with_reference(cands: list[Candidate], ref: Artifact | None, *, device: str,
                   options: RunOptions) -> list[Candidate]:
    """The candidates with the reference's PyTorch weights added as a student (fp32), where not among them."""
    if ref is None or ref.format != "torch":
        return cands
    c = artifact_candidate(ref, role="student", backend="torch-eager", requested="torch-eager", precision="fp32",
                           device=device, options=options)
    c.result.key = file_key(c.result.key, ref)
    if any(x.result.key == c.result.key for x in cands):
        return cands
    n = sum(x.result.role == "student" for x in cands)  # after the students, before the teachers
    return cands[:n] + [c] + cands[n:]
