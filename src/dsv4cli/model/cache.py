"""Decoding state of DeepSeek-V4 attention: the real cache structure of the reference (spec §2.7).

Per layer: a ring buffer of the last `window_size` KV rows (token p in slot p % win);
for compressed layers the pool of emitted compressed entries (entry w = tokens
[w*m, (w+1)*m)) plus the compressor's running state (the open window's projected
tokens and, for the overlapping CSA compressor, the previous window's first half);
for CSA layers also the indexer's key pool and its compressor state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4cli.model.args import CSA, SWA, ModelArgs


@dataclass
class CompressorState:
    """Running state of one compressor (main or indexer) and the pool it fills."""

    ratio: int
    pending_kv: torch.Tensor  # [B, m, c*d] float32: projected tokens of the open window
    pending_score: torch.Tensor  # [B, m, c*d] float32: their gate logits (+ ape)
    pool: torch.Tensor  # [B, max_len // m, d]: emitted entries, in activation dtype
    prev_kv: torch.Tensor | None = None  # CSA: [B, m, d] Ca half of the last closed window
    prev_score: torch.Tensor | None = None

    @classmethod
    def allocate(cls, ratio: int, head_dim: int, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> CompressorState:
        overlap = ratio == CSA
        width = (2 if overlap else 1) * head_dim
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            ratio=ratio,
            pending_kv=torch.zeros(batch, ratio, width, **f32),
            pending_score=torch.full((batch, ratio, width), float("-inf"), **f32),
            pool=torch.zeros(batch, max_len // ratio, head_dim, dtype=dtype, device=device),
            prev_kv=torch.zeros(batch, ratio, head_dim, **f32) if overlap else None,
            prev_score=torch.full((batch, ratio, head_dim), float("-inf"), **f32) if overlap else None,
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.pending_kv, self.pending_score, self.pool, self.prev_kv, self.prev_score)
                if t is not None]

    def running_state(self) -> list[torch.Tensor]:
        """The tensors a snapshot must copy: everything but the append-only pool."""
        return [t for t in (self.pending_kv, self.pending_score, self.prev_kv, self.prev_score) if t is not None]


@dataclass
class LayerCache:
    window: torch.Tensor  # [B, window_size, head_dim] ring buffer of KV rows
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    @classmethod
    def allocate(cls, args: ModelArgs, layer_id: int, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> LayerCache:
        ratio = args.layer_ratio(layer_id)
        window = torch.zeros(batch, args.window_size, args.head_dim, dtype=dtype, device=device)
        if ratio == SWA:
            return cls(window)
        compressor = CompressorState.allocate(ratio, args.head_dim, batch, max_len, dtype, device)
        indexer = (CompressorState.allocate(ratio, args.index_head_dim, batch, max_len, dtype, device)
                   if ratio == CSA else None)
        return cls(window, compressor, indexer)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.window]
        for state in (self.compressor, self.indexer):
            if state is not None:
                out += state.tensors()
        return out

    def running_state(self) -> list[torch.Tensor]:
        out = [self.window]
        for state in (self.compressor, self.indexer):
            if state is not None:
                out += state.running_state()
        return out


@dataclass
class CacheSnapshot:
    """The cache at one position: copies of the rings and compressor states. Pool entries below
    `pos // ratio` are final once written, so the pools themselves are not copied."""

    pos: int
    mtp_pos: int
    tensors: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass
class ModelCache:
    """All layers' state plus the number of positions already processed (`pos`)."""

    args: ModelArgs
    batch: int
    max_len: int
    layers: list[LayerCache]
    mtp: list[LayerCache] = field(default_factory=list)
    pos: int = 0
    mtp_pos: int = 0

    @classmethod
    def allocate(cls, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", with_mtp: bool = False) -> ModelCache:
        device = torch.device(device)
        layers = [LayerCache.allocate(args, i, batch, max_len, dtype, device) for i in range(args.n_layers)]
        mtp = ([LayerCache.allocate(args, args.n_layers + i, batch, max_len, dtype, device)
                for i in range(args.n_mtp_layers)] if with_mtp else [])
        return cls(args, batch, max_len, layers, mtp)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers + self.mtp for t in layer.tensors())

    def _running_state(self) -> list[torch.Tensor]:
        return [t for layer in self.layers + self.mtp for t in layer.running_state()]

    def snapshot(self) -> CacheSnapshot:
        """Copy what later tokens overwrite, so decoding can resume from `pos` later."""
        return CacheSnapshot(self.pos, self.mtp_pos, [t.clone() for t in self._running_state()])

    def restore(self, snap: CacheSnapshot) -> None:
        """Go back to a snapshot taken on this cache. Snapshots taken after it (at a larger
        position, in the abandoned timeline) become invalid: later tokens rewrite their pool entries."""
        for live, saved in zip(self._running_state(), snap.tensors, strict=True):
            live.copy_(saved)
        self.pos, self.mtp_pos = snap.pos, snap.mtp_pos

    def reset(self) -> None:
        """Back to an empty context (pool contents are rewritten before they are read again)."""
        for state in self._running_state():
            state.zero_()
        for layer in self.layers + self.mtp:
            for comp in (layer.compressor, layer.indexer):
                if comp is not None:
                    comp.pending_score.fill_(float("-inf"))
                    if comp.prev_score is not None:
                        comp.prev_score.fill_(float("-inf"))
        self.pos = self.mtp_pos = 0

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype_bytes: int = 2) -> float:
        """Cache bytes that grow with context per token (compressed pools; spec §2.7)."""
        total = 0.0
        for layer in range(args.n_layers):
            ratio = args.layer_ratio(layer)
            if ratio:
                total += args.head_dim * dtype_bytes / ratio
            if ratio == CSA:
                total += args.index_head_dim * dtype_bytes / ratio
        return total
