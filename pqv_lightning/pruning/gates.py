"""VTP learnable sparsity gates (Zhu et al., "Visual Transformer Pruning"): attach, penalise, fold, prune.

A gate is a learnable coefficient per prunable channel, multiplied into the features (VTP eq. 5) and pushed
towards zero by an L1 penalty. Here, in every timm ``Block``:

* attention: one gate per head dimension, shared by all heads and by q, k and v, on the output of ``attn.qkv``.
  The pruning engine removes the same head dimensions from every head (q, k, v and ``proj`` together), so one
  gate per head dimension scores exactly what can be removed, and a zero gate means the dimension is unused
  (it adds nothing to the attention logits nor to the values). VTP gates the features entering a layer
  (eqs. 8-10); gating q, k and v alike is what makes the removal match the gate.
* MLP: one gate per hidden channel, on the input of ``mlp.fc2`` (after the activation, VTP eq. 10).

Both gates sit next to a linear layer, so folding them into its weight rows (qkv, and bias) or columns (fc2)
is exact.
Pruning goes through :func:`pqv_lightning.pruning.prune` with a torch-pruning importance built from the gate
magnitudes, so the pruned structure is the same plain data (checkpoint, resume, replay) as any other pruning.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from pqv_lightning.pruning.engine import check_supported, prune
from pqv_lightning.pruning.spec import PruningResult, PruningSpec
from pqv_lightning.utils.checks import check_number

__all__ = [
    "GATE_NAME",
    "GateImportance",
    "attach_gates",
    "fold_gates",
    "gate_importance",
    "gate_l1",
    "gates_of",
    "has_gates",
    "prune_by_gates",
    "remove_gates",
]

#: Name of the gate parameter registered on each gated ``attn.qkv`` / ``mlp.fc2`` (state-dict key suffix).
GATE_NAME = "pqv_gate"
_HOOK = "_pqv_gate_hook"


def _gated_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Linear, int]]:
    """(name, owner, gated linear, channels per gate) for every attention and MLP of a timm ViT.

    Attention gates scale the *outputs* of ``qkv`` (q, k and v of a head dimension alike), MLP gates the
    *inputs* of ``fc2``.
    """
    for i, blk in enumerate(model.blocks):
        yield f"blocks.{i}.attn", blk.attn, blk.attn.qkv, int(blk.attn.head_dim)
        yield f"blocks.{i}.mlp", blk.mlp, blk.mlp.fc2, int(blk.mlp.fc2.in_features)


def _tiled(gate: torch.Tensor, width: int) -> torch.Tensor:
    return gate.repeat(width // gate.numel())


# The hooks read the gate from the module they run on, so a deep copy (e.g. a teacher) uses its own copy.
def _gate_output(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * _tiled(getattr(module, GATE_NAME), out.shape[-1])


def _gate_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] * _tiled(getattr(module, GATE_NAME), args[0].shape[-1]), *args[1:])


def has_gates(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, GATE_NAME, None), nn.Parameter) for m in model.modules())


def gates_of(model: nn.Module) -> dict[str, nn.Parameter]:
    """Gate parameters by the name of the layer they gate (``blocks.0.attn.qkv``, ``blocks.0.mlp.fc2``, ...)."""
    return {
        name: getattr(m, GATE_NAME)
        for name, m in model.named_modules()
        if isinstance(getattr(m, GATE_NAME, None), nn.Parameter)
    }


def attach_gates(model: nn.Module, init: float = 1.0) -> dict[str, nn.Parameter]:
    """Add a gate (initialised to ``init``, so the function is unchanged at 1) to every attention and MLP.

    Only timm ``VisionTransformer`` models (the pruning engine's ``vit`` family, head dimensions pruned) are
    supported. The gates become parameters of ``model`` (so any optimizer built over its parameters trains them).
    """
    family = check_supported(model)
    if family.name != "vit":
        raise ValueError(
            f"Sparsity gates support the 'vit' family (timm VisionTransformer); this model is {family.name!r}."
        )
    if has_gates(model):
        raise ValueError("The model already has sparsity gates.")
    device = next(model.parameters()).device
    for _, owner, linear, width in _gated_sites(model):
        linear.register_parameter(GATE_NAME, nn.Parameter(torch.full((width,), float(init), device=device)))
        if linear is getattr(owner, "qkv", None):
            handle = linear.register_forward_hook(_gate_output)
        else:
            handle = linear.register_forward_pre_hook(_gate_input)
        object.__setattr__(linear, _HOOK, handle)
    return gates_of(model)


def remove_gates(model: nn.Module) -> None:
    """Drop gates and their hooks without folding (the weights are about to be overwritten, e.g. on resume)."""
    for m in model.modules():
        handle = m.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()
        if GATE_NAME in m._parameters:
            del m._parameters[GATE_NAME]


@torch.no_grad()
def fold_gates(model: nn.Module) -> None:
    """Multiply each gate into the weight columns of the layer it feeds, then remove it: same outputs, no gates."""
    for _, owner, linear, _ in _gated_sites(model):
        gate = getattr(linear, GATE_NAME, None)
        if not isinstance(gate, nn.Parameter):
            continue
        gate = gate.detach().to(linear.weight.dtype)
        if linear is getattr(owner, "qkv", None):  # output channels: rows of the weight, and the bias
            linear.weight.mul_(_tiled(gate, linear.out_features)[:, None])
            if linear.bias is not None:
                linear.bias.mul_(_tiled(gate, linear.out_features))
        else:  # input channels: columns of the weight
            linear.weight.mul_(_tiled(gate, linear.in_features))
    remove_gates(model)


def gate_l1(model: nn.Module) -> torch.Tensor:
    """Sum of the absolute gate values (VTP's sparsity term, without lambda)."""
    gates = list(gates_of(model).values())
    if not gates:
        raise ValueError("The model has no sparsity gates (attach_gates first).")
    return torch.stack([g.abs().sum() for g in gates]).sum()


class GateImportance(tp.importance.Importance):
    """torch-pruning importance: a channel's score is the magnitude of its gate.

    ``scores`` maps each gated linear layer to its gate magnitudes; ``qkv`` layers are gated on their output
    channels, the others (``mlp.fc2``) on their input channels. A group is scored by the gated channels it
    contains (mean over q, k and v); groups without a gated layer are not pruned.
    """

    def __init__(self, scores: dict[nn.Module, torch.Tensor], output_gated: set[nn.Module] | None = None) -> None:
        self.scores = scores
        self.output_gated = output_gated or set()

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        width = len(group[0].idxs)
        total, count = torch.zeros(width), torch.zeros(width)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            score = self.scores.get(layer)
            if score is None:
                continue
            if layer in self.output_gated:
                if dep.pruning_fn != function.prune_linear_out_channels:
                    continue
                full = _tiled(score, layer.out_features)
            elif dep.pruning_fn == function.prune_linear_in_channels:
                full = _tiled(score, layer.in_features)
            else:
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            local = full[torch.as_tensor(idxs, dtype=torch.long, device=full.device)].cpu()
            where = torch.as_tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, where, local)
            count.scatter_add_(0, where, torch.ones_like(local))
        if not count.any():
            return None
        # Mean over the gated layers touching each channel (q, k and v share one gate: the gate itself).
        return total / count.clamp(min=1)


def gate_importance(model: nn.Module) -> GateImportance:
    """A :class:`GateImportance` from the model's current gate magnitudes (a snapshot, not live values)."""
    if not has_gates(model):
        raise ValueError("The model has no sparsity gates (attach_gates first).")
    scores, output_gated = {}, set()
    for _, owner, linear, _ in _gated_sites(model):
        gate = getattr(linear, GATE_NAME, None)
        if isinstance(gate, nn.Parameter):
            scores[linear] = gate.detach().abs().float().clone()
            if linear is getattr(owner, "qkv", None):
                output_gated.add(linear)
    return GateImportance(scores, output_gated)


def prune_by_gates(
    model: nn.Module,
    ratio: float,
    example_inputs: torch.Tensor,
    global_pruning: bool = False,
    round_to: int | None = None,
    importance: GateImportance | None = None,
) -> PruningResult:
    """Fold the gates, then remove the ``ratio`` of channels with the smallest gates through the pruning engine.

    ``ratio``: fraction of head dimensions (shared by all heads) and of MLP hidden channels removed in each block
    (``global_pruning``: one threshold over all gates, as in VTP; ``ratio`` is then the overall fraction). The
    embedding width is kept. ``importance``: precomputed (e.g. decided on rank 0); default: from the gates.
    """
    check_number("ratio", ratio, 0, 1, max_open=True, accepted="a float in [0, 1)")
    if importance is None:
        importance = gate_importance(model)
    spec = PruningSpec(
        ratio=float(ratio), importance=importance, bottleneck=True, global_pruning=global_pruning, round_to=round_to
    )
    check_supported(model, spec)
    fold_gates(model)
    return prune(model, spec, example_inputs)
