"""`spofa compare`: parse options, call `spofa_deploy.compare.run.run_compare`, print the table."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import options as o

# Result-shaping options default to None: a new compare fills in CompareConfig's defaults (named in their help),
# `--resume` keeps the saved settings under the ones given, and refuses a given one that would change the
# numbers (RESULT_FIELDS).
_Teacher = o.defaulting(o.Teacher, "deit_t, a teacher above the student alone on digits")
_Student = o.defaulting(o.Student, "mobilenetv3")
_Data = o.defaulting(o.Data, "digits")
_Epochs = o.defaulting(o.Epochs, "100, from the student-alone learning curve")
_TrainFraction = o.defaulting(o.TrainFraction, "0.1, ~14 images per class on digits")
_BatchSize = o.defaulting(o.BatchSize, "16")
_Optim = o.defaulting(o.Optim, "sgd, as spofa distill")
_Amp = o.defaulting(o.Amp, "auto")
_TeacherCkpt = o.defaulting(o.TeacherCkpt, "the teacher trained earlier for this data, else train it once")
_Str = Optional[str]


@o.with_options(o.loss_options)
def compare(
    teacher: _Teacher = None,
    student: _Student = None,
    data: _Data = None,
    methods: Annotated[_Str, typer.Option("--methods", help="Comma list of none, kd, ofa, spofa, spofa-nomema, spofa-nobeta, spofa-damp, spofa-m0.9, ofa-fw0.1, spofa-fw0.1 (stage-head weight 0.1) (spofa-noln = ofa) (default: none,kd,ofa,spofa).")] = None,
    ablations: Annotated[bool, typer.Option("--ablations", help="Add the SPOFA ablations: spofa-nomema, spofa-nobeta, spofa-damp (alpha <= 1), spofa-m0.9 (MEMA momentum 0.9), ofa (= spofa without the LayerNorm).")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Number of seeds (0..N-1) per method and rate (default: 5).")] = None,
    epochs: _Epochs = None,
    lr_sweep: Annotated[_Str, typer.Option("--lr-sweep", help="Peak learning rates, comma separated (default: 0.00125,0.005,0.02 (SGD at batch 16); at 0.02 distillation turns fragile).")] = None,
    train_fraction: _TrainFraction = None,
    img_size: o.ImgSize = None,
    batch_size: _BatchSize = None,
    opt: _Optim = None,
    weight_decay: o.WeightDecay = None,
    teacher_cache: Annotated[bool, typer.Option("--teacher-cache/--no-teacher-cache", help="Compute each teacher output once per seed and read it back in the other runs (exact: the same results).")] = True,
    clip_grad: o.ClipGrad = None,
    amp: _Amp = None,
    teacher_ckpt: _TeacherCkpt = None,
    teacher_epochs: o.TeacherEpochs = None,
    pretrained: o.Pretrained = True,
    device: o.Device = "auto",
    workers: o.Workers = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Compare folder (default runs/compare-<student>-<time>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the compare in --out (default: the latest one under runs/), skipping finished runs.")] = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="With --resume: write the report of the runs finished so far and train nothing.")] = False,
    download: o.Download = False,
    threads: o.Threads = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="Runs trained at once, each in its own process with --threads (default: the cores / jobs) threads; its output in <run>/log.txt (default: on the CPU one per core, as memory allows; on a GPU 1; 1: one after another in this process).")] = None,
    **loss,
) -> None:
    """Train none / kd / ofa / spofa (and ablations) the same way and report accuracy and stability side by side."""
    from dataclasses import replace

    from rich.console import Console
    from rich.markdown import Markdown

    from spofa_deploy.compare.config import METHOD_ALIASES, VARIANTS, CompareConfig, parse_methods
    from spofa_deploy.compare.plan import resume_config
    from spofa_deploy.compare.report import reading_lines
    from spofa_deploy.compare.run import run_compare

    o.use_threads(threads)  # the runs train in this process
    loss_changes = o.loss_options(**loss)
    if methods:
        methods = parse_methods(o.comma_list(methods, "--methods", choices=[*VARIANTS, *METHOD_ALIASES], noun="method"))
    opt, amp = o.train_choice("optimizer", opt), o.train_choice("amp", amp)
    # CompareConfig's fields the options set (None: not given).
    given = dict(teacher=teacher, student=student, data=data, seeds=seeds, epochs=epochs,
                 methods=tuple(methods) if methods else None,
                 lrs=tuple(o.comma_list(lr_sweep, "--lr-sweep", of=float, positive=True)) if lr_sweep else None,
                 train_fraction=train_fraction, img_size=img_size, batch_size=batch_size,
                 optimizer=opt, weight_decay=weight_decay, clip_grad=clip_grad,
                 amp=amp, teacher_ckpt=str(teacher_ckpt) if teacher_ckpt else None,
                 teacher_epochs=teacher_epochs, teacher_pretrained=None if pretrained else False, device=device,
                 workers=workers, download=download or None, teacher_cache=None if teacher_cache else False)
    if resume:  # the saved settings; a loss flag given that differs is refused by run_compare
        cfg = resume_config(out, **given)
    else:
        cfg = CompareConfig(**{k: v for k, v in given.items() if v is not None}, out=str(out) if out else None)
    cfg.loss = replace(cfg.loss, **loss_changes)
    if ablations:
        cfg.methods = tuple(parse_methods(cfg.methods, ablations=True))
    result = run_compare(cfg, resume=resume, jobs=jobs, threads=threads, report_only=report_only)
    console = Console()
    console.print(summary_table(result.report))
    if result.report.get("decisions"):
        console.print(decisions_table(result.report))
        console.print(Markdown("\n\n".join(reading_lines(result.report))))
    typer.echo(f"report: {result.out / 'report.md'} and report.json"
               + (f"; plots: {', '.join(p.name for p in result.plots)}" if result.plots else ""))
    typer.echo(f"{result.runs_done} runs trained now, {result.runs_skipped} finished earlier")
    if note := result.report.get("transfer_note"):
        console.print(f"[yellow]note:[/] {note}")


def summary_table(report: dict):
    """A compact rich table per (method, lr) that fits 80 columns: final top-1 as mean±std over seeds, the rest
    as means (best epochs and the other figures are in report.md)."""
    from rich import box
    from rich.table import Table

    from spofa_deploy.compare.report import fmt_num, fmt_pm

    mean = lambda st, d=1: fmt_num(st["mean"], d)  # noqa: E731
    t = Table(title=f"spofa compare: {report['title']}\n{len(report['seeds'])} seeds, {report['config']['epochs']} epochs, "
                    f"{report['data']['train_images']} train images; top-1 %: mean±std over seeds, others: means",
              box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("method", "lr", "div.", "top-1", "EMA", "CE spk", "CE peak", "cos"):
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=True, min_width=4)
    for g in report["per_method_lr"]:
        div = f"{g['diverged']}/{g['runs']}"
        t.add_row(g["method"], f"{g['lr']:g}", f"[red]{div}[/]" if g["diverged"] else div,
                  fmt_pm(g["final_top1"]).replace(" ± ", "±"), mean(g["final_ema_top1"]),
                  mean(g["ce_spikes"]), mean(g["ce_peak_ratio"]), mean(g["grad_cos_mean"], 2))
    t.caption = ("div.: diverged runs (NaN/Inf or collapse to chance); CE spk: CE spikes per run; CE peak: largest "
                 "CE loss / first; cos: CE-vs-distillation gradient cosine")
    return t


def decisions_table(report: dict):
    """The pre-registered rules as report.md reads them: each method at its best rate, paired by seed."""
    from rich import box
    from rich.table import Table

    from spofa_deploy.compare.report import fmt_holds, fmt_interval

    t = Table(title="the rules: each method at its best rate, paired by seed", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("rule", "comparison (rates)", "seeds", "diff [95 % interval]", "holds"):
        t.add_column(col, justify="right" if col in ("seeds", "diff [95 % interval]") else "left", no_wrap=True)
    for d in report["decisions"]:
        ci = f" {fmt_interval(d['ci95'])}" if d["ci95"] else ""
        holds = fmt_holds(d)
        t.add_row(d["kind"], f"{d['comparison']}\n[dim]{d['lr']:g} vs {d['lr_baseline']:g}[/]", str(d["n"]),
                  f"{d['mean']:+.2f}{ci}", f"[bold green]{holds}[/]" if d["holds"] else holds)
    t.caption = "rules and notes: report.md"
    return t
