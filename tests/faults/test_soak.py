"""Randomized crash soak: SIGKILLs at random moments of a tiny distillation, its teacher stage and its export.

Kinds of kill (the first six each appear once in the default run, in a seeded order):

    step        inside a random training step (after backward, before the update)
    eval        as a random end-of-epoch evaluation begins (before that epoch's checkpoint)
    checkpoint  half of a random checkpoint written, then SIGKILL
    student     half of student.safetensors written, or between it and its student.json
    teacher     the teacher stage of a distill: a random step, a half-written teacher checkpoint
                or teacher.safetensors, between teacher.safetensors and teacher.json, or the clock
    export      `spofa export --format onnx`: writing the ONNX, the parity check, the publish,
                between the artifact and its sidecar, or the clock
    clock       a SIGKILL from outside after a seeded random delay (anywhere in a distill)

Kills of one kind family are chained on one run (kill, resume and kill again, ...); after the
last, the command is resumed (`--resume` when the run has a checkpoint, else a plain rerun; the
export reruns with `--force`) until it finishes. After every process: it ended by our SIGKILL
or exited 0 (a crash on a partial file would exit 1 or 2); every file that is not a temp file
reads back (JSON, metrics, trace, checkpoints with weights_only, safetensors, ONNX checked); temp
files are hidden `.<name>.*.tmp` / `.spofa-export-*` only. At the end the student (and the
teacher, the ONNX) is bitwise equal to an uninterrupted run's (CPU, same seed).

    SPOFA_SOAK_SEED=N       the plan's seed (default 0; "random" draws one); every failure names it
    SPOFA_SOAK_KILLS=N      kills in all (default 6; SPOFA_SOAK_KILLS=20 is the full soak)

A clock kill's delay is seeded, but where it lands depends on the machine's speed: a failure
after one is reproduced by the seed only approximately (the message names the delay and what
was on disk). The soak's figures are printed at the end of the pytest run.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import faultkit as fk
from faultkit import CHECKPOINT, TRAIN, job, spofa
from spofa_deploy.artifacts import sidecar_path

KILLED = -signal.SIGKILL
# The fault suite's tiny run on half its images (72: 5 steps per epoch): the soak runs it a dozen times or more.
SOAK_TRAIN = [*TRAIN, "--train-fraction", "0.05"]  # (a repeated option: the last value wins)
EPOCHS = 2
TEACHER_EPOCHS = 2  # two, so a stage killed in its first epoch is seen not to be the finished one
TEACHER_ARGS = ["--teacher-epochs", str(TEACHER_EPOCHS), "--teacher-batch-size", "64", "--no-pretrained"]
TEACHERS = Path("runs") / "teachers" / "test_vit-digits-32px"  # under the campaign's working folder

# teacher.stage.find_teacher takes a teacher.safetensors whose stage never wrote a checkpoint (killed
# in its first epoch, between the teacher file and the checkpoint) for a finished teacher: the rerun
# distils from a one-epoch teacher (or exits 2 when teacher.json was not written yet). Reported to
# the lead with the fix (teacher/stage.py is not this suite's); set to False once it is fixed.
KNOWN_FIND_TEACHER_BUG = False


def _seed() -> int:
    raw = os.environ.get("SPOFA_SOAK_SEED", "0")
    return random.SystemRandom().randrange(10**6) if raw == "random" else int(raw)


SEED = _seed()
KILLS = int(os.environ.get("SPOFA_SOAK_KILLS", "6"))
BRIEF_KINDS = ["step", "eval", "checkpoint", "student", "teacher", "export"]
FAMILY = {"teacher": "teacher", "export": "export"}  # every other kind: "distill"
CHAIN = {"distill": 3, "teacher": 2, "export": 3}  # kills chained on one run at most
FIRST = ["student", "step", "eval", "checkpoint", "teacher", "export", "clock"]  # order within a chain


def plan(seed: int, kills: int) -> list[list[tuple[str, int]]]:
    """`kills` kills as (kind, how many of that kind came before) grouped into chains (one run each).

    The six named kinds come first, in a seeded order, then seeded rounds of all seven.
    """
    rng = random.Random(seed)
    kinds = rng.sample(BRIEF_KINDS, len(BRIEF_KINDS))
    while len(kinds) < kills:
        kinds += rng.sample(BRIEF_KINDS + ["clock"], len(BRIEF_KINDS) + 1)
    numbered = [(k, kinds[:i].count(k)) for i, k in enumerate(kinds[:kills])]
    chains = []
    for fam in ("distill", "teacher", "export"):
        mine = [k for k in numbered if FAMILY.get(k[0], "distill") == fam]
        for i in range(0, len(mine), CHAIN[fam]):
            chains.append(sorted(mine[i:i + CHAIN[fam]], key=lambda k: FIRST.index(k[0])))
    return chains


PLAN = plan(SEED, KILLS)
# Where in a kind a kill lands cycles through these (from a seeded start), so repeated kills of a
# kind hit different moments; a student kill half-writes the file first.
STUDENT_MOMENTS = ["file", "sidecar"]
TEACHER_MOMENTS = ["step", "checkpoint", "file", "sidecar", "clock"]
EXPORT_POINTS = [  # (function, path fragment its call names): kill as it begins; None: the clock
    ("export.onnx.graph:check_onnx", ""),  # the fp32 ONNX is written (in the hidden work folder)
    ("export.onnx.graph:ort_session", ""),  # parity check
    ("export.exporter:_publish", ""),  # before the artifact is moved into place
    ("export.exporter:write_json", ".onnx.json"),  # the artifact is in place, its sidecar not yet
    None,
]
_START = random.Random(f"{SEED}:moments")
TEACHER_START, EXPORT_START = _START.randrange(len(TEACHER_MOMENTS)), _START.randrange(len(EXPORT_POINTS))
SUMMARY = fk.SOAK_SUMMARY  # campaign -> figures, printed at the end of the run (conftest)
SUMMARY.update(seed=SEED, kills=KILLS, campaigns={})


def _repro() -> str:
    return f"SPOFA_SOAK_SEED={SEED} SPOFA_SOAK_KILLS={KILLS}"


# ------------------------------------------------------------------------------------ checks


def _is_temp(rel: Path) -> bool:
    return any(p.startswith(".spofa-export-") or (p.startswith(".") and p.endswith(".tmp")) for p in rel.parts)


def check_files(root: Path) -> tuple[list[str], list[str]]:
    """(corrupt files as 'path: why', temp files) under `root`: every real file must read back in full."""
    import onnx
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    corrupt, temps = [], []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if _is_temp(rel):
                temps.append(str(rel))
                continue
            try:
                if name.endswith(".jsonl"):
                    [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                elif name.endswith(".json"):
                    json.loads(path.read_text(encoding="utf-8"))
                elif name.endswith(".pt"):
                    torch.load(path, map_location="cpu", weights_only=True)
                elif name.endswith(".safetensors"):
                    load_file(str(path))
                elif name.endswith(".onnx"):
                    onnx.checker.check_model(onnx.load(str(path)))
                elif name.endswith(".csv"):
                    rows = list(csv.DictReader(io.StringIO(path.read_text())))
                    assert all(r.get("step") and None not in r.values() for r in rows), "a partial row"
                elif name.endswith(".png"):
                    with Image.open(path) as im:
                        im.verify()
            except Exception as e:  # noqa: BLE001 - every unreadable file is reported
                corrupt.append(f"{rel}: {type(e).__name__}: {str(e)[:200]}")
    return corrupt, temps


def _epoch(ckpt: Path) -> int:
    """Epochs a checkpoint holds (0: none)."""
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] if ckpt.is_file() else 0


def _improved_epochs(ckpt: Path) -> list[int]:
    """Epochs (1-based) at which a run's best val top-1 improved, i.e. its model file was written."""
    import torch

    best, out = -1.0, []
    for h in torch.load(ckpt, map_location="cpu", weights_only=True)["history"]:
        if "val_top1" in h and max(h["val_top1"], h["ema_top1"]) > best:
            best = max(h["val_top1"], h["ema_top1"])
            out.append(h["epoch"])
    return out


# ------------------------------------------------------------------------------------ references


def distill_cmd(ctx, out: Path, teacher_stage: bool) -> list:
    teacher = TEACHER_ARGS if teacher_stage else ["--teacher-ckpt", ctx.result("teacher")]
    return ["distill", *SOAK_TRAIN, *teacher, "--epochs", str(EPOCHS), "--out", out]


def export_cmd(source: Path, out: Path) -> list:
    return ["export", source, "--format", "onnx", "--out", out, "--force"]


@job("soak:ref:distill", priority=2)
def _ref_distill(ctx):
    cwd = ctx.root / "soak" / "ref-distill"
    cwd.mkdir(parents=True)
    r = spofa(distill_cmd(ctx, cwd / "run", False), cwd=cwd)
    assert r.rc == 0, f"uninterrupted reference failed\n{r}"
    state = fk.check_run_readable(cwd / "run")
    return {"result": r, "run": cwd / "run", "seconds": r.seconds, "steps_per_epoch": state["step"] // state["epoch"],
            "improved": _improved_epochs(cwd / "run" / CHECKPOINT)}


@job("soak:ref:teacher", priority=2)
def _ref_teacher(ctx):
    cwd = ctx.root / "soak" / "ref-teacher"
    cwd.mkdir(parents=True)
    r = spofa(distill_cmd(ctx, cwd / "run", True), cwd=cwd)
    assert r.rc == 0, f"uninterrupted reference failed\n{r}"
    tdir = cwd / TEACHERS
    state = fk.check_run_readable(tdir, student=False)
    stage_s = sum(h.get("seconds", 0.0) for h in state["history"] if "val_top1" in h)
    return {"result": r, "run": cwd / "run", "teacher": tdir / "teacher.safetensors", "stage_seconds": stage_s,
            "steps_per_epoch": state["step"] // state["epoch"], "improved": _improved_epochs(tdir / CHECKPOINT)}


@job("soak:ref:export", priority=2)
def _ref_export(ctx):
    ref = ctx.result("soak:ref:distill")
    out = ctx.root / "soak" / "ref-export" / "student.onnx"
    out.parent.mkdir(parents=True)
    r = spofa(export_cmd(ref["run"] / "student.safetensors", out))
    assert r.rc == 0, f"uninterrupted reference export failed\n{r}"
    return {"result": r, "onnx": out, "seconds": r.seconds}


# ------------------------------------------------------------------------------------ one campaign


@dataclass
class Kill:
    kind: str
    how: str  # the injected fault (JSON) or "clock +Xs"
    rc: int
    landed: bool
    state: str  # what was on disk after it (checkpoint epochs, files)
    seconds: float


@dataclass
class Campaign:
    index: int
    family: str
    kinds: list[str]  # its kills' kinds, in order
    cwd: Path
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    processes: list[fk.Result] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    temps: set[str] = field(default_factory=set)
    orphan_teacher: bool = False  # a teacher.safetensors without its stage's checkpoint was left (known bug)
    orphan_artifact: bool = False  # an exported file without its sidecar was left
    error: str | None = None  # the first failed check (a crash, an unreadable file, a kill not reached)

    def where(self) -> str:
        lines = [f"soak campaign {self.index} ({self.family}: {', '.join(self.kinds)}); reproduce with {_repro()} "
                 f"and -k 'soak and c{self.index}-'"]
        lines += [f"  kill {i + 1}: {k.kind} {k.how} -> rc {k.rc}{'' if k.landed else ' (did not land)'}; {k.state}"
                  for i, k in enumerate(self.kills)]
        return "\n".join(lines)

    def run(self, args: list, fault: dict | None = None, kill_after: float | None = None) -> fk.Result:
        """One process; then every file under the campaign folder must read back, and it must have
        ended by our SIGKILL or with exit 0 (a crash on a partial file exits 1 or 2)."""
        r = spofa(args, cwd=self.cwd, fault=fault, kill_after=kill_after)
        self.processes.append(r)
        corrupt, temps = check_files(self.cwd)
        self.corrupt += [f"after process {len(self.processes)} (rc {r.rc}): {c}" for c in corrupt]
        self.temps.update(temps)
        return r

    def check(self, r: fk.Result) -> None:
        assert r.rc in (0, KILLED), f"a process crashed instead of finishing or being killed\n{self.where()}\n{r}"
        assert not self.corrupt, "unreadable files after a kill:\n" + "\n".join(self.corrupt) + f"\n{self.where()}"

    def kill(self, kind: str, args: list, fault: dict | None = None, kill_after: float | None = None) -> fk.Result:
        start = time.perf_counter()
        r = self.run(args, fault=fault, kill_after=kill_after)
        how = f"clock +{kill_after:.2f}s" if kill_after is not None else json.dumps(fault)
        self.kills.append(Kill(kind, how, r.rc, r.rc == KILLED, self.snapshot(), time.perf_counter() - start))
        self.check(r)
        if kill_after is None:  # an injected kill always lands: its moment was chosen within the work left
            assert r.rc == KILLED, f"the injected kill was not reached\n{self.where()}\n{r}"
        return r

    def figures(self, seconds: float) -> dict:
        """What the soak report prints for this campaign."""
        return {"family": self.family, "kinds": self.kinds, "tried": len(self.kills),
                "landed": sum(k.landed for k in self.kills), "missed": [k.kind for k in self.kills if not k.landed],
                "resumed": len(self.processes) - 1, "corrupt": len(self.corrupt), "temps": sorted(self.temps),
                "temps_left": check_files(self.cwd)[1], "orphan_teacher": self.orphan_teacher,
                "orphan_artifact": self.orphan_artifact, "seconds": round(seconds, 1), "error": self.error,
                "kills": [f"{k.kind} {k.how} -> rc {k.rc}" for k in self.kills]}

    def snapshot(self) -> str:
        """The run's and the teacher stage's files (and note a teacher file left without its stage's checkpoint)."""
        run = self.cwd / "run"
        files = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
        t = self.cwd / TEACHERS
        tfiles = sorted(p.name for p in t.iterdir()) if t.is_dir() else []
        if "teacher.safetensors" in tfiles and CHECKPOINT not in tfiles:
            self.orphan_teacher = True
        return f"run: {files}; teacher stage: {tfiles}" if t.is_dir() else f"run: {files}"


def _distill_kill(ctx, c: Campaign, kind: str, nth: int) -> None:
    """One kill of kind step/eval/checkpoint/student/clock (the `nth` of its kind) on the campaign's distill run."""
    ref = ctx.result("soak:ref:distill")
    run = c.cwd / "run"
    done = _epoch(run / CHECKPOINT)
    left = EPOCHS - done
    cmd = distill_cmd(ctx, run, False) + (["--resume"] if done else [])
    writes = [e for e in ref["improved"] if e > done]
    if kind == "student" and not writes:  # no better epoch is left to write a student: the checkpoint instead
        kind = "checkpoint"
    if kind == "student":
        n = c.rng.randrange(len(writes))
        fault = {"file": {"half_write": {"fn": "spofa_deploy.artifacts:write_bytes", "n": n, "match": "student.safetensors"}},
                 "sidecar": {"kill_call": {"fn": "spofa_deploy.artifacts:write_json", "n": n, "match": "student.json"}},
                 }[STUDENT_MOMENTS[nth % len(STUDENT_MOMENTS)]]
    elif kind == "step":
        fault = {"kill_step": c.rng.randrange(left * ref["steps_per_epoch"])}
    elif kind == "eval":
        fault = {"kill_eval": c.rng.randrange(left)}  # one end-of-epoch evaluation (model and EMA) per epoch left
    elif kind == "checkpoint":
        fault = {"half_write": {"fn": "torch:save", "n": c.rng.randrange(left), "match": CHECKPOINT}}
    else:  # clock: anywhere in the process, from start-up to the end
        expected = ref["seconds"] * max(0.4, left / EPOCHS)
        c.kill(kind, cmd, kill_after=c.rng.uniform(0.05, 0.75) * expected)
        return
    c.kill(kind, cmd, fault=fault)


def _teacher_kill(ctx, c: Campaign, nth: int) -> None:
    """One kill inside the teacher stage of a distill that needs one (a rerun resumes the stage)."""
    ref = ctx.result("soak:ref:teacher")
    tdone = _epoch(c.cwd / TEACHERS / CHECKPOINT)
    left = TEACHER_EPOCHS - tdone
    run = c.cwd / "run"
    cmd = distill_cmd(ctx, run, True) + (["--resume"] if (run / CHECKPOINT).is_file() else [])
    if left == 0:  # an earlier clock kill landed after the stage: kill the distillation instead
        c.kill("clock", cmd, kill_after=c.rng.uniform(0.05, 0.75) * ref["result"].seconds)
        return
    writes = [e for e in ref["improved"] if e > tdone]
    moment = TEACHER_MOMENTS[(TEACHER_START + nth) % len(TEACHER_MOMENTS)]
    if moment in ("file", "sidecar") and not writes:  # no better teacher epoch is left to write
        moment = "step"
    if moment == "clock":
        expected = 1.0 + ref["stage_seconds"] * left / TEACHER_EPOCHS
        c.kill("teacher", cmd, kill_after=c.rng.uniform(0.05, 0.75) * expected)
        return
    n_write = c.rng.randrange(len(writes)) if writes else 0
    fault = {
        "step": {"kill_step": c.rng.randrange(left * ref["steps_per_epoch"])},
        "checkpoint": {"half_write": {"fn": "torch:save", "n": c.rng.randrange(left), "match": "teachers"}},
        "file": {"half_write": {"fn": "spofa_deploy.artifacts:write_bytes", "n": n_write, "match": "teacher.safetensors"}},
        "sidecar": {"kill_call": {"fn": "spofa_deploy.artifacts:write_json", "n": n_write, "match": "teacher.json"}},
    }[moment]
    c.kill("teacher", cmd, fault=fault)


def _export_kill(ctx, c: Campaign, nth: int) -> None:
    ref = ctx.result("soak:ref:export")
    cmd = export_cmd(ctx.result("soak:ref:distill")["run"] / "student.safetensors", c.cwd / "student.onnx")
    point = EXPORT_POINTS[(EXPORT_START + nth) % len(EXPORT_POINTS)]
    if point is None:
        c.kill("export", cmd, kill_after=c.rng.uniform(0.05, 0.75) * ref["seconds"])
    else:
        fn, match = point
        c.kill("export", cmd, fault={"kill_call": {"fn": fn, "n": 0, "match": match}})
    onnx_file = c.cwd / "student.onnx"
    if onnx_file.exists() and not sidecar_path(onnx_file).exists():
        c.orphan_artifact = True


def _finish(ctx, c: Campaign) -> fk.Result:
    """Resume (or rerun) the command without a fault: it must finish (exit 0)."""
    if c.family == "export":
        cmd = export_cmd(ctx.result("soak:ref:distill")["run"] / "student.safetensors", c.cwd / "student.onnx")
    else:
        run = c.cwd / "run"
        cmd = distill_cmd(ctx, run, c.family == "teacher") + (["--resume"] if (run / CHECKPOINT).is_file() else [])
    r = c.run(cmd)
    c.check(r)
    assert r.rc == 0, f"the resumed command did not finish\n{c.where()}\n{r}"
    return r


def run_campaign(ctx, index: int, chain: list[tuple[str, int]]) -> Campaign:
    """The kills of `chain` on one fresh run, one after the other, then the run resumed to its end.

    A failed check is kept in `error` (with what was on disk) for the test to judge.
    """
    family = FAMILY.get(chain[0][0], "distill")
    cwd = ctx.root / "soak" / f"c{index}"
    cwd.mkdir(parents=True)
    c = Campaign(index, family, [k for k, _ in chain], cwd, random.Random(f"{SEED}:{index}"))
    start = time.perf_counter()
    try:
        for kind, nth in chain:
            if family == "export":
                _export_kill(ctx, c, nth)
            elif family == "teacher":
                _teacher_kill(ctx, c, nth)
            else:
                _distill_kill(ctx, c, kind, nth)
            if not c.kills[-1].landed:
                break  # a clock kill that came too late: the command finished
        if c.processes[-1].rc != 0:
            _finish(ctx, c)
    except AssertionError as e:
        c.error = str(e)
    SUMMARY["campaigns"][index] = c.figures(time.perf_counter() - start)
    return c


for _i, _chain in enumerate(PLAN):
    job(f"soak:{_i}", priority=1)(lambda ctx, i=_i, chain=_chain: run_campaign(ctx, i, chain))


# ------------------------------------------------------------------------------------ tests


def _assert_same_model(a: Path, b: Path, what: str, c: Campaign) -> None:
    assert fk.safetensors_payload(a) == fk.safetensors_payload(b), \
        f"{what} differs from the uninterrupted run's (bitwise)\n{c.where()}"


def _check_result(jobs, c: Campaign) -> None:
    if c.family == "export":
        ref = jobs.result("soak:ref:export")
        got = c.cwd / "student.onnx"
        assert got.read_bytes() == ref["onnx"].read_bytes(), f"the ONNX differs from an uninterrupted export\n{c.where()}"
        side = json.loads(sidecar_path(got).read_text())
        assert side["format"] == "onnx" and Path(side["source"]).name == "student.safetensors", side
        return
    ref = jobs.result("soak:ref:teacher" if c.family == "teacher" else "soak:ref:distill")
    run = c.cwd / "run"
    got, want = fk.check_run_readable(run), fk.check_run_readable(ref["run"])
    assert got["epoch"] == want["epoch"] == EPOCHS, c.where()
    if c.family == "teacher":
        _assert_same_model(c.cwd / TEACHERS / "teacher.safetensors", ref["teacher"], "the teacher", c)
    keys = ("net", "ema", "extra", "optimizer")
    diff = fk.state_diff({k: got[k] for k in keys}, {k: want[k] for k in keys})
    assert not diff, f"the resumed run's checkpoint differs in {diff[:5]}\n{c.where()}"
    _assert_same_model(run / "student.safetensors", ref["run"] / "student.safetensors", "student.safetensors", c)
    meta = {k: v for k, v in json.loads((run / "student.json").read_text()).items() if k not in ("saved_at",)}
    want_meta = {k: v for k, v in json.loads((ref["run"] / "student.json").read_text()).items() if k not in ("saved_at",)}
    assert meta == want_meta, f"student.json differs\n{c.where()}"
    assert not [f for f in os.listdir(run) if f.endswith(".tmp") and not f.startswith(".")], c.where()


def _campaign_id(i: int) -> str:
    return f"c{i}-{'+'.join(k for k, _ in PLAN[i])}"


def _judge(jobs, c: Campaign) -> None:
    """Fail on any error or difference, except the known find_teacher bug, which is an xfail while it stands."""
    try:
        assert c.error is None, c.error
        _check_result(jobs, c)
    except AssertionError:
        if c.orphan_teacher and KNOWN_FIND_TEACHER_BUG:
            if c.index in SUMMARY["campaigns"]:
                SUMMARY["campaigns"][c.index]["known_bug"] = True
            pytest.xfail("known bug: a teacher stage killed before its first checkpoint is taken for a finished "
                         f"teacher (teacher.stage.find_teacher)\n{c.where()}")
        raise


def _uses(i: int) -> list[str]:
    family = FAMILY.get(PLAN[i][0][0], "distill")
    return ["teacher", "soak:ref:distill", *([f"soak:ref:{family}"] if family != "distill" else []), f"soak:{i}"]


@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.uses(*_uses(i)), id=_campaign_id(i))
                                   for i in range(len(PLAN))])
def test_soak(jobs, index) -> None:
    """Kill, resume until done: no crash, no unreadable file ever, and bitwise the uninterrupted result."""
    _judge(jobs, jobs.result(f"soak:{index}"))


@job("soak:teacher-first-checkpoint")
def _teacher_first_checkpoint(ctx) -> Campaign:
    cwd = ctx.root / "soak" / "teacher-first-checkpoint"
    cwd.mkdir(parents=True)
    c = Campaign(-1, "teacher", ["teacher"], cwd, random.Random(0))
    try:
        c.kill("teacher", distill_cmd(ctx, cwd / "run", True),
               fault={"half_write": {"fn": "torch:save", "n": 0, "match": "teachers"}})
        _finish(ctx, c)
    except AssertionError as e:
        c.error = str(e)
    return c


@pytest.mark.xfail(KNOWN_FIND_TEACHER_BUG, strict=True, reason="teacher.stage.find_teacher takes a teacher.safetensors "
                   "without its stage's checkpoint for a finished teacher (reported; fix in teacher/stage.py)")
@pytest.mark.uses("teacher", "soak:ref:teacher", "soak:teacher-first-checkpoint")
def test_teacher_stage_killed_at_its_first_checkpoint(jobs) -> None:
    """Deterministic: SIGKILL while the teacher stage writes its first checkpoint; the rerun must redo the stage."""
    c = jobs.result("soak:teacher-first-checkpoint")
    assert c.orphan_teacher, c.where()  # teacher.safetensors was on disk, its checkpoint not
    assert c.error is None, c.error
    _check_result(jobs, c)
