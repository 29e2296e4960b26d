"""The terminal output of `spofa bench`: a rich table of a `BenchReport`, and the reasons under it."""
from __future__ import annotations

from export.bench.report import BenchReport


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


def render_table(report: BenchReport):
    """A rich Table: one row per variant and batch size; skipped/failed variants in one row with a mark.

    The reasons are in `report_reasons(report)` (printed under the table by `print_report`).
    """
    from rich.table import Table

    t = Table(title="spofa bench", caption=report.settings.get("timing_note"), caption_justify="left",
              pad_edge=False, collapse_padding=True)
    t.add_column("model", min_width=8, overflow="fold")
    t.add_column("role", no_wrap=True)
    t.add_column("backend", min_width=9, overflow="fold")
    t.add_column("prec", no_wrap=True)
    compiled = any(b.compile_s is not None for r in report.results for b in r.batches)
    cols = ("batch", "median ms", "p99 ms", "img/s", "top-1", "agree", "size", "speed-up") + (("compile s",) if compiled else ())
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for r in sorted(report.results, key=lambda r: (r.role != "student", r.key)):
        top1 = f"{r.accuracy.top1:.2f}%" if r.accuracy else "-"
        agree = f"{r.accuracy.agreement:.1f}%" if r.accuracy and r.accuracy.agreement is not None else "-"
        backend = r.backend + (f" {r.device}" if r.backend in ("torch-eager", "torch-compile") else "")
        backend += " (auto)" if r.backend_requested == "auto" else ""
        head = [r.model, r.role, backend, r.precision]
        extra = ("-",) if compiled else ()
        if not r.batches:
            t.add_row(*head, "-", f"[yellow]{r.status}[/]", "-", "-", top1, agree, _fmt_size(r.size_bytes), "-", *extra)
            continue
        for i, br in enumerate(r.batches):
            lat = br.latency
            sp = f"{br.speedup_vs_teacher:.2f}x" if br.speedup_vs_teacher is not None else "-"
            sp += "*" if br.speedup_like_for_like is False else ""
            first = i == 0
            t.add_row(*(head if first else [""] * 4), str(br.batch), _fmt_ms(lat.median_ms), _fmt_ms(lat.p99_ms),
                      f"{lat.throughput_ips:,.0f}", top1 if first else "", agree if first else "",
                      _fmt_size(r.size_bytes) if first else "", sp,
                      *((f"{br.compile_s:.1f}" if br.compile_s is not None else "-",) if compiled else ()))
        if r.status != "ok":
            t.add_row("", "", "", "", "", f"[yellow]{r.status}[/]", "", "", "", "", "", "", *extra)
    return t


def report_reasons(report: BenchReport) -> list[str]:
    """One line per skipped or failed variant, with its reason; one per speed-up across backends."""
    lines = [f"{r.status}: {r.role} {r.model} {r.backend} {r.precision}: {r.reason}"
             for r in report.results if r.status != "ok"]
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
