"""Teacher-output cache: exact and compact records, keys that never mix, and every bad-input path."""
from __future__ import annotations

import errno
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from spofa_deploy.teacher import cache as tc
from spofa_deploy.teacher import cache_record as records
from spofa_deploy.errors import UserError
from spofa_deploy.method.losses import kd_loss, ofa_loss
from spofa_deploy.teacher.cache import TeacherCache
from spofa_deploy.teacher.cache_key import CacheKey, RecordFormat, default_format, fingerprint, split_digest, weights_digest

N, C = 40, 10


def make_key(**over) -> CacheKey:
    base = CacheKey(teacher="a" * 64, data="digits", split=split_digest(np.arange(N) % C), num_samples=N, img_size=32,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=0.875,
                    augmentation="Compose(RandomCrop(32, padding=4))", seed=0, train_fraction=1.0, compute="cpu/fp32/batch8")
    return replace(base, **over)


def teacher_logits(n: int = N, c: int = C, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3


def fill_epoch(cache: TeacherCache, epoch: int, logits: torch.Tensor, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """Put a shuffled epoch in batches, as the training loop does; returns what put() handed back, in index order."""
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed + epoch))
    out = torch.empty_like(logits)
    for idx in order.split(batch):
        out[idx] = cache.put(epoch, idx, logits[idx])
    return out


def epoch_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != tc.MANIFEST) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------------------------------
# Records


def test_fp32_cache_returns_bitwise_what_put_received(tmp_path):
    t = teacher_logits()
    t[0, :4] = torch.tensor([-0.0, 1e-42, 3.4e38, -1e-30])  # signed zero, a denormal, near-max: all kept bit for bit
    writer = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    handed = fill_epoch(writer, 0, t)
    assert writer.commit(0)
    assert torch.equal(handed.view(torch.int32), t.view(torch.int32))

    reader = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    idx = torch.tensor([5, 0, 39, 5, 17])
    got = reader.get(0, idx)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), t[idx].view(torch.int32))
    assert reader.get(1, idx) is None  # another epoch: not cached
    assert "1 epoch(s)" in reader.note


@pytest.mark.parametrize("fmt", ["fp16", "topk"])
def test_cold_and_warm_runs_train_on_the_same_targets(tmp_path, fmt):
    t = teacher_logits()
    writer = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt=fmt, k=3)
    handed = fill_epoch(writer, 2, t)
    assert writer.commit(2)
    got = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt=fmt, k=3).get(2, torch.arange(N))
    assert torch.equal(got, handed)  # what the cold run trained on is what the warm run reads


def test_fp16_error_is_fp16_rounding(tmp_path):
    t = teacher_logits()
    cache = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16")
    fill_epoch(cache, 0, t)
    cache.commit(0)
    got = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16").get(0, torch.arange(N))
    assert not torch.equal(got, t)
    assert ((got - t).abs() <= t.abs() * 2.0**-11 + 2.0**-24).all()


@pytest.mark.parametrize("temperature", [1.0, 4.0, 2.5])
def test_topk_keeps_the_top_probabilities_and_the_tail_mass_at_the_loss_temperature(tmp_path, temperature):
    c, k = 50, 5
    t = teacher_logits(c=c)
    cache = TeacherCache.open(tmp_path, make_key(), num_classes=c, fmt="topk", k=k, temperature=temperature)
    got = cache.put(0, torch.arange(N), t)
    p, q = (t / temperature).softmax(-1), (got / temperature).softmax(-1)
    top = p.topk(k, -1).indices
    assert torch.allclose(q.gather(-1, top), p.gather(-1, top), rtol=2e-3, atol=1e-6)
    rest = 1 - p.gather(-1, top).sum(-1)
    q_rest = q.scatter(-1, top, 0.0)
    assert torch.allclose(q_rest.sum(-1), rest, rtol=5e-3, atol=1e-6)  # the teacher's own tail mass ...
    assert torch.allclose(q_rest.max(-1).values * (c - k), q_rest.sum(-1), rtol=1e-5)  # ... spread evenly
    assert torch.allclose(got.gather(-1, top), t.gather(-1, top), atol=0.02)  # raw logits kept on the top-k


def test_one_topk_record_serves_kd_and_ofa_temperatures(tmp_path):
    t = teacher_logits(c=50)
    kd = TeacherCache.open(tmp_path, make_key(), num_classes=50, fmt="topk", k=5, temperature=4.0)
    fill_epoch(kd, 0, t)
    assert kd.commit(0)
    ofa = TeacherCache.open(tmp_path, make_key(), num_classes=50, fmt="topk", k=5, temperature=1.0)
    assert ofa.folder == kd.folder  # the same record ...
    at1, at4 = ofa.get(0, torch.arange(N)), kd.get(0, torch.arange(N))
    assert not torch.equal(at1, at4)  # ... decoded for each loss's temperature
    tail1 = lambda x: x.softmax(-1).sort(-1, descending=True).values[:, 5:].sum(-1)  # noqa: E731
    assert torch.allclose(tail1(at1), tail1(t), rtol=5e-3)


def test_topk_loss_error_is_bounded_by_the_tail_mass(tmp_path):
    # OFA at tau = 1 is -sum_j p_j log q_j; the record changes p only outside the top k, where both the
    # teacher's and the reconstruction's mass is r, so per sample |dL| <= 2 r max_j |log q_j|.
    g = torch.Generator().manual_seed(0)
    c, n = 1000, 64
    ranks = torch.argsort(torch.rand(n, c, generator=g), -1).float()
    t = -2.0 * torch.log1p(ranks) + 0.3 * torch.randn(n, c, generator=g)  # a power-law tail, p ~ rank^-2
    y, z = t.argmax(-1), 0.5 * t + torch.randn(n, c, generator=g)
    errors = []
    for k in (5, 50):
        cache = TeacherCache.open(tmp_path, make_key(num_samples=n), num_classes=c, fmt="topk", k=k)
        t_hat = cache.put(0, torch.arange(n), t)
        p = t.softmax(-1)
        r = 1 - p.topk(k, -1).values.sum(-1)
        assert abs(cache.tail_mass - float(r.mean())) < 1e-4
        d = (ofa_loss(z, t_hat, y, reduction="none") - ofa_loss(z, t, y, reduction="none")).abs()
        assert (d <= 2 * r * z.log_softmax(-1).abs().max(-1).values + 1e-4).all()
        errors.append(float(d.mean()))
    assert errors[1] < errors[0] / 5


def test_topk_without_tail_mass_stays_finite(tmp_path):
    t = torch.zeros(4, C)
    t[:, 0] = 500.0  # all the mass in one class: the tail's log-mass is -inf before the clamp
    cache = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="topk", k=2, temperature=4.0)
    got = cache.put(0, torch.arange(4), t)
    assert torch.isfinite(got).all()
    assert torch.isfinite(kd_loss(torch.randn(4, C), got, 4.0)) and torch.isfinite(ofa_loss(torch.randn(4, C), got, torch.zeros(4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["fp32", "fp16", "topk"])
def test_put_hands_back_logits_on_their_device(tmp_path, fmt):
    t = teacher_logits(8).cuda()
    cache = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt=fmt, k=3)
    got = cache.put(0, torch.arange(8, device="cuda"), t)
    assert got.device == t.device and got.dtype == torch.float32
    assert torch.equal(cache.get(0, torch.arange(8)), got.cpu())


def test_partial_epochs_miss_then_fill_in(tmp_path):
    t = teacher_logits()
    first = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    first.put(0, torch.arange(0, 20), t[:20])
    first.commit(0)
    second = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    assert torch.equal(second.get(0, torch.arange(5)), t[:5])
    assert second.get(0, torch.tensor([3, 25])) is None  # one sample missing: the whole batch runs the teacher
    second.put(0, torch.arange(20, 40), t[20:])
    assert second.commit(0)
    assert not second.commit(0)  # nothing new: no rewrite
    third = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    assert torch.equal(third.get(0, torch.arange(N)), t)  # the union of both runs


def test_put_checks_shapes(tmp_path):
    cache = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16")
    with pytest.raises(ValueError, match="expected"):
        cache.put(0, torch.arange(4), torch.zeros(4, C + 1))


def test_fp16_overflow_goes_on_with_exact_logits(tmp_path):
    cache = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16")
    t = teacher_logits(8)
    t[0, 0] = 1e6
    assert torch.equal(cache.put(0, torch.arange(8), t), t)
    assert torch.equal(cache.put(0, torch.arange(8, 16), t), t)
    assert not cache.commit(0)
    (msg,) = cache.pop_warnings()
    assert "fp16 range" in msg


@pytest.mark.parametrize("kwargs, match", [({"fmt": "bf8"}, "unknown teacher cache format"),
                                           ({"fmt": "topk", "k": C}, "k < 10"),
                                           ({"max_gb": 0}, "must be positive")])
def test_bad_options_are_user_errors(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        TeacherCache.open(tmp_path, make_key(), num_classes=C, **kwargs)


def test_default_format_by_classes_and_temperature():
    assert default_format(100) == "fp16" and default_format(101) == "topk"
    assert default_format(1000, 4.0) == "fp16"  # KD's softened tail is not kept by top-k


# ---------------------------------------------------------------------------------------------------------------------
# Keys


def test_key_parts_hash_as_plain_values():
    plain = make_key(img_size=32, crop_pct=0.875, mean=(0.5, 0.5, 0.5))
    numpy_typed = make_key(img_size=np.int64(32), crop_pct=np.float64(0.875), mean=[np.float32(0.5)] * 3)
    fmt = RecordFormat.make(C, "fp16")
    assert fingerprint(numpy_typed, fmt) == fingerprint(plain, fmt)


def test_every_key_part_changes_the_fingerprint():
    base = make_key()
    changed = dict(teacher="b" * 64, data="cifar10", split=split_digest(np.arange(N) % 3), num_samples=N + 1,
                   img_size=64, mean=(0.4, 0.5, 0.5), std=(0.5, 0.5, 0.6), interpolation="bicubic", crop_pct=0.9,
                   augmentation="Compose()", seed=1, train_fraction=0.5, compute="cuda/bf16/batch8")
    fp16 = RecordFormat.make(C, "fp16")
    prints = {fingerprint(base, fp16)}
    for name, value in changed.items():
        prints.add(fingerprint(replace(base, **{name: value}), fp16))
    prints |= {fingerprint(base, r) for r in (RecordFormat.make(C + 1, "fp16"), RecordFormat.make(C, "fp32"),
                                              RecordFormat.make(C, "topk", 3), RecordFormat.make(C, "topk", 4),
                                              RecordFormat.make(C, "topk", 3, temperature=2.0))}
    assert len(prints) == 1 + len(changed) + 5
    assert fingerprint(base, RecordFormat.make(C, "topk", 3, 4.0)) == fingerprint(base, RecordFormat.make(C, "topk", 3, 1.0))


def test_weights_digest_follows_content_not_names(tmp_path):
    a, b, c = tmp_path / "teacher.safetensors", tmp_path / "other-name.safetensors", tmp_path / "teacher2.safetensors"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-1")
    c.write_bytes(b"weights-2")
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)
    net = torch.nn.Linear(3, 2)
    state = net.state_dict()
    d0 = weights_digest(state)
    assert weights_digest({k: v.clone() for k, v in state.items()}) == d0
    with torch.no_grad():
        net.bias[0] += 1e-6
    assert weights_digest(net.state_dict()) != d0
    assert weights_digest({"w": torch.ones(2, dtype=torch.bfloat16)}) != weights_digest({"w": torch.ones(2)})
    with pytest.raises(UserError, match="cannot read teacher weights"):
        weights_digest(tmp_path / "missing.safetensors")


def test_split_digest_sees_labels_and_members():
    labels = np.array([0, 1, 1, 2])
    assert split_digest(labels) != split_digest(labels[::-1])
    assert split_digest(labels, ["a.png", "b.png", "c.png", "d.png"]) != split_digest(labels, ["a.png", "b.png", "c.png", "e.png"])
    img = np.zeros((4, 2, 2), np.uint8)
    img2 = img.copy()
    img2[3, 1, 1] = 1
    assert split_digest(labels, img) != split_digest(labels, img2)


@pytest.mark.parametrize("part, value, words", [("teacher", "b" * 64, "teacher (weights)"),
                                                ("seed", 1, "seed (0 here, 1 now)"),
                                                ("img_size", 64, "input size (32 here, 64 now)")])
def test_a_cache_of_another_teacher_or_seed_misses_with_a_note(tmp_path, part, value, words):
    t = teacher_logits()
    old = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    fill_epoch(old, 0, t)
    old.commit(0)
    new = TeacherCache.open(tmp_path, make_key(**{part: value}), num_classes=C, fmt="fp32")
    assert new.get(0, torch.arange(N)) is None
    assert new.note.startswith("teacher cache miss") and words in new.note and "\n" not in new.note
    assert new.folder != old.folder
    assert epoch_files(old.folder) == ["epoch-0000.bin"]  # the other cache is left as it was


def test_a_record_from_another_key_is_never_read_whatever_its_name(tmp_path):
    old = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    fill_epoch(old, 0, teacher_logits())
    old.commit(0)
    new = TeacherCache.open(tmp_path, make_key(seed=1), num_classes=C, fmt="fp32")
    (new.folder / "epoch-0000.bin").write_bytes((old.folder / "epoch-0000.bin").read_bytes())  # a copied/renamed file
    assert new.get(0, torch.arange(N)) is None
    (msg,) = new.pop_warnings()
    assert "damaged" in msg and "fingerprint" in msg


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: the run goes on


def test_unwritable_cache_folder_warns_once_and_never_raises(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = TeacherCache.open(blocker / "cache", make_key(), num_classes=C, fmt="fp16")  # mkdir fails for any user
    (msg,) = cache.pop_warnings()
    assert "not writable" in msg and "goes on" in msg
    t = teacher_logits()
    handed = fill_epoch(cache, 0, t)
    assert torch.allclose(handed, t, rtol=1e-3)
    assert not cache.commit(0)
    assert cache.get(0, torch.arange(4)) is None
    assert cache.pop_warnings() == []  # said once


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_is_still_read(tmp_path):
    t = teacher_logits()
    w = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    fill_epoch(w, 0, t)
    w.commit(0)
    w.folder.chmod(0o555)
    try:
        r = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
        assert torch.equal(r.get(0, torch.arange(N)), t)
        fill_epoch(r, 1, t)
        assert not r.commit(1)
        assert len(r.pop_warnings()) == 1
    finally:
        w.folder.chmod(0o755)


def test_full_disk_leaves_no_file_and_warns_once(tmp_path, monkeypatch):
    def full(f, chunks):
        f.write(bytes(chunks[0])[:10])  # some bytes reach the temp file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(records, "_write_chunks", full)
    cache = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16")
    t = teacher_logits()
    fill_epoch(cache, 0, t)
    assert not cache.commit(0)
    (msg,) = cache.pop_warnings()
    assert "No space left on device" in msg and "goes on" in msg
    assert epoch_files(cache.folder) == []  # neither a partial record nor a temp file
    fill_epoch(cache, 1, t)  # the run goes on without writing
    assert not cache.commit(1)
    assert cache.pop_warnings() == []
    monkeypatch.undo()
    assert TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16").get(0, torch.arange(N)) is None


def _damage_truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _damage_flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-7] ^= 0x10
    p.write_bytes(bytes(b))


def _damage_header(p: Path) -> None:
    p.write_bytes(p.read_bytes().replace(b'"sha256"', b'"sha000"', 1))


@pytest.mark.parametrize("damage, reason", [(_damage_truncate, "truncated"), (_damage_flip, "checksum"),
                                            (_damage_header, "checksum"),
                                            (lambda p: p.write_bytes(b""), "not a teacher cache record"),
                                            (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), "not a teacher cache record")])
def test_half_written_record_is_detected_and_rebuilt(tmp_path, damage, reason):
    t = teacher_logits()
    w = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    fill_epoch(w, 0, t)
    w.commit(0)
    record = w.folder / "epoch-0000.bin"
    damage(record)
    # What a SIGKILL mid-write leaves besides: the writer's temp file (stale after an hour).
    stale = w.folder / ".epoch-0000.bin.k1ll3d.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 2 * tc.STALE_TMP_S,) * 2)

    r = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32")
    assert not stale.exists()
    assert r.get(0, torch.arange(N)) is None  # never trusted
    (msg,) = r.pop_warnings()
    assert "damaged" in msg and reason in msg
    assert r.get(0, torch.arange(3)) is None and r.pop_warnings() == []  # one note per damaged file
    fill_epoch(r, 0, t)
    assert r.commit(0)  # rebuilt
    assert torch.equal(TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32").get(0, torch.arange(N)), t)


def test_size_bound_stops_new_epochs_with_one_note(tmp_path):
    probe = TeacherCache.open(tmp_path / "probe", make_key(), num_classes=C, fmt="fp16")
    one = probe.epoch_bytes()
    manifest = (probe.folder / tc.MANIFEST).stat().st_size
    cache = TeacherCache.open(tmp_path / "cache", make_key(), num_classes=C, fmt="fp16",
                              max_gb=(manifest + 1.5 * one) / 1e9)
    assert cache.size_estimate_bytes(3) == 3 * one
    assert "for 3 epochs" in cache.describe(3) and "bound" in cache.describe(3)
    t = teacher_logits()
    fill_epoch(cache, 0, t)
    assert cache.commit(0)
    assert (cache.folder / "epoch-0000.bin").stat().st_size == one  # the estimate is the real size
    for epoch in (1, 2):
        fill_epoch(cache, epoch, t)
        assert not cache.commit(epoch)
    (msg,) = cache.pop_warnings()
    assert "bound" in msg
    assert epoch_files(cache.folder) == ["epoch-0000.bin"]


def test_concurrent_writers_of_one_epoch_do_not_corrupt(tmp_path, monkeypatch):
    t = teacher_logits()
    a = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16")
    b = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16")
    fill_epoch(a, 0, t, seed=1)  # two compare runs: different batch order, same logits
    fill_epoch(b, 0, t, seed=2)
    real = records._write_chunks

    def interleaved(f, chunks):
        monkeypatch.setattr(records, "_write_chunks", real)
        f.write(bytes(chunks[0])[:5])
        assert b.commit(0)  # b writes and renames its whole file while a's temp file is half written
        real(f, [bytes(chunks[0])[5:], *chunks[1:]])

    monkeypatch.setattr(records, "_write_chunks", interleaved)
    record = a.folder / "epoch-0000.bin"
    assert a.commit(0)
    assert epoch_files(a.folder) == ["epoch-0000.bin"]  # no temp files left
    got = TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp16").get(0, torch.arange(N))
    assert torch.equal(got, t.half().float())
    assert a.pop_warnings() == [] and b.pop_warnings() == []
    assert record.stat().st_size == a.epoch_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# The contract the training loop relies on


def test_exact_cache_trains_bitwise_the_same_student_without_running_the_teacher(tmp_path):
    """A miniature of the loop: per batch get(); on a miss run the teacher and put(); commit per epoch."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 16, generator=g), torch.randint(0, C, (N,), generator=g)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, C)).eval()
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))

    def train(cache: TeacherCache | None) -> torch.Tensor:
        torch.manual_seed(0)
        student = torch.nn.Linear(16, C)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        for epoch in range(2):
            for idx in torch.randperm(N, generator=torch.Generator().manual_seed(epoch)).split(8):
                t = cache.get(epoch, idx) if cache else None
                if t is None:
                    with torch.no_grad():
                        t = teacher(x[idx]).float()
                    t = cache.put(epoch, idx, t) if cache else t
                loss = kd_loss(student(x[idx]), t, 4.0) + torch.nn.functional.cross_entropy(student(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if cache:
                cache.commit(epoch)
        return torch.cat([p.detach().reshape(-1) for p in student.parameters()])

    plain = train(None)
    cold = train(TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32"))
    calls.clear()
    warm = train(TeacherCache.open(tmp_path, make_key(), num_classes=C, fmt="fp32"))
    assert calls == []  # the warm run never ran the teacher
    assert torch.equal(cold, plain) and torch.equal(warm, plain)
