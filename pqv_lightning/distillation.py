"""Knowledge distillation from a frozen teacher (Hinton et al. soft targets; DeiT's hard-label distillation).

The :class:`Distiller` owns the teacher as a plain Python attribute: it is never a submodule of the student's
LightningModule, so it is not trained, not saved in the student's checkpoint and not wrapped by DDP. A teacher
that exists only in memory (the dense model before pruning) is kept for resume as a side file,
:func:`save_teacher_state` / :func:`load_teacher_state`: written once, found again by path and sha256.

A training step opts in with one call, :func:`distill`, which returns the label loss unchanged while no
distiller is attached (so the same module trains with or without distillation)::

    supports_distillation = True  # class attribute: lets KnowledgeDistillation check the opt-in at setup

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        return distill(self, images, logits, loss)  # (1 - alpha) * loss + alpha * distillation term
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqv_lightning.utils.checks import check_choice, check_number, invalid
from pqv_lightning.utils.io import atomic_write_bytes

__all__ = [
    "MODES",
    "OPT_IN_ATTRIBUTE",
    "Distiller",
    "attach_distiller",
    "detach_distiller",
    "distill",
    "distillation_term",
    "frozen_copy",
    "load_teacher",
    "load_teacher_state",
    "output_classes",
    "save_teacher_state",
    "validate",
]

MODES = ("soft", "hard")
#: Class attribute a LightningModule sets to True once its training step calls :func:`distill`.
OPT_IN_ATTRIBUTE = "supports_distillation"
_DISTILLER = "_pqv_distiller"


def validate(mode: str, temperature: float, alpha: float) -> None:
    """Raise ValueError naming the bad setting and the accepted values."""
    check_choice("mode", mode, MODES)
    check_number("temperature", temperature, 0, min_open=True)  # finite: T = inf makes the soft term inf * 0 = nan
    check_number("alpha", alpha, 0, 1)


def distillation_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str = "soft", temperature: float = 4.0
) -> torch.Tensor:
    """``soft``: KL(teacher/T || student/T) * T^2 (batch mean); ``hard``: cross-entropy on the teacher's argmax."""
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    if mode == "soft":
        t = float(temperature)
        return (
            F.kl_div(
                F.log_softmax(student_logits / t, dim=-1),
                F.log_softmax(teacher_logits / t, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
            * t
            * t
        )
    if mode == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    raise invalid("mode", mode, ", ".join(MODES))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients (a teacher)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    for p in teacher.parameters():
        p.grad = None
    return teacher


def output_classes(model: nn.Module) -> int | None:
    """The class count of a classifier (timm's ``num_classes``, else the last linear layer's width)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def load_teacher(source: str | os.PathLike, teacher_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A frozen teacher from a local file or a timm model name.

    * a Lightning checkpoint of :class:`~pqv_lightning.ViTClassifier` (its ``model``; a pruned structure is rebuilt
      from the checkpoint), loaded with ``weights_only=True``;
    * a timm state-dict file (``.pth``/``.bin``/``.safetensors``): ``teacher_kwargs`` names the architecture,
      ``{"model_name": ..., "num_classes": ..., **timm kwargs}``; loaded through timm's pretrained-file path;
    * a timm model name: timm's released weights (a download); ``teacher_kwargs`` go to ``timm.create_model``.
    """
    from pqv_lightning.models import create_timm_model

    kwargs = dict(teacher_kwargs or {})
    path = os.fspath(source)
    looks_like_file = os.path.sep in path or path.endswith((".ckpt", ".pt", ".pth", ".bin", ".safetensors"))
    if os.path.isfile(path):
        if path.endswith(".ckpt"):
            from pqv_lightning.checkpoint import load_classifier_checkpoint

            model = load_classifier_checkpoint(path).model
        else:
            name = kwargs.pop("model_name", None)
            if name is None or "num_classes" not in kwargs:
                raise ValueError(
                    f"teacher={path!r} is a state-dict file: give its architecture as teacher_kwargs="
                    "{'model_name': <timm name>, 'num_classes': <classes>, ...timm kwargs}."
                )
            model = create_timm_model(name, checkpoint_path=path, **kwargs)
    elif looks_like_file:
        raise FileNotFoundError(f"teacher={path!r} does not exist or is not a file.")
    else:
        num_classes = kwargs.pop("num_classes", None)
        if num_classes is None:
            raise ValueError(f"teacher={path!r} (a timm name) needs teacher_kwargs={{'num_classes': <classes>}}.")
        model = create_timm_model(path, num_classes=int(num_classes), pretrained=True, **kwargs)
    return frozen_copy(model)


def save_teacher_state(teacher: nn.Module, directory: str | os.PathLike) -> tuple[Path, str]:
    """Write ``teacher``'s state dict to ``directory/teacher-<sha256 prefix>.pt`` atomically; return (path, sha256).

    Named by its content, so runs sharing a folder never overwrite each other's teacher.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in teacher.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    sha256 = hashlib.sha256(data).hexdigest()
    path = directory / f"teacher-{sha256[:16]}.pt"
    atomic_write_bytes(path, data)
    return path, sha256


def load_teacher_state(path: str | os.PathLike, sha256: str) -> dict[str, torch.Tensor]:
    """The state dict :func:`save_teacher_state` wrote, loaded with ``weights_only=True`` once its sha256 matches.

    Raises FileNotFoundError when the file is missing and ValueError when its sha256 differs.
    """
    data = Path(path).read_bytes()  # one read: the bytes checked are the bytes loaded
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"{os.fspath(path)!r} has sha256 {actual}, expected {sha256}.")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Distiller:
    """Combines a label loss with the distillation term of a frozen teacher on the same images."""

    def __init__(self, teacher: nn.Module, mode: str = "soft", temperature: float = 4.0, alpha: float = 0.5) -> None:
        validate(mode, temperature, alpha)
        self.teacher = teacher.eval().requires_grad_(False)  # frozen in place: callers pass a copy
        self.mode, self.temperature, self.alpha = mode, float(temperature), float(alpha)
        self.calls = 0
        self.last_term: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Distiller:
        """Move the teacher (and cast its floating tensors to ``dtype``, when given)."""
        self.teacher.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``images``; the teacher first follows them to their device and floating dtype
        (a teacher read from a file or captured in ``setup`` sits on the CPU in float32, while a fit's images may
        be on a GPU, or bf16 / float64 under ``precision="bf16-true"`` / ``"64-true"``)."""
        self.teacher.eval()
        param = next(self.teacher.parameters(), None)
        if param is not None:
            dtype = images.dtype if images.is_floating_point() and param.is_floating_point() else param.dtype
            if param.device != images.device or param.dtype != dtype:
                self.to(images.device, dtype)
        return self.teacher(images)

    def __call__(self, images: torch.Tensor, student_logits: torch.Tensor, label_loss: torch.Tensor) -> torch.Tensor:
        teacher_logits = self.teacher_logits(images)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                f"{tuple(student_logits.shape)}: the teacher must predict the same classes."
            )
        term = distillation_term(student_logits, teacher_logits, self.mode, self.temperature)
        self.calls += 1
        self.last_term = term.detach()
        return (1 - self.alpha) * label_loss + self.alpha * term


def attach_distiller(module: nn.Module, distiller: Distiller) -> None:
    """Make :func:`distill` on ``module`` use ``distiller`` (held outside the module's submodules)."""
    object.__setattr__(module, _DISTILLER, distiller)


def detach_distiller(module: nn.Module) -> None:
    module.__dict__.pop(_DISTILLER, None)


def distill(module: nn.Module, images: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The training loss: ``loss`` as is without a distiller, else ``(1 - alpha) * loss + alpha * term``."""
    distiller = module.__dict__.get(_DISTILLER)
    if distiller is None or not module.training:
        return loss
    return distiller(images, logits, loss)
