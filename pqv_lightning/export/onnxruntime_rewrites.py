"""timm ViTs rewritten into the form onnxruntime runs fastest in INT8, and its transformer fusions applied.

:func:`prepare_for_onnxruntime` rewrites the torch model (attention as the subgraph onnxruntime fuses into one
``Attention`` node, which ``quantize_dynamic`` turns into ``QAttention``; the patch embedding as a ``MatMul``);
:func:`fuse_for_onnxruntime` runs onnxruntime's fusions on the exported graph and undoes the one that is slower.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pqv_lightning.export.inputs import described
from pqv_lightning.export.patchify import is_patchify_conv, to_patches
from pqv_lightning.tokens import register_token_attention
from pqv_lightning.utils.checks import invalid

__all__ = ["fuse_for_onnxruntime", "prepare_for_onnxruntime", "token_attention"]


class _OrtAttention(nn.Module):
    """A timm ``Attention`` written as the subgraph onnxruntime's transformer optimizer fuses into one
    ``Attention`` node (which ``quantize_dynamic`` turns into ``QAttention``, the QKV projection in int8).

    The fusion matches separate q/k/v ``MatMul`` + ``Add`` projections, 4-D matmuls and a division of the
    scores by ``sqrt(head_dim)`` (it then assumes that scale), so the packed ``qkv`` weights are split in
    three, missing biases become zeros, and the module's own softmax scale is folded into the q rows. The
    function is the module's: the stored ``scale`` on timm's eager path, ``head_dim ** -0.5`` on its fused
    (SDPA) path. Masked calls go to the original module.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.original = attn
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        scale = self.head_dim**-0.5 if attn.fused_attn else float(attn.scale)
        self.sqrt_d = math.sqrt(self.head_dim)
        fold = scale * self.sqrt_d
        weight = attn.qkv.weight.detach()
        bias = attn.qkv.bias.detach() if attn.qkv.bias is not None else weight.new_zeros(weight.shape[0])
        a = self.attn_dim
        self.q, self.k, self.v = (nn.Linear(weight.shape[1], a) for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(weight[i * a : (i + 1) * a])
                lin.bias.copy_(bias[i * a : (i + 1) * a])
            if abs(fold - 1.0) > 1e-12:
                self.q.weight.mul_(fold)
                self.q.bias.mul_(fold)
        self.proj = attn.proj
        # token reduction's metrics (``token_attention``) from their own small products, off the fused subgraph
        h, d = self.num_heads, self.head_dim
        k_weight, k_bias = weight[a : 2 * a], bias[a : 2 * a]
        self.keys_mean = nn.Linear(weight.shape[1], d)
        with torch.no_grad():
            self.keys_mean.weight.copy_(k_weight.reshape(h, d, -1).mean(dim=0))
            self.keys_mean.bias.copy_(k_bias.reshape(h, d).mean(dim=0))
        self.register_buffer("k_heads", k_weight.reshape(h, d, -1).clone(), persistent=False)
        self.register_buffer("k_bias_heads", k_bias.reshape(h, d, 1).clone(), persistent=False)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            return self.original(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, h, d).permute(0, 2, 3, 1)
        v = self.v(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        attn = (torch.matmul(q, k) / self.sqrt_d).softmax(dim=-1)
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(b, n, self.attn_dim)
        return self.proj(out)


def token_attention(
    attn: _OrtAttention, x: Tensor, bias: Tensor | None, metric: str | None
) -> tuple[Tensor, Tensor | None]:
    """:class:`_OrtAttention` in a token-reducing block (:func:`pqv_lightning.tokens.register_token_attention`):
    the fusable subgraph with the proportional-attention ``bias`` added after the division (onnxruntime fuses only
    the blocks without one: its ``Attention`` fusion takes no additive bias), and the metric computed beside it,
    never from the q/k/v projections the fusion removes nor by a fourth ``MatMul`` on the block input (the fusion
    wants exactly three): the keys averaged over heads as one ``Gemm`` on a reshape (head-averaged key weights),
    the class token's attention as ``(k_h^T q_cls,h) . x`` per head."""
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.q(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
    k = attn.k(x).reshape(b, n, h, d).permute(0, 2, 3, 1)
    v = attn.v(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
    logits = torch.matmul(q, k) / attn.sqrt_d
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    out = torch.matmul(logits.softmax(dim=-1), v).permute(0, 2, 1, 3).reshape(b, n, attn.attn_dim)
    out = attn.proj(out)
    if metric == "keys":
        return out, attn.keys_mean(x.reshape(b * n, -1)).reshape(b, n, d)
    if metric == "class_attention":
        q_cls = attn.q(x[:, 0]).reshape(b, h, d, 1)  # the softmax scale is folded into q (sqrt_d divides it out)
        # products with the key weights as Mul + ReduceSum: a MatMul with a 3-D weight would be quantized per
        # channel, which onnxruntime's MatMulIntegerToFloat does not run
        towards = (q_cls * attn.k_heads).sum(dim=2).unsqueeze(2)  # [B, h, 1, C]
        offset = (q_cls * attn.k_bias_heads).sum(dim=2).unsqueeze(2)  # [B, h, 1, 1]
        logits = (torch.matmul(towards, x.transpose(1, 2).unsqueeze(1)) + offset) / attn.sqrt_d
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        return out, logits.softmax(dim=-1).mean(dim=1)[:, 0]
    return out, None


register_token_attention(_OrtAttention, token_attention)


class _PatchifyLinear(nn.Module):
    """A patchify ``Conv2d`` (see :func:`~pqv_lightning.export.patchify.is_patchify_conv`) as patch reshape + its
    own ``nn.Linear``: onnxruntime quantizes that ``MatMul`` (its ``ConvInteger`` took 3.7 of 37 ms of an int8
    deit_small forward, 1 thread; a ``MatMul`` on the reshaped conv weight stays float). Returns the conv's NCHW
    output."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.out_channels = conv.out_channels
        self.kh, self.kw = conv.kernel_size
        self.linear = nn.Linear(conv.in_channels * self.kh * self.kw, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.detach().reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        patches, gh, gw = to_patches(x, self.kh, self.kw)
        return self.linear(patches).reshape(x.shape[0], gh, gw, self.out_channels).permute(0, 3, 1, 2)


def prepare_for_onnxruntime(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """An eval-mode copy of ``model`` computing the same function in the form onnxruntime runs fastest in int8.

    Every plain timm ``Attention`` (no q/k norm, scale norm or gate) becomes :class:`_OrtAttention` (fusable
    into onnxruntime's ``Attention``), every patchify ``Conv2d`` becomes :class:`_PatchifyLinear`. Returns
    the copy and how many modules of each kind were rewritten.
    """
    from timm.layers import Attention

    if not isinstance(model, nn.Module):
        raise invalid("model", described(model), "a torch.nn.Module")
    prepared = copy.deepcopy(model).eval()
    counts = {"attention": 0, "patchify_conv": 0}
    for parent in list(prepared.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is Attention
                and isinstance(child.q_norm, nn.Identity)
                and isinstance(child.k_norm, nn.Identity)
                and isinstance(child.norm, nn.Identity)
                and getattr(child, "gate", None) is None
            ):
                setattr(parent, name, _OrtAttention(child))
                counts["attention"] += 1
            elif is_patchify_conv(child):
                setattr(parent, name, _PatchifyLinear(child))
                counts["patchify_conv"] += 1
    return prepared, counts


def _unfuse_skip_layer_norm(graph) -> int:
    """Replace every ``SkipLayerNormalization`` node by ``Add`` (+ ``Add`` for its bias) and a standard
    ``LayerNormalization``; returns how many. onnxruntime 1.31's CPU SkipLayerNormalization kernel took
    0.32 ms per call on deit_small where ``LayerNormalization`` took 0.04 ms (2 threads), which cost more than
    the fused attention saves; the transformer optimizer needs it to find the attention, so it is undone
    after fusion."""
    from onnx import helper

    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "SkipLayerNormalization":
            nodes.append(node)
            continue
        count += 1
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        x, skip, gamma, beta, bias = (list(node.input) + [""] * 5)[:5]
        out, mean, inv_std, total = (list(node.output) + [""] * 4)[:4]
        total = total or f"{node.name}_skip_sum"
        if bias:
            nodes.append(helper.make_node("Add", [x, bias], [f"{node.name}_biased"], name=f"{node.name}_bias_add"))
            x = f"{node.name}_biased"
        nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{node.name}_skip_add"))
        ln_outputs = [out, mean, inv_std]
        while ln_outputs and not ln_outputs[-1]:
            ln_outputs.pop()
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [total, gamma] + ([beta] if beta else []),
                ln_outputs,
                name=f"{node.name}_layer_norm",
                axis=-1,
                epsilon=eps,
            )
        )
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _projection_branch_first(graph) -> int:
    """Swap the inputs of every residual ``Add`` whose second input is a linear projection (``MatMul`` +
    bias ``Add``) and whose first is not; returns how many (a + b == b + a exactly).

    The attention fusion looks for the projection among the residual ``Add``'s inputs in order and takes the
    first ``Add`` it meets: in the first block the residual itself comes from an ``Add`` (class token +
    position embedding), so without the swap that block's attention is never fused.
    """
    producers = {out: node for node in graph.node for out in node.output}

    def is_projection(name: str) -> bool:
        node = producers.get(name)
        return (
            node is not None
            and node.op_type == "Add"
            and any(getattr(producers.get(i), "op_type", None) == "MatMul" for i in node.input)
        )

    swapped = 0
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        first, second = node.input
        if first in producers and is_projection(second) and not is_projection(first):
            node.input[0], node.input[1] = second, first
            swapped += 1
    return swapped


_ANCHOR = "pqv_attention_anchor"


def _anchor_reducing_residuals(graph) -> list[str]:
    """Give every attention residual ``Add`` that feeds no ``LayerNormalization`` (a token-reducing block: the
    tokens are reduced between the residual and ``norm2``) a throw-away ``LayerNormalization`` of its own, the
    anchor onnxruntime's attention fusion starts from; returns their output names (:func:`_drop_anchors`)."""
    from onnx import helper, numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    anchors, new_nodes = [], []
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        projection = producers.get(node.input[0])
        if projection is None or projection.op_type != "Add":
            continue
        if not any(getattr(producers.get(i), "op_type", None) == "MatMul" for i in projection.input):
            continue
        bias = next((initializers[i] for i in projection.input if i in initializers), None)
        users = consumers.get(node.output[0], [])
        if bias is None or any(user.op_type == "LayerNormalization" for user in users):
            continue
        width = int(numpy_helper.to_array(bias).size)
        affine = [f"{_ANCHOR}_scale_{width}", f"{_ANCHOR}_bias_{width}"]  # SkipLayerNormalization fusion wants both
        for name, fill in zip(affine, (np.ones, np.zeros), strict=True):
            if name not in initializers:
                initializers[name] = numpy_helper.from_array(fill(width, dtype=np.float32), name)
                graph.initializer.append(initializers[name])
        anchors.append(f"{_ANCHOR}_{len(anchors)}")
        new_nodes.append(helper.make_node("LayerNormalization", [node.output[0], *affine], [anchors[-1]], axis=-1))
    graph.node.extend(new_nodes)
    return anchors


def _drop_anchors(graph, anchors: list[str]) -> None:
    """Remove the anchors of :func:`_anchor_reducing_residuals` (outputs nothing reads) and their scales and biases."""
    kept = [node for node in graph.node if not set(node.output) & set(anchors)]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    scales = [init for init in graph.initializer if init.name.startswith(_ANCHOR) and init.name not in used]
    for init in scales:
        graph.initializer.remove(init)


def fuse_for_onnxruntime(proto, out_path: Path, extra: dict) -> None:
    """onnxruntime's transformer optimizer (model type ``vit``, Python fusions only: the graph stays
    runnable by any onnxruntime build of this version) with SkipLayerNormalization undone; writes ``out_path``.

    Token-reducing blocks (:mod:`pqv_lightning.tokens`) reduce between the attention residual and ``norm2``, where
    the fusion looks for its ``LayerNormalization``: each such residual gets a temporary one for the fusion
    (removed afterwards). A block whose attention adds the proportional-attention bias (``log(size)``) is not fused:
    onnxruntime's ``Attention`` fusion takes no additive bias (``extra["ort_fusions"]`` counts what was fused)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    work = onnx.ModelProto()
    work.CopyFrom(proto)
    _projection_branch_first(work.graph)
    anchors = _anchor_reducing_residuals(work.graph)
    # its modules log under their bare names (it puts its own folder on sys.path); they warn about the
    # producer name, num_heads=0 (detected per node instead) and pruned widths
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("onnxruntime.transformers", "fusion_", "onnx_model")) or name == "optimizer"
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        optimized = optimize_model(
            work,
            model_type="vit",
            num_heads=0,
            hidden_size=0,
            opt_level=0,
            optimization_options=FusionOptions("vit"),
        )
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    extra["ort_fusions"] = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    extra["skip_layer_norm_unfused"] = _unfuse_skip_layer_norm(optimized.model.graph)
    _drop_anchors(optimized.model.graph, anchors)
    del optimized.model.graph.value_info[:]  # stale shapes from the exporter; shape inference redoes them
    optimized.save_model_to_file(str(out_path))
