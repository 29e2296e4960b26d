"""Teacher vs student latency in PyTorch (random weights), side by side, from the command line.

    python benchmarks/bench_models.py --backends torch-eager,torch-cudagraph --batch 1,256 --json out.json
"""
from __future__ import annotations

import argparse

import timm

from cli.bench_table import print_report
from export.bench.report import write_report_json
from export.bench.run import bench_models
from export.bench.timing import TimingOptions
from spofa_deploy.models import resolve_model_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="vit_b")
    ap.add_argument("--student", default="mobilenetv3")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--backends", default="torch-eager,torch-cudagraph,torch-compile")
    ap.add_argument("--batch", default="1,256")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--min-s", type=float, default=1.0)
    ap.add_argument("--warmup-s", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t_name, s_name = resolve_model_name(a.teacher), resolve_model_name(a.student)
    teacher, student = timm.create_model(t_name), timm.create_model(s_name)
    rep = bench_models(teacher, student, img_size=a.img_size, backends=a.backends.split(","),
                       batch_sizes=[int(b) for b in a.batch.split(",")], precision=a.precision, device=a.device,
                       timing=TimingOptions(min_s=a.min_s, warmup_s=a.warmup_s, rounds=a.rounds), student_name=s_name,
                       teacher_name=t_name)
    print_report(rep)
    if a.json:
        write_report_json(rep, a.json)


if __name__ == "__main__":
    main()
