"""timm ViTs rewritten so that ExecuTorch lowers every compute node into the XNNPACK delegate.

Why nodes stay outside when a timm ViT is lowered as it comes (executorch 1.5.x partitioner configs in
``executorch/backends/xnnpack/partition/config``):

* ``F.scaled_dot_product_attention`` has no XNNPACK config; ExecuTorch decomposes it and the masking part
  (``where``/``any``/``logical_not``/``full_like``/``eq``/``mul.Scalar``) has no config either.
  Fix: timm's eager attention, written with 3-D ``bmm`` (see below).
* ``native_layer_norm``: XNNPACK has no layer-norm config. Fix: :class:`_DelegableLayerNorm` computes the
  same function from ``mean.dim``, ``sub``, ``mul``, ``add``, ``rsqrt`` (all delegated). ``mean.dim`` is only
  delegated on a 4-D tensor reduced over dims (2, 3) with ``keepdim=True`` (it is lowered to global average
  pooling, which XNNPACK runs channels-last), so the ``M`` rows are viewed as the *channels* of a
  ``[1, M, C, 1]`` image: the reduction then runs vectorised across rows. The other view, ``[M, 1, C, 1]``
  (one channel), computes the same values but its two reductions took 6.9 of 32.8 ms of an INT8 deit_small
  forward (1 thread, ETDump), against 0.2 ms in this form.
* ``expand_copy``: ``q @ k.transpose(-2, -1)`` on 4-D tensors decomposes into ``expand`` + ``view`` + ``bmm``;
  there is no expand config. The attention is rewritten with 3-D ``bmm``; the remaining no-op expands (the
  class token at batch 1) are removed by ExecuTorch's own ``RemoveNoopExpandCopyPass``.
* ``squeeze_copy`` (from ``qkv.unbind(0)``) and ``select_copy`` (``x[:, 0]`` in the head): no configs, and
  ``unsqueeze_copy`` is only delegated on the trailing dim. The attention slices q/k/v from the last dim
  instead of unbinding, and :class:`StaticReshapePass` turns every squeeze/unsqueeze into ``view_copy`` and
  every select into ``slice_copy`` + ``view_copy`` (valid because exported shapes are static).

* Token reduction (:mod:`pqv_lightning.tokens`) moves tokens with ``gather``/``scatter_add`` of index tensors
  expanded to ``[B, K, C]`` (no XNNPACK config for either; the expands became ``cat`` of ``C`` integer views,
  all outside). The reduced models are switched to the matrix form (:mod:`pqv_lightning.tokens.slots`): the tokens
  move by one ``bmm`` inside the delegate, and only the matching (``max``/``topk`` on the similarity scores,
  ``gather``/``scatter`` of ``[B, 1, N]`` slot tables, the ``scatter`` that builds the reduction matrix, its
  zero fill) stays outside. Integer expands are left alone by :class:`StaticReshapePass`.

Not a delegation problem but a speed one: the patch-embedding convolution (stride == kernel) is written as
patch reshape + ``linear`` (:class:`_DelegablePatchifyConv2d`), which the quantizers treat as one more
fully-connected layer.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from executorch.exir.dialects._ops import ops as exir_ops
from executorch.exir.pass_base import ExportPass, PassResult
from timm.layers import Attention, GroupNorm1, LayerNorm2d
from timm.layers import GroupNorm as TimmGroupNorm
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pqv_lightning.export.formats import get_format
from pqv_lightning.export.inputs import described
from pqv_lightning.export.patchify import is_patchify_conv, to_patches
from pqv_lightning.tokens import REDUCED_CLASSES, is_token_reduced, set_reduction_form
from pqv_lightning.utils.checks import check_choice, invalid

__all__ = [
    "ATTENTION_DTYPES",
    "StaticReshapePass",
    "attention_blocks",
    "check_attention_blocks",
    "low_precision_attention_count",
    "prepare_for_xnnpack",
    "register_xnnpack_rewrite",
]


class _DelegableLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim written with ops the XNNPACK partitioner delegates (rows as the
    channels of a ``[1, M, C, 1]`` image, see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        shape = x.shape
        y = _rows_normalised(x.reshape(1, -1, shape[-1], 1), self.eps).reshape(shape)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def _rows_normalised(x4: Tensor, eps: float) -> Tensor:
    """``x4`` ``[1, rows, n, 1]`` normalised over ``n`` with means over dims (2, 3) (see the module docstring)."""
    centered = x4 - x4.mean(dim=(2, 3), keepdim=True)
    var = (centered * centered).mean(dim=(2, 3), keepdim=True)
    return centered * torch.rsqrt(var + eps)


class _DelegableLayerNorm2d(LayerNorm2d):
    """timm's channels-first ``LayerNorm2d`` (normalised over C of ``[B, C, H, W]``) in the delegable form."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = _rows_normalised(x.permute(0, 2, 3, 1).reshape(1, b * h * w, c, 1), self.eps)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


class _DelegableGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (also timm's ``GroupNorm``/``GroupNorm1``, MobileViTV2) as means over dims (2, 3) of a
    ``[1, B * groups, C / groups * H * W, 1]`` view (XNNPACK has no group-norm config)."""

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = _rows_normalised(x.reshape(1, shape[0] * self.num_groups, -1, 1), self.eps).reshape(shape)
        if self.affine:
            view = (1, -1) + (1,) * (len(shape) - 2)
            y = y * self.weight.view(view) + self.bias.view(view)
        return y


class _DelegableAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """Global average pooling (output 1x1) as the 4-D ``mean`` over dims (2, 3) XNNPACK delegates (the adaptive
    pooling lowers to ``as_strided_copy`` when the input is already small)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.output_size not in (1, (1, 1)):
            return super().forward(x)
        return x.mean(dim=(2, 3), keepdim=True)


class _DelegableAttention(Attention):
    """timm ``Attention`` (eager path, same stored ``scale``) without unbind and without 4-D matmul.

    q/k/v are sliced from the last dim of the ``qkv`` output and the two products are 3-D ``bmm`` over
    ``[B * heads, N, head_dim]``, so the exported graph has no ``expand``/``squeeze``/``select`` copies.
    Masks fall back to timm's own forward. ``products_dtype`` (float32 unless
    ``prepare_for_xnnpack(attention="fp16")`` sets it) is the dtype of the two products and the softmax: q, k^T and
    v are cast to it just before the products and the output back to float32 before ``proj``.
    """

    products_dtype: torch.dtype = torch.float32

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        h, d, a = self.num_heads, self.head_dim, self.attn_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n, h, d).permute(0, 2, 1, 3)

        q = self.q_norm(heads(qkv[..., :a])) * self.scale
        k = self.k_norm(heads(qkv[..., a : 2 * a]))
        v = heads(qkv[..., 2 * a :])
        q, k_t, v = q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2), v.reshape(b * h, n, d)
        if self.products_dtype != torch.float32:  # cast last: a static quantizer puts q/dq (fp32 out) on a transpose
            q, k_t, v = q.to(self.products_dtype), k_t.to(self.products_dtype), v.to(self.products_dtype)
        attn = self.attn_drop(torch.bmm(q, k_t).softmax(dim=-1))
        out = torch.bmm(attn, v).float()
        out = out.reshape(b, h, n, d).permute(0, 2, 1, 3).reshape(b, n, a)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class _DelegablePatchifyConv2d(nn.Conv2d):
    """A patchify ``Conv2d`` (stride == kernel, see :func:`~pqv_lightning.export.patchify.is_patchify_conv`) as patch
    reshape + ``linear``: the quantizers then treat it as a fully-connected layer (int8 FC instead of a
    dynamically quantized IGEMM convolution: 0.5 ms less of 19 ms on an int8 deit_small, 1 thread). Its
    weight is stored 2-D ``[out, in * kh * kw]`` (a reshaped view of a parameter is not a static weight
    to the XNNPACK partitioner)."""

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        patches, gh, gw = to_patches(x, kh, kw)
        out = F.linear(patches, self.weight, self.bias)
        return out.reshape(x.shape[0], gh, gw, self.out_channels).permute(0, 3, 1, 2)


class _DelegableDistilledViT(VisionTransformerDistilled):
    """DeiT-distilled head averaging with a float factor: timm's ``/ 2`` lowers to an int64 constant cast
    to float (``_to_dim_order_copy`` with a dtype change), which XNNPACK does not take."""

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.distilled_training and self.training:
            return super().forward_head(x, pre_logits)
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if not pre_logits:
            x, x_dist = self.head(x), self.head_dist(x_dist)
        return (x + x_dist) * 0.5


class _DelegableViT(VisionTransformer):
    """Average pooling over tokens as a 4-D ``mean`` over dims (2, 3), the only ``mean`` XNNPACK delegates
    (timm's ``x.mean(dim=1)`` on ``[B, N, C]`` stays outside the delegate)."""

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if self.attn_pool is not None or pool_type != "avg":
            return super().pool(x, pool_type)
        if not self.pool_include_prefix:
            x = x[:, self.num_prefix_tokens :]
        b, n, c = x.shape
        return x.permute(0, 2, 1).reshape(b, c, n, 1).mean(dim=(2, 3), keepdim=True).reshape(b, c)


#: A rewrite: a class swapped in (same parameters, same ``state_dict`` keys) or a function that rewrites the
#: module in place.
Rewrite = type[nn.Module] | Callable[[nn.Module], None]
_REWRITES: dict[type[nn.Module], Rewrite] = {}


def register_xnnpack_rewrite(module_type: type[nn.Module], rewrite: Rewrite) -> None:
    """Make :func:`prepare_for_xnnpack` rewrite every module whose type is exactly ``module_type``.

    A model family whose graph leaves operators outside the XNNPACK delegate registers the rewrite of its own
    blocks here (one rewrite per type; registering a type again replaces its rewrite).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise invalid("module_type", module_type, "a torch.nn.Module subclass")
    if not callable(rewrite):
        raise invalid("rewrite", rewrite, "an nn.Module subclass to swap in, or a function rewriting the module")
    _REWRITES[module_type] = rewrite


def _reduction_as_matrix(module: nn.Module) -> None:
    """A token-reduced model moves its tokens by matrix products (:mod:`pqv_lightning.tokens.slots`)."""
    if is_token_reduced(module):
        set_reduction_form(module, "matrix")


def _patchify_as_linear(module: nn.Module) -> None:
    if is_patchify_conv(module):
        module.__class__ = _DelegablePatchifyConv2d
        module.weight = nn.Parameter(module.weight.detach().reshape(module.out_channels, -1))


for _type, _rewrite in (
    (Attention, _DelegableAttention),
    (nn.LayerNorm, _DelegableLayerNorm),
    (TimmLayerNorm, _DelegableLayerNorm),
    (LayerNorm2d, _DelegableLayerNorm2d),
    (nn.GroupNorm, _DelegableGroupNorm),
    (TimmGroupNorm, _DelegableGroupNorm),
    (GroupNorm1, _DelegableGroupNorm),
    (VisionTransformerDistilled, _DelegableDistilledViT),
    (VisionTransformer, _DelegableViT),
    (nn.Conv2d, _patchify_as_linear),
    (nn.AdaptiveAvgPool2d, _DelegableAdaptiveAvgPool2d),
):
    register_xnnpack_rewrite(_type, _rewrite)
for _type in REDUCED_CLASSES.values():
    register_xnnpack_rewrite(_type, _reduction_as_matrix)


#: The dtypes the attention products of a prepared timm ``Attention`` can run in (``prepare_for_xnnpack``).
ATTENTION_PRECISIONS = get_format("executorch").option("attention").choices
ATTENTION_DTYPES = dict(zip(ATTENTION_PRECISIONS, (torch.float32, torch.float16), strict=True))


def prepare_for_xnnpack(model: nn.Module, attention: str = "fp32") -> nn.Module:
    """Return an eval-mode copy of ``model`` computing the same function with an XNNPACK-delegable graph.

    Applies the registered rewrite (:func:`register_xnnpack_rewrite`) of every module's exact type: by default
    every ``nn.LayerNorm``, every timm ``Attention``, the ViT pooling and DeiT's distilled head get a delegable
    class (parameters, and so ``state_dict`` keys, unchanged), and every patchify ``Conv2d`` (stride == kernel)
    becomes a linear layer (its weight stored 2-D). The fused SDPA path of any module that has one is turned
    off. Pruned attention (``num_heads * head_dim != dim``) is supported: the stored ``attn_dim`` and ``scale``
    are used.

    ``attention="fp16"`` runs the two attention products and the softmax of every timm ``Attention`` in fp16
    (q, k, v cast just before the products, the output cast back before ``proj``): XNNPACK runs them natively in
    fp16 on CPUs with fp16 arithmetic (ARMv8.2 phones, AVX512-FP16) and in fp32 elsewhere. The casts stay inside
    the delegate only with :func:`pqv_lightning.export.xnnpack_casts.float_cast_partitioner` (as ``export_pte``
    does)."""
    if not isinstance(model, nn.Module):
        raise invalid("model", described(model), "a torch.nn.Module")
    check_choice("attention", attention, ATTENTION_PRECISIONS)
    prepared = copy.deepcopy(model).eval()
    for module in prepared.modules():
        rewrite = _REWRITES.get(type(module))
        if isinstance(rewrite, type):
            module.__class__ = rewrite
        elif rewrite is not None:
            rewrite(module)
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        if isinstance(module, _DelegableAttention) and attention != "fp32":
            module.products_dtype = ATTENTION_DTYPES[attention]
    return prepared


def attention_blocks(model: nn.Module) -> int:
    """How many blocks of ``model`` :func:`prepare_for_xnnpack` turns into its attention (what ``attention="fp16"``
    applies to): timm ``Attention`` and any type registered with that rewrite."""
    return sum(
        isinstance(m, _DelegableAttention) or _REWRITES.get(type(m)) is _DelegableAttention for m in model.modules()
    )


def check_attention_blocks(model: nn.Module, attention: str, name: str = "attention") -> None:
    """Refuse low-precision ``attention`` for a model with no :func:`attention_blocks` (it would change nothing)."""
    if attention != "fp32" and attention_blocks(model) == 0:
        accepted = f"'fp32' for {type(model).__name__}: it has no timm Attention block to run in fp16"
        raise invalid(name, attention, accepted)


def low_precision_attention_count(model: nn.Module) -> int:
    """How many prepared attention blocks of ``model`` compute their products below fp32."""
    return sum(isinstance(m, _DelegableAttention) and m.products_dtype != torch.float32 for m in model.modules())


_DEQUANTIZE = exir_ops.edge.quantized_decomposed.dequantize_per_tensor.default


class StaticReshapePass(ExportPass):
    """Rewrite squeeze/unsqueeze as ``view_copy``, select as ``slice_copy`` + ``view_copy``, float expand as cat;
    split as slices; a mean over any dims as the one ``mean`` XNNPACK delegates.

    XNNPACK delegates ``view_copy``, ``slice_copy`` and ``cat`` but has no squeeze/select/expand config (and
    unsqueeze only on the trailing dim); with static shapes each of these is a reshape of a (sliced) tensor,
    and a broadcast of a size-1 dim is a concatenation of copies. ``split_with_sizes_copy`` (q/k/v splits of
    LeViT-style attention, rotary tables) has no config; each of its outputs is a ``slice_copy``. ``mean.dim`` is
    delegated only over dims (2, 3) of a 4-D tensor with ``keepdim``: any other mean (token pooling ``x.mean(1)``,
    channels-last pooling) is a permute that moves the reduced dims last, a ``[1, kept, reduced, 1]`` view, that
    mean, and a view to the result's shape. ``alias_copy`` (a no-op slice or pad) and a layout-keeping copy of a
    constant are dropped, and so is a ``constant_pad_nd`` that pads nothing (Swin's window pad in an INT8 graph:
    XNNPACK builds a quantized pad only with equal input and output quantization and fails to load the program
    otherwise). Runs after ``RemoveNoopExpandCopyPass``.
    """

    _SQUEEZES = (
        exir_ops.edge.aten.squeeze_copy.dims,
        exir_ops.edge.aten.squeeze_copy.dim,
        exir_ops.edge.aten.squeeze_copy.default,
        exir_ops.edge.aten.unsqueeze_copy.default,
    )

    @staticmethod
    def _expand_as_cat(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node | None:
        """A broadcasting float expand (e.g. the class token to batch > 1) as ``cat`` of copies per expanded dim.
        Integer expands (index tables) stay: XNNPACK takes no integer ``cat`` either."""
        src = node.args[0]
        if not src.meta["val"].dtype.is_floating_point:
            return None
        in_shape = [int(s) for s in src.meta["val"].shape]
        out_shape = [int(s) for s in node.meta["val"].shape]
        if len(in_shape) != len(out_shape):
            return None
        current = src
        for dim, (before, after) in enumerate(zip(in_shape, out_shape, strict=True)):
            if before == after:
                continue
            # distinct view nodes: the partitioner counts distinct input nodes and wants at least two
            copies = []
            for _ in range(after):
                with graph.inserting_before(node):
                    copy_node = graph.call_function(
                        exir_ops.edge.aten.view_copy.default, (current, list(current.meta["val"].shape))
                    )
                copy_node.meta = dict(current.meta)
                copies.append(copy_node)
            with graph.inserting_before(node):
                current = graph.call_function(exir_ops.edge.aten.cat.default, (copies, dim))
            current.meta = dict(node.meta)
            current.meta["val"] = torch.cat([c.meta["val"] for c in copies], dim)
        return None if current is src else current

    @staticmethod
    def _split_as_slices(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
        src, sizes = node.args[0], list(node.args[1])
        dim = (node.args[2] if len(node.args) > 2 else 0) % src.meta["val"].dim()
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
            return False
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for user in users:
            i = user.args[1]
            with graph.inserting_before(user):
                source = src
                if src.op == "call_function" and src.target == _DEQUANTIZE:
                    # a dequantize of its own per slice, as torchao's DuplicateDQPass leaves every dequantize: the
                    # XNNPACK partitioner folds a dequantize into the one quantized pattern that consumes it, and a
                    # shared one it folds for all its users (EdgeNeXt's chunk: the slice feeding a quantized
                    # convolution made the float slices beside it read int8 data, 0.09 agreement)
                    source = graph.call_function(src.target, src.args, src.kwargs)
                    source.meta = dict(src.meta)
                piece = graph.call_function(
                    exir_ops.edge.aten.slice_copy.Tensor, (source, dim, starts[i], starts[i] + sizes[i], 1)
                )
            piece.meta = dict(user.meta)
            user.replace_all_uses_with(piece)
            graph.erase_node(user)
        graph.erase_node(node)
        if not src.users:  # every slice has its own dequantize
            graph.erase_node(src)
        return True

    @staticmethod
    def _mean_as_4d(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
        src = node.args[0]
        rank = src.meta["val"].dim()
        dims = sorted({d % rank for d in (node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]])})
        keepdim = len(node.args) > 2 and bool(node.args[2])
        if node.kwargs.get("dtype") is not None or (rank == 4 and dims == [2, 3] and keepdim):
            return False
        shape = [int(s) for s in src.meta["val"].shape]
        kept = [d for d in range(rank) if d not in dims]
        rows, cols = math.prod(shape[d] for d in kept), math.prod(shape[d] for d in dims)
        current = src
        steps = [
            (exir_ops.edge.aten.permute_copy.default, (kept + dims,)),
            (exir_ops.edge.aten.view_copy.default, ([1, rows, cols, 1],)),
            (exir_ops.edge.aten.mean.dim, ([2, 3], True)),
            (exir_ops.edge.aten.view_copy.default, ([int(s) for s in node.meta["val"].shape],)),
        ]
        for target, args in steps:
            with graph.inserting_before(node):
                nxt = graph.call_function(target, (current, *args))
            val = current.meta["val"]
            if target is exir_ops.edge.aten.permute_copy.default:
                val = val.permute(*args[0])
            elif target is exir_ops.edge.aten.mean.dim:
                val = val.mean(dim=(2, 3), keepdim=True)
            else:
                val = val.reshape(*args[0])
            nxt.meta = {**node.meta, "val": val}
            current = nxt
        node.replace_all_uses_with(current)
        graph.erase_node(node)
        return True

    @staticmethod
    def _constant_copy(node: torch.fx.Node) -> bool:
        """A copy of a graph input that keeps its layout and is not an output (what ``torch.tensor(...)`` in a forward
        exports as: a constant and its copy; removing the copy is exact, nothing in the graph mutates)."""
        if node.target not in (exir_ops.edge.dim_order_ops._clone_dim_order.default, exir_ops.edge.aten.clone.default):
            return False
        src = node.args[0]
        dim_order = node.kwargs.get("dim_order")
        keeps_layout = dim_order is None or list(src.meta["val"].dim_order()) == list(dim_order)
        memory_format = node.kwargs.get("memory_format")
        keeps_layout &= memory_format in (None, torch.contiguous_format, torch.preserve_format)
        return src.op == "placeholder" and keeps_layout and all(user.op != "output" for user in node.users)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        changed = False
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target == exir_ops.edge.aten.split_with_sizes_copy.default:
                changed |= self._split_as_slices(graph, node)
                continue
            if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
                continue
            if node.target == exir_ops.edge.aten.mean.dim:
                changed |= self._mean_as_4d(graph, node)
                continue
            if self._constant_copy(node):  # token reduction's index tables (``torch.tensor`` in the forward)
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                changed = True
                continue
            if node.target == exir_ops.edge.aten.alias_copy.default or (  # a no-op slice or pad (Swin's windows)
                node.target == exir_ops.edge.aten.constant_pad_nd.default and not any(node.args[1])
            ):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                changed = True
                continue
            out_shape = [int(s) for s in node.meta["val"].shape]
            if node.target in self._SQUEEZES:
                src = node.args[0]
            elif node.target == exir_ops.edge.aten.select_copy.int:
                src_in, dim, index = node.args
                size = int(src_in.meta["val"].shape[dim])
                dim = dim % src_in.meta["val"].dim()
                index = index % size
                with graph.inserting_before(node):
                    src = graph.call_function(exir_ops.edge.aten.slice_copy.Tensor, (src_in, dim, index, index + 1, 1))
                src.meta = dict(node.meta)
                src.meta["val"] = src_in.meta["val"].narrow(dim, index, 1)
            elif node.target == exir_ops.edge.aten.expand_copy.default:
                src = self._expand_as_cat(graph, node)
                if src is None:
                    continue
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                changed = True
                continue
            else:
                continue
            with graph.inserting_before(node):
                view = graph.call_function(exir_ops.edge.aten.view_copy.default, (src, out_shape))
            view.meta = dict(node.meta)
            node.replace_all_uses_with(view)
            graph.erase_node(node)
            changed = True
        if not changed:
            return PassResult(graph_module, False)
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
        return PassResult(super().call(graph_module).graph_module, True)


# The blocks of the mobile and ViT-relative families (one table, kept with their rewrites).
from pqv_lightning.export.xnnpack_families import FAMILY_REWRITES  # noqa: E402

for _type, _rewrite in FAMILY_REWRITES:
    register_xnnpack_rewrite(_type, _rewrite)
