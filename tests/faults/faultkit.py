"""Shared helpers of the fault suite: run `spofa` as a real subprocess, schedule the runs, check outcomes.

Every case is a real process running `cli.main.main()` with its own argv, environment, working
folder, stdout/stderr and exit status (SIGKILL really kills it), from the repository root, with
`HF_HUB_OFFLINE=1` and one thread per process. By default it is forked from a preloaded
interpreter (`inject.py --serve`: imports cost ~7 s of CPU per process here, more than the
training they precede); the determinism runs, and every case with SPOFA_FAULTS_FRESH=1, are new
`python -m cli.main` processes (`tests/faults/inject.py ARGS` when a fault is injected).

The runs are "jobs": named functions registered with `@job(name)` by the test modules and run by a
`Scheduler` with two worker threads (this box has two cores, shared), so one long training run
proceeds while short bad-input commands run beside it. A test asks `jobs.result(name)`, which
moves that job to the front of the queue and waits for it. Everything lives in one temp folder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("inject.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
ENV.pop("SPOFA_FAULT", None)
TIMEOUT = 300

# The tiny setting every training case shares: 144 digits images at batch 16 = 9 steps per epoch.
STEPS_PER_EPOCH = 9
TRAIN = ["--teacher", "test_vit", "--student", "test_resnet", "--data", "digits", "--batch-size", "16",
         "--train-fraction", "0.1", "--workers", "0", "--device", "cpu", "--seed", "0"]
CHECKPOINT = "checkpoint-last.pt"
DIGITS = [str(i) for i in range(10)]


# ------------------------------------------------------------------------------------ processes

@dataclass(repr=False)
class Result:
    args: list[str]
    rc: int
    out: str
    err: str
    seconds: float
    fault: dict | None = None

    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def error_lines(self) -> list[str]:
        return [line for line in self.err_lines() if re.match(r"(?i)^(internal )?error: ", line)]

    def summary(self) -> str:
        last = (self.error_lines() or self.err_lines() or [""])[-1]
        return f"rc={self.rc:>3} {self.seconds:5.1f}s  {last[:150]}"

    def __repr__(self) -> str:  # what an assertion failure shows
        tail = "\n".join(self.err_lines()[-15:])
        return f"spofa {' '.join(self.args)}\n  fault={self.fault} rc={self.rc} ({self.seconds:.1f}s)\n  stderr tail:\n{tail}"


_procs: set[subprocess.Popen] = set()
_procs_lock = threading.Lock()
FRESH = bool(os.environ.get("SPOFA_FAULTS_FRESH"))


_scratch: list[Path] = []


def scratch_cwd() -> Path:
    """The working folder of runs that name none: a temp folder, so nothing lands in the checkout's runs/."""
    if not _scratch:
        _scratch.append(Path(tempfile.mkdtemp(prefix="spofa-faults-cwd-")))
    return _scratch[0]


def spofa(args: list, *, cwd: Path | None = None, fault: dict | None = None, timeout: float = TIMEOUT,
          fresh: bool = False, kill_after: float | None = None) -> Result:
    """Run `spofa ARGS` as a subprocess (with `fault` injected) and wait for it.

    `cwd`: its working folder (default `scratch_cwd()`, never the checkout: runs/latest and the teacher
    folder are relative to it).

    By default the process is forked from the preloaded fork server (see inject.py); with
    `fresh` (or SPOFA_FAULTS_FRESH=1) it is a new `python -m cli.main` (inject.py with a fault).
    `kill_after`: SIGKILL it from the outside that many seconds after it started (if still running).
    """
    args = [os.fsdecode(a) if isinstance(a, bytes) else os.fspath(a) if not isinstance(a, str) else a for a in args]
    cwd = scratch_cwd() if cwd is None else cwd
    start = time.perf_counter()
    if fresh or FRESH or _server is None:
        rc, out, err = _run_fresh(args, cwd, fault, timeout, kill_after)
    else:
        rc, out, err = _server.run(args, cwd, fault, timeout, kill_after)
    return Result(args, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                  time.perf_counter() - start, fault)


def _run_fresh(args: list[str], cwd: Path, fault: dict | None, timeout: float,
               kill_after: float | None = None) -> tuple[int, bytes, bytes]:
    cmd = [sys.executable, str(INJECT)] if fault else [sys.executable, "-m", "cli.main"]
    env = {**ENV, **({"SPOFA_FAULT": json.dumps(fault)} if fault else {})}
    proc = subprocess.Popen(cmd + [os.fsencode(a) for a in args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with _procs_lock:
        _procs.add(proc)
    timer = threading.Timer(kill_after if kill_after is not None else TIMEOUT, proc.kill)
    if kill_after is not None:
        timer.daemon = True
        timer.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[fault suite: killed after {timeout}s]".encode()
    finally:
        timer.cancel()
        with _procs_lock:
            _procs.discard(proc)
    return proc.returncode, out, err


class ForkServer:
    """Client of `inject.py --serve`: one preloaded interpreter that forks a process per case."""

    def __init__(self, io_dir: Path):
        self.io_dir = io_dir
        io_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(INJECT), "--serve"], cwd=REPO, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(io_dir / "server.err", "wb"))
        self.lock = threading.Lock()
        self.next_id = 0
        self.pending: dict[int, dict] = {}
        self.cv = threading.Condition()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True, name="fork-server-reader").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "ready" in msg:
                self.ready.set()
                continue
            with self.cv:
                self.pending.setdefault(msg["id"], {}).update(msg)
                self.cv.notify_all()
        with self.cv:  # the server died: fail every waiting case
            self.dead = True
            self.ready.set()
            self.cv.notify_all()

    dead = False

    def run(self, args: list[str], cwd: Path, fault: dict | None, timeout: float,
            kill_after: float | None = None) -> tuple[int, bytes, bytes]:
        self.ready.wait()
        if self.dead:
            raise RuntimeError(f"fork server died: {(self.io_dir / 'server.err').read_text()[-2000:]}")
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
            out, err = self.io_dir / f"{rid}.out", self.io_dir / f"{rid}.err"
            env = {**ENV, **({"SPOFA_FAULT": json.dumps(fault)} if fault else {})}
            req = {"id": rid, "args": args, "cwd": os.fsdecode(cwd), "env": env, "fault": fault,
                   "out": str(out), "err": str(err)}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        note = b""
        if kill_after is not None:
            self._kill_later(rid, kill_after)
        with self.cv:
            if not self.cv.wait_for(lambda: "rc" in self.pending.get(rid, {}) or self.dead, timeout):
                pid = self.pending.get(rid, {}).get("pid")
                if pid:
                    os.kill(pid, 9)
                note = f"\n[fault suite: killed after {timeout}s]".encode()
                self.cv.wait_for(lambda: "rc" in self.pending.get(rid, {}) or self.dead, 60)
            msg = self.pending.pop(rid, {})
        if "rc" not in msg:
            raise RuntimeError(f"fork server lost case {rid}: {(self.io_dir / 'server.err').read_text()[-2000:]}")
        return msg["rc"], out.read_bytes(), err.read_bytes() + note

    def _kill_later(self, rid: int, delay: float) -> None:
        """SIGKILL case `rid` `delay` seconds after its fork (unless it has exited by then)."""
        with self.cv:
            self.cv.wait_for(lambda: "pid" in self.pending.get(rid, {}) or self.dead, 60)
            pid = self.pending.get(rid, {}).get("pid")

        def kill() -> None:
            with self.cv:  # only a case that has not reported its exit (its pid is still its own)
                case = self.pending.get(rid)
                if pid and case is not None and "rc" not in case:
                    os.kill(pid, 9)

        timer = threading.Timer(delay, kill)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the server kills its running children and exits
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


_server: ForkServer | None = None


def start_server(io_dir: Path) -> None:
    global _server
    if _server is None and not FRESH:
        _server = ForkServer(io_dir)


def kill_all() -> None:
    global _server
    with _procs_lock:
        for p in list(_procs):
            p.kill()
    if _server is not None:
        _server.close()
        _server = None


# ------------------------------------------------------------------------------------ scheduling

JOBS: dict[str, Callable] = {}
PRIORITY: dict[str, int] = {}  # higher starts first (inputs, then the long training runs)


def job(name: str, priority: int = 0):
    """Register `fn(ctx) -> value` as the job `name` (run once per session)."""
    def deco(fn):
        JOBS[name] = fn
        PRIORITY[name] = priority
        return fn
    return deco


@dataclass
class _State:
    status: str = "new"  # new | queued | running | done
    value: object = None
    error: BaseException | None = None
    seconds: float = 0.0


class Scheduler:
    """Runs registered jobs on `workers` threads; `result(name)` bumps a queued job and waits."""

    def __init__(self, root: Path, workers: int = 2):
        self.root = root
        self.states: dict[str, _State] = {}
        self.queue: list[str] = []
        self.cv = threading.Condition()
        self.closing = False
        self._local = threading.local()
        self.threads = [threading.Thread(target=self._worker, daemon=True, name=f"faults-{i}") for i in range(workers)]
        for t in self.threads:
            t.start()

    def submit(self, names) -> None:
        with self.cv:
            for n in names:
                if self._state(n).status == "new":
                    self.states[n].status = "queued"
                    self.queue.append(n)
            self.cv.notify_all()

    def result(self, name: str):
        """The job's value (running it here if it has not started), re-raising its error."""
        with self.cv:
            st = self._state(name)
            inline = st.status == "new" or (st.status == "queued" and getattr(self._local, "worker", False))
            if inline:
                if name in self.queue:
                    self.queue.remove(name)
                st.status = "running"
            elif st.status == "queued":
                self.queue.remove(name)
                self.queue.insert(0, name)
        if inline:
            self._run(name)
        with self.cv:
            self.cv.wait_for(lambda: st.status == "done")
        if st.error is not None:
            raise RuntimeError(f"fault-suite job '{name}' failed: {st.error!r}") from st.error
        return st.value

    def _state(self, name: str) -> _State:
        if name not in JOBS:
            raise KeyError(f"no fault-suite job named '{name}'")
        return self.states.setdefault(name, _State())

    def _run(self, name: str) -> None:
        st, start = self.states[name], time.perf_counter()
        try:
            value, error = JOBS[name](self), None
        except BaseException as e:  # reported to every test that asks for this job
            value, error = None, e
        with self.cv:
            st.value, st.error, st.seconds, st.status = value, error, time.perf_counter() - start, "done"
            self.cv.notify_all()

    def _worker(self) -> None:
        self._local.worker = True
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.queue or self.closing)
                if self.closing:
                    return
                name = self.queue.pop(0)
                self.states[name].status = "running"
            self._run(name)

    def report(self) -> list[str]:
        """One line per finished process: job, exit code, time, its error line (or last stderr line)."""
        lines = []
        for name, st in self.states.items():
            if st.status != "done":
                continue
            found = []

            def walk(v, label=""):
                if isinstance(v, Result):
                    found.append((label, v))
                elif isinstance(v, dict):
                    for k, x in v.items():
                        walk(x, k)
                elif isinstance(v, (list, tuple)):
                    for x in v:
                        walk(x, label)

            walk(st.value)
            for label, r in found:
                lines.append(f"{name + ('/' + label if label and label != 'result' else ''):40} {r.summary()}")
            if st.error is not None:
                lines.append(f"{name:40} job error: {st.error!r}")
        return lines

    def close(self) -> None:
        with self.cv:
            self.closing = True
            self.queue.clear()
            self.cv.notify_all()
        kill_all()
        for t in self.threads:
            t.join(timeout=30)


# The crash soak's figures (test_soak.py fills it; conftest prints it at the end of the run).
SOAK_SUMMARY: dict = {}


def soak_report(summary: dict) -> list[str]:
    """The soak's figures as lines: per campaign, then the totals."""
    camps = summary.get("campaigns", {})
    if not camps:
        return []
    lines = [f"seed {summary['seed']}, {summary['kills']} kills planned "
             f"(reproduce: SPOFA_SOAK_SEED={summary['seed']} SPOFA_SOAK_KILLS={summary['kills']})"]
    kinds: dict[str, int] = {}
    for i, c in sorted(camps.items()):
        for k in c["kills"]:
            kinds[k.split()[0]] = kinds.get(k.split()[0], 0) + 1
        flags = [f for f in ("orphan_teacher", "orphan_artifact", "known_bug") if c.get(f)]
        lines.append(f"  c{i} {c['family']:8} {'+'.join(c['kinds']):32} landed {c['landed']}/{c['tried']}, "
                     f"resumed {c['resumed']}, corrupt {c['corrupt']}, temp files seen {len(c['temps'])} "
                     f"(left {len(c['temps_left'])}), "
                     f"{c['seconds']:.0f}s{' ' + ' '.join(flags) if flags else ''}"
                     f"{' ERROR: ' + c['error'].splitlines()[0] if c['error'] else ''}")
        lines += [f"      {k}" for k in c["kills"]]

    def total(key: str) -> float:
        return sum(c[key] for c in camps.values())

    lines.append(f"kills tried {total('tried')}, landed {total('landed')} "
                 f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); processes resumed/rerun "
                 f"{total('resumed')}; corrupt files found {total('corrupt')}; campaigns failed "
                 f"{sum(bool(c['error']) for c in camps.values())}; campaign time {total('seconds'):.0f}s")
    return lines


# ------------------------------------------------------------------------------------ fixtures' data

def make_model_file(path: Path, model: str, classes: list[str], data: str, role: str, img_size: int = 32, **extra) -> Path:
    """An (untrained) model artifact as `spofa teacher` / `spofa distill` write it."""
    import torch

    from spofa_deploy.artifacts import save_model
    from spofa_deploy.models import count_params, create_model, data_config

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = create_model(model, len(classes), img_size)
    save_model(path, net, {"role": role, "model": model, "num_classes": len(classes), "classes": list(classes),
                           "img_size": img_size, **data_config(net), "data": data, "top1": 10.0, "top5": 50.0,
                           "saved": "model", "params": count_params(net), **extra})
    return path


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hash(root: Path) -> dict[str, str]:
    """{relative path: sha256 (or '-> target' for links)} of every file under `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            out[rel] = f"-> {os.readlink(p)}" if os.path.islink(p) else sha(Path(p))
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in Path(run).iterdir() if p.name.endswith(".tmp"))


def events(run: Path, kind: str | None = None) -> list[dict]:
    recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if "event" in r and (kind is None or r["event"] == kind)]


def check_run_readable(run: Path, student: bool = True) -> dict:
    """Every file of a run folder reads back: JSON, metrics, trace, the checkpoint (weights_only) and the student.

    Returns the checkpoint.
    """
    import torch

    from spofa_deploy.artifacts import load_student

    run = Path(run)
    for j in run.glob("*.json"):
        json.loads(j.read_text(encoding="utf-8"))
    events(run)  # every metrics line parses
    if (run / "trace.csv").exists():
        rows = list(csv.DictReader(io.StringIO((run / "trace.csv").read_text())))
        assert all(r["step"] for r in rows), "trace.csv has a partial row"
    ckpt = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)
    if student:
        load_student(run / "student.safetensors")
    return ckpt


def state_diff(a: dict, b: dict, path: str = "") -> list[str]:
    """Keys whose tensors (or plain values) differ between two nested checkpoint dicts, bitwise."""
    import torch

    diffs = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() | b.keys():
            if k not in a or k not in b:
                diffs.append(f"{path}{k} (missing on one side)")
            else:
                diffs += state_diff(a[k], b[k], f"{path}{k}.")
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            diffs.append(path.rstrip("."))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diffs += state_diff(x, y, f"{path}{i}.")
    elif a != b:
        diffs.append(path.rstrip("."))
    return diffs


def safetensors_payload(path: Path) -> tuple[dict, bytes]:
    """(header without its key order, tensor bytes) of a safetensors file: equal = same weights, same names.

    The raw file bytes are not compared: safetensors writes the `__metadata__` map in a
    per-process random order (see test_determinism.py).
    """
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def all_finite(state) -> bool:
    import torch

    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return bool(torch.isfinite(state).all())
    return True


# ------------------------------------------------------------------------------------ assertions

def assert_user_error(r: Result, *needles: str, code: int = 2) -> str:
    """Exit `code`, exactly one `error:` line (the last stderr line), naming `needles`, no traceback."""
    assert r.rc == code, f"expected exit {code}\n{r}"
    assert "Traceback" not in r.err, f"traceback without --debug\n{r}"
    errs = r.error_lines()
    assert len(errs) == 1, f"expected one 'error:' line, got {len(errs)}\n{r}"
    assert errs[0] == r.err_lines()[-1], f"the error line is not the last stderr line\n{r}"
    if code == 2:
        assert not errs[0].startswith("internal"), f"a user error reported as internal\n{r}"
    for n in needles:
        assert n.lower() in errs[0].lower(), f"error line lacks {n!r}\n{r}"
    return errs[0]


# ------------------------------------------------------------------------------------ shared jobs

@job("teacher", priority=3)
def _teacher(ctx) -> Path:
    """The digits teacher every training case reuses (`--teacher-ckpt`), as the teacher stage would cache it.

    Untrained on purpose: the faults do not depend on its accuracy, and it costs no training time.
    """
    return make_model_file(ctx.root / "runs" / "teachers" / "test_vit-digits-32px" / "teacher.safetensors",
                           "test_vit", DIGITS, "digits", "teacher")


def distill_args(ctx, out: Path, epochs: int = 2, *extra) -> list:
    return ["distill", *TRAIN, "--teacher-ckpt", ctx.result("teacher"), "--epochs", str(epochs),
            "--out", out, *extra]


@job("base", priority=2)
def _base(ctx):
    """The uninterrupted reference run (2 epochs): resumed runs and the determinism rerun must match it."""
    out = ctx.root / "runs" / "base"
    return spofa(distill_args(ctx, out), fresh=True), out


@job("killed", priority=2)
def _killed(ctx):
    """The same run, SIGKILLed inside step 3 of epoch 2 (after backward, before the update).

    Left pristine: each crash test copies it and goes on from there.
    """
    out = ctx.root / "runs" / "killed"
    return spofa(distill_args(ctx, out), fault={"kill_step": STEPS_PER_EPOCH + 3}), out
