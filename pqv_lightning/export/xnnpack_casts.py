"""fp32 <-> fp16 conversions inside the XNNPACK delegate, so that a graph with fp16 attention stays one delegate.

ExecuTorch 1.5's XNNPACK partitioner leaves every dtype conversion outside the delegate (``ToDimOrderCopyConfig``:
"dtype conversion ... is not supported") and its serializer has no node for one, although XNNPACK's own
``xnn_define_convert`` converts between fp32 and fp16. Measured on deit_small (``int8_dynamic``, 2 threads, AMD
EPYC Zen 4): fp16 attention with the casts left outside split the program into 25 delegates, and the 48 portable
casts took 12.4 ms of a 33.6 ms forward (19.8 ms with fp32 attention); with the casts inside it is one delegate
again and runs in 18.8 ms (this CPU has no fp16 arithmetic, so XNNPACK computes the products in fp32).

Two pieces: a partitioner config that also takes a plain fp32 <-> fp16 cast (same dim order), and a node visitor
that serialises such a cast as XNNPACK ``Convert``. The visitor replaces ExecuTorch's ``aten._to_copy.default``
visitor and hands every cast that keeps its dtype (the only kind the stock partitioner ever delegates) to it.
"""

from __future__ import annotations

import torch
from executorch.backends.xnnpack.operators import node_visitor
from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
from executorch.backends.xnnpack.partition.config.generic_node_configs import ToDimOrderCopyConfig
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import XNNConvert, XNode
from executorch.backends.xnnpack.utils.utils import get_input_node

__all__ = ["float_cast_partitioner"]

_TO_COPY = "aten._to_copy.default"
_FLOATS = frozenset({torch.float32, torch.float16})


def _is_float_cast(node: torch.fx.Node) -> bool:
    """A conversion between fp32 and fp16 that keeps the default dim order."""
    source, target = get_input_node(node, 0).meta["val"], node.meta["val"]
    dim_order = node.kwargs.get("dim_order")
    return (
        source.dtype != target.dtype
        and {source.dtype, target.dtype} <= _FLOATS
        and (dim_order is None or list(dim_order) == list(range(target.dim())))
    )


class _FloatCastConfig(ToDimOrderCopyConfig):
    """``_to_dim_order_copy``: what the stock config takes (dim order changes), and fp32 <-> fp16 casts."""

    def check_constraints(self, node: torch.fx.Node, ep: torch.export.ExportedProgram) -> bool:
        if _is_float_cast(node):
            return self.check_common_constraints(node, ep)
        return super().check_constraints(node, ep)


def _register_convert_visitor() -> None:
    """Serialise fp32 <-> fp16 casts as XNNPACK ``Convert``; other casts go to the stock visitor (idempotent)."""
    stock = node_visitor._node_visitor_dict[_TO_COPY]
    if getattr(stock, "_pqv_float_casts", False):
        return

    class FloatCastVisitor(stock):
        _pqv_float_casts = True

        def define_node(self, node, xnn_graph, vals_to_ids, debug_handle) -> None:
            if not _is_float_cast(node):
                return super().define_node(node, xnn_graph, vals_to_ids, debug_handle)
            source = get_input_node(node, 0)
            self.define_tensor(source, xnn_graph, vals_to_ids)
            self.define_tensor(node, xnn_graph, vals_to_ids)
            convert = XNNConvert(input_id=vals_to_ids[source], output_id=vals_to_ids[node], flags=0)
            xnn_graph.xnodes.append(XNode(xnode_union=convert, debug_handle=debug_handle))
            return None

    node_visitor.register_node_visitor(FloatCastVisitor)


def float_cast_partitioner() -> XnnpackPartitioner:
    """An XNNPACK partitioner with every stock config, whose cast config also delegates fp32 <-> fp16 casts."""
    _register_convert_visitor()
    configs = [_FloatCastConfig if c is ToDimOrderCopyConfig else c for c in ALL_PARTITIONER_CONFIGS]
    return XnnpackPartitioner(configs=configs)
