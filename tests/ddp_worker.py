"""Run by tests/test_distributed.py, alone or under torchrun: a few SPOFA steps on digits.

Writes <out>/rank<R>.pt with the student weights, the MEMA baselines after every step,
and the files this rank wrote. The student uses GroupNorm: on CPU (gloo) BatchNorm
statistics stay per rank (SyncBatchNorm needs GPUs), so only batch-independent
normalisation can match one process exactly; the heads' BatchNorms are swapped likewise.
SGD, not Adam: Adam's normalised steps amplify float-rounding differences in tiny gradients.
"""
from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
from timm.layers import GroupNorm1

from spofa_deploy import run_files

from spofa_deploy.train import distributed
from spofa_deploy.data.splits import load_splits
from spofa_deploy.method.distillers import DistillConfig, create_task
from spofa_deploy.models import create_model, data_config
from spofa_deploy.train.hooks import Hooks
from spofa_deploy.train.loop import TrainConfig, fit
from spofa_deploy.models import Preprocessing


def main(out: str, epochs: int, stop_at_step: int, resume: bool) -> None:
    out = Path(out)
    dist = distributed.init_from_env("cpu")
    torch.manual_seed(0)
    teacher = create_model("test_vit", 10, 32).eval()
    student = timm.create_model("test_resnet", num_classes=10, norm_layer=GroupNorm1)
    prep = data_config(teacher)
    splits = load_splits("digits", Preprocessing.from_meta(prep, 32), train_fraction=0.1, seed=0)
    task = create_task("spofa", student, teacher, DistillConfig(), 10,
                       sync=distributed.all_reduce_mean if dist.enabled else None)
    _batchnorm_to_groupnorm(task.heads)  # the projector heads have BatchNorm too
    baselines, writes = [], []
    # The run's two writers, wrapped to record which files this rank wrote (the disk side, not the loop).
    real_checkpoint, real_metrics = run_files.save_checkpoint, run_files.write_metrics
    run_files.save_checkpoint = lambda p, payload: (writes.append(str(p)), real_checkpoint(p, payload))
    run_files.write_metrics = lambda d, h: (writes.append(str(d / "metrics.jsonl")), real_metrics(d, h))

    def hook(step: int) -> None:
        if step == stop_at_step:
            raise SystemExit(3)  # simulated crash, same step on every rank
        baselines.append(torch.cat([task.mema.feat_baseline, task.mema.out_baseline[None]]).clone())

    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    try:
        fit(task, splits, TrainConfig(epochs=epochs, batch_size=32, lr=0.05, optimizer="sgd", workers=0, log_every=1, device="cpu"),
            run, resume=resume, hooks=Hooks(before_update=hook))
    finally:
        torch.save({"net": task.net.state_dict(), "baselines": baselines, "writes": writes},
                   out / f"rank{dist.rank}{'-resumed' if resume else ''}.pt")


def _batchnorm_to_groupnorm(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, GroupNorm1(child.num_features))
        else:
            _batchnorm_to_groupnorm(child)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "resume")
