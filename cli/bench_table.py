"""The terminal output of `spofa bench`: a rich table of a `BenchReport`, and the reasons under it."""
from __future__ import annotations

from pathlib import Path

from export.bench.report import BenchReport, VariantResult


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return f"{v:.1f}%" if v is not None else "-"


def _model(r: VariantResult, files: bool) -> str:
    """The model's name, with its file's where several student files are benched."""
    return f"{r.model} {Path(r.artifact).name}" if files and r.role == "student" and r.artifact else r.model


def render_table(report: BenchReport):
    """A rich Table: one row per variant and batch size; skipped/failed variants in one row with a mark.

    With several student files, each student row names its file, and "agree fp32" is its top-1 agreement with
    the fp32 reference (a note under the table names it). The reasons are in `report_reasons(report)`
    (printed under the table by `print_report`).
    """
    from rich.table import Table

    t = Table(title="spofa bench", caption=report.settings.get("timing_note"), caption_justify="left",
              pad_edge=False, collapse_padding=True)
    t.add_column("model", min_width=8, overflow="fold")
    t.add_column("role", no_wrap=True)
    t.add_column("backend", min_width=9, overflow="fold")
    t.add_column("prec", no_wrap=True)
    compiled = any(b.compile_s is not None for r in report.results for b in r.batches)
    files = len({r.artifact for r in report.students}) > 1
    fp32 = any(r.accuracy and r.accuracy.agreement_fp32 is not None for r in report.results)
    cols = ("batch", "median ms", "p99 ms", "img/s", "top-1", "agree") + (("agree fp32",) if fp32 else ()) \
        + ("size", "speed-up") + (("compile s",) if compiled else ())
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    # Several files: the students in the order given (main file first); one file: by key, as always.
    for r in sorted(report.results, key=lambda r: (r.role != "student", "" if files else r.key)):
        top1 = f"{r.accuracy.top1:.2f}%" if r.accuracy else "-"
        agree = _pct(r.accuracy.agreement if r.accuracy else None)
        agree32 = (_pct(r.accuracy.agreement_fp32 if r.accuracy else None),) if fp32 else ()
        backend = r.backend + (f" {r.device}" if r.backend in ("torch-eager", "torch-compile") else "")
        backend += " (auto)" if r.backend_requested == "auto" else ""
        head = [_model(r, files), r.role, backend, r.precision]
        extra = ("-",) if compiled else ()
        if not r.batches:
            t.add_row(*head, "-", f"[yellow]{r.status}[/]", "-", "-", top1, agree, *agree32, _fmt_size(r.size_bytes),
                      "-", *extra)
            continue
        for i, br in enumerate(r.batches):
            lat = br.latency
            sp = f"{br.speedup_vs_teacher:.2f}x" if br.speedup_vs_teacher is not None else "-"
            sp += "*" if br.speedup_like_for_like is False else ""
            first = i == 0
            t.add_row(*(head if first else [""] * 4), str(br.batch), _fmt_ms(lat.median_ms), _fmt_ms(lat.p99_ms),
                      f"{lat.throughput_ips:,.0f}", top1 if first else "", agree if first else "",
                      *(agree32 if first else ("",) * len(agree32)),
                      _fmt_size(r.size_bytes) if first else "", sp,
                      *((f"{br.compile_s:.1f}" if br.compile_s is not None else "-",) if compiled else ()))
        if r.status != "ok":
            t.add_row("", "", "", "", "", f"[yellow]{r.status}[/]", "", "", "", "", "", "", *("",) * len(agree32),
                      *extra)
    return t


def report_reasons(report: BenchReport) -> list[str]:
    """One line per skipped or failed variant, with its reason; one per speed-up across backends."""
    lines = [f"{r.status}: {r.role} {r.model} {r.backend} {r.precision}: {r.reason}"
             for r in report.results if r.status != "ok"]
    lines += [f"failed at batch {b}: {r.role} {r.model} {r.backend} {r.precision}: {why}"
              for r in report.results if r.status == "ok" for b, why in r.batch_failures.items()]
    for s in report.students:
        if any(b.speedup_like_for_like is False for b in s.batches):
            t = report.get(s.teacher)
            lines.append(f"* speed-up across different backends: student {s.backend} {s.precision} on {s.device} vs "
                         f"teacher {t.backend} {t.precision} on {t.device} (the runtime's speed is part of the ratio)")
    return lines


def print_report(report: BenchReport, console=None) -> None:
    """Print the table and the notes (stdout by default)."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or pipe: no reason to squeeze the table into 80 columns
            console = Console(width=max(console.width, 140))
    console.print(render_table(report))
    for line in report_reasons(report):
        console.print(line, style="yellow", markup=False)
    for n in report.notes:
        console.print(f"note: {n}", markup=False)
