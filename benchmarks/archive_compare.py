"""Keep a compare's evidence in the repository, and bring it back: every record its report reads, no weights.

A compare folder holds hundreds of MB of weights and checkpoints per run; its report reads only each
finished run's done.json, metrics.jsonl, trace.csv and student.json (docs/commands/compare.md). This
copies compare.json, packs the finished runs' records (plus their log.txt) into runs.tar.gz (a half-done
run is left out: it restarts on resume), and writes report.md, report.json and the plots anew from those
records with this checkout's report code, whatever code trained the runs. Between two readings of a long
compare, `--records-only` packs the runs finished since the last save into a small runs-new-<n>.tar.gz
(one per save, so a repository that commits each save stores each run once) and writes no report (the archived
report stays the last reading); `--restore` unpacks them all, and the next full archive folds them in.

    python benchmarks/archive_compare.py runs/compare-digits-100ep docs/evidence/compare-digits-100ep
    python benchmarks/archive_compare.py --records-only runs/compare-digits-100ep docs/evidence/compare-digits-100ep
    python benchmarks/archive_compare.py --restore docs/evidence/compare-digits-100ep runs/compare-digits-100ep
    spofa compare --resume --out runs/compare-digits-100ep --threads 1 --jobs 2  # teacher: by digest

The teacher is retrained by the compare's own settings and accepted only with the digest in compare.json; a
compare whose runs are all finished reports again without it (from the teacher's record in compare.json).
A retrained teacher has that digest only on the same kind of CPU: PyTorch's kernels follow the instruction set
(measured: the ViT-B/16 of compare-digits-100ep, trained twice on AVX512 machines with one digest, gave another
teacher on an AVX2 machine, 92.20 % instead of 92.76 %).
The teacher stage draws its random init once, whatever the model hub answers, so `--pretrained` and
`--no-pretrained` give the same teacher offline; compares started before it did (compare-digits-100ep,
whose teacher came from a second draw) cannot remake their teacher and stay closed.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import tarfile
from pathlib import Path

from spofa_deploy.artifacts import sidecar_path
from spofa_deploy.compare.report import REPORT_JSON, REPORT_MD
from spofa_deploy.run_files import COMPARE, DONE, METRICS, RUN_LOG, STUDENT_FILE, TRACE

RECORDS = (DONE, METRICS, TRACE, sidecar_path(STUDENT_FILE).name, RUN_LOG)
TARBALL = "runs.tar.gz"
NEW_TARBALLS = "runs-new*.tar.gz"  # one per save since the last full archive: records kept, not yet reported


def archive(src: Path, dst: Path) -> int:
    """Copy the compare's own files to `dst` and pack its finished runs' records; returns the runs packed."""
    _check_replaces(src, dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in [src / COMPARE, src / REPORT_JSON, src / REPORT_MD, *sorted(src.glob("*.png"))]:
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    runs = _finished(src)
    _pack(runs, dst / TARBALL)
    for path in dst.glob(NEW_TARBALLS):
        path.unlink()
    return len(runs)


def archive_records(src: Path, dst: Path) -> int:
    """Keep the finished runs that none of `dst`'s tarballs holds in a new runs-new-<n>.tar.gz, with the
    compare's compare.json, and write no report: the archived report stays the last reading's. Returns the runs
    kept there."""
    if not (dst / TARBALL).is_file():
        raise SystemExit(f"{dst} holds no {TARBALL}: archive the compare in full first")
    kept = _check_replaces(src, dst)
    runs = [run for run in _finished(src) if run.name not in kept]
    if runs:
        _pack(runs, _next_save(dst))
    shutil.copy2(src / COMPARE, dst / COMPARE)
    return len(runs)


def _check_replaces(src: Path, dst: Path) -> set[str]:
    """Refuse to write over an archive from another compare, or from a folder that lacks some of its runs (one
    restored without its runs-new tarballs, say): their records would be lost. Returns the runs `dst` holds."""
    kept = _kept(dst)
    if not (dst / COMPARE).is_file():
        return kept
    ours, theirs = json.loads((src / COMPARE).read_text()), json.loads((dst / COMPARE).read_text())
    if any(ours.get(k) != theirs.get(k) for k in ("started", "teacher_sha256")):
        raise SystemExit(f"{src} is another compare than the one archived in {dst} (another start or teacher)")
    missing = kept - {r.name for r in _finished(src)}
    if missing:
        raise SystemExit(f"{src} lacks {len(missing)} finished runs that {dst} holds ({', '.join(sorted(missing)[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): restore them from {dst} first")
    return kept


def _finished(src: Path) -> list[Path]:
    return sorted(d.parent for d in src.glob(f"*/{DONE}"))


def _tarballs(arch: Path) -> list[Path]:
    return [arch / TARBALL, *sorted(arch.glob(NEW_TARBALLS))]


def _next_save(arch: Path) -> Path:
    """A name after every save's, never one in use (the one-file runs-new.tar.gz of older archives counts as 1)."""
    used = [int(m[1] or 1) for p in arch.glob(NEW_TARBALLS) if (m := re.fullmatch(r"runs-new-?(\d*)\.tar\.gz", p.name))]
    return arch / f"runs-new-{max(used, default=0) + 1:03d}.tar.gz"


def _kept(arch: Path) -> set[str]:
    return {name for t in _tarballs(arch) for name in _runs_in(t)}


def _runs_in(tarball: Path) -> set[str]:
    if not tarball.is_file():
        return set()
    with tarfile.open(tarball) as tar:
        return {Path(m.name).parts[0] for m in tar.getmembers()}


def _pack(runs: list[Path], path: Path) -> None:
    """Write the runs' records to `path` whole or not at all (a machine lost mid-write leaves the old file)."""
    part = path.with_name(path.name + ".part")
    with tarfile.open(part, "w:gz") as tar:
        for run in runs:
            for name in RECORDS:
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"{run.name}/{name}")
    part.replace(path)


def report_again(arch: Path) -> None:
    """Write the archive's report.md and report.json (and, once every run is finished, its plots) anew from its
    records, by this checkout's report code (`spofa compare --resume --report-only` on a restored copy), whatever
    code trained the runs. (The plots of an unfinished compare would only add a megabyte to the repository at
    every archive.)"""
    import tempfile

    from spofa_deploy.compare.plan import resume_config
    from spofa_deploy.compare.run import run_compare

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "compare"
        restore(arch, folder)
        done = run_compare(resume_config(folder), resume=True, report_only=True).report["complete"]
        # Paths as the compare had them (its --out), not the temporary copy's.
        out = json.loads((arch / COMPARE).read_text())["config"]["out"]
        for name in (REPORT_JSON, REPORT_MD):
            (folder / name).write_text((folder / name).read_text().replace(json.dumps(str(folder))[1:-1], out))
        for f in [folder / REPORT_JSON, folder / REPORT_MD, *(sorted(folder.glob("*.png")) if done else [])]:
            shutil.copy2(f, arch / f.name)


def restore(src: Path, dst: Path) -> int:
    """A compare folder at `dst` that `spofa compare --resume --out dst` continues; returns the runs restored."""
    if (dst / COMPARE).exists():
        raise SystemExit(f"{dst} already holds a compare")
    if not (src / TARBALL).is_file():
        raise SystemExit(f"{src} holds no {TARBALL}")
    dst.mkdir(parents=True, exist_ok=True)
    for name in (COMPARE, REPORT_JSON):  # (report.json: the teacher's record of compares from before compare.json kept it)
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for path in _tarballs(src):
        with tarfile.open(path) as tar:
            tar.extractall(dst, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))  # (3.11.4+)
    return len(_kept(src))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--restore", action="store_true", help="src is an archive, dst the compare folder to make")
    mode.add_argument("--records-only", action="store_true",
                      help="pack the runs finished since the last save into a new runs-new-<n>.tar.gz; "
                           "write no report")
    a = ap.parse_args()
    n = (restore if a.restore else archive_records if a.records_only else archive)(Path(a.src), Path(a.dst))
    print(f"{'restored' if a.restore else 'archived'} {n} finished runs: {a.src} -> {a.dst}"
          f"{' (kept, not reported)' if a.records_only else ''}")
    if not (a.restore or a.records_only):
        report_again(Path(a.dst))
        print(f"reported again by this checkout's code: {Path(a.dst) / REPORT_MD}")


if __name__ == "__main__":
    main()
