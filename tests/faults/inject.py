"""Run the real `spofa` CLI (`cli.main.main`) with one fault injected; test-only, no production change.

Usage (from the repository root, as the fault tests do):

    SPOFA_FAULT='{"kill_step": 12}' python tests/faults/inject.py distill ...

`SPOFA_FAULT` is a JSON object; every key is optional. Call indices count from 0 within
this process (a resumed run starts counting again at its first step):

    kill_step: N              SIGKILL inside training step N (after backward, before the update)
    kill_eval: N              SIGKILL as the N-th end-of-epoch evaluation begins (the model's and the
                              EMA's evaluation of an epoch are one; the run dies during its evaluation,
                              before that epoch's checkpoint, as it did when this killed two batches in)
    ckpt_fault: "kill"|"enospc"   on `torch.save` call `ckpt_call` (default 0): write half the bytes,
                              then SIGKILL ("kill") or raise OSError(ENOSPC) ("enospc": disk full)
    nan_loss: [N, ...]        multiply the loss of those steps by NaN
    nan_loss_from: N          ... and of every step from N on
    nan_grad: [N, ...]        make the gradients of those steps NaN in backward (the loss stays finite)
    scale_loss: {"N": f}      multiply the loss of step N by f (an exploding loss)
    fake_trt: "10.3.0"        pretend TensorRT <version> and an H100 (sm 9.0) are present
    half_write: {"fn": "torch:save", "n": N, "match": "teachers"}
                              the N-th call of that writer whose target path contains `match`
                              writes half its bytes (fsynced), then SIGKILL
    kill_call: {"fn": "export.exporter:_publish", "n": N, "match": ""}
                              SIGKILL as the N-th call of that function whose arguments contain
                              `match` (in their str) begins

The step and evaluation faults (kill_step, kill_eval, nan_loss, nan_loss_from, nan_grad,
scale_loss) are `Hooks` installed with `spofa_deploy.train.loop.add_hooks`, the loop's documented
seam for code outside a run (docs/CONTRACTS.md): `before_update`, `on_eval` and `on_loss`, each
counting its own calls; nothing of the training loop is replaced. The other faults replace
module attributes that the code looks up at call time (`torch.save`, the `fn` named,
`torch.cuda.*`, `sys.modules["tensorrt"]`): they stand for the disk, the OS or the machine
(a half-written file, a SIGKILL at a given write, a GPU), not for our internals.

`python tests/faults/inject.py --serve` is the fork server the suite uses by default: it imports
torch, timm, scikit-learn, ONNX (Runtime), matplotlib and the CLI once, then for each request
(one JSON line on stdin) forks a child that sets argv, environment, working folder, stdin
(/dev/null) and stdout/stderr (files), installs the request's fault and runs `cli.main.main()`
exactly as `python -m cli.main` would; the child's exit status (negative: killed by a signal)
comes back as a JSON line. On this shared 2-core box that cuts a case from ~9 s of CPU (mostly
imports) to ~2 s. SPOFA_FAULTS_FRESH=1 makes the suite start `python -m cli.main` for every case.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import sys
import types


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _step_hooks(spec: dict):
    """The step and evaluation faults of `spec` as one `Hooks` (each seam counts its calls from 0)."""
    from spofa_deploy.train.hooks import Hooks

    nan_loss = set(spec.get("nan_loss", []))
    nan_from = spec.get("nan_loss_from")
    nan_grad = set(spec.get("nan_grad", []))
    scale = {int(k): float(v) for k, v in spec.get("scale_loss", {}).items()}
    kill_step = spec.get("kill_step")
    kill_eval = int(spec["kill_eval"]) if "kill_eval" in spec else None
    losses, updates, evals = itertools.count(), itertools.count(), itertools.count()

    def on_loss(step: int, loss):
        i = next(losses)
        if i in nan_loss or (nan_from is not None and i >= nan_from):
            loss = loss * float("nan")
        elif i in scale:
            loss = loss * scale[i]
        if i in nan_grad:  # backward starts from a NaN gradient: every gradient is NaN, the loss is not
            loss.register_hook(lambda g: g * float("nan"))
        return loss

    def before_update(step: int) -> None:
        if next(updates) == kill_step:
            _kill()

    def on_eval(step: int) -> None:
        if next(evals) == kill_eval:
            _kill()

    return Hooks(before_update=before_update if kill_step is not None else None,
                 on_eval=on_eval if kill_eval is not None else None,
                 on_loss=on_loss if nan_loss or nan_from is not None or nan_grad or scale else None)


def _resolve(fn: str):
    """`"module.path:attr"` -> (module, attr name)."""
    import importlib

    module, attr = fn.split(":")
    return importlib.import_module(module), attr


def _on_match(fn: str, n: int, match: str, fault) -> None:
    """Replace `fn`: its n-th call (from 0) with a path argument containing `match` runs `fault(real, *args)`."""
    module, attr = _resolve(fn)
    real = getattr(module, attr)
    calls = itertools.count()

    def mentions(args) -> bool:
        paths = [os.fspath(a) for a in args if isinstance(a, (str, os.PathLike))]
        paths += [a.name for a in args if hasattr(a, "write") and isinstance(getattr(a, "name", None), str)]
        return not match or any(match in p for p in paths)

    def wrapper(*args, **kwargs):
        if mentions([*args, *kwargs.values()]) and next(calls) == n:
            return fault(real, *args, **kwargs)
        return real(*args, **kwargs)

    setattr(module, attr, wrapper)


def _half_write(mode: str):
    """A writer `real(obj, f, ...)` that writes half the bytes `real` would into `f` (a path or an open file),
    then dies."""
    import tempfile

    def fault(real, obj, f, *args, **kwargs):
        fd, scratch = tempfile.mkstemp(suffix=".half")
        os.close(fd)
        try:
            real(obj, scratch, *args, **kwargs)
            with open(scratch, "rb") as fh:
                data = fh.read()
        finally:
            os.unlink(scratch)
        if hasattr(f, "write"):  # a file object the caller opened (checkpoints are written through one)
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            name = getattr(f, "name", "")
        else:
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            name = str(f)
        if mode == "kill":
            _kill()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    return fault


def _fake_trt(version: str) -> None:
    import torch

    sys.modules["tensorrt"] = types.SimpleNamespace(__version__=version)
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_name = lambda *a, **k: "NVIDIA H100 80GB HBM3"
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)


def install(spec: dict) -> None:
    if any(k in spec for k in ("kill_step", "kill_eval", "nan_loss", "nan_loss_from", "nan_grad", "scale_loss")):
        from spofa_deploy.train.hooks import add_hooks

        add_hooks(_step_hooks(spec))
    if "ckpt_fault" in spec:
        _on_match("torch:save", int(spec.get("ckpt_call", 0)), "", _half_write(spec["ckpt_fault"]))
    if "half_write" in spec:
        h = spec["half_write"]
        _on_match(h["fn"], int(h.get("n", 0)), h.get("match", ""), _half_write("kill"))
    if "kill_call" in spec:
        k = spec["kill_call"]
        _on_match(k["fn"], int(k.get("n", 0)), k.get("match", ""), lambda real, *a, **kw: _kill())
    if "fake_trt" in spec:
        _fake_trt(str(spec["fake_trt"]))


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_cli(args: list[str]) -> int:
    """`cli.main.main()` with `args`, returning the exit code a `python -m cli.main` process would have."""
    import traceback

    from cli.main import main

    sys.argv = ["spofa", *args]
    try:
        main()
        return 0
    except SystemExit as e:
        return _exit_code(e)
    except BaseException:  # what the interpreter does with an uncaught exception (e.g. with --debug)
        traceback.print_exc()
        return 1


def _child(req: dict, resp_fd: int) -> None:
    """In the forked child: become `spofa ARGS` in req's folder and environment, then exit."""
    code = 1
    try:
        os.close(resp_fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["out"]), (2, req["err"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        install(req.get("fault") or {})
        code = run_cli(req["args"])
    except BaseException:  # noqa: BLE001 - the parent must always get a status back
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve() -> None:
    """Fork server: preload, then one forked `spofa` per request line; reply with pid and exit status."""
    import select

    os.environ.pop("SPOFA_FAULT", None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    import cli.main  # noqa: F401
    import export.bench.run  # noqa: F401
    import export.exporter  # noqa: F401
    import spofa_deploy.pipeline  # noqa: F401
    import spofa_deploy.train.plots  # noqa: F401

    resp = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write into the reply pipe

    def send(msg: dict) -> None:
        os.write(resp, (json.dumps(msg) + "\n").encode())

    send({"ready": os.getpid()})
    buf, eof, running = b"", False, {}
    while not eof or running:
        ready, _, _ = select.select([] if eof else [0], [], [], 0.05)
        if ready:
            chunk = os.read(0, 1 << 16)
            eof = not chunk
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(req, resp)
                running[pid] = req["id"]
                send({"id": req["id"], "pid": pid})
        if eof:
            for pid in running:  # the suite went away: take the children with it
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            send({"id": running.pop(pid), "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
    if sys.argv[1:] == ["--serve"]:
        serve()
        sys.exit(0)
    install(json.loads(os.environ.get("SPOFA_FAULT", "{}")))
    sys.exit(run_cli(sys.argv[1:]))
