"""decompose_attention: scaled dot-product attention becomes its two matrix products.

Rule: ``scaled_dot_product_attention(q, k, v, mask, is_causal, scale)`` (in eval, without dropout)
becomes ``softmax(masked(matmul(q * scale, k^T))) @ v``, with ``scale = 1 / sqrt(head dim)`` when not
given, ``masked`` filling ``-inf`` over the causal triangle and adding the mask as a bias: a float
mask as it is, a boolean one as 0 where True and ``-inf`` where False, converted once per mask
however many attention ops read it (adding is what the filling amounts to, and cheaper to run
than a select per layer). The two products are then ordinary activation matmuls, which the target
may quantize like any compute op. Attention with dropout or grouped-query heads is left as it is.
"""

from __future__ import annotations

import logging
import math
import operator

import torch
from torch import fx

from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program

log = logging.getLogger("qcompiler.decompose_attention")


def mask_as_bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask as an additive bias (0 where True, ``-inf`` where False); a float mask as it is."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(mask.logical_not(), float("-inf"))


def masked_scores(scores: torch.Tensor, bias: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Attention scores with the causal triangle filled with ``-inf`` and ``bias`` (``mask_as_bias``) added."""
    if is_causal:
        n, m = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    return scores if bias is None else scores + bias


def _head_dim(q: fx.Node) -> int | None:
    val = q.meta.get("val")
    try:
        return int(val.shape[-1])
    except (AttributeError, TypeError, IndexError):
        return None


class DecomposeAttention(Pass):
    """Rewrite scaled_dot_product_attention as matmul, softmax, matmul (module docstring)."""

    name = "decompose_attention"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)

    @staticmethod
    def _bias(g: fx.Graph, mask: object, biases: dict) -> object:
        """The additive form of ``mask``, made once right after the mask node."""
        if not isinstance(mask, fx.Node):
            return mask_as_bias(mask) if isinstance(mask, torch.Tensor) else mask
        if mask not in biases:
            with g.inserting_after(mask):
                biases[mask] = g.call_function(mask_as_bias, (mask,))
        return biases[mask]

    def run(self, program: Program) -> PassResult:
        gm = program.gm
        done = kept = 0
        biases: dict[fx.Node, fx.Node] = {}  # mask -> its additive form, shared by every reader
        for node in list(gm.graph.nodes):
            if registry.kind(node, gm) != "attention":
                continue
            a = registry.args_of(node, gm)
            dim = _head_dim(a["query"])
            if a["dropout_p"] or a["enable_gqa"] or (a["scale"] is None and dim is None):
                kept += 1
                continue
            scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(dim)
            g = gm.graph
            with g.inserting_before(node):
                q = g.call_function(operator.mul, (a["query"], float(scale)))
                kt = g.call_function(torch.transpose, (a["key"], -2, -1))
                scores = g.call_function(torch.matmul, (q, kt))
                if a["attn_mask"] is not None or a["is_causal"]:
                    scores = g.call_function(masked_scores, (scores, self._bias(g, a["attn_mask"], biases),
                                                             bool(a["is_causal"])))
                probs = g.call_function(torch.softmax, (scores, -1))
                out = g.call_function(torch.matmul, (probs, a["value"]))
            out.meta.update({k: v for k, v in node.meta.items() if k == "val"})
            node.replace_all_uses_with(out)
            g.erase_node(node)
            done += 1
        if kept:
            log.info("%d attention op(s) kept whole (dropout, grouped-query heads or unknown head size)", kept)
        gm.graph.lint()
        gm.recompile()
        return PassResult(bool(done), {"decomposed": done, "kept": kept})
