"""The plan of a compare and its resume: which runs, the compare folder and its `compare.json`, the teacher.

`compare.json` keeps the settings, the teacher's path, weights digest and record, and where the compare
started. `open_compare` refuses a new compare over an old one and a resume with other settings;
`compare_teacher` refuses a resume with another teacher than the one it started with (by its digest).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, fields, replace
from datetime import datetime
from pathlib import Path

from spofa_deploy.artifacts import load_state, read_json, read_model_meta
from spofa_deploy.compare.config import RESULT_FIELDS, TEACHER_RECORD, CompareConfig, run_name
from spofa_deploy.compare.record import run_record
from spofa_deploy.compare.report import REPORT_JSON
from spofa_deploy.data.splits import DataOptions, load_splits
from spofa_deploy.errors import UserError
from spofa_deploy.machine import AVX2_KERNELS, avx2_kernels_left_out, cpu_isa, resolve_device
from spofa_deploy.method.distillers import DistillConfig
from spofa_deploy.models import Preprocessing
from spofa_deploy.run_dirs import RUNS_DIR
from spofa_deploy.run_files import COMPARE, DONE
from spofa_deploy.teacher.cache_key import weights_digest
from spofa_deploy.teacher.stage import TeacherOptions, find_teacher, recipe_teacher_path

_log = logging.getLogger(__name__)


def plan_runs(cfg: CompareConfig) -> list[tuple[str, float, int]]:
    """Every (method, lr, seed) of the compare, seed by seed, so that an interrupted compare has whole seeds."""
    return [(m, lr, s) for s in cfg.seed_list() for lr in cfg.lrs for m in cfg.methods]


def open_compare(cfg: CompareConfig, resume: bool, plan: list[tuple],
                 report_only: bool = False) -> tuple[Path, dict | None, dict | None]:
    """The compare folder, its saved header (when it holds one) and, when every run of `plan` is finished or only
    the report is asked for, the saved teacher's record (then no teacher is needed); a new compare over an old one,
    a resume of nothing and a resume with other settings are refused (the teacher of the saved compare is kept)."""
    if resume and cfg.out is None:
        cfg.out = str(latest_compare())
    out = Path(cfg.out or RUNS_DIR / f"compare-{cfg.student}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    saved = read_json(out / COMPARE) if (out / COMPARE).is_file() else None
    if saved and not resume:
        raise UserError(f"{out} already holds a compare: pass --resume to continue it, or choose another --out")
    if resume and saved is None:
        raise UserError(f"--resume: {out} is not a compare folder (no {COMPARE})")
    if not report_only and cpu_kernels(cfg) and (left_out := avx2_kernels_left_out()):
        _log.warning(f"only some of the settings that hold an AVX-512 CPU's kernels to AVX2 are set: on such a CPU, "
                     f"{left_out}; set all of {AVX2_KERNELS}")
    if saved:
        now = asdict(cfg)
        diff = [f"{k}: {saved['config'].get(k)!r} -> {now[k]!r}" for k in RESULT_FIELDS
                if _plain(saved["config"].get(k)) != _plain(now[k])]
        if diff:
            raise UserError(f"--resume with other settings than {out / COMPARE} ({'; '.join(diff)}): "
                            "start a new compare with another --out")
        before = saved.get("teacher_path")
        given = cfg.teacher_ckpt if cfg.teacher_ckpt and Path(cfg.teacher_ckpt) != Path(before or "") else None
        done = report_only or all((out / run_name(*p) / DONE).is_file() for p in plan)
        finished = _saved_teacher(out, saved) if done else None
        if report_only and not finished:
            raise UserError(f"--report-only: {out / COMPARE} keeps no record of its teacher (a compare from an older "
                            "version): resume it without --report-only")
        if finished:
            if given:
                _log.info(f"note: {'only the report is written' if report_only else 'every run of this compare is finished'}"
                          ", so --teacher-ckpt is not used")
            cfg.teacher_ckpt = saved["config"].get("teacher_ckpt")
            return out, saved, finished
        if not saved.get("teacher_sha256"):  # (compares before teacher digests: the path is all there is)
            if given and before:
                raise UserError(f"--resume with another teacher than {before}: start a new compare")
        elif before and not Path(before).is_file():
            if not given and not _is_recipe_teacher(cfg, before):  # (no recipe can remake it)
                raise UserError(f"--resume: this compare's teacher {before} is missing: pass it with --teacher-ckpt "
                                "(it is checked against compare.json's teacher_sha256)")
            recipe = recipe_teacher_path(cfg.teacher, DataOptions(cfg.data, cfg.img_size))
            if not given and not recipe.is_file() and saved.get("cpu_isa") not in (None, cpu_kernels(cfg)):
                # (a retrain here would take the teacher's whole stage and then be refused by the digest)
                raise UserError(f"--resume: this compare's teacher {before} is missing and retrained here it would be "
                                f"another teacher{_isa_hint(cfg, saved)}, or pass the teacher with --teacher-ckpt")
            before = None  # moved to another machine: found or retrained by the recipe, then checked by its digest
        if (there := saved.get("cpu_isa")) and (here := cpu_kernels(cfg)) != there:
            _log.warning(f"this compare started with {there} CPU kernels, {_kernels_here(here)}: its remaining runs "
                         f"sum floats in another order than they would there{_held_to(there, here)}")
        cfg.teacher_ckpt = given or before
    return out, saved, None


def _plain(v):
    """JSON's view of a value (tuples as lists), to compare saved settings with current ones."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _saved_teacher(out: Path, saved: dict) -> dict | None:
    """The teacher's record as compare.json keeps it (or, for a compare from before it did, as its report.json does)."""
    if saved.get("teacher"):
        return saved["teacher"]
    return read_json(out / REPORT_JSON).get("teacher") if (out / REPORT_JSON).is_file() else None


def latest_compare(root: str | Path = RUNS_DIR) -> Path:
    """The most recently started compare folder under `root` (for `--resume` without `--out`): by the start its
    compare.json records (rewritten by every resume and re-report, so not by the file's time)."""
    def started(p: Path) -> str:
        try:
            return str(read_json(p).get("started") or "")
        except UserError:  # (a damaged compare.json: oldest)
            return ""

    found = sorted(Path(root).glob(f"*/{COMPARE}"), key=lambda p: (started(p), p.stat().st_mtime))
    if not found:
        raise UserError(f"--resume: no compare folder ({COMPARE}) under {root}/: pass --out")
    return found[-1].parent


def load_config(out: str | Path) -> CompareConfig:
    """The settings a compare folder was started with."""
    saved = dict(read_json(Path(out) / COMPARE)["config"])
    names = {f.name for f in fields(CompareConfig)}
    loss = saved.pop("loss", None) or {"feat_weight": saved.get("feat_weight", 1.0)}  # (compares before 0.2)
    cfg = CompareConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.loss = DistillConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in loss.items()})
    cfg.methods, cfg.lrs = tuple(cfg.methods), tuple(cfg.lrs)
    return cfg


def resume_config(out: str | Path | None, **explicit) -> CompareConfig:
    """Saved settings of a compare folder, with the options given on the command line (not None) on top."""
    out = Path(out) if out else latest_compare()
    if not (out / COMPARE).is_file():
        raise UserError(f"--resume: {out} is not a compare folder (no {COMPARE})")
    return replace(load_config(out), out=str(out), **{k: v for k, v in explicit.items() if v is not None})


def compare_teacher(cfg: CompareConfig, saved: dict | None, finished: dict | None, img_size: int,
                    num_classes: int) -> tuple[Path, str | None, dict]:
    """The compare's teacher: (path, weights digest, record).

    When every run is finished the report needs only the record compare.json keeps, not the weights: a compare
    carried without them reports again wherever its data is, even where the recipe cannot remake its teacher
    (docs/commands/compare.md). Otherwise the teacher is found or trained, checked against the data, and on
    resume against the teacher the compare started with.
    """
    if finished:
        return Path(saved["teacher_path"]), saved.get("teacher_sha256"), finished
    teacher_path = ensure_teacher(cfg, img_size)
    t_meta = read_model_meta(teacher_path)
    if int(t_meta["img_size"]) != img_size or int(t_meta["num_classes"]) != num_classes:
        raise UserError(f"teacher {teacher_path} was trained at {t_meta['img_size']}px for {t_meta['num_classes']} "
                        f"classes, not {img_size}px and {num_classes} classes ({cfg.data})")
    digest = weights_digest(load_state(teacher_path))
    if saved and saved.get("teacher_sha256", digest) != digest:
        hint = _isa_hint(cfg, saved) if _is_recipe_teacher(cfg, teacher_path) else ""
        raise UserError(f"--resume: the teacher {teacher_path} is not the one this compare started with (its weights "
                        f"differ from compare.json's teacher_sha256){hint}. Pass its teacher with --teacher-ckpt, "
                        "or start a new compare")
    return teacher_path, digest, t_meta


def ensure_teacher(cfg: CompareConfig, img_size: int) -> Path:
    """The one teacher of the compare, through distill's resolver and with the teacher recipe."""
    opts = TeacherOptions(name=cfg.teacher, checkpoint=cfg.teacher_ckpt, pretrained=cfg.teacher_pretrained)
    # The teacher recipe: the folder is shared with later `spofa distill` runs. Epochs given are taken as given.
    opts.train = replace(opts.train, device=cfg.device, amp=cfg.amp, workers=cfg.workers)
    if cfg.teacher_epochs:
        opts.train, opts.cpu_budget = replace(opts.train, epochs=cfg.teacher_epochs), None
    return find_teacher(teacher=opts, data=DataOptions(cfg.data, img_size, download=cfg.download))


def cpu_kernels(cfg: CompareConfig) -> str | None:
    """The instruction set of the CPU kernels a compare on the CPU trains with (None on a GPU: not the CPU's)."""
    return cpu_isa() if resolve_device(cfg.device).type == "cpu" else None


def _is_recipe_teacher(cfg: CompareConfig, path: str | Path) -> bool:
    """Whether `path` is where the teacher recipe writes this compare's teacher (compared by
    teachers/<slug>/teacher.safetensors, so an absolute path or a moved checkout still counts)."""
    return Path(path).parts[-3:] == recipe_teacher_path(cfg.teacher, DataOptions(cfg.data, cfg.img_size)).parts[-3:]


def _isa_hint(cfg: CompareConfig, saved: dict) -> str:
    """Why a teacher retrained by the same recipe can differ: PyTorch's CPU kernels follow the instruction set
    (compare.json's `cpu_isa`: that of the machine the compare started on, when it ran on the CPU)."""
    here, there = cpu_kernels(cfg), saved.get("cpu_isa")
    if there and there != here:
        return (f": {_kernels_here(here)}, the compare started with {there} CPU kernels (a teacher trained on another "
                f"kind of machine has other weights), so resume on an {there} machine")
    return "" if there else (" (the same recipe on another kind of machine gives other weights: CPU kernels of "
                             "another instruction set, AVX2 vs AVX512, or another GPU)")


def _kernels_here(here: str | None) -> str:
    return f"this CPU's kernels are {here}" if here else "here it runs on a GPU"


def _held_to(there: str, here: str | None) -> str:
    """How to train students here with the kernels the compare started with, where that is measured to repeat them."""
    return f" (or here with {AVX2_KERNELS} set)" if there == "AVX2" and here and here.startswith("AVX512") else ""


def compare_header(cfg: CompareConfig, out: Path, saved: dict | None, img_size: int, teacher_path: Path,
                   digest: str | None, t_meta: dict) -> dict:
    """What compare.json holds: the settings and the teacher; where and when it started, kept from the saved one."""
    return {"config": {**asdict(cfg), "out": str(out)}, "img_size": img_size, "teacher_path": str(teacher_path),
            "teacher_sha256": digest, "teacher": {k: t_meta.get(k) for k in TEACHER_RECORD},
            # Where the compare started (its CPU kernels decide a retrained teacher's weights): never rewritten.
            "cpu_isa": saved.get("cpu_isa") if saved else cpu_kernels(cfg),
            "started": saved["started"] if saved else datetime.now().isoformat(timespec="seconds"),
            "previous_wall_s": (saved or {}).get("previous_wall_s", 0.0)}


def read_finished(out: Path, plan: list[tuple], num_classes: int) -> dict[str, dict]:
    """The records of the runs of `plan` that finished earlier (those with a DONE file), by run name.

    Their figures are re-read from the run folders, so they follow this code's definitions.
    """
    records = {}
    for m, lr, s in plan:
        done = out / run_name(m, lr, s) / DONE
        if done.is_file():
            old = read_json(done)
            records[run_name(m, lr, s)] = run_record(
                done.parent, m, lr, s, num_classes, stopped=old.get("status") == "stopped", error=old.get("error"),
                wall_s=old.get("wall_s"), resumed=bool(old.get("resumed")), threads=old.get("threads"),
                cpu_isa=old.get("cpu_isa"), device=old.get("device"))
    return records


def data_info(cfg: CompareConfig, img_size: int) -> dict:
    """Split sizes the student sees (seed 0's subset; every seed draws the same class counts)."""
    import numpy as np

    splits = load_splits(cfg.data, Preprocessing.identity(img_size), seed=0, train_fraction=cfg.train_fraction,
                         download=cfg.download)  # (sizes only: no image is transformed)
    counts = np.bincount(splits.train.labels, minlength=splits.num_classes)
    return {"num_classes": splits.num_classes, "train_images": len(splits.train), "val_images": len(splits.val),
            "train_per_class_min": int(counts.min()), "train_per_class_max": int(counts.max())}
