"""Block handlers for the layers many timm families share (timm's ``layers/``): MLPs, expansions, attention.

Every handler only removes channels *inside* its block (hidden channels, head dimensions, heads), so the block's
input and output widths and everything around it stay valid. What each one fixes afterwards:

* :class:`Hidden` (MLPs, inverted bottlenecks): nothing; the layers' widths are the only state.
* :class:`HeadAttention` (multi-head attention of any qkv layout): the head count and head / key / value dims the
  forward reads, and the softmax scale. Where the block has a fused (``scaled_dot_product_attention``) path whose
  default scale follows the new head dim, the trained scale is folded into the query (weights, bias, or the query
  norm's affine) and ``scale`` set to the new default, so fused and eager compute the same function; where it only
  has an eager path, the trained ``scale`` is kept as it is. Per-head tables (relative-position biases, talking-head
  mixers, temperatures) lose the rows of removed heads. A block whose timm forward reshapes with the *input* width
  (``reshape(B, N, C)``, ``C // num_heads``) gets a forward class of its own that reads the attention width
  (``forward_class``, swapped in on the instance; parameters and state-dict keys unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, ConvMlp, GluMlp, Mlp, SwiGLU

from pqv_lightning.pruning.couplings import HEADS, Coupling, Member, channels, cols, param, rows
from pqv_lightning.pruning.families.base import Block
from pqv_lightning.pruning.spec import PruningSpec

__all__ = [
    "ATTENTION",
    "HEAD_DIM_ATTRS",
    "MLPS",
    "CrossCovarianceAttention",
    "FusedQKVAttention",
    "HeadAttention",
    "Hidden",
    "InterleavedAttention",
    "Proj",
    "SeparateQKVAttention",
    "attend",
    "consumer",
    "cross_covariance",
    "fused_qkv",
    "join",
    "merge_heads",
    "producer",
    "qkv_with_biases",
    "split_heads",
]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _leaves(module: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """The layer itself, or the layers and norms a wrapper (ConvNorm, LinearNorm, ConvNormAct, ...) holds."""
    if isinstance(module, _LAYERS + _NORMS):
        return [(path, module)]
    return [(join(path, n), m) for n, m in module.named_modules() if n and isinstance(m, _LAYERS + _NORMS)]


def producer(prefix: str, root: nn.Module, path: str, chans: tuple[tuple[int, ...], ...]) -> list[Member]:
    """Rows of the layer (and of a wrapper's norm) at ``path``; nothing for an absent or Identity module."""
    module = _get(root, path)
    if module is None:
        return []
    return [rows(join(prefix, p), chans) for p, _ in _leaves(module, path)]


def consumer(prefix: str, root: nn.Module, path: str, chans: tuple[tuple[int, ...], ...]) -> list[Member]:
    """Input columns of the first layer at ``path`` (a wrapper's convolution or linear)."""
    module = _get(root, path)
    if module is None:
        return []
    layer_path, _ = next((p, m) for p, m in _leaves(module, path) if isinstance(m, _LAYERS))
    return [cols(join(prefix, layer_path), chans)]


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        module = root.get_submodule(path) if path else root
    except AttributeError:
        return None
    return None if isinstance(module, nn.Identity) else module


def _first_layer(root: nn.Module, path: str) -> nn.Module:
    module = _get(root, path)
    return next(m for _, m in _leaves(module, path) if isinstance(m, _LAYERS))


def _width_in(layer: nn.Module) -> int:
    return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)


def _width_out(layer: nn.Module) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


class Hidden(Block):
    """An expansion: hidden channels made by ``produce`` (``split`` = 2 for gated MLPs whose first layer makes both
    halves), passed through ``through`` (norms, depthwise convolutions), read by ``consume``. Masking a hidden
    channel (its rows and columns zero) and removing it give the same function, so its gate (on ``consume``'s
    input) folds exactly."""

    def __init__(
        self,
        name: str,
        types: tuple[type, ...],
        produce: tuple[str, ...],
        consume: str,
        through: tuple[str, ...] = (),
        split: int = 1,
        what: str = "MLP hidden channels",
        absent: tuple[str, ...] = (),
    ) -> None:
        """``absent``: submodules that must be missing or Identity (e.g. an SE module or a second dense convolution
        on the hidden channels); a block that has one is not pruned."""
        self.name, self.types, self.what = name, types, what
        self.produce, self.consume, self.through, self.split, self.absent = produce, consume, through, split, absent

    def couplings(self, name: str, module: nn.Module, spec: PruningSpec) -> list[Coupling]:
        reader = _first_layer(module, self.consume)
        width = _width_in(reader)
        if (isinstance(reader, nn.Conv2d) and reader.groups > 1) or any(_get(module, p) for p in self.absent):
            return []
        for path in self.through:
            layer = _get(module, path)
            if layer is not None and any(
                isinstance(m, nn.Conv2d) and m.groups != m.out_channels for _, m in _leaves(layer, path)
            ):
                return []  # a dense convolution between producer and reader: not one coupling
        members = consumer(name, module, self.consume, channels(width))
        for path in self.produce:
            members += producer(name, module, path, channels(width, repeat=self.split, repeat_stride=width))
        if len(members) == 1:
            return []  # no producing layer here (an Identity): nothing to remove
        for path in self.through:
            members += producer(name, module, path, channels(width))
        return [Coupling(f"{name} ({self.what})", f"{type(module).__name__}.hidden", width, members, gate=0)]


#: Handlers of timm's shared MLPs (``timm.layers``).
MLPS = (
    Hidden("mlp", (Mlp,), ("fc1",), "fc2", through=("norm",)),
    Hidden("glu_mlp", (GluMlp,), ("fc1",), "fc2", through=("norm",), split=2),
    Hidden("swiglu", (SwiGLU,), ("fc1_g", "fc1_x"), "fc2", through=("norm",)),
    Hidden("conv_mlp", (ConvMlp,), ("fc1",), "fc2", through=("norm",)),
)


@dataclass(frozen=True)
class Proj:
    """Where q, k or v of head ``h`` lives: rows ``offset + h * stride + j`` of the layer (or parameter) at
    ``path``."""

    path: str
    offset: int
    stride: int
    is_param: bool = False


class HeadAttention(Block):
    """Multi-head attention: q/k/v projections (:meth:`projections`), an output projection ``proj`` reading
    ``[head, value dim]`` channels, and per-block attributes (see the module docstring).

    Settings (class attributes, or keywords of the constructor): ``joint``: q, k and v share one head dim (one
    reshape splits them), pruned together; otherwise key dims (q, k) and value dims (v and the output projection)
    are two couplings. ``heads``: whole heads can be removed, with the per-head ``tables`` (``(path, dim)`` of a
    parameter, ``(path, "rows")`` / ``(path, "rows+cols")`` of a layer whose channels are heads). ``dim_attrs``:
    the attributes holding (heads, key dim, value dim); ``attrs``: what :meth:`set_dims` sets afterwards (``h``,
    ``kd``, ``vd``, ``hkd`` = heads x key dim, ``hvd``; :data:`HEAD_DIM_ATTRS`). ``value_paths``: layers on the
    value channels (output norms, gates, depthwise convolutions). ``q_norm``/``k_norm``: norms over the head dim
    (kept whole when heads are removed). ``forward_class``: swapped in afterwards (see the module docstring; it is
    handled as the block type it replaces).
    """

    what = "head dims (heads kept)"
    head_dims = True
    joint = True
    proj = "proj"
    q_norm = ""
    k_norm = ""
    forward_class: type | None = None
    dim_attrs: tuple[str, str, str] = ("num_heads", "head_dim", "head_dim")
    attrs: dict[str, str] = {"num_heads": "h"}
    value_paths: tuple[str, ...] = ()
    tables: tuple[tuple[str, int | str], ...] = ()

    def __init__(self, name: str = "", types: tuple[type, ...] = (), **settings: object) -> None:
        self.name = name or self.name
        self.types = types or self.types
        for key, value in settings.items():
            if not hasattr(type(self), key):
                raise TypeError(f"{type(self).__name__} has no setting {key!r}")
            setattr(self, key, value)
        if self.forward_class is not None and self.forward_class not in self.types:
            self.types = (*self.types, self.forward_class)  # a pruned block is handled as the dense one

    # ---------------------------------------------------------------- layout, per block type
    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        """(heads, key dim, value dim) as the block's attributes say."""
        h, kd, vd = (int(getattr(module, a)) for a in self.dim_attrs)
        return h, kd, vd

    def projections(self, module: nn.Module) -> dict[str, list[Proj]]:
        """Where q, k and v of each head live (from the block's current attributes)."""
        raise NotImplementedError

    def set_dims(self, module: nn.Module, heads: int, key_dim: int, value_dim: int) -> None:
        values = {"h": heads, "kd": key_dim, "vd": value_dim, "hkd": heads * key_dim, "hvd": heads * value_dim}
        for attr, what in self.attrs.items():
            setattr(module, attr, values[what])

    def key_dim_after(self, module: nn.Module, heads: int, value_dim: int) -> int:
        """The key dim read from the pruned layer widths (blocks with separate key and value dims)."""
        q = self.projections(module)["q"][0]
        return _width_out(_first_layer(module, q.path)) // heads

    def value_members(self, name: str, module: nn.Module, chans: tuple[tuple[int, ...], ...]) -> list[Member]:
        """Further layers on the value channels, ``chans`` in the coupling's positions."""
        return [m for path in self.value_paths for m in producer(name, module, path, chans)]

    def head_members(self, name: str, module: nn.Module, heads: int) -> list[Member]:
        """Per-head tables, ``channels`` one tuple per head (relative-position biases, temperatures, ...)."""
        per_head = tuple((g,) for g in range(heads))
        out = []
        for path, dim in self.tables:
            if isinstance(dim, int):
                if getattr(module, path, None) is not None:
                    out.append(param(join(name, path), dim, per_head))
            elif _get(module, path) is not None:
                out += [rows(join(name, path), per_head)] + (
                    [cols(join(name, path), per_head)] if "cols" in dim else []
                )
        return out

    def fused(self, module: nn.Module) -> bool:
        """Whether an SDPA path with the default scale exists (then the trained scale is folded)."""
        return hasattr(module, "fused_attn")

    # ---------------------------------------------------------------- couplings
    def _qkv(self, name: str, module: nn.Module, which: str, chans_of) -> list[Member]:
        out = []
        for p in self.projections(module)[which]:
            if p.is_param:
                out.append(param(join(name, p.path), 0, chans_of(p)))
            else:
                out += producer(name, module, p.path, chans_of(p))
        return out

    def _norms(self, name: str, module: nn.Module, chans: tuple[tuple[int, ...], ...]) -> list[Member]:
        return [m for path in (self.q_norm, self.k_norm) if path for m in producer(name, module, path, chans)]

    def couplings(self, name: str, module: nn.Module, spec: PruningSpec) -> list[Coupling]:
        h, kd, vd = self.dims(module)
        kind = type(module).__name__
        if spec.prune_heads:
            return [self._heads(name, module, h, kd, vd, kind)] if self.heads else []
        if not self.head_dims:
            return []

        def span(width: int):
            return lambda p: channels(width, h, p.stride, p.offset)

        value = consumer(name, module, self.proj, channels(vd, h)) + self._qkv(name, module, "v", span(vd))
        value += self.value_members(name, module, channels(vd, h))
        keys = self._qkv(name, module, "q", span(kd)) + self._qkv(name, module, "k", span(kd))
        keys += self._norms(name, module, channels(kd, h, stride=0))
        if self.joint:
            return [Coupling(f"{name} (head dims)", f"{kind}.head_dims", vd, value + keys, groups=h, gate=0)]
        return [
            Coupling(f"{name} (key dims)", f"{kind}.key_dims", kd, keys, groups=h),
            Coupling(f"{name} (value dims)", f"{kind}.value_dims", vd, value, groups=h, gate=0),
        ]

    def _heads(self, name: str, module: nn.Module, h: int, kd: int, vd: int, kind: str) -> Coupling:
        """Positions ``d * heads + g`` (head ``g``, dim ``d`` of ``max(kd, vd)``; a narrower projection repeats
        its dims), so that removing position ``g`` removes every channel of head ``g``."""
        dims = max(kd, vd)

        def per_head(width: int, stride: int | None = None, offset: int = 0) -> tuple[tuple[int, ...], ...]:
            stride = width if stride is None else stride
            return tuple((offset + g * stride + d % width,) for d in range(dims) for g in range(h))

        members = consumer(name, module, self.proj, per_head(vd))
        for which, width in (("q", kd), ("k", kd), ("v", vd)):
            members += self._qkv(name, module, which, lambda p, w=width: per_head(w, p.stride, p.offset))
        members += self.value_members(name, module, per_head(vd))  # (q/k norms over the head dim stay whole)
        for m in self.head_members(name, module, h):
            chans = tuple(c for _ in range(dims) for c in m.channels)
            members.append(Member(m.name, m.out, chans, m.is_param, m.dim))
        return Coupling(f"{name} (heads)", f"{kind}{HEADS}", h, members, groups=dims)

    # ---------------------------------------------------------------- state after surgery
    def before(self, module: nn.Module) -> list[int]:
        return list(self.dims(module))

    def state(self, module: nn.Module, spec: PruningSpec, before: list[int]) -> dict:
        h0, kd0, vd0 = before
        proj_in = _width_in(_first_layer(module, self.proj))
        if spec.prune_heads:
            h, kd, vd = proj_in // vd0, kd0, vd0
        else:
            h, vd = h0, proj_in // h0
            kd = vd if self.joint else self.key_dim_after(module, h0, vd)
        scale = getattr(module, "scale", None)
        return {"heads": h, "key_dim": kd, "value_dim": vd, "scale": None if scale is None else float(scale)}

    def restore(self, module: nn.Module, state: dict) -> None:
        h, kd, vd = int(state["heads"]), int(state["key_dim"]), int(state["value_dim"])
        self.set_dims(module, h, kd, vd)
        if isinstance(getattr(module, "attention_bias_cache", None), dict):
            module.attention_bias_cache = {}  # eval-mode biases cached at the old head count
        trained = state.get("scale")
        if trained is not None:
            if self.fused(module):
                module.scale = kd**-0.5
                if trained != module.scale:
                    self.fold_query(module, h, kd, trained / module.scale)
            else:
                module.scale = float(trained)
        if self.forward_class is not None and not isinstance(module, self.forward_class):
            module.__class__ = self.forward_class

    @torch.no_grad()
    def fold_query(self, module: nn.Module, heads: int, key_dim: int, factor: float) -> None:
        """Multiply the query by ``factor``: into the query norm's affine if there is one, else the q rows."""
        norm = _get(module, self.q_norm) if self.q_norm else None
        if norm is not None:
            norm.weight.mul_(factor)
            if norm.bias is not None:
                norm.bias.mul_(factor)
            return
        for p in self.projections(module)["q"]:
            index = torch.as_tensor([c for chans in channels(key_dim, heads, p.stride, p.offset) for c in chans])
            if p.is_param:
                getattr(module, p.path)[index] *= factor
                continue
            layer = _first_layer(module, p.path)
            layer.weight[index] *= factor
            if layer.bias is not None:
                layer.bias[index] *= factor


#: ``attrs`` of blocks keeping their head count and head dim.
HEAD_DIM_ATTRS = {"num_heads": "h", "head_dim": "kd"}


def fused_qkv(attn_dim: int, head_dim: int, path: str = "qkv") -> dict[str, list[Proj]]:
    """The common ``[3, heads, head_dim]`` layout of one qkv projection (``reshape(B, N, 3, heads, -1)``)."""
    return {w: [Proj(path, i * attn_dim, head_dim)] for i, w in enumerate("qkv")}


class FusedQKVAttention(HeadAttention):
    """One ``[3, heads, head_dim]`` qkv layer; the head dim is read from its width (``qkv_biases``: the q and v
    biases are parameters of the block, ``q_bias``/``v_bias``, and the k bias a zero buffer, resized afterwards:
    BEiT, EVA, SwinV2)."""

    heads = True
    qkv_biases = False

    def dims(self, module):
        hd = module.qkv.out_features // (3 * module.num_heads)
        return module.num_heads, hd, hd

    def projections(self, module):
        h, hd, _ = self.dims(module)
        out = fused_qkv(h * hd, hd)
        if self.qkv_biases and getattr(module, "q_bias", None) is not None:
            out["q"].append(Proj("q_bias", 0, hd, is_param=True))
            out["v"].append(Proj("v_bias", 0, hd, is_param=True))
        return out

    def set_dims(self, module, heads, key_dim, value_dim):
        super().set_dims(module, heads, key_dim, value_dim)
        if self.qkv_biases and getattr(module, "k_bias", None) is not None:
            module.register_buffer("k_bias", torch.zeros_like(module.q_bias.detach()), persistent=False)


class InterleavedAttention(HeadAttention):
    """LeViT-style attention: one qkv projection laid out per head as ``[q (key_dim), k (key_dim), v (val_dim)]``
    (``view(B, N, heads, -1).split([kd, kd, vd])``), or q in a layer of its own (``q``) and ``[k, v]`` per head in
    ``qkv`` (the attention-downsample blocks). Key and value dims are pruned apart; ``attention_biases``
    ``[heads, N]`` lose removed heads."""

    joint = False
    heads = True
    qkv = "qkv"
    q = ""
    dim_attrs = ("num_heads", "key_dim", "val_dim")
    attrs = {"num_heads": "h", "key_dim": "kd", "val_dim": "vd", "key_attn_dim": "hkd", "val_attn_dim": "hvd"}
    tables = (("attention_biases", 0),)

    def projections(self, module):
        _, kd, vd = self.dims(module)
        if self.q:
            stride = kd + vd
            return {"q": [Proj(self.q, 0, kd)], "k": [Proj(self.qkv, 0, stride)], "v": [Proj(self.qkv, kd, stride)]}
        stride = 2 * kd + vd
        return {w: [Proj(self.qkv, off, stride)] for w, off in (("q", 0), ("k", kd), ("v", 2 * kd))}

    def key_dim_after(self, module, heads, value_dim):
        if self.q:
            return super().key_dim_after(module, heads, value_dim)
        return (_width_out(_first_layer(module, self.qkv)) // heads - value_dim) // 2


class SeparateQKVAttention(HeadAttention):
    """q, k and v in layers of their own, each ``[heads, dim]``; ``paths`` names the layers of q, k and v, and two
    that share a layer are stacked in it (``qk``: ConViT's GPSA, ``kv``: PVTv2). The dims are read from the widths
    (q's layer for the key dim, the output projection's input for the value dim)."""

    heads = True
    paths = ("q", "k", "v")

    def dims(self, module):
        h = module.num_heads
        q, k, _ = self.paths
        kd = _width_out(_first_layer(module, q)) // (h * (2 if k == q else 1))
        return h, kd, _width_in(_first_layer(module, self.proj)) // h

    def projections(self, module):
        h, kd, vd = self.dims(module)
        q, k, v = self.paths
        k_at, v_at = (h * kd if k == q else 0), (h * kd if v == k else 0)
        return {"q": [Proj(q, 0, kd)], "k": [Proj(k, k_at, kd)], "v": [Proj(v, v_at, vd)]}

    def key_dim_after(self, module, heads, value_dim):
        return self.dims(module)[1]


def attend(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """timm's two attention paths, as its blocks write them: SDPA (default scale) when ``module.fused_attn``, else
    ``softmax(q * scale @ k^T + bias) @ v`` with ``module.attn_drop``."""
    if getattr(module, "fused_attn", False):
        p = module.attn_drop.p if module.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    attn = (q * module.scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return module.attn_drop(attn.softmax(dim=-1)) @ v


def split_heads(qkv: torch.Tensor, heads: int, parts: int = 3) -> tuple[torch.Tensor, ...]:
    """``[B, N, parts * heads * dim]`` -> ``parts`` tensors ``[B, heads, N, dim]`` (the head dim from the width)."""
    b, n, _ = qkv.shape
    return qkv.reshape(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, dim]`` -> ``[B, N, heads * dim]`` (the attention width, whatever the input width)."""
    b, _, n, _ = x.shape
    return x.transpose(1, 2).reshape(b, n, -1)


def qkv_with_biases(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BEiT / EVA / SwinV2 qkv: a bias-free ``qkv`` layer plus ``q_bias``, a zero ``k_bias`` buffer and ``v_bias``."""
    if module.q_bias is None:
        return module.qkv(x)
    bias = torch.cat((module.q_bias, module.k_bias, module.v_bias))
    return module.qkv(x) + bias if module.qkv_bias_separate else F.linear(x, module.qkv.weight, bias)


def cross_covariance(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """XCiT's cross-covariance attention (also EdgeNeXt's) over the pruned head dim: attention between the
    channels of a head, tokens normalised, a learned per-head ``temperature``; output width = attention width."""
    b, n, _ = x.shape
    q, k, v = module.qkv(x).reshape(b, n, 3, module.num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if getattr(module, "fused_attn", False):
        out = F.scaled_dot_product_attention(q * module.temperature, k, v, scale=1.0)
    else:
        out = module.attn_drop(((q @ k.transpose(-2, -1)) * module.temperature).softmax(dim=-1)) @ v
    return module.proj_drop(module.proj(out.permute(0, 3, 1, 2).reshape(b, n, -1)))


class CrossCovarianceAttention(FusedQKVAttention):
    """XCA blocks (per-head ``temperature``, no softmax scale). Removing a head dim removes one channel of the
    head's channel-to-channel attention (its softmax then runs over fewer channels: a smaller network, not a masked
    one)."""

    tables = (("temperature", 0),)

    def fused(self, module):
        return False


#: Handlers of timm's shared attention (``timm.layers.Attention``: optional q/k norms over the head dim, an output
#: norm and an output gate).
ATTENTION = (
    FusedQKVAttention(
        "timm_attention",
        (Attention,),
        q_norm="q_norm",
        k_norm="k_norm",
        value_paths=("norm", "gate"),
        attrs={"num_heads": "h", "head_dim": "kd", "attn_dim": "hkd"},
    ),
)
