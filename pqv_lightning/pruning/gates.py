"""VTP learnable sparsity gates (Zhu et al., "Visual Transformer Pruning"): attach, penalise, fold, prune.

A gate is a learnable coefficient per prunable channel, multiplied into the features (VTP eq. 5) and pushed
towards zero by an L1 penalty. Where the gates sit:

* ``vit`` family (timm ``VisionTransformer`` pruned by torch-pruning's whole-model trace), in every ``Block``:
  attention: one gate per head dimension, shared by all heads and by q, k and v, on the output of ``attn.qkv``.
  The pruning engine removes the same head dimensions from every head (q, k, v and ``proj`` together), so one
  gate per head dimension scores exactly what can be removed, and a zero gate means the dimension is unused
  (it adds nothing to the attention logits nor to the values). VTP gates the features entering a layer
  (eqs. 8-10); gating q, k and v alike is what makes the removal match the gate. MLP: one gate per hidden
  channel, on the input of ``mlp.fc2`` (after the activation, VTP eq. 10).
* every other family (pruned by named couplings, :mod:`~pqv_lightning.pruning.couplings`): one gate per position
  of each coupling that names a gate site (``Coupling.gate``), on the input channels of that layer (a linear
  layer or dense convolution reading the coupled channels: ``fc2`` of an MLP, the output projection of the
  attention values), as VTP's eq. 10. That covers MLP hidden channels and expansions, head dims of attention
  with one head dim for q, k and v (gated where the values enter ``proj``), value dims and the linear-attention
  widths; key dims of blocks with separate key and value dims (LeViT, EfficientFormer(V2), TinyViT, class
  attention, GPSA, cascaded group attention) have no layer reading them linearly and are not gated. Where one
  head dim is shared by q, k and v (Swin, BEiT, PiT, ConViT, XCiT, EdgeNeXt, qk-norm ViT, EfficientViT's LiteMLA),
  the gate sees only the value channel: a zero gate makes the value dim unused, but removing it also removes its
  q and k dims, which changes the attention logits a little (exact only for the MLP and value-only couplings and
  for the ``vit`` family's gates on ``qkv``; ``tests/test_families.py`` checks which).

Every gate sits next to a linear layer, so folding it into its weight rows (qkv, and bias) or columns is exact.
Pruning goes through :func:`pqv_lightning.pruning.prune` with a torch-pruning importance built from the gate
magnitudes, so the pruned structure is the same plain data (checkpoint, resume, replay) as any other pruning.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from pqv_lightning.pruning.engine import check_supported, prune
from pqv_lightning.pruning.families import BlockFamily
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

#: Name of the gate parameter registered on each gated layer (state-dict key suffix).
GATE_NAME = "pqv_gate"
#: Non-persistent buffer on a gated layer: for each of its channels, the gate position it takes (``width``: none).
_INDEX = "pqv_gate_index"
_HOOK = "_pqv_gate_hook"
_OUTPUT = "_pqv_gate_output"
_OUT_FNS = (function.prune_linear_out_channels, function.prune_conv_out_channels)
_IN_FNS = (function.prune_linear_in_channels, function.prune_conv_in_channels)


@dataclass
class _Site:
    """A gated layer: ``width`` gates, ``index[c]`` the gate of channel ``c`` (output channels if ``output``)."""

    name: str
    layer: nn.Module
    output: bool
    width: int
    index: torch.Tensor


def _channels(layer: nn.Module, output: bool) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features if output else layer.in_features
    return layer.out_channels if output else layer.in_channels


def _sites(model: nn.Module) -> Iterator[_Site]:
    """Where the gates of ``model`` go (see the module docstring)."""
    family = check_supported(model)
    if family.name == "vit":
        for i, blk in enumerate(model.blocks):
            qkv, fc2 = blk.attn.qkv, blk.mlp.fc2
            hd = int(blk.attn.head_dim)
            yield _Site(f"blocks.{i}.attn.qkv", qkv, True, hd, torch.arange(qkv.out_features) % hd)
            yield _Site(f"blocks.{i}.mlp.fc2", fc2, False, fc2.in_features, torch.arange(fc2.in_features))
        return
    if not isinstance(family, BlockFamily):
        raise ValueError(f"Sparsity gates do not support the {family.name!r} family.")
    spec = PruningSpec(ratio=0.0)
    for coupling in family.couplings(model, spec, []):
        if coupling.gate is None:
            continue
        member = coupling.members[coupling.gate]
        layer = model.get_submodule(member.name)
        if member.out or not (isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)):
            raise ValueError(f"coupling {coupling.name}: gate site {member.name} is not a dense layer's input")
        width = coupling.width
        index = torch.full((_channels(layer, False),), width, dtype=torch.long)
        for p, chans in enumerate(member.channels):
            index[list(chans)] = p % width
        yield _Site(member.name, layer, False, width, index)


def _expanded(module: nn.Module) -> torch.Tensor:
    """The gate of every channel of ``module`` (1 where none)."""
    gate = getattr(module, GATE_NAME)
    return torch.cat([gate, gate.new_ones(1)])[getattr(module, _INDEX)]


def _shaped(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, 1, 1) if isinstance(module, nn.Conv2d) else values


# The hooks read the gate from the module they run on, so a deep copy (e.g. a teacher) uses its own copy.
def _gate_output(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * _shaped(module, _expanded(module))


def _gate_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] * _shaped(module, _expanded(module)), *args[1:])


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
    """Add a gate (initialised to ``init``, so the function is unchanged at 1) to every gateable coupling.

    Any supported family (see the module docstring for where the gates sit); the gates become parameters of
    ``model`` (so any optimizer built over its parameters trains them).
    """
    if has_gates(model):
        raise ValueError("The model already has sparsity gates.")
    sites = list(_sites(model))
    if not sites:
        raise ValueError(f"Sparsity gates: {check_supported(model).name} has no gateable channels.")
    for site in sites:
        linear = site.layer
        # On the gated layer's device and in its dtype: a float32 gate on a bf16 layer would turn its features
        # float32 and break the next layer.
        weight = linear.weight
        gate = torch.full((site.width,), float(init), device=weight.device, dtype=weight.dtype)
        linear.register_parameter(GATE_NAME, nn.Parameter(gate))
        linear.register_buffer(_INDEX, site.index.to(weight.device), persistent=False)
        if site.output:
            handle = linear.register_forward_hook(_gate_output)
        else:
            handle = linear.register_forward_pre_hook(_gate_input)
        object.__setattr__(linear, _HOOK, handle)
        object.__setattr__(linear, _OUTPUT, site.output)
    return gates_of(model)


def remove_gates(model: nn.Module) -> None:
    """Drop gates and their hooks without folding (the weights are about to be overwritten, e.g. on resume)."""
    for m in model.modules():
        handle = m.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()
        m.__dict__.pop(_OUTPUT, None)
        if GATE_NAME in m._parameters:
            del m._parameters[GATE_NAME]
        if _INDEX in m._buffers:
            del m._buffers[_INDEX]


def _gated(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(getattr(m, GATE_NAME, None), nn.Parameter))


@torch.no_grad()
def fold_gates(model: nn.Module) -> None:
    """Multiply each gate into the weight rows or columns of the layer it gates, then remove it: same outputs."""
    for layer in _gated(model):
        gate = _expanded(layer).detach().to(layer.weight.dtype)
        if layer.__dict__.get(_OUTPUT):  # output channels: rows of the weight, and the bias
            layer.weight.mul_(gate.view(-1, *([1] * (layer.weight.dim() - 1))))
            if layer.bias is not None:
                layer.bias.mul_(gate)
        else:  # input channels: columns of the weight
            layer.weight.mul_(gate.view(1, -1, *([1] * (layer.weight.dim() - 2))))
    remove_gates(model)


def gate_l1(model: nn.Module) -> torch.Tensor:
    """Sum of the absolute gate values (VTP's sparsity term, without lambda)."""
    gates = list(gates_of(model).values())
    if not gates:
        raise ValueError("The model has no sparsity gates (attach_gates first).")
    return torch.stack([g.abs().sum() for g in gates]).sum()


class GateImportance(tp.importance.Importance):
    """torch-pruning importance: a channel's score is the magnitude of its gate.

    ``scores`` maps each gated layer to the gate magnitude of each of its channels (output channels for the layers
    in ``output_gated``, input channels for the others). A group is scored by the gated channels it contains
    (their mean, e.g. over q, k and v); groups without a gated layer are not pruned.
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
            full = self.scores.get(layer)
            if full is None or dep.pruning_fn not in (_OUT_FNS if layer in self.output_gated else _IN_FNS):
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            local = full[torch.as_tensor(idxs, dtype=torch.long, device=full.device)].cpu()
            where = torch.as_tensor(root_idxs, dtype=torch.long)
            keep = local >= 0  # channels without a gate (-1) do not score
            total.scatter_add_(0, where[keep], local[keep])
            count.scatter_add_(0, where[keep], torch.ones_like(local[keep]))
        if not count.any():
            return None
        # Mean over the gated layers touching each channel (q, k and v share one gate: the gate itself).
        return total / count.clamp(min=1)


def gate_importance(model: nn.Module) -> GateImportance:
    """A :class:`GateImportance` from the model's current gate magnitudes (a snapshot, not live values)."""
    if not has_gates(model):
        raise ValueError("The model has no sparsity gates (attach_gates first).")
    scores, output_gated = {}, set()
    for layer in _gated(model):
        index = getattr(layer, _INDEX)
        gate = getattr(layer, GATE_NAME).detach().abs().float()
        scores[layer] = torch.cat([gate, gate.new_full((1,), -1.0)])[index].clone()
        if layer.__dict__.get(_OUTPUT):
            output_gated.add(layer)
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
