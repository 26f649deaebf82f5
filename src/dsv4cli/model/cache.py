"""Decoding state of DeepSeek-V4 attention: the real cache structure of the reference (spec §2.7).

Per layer: a ring buffer of the last `window_size` KV rows (token p in slot p % win);
for compressed layers the pool of emitted compressed entries (entry w = tokens
[w*m, (w+1)*m)) plus the compressor's running state (the open window's projected
tokens and, for the overlapping CSA compressor, the previous window's first half);
for CSA layers also the indexer's key pool and its compressor state.

The pools are what grows with the context. Where the numerics already round their entries to the
official low-precision grids (FP8 KV, FP4 indexer keys), they are stored in the serving engines'
compact rows (`formats.kvcache`: 584 B per main entry, 68 B per indexer key), which decode to the
same values; otherwise in the activation dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dsv4cli.formats.kvcache import (
    compact_index_supported,
    compact_kv_supported,
    decode_index_rows,
    decode_kv_rows,
    encode_index_rows,
    encode_kv_rows,
    index_row_bytes,
    kv_row_bytes,
)
from dsv4cli.kernels import ref
from dsv4cli.model.args import CSA, SWA, ModelArgs

#: pool layouts: entries in the activation dtype, compact FP8 main-KV rows, compact FP4 indexer keys
DENSE, FP8_KV, FP4_INDEX = "dense", "fp8-kv", "fp4-index"


@dataclass(frozen=True)
class CacheLayout:
    """How the pools store their entries: `main` for the attention's KV pool, `index` for the
    indexer's keys (DENSE, FP8_KV, FP4_INDEX)."""

    main: str = DENSE
    index: str = DENSE

    @classmethod
    def for_numerics(cls, args: ModelArgs, act_dtype: torch.dtype, kv_fp8_quant: bool,
                     indexer_fp4_quant: bool) -> CacheLayout:
        """Compact wherever it is lossless: FP8 KV rows need the FP8 KV rounding and bf16 activations
        (their RoPE dims are stored in bf16); FP4 keys need the indexer's FP4 rounding."""
        main = FP8_KV if (kv_fp8_quant and act_dtype == torch.bfloat16
                          and compact_kv_supported(args.head_dim, args.rope_head_dim)) else DENSE
        index = FP4_INDEX if indexer_fp4_quant and compact_index_supported(args.index_head_dim) else DENSE
        return cls(main, index)

    @classmethod
    def official(cls, args: ModelArgs) -> CacheLayout:
        """The layout under the official numerics (bf16 activations, FP8 KV, FP4 indexer keys): compact."""
        return cls.for_numerics(args, torch.bfloat16, kv_fp8_quant=True, indexer_fp4_quant=True)

    @staticmethod
    def entry_bytes(layout: str, head_dim: int, rope_dim: int, dtype_bytes: int) -> int:
        """Bytes of one pool entry stored in `layout`."""
        if layout == FP8_KV:
            return kv_row_bytes(head_dim, rope_dim)
        if layout == FP4_INDEX:
            return index_row_bytes(head_dim)
        return head_dim * dtype_bytes


class CacheJournal:
    """The cache writes of one recorded forward (`ModelCache.recording`), each kept as a function of how
    many of the forward's tokens to write, so that the state after only its first tokens can be rebuilt
    without running the model again: speculative decoding keeps a verified prefix of the drafts this way.
    Sound because the model is causal: a token's cache rows do not depend on the tokens after it."""

    def __init__(self, start: int, tokens: int = 0):
        self.start = start  # the cache position the recorded forward started at
        self.tokens = tokens  # tokens it fed (set when the recording ends)
        self.writes: list[Callable[[int], None]] = []

    def note(self, write: Callable[[int], None]) -> None:
        """Keep `write(keep)`: the call's cache write for its first `keep` tokens."""
        self.writes.append(write)

    def replay(self, keep: int) -> None:
        for write in self.writes:
            write(keep)


@dataclass
class CompressorState:
    """Running state of one compressor (main or indexer) and the pool it fills."""

    ratio: int
    pending_kv: torch.Tensor  # [B, m, c*d] float32: projected tokens of the open window
    pending_score: torch.Tensor  # [B, m, c*d] float32: their gate logits (+ ape)
    pool: torch.Tensor  # [B, max_len // m, d] in activation dtype, or [B, max_len // m, bytes] compact rows
    prev_kv: torch.Tensor | None = None  # CSA: [B, m, d] Ca half of the last closed window
    prev_score: torch.Tensor | None = None
    layout: str = DENSE
    head_dim: int = 0
    rope_dim: int = 0
    dtype: torch.dtype = torch.bfloat16  # the activation dtype entries are written and read in
    journal: CacheJournal | None = None  # set while a forward is recorded

    @classmethod
    def allocate(cls, ratio: int, head_dim: int, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, layout: str = DENSE, rope_dim: int = 0) -> CompressorState:
        overlap = ratio == CSA
        width = (2 if overlap else 1) * head_dim
        f32 = dict(dtype=torch.float32, device=device)
        if layout == DENSE:
            pool = torch.zeros(batch, max_len // ratio, head_dim, dtype=dtype, device=device)
        else:
            row = CacheLayout.entry_bytes(layout, head_dim, rope_dim, 1)
            pool = torch.zeros(batch, max_len // ratio, row, dtype=torch.uint8, device=device)
        return cls(
            ratio=ratio,
            pending_kv=torch.zeros(batch, ratio, width, **f32),
            pending_score=torch.full((batch, ratio, width), float("-inf"), **f32),
            pool=pool,
            prev_kv=torch.zeros(batch, ratio, head_dim, **f32) if overlap else None,
            prev_score=torch.full((batch, ratio, head_dim), float("-inf"), **f32) if overlap else None,
            layout=layout, head_dim=head_dim, rope_dim=rope_dim, dtype=dtype,
        )

    def write(self, first: int, entries: torch.Tensor) -> None:
        """Store entries [B, n, d] (already rounded by the numerics) at pool rows first.. ."""
        n = entries.shape[1]
        if self.layout == FP8_KV:
            self.pool[:, first:first + n] = encode_kv_rows(entries, self.rope_dim)
        elif self.layout == FP4_INDEX:
            self.pool[:, first:first + n] = encode_index_rows(entries)
        else:
            self.pool[:, first:first + n] = entries.to(self.pool.dtype)

    def entries(self, stop: int | None = None) -> torch.Tensor:
        """Pool rows [:stop] decoded to the activation dtype: a copy, for tests and tools (the attention
        reads the pool in place)."""
        rows = self.pool[:, :stop]
        if self.layout == FP8_KV:
            return decode_kv_rows(rows, self.head_dim, self.rope_dim, self.dtype)
        if self.layout == FP4_INDEX:
            return decode_index_rows(rows, self.head_dim, self.dtype)
        return rows

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
    journal: CacheJournal | None = None  # set while a forward is recorded

    @classmethod
    def allocate(cls, args: ModelArgs, layer_id: int, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, layout: CacheLayout = CacheLayout()) -> LayerCache:
        ratio = args.layer_ratio(layer_id)
        window = torch.zeros(batch, args.window_size, args.head_dim, dtype=dtype, device=device)
        if ratio == SWA:
            return cls(window)
        compressor = CompressorState.allocate(ratio, args.head_dim, batch, max_len, dtype, device, layout.main,
                                              args.rope_head_dim)
        indexer = (CompressorState.allocate(ratio, args.index_head_dim, batch, max_len, dtype, device, layout.index)
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
    #: the pools' filled rows too (a self-contained snapshot, `ModelCache.snapshot(pools=True)`); None: shared
    pools: list[torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors + (self.pools or []))


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
    layout: CacheLayout = CacheLayout()

    @classmethod
    def allocate(cls, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", with_mtp: bool = False,
                 layout: CacheLayout = CacheLayout()) -> ModelCache:
        device = torch.device(device)
        layers = [LayerCache.allocate(args, i, batch, max_len, dtype, device, layout) for i in range(args.n_layers)]
        mtp = ([LayerCache.allocate(args, args.n_layers + i, batch, max_len, dtype, device, layout)
                for i in range(args.n_mtp_layers)] if with_mtp else [])
        return cls(args, batch, max_len, layers, mtp, layout=layout)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers + self.mtp for t in layer.tensors())

    def _running_state(self) -> list[torch.Tensor]:
        return [t for layer in self.layers + self.mtp for t in layer.running_state()]

    def _filled_pools(self, pos: int, mtp_pos: int) -> list[torch.Tensor]:
        """Views of every pool's rows written by the first `pos` tokens (`mtp_pos` for the MTP layers)."""
        views = []
        for layers, upto in ((self.layers, pos), (self.mtp, mtp_pos)):
            for layer in layers:
                views += [comp.pool[:, :upto // comp.ratio] for comp in (layer.compressor, layer.indexer)
                          if comp is not None]
        return views

    def snapshot(self, pools: bool = False) -> CacheSnapshot:
        """Copy what later tokens overwrite, so decoding can resume from `pos` later. `pools`: copy the pools'
        filled rows as well, so the snapshot stays valid whatever the cache holds later (a prompt cache of
        several conversations); otherwise it shares them with the live cache."""
        filled = [t.clone() for t in self._filled_pools(self.pos, self.mtp_pos)] if pools else None
        return CacheSnapshot(self.pos, self.mtp_pos, [t.clone() for t in self._running_state()], filled)

    def restore(self, snap: CacheSnapshot) -> None:
        """Go back to a snapshot taken on this cache. Shared snapshots taken after it (at a larger position,
        in the abandoned timeline) become invalid: later tokens rewrite their pool entries."""
        for live, saved in zip(self._running_state(), snap.tensors, strict=True):
            live.copy_(saved)
        if snap.pools is not None:
            for live, saved in zip(self._filled_pools(snap.pos, snap.mtp_pos), snap.pools, strict=True):
                live.copy_(saved)
        self.pos, self.mtp_pos = snap.pos, snap.mtp_pos

    def snapshot_mtp(self) -> CacheSnapshot:
        """Copy the MTP layers' state alone (chained drafts write it speculatively); `pos` is not touched."""
        return CacheSnapshot(self.pos, self.mtp_pos, [t.clone() for layer in self.mtp for t in layer.running_state()])

    def restore_mtp(self, snap: CacheSnapshot) -> None:
        """Undo the MTP layers' writes since `snapshot_mtp`."""
        live = [t for layer in self.mtp for t in layer.running_state()]
        for tensor, saved in zip(live, snap.tensors, strict=True):
            tensor.copy_(saved)
        self.mtp_pos = snap.mtp_pos

    @contextmanager
    def recording(self) -> Iterator[CacheJournal]:
        """Record the trunk layers' cache writes of the forward run inside the block (one forward), for
        `keep_prefix`."""
        journal = CacheJournal(self.pos)
        owners = [*self.layers, *(c for layer in self.layers for c in (layer.compressor, layer.indexer)
                                  if c is not None)]
        for owner in owners:
            owner.journal = journal
        try:
            yield journal
        finally:
            for owner in owners:
                owner.journal = None
            journal.tokens = self.pos - journal.start

    def keep_prefix(self, before: CacheSnapshot, journal: CacheJournal, keep: int) -> None:
        """The state after only the first `keep` tokens of a recorded forward: `before` (a snapshot taken
        right before it), then the forward's own writes for those tokens again, without running the model.
        Pool rows the dropped tokens wrote lie past the new position, where nothing reads them before they
        are written again."""
        if before.pos != journal.start or not 0 <= keep <= journal.tokens:
            raise ValueError(f"cannot keep {keep} of {journal.tokens} tokens recorded at position {journal.start} "
                             f"from a snapshot at {before.pos}")
        self.restore(before)
        journal.replay(keep)
        self.pos = before.pos + keep

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

    def fill_synthetic(self, depth: int, seed: int = 0) -> None:
        """Make the cache look as if `depth` tokens had been processed, with random entries instead of a
        prefill: every window ring and the first depth // ratio entries of every pool get random rows,
        rounded as the model rounds its own (FP8 KV, FP4 keys). One decode step after it does exactly
        the work a real context of `depth` tokens causes, so deep decode speed takes seconds to measure
        (`dsv4 bench --fill synthetic`). The text such a cache stands for is noise: for timing only."""
        if not 0 <= depth <= self.max_len:
            raise ValueError(f"depth {depth} is outside the cache's 0..{self.max_len} positions")
        self.reset()
        g = torch.Generator(device="cpu").manual_seed(seed)
        rope = self.args.rope_head_dim
        for layer in self.layers + self.mtp:
            rows = torch.randn(layer.window.shape, generator=g)
            layer.window.copy_(ref.kv_fp8_quant(rows.to(layer.window.dtype), rope))
            for state in (layer.compressor, layer.indexer):
                if state is None:
                    continue
                n = depth // state.ratio
                for first in range(0, n, 4096):  # in blocks: no full-size temporaries
                    count = min(4096, n - first)
                    rows = torch.randn(self.batch, count, state.head_dim, generator=g).to(state.dtype)
                    if state is layer.indexer:
                        rows = ref.indexer_fp4_quant(rows)
                    else:
                        rows = ref.kv_fp8_quant(rows, rope)
                    state.write(first, rows.to(state.pool.device))
        self.pos = self.mtp_pos = depth

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype_bytes: int = 2, layout: CacheLayout = CacheLayout()) -> float:
        """Cache bytes that grow with context per token (compressed pools; spec §2.7), in `layout`."""
        total = 0.0
        for layer in range(args.n_layers):
            ratio = args.layer_ratio(layer)
            if ratio:
                total += layout.entry_bytes(layout.main, args.head_dim, args.rope_head_dim, dtype_bytes) / ratio
            if ratio == CSA:
                total += layout.entry_bytes(layout.index, args.index_head_dim, 0, dtype_bytes) / ratio
        return total
