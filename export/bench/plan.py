"""What `spofa bench` will do, decided before anything runs: `BenchPlan`, made by `plan_bench`.

The plan holds the student, the teacher and how it is obtained (`teacher.TeacherStep`), the variants
to run (`variants.Candidate`, their runners made but not loaded), the batch sizes, the validation
sets (`ValSets`), and the notes of what was decided. Nothing is loaded, exported or timed while planning:
`run.measure` carries the plan out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from export.artifact import Artifact
from export.bench.students import describe_others, fp32_reference, with_reference
from export.bench.teacher import TeacherStep, plan_teacher
from export.bench.timing import TimingOptions
from export.bench.variants import Candidate, bench_device, check_backends, plan_candidates
from export.runner import RunOptions
from spofa_deploy.data.splits import split_seed
from spofa_deploy.artifacts import check_output_file
from spofa_deploy.errors import UserError

# The large batch of the default (1 and this): throughput where the hardware allows it, minutes not hours on a CPU.
LARGE_BATCH = {"cuda": 256, "cpu": 64}


@dataclass(frozen=True)
class BenchOptions:
    """Everything `spofa bench` takes besides the artifact and its teacher (one field per CLI option).

    Attributes:
        data: data spec for accuracy (default: the one in the metadata).
        backends: backends for the student ("auto" = the artifact's natural runtime).
        batch_sizes: batch sizes to time (default: 1 and a large batch the artifacts accept, `default_batches`).
        precisions: PyTorch autocast precisions (fp32/bf16/fp16); for ONNX/engines, must match the export.
        timing: the timing method (`TimingOptions`: warm-up, minimum time and iterations, rounds).
        max_val: evaluate on a stratified subset of this many validation images.
        device: auto | cpu | cuda | cuda:N (PyTorch backends; others have a fixed device).
        teacher_backend: force the teacher's backend (default: the student's; an exported student's
            teacher is exported the same way and cached beside it, `teacher.plan_like`).
        accuracy: evaluate accuracy (needs the data).
        eval_batch: batch size of the accuracy pass.
        compile_mode: `torch.compile` mode for torch-compile.
        trust_engine: run an engine or `.pt2` without its sidecar (`--trust`).
        threads: CPU threads for PyTorch and ONNX Runtime (default: their own defaults).
        json_path, plot_path: also write the JSON report / the accuracy-latency PNG.
        progress: show transient progress bars on stderr.
        others: more files of the same student, benched beside it on the same images (`--with`), each with
            its top-1 agreement with the fp32 student (`students.fp32_reference`).
    """

    data: str | None = None
    backends: Sequence[str] = ("auto",)
    batch_sizes: Sequence[int] | None = None
    precisions: Sequence[str] | None = None
    timing: TimingOptions = field(default_factory=TimingOptions)
    max_val: int | None = None
    device: str = "auto"
    teacher_backend: str | None = None
    accuracy: bool = True
    eval_batch: int = 64
    compile_mode: str | None = None
    trust_engine: bool = False
    threads: int | None = None
    json_path: str | Path | None = None
    plot_path: str | Path | None = None
    progress: bool = True
    others: Sequence[str | Path] = ()

    def checked(self) -> "BenchOptions":
        """These options normalised (backends, batch sizes, teacher backend); bad values are UserErrors."""
        backends = check_backends(self.backends)
        batch_sizes = check_batches(self.batch_sizes) if self.batch_sizes is not None else None
        if self.max_val is not None and self.max_val < 1:
            raise UserError("--max-val must be >= 1")
        for flag, out in (("--json", self.json_path), ("--plot", self.plot_path)):
            if out is not None:  # fail now, not after minutes of timing
                check_output_file(out, flag)
        teacher = check_backends([self.teacher_backend])[0] if self.teacher_backend is not None else None
        return replace(self, backends=backends, batch_sizes=batch_sizes,
                       teacher_backend=None if teacher == "auto" else teacher)

    def run_options(self) -> RunOptions:
        """How the runners run (threads, compile mode, trust)."""
        return RunOptions(threads=self.threads, compile_mode=self.compile_mode, trust=self.trust_engine)


@dataclass(frozen=True)
class ValSets:
    """The validation data of the accuracy pass: the split of `spec`, one set per distinct preprocessing of the
    models, all on the same images (a stratified subset of `max_val` where given); loaded by `run.measure`."""

    spec: str
    max_val: int | None = None
    seed: int = 0  # the student's split seed (`split_seed`): its validation images, for every model

    def describe(self) -> str:
        """For the plan: `on digits (200 images)`."""
        return f"on {self.spec}" + (f" ({self.max_val} images)" if self.max_val else "")


@dataclass
class BenchPlan:
    """What one `spofa bench` will run, decided before anything is loaded or timed.

    Attributes:
        student: the student artifact.
        teacher: the teacher and how it is obtained.
        candidates: the student variants, then the teacher variants they are paired with.
        batches: the batch sizes to time.
        val: the validation sets of the accuracy pass (None: accuracy not measured).
        device: the device of the PyTorch backends ("cpu" or "cuda").
        options: the checked options.
        notes: what was decided and why, for the report.
        others: the `--with` files of the same student, benched beside it.
        reference: the fp32 student the students' `agreement_fp32` is measured against (with `others` only).
    """

    student: Artifact
    teacher: TeacherStep
    candidates: list[Candidate]
    batches: list[int]
    val: ValSets | None
    device: str
    options: BenchOptions
    notes: list[str] = field(default_factory=list)
    others: list[Artifact] = field(default_factory=list)
    reference: Artifact | None = None

    @property
    def students(self) -> list[Artifact]:
        """The student files benched: the main one, then the `--with` ones."""
        return [self.student, *self.others]

    def with_teacher(self, step: TeacherStep) -> "BenchPlan":
        """This plan with the teacher `step` produced (an export carried out): its variants made again for it."""
        candidates = _candidates(self.students, step.artifact, self.reference, self.options, self.device)
        return replace(self, teacher=step, candidates=candidates, notes=self.notes + step.notes + _compiled(step.artifact))

    def lines(self) -> list[str]:
        """The plan in a few lines, as shown before timing."""
        s = self.student
        names = ", ".join(a.path.name for a in self.others)
        with_ = [f"  with: {names}; agreement with {self.reference.path.name if self.reference else 'no fp32 reference'}"]
        runs = [f"{c.result.role} {c.result.backend} {c.result.precision} ({c.result.device})"
                + (f": skipped, {c.result.reason}" if c.runner is None else "") for c in self.candidates]
        return [f"bench plan: {s.path.name} ({s.format} {s.precision or 'weights'}, {s.model})",
                *(with_ if self.others else []),
                f"  teacher: {self.teacher.describe()}",
                f"  variants: {'; '.join(runs)}",
                f"  batches: {', '.join(map(str, self.batches))}; accuracy {self.val.describe() if self.val else 'not measured'}"]


def check_batches(batch_sizes: Iterable[int]) -> list[int]:
    """Batch sizes as ints >= 1, de-duplicated in order; none at all is a UserError."""
    out = []
    for b in batch_sizes:
        if int(b) < 1:
            raise UserError(f"batch sizes must be >= 1, got {b}")
        if int(b) not in out:
            out.append(int(b))
    if not out:
        raise UserError("no batch size given")
    return out


def plan_bench(student: Artifact, *, teacher: str | Path | None = None,
               options: BenchOptions = BenchOptions()) -> BenchPlan:
    """The plan of a bench of `student` (`export.artifact.describe`) beside its teacher.

    Args:
        student: the described student artifact.
        teacher: the teacher to compare with (default: `teacher_file` of the student's run, exported like
            the student).
        options: everything else (`BenchOptions`).

    Raises:
        UserError: a bad option, a backend that cannot run a file, a precision the export does not have,
            a batch size an artifact does not accept.
    """
    opts = options.checked()
    device = bench_device(opts.device)
    notes: list[str] = []
    others = describe_others(student, opts.others, trust=opts.trust_engine)
    accuracy = opts.accuracy
    for s in (student, *others):
        if s.trusted and accuracy:
            notes.append(f"{s.path.name} has no sidecar (--trust): no preprocessing metadata, accuracy not measured")
            accuracy = False
    step = plan_teacher(student, teacher, like_student=opts.teacher_backend is None)
    notes += step.notes
    arts = [a for a in (student, *others, step.artifact) if a is not None]
    notes += _checked_against(arts, opts.batch_sizes)
    spec = (opts.data or student.meta.get("data")) if accuracy else None
    if accuracy and not spec:
        notes.append("no data spec in the metadata and no --data: accuracy not measured")
    reference, note = fp32_reference([student, *others]) if others and spec else (None, None)
    candidates = _candidates([student, *others], step.artifact, reference, opts, device)
    notes += [c.note for c in candidates if c.note] + ([note] if note else [])
    batches, note = (list(opts.batch_sizes), None) if opts.batch_sizes else default_batches(candidates, arts)
    notes += [note] if note else []
    return BenchPlan(student, step, candidates, batches, ValSets(spec, opts.max_val, split_seed(student.meta)) if spec else None, device, opts,
                     notes, others=others, reference=reference)


def _candidates(students: list[Artifact], tart: Artifact | None, reference: Artifact | None, opts: BenchOptions,
                device: str) -> list[Candidate]:
    """The variants of every student file, each beside its teacher variant, and the fp32 reference's weights
    where they are not among the files."""
    cands = plan_candidates(students[0], tart, backends=opts.backends, precisions=_precisions(opts),
                            device_opt=opts.device, device=device, teacher_backend=opts.teacher_backend,
                            options=opts.run_options(), others=students[1:])
    return with_reference(cands, reference, device=device, options=opts.run_options())


def _precisions(opts: BenchOptions) -> list[str | None]:
    return [p.strip().lower() for p in opts.precisions] if opts.precisions else [None]


def _checked_against(arts: list[Artifact], batch_sizes: Sequence[int] | None) -> list[str]:
    """Notes on the artifacts (compile time, input sizes); a batch size one of them does not accept is refused
    here, before any runtime loads."""
    notes = [n for a in arts for n in _compiled(a)]
    for a in arts:
        if a.batch_range and batch_sizes:
            bad = [b for b in batch_sizes if not a.batch_range[0] <= b <= a.batch_range[1]]
            if bad:
                what = "fixed batch" if a.format == "onnx" else "engine profile"
                raise UserError(f"{a.path.name} accepts batch {a.batch_range[0]}..{a.batch_range[1]} ({what}); "
                                f"--batch asked for {', '.join(map(str, bad))}")
    if len(arts) >= 2 and arts[-1].img_size != arts[0].img_size:
        notes.append(f"teacher input {arts[-1].img_size}px, student {arts[0].img_size}px: each timed at its own size")
    return notes


def _compiled(art: Artifact | None) -> list[str]:
    """The note of a `.pt2` compiled at export (its compile time is not in the latency)."""
    if art is None or art.format != "pt2" or art.meta.get("compile_seconds") is None:
        return []
    return [f"{art.path.name}: compiled once, at export, in {art.meta['compile_seconds']:.0f} s (not in the latency)"]


def default_batches(cands: list[Candidate], arts: list[Artifact]) -> tuple[list[int], str | None]:
    """Batch 1 and a large batch, inside what every artifact accepts (fixed ONNX batch, engine profile);
    and a note where the large batch had to shrink."""
    on_gpu = any(c.result.device == "cuda" for c in cands if c.runner is not None)
    large = LARGE_BATCH["cuda" if on_gpu else "cpu"]
    lo, hi = 1, large
    for a in arts:
        if a.batch_range:
            lo, hi = max(lo, a.batch_range[0]), min(hi, a.batch_range[1])
    if lo > hi:
        ranges = ", ".join(f"{a.path.name} {a.batch_range[0]}..{a.batch_range[1]}" for a in arts if a.batch_range)
        raise UserError(f"no batch size suits both models ({ranges}): pass --batch, or re-export one of them")
    note = None
    if hi < large:
        narrow = next(a for a in arts if a.batch_range and a.batch_range[1] == hi)
        note = (f"largest batch {hi}: {narrow.path.name} accepts {narrow.batch_range[0]}..{hi}, so no throughput "
                f"at batch {large} (export with the default dynamic batch, or pass --batch)")
    return sorted({lo, hi}), note
