"""Whether a teacher can teach: one random draw per teacher stage, the "cannot help" note, fidelity, the study's
pre-registered decision rules and its resume."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from spofa_deploy.compare import plan
from spofa_deploy.compare import run as cmp
from spofa_deploy import models, pipeline
from spofa_deploy.accuracy import agreement, transfer_check
from spofa_deploy.artifacts import load_state, read_model_meta
from spofa_deploy.errors import UserError
from spofa_deploy.compare.stats import (MIN_SEEDS_TO_READ, best_rates, bracketing, complete_seeds, decisions, holm,
                                        paired_difference, scored, summarize)
from spofa_deploy.data.splits import DataOptions
from spofa_deploy.teacher import stage
from spofa_deploy.teacher.stage import TeacherOptions, train_teacher
from spofa_deploy.run_files import DONE
from spofa_deploy.train.loop import TrainConfig


def _teacher_cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=64, lr=2e-3, optimizer="adamw", workers=0, device="cpu", log_every=5)
    return TrainConfig(**{**base, **kw})


def test_the_teacher_stage_draws_once_whatever_the_hub_answers(tmp_path: Path, monkeypatch) -> None:
    """Offline, a failed pretrained attempt (timm builds a random model before it looks for weights) must not
    consume the draw of the random-init teacher: with or without a hub, and with --no-pretrained, one teacher."""
    real = models.create_model

    def no_weights(name, num_classes, img_size=None, pretrained=False, **kw):
        model = real(name, num_classes, img_size, **kw)  # consumes the draws timm's own attempt would
        if pretrained:
            raise RuntimeError("no pretrained weights in the cache")
        return model

    def run_stage(name: str, pretrained: bool, hub: bool) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(models, "_hub_reachable", lambda: hub)
        opts = TeacherOptions(name="test_vit", pretrained=pretrained, train=_teacher_cfg())
        return load_state(train_teacher(teacher=opts, data=DataOptions("digits", 16), out=tmp_path / name))

    monkeypatch.setattr(models, "create_model", no_weights)
    asked = run_stage("hub-no-weights", pretrained=True, hub=True)
    unreachable = run_stage("no-hub", pretrained=True, hub=False)
    plain = run_stage("no-pretrained", pretrained=False, hub=True)
    for other in (unreachable, plain):
        assert asked.keys() == other.keys()
        assert all(torch.equal(asked[k], other[k]) for k in asked)


def test_transfer_check_says_when_the_teacher_cannot_help() -> None:
    assert transfer_check(95.0, 99.0)["note"] is None
    above = transfer_check(97.0, 96.5)["note"]
    assert "at or above its teacher" in above and "--teacher-weights" in above
    assert "at or above" in transfer_check(96.5, 96.5)["note"]  # equal is no better
    below_ref = transfer_check(None, 94.0, reference_top1=95.0)
    assert "not above the student trained alone" in below_ref["note"] and below_ref["reference_top1"] == 95.0
    assert transfer_check(None, 99.0, reference_top1=95.0)["note"] is None
    assert transfer_check(97.0, None)["note"] is None  # a teacher without a recorded top-1: nothing to say


def test_agreement_counts_equal_predictions() -> None:
    x = torch.eye(4)
    a, b = torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]]))  # classes 0, 1, 0, 1
        b.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 1]]))  # classes 0, 1, 1, 1
    loader = [(x[:2], None), (x[2:], None)]
    assert agreement(a, b, loader, torch.device("cpu")) == 75.0
    assert agreement(a, a, loader, torch.device("cpu")) == 100.0


def test_a_student_above_its_teacher_is_told_and_recorded(tmp_path: Path, monkeypatch, capsys) -> None:
    """A teacher that barely trained (rate 1e-7: near chance) and a student trained normally: distill says at the
    end that the teacher could not help, and student.json records it with the student's agreement."""
    from cli.cmd_train import print_summary

    monkeypatch.chdir(tmp_path)
    weak = train_teacher(teacher=TeacherOptions(name="test_vit", pretrained=False, train=_teacher_cfg(lr=1e-7)),
                         data=DataOptions("digits", 16), out=tmp_path / "weak")
    r = pipeline.distill(student="test_resnet", teacher=TeacherOptions(checkpoint=str(weak)), method="kd",
                         data=DataOptions("digits", 16), out=tmp_path / "run",
                         train=TrainConfig(epochs=2, lr=3e-3, batch_size=64, optimizer="adamw", workers=0, device="cpu"))
    t = read_model_meta(r.student_path)["transfer"]
    assert r.student["top1"] > r.teacher["top1"], "the set-up needs a student above its teacher"
    assert t["teacher_top1"] == r.teacher["top1"] and t["student_top1"] == r.student["top1"]
    assert "at or above its teacher" in t["note"] and 0.0 <= t["agreement"] <= 100.0
    print_summary(r)
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "at or above its" in out


def test_a_run_stopped_before_its_first_evaluation_counts_at_chance() -> None:
    """A rate where some seeds blew up at once is not averaged, nor paired, over the seeds that survived it."""
    def run(method, lr, seed, top1):
        stopped = top1 is None
        return {"method": method, "lr": lr, "seed": seed, "final_top1": top1, "best_top1": top1,
                "final_ema_top1": None, "best_ema_top1": None, "status": "stopped" if stopped else "finished",
                "stability": {"diverged": stopped, "divergence": ["nonfinite"] if stopped else [], "loss_spikes": 0}}

    runs = [run("none", 0.01, s, 80.0) for s in range(5)] + [run("spofa", 0.01, s, 78.0) for s in range(5)]
    runs += [run("spofa", 0.02, s, 85.0 if s < 3 else None) for s in range(5)]
    runs += [run("none", 0.02, s, 79.0) for s in range(5)]
    as_scored = scored(runs, num_classes=10)
    assert [r["final_top1"] for r in as_scored if r["lr"] == 0.02 and r["method"] == "spofa"] == [85.0] * 3 + [10.0] * 2
    assert all(r.get("scored_at_chance") for r in as_scored if r["final_top1"] == 10.0)
    best = best_rates(summarize(as_scored, ["none", "spofa"], [0.01, 0.02])["per_method_lr"])
    assert best["spofa"] == 0.01  # (85, 85, 85, 10, 10) averages below 78; over the survivors it would win
    d = paired_difference(as_scored, "spofa", "none", 0.02, 0.01)
    assert d["n"] == 5 and d["diffs"][3:] == [-70.0, -70.0]
    assert runs[-6]["final_top1"] is None  # (the records themselves are left as they are)


def test_holm_steps_down() -> None:
    # alpha 0.05 over 3: 0.01 <= 0.0167 rejects, 0.03 > 0.025 stops, 0.02 would pass alone but Holm stops at the first.
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]
    assert holm([0.01, 0.02, 0.04]) == [True, True, True]
    assert holm([None, 0.001]) == [None, True]


def _pair(method: str, baseline: str, mean: float, ci: tuple[float, float] | None, p: float | None) -> dict:
    return {"method": method, "baseline": baseline, "at": "best rates", "n": 10, "mean": mean, "ci95": ci and list(ci),
            "p": p, "lr": 0.005, "lr_baseline": 0.01}


def test_pre_registered_decisions() -> None:
    paired = [_pair("kd", "none", 1.2, (0.3, 2.1), 0.01), _pair("spofa", "none", 0.8, (0.1, 1.5), 0.03),
              _pair("ofa", "none", 0.5, (-0.2, 1.2), 0.15), _pair("spofa", "ofa", 0.3, (-0.5, 1.1), 0.4),
              {**_pair("spofa", "none", 9.0, (8.0, 10.0), 1e-6), "at": "lr 0.005"}]  # per-rate rows are not read
    d = {x["comparison"]: x for x in decisions(paired, seeds_complete=10, at_end={})}
    assert d["kd - none"]["holds"] is True
    assert d["spofa - none"]["holds"] is False  # interval above zero but the gain is below one point
    assert d["ofa - none"]["holds"] is False and d["spofa - ofa"]["holds"] is False
    assert "Holm over 2" in d["ofa - none"]["rule"] and all(x["note"] is None for x in d.values())
    paired[1] = _pair("spofa", "none", 1.4, (0.6, 2.2), 0.002)
    assert {x["comparison"]: x for x in decisions(paired, 10, {})}["spofa - none"]["holds"] is True
    # Fewer complete seeds than the rules read from: the same figures, no rule read.
    early = decisions(paired, seeds_complete=MIN_SEEDS_TO_READ - 1, at_end={})
    assert [x["holds"] for x in early] == [None] * len(early) and early[1]["mean"] == 1.4
    assert decisions(paired, seeds_complete=MIN_SEEDS_TO_READ, at_end={})[1]["holds"] is True
    # A best rate at an end of the sweep: the primary's figures are given, and it is not read until the sweep is
    # extended; the gate is read.
    ends = decisions(paired, 10, {"none": "highest"})
    (p,) = [x for x in ends if x["kind"] == "primary"]
    assert p["holds"] is None and p["mean"] == 1.4 and "end of the sweep (none)" in p["note"]
    assert ends[0]["kind"] == "gate" and ends[0]["holds"] is True
    # The gate not shown: nothing else is evidence of transfer (rule 1), though it is computed and reported.
    paired[0] = _pair("kd", "none", 0.4, (-0.3, 1.1), 0.2)
    rows = decisions(paired, 10, {})
    assert rows[0]["holds"] is False and rows[0]["note"] is None
    assert all("gate is not shown" in x["note"] and x["holds"] is None for x in rows[1:])
    assert rows[1]["mean"] == 1.4 and rows[1]["ci95"] == [0.6, 2.2]  # (reported, not read)
    no_kd = decisions(paired[1:], 10, {})
    assert no_kd[0]["kind"] == "primary" and "no gate" in no_kd[0]["note"] and no_kd[0]["holds"] is None
    # Rule 6 row by row: a row over fewer seeds than the rules read from is not read, whatever the complete seeds.
    few = decisions([{**_pair("kd", "none", 1.2, (0.3, 2.1), 0.01), "n": MIN_SEEDS_TO_READ - 1}], 10, {})
    assert few[0]["holds"] is None


def test_the_stage_head_weight_default_needs_a_positive_holm_significant_difference() -> None:
    base = [_pair("kd", "none", 1.2, (0.3, 2.1), 0.01), _pair("spofa", "none", 1.4, (0.6, 2.2), 0.002)]
    for mean, p, becomes in [(1.5, 0.001, True), (-1.5, 0.001, False), (1.5, 0.2, False)]:
        rows = decisions([*base, _pair("spofa-fw0.1", "spofa", mean, (mean - 1, mean + 1), p)], 10, {})
        (rule4,) = [x for x in rows if x["kind"] == "default"]
        assert rule4["holds"] is becomes, (mean, p)
    # A comparison without a p-value (one seed) is not in the Holm family.
    rows = decisions([*base, _pair("ofa", "none", 0.5, (-0.2, 1.2), 0.15), _pair("spofa", "ofa", 0.3, None, None)],
                     10, {})
    assert [x["rule"] for x in rows if x["kind"] == "secondary"] == ["secondary (Holm over 1): differs from zero"]


def test_ties_go_to_the_lower_rate_whatever_the_sweep_order() -> None:
    from spofa_deploy.compare.stats import best_rates

    groups = [{"method": "none", "lr": lr, "final_top1": {"mean": 90.0}} for lr in (0.01, 0.005, 0.02)]
    assert best_rates(groups) == {"none": 0.005}


def _run(method: str, lr: float, seed: int) -> dict:
    return {"method": method, "lr": lr, "seed": seed}


def test_a_seed_is_complete_with_every_method_at_every_rate() -> None:
    runs = [_run(m, lr, s) for s in (0, 1, 2) for m in ("none", "kd") for lr in (0.01, 0.02)]
    runs.remove(_run("kd", 0.02, 1))
    assert complete_seeds(runs, ["none", "kd"], [0.01, 0.02]) == [0, 2]
    assert complete_seeds(runs, ["none", "kd", "ofa"], [0.01, 0.02]) == []


def test_a_best_rate_at_an_end_of_the_sweep_is_not_bracketed() -> None:
    lrs = [0.00125, 0.0025, 0.005, 0.01]
    assert bracketing({"none": 0.0025, "kd": 0.005}, lrs) == {"at_end": {}, "extend": []}
    b = bracketing({"none": 0.01, "kd": 0.005, "spofa": 0.00125}, lrs)
    assert b == {"at_end": {"none": "highest", "spofa": "lowest"}, "extend": [0.000625, 0.02]}
    assert bracketing({"none": 0.01}, [0.01]) == {"at_end": {"none": "only"}, "extend": [0.005, 0.02]}


def test_a_study_compare_resumes_across_an_interruption(tmp_path: Path, monkeypatch) -> None:
    """The study's variants in a tiny compare: interrupted in its second seed, resumed, and reported with the
    decision rules, each run's agreement with the teacher, and the compare's transfer note."""
    monkeypatch.chdir(tmp_path)
    base = dict(teacher="test_vit", student="test_resnet", data="digits", methods=("none", "kd", "spofa-fw0.1"),
                seeds=1, lrs=(0.01,), epochs=1, batch_size=32, img_size=16, train_fraction=0.05, teacher_epochs=1,
                teacher_pretrained=False, device="cpu", workers=0, out="runs/study")
    first_report = cmp.run_compare(cmp.CompareConfig(**base)).report
    assert cmp._loss_config(cmp.CompareConfig(**base), "spofa-fw0.1").feat_weight == 0.1
    from spofa_deploy.artifacts import read_model_meta

    assert read_model_meta(first_report["teacher"]["path"])["split_seed"] == 0  # the teacher stage's split
    first = {p.parent.name: p.stat().st_mtime_ns for p in Path("runs/study").glob(f"*/{DONE}")}
    assert len(first) == 3

    real, calls = cmp.distill, []

    def interrupted(*a, **k):
        calls.append(k["out"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or the session's end) in the second run of seed 1
        return real(*a, **k)

    monkeypatch.setattr(cmp, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cmp.run_compare(cmp.CompareConfig(**{**base, "seeds": 2}), resume=True)
    # The report of what is finished so far, with the code of today: nothing trained.
    monkeypatch.setattr(cmp, "distill", lambda *a, **k: pytest.fail("--report-only must not train"))
    now = cmp.run_compare(cmp.CompareConfig(**{**base, "seeds": 2}), resume=True, report_only=True)
    assert now.runs_done == 0 and not now.report["complete"] and len(now.report["runs"]) == 4
    assert now.report["seeds_complete"] == [0] and all(d["holds"] is None for d in now.report["decisions"])
    cmp.run_compare(cmp.CompareConfig(**{**base, "seeds": 1}), resume=True, report_only=True)  # a look at seed 0
    assert json.loads(Path("runs/study/compare.json").read_text())["config"]["seeds"] == 2  # the plan is kept
    with pytest.raises(UserError, match="--report-only reports a compare that exists"):
        cmp.run_compare(cmp.CompareConfig(**{**base, "seeds": 2}), report_only=True)
    monkeypatch.setattr(cmp, "distill", real)
    done = cmp.run_compare(cmp.CompareConfig(**{**base, "seeds": 2}), resume=True)
    assert done.runs_skipped == 4 and done.runs_done == 2
    assert {p.parent.name: p.stat().st_mtime_ns for p in Path("runs/study").glob(f"*/{DONE}") if p.parent.name in first} == first
    report = json.loads(Path("runs/study/report.json").read_text())
    assert report["complete"] and len(report["runs"]) == 6
    assert all(r["agreement"] is not None and 0 <= r["agreement"] <= 100 for r in report["runs"])
    gate = [d for d in report["decisions"] if d["comparison"] == "kd - none"]
    assert len(gate) == 1 and gate[0]["n"] == 2 and gate[0]["holds"] is None  # 2 complete seeds: not read
    assert report["seeds_complete"] == [0, 1] and report["bracketing"]["at_end"] == {m: "only" for m in base["methods"]}
    alone = next(g for g in report["at_best_rate"] if g["method"] == "none")["final_top1"]["mean"]
    assert (report["transfer_note"] is not None) == (report["teacher"]["top1"] <= alone)
    md = Path("runs/study/report.md").read_text()
    assert "Pre-registered decisions" in md and "agreement with teacher" in md
    assert "**Not read:** 2 complete seeds" in md and "| not read |" in md and "none (the only rate)" in md
    assert os.path.isdir("runs/study/none-lr0.01-seed1")
    # A reading over the first seeds only: re-reported from the records, nothing trained, no teacher needed.
    monkeypatch.setattr(cmp, "distill", lambda *a, **k: pytest.fail("a reading must not train"))
    Path(report["teacher"]["path"]).unlink()
    first_seed = cmp.run_compare(cmp.CompareConfig(**{**base, "seeds": 1}), resume=True)
    assert first_seed.runs_done == 0 and first_seed.runs_skipped == 3
    again = json.loads(Path("runs/study/report.json").read_text())
    assert again["seeds"] == [0] and again["seeds_complete"] == [0] and len(again["runs"]) == 3
    # Archived (records only, no weights) and reported again from the archive by this checkout's report code.
    import importlib.util

    spec = importlib.util.spec_from_file_location("archive_compare", Path(__file__).parents[1] / "benchmarks" / "archive_compare.py")
    archive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archive)
    (Path("runs/study") / "report.md").write_text("written by older code")
    assert archive.archive(Path("runs/study"), Path("evidence")) == 6
    assert not list(Path("evidence").glob("*.safetensors")) and Path("evidence/report.md").read_text() == "written by older code"
    archive.report_again(Path("evidence"))
    rep = json.loads(Path("evidence/report.json").read_text())
    # (compare.json now holds the one-seed reading's settings: the report covers that seed)
    assert all(r["run_dir"] == f"runs/study/{r['name']}" for r in rep["runs"]) and rep["config"]["out"] == "runs/study"
    assert len(rep["runs"]) == 3 and rep["seeds_complete"] == [0] and "Pre-registered decisions" in Path("evidence/report.md").read_text()
    # Between readings: the runs finished since the last archive are kept apart, unreported; a restore brings all.
    with pytest.raises(SystemExit, match="holds no runs.tar.gz"):
        archive.archive_records(Path("runs/study"), Path("nothing-yet"))
    shutil.copytree("runs/study", "partial", ignore=shutil.ignore_patterns("none-lr0.01-seed1", "kd-lr0.01-seed1"))
    shutil.copytree("runs/study", "middle", ignore=shutil.ignore_patterns("kd-lr0.01-seed1"))
    assert archive.archive(Path("partial"), Path("kept")) == 4
    reading, packed = Path("kept/report.json").read_bytes(), Path("kept/runs.tar.gz").read_bytes()
    # Each save packs only the runs no earlier tarball holds (the first here in the one-file form of older
    # archives); a save with nothing new writes nothing.
    assert archive.archive_records(Path("middle"), Path("kept")) == 1
    Path("kept/runs-new-001.tar.gz").rename("kept/runs-new.tar.gz")
    assert archive.archive_records(Path("runs/study"), Path("kept")) == 1
    assert archive.archive_records(Path("runs/study"), Path("kept")) == 0
    saves = {p.name: archive._runs_in(p) for p in Path("kept").glob("runs-new*.tar.gz")}
    assert saves == {"runs-new.tar.gz": {"none-lr0.01-seed1"}, "runs-new-002.tar.gz": {"kd-lr0.01-seed1"}}
    Path("kept/runs-new.tar.gz").unlink()  # (a save lost: the next one packs its runs again, under a new number)
    assert archive.archive_records(Path("runs/study"), Path("kept")) == 1
    saves = {p.name: archive._runs_in(p) for p in Path("kept").glob("runs-new*.tar.gz")}
    assert saves == {"runs-new-002.tar.gz": {"kd-lr0.01-seed1"}, "runs-new-003.tar.gz": {"none-lr0.01-seed1"}}
    assert (Path("kept/report.json").read_bytes(), Path("kept/runs.tar.gz").read_bytes()) == (reading, packed)
    assert archive.restore(Path("kept"), Path("back")) == 6 and len(list(Path("back").glob(f"*/{DONE}"))) == 6
    # A folder that lacks runs the archive holds (restored without its saves) cannot write over it.
    with pytest.raises(SystemExit, match="lacks 2 finished runs"):
        archive.archive_records(Path("partial"), Path("kept"))
    with pytest.raises(SystemExit, match="lacks 1 finished runs"):
        archive.archive(Path("middle"), Path("kept"))
    assert len(list(Path("kept").glob("runs-new*.tar.gz"))) == 2
    assert archive.archive(Path("runs/study"), Path("kept")) == 6 and not list(Path("kept").glob("runs-new*.tar.gz"))
    other = json.loads(Path("back/compare.json").read_text()) | {"started": "2020-01-01T00:00:00"}
    Path("back/compare.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another compare"):
        archive.archive_records(Path("back"), Path("kept"))


def test_a_sweep_extended_on_resume_runs_only_the_added_rate(tmp_path: Path, monkeypatch) -> None:
    """Rule 5's extension: `--resume --lr-sweep` with a rate added trains that rate alone, keeps the finished runs,
    and the report reads every rate (the optimum is then bracketed or not by the wider sweep)."""
    monkeypatch.chdir(tmp_path)
    base = dict(teacher="test_vit", student="test_resnet", data="digits", methods=("none", "kd"), seeds=1,
                lrs=(0.01,), epochs=1, batch_size=32, img_size=16, train_fraction=0.05, teacher_epochs=1,
                teacher_pretrained=False, device="cpu", workers=0, out="runs/study")
    cmp.run_compare(cmp.CompareConfig(**base))
    first = {p.parent.name: p.stat().st_mtime_ns for p in Path("runs/study").glob(f"*/{DONE}")}
    extended = cmp.run_compare(plan.resume_config("runs/study", lrs=(0.01, 0.02)), resume=True)
    assert (extended.runs_done, extended.runs_skipped) == (2, 2)
    assert {p.parent.name: p.stat().st_mtime_ns for p in Path("runs/study").glob(f"*/{DONE}") if p.parent.name in first} == first
    report = json.loads(Path("runs/study/report.json").read_text())
    assert json.loads(Path("runs/study/compare.json").read_text())["config"]["lrs"] == [0.01, 0.02]
    assert sorted({r["lr"] for r in report["runs"]}) == [0.01, 0.02] and report["seeds_complete"] == [0]
    assert set(report["bracketing"]["at_end"]) == {"none", "kd"}  # (two rates: every best rate is an end)


def test_the_teacher_recipe_is_cut_to_the_cpu_budget_only_when_not_given() -> None:
    from spofa_deploy.teacher.stage import stage_epochs

    recipe = TeacherOptions(train=TrainConfig(epochs=30, lr=5e-4, batch_size=32, optimizer="adamw", device="cpu"))
    assert TeacherOptions().train.epochs == 30 and TeacherOptions().cpu_budget == stage.TEACHER_CPU_BUDGET
    assert stage_epochs(recipe, 86_000_000, 1438) == 4  # a ViT-B on digits: the main command's budget
    assert stage_epochs(recipe, 5_500_000, 1438) == 30  # a DeiT-Tiny: the whole recipe
    assert stage_epochs(recipe, 11_181_642, 1438) == 30  # the transfer study's ResNet-18 teacher: the whole recipe
    assert stage_epochs(recipe, 86_000_000, 50_000) == 1  # never zero
    given = TeacherOptions(train=recipe.train, cpu_budget=None)
    assert stage_epochs(given, 86_000_000, 1438) == 30


def test_epochs_given_on_the_command_line_are_taken_as_given(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    seen = []
    monkeypatch.setattr(stage, "train_teacher", lambda **k: seen.append(k["teacher"]) or tmp_path / "t.safetensors")
    for args in (["teacher"], ["teacher", "--epochs", "3"]):
        assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "t")]).exit_code == 0
    assert [(t.train.epochs, t.cpu_budget) for t in seen] == [(30, stage.TEACHER_CPU_BUDGET), (3, None)]
    seen.clear()
    monkeypatch.chdir(tmp_path)
    plan.ensure_teacher(cmp.CompareConfig(teacher="test_vit", device="cpu"), 16)
    plan.ensure_teacher(cmp.CompareConfig(teacher="test_vit", device="cpu", teacher_epochs=2), 16)
    assert [(t.train.epochs, t.cpu_budget) for t in seen] == [(30, stage.TEACHER_CPU_BUDGET), (2, None)]
