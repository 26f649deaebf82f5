"""DeepSeek-V4 attention: shared K=V single head over a sliding window plus compressed entries
(spec §2.3), the compressor for CSA (ratio 4, overlapping) and HCA (ratio 128) (§2.4), and
the lightning indexer that picks the CSA entries each query reads (§2.5).

Every call processes a chunk of S new tokens starting at `start_pos` against a
`LayerCache`, so a prefill in one call, a prefill in chunks, and token-by-token
decoding all compute the same thing.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4cli import kernels
from dsv4cli.model.args import CSA, SWA, ModelArgs
from dsv4cli.model.cache import CompressorState, LayerCache
from dsv4cli.model.layers import (
    Linear,
    Numerics,
    RMSNorm,
    Rotary,
    _frozen,
    apply_rope,
    rms_normalize,
    rope_inv_freq,
    softmax_scale,
)


class Compressor(nn.Module):
    """Pools every window of `ratio` tokens into one KV entry by a per-channel softmax (spec §2.4).

    CSA (ratio 4) overlaps: entry w pools the first channel half ("Ca") of window w-1
    and the second half ("Cb") of window w, 8 slots in all. HCA (ratio 128) pools its
    own window. Entries are RMS-normed, RoPE'd at position w*ratio and, as in the
    reference, FP8 fake-quantized (main) or Hadamard + FP4 fake-quantized (`rotate`,
    the indexer's keys).
    """

    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, rotate: bool, numerics: Numerics):
        super().__init__()
        self.args, self.ratio, self.head_dim, self.rotate = args, ratio, head_dim, rotate
        self.overlap = ratio == CSA
        self.numerics = numerics
        width = (2 if self.overlap else 1) * head_dim
        self.ape = _frozen(ratio, width, dtype=torch.float32)
        self.wkv = Linear(args.dim, width, "bf16")
        self.wgate = Linear(args.dim, width, "bf16")
        self.norm = RMSNorm(head_dim, args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, state: CompressorState, rotary: Rotary) -> int:
        """Feed tokens x [B,S,D] at positions start_pos.. ; write every window they close into
        `state.pool`. Returns the number of entries now in the pool."""
        seq = x.shape[1]
        positions = torch.arange(start_pos, start_pos + seq, device=x.device)
        kv = self.wkv(x.float())
        score = self.wgate(x.float()) + self.ape[positions % self.ratio]
        if state.journal is not None:
            state.journal.note(lambda keep: self.absorb(kv[:, :keep], score[:, :keep], start_pos, state, rotary,
                                                        x.dtype))
        return self.absorb(kv, score, start_pos, state, rotary, x.dtype)

    def absorb(self, kv: torch.Tensor, score: torch.Tensor, start_pos: int, state: CompressorState, rotary: Rotary,
               dtype: torch.dtype) -> int:
        """The state update of `forward` from the tokens' projections kv, score [B,S,c*d] (float32): pool the
        windows they close into `state.pool` (entries in `dtype`), keep the open one's rows; returns the
        number of entries now in the pool."""
        m, d = self.ratio, self.head_dim
        batch = kv.shape[0]
        n_pending = start_pos % m
        kv = torch.cat([state.pending_kv[:, :n_pending], kv], dim=1)
        score = torch.cat([state.pending_score[:, :n_pending], score], dim=1)
        n_windows = kv.shape[1] // m
        closed = n_windows * m
        rest = kv.shape[1] - closed
        state.pending_kv[:, :rest] = kv[:, closed:]
        state.pending_score[:, :rest] = score[:, closed:]
        first = start_pos // m
        if n_windows == 0:
            return first
        kv = kv[:, :closed].view(batch, n_windows, m, -1)
        score = score[:, :closed].view(batch, n_windows, m, -1)
        if self.overlap:
            prev_kv = torch.cat([state.prev_kv[:, None], kv[:, :-1, :, :d]], dim=1)
            prev_score = torch.cat([state.prev_score[:, None], score[:, :-1, :, :d]], dim=1)
            state.prev_kv.copy_(kv[:, -1, :, :d])
            state.prev_score.copy_(score[:, -1, :, :d])
            kv = torch.cat([prev_kv, kv[..., d:]], dim=2)
            score = torch.cat([prev_score, score[..., d:]], dim=2)
        entries = (kv * score.softmax(dim=2)).sum(dim=2)
        entries = self.norm(entries.to(dtype))
        cos, sin = rotary.at((first + torch.arange(n_windows, device=kv.device)) * m)
        entries = apply_rope(entries, cos, sin)
        if self.rotate and self.numerics.indexer_fp4_quant:
            entries = kernels.indexer_fp4_quant(entries)
        elif not self.rotate and self.numerics.kv_fp8_quant:
            entries = kernels.kv_fp8_quant(entries, self.args.rope_head_dim)
        state.write(first, entries)
        return first + n_windows


class Indexer(nn.Module):
    """Lightning indexer (spec §2.5): scores every visible CSA entry for each query,
    sum_h w_h * relu(q_h . k), and keeps the `index_topk` best (-1 where fewer are visible)."""

    def __init__(self, args: ModelArgs, numerics: Numerics, fmt: str | None = None):
        super().__init__()
        self.args, self.numerics = args, numerics
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, fmt or args.dtype, numerics.fp8_act_quant)
        self.weights_proj = Linear(args.dim, self.n_heads, "bf16")
        self.compressor = Compressor(args, CSA, self.head_dim, rotate=True, numerics=numerics)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, state: CompressorState,
                rotary: Rotary) -> torch.Tensor:
        batch, seq, _ = x.shape
        positions = torch.arange(start_pos, start_pos + seq, device=x.device)
        cos, sin = rotary.at(positions)
        q = self.wq_b(qr).view(batch, seq, self.n_heads, self.head_dim)
        q = apply_rope(q, cos[:, None], sin[:, None])
        if self.numerics.indexer_fp4_quant:
            q = kernels.indexer_fp4_quant(q)
        n_entries = self.compressor(x, start_pos, state, rotary)
        weights = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        visible_count = (positions + 1) // CSA  # query t sees entries w < (t+1)//4
        return kernels.indexer_topk(q, weights, state.pool[:, :n_entries], visible_count, self.args.index_topk)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, numerics: Numerics):
        super().__init__()
        self.args, self.numerics = args, numerics
        self.ratio = args.layer_ratio(layer_id)
        h, hd, aq = args.n_heads, args.head_dim, numerics.fp8_act_quant

        def fmt(name: str) -> str:
            return args.linear_format(layer_id, f"attn.{name}")

        self.attn_sink = _frozen(h, dtype=torch.float32)
        self.wq_a = Linear(args.dim, args.q_lora_rank, fmt("wq_a"), aq)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = Linear(args.q_lora_rank, h * hd, fmt("wq_b"), aq)
        self.wkv = Linear(args.dim, hd, fmt("wkv"), aq)
        self.kv_norm = RMSNorm(hd, args.norm_eps)
        # The reference runs wo_a in bf16 (convert.py dequantizes it): no activation quant.
        self.wo_a = Linear(h * hd // args.o_groups, args.o_groups * args.o_lora_rank, fmt("wo_a"), act_quant=False)
        self.wo_b = Linear(args.o_groups * args.o_lora_rank, args.dim, fmt("wo_b"), aq)
        if self.ratio != SWA:
            self.compressor = Compressor(args, self.ratio, hd, rotate=False, numerics=numerics)
        if self.ratio == CSA:
            self.indexer = Indexer(args, numerics, fmt("indexer.wq_b"))
        with torch.device("cpu"):
            self.rotary = Rotary(rope_inv_freq(args, compressed=self.ratio != SWA))

    def forward(self, x: torch.Tensor, start_pos: int, cache: LayerCache) -> torch.Tensor:
        """x [B,S,D] (normed block input) at positions start_pos.. -> [B,S,D]."""
        args = self.args
        batch, seq, _ = x.shape
        positions = torch.arange(start_pos, start_pos + seq, device=x.device)
        cos, sin = self.rotary.at(positions)

        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(batch, seq, args.n_heads, args.head_dim)
        q = rms_normalize(q, args.norm_eps).to(x.dtype)
        q = apply_rope(q, cos[:, None], sin[:, None])
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if self.numerics.kv_fp8_quant:
            kv = kernels.kv_fp8_quant(kv, args.rope_head_dim)

        local_kv, window_idx = self._window(kv, start_pos, cache)
        pool = picked = None
        if self.ratio != SWA:
            n_entries = self.compressor(x, start_pos, cache.compressor, self.rotary)
            if self.ratio == CSA:
                picked = self.indexer(x, qr, start_pos, cache.indexer, self.rotary)
            else:
                entries = torch.arange(n_entries, device=x.device).expand(seq, -1)
                picked = torch.where(entries < ((positions + 1) // self.ratio)[:, None], entries, -1)
                picked = picked.expand(batch, -1, -1)
            pool = cache.compressor.pool[:, :n_entries]

        o = kernels.cached_attn(q, local_kv, window_idx, pool, picked, self.attn_sink, softmax_scale(args.head_dim),
                                args.rope_head_dim)
        o = apply_rope(o, cos[:, None], sin[:, None], inverse=True)
        return self._project_out(o)

    def _window(self, kv: torch.Tensor, start_pos: int, cache: LayerCache
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """KV rows the window can reach (earlier tokens from the ring, then this chunk; for one decoded token
        the ring itself, read in place) and each query's window indices into them [1,S,win] (-1 = nothing
        there); updates the ring."""
        win = self.args.window_size
        seq = kv.shape[1]
        if cache.journal is not None:
            cache.journal.note(lambda keep: self._write_ring(kv[:, :keep], start_pos, cache))
        if seq == 1:  # decode: the new row goes into the ring first, then the ring itself is read in place
            cache.window[:, start_pos % win] = kv[:, 0].to(cache.window.dtype)
            key_pos = torch.arange(start_pos - win + 1, start_pos + 1, device=kv.device)
            return cache.window, torch.where(key_pos >= 0, key_pos % win, -1)[None, None]
        n_prev = min(start_pos, win - 1)
        first = start_pos - n_prev
        earlier = torch.arange(first, start_pos, device=kv.device)
        local = torch.cat([cache.window[:, earlier % win].to(kv.dtype), kv], dim=1)
        self._write_ring(kv, start_pos, cache)
        query_pos = torch.arange(start_pos, start_pos + seq, device=kv.device)
        key_pos = query_pos[:, None] - win + 1 + torch.arange(win, device=kv.device)
        index = torch.where(key_pos >= first, key_pos - first, -1)
        return local, index[None]

    def _write_ring(self, kv: torch.Tensor, start_pos: int, cache: LayerCache) -> None:
        """Store the rows kv [B,S,hd] of positions start_pos.. in the ring (the last window_size of them)."""
        win, seq = self.args.window_size, kv.shape[1]
        keep = min(seq, win)
        written = torch.arange(start_pos + seq - keep, start_pos + seq, device=kv.device)
        cache.window[:, written % win] = kv[:, seq - keep:].to(cache.window.dtype)

    def _project_out(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection (spec §2.3 step 7)."""
        args = self.args
        batch, seq = o.shape[:2]
        groups = o.reshape(batch, seq, args.o_groups, -1)
        z = kernels.grouped_linear(groups, self.wo_a.weight, self.wo_a.scale)
        return self.wo_b(z.flatten(2))
