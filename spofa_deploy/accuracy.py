"""Top-k accuracy counts (the one definition training evaluation, export and bench share), a student's
agreement with its teacher, and whether its teacher could have taught it anything."""
from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """How many rows of `logits` have their label among the top k classes, for each k in `ks`.

    k is capped at the number of classes (top-5 of a 3-class model is top-3). The counts
    stay on the logits' device (no host sync), so a loop can sum them and read them once.

    Args:
        logits: (N, C) scores.
        labels: (N,) class indices.
        ks: the k values.

    Returns:
        One 0-d integer tensor per k.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.to(top.device)[:, None]
    return [hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]


@torch.inference_mode()
def agreement(a: torch.nn.Module, b: torch.nn.Module, loader, device: torch.device) -> float:
    """Share (in %) of the images of `loader` on which `a` and `b` predict the same class.

    A student's top-1 agreement with its teacher (its fidelity): how much of the teacher's
    behaviour it took on, beside how accurate it is (Stanton et al., NeurIPS 2021).
    """
    modes = a.training, b.training
    a.eval(), b.eval()
    same = n = 0
    for images, _ in loader:
        images = images.to(device)
        same += int((a(images).argmax(1) == b(images).argmax(1)).sum())
        n += len(images)
    a.train(modes[0]), b.train(modes[1])
    return 100.0 * same / max(n, 1)


TEACHER_ADVICE = ("use a stronger teacher: pretrained weights (a warm timm cache, or --teacher-weights FILE), "
                  "a teacher trained elsewhere (--teacher-ckpt), or a longer teacher stage (--teacher-epochs)")
# The same for `spofa compare`, which takes its teacher's weights only through a checkpoint.
COMPARE_TEACHER_ADVICE = ("use a stronger teacher: one trained elsewhere or from pretrained weights, passed with "
                          "--teacher-ckpt (e.g. from `spofa teacher --teacher-weights FILE`), or a longer teacher "
                          "stage (--teacher-epochs)")


def transfer_check(student_top1: float | None, teacher_top1: float | None, *, reference_top1: float | None = None,
                   reference: str = "the student trained alone", advice: str = TEACHER_ADVICE) -> dict:
    """Whether the teacher could have taught this student anything, as recorded in `student.json` (`transfer`).

    A teacher no more accurate than its student has little to pass on beyond a regularising
    effect of about a point (Furlanello et al. 2018; Yuan et al. 2020; Stanton et al. 2021):
    the note says so, with what to do, when the distilled student ends at or above its
    teacher, or when the teacher is below a student-alone reference (`reference_top1`).

    Returns:
        {"teacher_top1", "student_top1", "reference_top1", "note"}: `note` is None when the
        teacher is above both, else one sentence for the user.
    """
    note = None
    if teacher_top1 is not None and reference_top1 is not None and teacher_top1 <= reference_top1:
        note = (f"the teacher ({teacher_top1:.2f}% val top-1) is not above {reference} ({reference_top1:.2f}%): "
                f"distillation cannot be expected to help; {advice}")
    elif teacher_top1 is not None and student_top1 is not None and student_top1 >= teacher_top1:
        note = (f"the distilled student ({student_top1:.2f}% val top-1) ends at or above its teacher "
                f"({teacher_top1:.2f}%): a teacher no better than its student has little to teach; {advice}")
    return {"teacher_top1": teacher_top1, "student_top1": student_top1, "reference_top1": reference_top1, "note": note}
