"""The training loop: frozen teacher, the student artifact, exact resume, NaN handling, metrics and trace,
and a SPOFA step free of host synchronisation."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import spofa_deploy
from spofa_deploy import pipeline
from spofa_deploy.artifacts import load_model, read_model_meta, save_model
from spofa_deploy.data.splits import load_splits
from spofa_deploy.data.datasets import Splits, stratified_subset
from spofa_deploy.data.loaders import make_loader
from spofa_deploy.method.distillers import OFA, DistillConfig, create_task
from spofa_deploy.errors import TrainingDiverged, UserError
from spofa_deploy.models import count_params, create_model, data_config
from spofa_deploy.pipeline import DataOptions, TeacherCacheOptions, TeacherOptions, distill
from spofa_deploy.teacher import stage
from spofa_deploy.train.hooks import Hooks
from spofa_deploy.run_files import CHECKPOINT
from spofa_deploy.train.loop import TrainConfig, evaluate, fit
from spofa_deploy.machine import resolve_device
from spofa_deploy.models import Preprocessing

CLASSES = [str(i) for i in range(10)]


EPOCH_KEYS = {"epoch", "lr", "train_loss", "val_top1", "val_top5", "ema_top1", "img_per_s", "seconds"}


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=1e-2, workers=0, device="cpu", log_every=1, warmup_epochs=0.5)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path: Path, monkeypatch) -> None:
    """`distill` points ./runs/latest at its run: keep that out of the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_splits("digits", Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.95))


def _small(s: Splits, n_train: int, n_val: int) -> Splits:
    return Splits(s.train.subset(stratified_subset(s.train.labels, n_train, 0)),
                  s.val.subset(stratified_subset(s.val.labels, n_val, 0)), s.classes, s.spec)


def _teacher_file(path: Path, classes=CLASSES, img_size: int = 32) -> Path:
    """An (untrained) test_vit teacher artifact, as `spofa teacher` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t = create_model("test_vit", len(classes), img_size)
    save_model(path, t, {"role": "teacher", "model": "test_vit", "num_classes": len(classes), "classes": list(classes),
                         "img_size": img_size, **data_config(t), "data": "digits", "top1": 10.0, "top5": 50.0,
                         "saved": "model", "params": count_params(t)})
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _inject(task, at: set[int], what: str = "loss"):
    """Make training forward number `i in at` (0-based) non-finite: its loss, or its input images."""
    orig, calls = task.forward, {"n": 0}

    def forward(images, labels):
        i = calls["n"]
        calls["n"] += 1
        if i in at and what == "images":
            images = images * float("nan")
        out = orig(images, labels)
        if i in at and what == "loss":
            out.loss = out.loss * float("nan")
        return out

    task.forward = forward
    return calls


# ---------------------------------------------------------------- the teacher stays frozen


@pytest.mark.parametrize("method, teacher_name", [("spofa", "test_vit"), ("kd", "test_vit"), ("ofa", "test_vit"),
                                                  ("kd", "test_efficientnet")])  # a teacher with BatchNorm + dropout
def test_teacher_frozen(method: str, teacher_name: str, digits: Splits, tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = create_model("test_resnet", 10, 32)
    teacher = create_model(teacher_name, 10, 32).train()
    task = create_task(method, student, teacher, DistillConfig(method=method), 10)
    task.train()
    assert student.training and task.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in task.trainable()}.isdisjoint(id(p) for p in teacher.parameters())
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}

    fit(task, _small(digits, 32, 20), _cfg(epochs=1, batch_size=16), tmp_path)

    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    t_after = teacher.state_dict()
    assert all(torch.equal(t_before[k], t_after[k]) for k in t_before), "teacher weights or statistics changed"
    changed = [k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(v, s_before[k])]
    assert "conv1.0.weight" in changed and "fc.weight" in changed  # the student did train


def test_train_config_validation() -> None:
    for kw, words in [({"epochs": 0}, "--epochs"), ({"lr": -1.0}, "--lr"), ({"batch_size": 0}, "--batch-size"),
                      ({"optimizer": "adam"}, "optimizer"), ({"amp": "fp8"}, "--amp"), ({"on_nan": "ignore"}, "--on-nan")]:
        with pytest.raises(UserError, match=words):
            TrainConfig(**kw).validate()


# ---------------------------------------------------------------- the student artifact (tiny_run)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "mps"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
                         + ([f"cuda:{torch.cuda.device_count()}"] if torch.cuda.is_available() else []))
def test_resolve_device_refuses_what_cannot_run(name: str) -> None:
    with pytest.raises(UserError, match="--device"):
        resolve_device(name)


def test_resolve_device_accepts() -> None:
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_student_keys_equal_a_fresh_timm_model(tiny_run: Path) -> None:
    with safe_open(str(tiny_run / "student.safetensors"), "pt") as f:
        keys = list(f.keys())
    fresh = timm.create_model("test_resnet", num_classes=10).state_dict()
    assert sorted(keys) == sorted(fresh) and len(keys) == len(set(keys))
    assert not any(k.startswith(("heads.", "mema.", "teacher.", "net.", "module.")) for k in keys)
    state = load_file(str(tiny_run / "student.safetensors"))
    assert all(state[k].shape == fresh[k].shape and state[k].dtype == fresh[k].dtype for k in fresh)


def test_student_metadata(tiny_run: Path) -> None:
    meta = read_model_meta(tiny_run / "student.safetensors")
    for key in ("model", "num_classes", "classes", "img_size", "mean", "std", "interpolation", "crop_pct", "data",
                "role", "method", "teacher", "teacher_file", "top1", "top5", "ema_top1", "saved", "params", "versions"):
        assert key in meta, key
    assert (meta["model"], meta["num_classes"], meta["img_size"], meta["role"]) == ("test_resnet", 10, 32, "student")
    assert meta["classes"] == CLASSES and meta["data"] == "digits"
    assert (meta["method"], meta["teacher"], meta["teacher_file"]) == ("spofa", "test_vit", "teacher.safetensors")
    assert (tiny_run / meta["teacher_file"]).is_file()
    assert meta["params"] == count_params(timm.create_model("test_resnet", num_classes=10))
    epochs = [r for r in _records(tiny_run) if "event" not in r]
    best = max(max(r["val_top1"], r["ema_top1"]) for r in epochs)
    assert meta["top1"] == best and meta["saved"] in ("model", "ema")
    assert {"torch", "timm", "spofa_deploy"} <= set(meta["versions"])


def test_load_student_outputs(tiny_run: Path, digits: Splits) -> None:
    meta = read_model_meta(tiny_run / "student.safetensors")
    ckpt = torch.load(tiny_run / CHECKPOINT, map_location="cpu", weights_only=True)
    if meta["epoch"] != ckpt["epoch"]:
        pytest.skip(f"best epoch {meta['epoch']} is not the last ({ckpt['epoch']}): no in-memory weights to compare")
    if meta["saved"] == "ema":
        ref_state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}
    else:
        ref_state = ckpt["net"]
    ref = timm.create_model("test_resnet", num_classes=10)
    ref.load_state_dict(ref_state)
    ref.eval()

    student = spofa_deploy.load_student(tiny_run / "student.safetensors")
    assert type(student) is type(ref) and not student.training
    assert all(torch.equal(v, ref_state[k]) for k, v in student.state_dict().items())
    x = torch.stack([digits.val[i][0] for i in range(16)])
    with torch.inference_mode():
        assert torch.equal(student(x), ref(x))
    # The recorded accuracy is what the shipped file scores on the val split.
    top1 = evaluate(student, make_loader(digits.val, 128, train=False, workers=0), torch.device("cpu"))["top1"]
    assert abs(top1 - meta["top1"]) <= 100 / len(digits.val) + 1e-9  # at most one image flips (thread-count rounding)


def test_artifact_files_get_normal_permissions(tiny_run: Path) -> None:
    """Atomic writes must not leave the 0600 mode of their temp files on the artifacts."""
    umask = os.umask(0)
    os.umask(umask)
    for name in ("student.safetensors", "student.json", "teacher.json", "metrics.jsonl", CHECKPOINT):
        mode = stat.S_IMODE((tiny_run / name).stat().st_mode)
        assert mode == 0o666 & ~umask, f"{name}: {oct(mode)}"


def test_save_and_load_student_roundtrip(tmp_path: Path) -> None:
    """save_model keeps only the timm model's keys even when the net trained inside a task with heads."""
    torch.manual_seed(0)
    student = create_model("test_resnet", 10, 32)
    task = create_task("spofa", student, create_model("test_vit", 10, 32), DistillConfig(), 10)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.eval()
    path = tmp_path / "student.safetensors"
    save_model(path, task.net, {"model": "test_resnet", "num_classes": 10, "img_size": 32, "mean": [0.5] * 3,
                                "std": [0.5] * 3, "classes": CLASSES, "role": "student"})
    loaded = spofa_deploy.load_student(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), student(x))
    assert set(load_file(str(path))) == set(timm.create_model("test_resnet", num_classes=10).state_dict())


# ---------------------------------------------------------------- metrics.jsonl and trace.csv (tiny_run)


def test_metrics_jsonl(tiny_run: Path) -> None:
    recs = _records(tiny_run)
    epochs = [r for r in recs if "event" not in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert len(recs) == 3  # one line per epoch, no events in a healthy run
    steps = math.ceil(1438 / 64)
    assert [r["step"] for r in epochs] == [steps, 2 * steps, 3 * steps]
    for r in epochs:
        assert EPOCH_KEYS <= set(r), set(EPOCH_KEYS) - set(r)
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100 and 0 <= r["ema_top1"] <= 100
        assert r["img_per_s"] > 0 and r["seconds"] > 0 and math.isfinite(r["train_loss"])
        assert 0 <= r["lr"] <= 3e-3
    assert epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine decays to zero at the end


def test_trace_csv_of_a_spofa_run(tiny_run: Path) -> None:
    with open(tiny_run / "trace.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = ["step", "epoch", "loss_gt", "loss_kd", "loss_feat", "grad_cos_mean", "grad_cos_baseline", "beta_mean",
            "beta_min"] + [f"align_{k}" for k in range(4)] + [f"alpha_{k}" for k in range(4)]
    assert set(cols) <= set(rows[0]), set(cols) - set(rows[0])
    total = 3 * math.ceil(1438 / 64)
    assert [int(r["step"]) for r in rows] == list(range(5, total + 1, 5)) + ([total] if total % 5 else [])
    assert {int(r["epoch"]) for r in rows} == {1, 2, 3}
    val = {c: np.array([float(r[c]) for r in rows]) for c in cols}
    assert all(np.isfinite(v).all() for v in val.values())
    for c in ("beta_mean", "beta_min"):
        assert ((val[c] >= 0.5) & (val[c] <= 2.0)).all(), c
    assert (val["beta_min"] <= val["beta_mean"] + 1e-6).all()
    for k in range(4):
        assert ((val[f"alpha_{k}"] >= 0.1 - 1e-6) & (val[f"alpha_{k}"] <= 2.0 + 1e-6)).all()
        assert ((val[f"align_{k}"] >= -1 - 1e-6) & (val[f"align_{k}"] <= 1 + 1e-6)).all()
    for c in cols[2:]:
        assert len(set(val[c].round(6))) > 1, f"{c} never changes"
    assert (val["loss_gt"] > 0).all() and (val["loss_feat"] > 0).all()


# ---------------------------------------------------------------- resume reaches the uninterrupted weights


@pytest.fixture
def shrink_val(monkeypatch):
    """Pipeline runs on a 60-image val split (the training split is cut by train_fraction)."""
    orig = pipeline.load_data

    def small(*a, **kw):
        s = orig(*a, **kw)
        return Splits(s.train, s.val.subset(stratified_subset(s.val.labels, 60, 0)), s.classes, s.spec, s.info)

    monkeypatch.setattr(pipeline, "load_data", small)


def _run(method: str, out: Path, teacher: Path, resume: bool = False, hooks: Hooks | None = None):
    return distill(student="test_resnet", teacher=TeacherOptions(name="test_vit", checkpoint=str(teacher)),
                   data=DataOptions("digits", train_fraction=0.1), method=method,
                   train=_cfg(epochs=2, batch_size=48, lr=3e-3, log_every=1), out=out, resume=resume, hooks=hooks)


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)
    out = {f"net.{k}": v for k, v in ck["net"].items()}
    out.update({f"ema.{k}": v for k, v in ck["ema"].items()})
    out.update({f"extra.{k}": v for k, v in ck["extra"].items()})
    out.update({f"student.{k}": v for k, v in load_file(str(run / "student.safetensors")).items()})
    return out


@pytest.mark.parametrize("method", ["kd", "spofa"])
def test_resume_reaches_the_uninterrupted_weights(method: str, tmp_path: Path, shrink_val) -> None:
    teacher = _teacher_file(tmp_path / "t" / "teacher.safetensors")
    full = _run(method, tmp_path / "runs" / "full", teacher)
    assert full.fit.epochs_run == 2

    evals = []

    def interrupt(step: int) -> None:  # first training step of epoch 2
        if evals:
            raise KeyboardInterrupt

    part = tmp_path / "runs" / "part"
    with pytest.raises(KeyboardInterrupt):
        _run(method, part, teacher, hooks=Hooks(before_update=interrupt, on_eval=evals.append))
    assert torch.load(part / CHECKPOINT, weights_only=True)["epoch"] == 1
    resumed = _run(method, part, teacher, resume=True)

    a, b = _tensors(tmp_path / "runs" / "full"), _tensors(part)
    assert a.keys() == b.keys()
    assert (method == "spofa") == any(k.startswith("extra.heads.") for k in a)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    ra = [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in _records(full.run_dir)]
    rb = [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in _records(resumed.run_dir)]
    assert ra == rb
    assert (full.run_dir / "trace.csv").read_text() == (part / "trace.csv").read_text()
    assert resumed.student["top1"] == full.student["top1"] and resumed.student["saved"] == full.student["saved"]


def test_resume_with_other_method_or_loss_settings_is_refused(tmp_path: Path, shrink_val) -> None:
    """A run resumed with another --method or loss flag is refused in one line naming both values,
    before any training; the run's own settings resume."""
    teacher = _teacher_file(tmp_path / "t" / "teacher.safetensors")
    out = tmp_path / "runs" / "kd"
    common = dict(data=DataOptions("digits", train_fraction=0.1), out=out,
                  train=_cfg(epochs=2, batch_size=48, lr=3e-3, log_every=1))
    t = TeacherOptions(name="test_vit", checkpoint=str(teacher))
    with pytest.raises(KeyboardInterrupt):  # stop after the first epoch's checkpoint
        distill(student="test_resnet", teacher=t, method="kd", hooks=Hooks(before_update=lambda step: step == 3 and _raise()),
                **common)
    ckpt = (out / CHECKPOINT).read_bytes()
    with pytest.raises(UserError) as e:
        distill(student="test_resnet", teacher=t, method="spofa", resume=True, **common)
    msg = str(e.value)
    assert "\n" not in msg and "--method kd" in msg and "--method spofa" in msg
    with pytest.raises(UserError, match="--kd-temperature 4.0.*--kd-temperature 2.0"):
        distill(student="test_resnet", teacher=t, method="kd", loss=DistillConfig(kd_temperature=2.0), resume=True,
                **common)
    with pytest.raises(UserError, match="--student test_resnet.*--student test_efficientnet"):
        distill(student="test_efficientnet", teacher=t, method="kd", resume=True, **common)
    assert (out / CHECKPOINT).read_bytes() == ckpt  # refused before anything was touched
    r = distill(student="test_resnet", teacher=t, method="kd", resume=True, **common)
    assert r.fit.epochs_run == 2 and r.student["method"] == "kd"


def _raise():
    raise KeyboardInterrupt


# ---------------------------------------------------------------- non-finite losses


def _kd_task(seed: int = 0):
    torch.manual_seed(seed)
    return create_task("kd", create_model("test_resnet", 10, 32), create_model("test_vit", 10, 32), DistillConfig(), 10)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(digits: Splits, tmp_path: Path) -> None:
    task = _kd_task()
    _inject(task, at={2})  # first step of epoch 2 (2 steps per epoch)
    snap = {}

    def hook(step: int) -> None:
        if step == 2:
            p = tmp_path / CHECKPOINT
            snap.update(bytes=p.read_bytes(), mtime=p.stat().st_mtime_ns, ino=p.stat().st_ino)

    with pytest.raises(TrainingDiverged, match="non-finite at step 2") as e:
        fit(task, _small(digits, 32, 20), _cfg(epochs=2), tmp_path, hooks=Hooks(before_update=hook))
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)
    p = tmp_path / CHECKPOINT
    assert snap and p.read_bytes() == snap["bytes"]
    assert p.stat().st_mtime_ns == snap["mtime"] and p.stat().st_ino == snap["ino"]
    assert torch.load(p, weights_only=True)["epoch"] == 1
    recs = _records(tmp_path)
    assert [r.get("epoch") for r in recs if "event" not in r] == [1]
    assert [(r["event"], r["step"]) for r in recs if "event" in r] == [("nonfinite", 2)]
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_nan_skip_counts_skipped_steps(digits: Splits, tmp_path: Path) -> None:
    task = _kd_task()
    _inject(task, at={1, 3})
    r = fit(task, _small(digits, 32, 20), _cfg(epochs=2, on_nan="skip"), tmp_path)
    assert r.epochs_run == 2
    recs = _records(tmp_path)
    events = [x for x in recs if x.get("event") == "nonfinite"]
    assert [(x["step"], x["epoch"]) for x in events] == [(1, 0), (3, 1)]
    assert [x["epoch"] for x in recs if "event" not in x] == [1, 2]
    assert all(torch.isfinite(p).all() for p in task.net.parameters())
    ck = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ck["step"] == 4 and ck["epoch"] == 2
    # The schedule stays in step with the step count, skipped steps included: it ends at zero.
    assert ck["scheduler"]["last_epoch"] == ck["step"] and recs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_nan_skip_gives_up_after_max_skips(digits: Splits, tmp_path: Path) -> None:
    task = _kd_task()
    _inject(task, at={0, 1, 2})
    with pytest.raises(TrainingDiverged):
        fit(task, _small(digits, 32, 20), _cfg(epochs=2, on_nan="skip", max_nan_skips=2), tmp_path)
    assert len([x for x in _records(tmp_path) if x.get("event") == "nonfinite"]) == 3


def test_nan_skip_leaves_no_nan_in_the_model(digits: Splits, tmp_path: Path) -> None:
    task = _kd_task()
    _inject(task, at={1}, what="images")  # a forward that itself goes non-finite (as an fp16 overflow does)
    r = fit(task, _small(digits, 32, 20), _cfg(epochs=1, on_nan="skip"), tmp_path)
    assert r.epochs_run == 1
    bad = [k for k, v in task.net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"non-finite after a skipped step: {bad[:3]}"


def test_installed_hooks_run_after_the_runs_own_and_on_loss_replaces_the_loss(digits: Splits, tmp_path: Path) -> None:
    """The process-wide seam (`add_hooks` / `installed_hooks`): what the fault suite installs from outside the CLI."""
    from spofa_deploy.train import hooks as hooks_mod
    from spofa_deploy.train.hooks import active_hooks
    from spofa_deploy.train.hooks import add_hooks, installed_hooks

    calls, own_saw, ext_saw = [], [], []

    def own_loss(step: int, loss: torch.Tensor) -> torch.Tensor:
        own_saw.append(loss.item())
        return loss * 2.0  # the place to scale a loss

    def ext_loss(step: int, loss: torch.Tensor) -> torch.Tensor:
        ext_saw.append(loss.item())
        return loss * float("nan") if step == 1 else loss

    own = Hooks(before_update=lambda s: calls.append(("own", s)), on_loss=own_loss)
    ext = Hooks(before_update=lambda s: calls.append(("ext", s)), on_eval=lambda s: calls.append(("eval", s)),
                on_loss=ext_loss)
    with installed_hooks(ext):
        r = fit(_kd_task(), _small(digits, 32, 20), _cfg(epochs=1, on_nan="skip"), tmp_path, hooks=own)
    assert r.epochs_run == 1
    assert calls == [("own", 0), ("ext", 0), ("own", 1), ("ext", 1), ("eval", 2)]
    assert ext_saw == pytest.approx([2.0 * v for v in own_saw])  # each on_loss gets what the one before returned
    rows = list(csv.DictReader(open(tmp_path / "trace.csv")))
    assert float(rows[0]["loss"]) == pytest.approx(ext_saw[0], rel=1e-5)  # the loss trained on is the returned one
    assert [(x["event"], x["step"]) for x in _records(tmp_path) if "event" in x] == [("nonfinite", 1)]
    assert active_hooks().on_loss is None and active_hooks(own).before_update is own.before_update  # uninstalled
    twin = Hooks()
    remove_a, remove_b = add_hooks(Hooks()), add_hooks(twin)
    remove_b()  # removes its own installation, not an equal one
    assert active_hooks(twin) == Hooks()
    assert len(hooks_mod._INSTALLED) == 1 and hooks_mod._INSTALLED[0] is not twin
    remove_a()
    assert hooks_mod._INSTALLED == []


# ---------------------------------------------------------------- no host synchronisation in the SPOFA step

_SYNC_METHODS = {"item", "cpu", "tolist", "numpy", "nonzero", "__bool__", "__float__", "__int__"}
_SYNC_FUNCTIONS = ("_local_scalar_dense", "nonzero", "sym_size", "_assert_scalar")


def _host_syncs(fn, *args):
    """Trace `fn(*args)` as ONE graph (fullgraph: a data-dependent Python branch fails) and list its ops that
    read a value back to the host. Returns (output, [op names])."""
    import torch._dynamo

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        out = torch.compile(fn, fullgraph=True, dynamic=False, backend=record)(*args)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    bad = []
    for node in graphs[0].graph.nodes:
        name = str(node.target)
        if node.op == "call_method" and name in _SYNC_METHODS:
            bad.append(name)
        elif node.op == "call_function" and any(s in name for s in _SYNC_FUNCTIONS):
            bad.append(name)
    # (A `.to(device)` cannot be told from a `.to("cpu")` on a CPU-only run: the GPU test below covers it.)
    return out, bad


def test_host_sync_detector_detects() -> None:
    x = torch.randn(4)
    assert _host_syncs(lambda t: t * t.sum().item(), x)[1] == ["item"]
    assert _host_syncs(lambda t: t[t > 0].sum(), x)[1]  # data-dependent shape
    assert _host_syncs(lambda t: torch.where(t > 0, t, 0).sum(), x)[1] == []
    with pytest.raises(Exception):  # a Python branch on a tensor value breaks the graph
        _host_syncs(lambda t: t * 2 if t.sum() > 0 else t, x)


def test_spofa_step_has_no_host_sync() -> None:
    """One OFA/SPOFA forward traces as one graph with no op that reads a value back to the host."""
    torch.manual_seed(0)
    task = create_task("spofa", create_model("test_resnet", 10, 32), create_model("test_vit", 10, 32),
                       DistillConfig(), 10)
    assert isinstance(task, OFA) and task.use_mema
    task.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    task(x, y)  # MEMA baselines initialised: the traced step is a steady-state one
    eager = copy.deepcopy(task)
    out, bad = _host_syncs(task, x, y)
    assert not bad, f"host synchronising ops in the SPOFA step: {bad}"
    ref = eager(x, y)
    torch.testing.assert_close(out.loss, ref.loss)
    assert set(out.stats) == set(ref.stats) and all(v.dim() == 0 for v in out.stats.values())
    for k in ref.stats:
        torch.testing.assert_close(out.stats[k], ref.stats[k])
    out.loss.backward()
    assert task.net.fc.weight.grad is not None and torch.isfinite(task.net.fc.weight.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("method", ["spofa", "kd"])
def test_distill_step_no_sync_on_gpu(method: str) -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    task = create_task(method, create_model("test_resnet", 10, 32), create_model("test_vit", 10, 32),
                       DistillConfig(method=method), 10).to(dev)
    task.train()
    x = torch.randn(16, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (16,), device=dev)
    task(x, y).loss.backward()  # warm-up: cuDNN / allocator set-up may synchronise once
    task.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = task(x, y)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out.loss).item()
    assert all(v.device.type == "cuda" for v in out.stats.values())


# ---------------------------------------------------------------- the teacher stage

def test_teacher_stage_has_no_label_smoothing_and_records_its_soft_target_entropy(tmp_path: Path, monkeypatch) -> None:
    import random

    from spofa_deploy.teacher.stage import soft_target_entropy, train_teacher

    assert TeacherOptions().label_smoothing == 0.0
    smoothing = []
    real = stage.Supervised
    monkeypatch.setattr(stage, "Supervised", lambda net, ls: smoothing.append(ls) or real(net, ls))
    opts = TeacherOptions(name="test_vit", pretrained=False, train=_cfg(epochs=1, batch_size=64, optimizer="adamw"))
    path = train_teacher(teacher=opts, data=DataOptions("digits", 16), out=tmp_path / "t")
    assert smoothing == [0.0]
    meta = read_model_meta(path)
    soft = meta["soft_targets"]
    assert meta["label_smoothing"] == 0.0 and soft["temperature"] == 4.0 and soft["images"] == 512
    assert 0.0 < soft["entropy_nats"] <= soft["max_nats"] == pytest.approx(math.log(10), abs=1e-4)
    # The measurement uses a private RNG: global state untouched, and the same value twice.
    model, _ = load_model(path)
    splits = load_splits("digits", Preprocessing.from_meta(meta, 16))
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    again = soft_target_entropy(model, splits.train, 4.0)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert again == soft
    uniform = soft_target_entropy(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10)).requires_grad_(False).apply(
        lambda m: isinstance(m, torch.nn.Linear) and (m.weight.zero_(), m.bias.zero_())), splits.train, 4.0, n=8)
    assert uniform["entropy_nats"] == pytest.approx(math.log(10), abs=1e-4)  # constant logits: maximum entropy


# ---------------------------------------------------------------- the teacher-output cache

def test_exact_teacher_cache_gives_bitwise_the_same_student(tmp_path: Path, shrink_val, monkeypatch) -> None:
    """With an exact (fp32) cache a CPU run trains bitwise the same student, cold or warm; warm, the teacher never runs."""
    teacher = _teacher_file(tmp_path / "t" / "teacher.safetensors")
    t = TeacherOptions(name="test_vit", checkpoint=str(teacher))
    common = dict(student="test_resnet", teacher=t, data=DataOptions("digits", train_fraction=0.1), method="spofa",
                  train=_cfg(epochs=2, batch_size=48, lr=3e-3))
    plain = distill(out=tmp_path / "plain", **common)
    cache = dict(cache=TeacherCacheOptions(tmp_path / "cache", format="fp32"))
    cold = distill(out=tmp_path / "cold", **cache, **common)
    assert len(list((tmp_path / "cache").glob("*/epoch-*.bin"))) == 2  # one record per epoch
    calls = []
    real = OFA.teacher_logits
    monkeypatch.setattr(OFA, "teacher_logits", lambda self, x, t=None: calls.append(t is None) or real(self, x, t))
    warm = distill(out=tmp_path / "warm", **cache, **common)
    assert not any(calls)  # every training view came from the cache (True would mean the teacher ran)
    ref = (plain.run_dir / "student.safetensors").read_bytes()
    assert (cold.run_dir / "student.safetensors").read_bytes() == ref
    assert (warm.run_dir / "student.safetensors").read_bytes() == ref
    # Another seed is another key: a miss, never a reuse.
    other = distill(out=tmp_path / "seed1", **cache,
                    **{**common, "train": _cfg(epochs=1, batch_size=48, lr=3e-3, seed=1)})
    assert other.fit.epochs_run == 1 and len(list((tmp_path / "cache").glob("*/manifest.json"))) == 2


# ---------------------------------------------------------------- per-term gradient norms

@pytest.mark.parametrize("method", ["none", "kd", "spofa"])
def test_term_gradient_norms_match_autograd(method: str) -> None:
    """gnorm_<term> is each weighted term's gradient on the student, gnorm_total the whole, update_norm the step
    (`none`: one term, read from the total without an extra backward)."""
    from spofa_deploy.train.loop import train_step

    torch.manual_seed(0)
    task = create_task(method, create_model("test_resnet", 10, 32), create_model("test_vit", 10, 32), DistillConfig(), 10)
    task.train()
    ref = copy.deepcopy(task)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(task.trainable(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out, _, finite = train_step(task, x, y, opt, scaler, None, grad_norms=True)
    assert finite

    student = [p for p in ref.net.parameters() if p.requires_grad]

    def norm_of(loss) -> float:
        ref.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student if p.grad is not None])))

    r = ref(x, y)
    expected = {f"gnorm_{k}": norm_of(t) for k, t in r.terms.items()}
    expected["gnorm_total"] = norm_of(r.loss)
    assert set(expected) <= set(out.stats)
    if method == "spofa":
        assert {"gnorm_stage0", "gnorm_stage3"} <= set(expected)
    for k, v in expected.items():
        assert float(out.stats[k]) == pytest.approx(v, rel=1e-4, abs=1e-7), k
    assert float(out.stats["update_norm"]) == pytest.approx(0.1 * expected["gnorm_total"], rel=1e-4)  # plain SGD


def test_trace_gets_gradient_norm_columns(digits: Splits, tmp_path: Path) -> None:
    task = _kd_task()
    fit(task, _small(digits, 32, 20), _cfg(epochs=2, log_every=1, grad_norms_every=2), tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "trace.csv")))
    assert {"gnorm_ce", "gnorm_kd", "gnorm_total", "update_norm"} <= set(rows[0])
    measured = [r["step"] for r in rows if r["gnorm_total"]]
    assert measured == [r["step"] for r in rows if int(r["step"]) % 2 == 0] and measured  # every 2nd logged step
    assert all(float(r["gnorm_ce"]) > 0 for r in rows if r["gnorm_ce"])


def test_topk_correct_counts_by_hand() -> None:
    from spofa_deploy.accuracy import topk_correct

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])  # row 0 top-1 hit; row 1 label is 2nd; row 2 label is last
    c1, c2, c5 = topk_correct(logits, labels, (1, 2, 5))
    assert (int(c1), int(c2), int(c5)) == (1, 2, 3)  # k=5 is capped at the 3 classes
