"""`spofa bench` on tiny real artifacts (CPU): timing records, accuracy, teacher pairing, skips, bad input.

A module fixture builds one run folder: a test_vit teacher and a test_resnet student (digits,
32 px, a few training steps), the student exported to ONNX (dynamic batch), to a fixed-batch
ONNX, and to an INT8 Q/DQ ONNX (onnxruntime quantize_static), each with its sidecar.
Accuracies are checked against plain evaluation loops written here, not against the
code under test.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export.artifact import describe
from export.bench.report import BenchReport
from export.bench.run import BenchOptions, run_bench
from export.bench.timing import LatencyStats, Summary, TimingOptions, back_to_back, measure, percentile
from export.runner import TimedStep
from spofa_deploy.artifacts import file_digest, read_json, save_model, sidecar_path, write_json
from spofa_deploy.errors import UserError
from spofa_deploy.models import Preprocessing

# device="cpu": the accuracy checks compare with CPU fp32 loops, also on a machine that has a GPU.
FAST = BenchOptions(batch_sizes=[1, 8], timing=TimingOptions(warmup_s=0.05, min_s=0.2, min_iters=5, rounds=2),
                    threads=1, progress=False, device="cpu")
ANY_DEVICE = replace(FAST, device="auto", accuracy=False)
PCTL_ORDER = ("min_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")


# ----------------------------------------------------------------------------- fixtures

def _meta(model, name: str, role: str) -> dict:
    from spofa_deploy.models import count_params, data_config

    meta = dict(model=name, num_classes=10, classes=[str(i) for i in range(10)], img_size=32, **data_config(model),
                data="digits", role=role, method="kd", teacher="test_vit", top1=None, top5=None, ema_top1=None,
                params=count_params(model))
    if role == "student":
        meta["teacher_file"] = "teacher.safetensors"
    return meta


def _val_tensors(meta: dict):
    from spofa_deploy.data.splits import load_splits

    val = load_splits("digits", Preprocessing.from_meta(meta, 32), train_aug=False).val
    xs, ys = zip(*(val[i] for i in range(len(val))))
    return torch.stack(xs), torch.tensor(ys)


def _export_onnx(model, path, batch_dynamic: bool = True, batch: int = 1) -> None:
    kw = dict(dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}) if batch_dynamic else {}
    torch.onnx.export(model, torch.randn(batch, 3, 32, 32), str(path), input_names=["images"],
                      output_names=["logits"], opset_version=17, dynamo=False, **kw)


def _sidecar(path, meta: dict, precision: str, fmt: str = "onnx", batch=(1, 8, 64), source="student.safetensors"):
    # The file's own digest, as `spofa export` records it (a copied student's would not match the file).
    write_json(sidecar_path(path), {**meta, "format": fmt, "precision": precision, "opset": 17,
                                    "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]}, "source": source,
                                    **file_digest(path)})


class _Calib:
    """onnxruntime CalibrationDataReader over a few validation images."""

    def __init__(self, x: torch.Tensor):
        self._it = iter([{"images": x[i:i + 8].numpy()} for i in range(0, 64, 8)])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import warnings

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from spofa_deploy.models import create_model

    CalibrationDataReader.register(_Calib)
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    teacher = create_model("test_vit", 10, img_size=32)
    student = create_model("test_resnet", 10, img_size=32)
    tmeta, smeta = _meta(teacher, "test_vit", "teacher"), _meta(student, "test_resnet", "student")
    x_val, y_val = _val_tensors(smeta)
    xt_val, _ = _val_tensors(tmeta)  # the teacher's own preprocessing (bicubic here, the student's is bilinear)
    # A few steps on (a slice of) the val images: accuracies above chance, so equality checks mean something.
    for m, x_train in ((teacher, xt_val), (student, x_val)):
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        m.train()
        for i in range(12):
            idx = torch.arange(i * 64, i * 64 + 64) % len(x_val)
            loss = torch.nn.functional.cross_entropy(m(x_train[idx]), y_val[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
    save_model(out / "teacher.safetensors", teacher, tmeta)
    save_model(out / "student.safetensors", student, smeta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export_onnx(student, out / "student.onnx")
        _export_onnx(student, out / "student_b4.onnx", batch_dynamic=False, batch=4)
    _sidecar(out / "student.onnx", smeta, "fp32")
    _sidecar(out / "student_b4.onnx", smeta, "fp32", batch=(4, 4, 4))
    quantize_static(str(out / "student.onnx"), str(out / "student_int8.onnx"), _Calib(x_val),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    _sidecar(out / "student_int8.onnx", smeta, "int8")
    return dict(dir=out, teacher=teacher, student=student, tmeta=tmeta, smeta=smeta, x=x_val, y=y_val, xt=xt_val)


def _ort_logits(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"images": x[i:i + 50].numpy()})[0] for i in range(0, len(x), 50)]
    return torch.from_numpy(np.concatenate(outs))


def _torch_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 50]) for i in range(0, len(x), 50)])


def _acc(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float, np.ndarray]:
    top = logits.topk(5, dim=1).indices
    top1 = 100.0 * int((top[:, 0] == y).sum()) / len(y)
    top5 = 100.0 * int((top == y[:, None]).any(dim=1).sum()) / len(y)
    return top1, top5, top[:, 0].numpy()


def _result(report: BenchReport, role: str):
    rs = [r for r in report.results if r.role == role]
    assert len(rs) == 1, [r.key for r in report.results]
    return rs[0]


@pytest.fixture(scope="module")
def onnx_report(run, tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    t0 = time.perf_counter()
    rep = run_bench(run["dir"] / "student.onnx", options=replace(FAST, json_path=d / "bench.json", plot_path=d / "bench.png"))
    return dict(report=rep, json=d / "bench.json", png=d / "bench.png", seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- timing method

def test_percentile_matches_numpy_and_is_ordered():
    vals = np.random.default_rng(0).exponential(2.0, size=137)
    for q in (0, 1, 50, 90, 95, 99, 100):
        assert percentile(vals, q) == pytest.approx(np.percentile(vals, q), rel=1e-12)
    s = Summary.of(vals)
    assert s.min <= s.median <= s.p90 <= s.p95 <= s.p99 <= s.max
    assert s.mean == pytest.approx(vals.mean()) and s.std == pytest.approx(vals.std()) and s.n == 137
    with pytest.raises(ValueError):
        percentile([], 50)


def test_measure_honours_min_iters_and_min_s():
    calls = []
    st = measure(TimedStep(lambda: calls.append(1)), batch=4, timing=TimingOptions(warmup_s=0.0, min_s=0.0, min_iters=17))
    assert st.iters == 17 and st.warmup_iters == 1 and len(calls) == 18
    assert st.gpu is None and st.timing == "host" and st.batch == 4

    st = measure(TimedStep(lambda: time.sleep(0.002)), batch=1, timing=TimingOptions(warmup_s=0.02, min_s=0.06, min_iters=2))
    assert st.measured_s >= 0.06 and st.iters >= 2 and st.warmup_iters >= 2
    assert st.host.min >= 2.0  # each call sleeps 2 ms, so no sample can be shorter
    assert st.throughput_ips == pytest.approx(1000.0 / st.host.median)
    d = st.to_dict()
    assert d["gpu_compute"] is None and d["host_latency"]["n"] == st.iters


def test_measure_counts_copies_in_host_latency_only():
    # copy_in / copy_out are part of host latency; on CPU there is no GPU clock to put them in.
    st = measure(TimedStep(lambda: None, copy_in=lambda: time.sleep(0.003), copy_out=lambda: time.sleep(0.003)),
                 batch=1, timing=TimingOptions(warmup_s=0.0, min_s=0.0, min_iters=5))
    assert st.host.min >= 6.0


class _FakeGpu:
    """A stream on virtual clocks: each enqueue costs the host `enqueue_ms`, each inference the GPU `run_ms`;
    an event completes when the stream reaches it (at once on an idle GPU)."""

    def __init__(self, enqueue_ms: float, run_ms: float):
        self.host = self.free = 0.0
        self.enqueue_ms, self.run_ms = enqueue_ms, run_ms

    def compute(self) -> None:
        self.host += self.enqueue_ms
        self.free = max(self.free, self.host) + self.run_ms

    def event(self):
        gpu = self

        class Event:
            def record(self) -> None:
                self.t = max(gpu.free, gpu.host)

            def synchronize(self) -> None:
                gpu.host = max(gpu.host, self.t)

            def elapsed_time(self, other) -> float:
                return other.t - self.t

        return Event()


@pytest.mark.parametrize("enqueue_ms, run_ms", [(0.01, 0.5), (0.3, 0.1)])
def test_back_to_back_times_the_gpu_work_not_the_launch(enqueue_ms, run_ms):
    gpu = _FakeGpu(enqueue_ms, run_ms)
    gpu_ms, enq = back_to_back(gpu.compute, 20, new_event=gpu.event, block=8)
    # 3 blocks of 8 give 7 samples each: a block's first interval (launch on an idle GPU) is dropped.
    assert len(gpu_ms) == 21 and len(enq) == 24
    # GPU-bound: each interval is one inference's GPU time, the launch hidden behind the previous one;
    # launch-bound: the GPU waits for the host, and the figure shows the host's pace.
    assert gpu_ms == pytest.approx([max(run_ms, enqueue_ms)] * 21)
    assert all(e >= 0 for e in enq)


def test_a_per_call_event_pair_would_count_the_launch():
    # What the back-to-back schedule avoids: events around one call on an idle GPU include the launch.
    gpu = _FakeGpu(enqueue_ms=0.2, run_ms=0.5)
    a, b = gpu.event(), gpu.event()
    a.record()
    gpu.compute()
    b.record()
    assert a.elapsed_time(b) == pytest.approx(0.7)
    assert back_to_back(gpu.compute, 4, new_event=gpu.event, block=5)[0] == pytest.approx([0.5] * 4)


def test_pool_merges_rounds():
    a = measure(TimedStep(lambda: None), batch=1, timing=TimingOptions(warmup_s=0, min_s=0, min_iters=3))
    b = measure(TimedStep(lambda: time.sleep(0.001)), batch=1, timing=TimingOptions(warmup_s=0, min_s=0, min_iters=4))
    p = LatencyStats.pool([a, b])
    assert p.iters == 7 and p.rounds == 2 and p.warmup_iters == a.warmup_iters + b.warmup_iters
    assert p.host.median == pytest.approx(np.median(a.host_ms + b.host_ms))


# ----------------------------------------------------------------------------- ONNX fp32 (ort-cpu, auto)

def test_onnx_report_has_every_field(onnx_report):
    data = json.loads(onnx_report["json"].read_text())
    assert set(data) == {"schema", "created", "settings", "machine", "data", "notes", "results"}
    m = data["machine"]
    for k in ("cpu", "cpu_logical_cores", "cpu_physical_cores", "torch_threads", "cuda", "gpu", "libraries"):
        assert k in m
    assert m["cpu"] and m["cpu_logical_cores"] >= 1
    for lib in ("torch", "timm", "onnx", "onnxruntime", "numpy"):
        assert m["libraries"][lib]
    assert data["data"]["spec"] == "digits" and data["data"]["val_size"] > 0
    assert any("auto" in n and "ort-cpu" in n for n in data["notes"])  # says which backend auto picked
    roles = {r["role"]: r for r in data["results"]}
    assert set(roles) == {"student", "teacher"}
    for r in data["results"]:
        assert r["status"] == "ok" and r["reason"] is None
        for k in ("model", "backend", "backend_requested", "precision", "device", "artifact", "size_bytes"):
            assert r[k] is not None, k
        assert set(r["accuracy"]) == {"top1", "top5", "top5_k", "n", "teacher_top1", "agreement"}
        assert [b["batch"] for b in r["batches"]] == [1, 8]
        for b in r["batches"]:
            for k in ("iters", "warmup_iters", "measured_s", "rounds", "timing", "median_ms", "p99_ms",
                      "throughput_ips", "host_throughput_ips", "host_latency", "gpu_compute", "speedup_vs_teacher"):
                assert k in b, k
            assert b["gpu_compute"] is None and b["timing"] == "host"  # CPU: no invented GPU times
            h = b["host_latency"]
            assert [h[k] for k in PCTL_ORDER] == sorted(h[k] for k in PCTL_ORDER)
            assert h["std_ms"] >= 0 and h["n"] == b["iters"] >= FAST.timing.min_iters
            assert b["measured_s"] >= FAST.timing.min_s * 0.999 and b["rounds"] == FAST.timing.rounds
            assert b["throughput_ips"] == pytest.approx(b["batch"] * 1000.0 / h["median_ms"])
    s = roles["student"]
    assert (s["backend"], s["backend_requested"], s["precision"], s["model"]) == ("ort-cpu", "auto", "fp32", "test_resnet")
    # Like for like: the teacher was exported as the student was (ONNX, fp32, same batch profile), on ORT too.
    t = roles["teacher"]
    assert (t["backend"], t["precision"], t["model"]) == ("ort-cpu", "fp32", "test_vit")
    assert Path(t["artifact"]).name == "teacher.onnx"
    assert all(b["speedup_like_for_like"] is True for b in s["batches"])
    assert s["size_bytes"] == Path(s["artifact"]).stat().st_size


def test_onnx_accuracy_equals_independent_evaluation(run, onnx_report):
    rep = onnx_report["report"]
    s, t = _result(rep, "student"), _result(rep, "teacher")
    s1, s5, spred = _acc(_ort_logits(run["dir"] / "student.onnx", run["x"]), run["y"])
    t1, _, tpred = _acc(_ort_logits(run["dir"] / "teacher.onnx", run["xt"]), run["y"])
    assert s.accuracy.n == t.accuracy.n == len(run["y"])
    assert s.accuracy.top1 == pytest.approx(s1, abs=1e-9) and s.accuracy.top5 == pytest.approx(s5, abs=1e-9)
    assert t.accuracy.top1 == pytest.approx(t1, abs=1e-9)
    assert s.accuracy.teacher_top1 == pytest.approx(t1, abs=1e-9)
    assert s.accuracy.agreement == pytest.approx(100.0 * float(np.mean(spred == tpred)), abs=1e-9)
    assert s1 > 20.0  # trained above chance, so equality is not 10% == 10%


def test_teacher_speedup_is_side_by_side_ratio(onnx_report):
    rep = onnx_report["report"]
    s, t = _result(rep, "student"), _result(rep, "teacher")
    assert s.teacher == t.key
    for b in (1, 8):
        sb, tb = s.batch(b), t.batch(b)
        assert sb.latency.rounds == tb.latency.rounds == FAST.timing.rounds  # interleaved rounds, pooled
        assert sb.speedup_vs_teacher == pytest.approx(tb.latency.median_ms / sb.latency.median_ms)
        assert sb.teacher_median_ms == tb.latency.median_ms


def test_teacher_export_is_cached_and_an_eager_teacher_is_marked(run, onnx_report, tmp_path):
    """The teacher exported for the first bench is reused; a teacher on another backend gets a marked ratio."""
    from rich.console import Console

    from cli.bench_table import print_report

    tonnx = run["dir"] / "teacher.onnx"
    stamp = tonnx.stat().st_mtime_ns
    again = run_bench(run["dir"] / "student.onnx", options=replace(FAST, accuracy=False, batch_sizes=[1]))
    assert tonnx.stat().st_mtime_ns == stamp and any("reused" in n for n in again.notes)
    mixed = run_bench(run["dir"] / "student.onnx",
                      options=replace(FAST, accuracy=False, teacher_backend="torch-eager", batch_sizes=[1]))
    s, t = _result(mixed, "student"), _result(mixed, "teacher")
    assert t.backend == "torch-eager" and s.batch(1).speedup_like_for_like is False
    console = Console(record=True, width=200)
    print_report(mixed, console)
    text = console.export_text()
    assert "x*" in text and "different backends: student ort-cpu fp32 on cpu vs teacher torch-eager fp32" in text


def test_teacher_that_cannot_be_exported_runs_eager_and_says_so(run, tmp_path, monkeypatch):
    from export import exporter

    d = tmp_path / "r"
    d.mkdir()
    for f in ("student.onnx", "student.onnx.json", "teacher.safetensors", "teacher.json", "student.safetensors",
              "student.json"):
        shutil.copy(run["dir"] / f, d / f)

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(exporter, "export_model", broken)
    rep = run_bench(d / "student.onnx", options=replace(FAST, accuracy=False, batch_sizes=[1]))
    assert _result(rep, "teacher").backend == "torch-eager"
    assert any("could not be exported" in n and "exporter exploded" in n for n in rep.notes)
    assert _result(rep, "student").batch(1).speedup_like_for_like is False
    assert not (d / "teacher.onnx").exists()


def test_default_batches_follow_the_artifact(run):
    """No --batch: batch 1 and the large batch (64 on CPU), within what the artifacts accept."""
    fast = replace(FAST, batch_sizes=None, accuracy=False)
    dyn = run_bench(run["dir"] / "student.onnx", options=fast)
    for r in dyn.results:
        assert [b.batch for b in r.batches] == [1, 64], r.key
    fixed = run_bench(run["dir"] / "student_b4.onnx", options=replace(fast, teacher_backend="torch-eager"))
    assert [b.batch for b in _result(fixed, "student").batches] == [4]
    assert any("largest batch 4" in n for n in fixed.notes)


def test_plot_and_table(onnx_report):
    from rich.console import Console

    assert onnx_report["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from cli.bench_table import print_report

    con = Console(record=True, width=200)
    print_report(onnx_report["report"], con)
    text = con.export_text()
    for word in ("test_resnet", "test_vit", "ort-cpu (auto)", "teacher.onnx", "speed-up", "img/s", "top-1"):
        assert word in text, word


def test_the_plan_decides_everything_before_anything_runs(run, tmp_path):
    """`plan_bench` loads, exports and times nothing: the teacher's export is a step of the plan, carried out by
    `measure`; the runners are made, not loaded."""
    from export.bench.plan import plan_bench
    from export.bench.run import measure

    d = tmp_path / "r"
    d.mkdir()
    for f in ("student.onnx", "student.onnx.json", "teacher.safetensors", "teacher.json", "student.safetensors",
              "student.json"):
        shutil.copy(run["dir"] / f, d / f)
    plan = plan_bench(describe(d / "student.onnx"), options=replace(FAST, accuracy=False, batch_sizes=None))
    assert plan.teacher.how == "export" and plan.teacher.options.format == "onnx" and not (d / "teacher.onnx").exists()
    assert [c.result.role for c in plan.candidates] == ["student", "teacher"]
    assert all(c.runner is not None and not c.runner.active for c in plan.candidates)
    assert plan.batches == [1, 64] and any("auto: student student.onnx -> ort-cpu" in n for n in plan.notes)
    assert "to be exported to onnx fp32 like student.onnx (as teacher.onnx)" in "\n".join(plan.lines())
    report = measure(replace(plan, batches=[1]))
    assert (d / "teacher.onnx").is_file() and any("exported to teacher.onnx" in n for n in report.notes)
    assert {r.role: r.backend for r in report.results} == {"student": "ort-cpu", "teacher": "ort-cpu"}
    assert report.settings["teacher"] == str(d / "teacher.onnx")


# ----------------------------------------------------------------------------- INT8 Q/DQ ONNX

def test_int8_qdq_onnx(run):
    art = describe(run["dir"] / "student_int8.onnx")
    assert art.onnx.qdq and art.precision == "int8"
    rep = run_bench(art.path, options=replace(FAST, backends=["ort-cpu"]))
    s = _result(rep, "student")
    assert (s.status, s.backend, s.precision) == ("ok", "ort-cpu", "int8")
    q1, q5, _ = _acc(_ort_logits(art.path, run["x"]), run["y"])
    assert s.accuracy.top1 == pytest.approx(q1, abs=1e-9) and s.accuracy.top5 == pytest.approx(q5, abs=1e-9)
    assert s.size_bytes == art.path.stat().st_size
    assert all(b.speedup_vs_teacher is not None for b in s.batches)


# ----------------------------------------------------------------------------- safetensors (run folder)

def test_run_folder_torch_eager(run):
    rep = run_bench(run["dir"], options=replace(FAST, max_val=200))  # a folder means its student.safetensors
    s, t = _result(rep, "student"), _result(rep, "teacher")
    assert (s.backend, s.backend_requested, s.precision, s.device) == ("torch-eager", "auto", "fp32", "cpu")
    assert s.artifact.endswith("student.safetensors") and t.artifact.endswith("teacher.safetensors")
    assert s.size_bytes == (run["dir"] / "student.safetensors").stat().st_size
    # max_val: the same stratified 200 images for both models.
    from spofa_deploy.data.datasets import stratified_subset

    idx = stratified_subset(run["y"].numpy(), 200, seed=0)
    x, xt, y = run["x"][idx], run["xt"][idx], run["y"][idx]
    s1, s5, sp = _acc(_torch_logits(run["student"], x), y)
    t1, _, tp = _acc(_torch_logits(run["teacher"], xt), y)
    assert s.accuracy.n == 200
    assert s.accuracy.top1 == pytest.approx(s1, abs=1e-9) and s.accuracy.top5 == pytest.approx(s5, abs=1e-9)
    assert t.accuracy.top1 == pytest.approx(t1, abs=1e-9)
    assert s.accuracy.agreement == pytest.approx(100.0 * float(np.mean(sp == tp)), abs=1e-9)
    for b in s.batches:
        h = b.latency.host
        assert h.min <= h.median <= h.p90 <= h.p95 <= h.p99 <= h.max
        assert b.speedup_vs_teacher == pytest.approx(t.batch(b.batch).latency.median_ms / b.latency.median_ms)


# ----------------------------------------------------------------------------- missing backends -> skipped

@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine these backends are not missing")
def test_missing_backends_are_skipped_with_reason(run, tmp_path):
    rep = run_bench(run["dir"] / "student.safetensors",
                    options=replace(ANY_DEVICE, backends=["torch-eager", "torch-cudagraph"]))
    by = {(r.role, r.backend): r for r in rep.results}
    assert by[("student", "torch-eager")].status == "ok" and by[("teacher", "torch-eager")].status == "ok"
    for role in ("student", "teacher"):
        g = by[(role, "torch-cudagraph")]
        assert g.status == "skipped" and "CUDA" in g.reason and not g.batches
    # ort-cuda asked explicitly: skipped, never silently replaced by ort-cpu.
    rep = run_bench(run["dir"] / "student.onnx", options=replace(ANY_DEVICE, backends=["ort-cuda"]))
    s = _result(rep, "student")
    assert (s.status, s.backend) == ("skipped", "ort-cuda") and "CUDA" in s.reason
    assert not [r for r in rep.results if r.role == "student" and r.backend == "ort-cpu"]
    # A TensorRT engine where TensorRT/GPU are missing: skipped, reason in the JSON.
    eng = tmp_path / "student.engine"
    eng.write_bytes(b"not a real engine")
    shutil.copy(run["dir"] / "student.safetensors", tmp_path / "student.safetensors")
    shutil.copy(run["dir"] / "student.json", tmp_path / "student.json")
    _sidecar(eng, run["smeta"], "fp16", fmt="trt", batch=(1, 4, 8))
    rep = run_bench(eng, teacher=run["dir"] / "teacher.safetensors", options=replace(ANY_DEVICE, json_path=tmp_path / "b.json"))
    s = _result(rep, "student")
    assert (s.status, s.backend, s.backend_requested) == ("skipped", "trt", "auto") and s.reason
    row = next(r for r in json.loads((tmp_path / "b.json").read_text())["results"] if r["role"] == "student")
    assert row["status"] == "skipped" and row["reason"] == s.reason and row["batches"] == []


# ----------------------------------------------------------------------------- bad input

def _bad_copy(run, tmp_path, name: str, **changes) -> object:
    src = run["dir"] / "student.onnx"
    dst = tmp_path / name
    shutil.copy(src, dst)
    meta = read_json(sidecar_path(src))
    meta.update(changes)
    write_json(sidecar_path(dst), meta)
    return dst


@pytest.mark.parametrize("case, match", [
    ("missing", "artifact not found"),
    ("format", "does not belong"),
    ("img_size", "64"),
    ("classes", "classes"),
    ("no_sidecar", "no sidecar"),
    ("fixed_batch", "accepts batch 4..4"),
    ("engine_batch", "engine profile"),
    ("unknown_backend", "did you mean .*ort-cuda"),
    ("wrong_backend", "cannot run"),
    ("precision", "exported at fp32"),
    ("torch_int8", "int8"),
    ("bad_suffix", r"model\.pt.*\.onnx"),
    ("json_folder", "--json: folder .* does not exist"),
])
def test_bad_input_raises_user_error(run, tmp_path, case, match):
    d = run["dir"]
    kw = replace(FAST, accuracy=False)
    with pytest.raises(UserError, match=match):
        if case == "missing":
            run_bench(tmp_path / "nope.engine", options=kw)
        elif case == "format":
            run_bench(_bad_copy(run, tmp_path, "s.onnx", format="trt"), options=kw)
        elif case == "img_size":
            run_bench(_bad_copy(run, tmp_path, "s.onnx", img_size=64), options=kw)
        elif case == "classes":
            run_bench(_bad_copy(run, tmp_path, "s.onnx", num_classes=100), options=kw)
        elif case == "no_sidecar":
            shutil.copy(d / "student.onnx", tmp_path / "bare.onnx")
            run_bench(tmp_path / "bare.onnx", options=kw)
        elif case == "fixed_batch":
            run_bench(d / "student_b4.onnx", options=kw)  # batch 1 and 8 asked
        elif case == "engine_batch":
            eng = tmp_path / "s.engine"
            eng.write_bytes(b"x")
            _sidecar(eng, run["smeta"], "fp16", fmt="trt", batch=(1, 4, 4))
            run_bench(eng, options=kw)  # 8 > max 4, refused before TensorRT is even needed
        elif case == "unknown_backend":
            run_bench(d / "student.onnx", options=replace(kw, backends=["ort-gpu"]))
        elif case == "wrong_backend":
            run_bench(d / "student.safetensors", options=replace(kw, backends=["ort-cpu"]))
        elif case == "precision":
            run_bench(d / "student.onnx", options=replace(kw, precisions=["fp16"]))
        elif case == "torch_int8":
            run_bench(d / "student.safetensors", options=replace(kw, precisions=["int8"]))
        elif case == "bad_suffix":
            (tmp_path / "model.pt").write_bytes(b"x")
            run_bench(tmp_path / "model.pt", options=kw)
        elif case == "json_folder":
            run_bench(d / "student.onnx", options=replace(kw, json_path=tmp_path / "no" / "b.json"))


def test_fixed_batch_onnx_runs_its_batch(run):
    # 50 images in batches of 4: the last batch is padded for the fixed-shape model and the padding dropped.
    rep = run_bench(run["dir"] / "student_b4.onnx", options=replace(FAST, max_val=50, batch_sizes=[4]))
    s = _result(rep, "student")
    assert s.status == "ok" and [b.batch for b in s.batches] == [4]
    from spofa_deploy.data.datasets import stratified_subset

    idx = stratified_subset(run["y"].numpy(), 50, seed=0)
    x, y = run["x"][idx], run["y"][idx]
    logits = torch.cat([_ort_logits(run["dir"] / "student_b4.onnx", x[i:i + 4]) for i in range(0, 48, 4)]
                       + [_torch_logits(run["student"], x[48:])])
    assert s.accuracy.n == 50 and s.accuracy.top1 == pytest.approx(_acc(logits, y)[0], abs=1e-9)


def _fake_tensorrt(monkeypatch, error: Exception):
    """A stand-in for `export.tensorrt.TrtEngine` on a machine without TensorRT or a GPU: it raises `error`."""
    import export.tensorrt.trt as trt_runner

    class TrtEngine:
        def __init__(self, engine, device=0):
            raise error

    monkeypatch.setattr(trt_runner, "cuda_skip_reason", lambda: None)  # pretend a GPU, so the engine path is taken
    monkeypatch.setattr(trt_runner, "TrtEngine", TrtEngine)


def test_engine_refused_by_trtrunner_is_a_user_error(run, tmp_path, monkeypatch):
    from spofa_deploy.errors import MissingDependency

    eng = tmp_path / "student.engine"
    eng.write_bytes(b"x")
    _sidecar(eng, run["smeta"], "fp16", fmt="trt", batch=(1, 4, 8))
    msg = "student.engine was built with TensorRT 10.3.0 but TensorRT 10.9.0 is installed"
    _fake_tensorrt(monkeypatch, UserError(msg))
    with pytest.raises(UserError, match=msg):
        run_bench(eng, options=ANY_DEVICE)
    # MissingDependency from the runner is a missing backend: skipped with that reason, not an error.
    _fake_tensorrt(monkeypatch, MissingDependency("no CUDA GPU is visible"))
    rep = run_bench(eng, options=ANY_DEVICE)
    s = _result(rep, "student")
    assert (s.status, s.reason) == ("skipped", "no CUDA GPU is visible")


# ----------------------------------------------------------------------------- several student files (--with)

def test_with_benches_student_files_side_by_side(run):
    """fp32 and INT8 ONNX of one student in one bench: a row each, the same images, agreement with the fp32 one."""
    from rich.console import Console

    from cli.bench_table import print_report

    d = run["dir"]
    rep = run_bench(d / "student.onnx", options=replace(FAST, backends=["ort-cpu"], others=[d / "student_int8.onnx"]))
    students = rep.students
    assert [Path(r.artifact).name for r in students] == ["student.onnx", "student_int8.onnx"]
    assert [r.precision for r in students] == ["fp32", "int8"] and len(rep.teachers) == 1
    fp32, int8 = students
    assert all(r.status == "ok" for r in rep.results)
    assert fp32.accuracy.n == int8.accuracy.n == len(run["y"])
    _, _, p32 = _acc(_ort_logits(d / "student.onnx", run["x"]), run["y"])
    q1, _, p8 = _acc(_ort_logits(d / "student_int8.onnx", run["x"]), run["y"])
    assert fp32.accuracy.agreement_fp32 == 100.0
    assert int8.accuracy.agreement_fp32 == pytest.approx(100.0 * float(np.mean(p8 == p32)), abs=1e-9)
    assert int8.accuracy.top1 == pytest.approx(q1, abs=1e-9)
    assert all(b.speedup_vs_teacher is not None for r in students for b in r.batches)  # both vs the teacher
    assert rep.settings["fp32_reference"] == str(d / "student.onnx")
    data = rep.to_dict()
    accs = {Path(r["artifact"]).name: r["accuracy"] for r in data["results"]}
    assert accs["student_int8.onnx"]["agreement_fp32"] == int8.accuracy.agreement_fp32
    assert "agreement_fp32" not in accs[Path(rep.teachers[0].artifact).name]
    console = Console(record=True, width=200)
    print_report(rep, console)
    text = console.export_text()
    assert "agree fp32" in text and "test_resnet student_int8.onnx" in text
    assert "note: agree fp32: top-1 agreement of each student with student.onnx" in text


def test_with_no_fp32_file_refers_to_the_weights(run):
    from export.bench.students import fp32_reference

    ref, note = fp32_reference([describe(run["dir"] / "student_int8.onnx")])
    assert ref.path == (run["dir"] / "student.safetensors").resolve() and ref.format == "torch"
    assert "PyTorch weights" in note


@pytest.mark.parametrize("case, match", [
    ("weights", r"comes from .*other\.safetensors"),
    ("classes", r"\(classes differ\)"),
    ("model", "another model"),
])
def test_with_a_file_of_another_model_is_refused(run, tmp_path, case, match):
    d = run["dir"]
    if case == "weights":
        shutil.copy(d / "student.safetensors", tmp_path / "other.safetensors")
        shutil.copy(d / "student.json", tmp_path / "other.json")
        other = _bad_copy(run, tmp_path, "other.onnx", source="other.safetensors")
    elif case == "classes":
        other = _bad_copy(run, tmp_path, "other.onnx", classes=[f"c{i}" for i in range(10)])
    else:
        other = d / "teacher.safetensors"
    with pytest.raises(UserError, match=match) as e:
        run_bench(d / "student.onnx", options=replace(FAST, others=[other]))
    assert "\n" not in str(e.value)


def test_cli_with_reaches_the_library(run, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    seen = {}
    monkeypatch.setattr("export.bench.run.run_bench", lambda artifact, **kw: seen.update(kw) or (_ for _ in ()).throw(KeyError))
    a, b = run["dir"] / "student_int8.onnx", run["dir"] / "student_b4.onnx"
    CliRunner().invoke(app, ["bench", str(run["dir"] / "student.onnx"), "--with", str(a), "--with", str(b)])
    assert [Path(p) for p in seen["options"].others] == [a, b]
    CliRunner().invoke(app, ["bench", str(run["dir"] / "student.onnx")])
    assert tuple(seen["options"].others) == ()


# ----------------------------------------------------------------------------- CLI

def test_cli_bench_prints_table_and_writes_json(run, tmp_path, monkeypatch, capsys):
    from cli import main as cli_main

    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "argv", ["spofa", "bench", str(run["dir"] / "student.onnx"), "--backend", "ort-cpu",
                                      "--batch", "2", "--min-s", "0.1", "--min-iters", "5", "--warmup-s", "0.02",
                                      "--rounds", "1", "--max-val", "40", "--threads", "1", "--device", "cpu",
                                      "--json", str(out)])
    cli_main.main()
    said = capsys.readouterr()
    text = said.out
    assert "spofa bench" in text and "ort-cpu" in text and "test_vit" in text
    assert "bench plan: student.onnx" in said.err and "batches: 2" in said.err  # the plan, shown before timing
    data = json.loads(out.read_text())
    assert data["settings"]["batch_sizes"] == [2] and data["data"]["val_size"] == 40


@pytest.mark.parametrize("args, match", [
    (["--batch", "1,x"], "--batch must be comma-separated integers"),
    (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
    (["--with", "{dir}/teacher.safetensors"], "--with teacher.safetensors is another model than student.onnx"),
])
def test_cli_bad_input_one_line_exit_2(run, monkeypatch, capsys, args, match):
    from cli import main as cli_main

    args = [a.format(dir=run["dir"]) for a in args]
    monkeypatch.setattr(sys, "argv", ["spofa", "bench", str(run["dir"] / "student.onnx"), *args])
    with pytest.raises(SystemExit) as e:
        cli_main.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_an_int8_teacher_of_another_quantizer_is_not_reused(run, tmp_path):
    """After a ModelOpt INT8 export, an ONNX Runtime INT8 student gets its teacher quantized the same way."""
    pytest.importorskip("modelopt.onnx.quantization", reason="NVIDIA ModelOpt is not installed")
    from export.bench.teacher import export_teacher, plan_like, settings_differ
    from export.exporter import export_model
    from export.options import ExportOptions, GateOptions, Int8Options

    d = tmp_path / "r"
    d.mkdir()
    for f in ("teacher.safetensors", "teacher.json", "student.safetensors", "student.json"):
        shutil.copy(run["dir"] / f, d / f)

    def int8(quantizer: str) -> ExportOptions:
        return ExportOptions("onnx", "int8", dynamic_batch=(1, 8, 16), gate=GateOptions(max_drop=0, samples=32),
                             int8=Int8Options(calib_samples=64, quantizer=quantizer))

    export_model(d / "teacher.safetensors", int8("modelopt"))
    student = describe(export_model(d / "student.safetensors", int8("ort")).path)
    cached = describe(d / "teacher.int8.onnx", role="teacher")
    assert "int8.quantizer modelopt != ort" in settings_differ(cached.meta, student.meta)

    step = plan_like(student, d / "teacher.safetensors")
    assert step.how == "export" and step.options.int8.quantizer == "ort" and step.options.out == d / "teacher.int8.onnx"
    assert any("int8.quantizer modelopt != ort" in n and "exported again" in n for n in step.notes)
    teacher = export_teacher(step)
    assert teacher.how == "exported" and teacher.artifact.meta["int8"]["quantizer"] == "ort"
    assert settings_differ(teacher.artifact.meta, student.meta) == []
    again = plan_like(student, d / "teacher.safetensors")
    assert again.how == "reused" and again.artifact.path == teacher.artifact.path
    assert any("(reused)" in n for n in again.notes)


def test_the_ort_cuda_run_options_turn_off_the_per_run_synchronisation() -> None:
    """ONNX Runtime synchronises its CUDA stream after every run by default, which would put the host's round trip
    inside each timed interval; the timed IOBinding run takes these options (that path runs only on a GPU)."""
    from export.onnx.ort import unsynchronised_run

    assert unsynchronised_run().get_run_config_entry("disable_synchronize_execution_providers") == "1"


def test_a_teacher_is_exported_like_a_qat_or_tf32_free_student() -> None:
    """TensorRT's TF32 and workspace are carried to the teacher's export and compared; a QAT student's teacher gets
    post-training INT8 (a teacher is not fine-tuned), and its reuse is not refused for the quantizer's name."""
    from export.artifact import Artifact
    from export.bench.teacher import options_like, settings_differ

    meta = {"model": "m", "img_size": 32, "num_classes": 10, "batch": {"min": 1, "opt": 16, "max": 256, "dynamic": True},
            "tf32": False, "workspace_gib": 2.0, "strongly_typed": True,
            "int8": {"quantizer": "qat", "calib_samples": 256, "excluded_nodes": ["a", "b"]}}
    student = Artifact(path=Path("student.int8.engine"), format="trt", meta=meta, precision="int8", size_bytes=1,
                       batch_range=(1, 256))
    o = options_like(student, Path("teacher.int8.engine"))
    assert (o.int8.quantizer, o.int8.calib_samples, o.trt.tf32, o.trt.workspace_gib) == ("auto", 256, False, 2.0)
    cached = {**meta, "tf32": True, "int8": {"quantizer": "modelopt", "calib_samples": 256, "excluded_nodes": ["a"]}}
    assert settings_differ(cached, meta) == ["tf32 True != False"]


def test_a_variant_that_fails_at_one_batch_keeps_its_other_batches_accuracy_and_speed_ups() -> None:
    """E.g. a ViT teacher out of GPU memory at the large batch: its batch-1 timing, its accuracy and the batch-1
    speed-up stay; the failed batch is reported on its own. A variant that runs at no batch has failed."""
    import torch

    from export.bench.loop import bench_runners
    from export.bench.report import BenchReport, VariantResult
    from export.bench.timing import TimingOptions
    from export.bench.variants import Candidate
    from export.runner import Runner, TimedStep
    from cli.bench_table import report_reasons

    class Linear(Runner):
        def __init__(self, name: str, fails_at: set[int]):
            super().__init__(name=name, backend="torch-eager", precision="fp32", device="cpu", size_bytes=1,
                             input_shape=(1, 2, 2))
            self.fails_at, self.net = fails_at, torch.nn.Linear(4, 3)

        def _load(self):
            pass

        def _prepare(self, batch):
            if batch in self.fails_at:
                raise RuntimeError("CUDA out of memory")
            x = self.timed_input(batch)
            return TimedStep(compute=lambda: self.net(x.flatten(1)))

        def _infer(self, x):
            return self.net(x.flatten(1)).detach()

    val = [(torch.randn(1, 2, 2), i % 3) for i in range(6)]

    def cand(role, runner, teacher=None):
        r = VariantResult(key=f"{role}:{runner.name}", role=role, model=runner.name, backend="torch-eager",
                          backend_requested="torch-eager", precision="fp32", device="cpu", artifact=None, size_bytes=1,
                          teacher=teacher)
        return Candidate(r, runner, val)

    student, teacher, broken = (cand("student", Linear("s", set()), "teacher:t"), cand("teacher", Linear("t", {4}), None),
                                cand("student", Linear("b", {1, 4}), "teacher:t"))
    results = bench_runners([student, teacher, broken], batch_sizes=[1, 4],
                            timing=TimingOptions(warmup_s=0, min_s=0, min_iters=2, rounds=2), progress=False)
    s, t, b = results
    assert t.status == "ok" and [x.batch for x in t.batches] == [1] and t.batch_failures == {4: "prepare: RuntimeError: CUDA out of memory"}
    assert t.accuracy is not None and s.accuracy.teacher_top1 == t.accuracy.top1
    assert s.batch(1).speedup_vs_teacher is not None and s.batch(4).speedup_vs_teacher is None
    assert b.status == "failed" and b.reason.startswith("at batch 1: prepare: RuntimeError") and b.accuracy is None
    report = BenchReport(results=results, settings={}, machine={})
    assert "failed at batch 4: teacher t torch-eager fp32: prepare: RuntimeError: CUDA out of memory" in report_reasons(report)
    assert t.to_dict()["batch_failures"] == {"4": "prepare: RuntimeError: CUDA out of memory"}
