"""Mixture of experts: router (learned or hash), routed FP4 experts, shared expert (spec §2.8)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from dsv4cli import kernels
from dsv4cli.kernels.experts import ExpertTable
from dsv4cli.model.args import ModelArgs
from dsv4cli.model.layers import Linear, Numerics, _frozen


@runtime_checkable
class RoutedExperts(Protocol):
    """Runs the routed experts of every MoE layer somewhere else than the layer's own kernel call (the
    offload runtime, the imatrix recorder). Attached with `Transformer.use_routed_experts`."""

    def run(self, layer_id: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N,D], weights/indices [N,k] of layer `layer_id` -> the selected experts' outputs, float32 [N,D]."""
        ...


#: sees each MoE forward's selected experts: (layer id, indices [N,k]); attached with `Transformer.observe_routing`
RouteObserver = Callable[[int, torch.Tensor], None]


class Gate(nn.Module):
    """Scores every expert (float32) and picks `n_activated_experts` of them.

    Learned layers select by score + bias (the bias only steers selection); hash
    layers select by the token-id table `tid2eid`. Weights are the selected scores,
    renormalised (non-softmax scoring) and multiplied by `route_scale`.
    """

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args = args
        self.is_hash = layer_id < args.n_layers and args.is_hash_layer(layer_id)
        self.weight = _frozen(args.n_routed_experts, args.dim, dtype=torch.bfloat16)
        if self.is_hash:
            self.tid2eid = _frozen(args.vocab_size, args.n_activated_experts, dtype=torch.int64)
        else:
            self.bias = _frozen(args.n_routed_experts, dtype=torch.float32)
        self.layer_id = layer_id
        self._observer: RouteObserver | None = None

    def observe(self, observer: RouteObserver | None) -> RouteObserver | None:
        """Call `observer(layer_id, indices)` on every forward from now on (None: stop); returns the previous one."""
        previous, self._observer = self._observer, observer
        return previous

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        if self.args.score_func == "softmax":
            return logits.softmax(-1)
        if self.args.score_func == "sigmoid":
            return logits.sigmoid()
        return F.softplus(logits).sqrt()

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,D], token_ids [N] -> (weights [N,k] float32, expert indices [N,k])."""
        scores = self.scores(x)
        if self.is_hash:
            indices = self.tid2eid[token_ids].long()
        else:
            indices = (scores + self.bias.float()).topk(self.args.n_activated_experts, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.args.score_func != "softmax":
            weights = weights / weights.sum(-1, keepdim=True)
        if self._observer is not None:
            self._observer(self.layer_id, indices)
        return weights * self.args.route_scale, indices


class Expert(nn.Module):
    """SwiGLU feed-forward with the clamp (`swiglu_limit`) on gate and up projections.

    `fmt`: one stored format for all three projections, or (w1, w2, w3) formats (quantized checkpoints)."""

    def __init__(self, args: ModelArgs, fmt: str | tuple[str, str, str], numerics: Numerics):
        super().__init__()
        f1, f2, f3 = (fmt, fmt, fmt) if isinstance(fmt, str) else fmt
        self.swiglu_limit = args.swiglu_limit
        self.w1 = Linear(args.dim, args.moe_inter_dim, f1, numerics.fp8_act_quant)
        self.w2 = Linear(args.moe_inter_dim, args.dim, f2, numerics.fp8_act_quant)
        self.w3 = Linear(args.dim, args.moe_inter_dim, f3, numerics.fp8_act_quant)

    def forward(self, x: torch.Tensor, route_weight: torch.Tensor | None = None) -> torch.Tensor:
        """x [N,D] -> float32 [N,D]; `route_weight` [N,1] scales the hidden state before w2."""
        return kernels.swiglu_expert(x, self.w1.weight, self.w1.scale, self.w2.weight, self.w2.scale,
                                     self.w3.weight, self.w3.scale, route_weight, self.swiglu_limit,
                                     self.w1.act_quant)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, numerics: Numerics):
        super().__init__()
        self.gate = Gate(args, layer_id)
        self.experts = nn.ModuleList(Expert(args, args.expert_formats(layer_id, e), numerics)
                                     for e in range(args.n_routed_experts))
        self.shared_experts = Expert(args, tuple(args.linear_format(layer_id, f"ffn.shared_experts.{p}")
                                                 for p in ("w1", "w2", "w3")), numerics)
        self._table: ExpertTable | None = None
        self.layer_id = layer_id
        self._routed: RoutedExperts | None = None

    def use_routed_experts(self, runner: RoutedExperts | None) -> None:
        """Run this layer's routed experts through `runner` (None: the layer's own kernel call)."""
        self._routed = runner

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = self.gate(flat, token_ids.reshape(-1))
        out = self.routed(flat, weights, indices) + self.shared_experts(flat)
        return out.to(x.dtype).view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the selected experts' outputs (float32), all experts in one kernel call."""
        if self._routed is not None:
            return self._routed.run(self.layer_id, x, weights, indices)
        expert = self.experts[0]
        return kernels.moe_experts(x, weights, indices, self.expert_table(), expert.swiglu_limit,
                                   expert.w1.act_quant)

    def expert_table(self) -> ExpertTable:
        """The experts' tensors as one table (built on first use, after the weights are attached)."""
        if self._table is None:
            self._table = ExpertTable.from_experts(
                [(e.w1.weight, e.w1.scale, e.w2.weight, e.w2.scale, e.w3.weight, e.w3.scale) for e in self.experts])
        return self._table
