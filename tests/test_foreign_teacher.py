"""Teachers made elsewhere, used as they are: folders of timm's `save_for_hf`, checkpoints of timm's training script
(`CheckpointSaver`), plain safetensors; class checks; fine-tuning on request; pickles refused."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch

from spofa_deploy import pipeline
from spofa_deploy.artifacts import load_state, read_model_meta
from spofa_deploy.data.splits import DataOptions
from spofa_deploy.errors import UserError
from spofa_deploy.teacher import stage
from spofa_deploy.teacher.stage import TeacherOptions, find_teacher
from spofa_deploy.train.loop import TrainConfig

DIGITS = [str(d) for d in range(10)]
TRAIN = TrainConfig(epochs=1, lr=2e-3, batch_size=64, optimizer="adamw", workers=0, device="cpu")


def _model(classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("test_resnet", num_classes=classes)


def _no_stage(monkeypatch) -> None:
    monkeypatch.setattr(stage, "train_teacher", lambda **k: pytest.fail("a teacher made elsewhere is used as it is"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_a_save_for_hf_folder_is_used_as_it_is(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = _model()
    timm.models.save_for_hf(model, str(tmp_path / "hf"), model_config={"label_names": DIGITS})
    _no_stage(monkeypatch)
    name = f"local-dir:{tmp_path / 'hf'}"
    path = find_teacher(teacher=TeacherOptions(name=name, train=TRAIN), data=DataOptions("digits", 32))
    meta = read_model_meta(path)
    assert meta["adopted"] is True and meta["source"] == name and meta["classes_checked"] == "names"
    assert meta["model"] == "test_resnet" and meta["classes"] == DIGITS and 0.0 <= meta["top1"] <= 100.0
    assert _same(load_state(path), model.state_dict())
    # Found again without evaluating it again; a distillation names where its teacher came from.
    assert find_teacher(teacher=TeacherOptions(name=name, train=TRAIN), data=DataOptions("digits", 32)) == path
    r = pipeline.distill(student="test_resnet", teacher=TeacherOptions(name=name, train=TRAIN), method="kd",
                         data=DataOptions("digits", 32), out=tmp_path / "run",
                         train=TrainConfig(epochs=1, lr=3e-3, batch_size=64, optimizer="adamw", workers=0, device="cpu"))
    assert r.student["teacher_source"] == name and r.student["teacher_top1"] == meta["top1"]


def test_a_folder_for_other_classes_is_refused_by_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    timm.models.save_for_hf(_model(), str(tmp_path / "hf"), model_config={"label_names": DIGITS[::-1]})
    _no_stage(monkeypatch)
    with pytest.raises(UserError, match="--teacher-finetune"):
        find_teacher(teacher=TeacherOptions(name=f"local-dir:{tmp_path / 'hf'}", train=TRAIN),
                     data=DataOptions("digits", 32))


def test_a_checkpoint_of_timms_training_script_is_used_with_its_ema_weights(tmp_path: Path, monkeypatch) -> None:
    from timm.utils import CheckpointSaver, ModelEmaV3

    monkeypatch.chdir(tmp_path)
    model = _model()
    ema = ModelEmaV3(model)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(0.01)  # EMA weights unlike the model's, to see which ones are read
    (tmp_path / "ckpt").mkdir()
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=argparse.Namespace(model="test_resnet"),
                            model_ema=ema, checkpoint_dir=str(tmp_path / "ckpt"))
    saver.save_checkpoint(epoch=0, metric=50.0)
    best = tmp_path / "ckpt" / "model_best.pth.tar"
    assert best.is_file()
    _no_stage(monkeypatch)
    path = find_teacher(teacher=TeacherOptions(name="test_resnet", checkpoint=str(best), train=TRAIN),
                        data=DataOptions("digits", 32))
    meta = read_model_meta(path)
    assert meta["source"] == f"checkpoint {best}" and meta["classes_checked"] == "count only"
    assert _same(load_state(path), ema.module.state_dict())


def test_plain_safetensors_weights_and_the_class_count(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    save_file(_model(10).state_dict(), tmp_path / "ten.safetensors")
    save_file(_model(5).state_dict(), tmp_path / "five.safetensors")
    _no_stage(monkeypatch)
    ten = find_teacher(teacher=TeacherOptions(name="test_resnet", checkpoint=str(tmp_path / "ten.safetensors"),
                                              train=TRAIN), data=DataOptions("digits", 32))
    assert _same(load_state(ten), _model(10).state_dict())
    five = TeacherOptions(name="test_resnet", checkpoint=str(tmp_path / "five.safetensors"), train=TRAIN)
    with pytest.raises(UserError, match="5 outputs, this data 10 classes.*--teacher-finetune"):
        find_teacher(teacher=five, data=DataOptions("digits", 32))


def test_fine_tuning_on_request_starts_the_stage_from_the_teachers_weights(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    save_file(_model(5).state_dict(), tmp_path / "five.safetensors")
    seen = []
    monkeypatch.setattr(stage, "train_teacher",
                        lambda **k: seen.append(k["teacher"]) or Path(k["out"]) / "teacher.safetensors")
    five = TeacherOptions(name="test_resnet", checkpoint=str(tmp_path / "five.safetensors"), train=TRAIN, finetune=True)
    find_teacher(teacher=five, data=DataOptions("digits", 32))
    (t,) = seen
    assert (t.name, t.weights, t.checkpoint) == ("test_resnet", str(tmp_path / "five.safetensors"), None)
    # The stage's model: the file's weights, its 5-way classifier re-initialised for the data's 10 classes.
    from spofa_deploy.models import create_model

    built = create_model("test_resnet", 10, 32, weights=tmp_path / "five.safetensors").state_dict()
    theirs = _model(5).state_dict()
    assert all(torch.equal(built[k], theirs[k]) for k in theirs if not k.startswith("fc."))
    assert built["fc.weight"].shape[0] == 10


def test_a_pickled_object_is_refused_not_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": _model().state_dict(), "hook": Path("anything")}, bad)  # a class weights_only refuses
    _no_stage(monkeypatch)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        find_teacher(teacher=TeacherOptions(name="test_resnet", checkpoint=str(bad), train=TRAIN),
                     data=DataOptions("digits", 32))


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "convnext_tiny.fb_in22k", "vit_base_resnet26d_224"])
def test_the_classifier_width_is_read_without_building_a_model(name: str, monkeypatch) -> None:
    """The classifier's name comes from timm's pretrained config of the name (its tag's, for a tagged name): the
    one a built model carries, so the width read from a state dict is the width of its classifier."""
    from spofa_deploy import timm_files

    with torch.device("meta"):
        model = timm.create_model(name, num_classes=7)
    assert timm_files._classifier_name(name) == model.pretrained_cfg["classifier"]
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built to find its classifier"))
    assert timm_files.classifier_width(name, model.state_dict()) == 7


def test_teacher_epochs_asked_for_are_not_served_by_a_teacher_of_other_epochs(tmp_path: Path, monkeypatch) -> None:
    """The teacher trained earlier for the data is used as the recipe's whatever its epochs; `--teacher-epochs N`
    (epochs taken as given: no CPU budget) is refused by one of another length rather than silently ignored."""
    monkeypatch.chdir(tmp_path)
    path = stage.recipe_teacher_path("test_resnet", DataOptions("digits", 32))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    (path.parent / stage.CHECKPOINT).write_bytes(b"checkpoint")
    monkeypatch.setattr(stage, "load_checkpoint", lambda p: {"epoch": 4, "config": {"epochs": 4}})
    _no_stage(monkeypatch)
    data = DataOptions("digits", 32)
    recipe = TeacherOptions(name="test_resnet", train=TrainConfig(epochs=30, device="cpu"))
    assert find_teacher(teacher=recipe, data=data) == path  # the recipe, cut by the budget then: used
    given = TeacherOptions(name="test_resnet", train=TrainConfig(epochs=8, device="cpu"), cpu_budget=None)
    with pytest.raises(UserError, match=r"--teacher-epochs 8: .* ran 4 epochs: drop --teacher-epochs"):
        find_teacher(teacher=given, data=data)
    same = TeacherOptions(name="test_resnet", train=TrainConfig(epochs=4, device="cpu"), cpu_budget=None)
    assert find_teacher(teacher=same, data=data) == path


def test_finetune_or_weights_with_a_teacher_of_our_own_are_refused_not_ignored(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ours = tmp_path / "teacher.safetensors"
    _no_stage(monkeypatch)
    monkeypatch.setattr(stage.foreign, "is_foreign", lambda name, ckpt: False)  # a teacher file of spofa's
    ours.write_bytes(b"weights")
    data = DataOptions("digits", 32)
    assert find_teacher(teacher=TeacherOptions(name="test_resnet", checkpoint=str(ours), train=TRAIN), data=data) == ours
    for extra, flag in ((dict(finetune=True), "--teacher-finetune"), (dict(weights="w.safetensors"), "--teacher-weights")):
        with pytest.raises(UserError, match=f"^{flag} does not apply to --teacher-ckpt"):
            find_teacher(teacher=TeacherOptions(name="test_resnet", checkpoint=str(ours), train=TRAIN, **extra), data=data)


def test_a_teacher_trained_earlier_serves_teacher_weights_given_by_any_path_of_its_file(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"w")
    monkeypatch.setattr(stage, "read_model_meta", lambda p: {"source": f"weights file {tmp_path / 'w.safetensors'}"})
    for given in ("w.safetensors", "./w.safetensors", str(tmp_path / "w.safetensors")):
        stage._check_weights_used(TeacherOptions(name="test_resnet", weights=given), tmp_path / "teacher.safetensors")
    with pytest.raises(UserError, match="--teacher-weights other.safetensors: the teacher trained earlier"):
        stage._check_weights_used(TeacherOptions(name="test_resnet", weights="other.safetensors"), tmp_path / "t")
    monkeypatch.setattr(stage, "read_model_meta", lambda p: {"source": "random init"})
    with pytest.raises(UserError, match="started from random init"):
        stage._check_weights_used(TeacherOptions(name="test_resnet", weights="w.safetensors"), tmp_path / "t")


def test_a_teacher_file_without_its_stage_checkpoint_is_retrained_with_a_warning(tmp_path: Path, monkeypatch,
                                                                                caplog) -> None:
    """Killed in its first epoch, or copied in by hand: the stage trains again (it cannot tell which), and says how
    to use the file as it is instead."""
    monkeypatch.chdir(tmp_path)
    path = stage.recipe_teacher_path("test_resnet", DataOptions("digits", 32))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    seen = []
    monkeypatch.setattr(stage, "train_teacher", lambda **k: seen.append(k["resume"]) or path)
    with caplog.at_level("WARNING"):
        assert find_teacher(teacher=TeacherOptions(name="test_resnet", train=TRAIN), data=DataOptions("digits", 32)) == path
    assert seen == [False] and f"pass --teacher-ckpt {path}" in caplog.text
