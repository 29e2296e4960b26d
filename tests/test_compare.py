"""`spofa compare`: stability figures on synthetic traces, aggregation, and a tiny real compare
(test_vit teacher -> test_resnet student, 16 px, 1 epoch) with resume and a diverged run."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from spofa_deploy.compare import run as cmp
from spofa_deploy.compare import plan, report, stats
from spofa_deploy.teacher import stage
from spofa_deploy.train import plots
from spofa_deploy.train.hooks import Hooks
from spofa_deploy.machine import cpu_isa
from spofa_deploy.errors import TrainingDiverged, UserError
from spofa_deploy.run_files import COMPARE, DONE
from spofa_deploy.train.stability import (accuracy_figures, divergence, loss_spikes, read_metrics, read_trace, stability,
                                    tail_variance)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------------
# Stability figures on synthetic traces (pure functions)

def _write_trace(path: Path, rows: list[dict]) -> None:
    keys = list(rows[0])
    path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))


def test_loss_spikes_known_positions() -> None:
    # Flat 1.0 with spikes at 10 (5.0 > 3 x 1) and 30 (3.5); 20 (2.9) and 40 (exactly 3.0) are not spikes.
    losses = [1.0] * 50
    losses[10], losses[20], losses[30], losses[40] = 5.0, 2.9, 3.5, 3.0
    assert loss_spikes(losses) == [10, 30]
    # No median yet in the first 3 logged steps: a huge value at index 2 is not a spike, at 3 it is.
    assert loss_spikes([1.0, 1.0, 100.0, 1.0, 1.0, 1.0]) == []
    assert loss_spikes([1.0, 1.0, 1.0, 100.0, 1.0, 1.0]) == [3]
    # A warm-up blow-up 5 -> 93 (measured: mobilenetv3 at lr 0.05): the median follows it up, one spike.
    assert loss_spikes([5.0, 14.6, 58.8, 76.0, 92.9, 68.1, 72.9, 52.1, 19.5]) == [3]
    # A slow rise (10% per logged step) never triples its running median.
    assert loss_spikes([1.1 ** i for i in range(40)]) == []
    # A level shift 1 -> 10 is a spike until 10s fill half of the 20-step window (10 steps);
    # then a 25 is not a spike (median 10), although it is 25x the first losses.
    windowed = [1.0] * 10 + [10.0] * 20 + [25.0]
    assert loss_spikes(windowed) == list(range(10, 20))
    assert loss_spikes([1.0] * 30 + [10.0] * 20 + [25.0], window=40) == list(range(30, 50)) + [50]
    # Non-finite values are divergence, not spikes, and do not enter the median.
    assert loss_spikes([1.0] * 6 + [math.nan, math.inf, 4.0]) == [8]


def test_tail_variance() -> None:
    values = [10.0] * 12 + [1.0, 3.0, 1.0, 3.0]  # last 25% of 16 = 4 values: population variance 1
    assert tail_variance(values) == pytest.approx(1.0)
    assert tail_variance([5.0] * 7 + [1.0, 2.0, 3.0]) == pytest.approx(2 / 3)  # ceil(2.5) = 3 values
    assert tail_variance([1.0]) is None
    assert tail_variance([1.0, math.nan, math.nan]) is None  # fewer than 2 finite values
    assert tail_variance(None) is None


def test_stability_of_a_synthetic_run(tmp_path: Path) -> None:
    rows = []
    for step in range(1, 41):
        loss = 2.0 if step not in (12, 25) else 9.0
        rows.append({"step": step * 10, "epoch": 1 + step // 20, "lr": 0.01, "loss": loss,
                     "loss_gt": 6.0 if step == 30 else 1.0 + (step % 2) * 0.5,
                     "grad_cos_mean": 0.25 if step % 2 else -0.05})
    _write_trace(tmp_path / "trace.csv", rows)
    metrics = [{"epoch": 1, "step": 200, "val_top1": 60.0, "ema_top1": 55.0, "val_top5": 90.0, "seconds": 2.0,
                "img_per_s": 100.0},
               {"epoch": 2, "step": 400, "val_top1": 50.0, "ema_top1": 65.0, "val_top5": 91.0, "seconds": 3.0,
                "img_per_s": 200.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    trace, recs = read_trace(tmp_path / "trace.csv"), read_metrics(tmp_path / "metrics.jsonl")
    s = stability(trace, recs, num_classes=10)
    assert s["logged_steps"] == 40
    assert s["loss_spikes"] == 2 and s["spike_steps"] == [120, 250]
    assert s["diverged"] is False and s["divergence"] == [] and s["nonfinite_events"] == 0
    assert s["ce_spikes"] == 1 and s["ce_spike_steps"] == [300]  # the CE term has its own spike
    assert s["loss_peak_ratio"] == pytest.approx(4.5)  # 9 / 2
    assert s["ce_peak_ratio"] == pytest.approx(4.0)  # 6 / 1.5
    assert s["loss_var_tail"] == pytest.approx(0.0)  # last 10 rows are all 2.0
    assert s["ce_var_tail"] == pytest.approx(0.0625)  # alternating 1.0 / 1.5
    assert s["grad_cos_mean"] == pytest.approx(0.1)
    assert s["chance_top1"] == pytest.approx(10.0)

    a = accuracy_figures(recs)
    assert (a["final_top1"], a["best_top1"], a["best_epoch"]) == (50.0, 60.0, 1)
    assert (a["final_ema_top1"], a["best_ema_top1"], a["best_ema_epoch"]) == (65.0, 65.0, 2)
    assert a["train_s"] == pytest.approx(5.0) and a["img_per_s"] == pytest.approx(800.0 / 5.0)

    # Method `none` has no grad_cos_mean column; a trace without loss_gt has no CE figures.
    assert stability([{k: v for k, v in r.items() if k != "grad_cos_mean"} for r in trace], recs, 10)["grad_cos_mean"] is None
    bare = stability([{k: v for k, v in r.items() if k != "loss_gt"} for r in trace], recs, 10)
    assert bare["ce_spikes"] is None and bare["ce_peak_ratio"] is None and bare["ce_var_tail"] is None


def test_divergence_reasons() -> None:
    ok = [{"step": float(i), "loss": 1.0} for i in range(1, 10)]
    good = [{"epoch": 1, "val_top1": 80.0, "ema_top1": 80.0}]
    assert divergence(ok, good, 10) == []
    # A non-finite event in metrics.jsonl (trainer with --on-nan skip), a NaN in the trace, or a stopped run.
    assert divergence(ok, good + [{"event": "nonfinite", "step": 3, "epoch": 0, "loss": "nan"}], 10) == ["nonfinite"]
    assert divergence(ok + [{"step": 10.0, "loss": math.inf}], good, 10) == ["nonfinite"]
    assert divergence(ok, good, 10, stopped=True) == ["nonfinite"]
    # Collapse to chance: final top-1 <= 100 / C + 2 (the final epoch counts, not the best).
    assert divergence(ok, [{"epoch": 1, "val_top1": 90.0}, {"epoch": 2, "val_top1": 12.0}], 10) == ["collapse"]
    assert divergence(ok, [{"epoch": 1, "val_top1": 12.1}], 10) == []
    assert divergence(ok, [{"epoch": 1, "val_top1": 3.0}], 100) == ["collapse"]
    assert divergence(ok, [{"epoch": 1, "val_top1": 3.5}], 100) == []
    both = divergence(ok, [{"epoch": 1, "val_top1": 10.0}], 10, stopped=True)
    assert both == ["nonfinite", "collapse"]
    # Without any finished epoch there is no accuracy to collapse.
    assert accuracy_figures([{"event": "nonfinite", "step": 0}])["final_top1"] is None


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and parsing

def _rec(method: str, lr: float, seed: int, top1: float | None, status: str = "finished", spikes: int = 0,
         reasons: tuple = ()) -> dict:
    return {"name": cmp.run_name(method, lr, seed), "method": method, "lr": lr, "seed": seed, "status": status,
            "final_top1": top1, "best_top1": top1, "final_ema_top1": top1, "best_ema_top1": top1, "wall_s": 10.0,
            "img_per_s": 100.0, "stability": {"diverged": bool(reasons), "divergence": list(reasons), "loss_spikes": spikes,
                                              "loss_peak_ratio": 2.0,
                                              "loss_var_tail": 0.5, "ce_var_tail": 0.1, "grad_cos_mean": None}}


def test_summarize_mean_std_and_diverged_runs() -> None:
    runs = [_rec("kd", 0.01, 0, 80.0), _rec("kd", 0.01, 1, 90.0), _rec("kd", 0.01, 2, 70.0, spikes=3),
            _rec("kd", 0.1, 0, 40.0), _rec("kd", 0.1, 1, 60.0, "stopped", 2, ("nonfinite",)),
            _rec("kd", 0.1, 2, 10.0, reasons=("collapse",))]
    s = stats.summarize(runs, ["kd"], [0.01, 0.1])
    lo, hi = s["per_method_lr"]
    assert lo["final_top1"]["mean"] == pytest.approx(80.0) and lo["final_top1"]["std"] == pytest.approx(10.0)
    assert lo["loss_spikes"]["mean"] == pytest.approx(1.0) and lo["diverged"] == 0
    # The stopped run is counted as diverged and, with the top-1 of its last evaluated epoch (60), in the
    # accuracy mean: a method is not averaged over its surviving runs only. The collapsed one's 10% is in too.
    assert (hi["runs"], hi["finished"], hi["stopped"], hi["diverged"], hi["nonfinite"], hi["collapsed"]) == (3, 2, 1, 2, 1, 1)
    assert hi["final_top1"]["mean"] == pytest.approx(110 / 3) and hi["final_top1"]["n"] == 3
    assert hi["loss_var_tail"]["n"] == 2  # tail variances: only runs that trained to the end
    assert hi["loss_spikes"]["mean"] == pytest.approx(2 / 3)  # spikes count for every run
    pooled = s["per_method"][0]
    assert pooled["runs"] == 6 and pooled["diverged"] == 2 and pooled["loss_spikes_total"] == 5
    assert pooled["worst_lr"] == 0.1 and pooled["worst_lr_final_top1"] == pytest.approx(110 / 3)
    one = stats.summarize([_rec("none", 0.01, 0, 50.0)], ["none"], [0.01])["per_method_lr"][0]
    assert one["final_top1"]["std"] is None  # one seed: no spread to report


def test_paired_statistics_on_a_hand_computed_example() -> None:
    """Three seeds, differences 2, 4, 6: mean 4, sd 2, t(0.975, 2) = 4.302653, half-width 4.302653 * 2 / sqrt(3)."""
    runs = [_rec("spofa", 0.01, s, v) for s, v in ((0, 82.0), (1, 84.0), (2, 86.0))]
    runs += [_rec("none", 0.01, s, 80.0) for s in range(3)] + [_rec("none", 0.1, s, 90.0 + s) for s in range(3)]
    p = stats.paired_difference(runs, "spofa", "none", 0.01, 0.01)
    half = 4.302653 * 2.0 / math.sqrt(3)
    assert p["diffs"] == [2.0, 4.0, 6.0] and p["mean"] == pytest.approx(4.0)
    assert p["ci95"] == pytest.approx([4.0 - half, 4.0 + half], abs=1e-5)
    assert p["significant"] is False  # the interval [-0.97, 8.97] holds zero: three seeds are not enough here
    for r, v in zip(runs[:3], (83.0, 83.0, 85.0)):  # differences 3, 3, 5
        r["final_top1"] = v
    p = stats.paired_difference(runs, "spofa", "none", 0.01, 0.01)
    assert p["diffs"] == [3.0, 3.0, 5.0] and p["significant"] is True  # mean 3.67, half-width 2.87
    # At each method's own best rate: none is best at 0.1 (91 on average), spofa at 0.01.
    best = stats.best_rates(stats.summarize(runs, ["spofa", "none"], [0.01, 0.1])["per_method_lr"])
    assert best == {"spofa": 0.01, "none": 0.1}
    (at_best,) = [c for c in stats.paired_comparisons(runs, ["none", "spofa"], [0.01, 0.1], best)
                  if c["at"] == "best rates"]
    assert at_best["diffs"] == [83.0 - 90.0, 83.0 - 91.0, 85.0 - 92.0] and at_best["significant"] is True
    # A seed without a figure on either side does not count.
    runs.append(_rec("spofa", 0.1, 0, None, "stopped", reasons=("nonfinite",)))
    assert stats.paired_difference(runs, "spofa", "none", 0.1, 0.1)["n"] == 0


def test_best_rates_and_decisions_are_read_over_the_complete_seeds_only() -> None:
    """A half-done seed (some methods or rates still missing) must not tip a best rate or a pairing: every method
    and rate is averaged over the same seeds. The per-rate tables still show every run."""
    cfg = cmp.CompareConfig(methods=("none", "spofa"), lrs=(0.01, 0.1), seeds=2, device="cpu")
    runs = [_rec(m, lr, 0, {0.01: 80.0, 0.1: 70.0}[lr]) for m in ("none", "spofa") for lr in (0.01, 0.1)]
    runs += [_rec("none", 0.1, 1, 99.0)]  # seed 1: one run of four so far, far above the rest
    header = {"config": {"epochs": 1, "lrs": [0.01, 0.1]}, "img_size": 16, "teacher_path": "t", "started": "now"}
    rep = report.build_report(cfg, header, {"num_classes": 10}, {"model": "t", "top1": 90.0}, runs, wall_s=1.0)
    assert rep["seeds_complete"] == [0] and rep["best_rates"] == {"none": 0.01, "spofa": 0.01}
    assert all(p["seeds"] == [0] for p in rep["paired"])
    assert next(g for g in rep["per_method_lr"] if (g["method"], g["lr"]) == ("none", 0.1))["runs"] == 2
    assert rep["bracketing"]["at_end"] == {"none": "lowest", "spofa": "lowest"} and rep["transfer_note"] is None
    # A teacher below the student alone: the note's advice names what spofa compare takes.
    weak = report.build_report(cfg, header, {"num_classes": 10}, {"model": "t", "top1": 75.0}, runs, wall_s=1.0)["transfer_note"]
    assert "is not above the student trained alone" in weak and "--teacher-ckpt (e.g. from `spofa teacher" in weak
    assert "--teacher-weights FILE)" not in weak
    # No seed complete yet: every run is an interim look.
    interim = report.build_report(cfg, header, {"num_classes": 10}, {"model": "t", "top1": 90.0}, runs[4:], wall_s=1.0)
    assert interim["seeds_complete"] == [] and interim["best_rates"]["none"] == 0.1


def test_the_terminal_ends_with_the_rules_and_the_command_that_brackets_an_optimum(monkeypatch, tmp_path: Path) -> None:
    """`spofa compare` prints the pre-registered rules as report.md reads them, and where a best rate is an end
    of the sweep, the command that extends it: the saved rates with the added one, ready to paste."""
    import typer
    from typer.testing import CliRunner

    from cli.cmd_compare import compare

    cfg = cmp.CompareConfig(methods=("none", "kd", "spofa"), lrs=(0.01, 0.04), seeds=5, device="cpu",
                            out="runs/my compare")
    top1 = {("none", 0.01): 90.0, ("none", 0.04): 80.0, ("kd", 0.01): 92.0, ("kd", 0.04): 93.5,
            ("spofa", 0.01): 94.0, ("spofa", 0.04): 91.0}
    runs = [_rec(m, lr, s, v + (s % 2) * 0.5 - (m == "kd") * (s % 3) * 0.1) for (m, lr), v in top1.items()
            for s in range(5)]
    header = {"config": {"epochs": 1, "lrs": [0.01, 0.04], "out": cfg.out}, "img_size": 16, "teacher_path": "t",
              "started": "now"}
    rep = report.build_report(cfg, header, {"num_classes": 10, "train_images": 144}, {"model": "t", "top1": 99.0}, runs,
                              wall_s=1.0)
    assert rep["bracketing"] == {"at_end": {"none": "lowest", "kd": "highest", "spofa": "lowest"},
                                 "extend": [0.005, 0.08]}
    command = "spofa compare --resume --out 'runs/my compare' --lr-sweep 0.005,0.01,0.04,0.08"
    assert any(command in line for line in report.reading_lines(rep))
    app = typer.Typer()
    app.command("compare")(compare)
    app.command("noop")(lambda: None)
    monkeypatch.setattr(cmp, "run_compare", lambda *a, **k: cmp.CompareResult(tmp_path, rep, 0, 30))
    monkeypatch.setenv("COLUMNS", "200")
    r = CliRunner().invoke(app, ["compare"])
    assert r.exit_code == 0, r.output
    gate = next(d for d in rep["decisions"] if d["kind"] == "gate")
    assert gate["holds"] is True and gate["n"] == 5 and gate["mean"] > 3
    assert f"{gate['mean']:+.2f} [{gate['ci95'][0]:+.2f}, {gate['ci95'][1]:+.2f}]" in r.output
    assert "0.04 vs 0.01" in r.output and command in " ".join(r.output.split())
    primary = next(d for d in rep["decisions"] if d["kind"] == "primary")
    assert primary["holds"] is None and primary["comparison"] == "spofa - none"
    assert "primary" in r.output and "not read" in r.output


def test_a_sweep_that_names_a_rate_twice_is_refused() -> None:
    for lrs in [(0.01, 0.01), (0.1, 1e-1), (0.01, 0.02, 0.0100000001)]:
        with pytest.raises(UserError, match="names a rate twice"):
            cmp.CompareConfig(lrs=lrs).validate()


def test_paired_comparisons_pair_each_method_with_its_baselines() -> None:
    """Every method against the student alone; feature methods against OFA; SPOFA's variants against SPOFA."""
    methods = cmp.parse_methods("none,kd,ofa,spofa", ablations=True)
    runs = [_rec(m, 0.01, s, 80.0 + s) for m in methods for s in range(2)]
    pairs = {(c["method"], c["baseline"]) for c in stats.paired_comparisons(runs, methods, [0.01], {m: 0.01 for m in methods})}
    variants = {m for m in methods if m.startswith("spofa-")}
    assert variants == {"spofa-nomema", "spofa-nobeta", "spofa-damp", "spofa-m0.9"}
    assert pairs == ({(m, "none") for m in methods if m != "none"} | {(m, "ofa") for m in variants | {"spofa"}}
                     | {(m, "spofa") for m in variants})


def test_parse_methods_and_rates() -> None:
    assert cmp.parse_methods("none, kd,KD,spofa") == ["none", "kd", "spofa"]
    assert cmp.parse_methods("spofa-noln") == ["ofa"]
    assert cmp.parse_methods("none", ablations=True) == ["none", "spofa", "spofa-nomema", "spofa-nobeta", "spofa-damp",
                                                         "spofa-m0.9", "ofa"]
    with pytest.raises(UserError, match="unknown method"):
        cmp.parse_methods("none,fancy")
    # The ablations switch the right DistillConfig fields, and only those.
    cfg = cmp.CompareConfig()
    assert cmp._loss_config(cfg, "spofa-nomema").mema is False and cmp._loss_config(cfg, "spofa-nomema").sample_weights
    assert cmp._loss_config(cfg, "spofa-nobeta").sample_weights is False and cmp._loss_config(cfg, "spofa-nobeta").mema
    assert cmp._loss_config(cfg, "spofa-nomema").method == "spofa" and cmp._loss_config(cfg, "ofa").method == "ofa"
    damp, fast, paper = (cmp._loss_config(cfg, m) for m in ("spofa-damp", "spofa-m0.9", "spofa"))
    assert (damp.alpha_max, damp.momentum, fast.alpha_max, fast.momentum) == (1.0, 0.99, 2.0, 0.9)
    assert (paper.alpha_max, paper.momentum) == (2.0, 0.99)  # the paper's formula stays the default


def test_eta_from_finished_runs() -> None:
    done = {"a": {"method": "none", "wall_s": 10.0}, "b": {"method": "spofa", "wall_s": 30.0},
            "c": {"method": "spofa", "wall_s": 50.0}}
    # Remaining: one none (10), two spofa (mean 40 each), one kd (no finished kd yet: mean of all, 30).
    remaining = [("none", 0.1, 1), ("spofa", 0.1, 1), ("spofa", 0.1, 2), ("kd", 0.1, 1)]
    assert cmp._eta(done, remaining) == pytest.approx(10 + 40 + 40 + 30)
    assert cmp._eta({}, remaining) is None
    assert [report.fmt_secs(s) for s in (42, 125, 3725, None)] == ["42s", "2m05s", "1h02m", "?"]


# ---------------------------------------------------------------------------------------------------------------------
# A tiny real compare

def _tiny(out: Path, **kw) -> cmp.CompareConfig:
    base = dict(teacher="test_vit", student="test_resnet", data="digits", methods=("none", "spofa"), seeds=1,
                lrs=(0.01,), epochs=1, batch_size=32, img_size=16, train_fraction=0.05, teacher_epochs=1,
                teacher_pretrained=False, device="cpu", workers=0, out=str(out))
    return cmp.CompareConfig(**{**base, **kw})


class Counter:
    """Wraps a function, counting calls and remembering their keyword arguments."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    cwd = os.getcwd()
    os.chdir(root)  # the shared teacher goes to ./runs/teachers
    mp = pytest.MonkeyPatch()
    teacher_calls, distill_calls = Counter(stage.train_teacher), Counter(cmp.distill)
    mp.setattr(stage, "train_teacher", teacher_calls)
    mp.setattr(cmp, "distill", distill_calls)
    try:
        result = cmp.run_compare(_tiny(root / "runs" / "cmp"))
    finally:
        mp.undo()
        os.chdir(cwd)
    return root, result, teacher_calls, distill_calls


def test_tiny_compare_writes_the_report(tiny_compare) -> None:
    root, result, teacher_calls, distill_calls = tiny_compare
    out = result.out if result.out.is_absolute() else root / result.out
    # One teacher, trained once, passed to every run as the same checkpoint.
    assert len(teacher_calls.calls) == 1
    assert len(distill_calls.calls) == 2 and result.runs_done == 2 and result.runs_skipped == 0
    ckpts = {c[1]["teacher"].checkpoint for c in distill_calls.calls}
    assert len(ckpts) == 1 and next(iter(ckpts)).endswith("teacher.safetensors")
    # Same schedule and seed for both methods; only the loss differs.
    trains = [c[1]["train"] for c in distill_calls.calls]
    assert trains[0] == trains[1] and trains[0].log_every == 1 and trains[0].lr == 0.01
    assert [c[1]["method"] for c in distill_calls.calls] == ["none", "spofa"]
    # Compare runs stay out of runs/latest (what `spofa export` and `spofa distill --resume` pick up).
    assert all(c[1]["latest"] is False for c in distill_calls.calls)
    assert not (root / "runs" / "latest").exists() and not (out / "latest").exists()

    rep = json.loads((out / "report.json").read_text())
    assert rep == json.loads(json.dumps(result.report, default=str))
    assert rep["complete"] is True and rep["seeds"] == [0]
    for key in ("title", "config", "teacher", "data", "machine", "versions", "wall_s", "definitions", "per_method",
                "per_method_lr", "runs", "plots"):
        assert key in rep, key
    assert rep["data"]["num_classes"] == 10 and rep["data"]["train_images"] == 72
    assert rep["runs_ran_on"] == {f"cpu, {cpu_isa()} kernels, {torch.get_num_threads()} thread"
                                  f"{'s' * (torch.get_num_threads() != 1)}": 2} and rep["machine"]["cpu_isa"] == cpu_isa()
    assert rep["teacher"]["top1"] is not None and Path(rep["teacher"]["path"]).name == "teacher.safetensors"
    assert [r["name"] for r in rep["runs"]] == ["none-lr0.01-seed0", "spofa-lr0.01-seed0"]
    for r in rep["runs"]:
        for key in ("final_top1", "best_top1", "final_ema_top1", "best_ema_top1", "wall_s", "img_per_s", "train_s"):
            assert isinstance(r[key], float) and r[key] >= 0, (r["name"], key)
        assert r["status"] == "finished" and r["epochs_run"] == 1
        st = r["stability"]
        for key in ("loss_spikes", "spike_steps", "ce_spikes", "diverged", "divergence", "nonfinite_events",
                    "loss_peak_ratio", "ce_peak_ratio", "loss_var_tail",
                    "ce_var_tail", "grad_cos_mean", "logged_steps"):
            assert key in st, key
        assert st["logged_steps"] == 3  # 72 images / batch 32, every step logged
        assert st["loss_var_tail"] is not None and st["ce_var_tail"] is not None
        # done.json holds the same record.
        assert json.loads((out / r["name"] / DONE).read_text()) == r
    none, spofa = rep["runs"]
    assert none["stability"]["grad_cos_mean"] is None and isinstance(spofa["stability"]["grad_cos_mean"], float)
    for table in ("per_method", "per_method_lr"):
        assert [g["method"] for g in rep[table]] == ["none", "spofa"]
        for g in rep[table]:
            for key in ("final_top1", "best_top1", "final_ema_top1", "best_ema_top1", "loss_spikes", "ce_spikes",
                        "loss_peak_ratio", "ce_peak_ratio", "loss_var_tail",
                        "ce_var_tail", "grad_cos_mean", "wall_s", "img_per_s"):
                assert set(g[key]) == {"n", "mean", "std", "min", "max"}, key
            assert g["runs"] == 1 and g["final_top1"]["n"] == 1
    assert rep["per_method_lr"][0]["lr"] == 0.01

    md = (out / "report.md").read_text()
    assert "## Per method and learning rate" in md and "| none | 0.01 | 1 |" in md and "| spofa | 0.01 | 1 |" in md
    assert "spofa-lr0.01-seed0" in md and "loss_spike" in md
    assert rep["plots"] == [plots.PLOT_TOP1, plots.PLOT_LOSS, plots.PLOT_MEMA, plots.PLOT_PAIRED]
    assert rep["best_rates"] == {"none": 0.01, "spofa": 0.01} and [g["method"] for g in rep["at_best_rate"]] == ["none", "spofa"]
    (p,) = [p for p in rep["paired"] if p["at"] == "best rates"]
    assert (p["method"], p["baseline"], p["n"], p["ci95"]) == ("spofa", "none", 1, None)  # one seed: no interval
    assert "## Each method at its own best rate" in md and "## Paired differences" in md
    for name in rep["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        assert f"({name})" in md


def test_resume_skips_finished_runs(tiny_compare, monkeypatch) -> None:
    from spofa_deploy.pipeline import distill

    root, *_ = tiny_compare
    monkeypatch.chdir(root)
    out = Path("runs") / "cmp"
    # A finished compare, started again without --resume: refused, nothing trained.
    never = Counter(lambda *a, **k: pytest.fail("distill must not run"))
    monkeypatch.setattr(cmp, "distill", never)
    with pytest.raises(UserError, match="--resume"):
        cmp.run_compare(_tiny(out))
    # With resume: every run is finished, so no distill call at all.
    again = cmp.run_compare(_tiny(out), resume=True)
    assert never.calls == [] and again.runs_done == 0 and again.runs_skipped == 2
    # Settings that change the numbers must match the saved ones.
    with pytest.raises(UserError, match="epochs"):
        cmp.run_compare(_tiny(out, epochs=2), resume=True)
    # A run interrupted after its checkpoint (no done.json) is resumed from it; the other is skipped.
    mtime = (out / "none-lr0.01-seed0" / DONE).stat().st_mtime_ns
    (out / "spofa-lr0.01-seed0" / DONE).unlink()
    real = Counter(distill)
    monkeypatch.setattr(cmp, "distill", real)
    third = cmp.run_compare(_tiny(out), resume=True)
    assert len(real.calls) == 1 and third.runs_done == 1 and third.runs_skipped == 1
    args, kwargs = real.calls[0]
    assert kwargs["method"] == "spofa" and kwargs["resume"] is True and Path(kwargs["out"]).name == "spofa-lr0.01-seed0"
    assert (out / "none-lr0.01-seed0" / DONE).stat().st_mtime_ns == mtime
    rec = json.loads((out / "spofa-lr0.01-seed0" / DONE).read_text())
    assert rec["resumed"] is True and rec["epochs_run"] == 1 and rec["status"] == "finished"
    assert rec["wall_s"] >= rec["train_s"] > 0  # the epochs of its earlier session count in its wall time
    assert third.report["complete"] and len(third.report["runs"]) == 2
    # resume_config reads the saved settings back (what `spofa compare --resume --out DIR` uses).
    cfg = plan.resume_config(out, device="cpu")
    assert (cfg.student, cfg.img_size, cfg.methods, cfg.lrs) == ("test_resnet", 16, ("none", "spofa"), (0.01,))


def test_a_compare_copied_without_weights_resumes_on_a_fresh_machine(tmp_path: Path, monkeypatch) -> None:
    """A compare copied without weights, checkpoints and teacher cache (what fits in a repository) resumes where
    no teacher is: the teacher is retrained by the recipe and used only if its weights digest is the saved one."""
    import shutil

    monkeypatch.chdir(tmp_path)
    base = dict(methods=("none", "kd"), lrs=(0.01,), seeds=1, epochs=1)
    first = cmp.run_compare(_tiny(tmp_path / "a", **base))
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("*.safetensors", "*.pt", cmp.TEACHER_CACHE))
    shutil.rmtree(tmp_path / "runs" / "teachers")  # the fresh machine
    saved = json.loads((tmp_path / "b" / COMPARE).read_text())
    assert not Path(saved["teacher_path"]).exists() and len(saved["teacher_sha256"]) == 64
    assert saved["cpu_isa"] == cpu_isa() and saved["teacher"]["model"] == "test_vit"  # (its record: see below)
    assert {r["cpu_isa"] for r in first.report["runs"]} == {cpu_isa()}
    retrained = Counter(stage.train_teacher)
    monkeypatch.setattr(stage, "train_teacher", retrained)
    more = cmp.run_compare(_tiny(tmp_path / "b", **{**base, "seeds": 2}), resume=True)
    assert len(retrained.calls) == 1 and more.runs_skipped == 2 and more.runs_done == 2
    old = {r["name"]: r for r in first.report["runs"]}
    for r in more.report["runs"][:2]:  # the copied records, read back without the students' weights
        assert (r["final_top1"], r["saved_top1"]) == (old[r["name"]]["final_top1"], old[r["name"]]["saved_top1"])
    assert json.loads((tmp_path / "b" / COMPARE).read_text())["teacher_sha256"] == saved["teacher_sha256"]
    # On another kind of CPU (its kernels another instruction set) a missing teacher is not retrained: it would be
    # another teacher, refused by its digest after the whole stage; the refusal comes at once and says why.
    shutil.rmtree(tmp_path / "runs" / "teachers")
    header = (tmp_path / "b" / COMPARE).read_text()
    monkeypatch.setattr(plan, "cpu_isa", lambda: "OTHER")
    monkeypatch.setattr(stage, "train_teacher", lambda **k: pytest.fail("no teacher stage"))
    kernels = f"this CPU's kernels are OTHER, the compare started with {saved['cpu_isa']} CPU kernels"
    with pytest.raises(UserError, match=f"missing and retrained here it would be another teacher: {kernels}"):
        cmp.run_compare(_tiny(tmp_path / "b", **{**base, "seeds": 3}), resume=True)
    # Another teacher (here: trained longer) is refused, before any run; found on another kind of CPU, the
    # refusal names the kernels.
    monkeypatch.setattr(plan, "cpu_isa", cpu_isa)
    monkeypatch.setattr(stage, "train_teacher", retrained)
    with pytest.raises(UserError, match=r"teacher_sha256\)\. Pass its teacher"):
        cmp.run_compare(_tiny(tmp_path / "b", **{**base, "seeds": 3, "teacher_epochs": 2}), resume=True)
    monkeypatch.setattr(plan, "cpu_isa", lambda: "OTHER")
    with pytest.raises(UserError, match=f"teacher_sha256\\): {kernels}"):
        cmp.run_compare(_tiny(tmp_path / "b", **{**base, "seeds": 3, "teacher_epochs": 2}), resume=True)
    assert not list((tmp_path / "b").glob("*-seed2")) and (tmp_path / "b" / COMPARE).read_text() == header
    # Every run of the plan finished: the report needs the teacher's record in compare.json, not its weights: no
    # teacher stage although the teacher is missing on "another kind of CPU" (which refuses a compare with runs
    # left, above), and a --teacher-ckpt given is not used nor recorded. A compare from before compare.json kept
    # that record reads it from its report.json; with neither, the teacher is found or retrained as before.
    shutil.rmtree(tmp_path / "runs" / "teachers")
    monkeypatch.setattr(stage, "train_teacher", lambda **k: pytest.fail("no teacher stage"))
    for legacy in (False, True):
        if legacy:
            (tmp_path / "b" / COMPARE).write_text(json.dumps({k: v for k, v in json.loads(header).items() if k != "teacher"}))
        again = cmp.run_compare(_tiny(tmp_path / "b", **{**base, "seeds": 2, "teacher_ckpt": "nowhere.safetensors"}),
                                resume=True)
        assert again.runs_done == 0 and again.runs_skipped == 4 and again.report["complete"]
        assert again.report["teacher"] == more.report["teacher"] and again.report["teacher"]["top1"] is not None
        assert [r["final_top1"] for r in again.report["runs"]] == [r["final_top1"] for r in more.report["runs"]]
        written = json.loads((tmp_path / "b" / COMPARE).read_text())
        assert written["config"]["teacher_ckpt"] == json.loads(header)["config"]["teacher_ckpt"]
        assert (written["teacher_sha256"], written["cpu_isa"]) == (saved["teacher_sha256"], saved["cpu_isa"])
        assert written["previous_wall_s"] == json.loads(header)["previous_wall_s"]  # (writing a report is no run)
    (tmp_path / "b" / COMPARE).write_text(json.dumps({k: v for k, v in json.loads(header).items() if k != "teacher"}))
    (tmp_path / "b" / "report.json").unlink()

    class Retrained(Exception):
        pass

    def train_teacher(**kwargs):
        raise Retrained

    monkeypatch.setattr(plan, "cpu_isa", cpu_isa)
    monkeypatch.setattr(stage, "train_teacher", train_teacher)
    with pytest.raises(Retrained):
        cmp.run_compare(_tiny(tmp_path / "b", **{**base, "seeds": 2}), resume=True)


@pytest.mark.parametrize("digest", [True, False], ids=["digest", "legacy"])
def test_a_missing_given_teacher_is_asked_for_not_retrained(tmp_path: Path, monkeypatch, digest: bool) -> None:
    """A compare whose teacher was a checkpoint of the user's (not the recipe's folder) cannot remake it: a resume
    where it is missing stops at once and asks for it, without a teacher stage or any run. A compare from before
    teacher digests (no teacher_sha256) stops the same way, on the path alone."""
    from dataclasses import asdict

    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tmp_path / "c")
    header = {"config": {**asdict(cfg), "teacher_ckpt": "mine/teacher.safetensors"}, "img_size": 16,
              "teacher_path": "mine/teacher.safetensors", "started": "2026-12-01T00:00:00", "previous_wall_s": 1.0}
    if digest:
        header["teacher_sha256"] = "0" * 64
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / COMPARE).write_text(json.dumps(header))
    monkeypatch.setattr(stage, "train_teacher", lambda **k: pytest.fail("no teacher stage"))
    monkeypatch.setattr(cmp, "distill", lambda *a, **k: pytest.fail("no run"))
    with pytest.raises(UserError, match=r"mine/teacher\.safetensors.*--teacher-ckpt" if digest else "not found"):
        cmp.run_compare(_tiny(tmp_path / "c"), resume=True)
    assert (tmp_path / "c" / COMPARE).read_text() == json.dumps(header) and not list((tmp_path / "c").glob("*-seed*"))


def test_a_compare_resumed_on_other_cpu_kernels_says_how_to_keep_them(tmp_path: Path, monkeypatch, caplog) -> None:
    """A compare started with AVX2 kernels and resumed on an AVX-512 CPU (or a GPU) trains its remaining runs with
    other float sums: the resume says so, on AVX-512 with the settings that hold the kernels to AVX2; on the same
    kernels it says nothing."""
    from dataclasses import asdict

    from spofa_deploy.machine import AVX2_KERNELS

    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tmp_path / "c", teacher_ckpt="mine/teacher.safetensors")
    Path("mine").mkdir()
    Path("mine/teacher.safetensors").write_bytes(b"weights")
    header = {"config": asdict(cfg), "img_size": 16, "teacher_path": "mine/teacher.safetensors",
              "teacher_sha256": "0" * 64, "cpu_isa": "AVX2", "started": "2026-12-01T00:00:00", "previous_wall_s": 1.0}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / COMPARE).write_text(json.dumps(header))
    start = "this compare started with AVX2 CPU kernels, "
    rest = ": its remaining runs sum floats in another order than they would there"
    for here, told in (("AVX512", f"{start}this CPU's kernels are AVX512{rest} (or here with {AVX2_KERNELS} set)"),
                       (None, f"{start}here it runs on a GPU{rest}"), ("AVX2", None)):
        monkeypatch.setattr(plan, "cpu_kernels", lambda cfg: here)
        caplog.clear()
        with caplog.at_level("WARNING"):
            plan.open_compare(_tiny(tmp_path / "c", teacher_ckpt="mine/teacher.safetensors"), True, [("none", 0.01, 0)])
        assert [r.getMessage() for r in caplog.records if "CPU kernels" in r.getMessage()] == ([told] if told else [])
    # Held in part: the settings left out are named, with the kernels they leave AVX-512; on a GPU nothing is said.
    onednn_mkl = "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
    for here, held, told in (("AVX2", "ATEN_CPU_CAPABILITY=avx2", f"without {onednn_mkl}, oneDNN's and MKL's kernels"),
                             ("AVX512", onednn_mkl, "without ATEN_CPU_CAPABILITY=avx2, PyTorch's kernels"),
                             ("AVX2", AVX2_KERNELS, None), ("AVX512", "", None), (None, onednn_mkl, None)):
        monkeypatch.setattr(plan, "cpu_kernels", lambda cfg: here)
        for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
            monkeypatch.delenv(name, raising=False)
        for setting in held.split():
            monkeypatch.setenv(*setting.split("="))
        caplog.clear()
        with caplog.at_level("WARNING"):
            plan.open_compare(_tiny(tmp_path / "c", teacher_ckpt="mine/teacher.safetensors"), True, [("none", 0.01, 0)])
        said = [r.getMessage() for r in caplog.records if "hold an AVX-512" in r.getMessage()]
        assert said == ([f"only some of the settings that hold an AVX-512 CPU's kernels to AVX2 are set: on such a "
                         f"CPU, {told} stay AVX-512; set all of {AVX2_KERNELS}"] if told else [])


def test_a_missing_recipe_teacher_saved_by_absolute_path_is_retrained(tmp_path: Path, monkeypatch) -> None:
    """The recipe's own teacher, saved as an absolute path (or from a checkout since moved), is not "the user's":
    the recipe retrains it (then its digest decides)."""
    from dataclasses import asdict

    from spofa_deploy.teacher.stage import default_teacher_dir

    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tmp_path / "c")
    moved = str(Path("/elsewhere/checkout") / default_teacher_dir("test_vit", "digits", 16) / "teacher.safetensors")
    header = {"config": {**asdict(cfg), "teacher_ckpt": moved}, "img_size": 16, "teacher_path": moved,
              "teacher_sha256": "0" * 64, "started": "2026-12-01T00:00:00", "previous_wall_s": 1.0}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / COMPARE).write_text(json.dumps(header))

    class Retrained(Exception):
        pass

    def train_teacher(**kwargs):
        raise Retrained

    monkeypatch.setattr(stage, "train_teacher", train_teacher)
    with pytest.raises(Retrained):
        cmp.run_compare(_tiny(tmp_path / "c"), resume=True)


def test_a_diverged_run_is_recorded_not_fatal(tiny_compare, monkeypatch) -> None:
    from spofa_deploy import pipeline
    root, *_ = tiny_compare
    monkeypatch.chdir(root)
    tasks, raised = [], []
    real_create = pipeline.create_task
    monkeypatch.setattr(pipeline, "create_task", lambda *a, **k: tasks.append(real_create(*a, **k)) or tasks[-1])

    def nan_grads_at_step_1(step: int) -> None:
        if step == 1:
            for p in tasks[-1].trainable():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    def distill_with_fault(*args, **kwargs):
        # A real run whose gradients turn NaN at its second step: fit raises TrainingDiverged.
        try:
            return pipeline.distill(*args, hooks=Hooks(before_update=nan_grads_at_step_1), **kwargs)
        except TrainingDiverged:
            raised.append(True)
            raise

    monkeypatch.setattr(cmp, "distill", distill_with_fault)
    res = cmp.run_compare(_tiny(Path("runs") / "div", methods=("kd",)))
    assert raised == [True]
    (rec,) = res.report["runs"]
    assert rec["status"] == "stopped" and "non-finite" in rec["error"]
    assert rec["stability"]["diverged"] is True and "nonfinite" in rec["stability"]["divergence"]
    assert rec["stability"]["nonfinite_events"] == 1 and rec["final_top1"] is None
    g = res.report["per_method_lr"][0]
    assert (g["diverged"], g["stopped"], g["nonfinite"]) == (1, 1, 1)
    assert g["final_top1"]["mean"] == 10.0  # stopped before its first evaluation: at chance in the aggregates
    assert (res.out / "kd-lr0.01-seed0" / DONE).is_file()
    assert "| kd-lr0.01-seed0 | stopped |" in (res.out / "report.md").read_text()


def test_an_interrupted_teacher_stage_is_resumed_not_used(tmp_path: Path, monkeypatch) -> None:
    from spofa_deploy.teacher.stage import default_teacher_dir

    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tmp_path / "c", teacher_epochs=2)
    tdir = default_teacher_dir("test_vit", "digits", 16)
    tdir.mkdir(parents=True)
    (tdir / "teacher.safetensors").write_bytes(b"written after its first best epoch")
    torch.save({"epoch": 1, "config": {"epochs": 2}}, tdir / "checkpoint-last.pt")
    calls = []

    def fake_train_teacher(*, teacher, data, out, resume):
        calls.append((Path(out), resume, data.img_size, teacher.train))
        return Path(out) / "teacher.safetensors"

    monkeypatch.setattr(stage, "train_teacher", fake_train_teacher)
    assert plan.ensure_teacher(cfg, 16) == tdir / "teacher.safetensors"
    assert [c[:3] for c in calls] == [(tdir, True, 16)]  # stopped at epoch 1/2: resumed, not used half-trained
    torch.save({"epoch": 2, "config": {"epochs": 2}}, tdir / "checkpoint-last.pt")
    assert plan.ensure_teacher(cfg, 16) == tdir / "teacher.safetensors" and len(calls) == 1  # finished: used


def test_compare_trains_its_teacher_with_the_teacher_recipe(tmp_path: Path, monkeypatch) -> None:
    """The teacher folder is shared with later `spofa distill` runs: compare must not train it with student settings."""
    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tmp_path / "c")
    seen = []
    monkeypatch.setattr(stage, "train_teacher",
                        lambda **k: seen.append(k["teacher"].train) or Path(k["out"]) / "teacher.safetensors")
    plan.ensure_teacher(cfg, 16)
    recipe = stage.TeacherOptions().train
    (t,) = seen
    assert (t.optimizer, t.batch_size, t.lr) == (recipe.optimizer, recipe.batch_size, recipe.lr) == ("adamw", 32, 5e-4)
    assert t.epochs == cfg.teacher_epochs and t.device == cfg.device
    assert (t.optimizer, t.batch_size) != (cfg.optimizer, cfg.batch_size)  # the student's recipe differs


# ---------------------------------------------------------------------------------------------------------------------
# The command line: options reach the config (no training)

def test_cli_options_reach_the_config(monkeypatch, tmp_path: Path) -> None:
    import dataclasses

    import typer
    from typer.testing import CliRunner

    from cli import cmd_compare
    from cli.cmd_compare import compare
    from spofa_deploy.artifacts import write_json

    app = typer.Typer()
    app.command("compare")(compare)
    app.command("noop")(lambda: None)  # two commands: `compare` is a subcommand, as in cli.main
    seen = []

    def fake_run(cfg, resume=False, jobs=1, threads=None, report_only=False):  # jobs None: run_compare picks them
        seen.append((cfg, resume) if jobs is None else (cfg, resume, jobs, threads))
        return cmp.CompareResult(tmp_path, {}, 0, 0)

    monkeypatch.setattr(cmp, "run_compare", fake_run)
    monkeypatch.setattr(cmd_compare, "summary_table", lambda report: "table")
    run = CliRunner().invoke
    r = run(app, ["compare"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == (cmp.CompareConfig(), False)  # the documented defaults
    r = run(app, ["compare", "--methods", "none,kd", "--ablations", "--seeds", "2", "--lr-sweep", "0.1,0.2",
                  "--train-fraction", "0.2", "--epochs", "3", "--teacher", "vit_s", "--student", "resnet18",
                  "--batch-size", "16", "--img-size", "24", "--device", "cpu", "--workers", "0",
                  "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    cfg, resume = seen[-1]
    assert not resume and cfg.methods == ("none", "kd", "spofa", "spofa-nomema", "spofa-nobeta", "spofa-damp",
                                          "spofa-m0.9", "ofa")
    assert (cfg.seeds, cfg.lrs, cfg.train_fraction, cfg.epochs, cfg.teacher, cfg.student) == (2, (0.1, 0.2), 0.2, 3, "vit_s", "resnet18")
    assert (cfg.batch_size, cfg.img_size, cfg.device, cfg.workers, cfg.out) == (16, 24, "cpu", 0, str(tmp_path / "c"))
    r = run(app, ["compare", "--jobs", "3", "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert seen[-1][2:] == (3, 2)
    r = run(app, ["compare", "--jobs", "1"])
    assert r.exit_code == 0, r.output
    assert seen[-1][2:] == (1, None)
    # --resume: the saved settings, not the defaults, for everything not given.
    saved = tmp_path / "saved"
    saved.mkdir()
    write_json(saved / COMPARE, {"config": dataclasses.asdict(cmp.CompareConfig(student="resnet18", epochs=7))})
    r = run(app, ["compare", "--resume", "--out", str(saved), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    cfg, resume = seen[-1]
    assert resume and (cfg.student, cfg.epochs, cfg.device, cfg.out) == ("resnet18", 7, "cpu", str(saved))


def test_compare_teacher_cache_is_shared_and_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    """Methods and rates of one seed read one set of teacher outputs; the students are bitwise those without it."""
    monkeypatch.chdir(tmp_path)
    base = dict(methods=("kd", "spofa"), lrs=(0.01, 0.02), epochs=1)
    cached = cmp.run_compare(_tiny(tmp_path / "with", **base))
    plain = cmp.run_compare(_tiny(tmp_path / "without", teacher_cache=False, **base))
    manifests = list((tmp_path / "with" / cmp.TEACHER_CACHE).glob("*/manifest.json"))
    assert len(manifests) == 1  # 4 distillation runs, one key: the teacher ran for the first only
    assert not (tmp_path / "without" / cmp.TEACHER_CACHE).exists()
    for r in cached.report["runs"]:
        a = (Path(r["run_dir"]) / "student.safetensors").read_bytes()
        b = (tmp_path / "without" / r["name"] / "student.safetensors").read_bytes()
        assert a == b, r["name"]
    assert [r["final_top1"] for r in cached.report["runs"]] == [r["final_top1"] for r in plain.report["runs"]]


def test_parallel_compare_trains_the_same_students(tmp_path: Path, monkeypatch) -> None:
    """--jobs 2: runs in worker processes (output in <run>/log.txt), students bitwise those of one after another."""
    import torch

    monkeypatch.chdir(tmp_path)
    base = dict(methods=("none", "kd"), lrs=(0.01, 0.02), epochs=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting, so both sides compute alike
    try:
        plain = cmp.run_compare(_tiny(tmp_path / "one", **base))
    finally:
        torch.set_num_threads(threads)
    par = cmp.run_compare(_tiny(tmp_path / "two", **base), jobs=2, threads=1)
    assert par.runs_done == 4 and [r["name"] for r in par.report["runs"]] == [r["name"] for r in plain.report["runs"]]
    assert {r["threads"] for r in par.report["runs"]} == {r["threads"] for r in plain.report["runs"]} == {1}
    for r in par.report["runs"]:
        assert "epoch 1/1" in (Path(r["run_dir"]) / "log.txt").read_text().replace("Epoch", "epoch"), r["name"]
        a = (Path(r["run_dir"]) / "student.safetensors").read_bytes()
        assert a == (tmp_path / "one" / r["name"] / "student.safetensors").read_bytes(), r["name"]
    with pytest.raises(UserError, match="--jobs"):
        cmp.run_compare(_tiny(tmp_path / "zero", **base), jobs=0)
    # A run that fails in a worker stops the compare with its error (a diverged run would be a result).
    with pytest.raises(UserError, match="no_such_cnn"):
        cmp.run_compare(_tiny(tmp_path / "bad", student="no_such_cnn", **base), jobs=2, threads=1)


def test_the_default_jobs_run_single_threaded_workers_even_when_one_fits(tmp_path: Path, monkeypatch) -> None:
    """Without `jobs`, a CPU compare trains in worker processes of one thread, also when memory or the runs left
    allow only one job, so no run of it trains at another thread count than the others."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cmp, "usable_cores", lambda: 2)
    res = cmp.run_compare(_tiny(tmp_path / "auto", methods=("none",)), jobs=None)  # 1 run: 1 job
    (rec,) = res.report["runs"]
    assert rec["threads"] == 1 and (Path(rec["run_dir"]) / "log.txt").is_file()


def test_a_resume_at_another_thread_count_says_so(monkeypatch, caplog) -> None:
    """Float sums follow the CPU thread count, so runs resumed at another count than the finished ones would not
    repeat the compare as it started: the command warns with the count to pass (on the CPU only)."""
    job = cmp._Job(_tiny(Path("unused")), Path("unused"), stage.TeacherOptions(), 16, 10)
    monkeypatch.setattr(cmp, "_run_parallel", lambda *a: iter(()))
    monkeypatch.setattr(cmp, "_run_sequential", lambda *a: iter(()))
    monkeypatch.setattr(cmp, "usable_cores", lambda: 2)
    records = {"none-lr0.01-seed0": {"device": "cpu", "threads": 1}}
    todo = [("none", 0.01, 1)]
    with caplog.at_level("WARNING"):
        cmp._runs(job, todo, records, 2, jobs=2, threads=1)
        cmp._runs(job, todo, records, 2, jobs=None, threads=None)  # the default: single-threaded workers
        assert not caplog.records
        cmp._runs(job, todo, records, 2, jobs=1, threads=None)  # in this process, at its own threads
        assert len(caplog.records) == (torch.get_num_threads() != 1)
        caplog.clear()
        cmp._runs(job, todo, records, 2, jobs=2, threads=None)  # the cores / 2 = 1 each
        assert not caplog.records
        cmp._runs(job, todo, {**records, "kd-lr0.01-seed0": {"device": "cpu", "threads": 2}}, 2, jobs=2, threads=2)
        assert "trained with 1 or 2 CPU threads each, these get 2" in caplog.text and "--threads 2" in caplog.text
        caplog.clear()
        monkeypatch.setattr(cmp, "resolve_device", lambda name: torch.device("cuda"))
        cmp._runs(job, todo, records, 2, jobs=2, threads=2)  # on a GPU the CPU threads do not decide the numbers
        assert not caplog.records


def test_cpu_kernels_are_those_of_a_compare_on_the_cpu_only(monkeypatch) -> None:
    """compare.json's `cpu_isa` (and the resume check on it) concern compares trained on the CPU; on a GPU the
    CPU's instruction set does not decide the teacher's weights."""
    monkeypatch.setattr(plan, "cpu_isa", lambda: "AVX2")
    assert plan.cpu_kernels(_tiny(Path("x"))) == "AVX2"
    monkeypatch.setattr(plan, "resolve_device", lambda name: torch.device("cuda"))
    assert plan.cpu_kernels(_tiny(Path("x"), device="cuda")) is None


def test_the_default_jobs_fill_the_cores_as_memory_allows(monkeypatch) -> None:
    """`spofa compare` without --jobs: one single-threaded run per core on the CPU, fewer where memory, --threads
    or the runs left say so; one on a GPU."""
    cfg = _tiny(Path("unused"))
    monkeypatch.setattr(cmp, "usable_cores", lambda: 8)
    monkeypatch.setattr(cmp, "available_memory_gb", lambda: 100.0)
    assert cmp.auto_jobs(cfg, None, 36) == 8
    assert cmp.auto_jobs(cfg, 2, 36) == 4 and cmp.auto_jobs(cfg, None, 3) == 3 and cmp.auto_jobs(cfg, None, 0) == 1
    monkeypatch.setattr(cmp, "available_memory_gb", lambda: 3 * cmp.JOB_MEMORY_GB + 0.5)
    assert cmp.auto_jobs(cfg, None, 36) == 3
    monkeypatch.setattr(cmp, "available_memory_gb", lambda: 0.5)
    assert cmp.auto_jobs(cfg, None, 36) == 1
    monkeypatch.setattr(cmp, "available_memory_gb", lambda: None)  # unknown: the cores decide
    assert cmp.auto_jobs(cfg, None, 36) == 8
    monkeypatch.setattr(cmp, "resolve_device", lambda name: torch.device("cuda"))
    assert cmp.auto_jobs(cfg, None, 36) == 1


def test_resume_without_out_takes_the_compare_started_last(tmp_path: Path) -> None:
    """Not the compare.json written last: a re-report of an older compare rewrites its file."""
    for name, started in (("old", "2026-12-01T10:00:00"), ("new", "2026-12-05T10:00:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / COMPARE).write_text(json.dumps({"started": started}))
    os.utime(tmp_path / "old" / COMPARE)  # touched after the new one, as a re-report does
    assert plan.latest_compare(tmp_path) == tmp_path / "new"
