"""Teachers made elsewhere, used as they are: timm's `hf-hub:` and `local-dir:` names (a folder written by
`timm.models.save_for_hf`, or a warm hub cache), and the checkpoints timm's training script writes
(`model_best.pth.tar`, `.pth`, `.safetensors`; EMA weights where the file has them).

`stage.find_teacher` (through `trained_for`, `build` and `check_classes` here) checks the classes the teacher was trained for against the data's, evaluates it once on
the validation split and writes it as a teacher file (`teacher.safetensors` + `teacher.json`, with where
it came from) that distillation uses like one of its own, with no teacher stage. Checkpoints are read by
timm's own loader with `weights_only=True` (tensors, plain containers and argparse.Namespace, which timm's
checkpoints carry: never arbitrary pickled objects).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from spofa_deploy.errors import UserError
from spofa_deploy.timm_files import checkpoint_state, classifier_width, hub_config, is_hub_or_dir

def is_foreign(name: str, checkpoint: str | Path | None) -> bool:
    """Whether the teacher was made elsewhere: a checkpoint without our sidecar, or an `hf-hub:`/`local-dir:` name."""
    from spofa_deploy.artifacts import sidecar_path

    return not sidecar_path(checkpoint).is_file() if checkpoint else is_hub_or_dir(name)


@dataclass(frozen=True)
class TrainedFor:
    """The classes a teacher made elsewhere was trained for: their number, and their names where it says."""

    num_classes: int
    label_names: tuple[str, ...] | None


def architecture(name: str) -> str:
    """The timm architecture behind a teacher name (an alias, a timm name, or an `hf-hub:`/`local-dir:` name)."""
    from spofa_deploy.models import resolve_model_name

    return hub_config(name)[1] if is_hub_or_dir(name) else resolve_model_name(name)


@dataclass(frozen=True)
class Origin:
    """Where a teacher made elsewhere comes from, its `hf-hub:`/`local-dir:` config read once for its adoption."""

    name: str  # --teacher: an alias, a timm name, or an `hf-hub:`/`local-dir:` name
    checkpoint: str | Path | None  # a timm checkpoint of that architecture, or None: the hub / folder weights
    architecture: str  # the timm architecture
    config: dict | None  # timm's pretrained config of an `hf-hub:`/`local-dir:` name (None for other names)

    @classmethod
    def read(cls, name: str, checkpoint: str | Path | None) -> "Origin":
        """The origin of teacher `name` (with `checkpoint`), reading a hub or folder config once."""
        from spofa_deploy.models import resolve_model_name

        config, arch = hub_config(name) if is_hub_or_dir(name) else (None, resolve_model_name(name))
        return cls(name, checkpoint, arch, config)


def trained_for(origin: Origin) -> TrainedFor:
    """The classes of a teacher made elsewhere: from its checkpoint's classifier, or its hub / folder config."""
    if origin.checkpoint is not None:
        width = classifier_width(origin.architecture, checkpoint_state(origin.checkpoint))
        if width is None:
            raise UserError(f"checkpoint {origin.checkpoint} has no classifier weights for {origin.architecture}: is "
                            "--teacher the architecture it was trained as?")
        return TrainedFor(width, None)
    cfg = origin.config
    labels = cfg.get("label_names")
    return TrainedFor(int(cfg.get("num_classes", 0)), tuple(labels) if labels else None)


def check_classes(found: TrainedFor, classes: list[str], who: str) -> str:
    """How the teacher's classes were checked against the data's ("names" or "count only").

    Raises:
        UserError: a mismatch, naming both sides and the fine-tuning flag.
    """
    fix = ("pass --teacher-finetune to re-initialise its classifier and fine-tune it on this data, or choose "
           "another teacher")
    if found.label_names is not None:
        if list(found.label_names) != list(classes):
            raise UserError(f"teacher {who} was trained for {found.num_classes} classes {list(found.label_names)[:5]}"
                            f"..., not this data's {len(classes)} {list(classes)[:5]}...: {fix}")
        return "names"
    if found.num_classes != len(classes):
        raise UserError(f"teacher {who} has {found.num_classes} outputs, this data {len(classes)} classes: {fix}")
    return "count only"


def source_slug(origin: Origin) -> str:
    """The name of the adopted teacher's folder: its architecture and a digest of where it came from."""
    import hashlib

    from spofa_deploy.artifacts import file_digest

    name = origin.name
    if origin.checkpoint is not None:
        tag = file_digest(origin.checkpoint)["sha256"]
    elif name.startswith("local-dir:"):
        files = sorted(p for p in Path(name.partition(":")[2]).rglob("*") if p.is_file())
        tag = hashlib.sha256("".join(file_digest(p)["sha256"] for p in files).encode()).hexdigest()
    else:
        tag = hashlib.sha256(name.encode()).hexdigest()
    return f"{origin.architecture}-adopted-{tag[:12]}"


def build(origin: Origin, num_classes: int, img_size: int) -> torch.nn.Module:
    """The teacher with its own weights and classifier, at `img_size` (timm resamples position embeddings)."""
    from spofa_deploy.models import create_model

    if origin.checkpoint is not None:
        return create_model(origin.architecture, num_classes, img_size, weights=origin.checkpoint)
    return create_model(origin.name, num_classes, img_size, pretrained=True, architecture=origin.architecture)
