"""The DeepSeek-V4 transformer: blocks, output head and the MTP layer (spec §2.1, §2.2, §2.9, §2.10).

Pure PyTorch and no I/O: build it (on the `meta` device when loading), assign the
checkpoint tensors by their official names, then call `forward(ids, cache)`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4cli import kernels
from dsv4cli.model.args import ModelArgs
from dsv4cli.model.attention import Attention
from dsv4cli.model.cache import CacheLayout, LayerCache, ModelCache
from dsv4cli.model.hyper import hc_head, hc_post, hc_pre
from dsv4cli.model.layers import Embedding, Linear, Numerics, RMSNorm, _frozen
from dsv4cli.model.moe import MoE, RoutedExperts, RouteObserver

HEAD_CHUNK_ROWS = 16384


class Block(nn.Module):
    """mHC(attention) then mHC(MoE) on the n-stream residual [B,S,n,D] (spec §2.2)."""

    def __init__(self, args: ModelArgs, layer_id: int, numerics: Numerics):
        super().__init__()
        self.args, self.layer_id = args, layer_id
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", _frozen(args.hc_dim, args.hc_mult * args.dim, dtype=torch.float32))
            setattr(self, f"hc_{site}_base", _frozen(args.hc_dim, dtype=torch.float32))
            setattr(self, f"hc_{site}_scale", _frozen(3, dtype=torch.float32))
        self.attn = Attention(args, layer_id, numerics)
        self.ffn = MoE(args, layer_id, numerics)

    def forward(self, x: torch.Tensor, start_pos: int, token_ids: torch.Tensor, cache: LayerCache
                ) -> torch.Tensor:
        y, post, comb = hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.args)
        x = hc_post(self.attn(self.attn_norm(y), start_pos, cache), x, post, comb)
        y, post, comb = hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, self.args)
        return hc_post(self.ffn(self.ffn_norm(y), token_ids), x, post, comb)


class OutputHead(nn.Module):
    """Vocabulary projection `head.weight` [V,D]; float32 logits as in the reference, computed in
    vocabulary chunks so no float32 copy of the whole matrix is ever made."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = _frozen(vocab_size, dim, dtype=torch.bfloat16)
        self._chunks: tuple[tuple, list[torch.Tensor]] = ((), [])

    def chunks(self) -> list[torch.Tensor]:
        """The weight's row chunks, the same view objects while the weight's memory stays (so the kernels'
        per-weight state carries over from step to step); rebuilt when the weight is replaced or moved."""
        w = self.weight
        key = (w.data_ptr(), tuple(w.shape), w.dtype, w.device)
        if self._chunks[0] != key:
            self._chunks = (key, [w[i:i + HEAD_CHUNK_ROWS] for i in range(0, w.shape[0], HEAD_CHUNK_ROWS)])
        return self._chunks[1]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        yf = y.float()
        return torch.cat([kernels.linear(yf, chunk) for chunk in self.chunks()], dim=-1)


def collapse_streams(owner: nn.Module, x: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """hc_head then the final RMSNorm, with `owner`'s hc_head_* parameters and norm (spec §2.9)."""
    return owner.norm(hc_head(x, owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base, args))


def _add_hc_head(module: nn.Module, args: ModelArgs) -> None:
    module.hc_head_fn = _frozen(args.hc_mult, args.hc_mult * args.dim, dtype=torch.float32)
    module.hc_head_base = _frozen(args.hc_mult, dtype=torch.float32)
    module.hc_head_scale = _frozen(1, dtype=torch.float32)


class MTPBlock(Block):
    """Multi-token prediction layer: predicts token t+2 from the trunk's streams at t and the
    embedding of token t+1 (spec §2.10). Shares `embed` and `head` with the trunk."""

    def __init__(self, args: ModelArgs, layer_id: int, numerics: Numerics):
        super().__init__(args, layer_id, numerics)
        aq = numerics.fp8_act_quant
        self.e_proj = Linear(args.dim, args.dim, args.linear_format(layer_id, "e_proj"), aq)
        self.h_proj = Linear(args.dim, args.dim, args.linear_format(layer_id, "h_proj"), aq)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        _add_hc_head(self, args)

    def streams(self, hidden: torch.Tensor, next_embed: torch.Tensor, start_pos: int,
                next_ids: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """The layer's residual streams [B,S,n,D] (before its hc_head) from `hidden` [B,S,n,D] (the trunk's
        streams, or this layer's own when drafts are chained) and the next tokens' embeddings."""
        x = self.e_proj(self.enorm(next_embed)).unsqueeze(2) + self.h_proj(self.hnorm(hidden))
        return super().forward(x, start_pos, next_ids, cache)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, numerics: Numerics | None = None, with_mtp: bool = True):
        super().__init__()
        self.args = args
        self.numerics = numerics or Numerics()
        self.embed = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i, self.numerics) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = OutputHead(args.vocab_size, args.dim)
        _add_hc_head(self, args)
        self.mtp = nn.ModuleList(MTPBlock(args, args.n_layers + i, self.numerics)
                                 for i in range(args.n_mtp_layers if with_mtp else 0))
        #: where the routed experts run when not in the layers' own kernel calls (`use_routed_experts`)
        self.routed_experts: RoutedExperts | None = None

    def use_routed_experts(self, runner: RoutedExperts | None) -> RoutedExperts | None:
        """Run every trunk MoE layer's routed experts through `runner` (None: the layers' own kernels), the seam
        for the offload runtime and the imatrix recorder; returns the runner it replaces."""
        previous, self.routed_experts = self.routed_experts, runner
        for layer in self.layers:
            layer.ffn.use_routed_experts(runner)
        return previous

    def observe_routing(self, observer: RouteObserver | None) -> None:
        """Call `observer(layer_id, indices)` with every trunk MoE layer's expert choice (None: stop)."""
        for layer in self.layers:
            layer.ffn.gate.observe(observer)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch: int = 1, max_len: int = 4096, device: torch.device | str | None = None
                  ) -> ModelCache:
        return ModelCache.allocate(self.args, batch, max_len, self.numerics.act_dtype,
                                   device or self.device, with_mtp=len(self.mtp) > 0, layout=self.cache_layout)

    @property
    def cache_layout(self) -> CacheLayout:
        """How this model's caches store their pools (compact wherever that is lossless)."""
        n = self.numerics
        return CacheLayout.for_numerics(self.args, n.act_dtype, n.kv_fp8_quant, n.indexer_fp4_quant)

    def streams(self, token_ids: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """Run the trunk on token_ids [B,S] at positions cache.pos.. ; returns the residual
        streams [B,S,n,D] before the head and advances cache.pos."""
        seq = token_ids.shape[1]
        start = cache.pos
        if start + seq > cache.max_len:
            raise ValueError(f"context of {start + seq} tokens exceeds the cache size {cache.max_len}")
        h = self.embed(token_ids, self.numerics.act_dtype)
        x = h.unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1).contiguous()
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x = layer(x, start, token_ids, layer_cache)
        cache.pos = start + seq
        return x

    def logits(self, streams: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B,S,V] from residual streams [B,S,n,D] (hc_head, norm, head)."""
        return self.head(collapse_streams(self, streams, self.args))

    def forward(self, token_ids: torch.Tensor, cache: ModelCache, last_only: bool = True) -> torch.Tensor:
        """Logits for the last position [B,V] (`last_only`) or every position [B,S,V]."""
        x = self.streams(token_ids, cache)
        return self.logits(x[:, -1:])[:, 0] if last_only else self.logits(x)

    def mtp_logits(self, streams: torch.Tensor, next_ids: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """MTP draft logits [B,S,V] for the positions of `streams` given the following tokens."""
        return self.mtp_step(streams, next_ids, cache, last_only=False)[0]

    def mtp_step(self, streams: torch.Tensor, next_ids: torch.Tensor, cache: ModelCache, last_only: bool = True,
                 with_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run the MTP layer on (streams [B,S,n,D] at positions cache.mtp_pos.., the tokens after them
        [B,S]) and advance cache.mtp_pos: (draft logits for the tokens after those, [B,V] for the last
        position when `last_only`, else [B,S,V], None without `with_logits`; the layer's own streams
        [B,S,n,D], which chain a further draft in place of the trunk's)."""
        if not self.mtp:
            raise ValueError("this model was built without its MTP layer")
        start = cache.mtp_pos
        if start + next_ids.shape[1] > cache.max_len:
            raise ValueError(f"MTP position {start + next_ids.shape[1]} exceeds the cache size {cache.max_len}")
        next_embed = self.embed(next_ids, self.numerics.act_dtype)
        x = self.mtp[0].streams(streams, next_embed, start, next_ids, cache.mtp[0])
        cache.mtp_pos = start + next_ids.shape[1]
        if not with_logits:
            return None, x
        y = x[:, -1:] if last_only else x
        logits = self.head(collapse_streams(self.mtp[0], y, self.args))
        return (logits[:, 0] if last_only else logits), x

    @torch.no_grad()
    def full_logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position of a fresh sequence (one call, its own cache)."""
        cache = self.new_cache(token_ids.shape[0], max_len=max(token_ids.shape[1], 1))
        return self.forward(token_ids, cache, last_only=False)
