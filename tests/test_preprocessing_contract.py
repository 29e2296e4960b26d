"""The sidecar is the whole preprocessing contract: a client that reads only it reproduces the recorded top-1.

The client here is independent of this project's code: PIL opens the images, timm's own eval transform is
built from the sidecar's fields, ONNX Runtime runs the exported model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spofa_deploy.data.loaders import build_transforms
from spofa_deploy.models import Preprocessing

CLASSES = ("bars", "cross", "dots")


def _image(kind: str, rng: np.random.Generator) -> Image.Image:
    """A non-square picture whose class shows only in its centre, with a noisy border a crop would cut."""
    h, w = 52, 40
    a = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    c = a[12:40, 6:34]
    if kind == "bars":
        c[:, ::4] = 230
    elif kind == "cross":
        c[12:16, :] = 230
        c[:, 12:16] = 230
    else:
        c[4::8, 4::8] = 250
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        for kind in CLASSES:
            (root / split / kind).mkdir(parents=True)
            for i in range(n):
                _image(kind, rng).save(root / split / kind / f"{i}.png")
    return root


def _client_top1(onnx_path: Path, folder: Path) -> tuple[float, list[np.ndarray]]:
    """What a user's own client does: the sidecar, timm's eval transform, PIL, ONNX Runtime."""
    import onnxruntime as ort
    import timm.data

    side = json.loads(Path(str(onnx_path) + ".json").read_text())
    tf = timm.data.create_transform(input_size=(3, side["img_size"], side["img_size"]), is_training=False,
                                    interpolation=side["interpolation"], mean=side["mean"], std=side["std"],
                                    crop_pct=side["crop_pct"], crop_mode=side["crop_mode"])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct, inputs = 0, []
    for label, kind in enumerate(side["classes"]):
        for path in sorted((folder / "val" / kind).glob("*.png"), key=lambda p: int(p.stem)):
            x = tf(Image.open(path).convert("RGB")).numpy()[None]
            inputs.append(x)
            correct += int(sess.run(None, {name: x})[0].argmax() == label)
    return 100.0 * correct / len(inputs), inputs


@pytest.mark.parametrize("size", [32, 64])
def test_a_client_reading_only_the_sidecar_reproduces_the_recorded_top1(folder: Path, tmp_path: Path, size: int) -> None:
    from export.exporter import export_model
    from export.options import ExportOptions, ParityOptions
    from spofa_deploy.artifacts import read_model_meta
    from spofa_deploy.data.splits import DataOptions
    from spofa_deploy.teacher.stage import TeacherOptions, train_teacher
    from spofa_deploy.train.loop import TrainConfig

    opts = TeacherOptions(name="test_resnet", pretrained=False,
                          train=TrainConfig(epochs=2, lr=3e-3, batch_size=16, optimizer="adamw", workers=0, device="cpu"))
    model = train_teacher(teacher=opts, data=DataOptions(f"imagefolder:{folder}", size), out=tmp_path / "run")
    recorded = read_model_meta(model)
    onnx_path = export_model(model, ExportOptions("onnx", out=tmp_path / "model.onnx", parity=ParityOptions(samples=8))).path
    side = json.loads(Path(str(onnx_path) + ".json").read_text())
    assert (side["crop_pct"], side["crop_mode"]) == ((1.0, "squash") if size < 64 else (recorded["crop_pct"], "center"))

    top1, inputs = _client_top1(onnx_path, folder)
    assert top1 == pytest.approx(recorded["top1"], abs=1e-9)
    # Image by image, the client's tensors are the ones training evaluated on (the same resize and crop).
    ours = build_transforms(Preprocessing.from_meta(recorded), train=False)
    for kind_i, kind in enumerate(CLASSES):
        for i, path in enumerate(sorted((folder / "val" / kind).glob("*.png"), key=lambda p: int(p.stem))):
            assert np.array_equal(ours(Image.open(path).convert("RGB")).numpy()[None], inputs[kind_i * 8 + i])
    if size < 64:  # the contract recorded before (crop 0.9, centre crop) would have fed other images
        import timm.data

        old = timm.data.create_transform(input_size=(3, size, size), is_training=False, crop_pct=0.9,
                                         interpolation=side["interpolation"], mean=side["mean"], std=side["std"])
        assert not np.array_equal(old(Image.open(folder / "val" / "bars" / "0.png").convert("RGB")).numpy()[None],
                                  inputs[0])
