"""Long-context attention: the compact cache rows, the blocked indexer with its streaming top-k, and
attention that reads the window and the pool in place, against the plain computations they replace."""

from __future__ import annotations

import itertools

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.formats.kvcache import (
    decode_index_rows,
    decode_kv_rows,
    encode_index_rows,
    encode_kv_rows,
    index_row_bytes,
    kv_row_bytes,
)
from dsv4cli.formats.official import fake_quant_fp4
from dsv4cli.kernels import cpu, ref
from dsv4cli.model.cache import DENSE, FP4_INDEX, FP8_KV, CacheLayout, ModelCache
from dsv4cli.model.layers import Numerics
from dsv4cli.model.presets import PRESETS
from tests.conftest import tiny_model
from tests.native_builds import VARIANTS, native, variant_id, variant_kernels


@pytest.fixture(scope="module", params=VARIANTS, ids=variant_id)
def lib(request) -> cpu.NativeKernels:
    return variant_kernels(request.param)


def test_compact_row_sizes_are_the_serving_engines():
    flash = PRESETS["flash"]
    assert kv_row_bytes(flash.head_dim, flash.rope_head_dim) == 584
    assert index_row_bytes(flash.index_head_dim) == 68
    compact = CacheLayout(FP8_KV, FP4_INDEX)
    for name in ("flash", "pro"):
        args = PRESETS[name]
        n_csa = sum(args.layer_ratio(i) == 4 for i in range(args.n_layers))
        n_hca = sum(args.layer_ratio(i) == 128 for i in range(args.n_layers))
        want = n_csa * (584 + 68) / 4 + n_hca * 584 / 128
        assert ModelCache.bytes_per_token(args, 2, compact) == pytest.approx(want)
        assert ModelCache.bytes_per_token(args, 2) == pytest.approx(n_csa * (1024 + 256) / 4 + n_hca * 1024 / 128)


@pytest.mark.parametrize("magnitude", [1e-7, 1e-3, 1.0, 300.0])
def test_compact_rows_decode_to_exactly_the_fake_quant_values(magnitude):
    g = torch.Generator().manual_seed(int(magnitude * 1e7) % 1000)
    x = (torch.randn(5, 9, 512, generator=g) * magnitude * torch.rand(5, 9, 1, generator=g)).bfloat16()
    x[0, 0] = 0
    x[1, 2, :64] = 0  # an all-zero scale block
    rounded = ref.kv_fp8_quant(x, 64)
    assert torch.equal(decode_kv_rows(encode_kv_rows(rounded, 64), 512, 64, torch.bfloat16), rounded)
    assert torch.equal(decode_kv_rows(encode_kv_rows(x, 64), 512, 64, torch.bfloat16), rounded)
    keys = (torch.randn(5, 9, 128, generator=g) * magnitude).bfloat16()
    keys[2, 3] = 0
    rounded = ref.indexer_fp4_quant(keys)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(decode_index_rows(encode_index_rows(rounded), 128, dtype), rounded.to(dtype))
    assert torch.equal(decode_index_rows(encode_index_rows(keys.float()), 128, torch.float32),
                       fake_quant_fp4(keys.float(), 32))


def full_sort_topk(q, weights, keys, visible, topk):
    """The indexer's selection as one [S, N] score matrix and one stable sort (the computation
    `ref.indexer_topk` replaces)."""
    n = keys.shape[1]
    scores = (torch.relu(torch.einsum("bshd,btd->bsht", q.float(), keys.float())) * weights[..., None]).sum(2)
    hidden = torch.arange(n)[None, :] >= visible[:, None]
    scores = scores.masked_fill(hidden, float("-inf"))
    picked = scores.sort(dim=-1, descending=True, stable=True).indices[..., :min(topk, n)]
    return torch.where(picked < visible[:, None], picked, -1)


def indexer_case(b, s, n, h=4, d=32, seed=0, integer=True):
    """Integer-valued q and keys make scores exact, so many ties occur (and zero keys tie at 0)."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        q = torch.randint(-2, 3, (b, s, h, d), generator=g).float()
        keys = torch.randint(-1, 2, (b, n, d), generator=g).float()
        weights = torch.randint(0, 3, (b, s, h), generator=g).float()
    else:
        q, keys, weights = (torch.randn(b, s, h, d, generator=g), torch.randn(b, n, d, generator=g),
                            torch.rand(b, s, h, generator=g))
    keys[:, ::5] = 0
    visible = torch.randint(0, n + 1, (s,), generator=g)
    visible[0] = 0
    return q, weights, keys, visible


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize(("b", "s", "n", "topk"), [(1, 1, 50, 8), (2, 7, 33, 5), (1, 5, 10, 16), (1, 3, 0, 4)])
def test_blocked_indexer_equals_one_full_sort(b, s, n, topk, integer):
    q, weights, keys, visible = indexer_case(b, s, n, integer=integer)
    want = full_sort_topk(q, weights, keys, visible, topk)
    for block, chunk in [(n or 1, 1 << 26), (7, 1 << 26), (3, 64), (1, 1)]:
        got = ref.indexer_topk(q, weights, keys, visible, topk, block_entries=block, max_chunk_bytes=chunk)
        assert torch.equal(got, want), (block, chunk)


def test_indexer_reads_compact_keys():
    q, weights, keys, visible = indexer_case(1, 4, 40, d=64, integer=False)
    packed = encode_index_rows(keys)
    decoded = decode_index_rows(packed, 64, torch.float32)
    assert torch.equal(ref.indexer_topk(q, weights, packed, visible, 6),
                       full_sort_topk(q, weights, decoded, visible, 6))


def attn_case(b, s, h, d, n_local, w, n_pool, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).bfloat16()
    local = torch.randn(b, n_local, d, generator=g).bfloat16()
    local_idx = torch.stack([torch.randperm(n_local, generator=g)[:w] for _ in range(s)])[None]  # no repeats
    local_idx[..., ::4] = -1
    pool = ref.kv_fp8_quant(torch.randn(b, n_pool, d, generator=g).bfloat16(), 64)
    pool_idx = torch.stack([torch.stack([torch.randperm(n_pool, generator=g)[:k] for _ in range(s)])
                            for _ in range(b)])
    pool_idx[..., ::3] = -1
    sink = torch.randn(h, generator=g)
    return q, local, local_idx, pool, pool_idx, sink


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize(("b", "s", "n_pool", "k"), [(1, 1, 40, 12), (2, 5, 9, 9), (1, 3, 200, 16)])
def test_cached_attn_equals_sparse_attn_over_the_joined_rows(b, s, n_pool, k, compact):
    q, local, local_idx, pool, pool_idx, sink = attn_case(b, s, 4, 128, 10, 6, n_pool, k)
    joined = torch.cat([local, pool], dim=1)
    index = torch.cat([local_idx.expand(b, -1, -1), torch.where(pool_idx >= 0, pool_idx + 10, -1)], dim=-1)
    want = ref.sparse_attn(q, joined, sink, index, 0.1)
    stored = encode_kv_rows(pool, 64) if compact else pool
    got = ref.cached_attn(q, local, local_idx, stored, pool_idx, sink, 0.1, 64)
    assert got.dtype == q.dtype
    assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()
    small_chunks = ref.cached_attn(q, local, local_idx, stored, pool_idx, sink, 0.1, 64, max_chunk_bytes=1)
    assert torch.equal(small_chunks, got)
    no_pool = ref.cached_attn(q, local, local_idx, None, None, sink, 0.1, 64)
    assert torch.equal(no_pool, ref.sparse_attn(q, local, sink, local_idx.expand(b, -1, -1), 0.1))


def test_official_numerics_store_compact_pools_and_plain_ones_do_not():
    args = PRESETS["tiny"]
    layout = tiny_model("tiny", Numerics()).cache_layout
    assert (layout.main, layout.index) == (FP8_KV, FP4_INDEX)
    fp32 = tiny_model("tiny", Numerics(act_dtype=torch.float32)).cache_layout
    assert (fp32.main, fp32.index) == (DENSE, FP4_INDEX)  # RoPE dims would lose bits in bf16
    plain = tiny_model("tiny", Numerics.plain(torch.bfloat16)).cache_layout
    assert (plain.main, plain.index) == (DENSE, DENSE)
    cache = ModelCache.allocate(args, 1, 1024, torch.bfloat16, layout=layout)
    empty = ModelCache.allocate(args, 1, 0, torch.bfloat16, layout=layout)
    assert cache.nbytes - empty.nbytes == pytest.approx(ModelCache.bytes_per_token(args, 2, layout) * 1024)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mix"])
def test_compact_cache_leaves_every_logit_unchanged(preset):
    """Prefill in chunks and single decode steps, once with compact pools and once with bf16 pools: bit-identical."""
    model = tiny_model(preset, Numerics())
    args = PRESETS[preset]
    ids = torch.randint(0, args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(3))
    outputs = []
    for layout in (model.cache_layout, CacheLayout()):
        cache = ModelCache.allocate(args, 1, 300, torch.bfloat16, layout=layout)
        with torch.no_grad():
            bounds = [0, 131, 132, 133, 200, 255, 256, 257, 299, 300]  # single tokens across window borders
            parts = [model(ids[:, a:b], cache, last_only=False) for a, b in itertools.pairwise(bounds)]
        outputs.append(torch.cat(parts, dim=1))
    assert model.cache_layout != CacheLayout()
    assert torch.equal(outputs[0], outputs[1])


# ------------------------------------------------------------------ native kernels against their twins


def native_topk(lib, q, weights, keys, visible, topk):
    top = min(topk, keys.shape[1])
    return lib.indexer_topk(q.float().contiguous(), weights.float().contiguous(), keys, visible, top, 2)


@native
@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize(("b", "s", "n", "topk", "h", "d"),
                         [(1, 1, 50, 8, 4, 32), (2, 7, 33, 5, 5, 32), (1, 5, 10, 16, 3, 64), (1, 3, 1000, 64, 8, 128),
                          (1, 40, 70, 6, 1, 32)])
def test_native_indexer_equals_its_twin(lib, b, s, n, topk, h, d, integer):
    """Same ids in the same order, ties (integer cases: many) to the earlier entry, -1 past the visible."""
    q, weights, keys, visible = indexer_case(b, s, n, h=h, d=d, integer=integer)
    want = ref.indexer_topk(q, weights, keys, visible, topk)
    assert torch.equal(native_topk(lib, q, weights, keys, visible, topk), want)
    assert torch.equal(native_topk(lib, q, weights, keys.bfloat16(), visible, topk),
                       ref.indexer_topk(q, weights, keys.bfloat16(), visible, topk))
    packed = encode_index_rows(keys)
    assert torch.equal(native_topk(lib, q, weights, packed, visible, topk),
                       ref.indexer_topk(q, weights, packed, visible, topk))


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pool_kind", ["none", "dense", "compact"])
@pytest.mark.parametrize(("b", "s", "h", "n_pool", "k"), [(1, 1, 4, 40, 12), (2, 5, 9, 9, 9), (1, 3, 16, 300, 70)])
def test_native_cached_attn_equals_its_twin(lib, b, s, h, n_pool, k, pool_kind, dtype):
    q, local, local_idx, pool, pool_idx, sink = attn_case(b, s, h, 128, 10, 6, n_pool, k)
    q, local = q.to(dtype), local.to(dtype)
    if pool_kind == "none":
        pool = pool_idx = None
    elif pool_kind == "compact":
        pool = encode_kv_rows(pool, 64)
    else:
        pool = pool.to(dtype)
    want = ref.cached_attn(q, local, local_idx, pool, pool_idx, sink, 0.1, 64)
    got = lib.cached_attn(q.contiguous(), local, local_idx, pool, pool_idx, sink, 0.1, 64, 2)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the output
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


@native
def test_native_cached_attn_rows_nobody_lists_give_zero():
    q, local, local_idx, pool, pool_idx, sink = attn_case(1, 3, 4, 128, 10, 6, 20, 5)
    local_idx[..., :] = -1
    pool_idx[..., :] = -1
    assert torch.equal(cpu.cached_attn(q, local, local_idx, pool, pool_idx, sink, 0.1, 64), torch.zeros_like(q))


@native
def test_native_ops_are_installed_and_chunk_long_query_runs(monkeypatch):
    kernels.select("cpu")
    assert kernels.active()["indexer_topk"] == "dsv4cli.kernels.cpu.indexer_topk"
    assert kernels.active()["cached_attn"] == "dsv4cli.kernels.cpu.cached_attn"
    monkeypatch.setattr(cpu, "INDEXER_SCORE_BYTES", 4 * 60 * 3)  # three queries per native call
    q, weights, keys, visible = indexer_case(1, 10, 60, integer=True)
    assert torch.equal(kernels.indexer_topk(q, weights, keys, visible, 7),
                       ref.indexer_topk(q, weights, keys, visible, 7))
    # inputs the kernels do not take go to the twin
    assert torch.equal(cpu.indexer_topk(q.double(), weights, keys, visible, 7),
                       ref.indexer_topk(q.double(), weights, keys, visible, 7))


@native
def test_model_on_native_attention_kernels_equals_the_reference():
    """The whole tiny model on the native attention ops, prefill then decode: float32 without QAT is
    strict end to end. With the official numerics (compact pools) end-to-end logits are chaotic on random
    weights (a 1e-7 change crosses an FP8 rounding point downstream), so every call the model makes is
    checked against the twin on the very same inputs instead."""
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (1, 200), generator=torch.Generator().manual_seed(5))

    def run(model):
        cache = model.new_cache(1, 200)
        with torch.no_grad():
            return torch.cat([model(ids[:, :150], cache, last_only=False)]
                             + [model(ids[:, p:p + 1], cache, last_only=False) for p in range(150, 160)], 1)

    plain = tiny_model("tiny", Numerics.plain(torch.float32))
    want = run(plain)
    kernels.use("indexer_topk", cpu.indexer_topk)
    kernels.use("cached_attn", cpu.cached_attn)
    assert (run(plain) - want).abs().max() < 1e-5 * want.abs().max()

    errors, picks = [], []

    def checked_attn(*args):
        got, expected = cpu.cached_attn(*args), ref.cached_attn(*args)
        errors.append(((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item())
        return got

    def checked_topk(*args):
        got = cpu.indexer_topk(*args)
        picks.append(torch.equal(got, ref.indexer_topk(*args)))
        return got

    kernels.use("cached_attn", checked_attn)
    kernels.use("indexer_topk", checked_topk)
    official = tiny_model("tiny", Numerics())
    assert official.cache_layout.main == FP8_KV
    run(official)
    assert len(errors) == 11 * PRESETS["tiny"].n_layers and max(errors) < 8e-3
    assert len(picks) > 0 and all(picks)


def test_a_million_token_context_is_allocated_compact_and_passes_the_think_max_gate():
    """--ctx 1,048,576 on the tiny model: the memory check measures the compact cache, the allocation is
    that size (half the bf16 pools), and think-max does not warn."""
    from dsv4cli.chat.session import ChatSession
    from dsv4cli.engine.engine import Engine, cache_bytes

    model = tiny_model("tiny", Numerics())
    ctx = 1_048_576
    engine = Engine(model, max_context=ctx)
    assert engine.cache.nbytes == cache_bytes(model, ctx)
    args = PRESETS["tiny"]
    growth = engine.cache.nbytes - ModelCache.allocate(args, 1, 0, torch.bfloat16, layout=model.cache_layout,
                                                       device="meta", with_mtp=bool(model.mtp)).nbytes
    per_token = ModelCache.bytes_per_token(args, 2, model.cache_layout)  # MTP layers are sliding-only: no pools
    assert growth == pytest.approx(per_token * ctx, rel=1e-6)
    assert per_token == 2 * (200 + 34) / 4 + 200 / 128  # tiny: 200 B rows (64 FP8 + 64 bf16 dims), 34 B keys
    session = ChatSession(engine, tokenizer=None)
    assert session.set_mode("think-max") is None
    assert ChatSession(Engine(model, max_context=4096), tokenizer=None).set_mode("think-max") is not None


def test_a_context_beyond_max_position_embeddings_is_refused():
    from dsv4cli.cli.options import FLAG_NAMES
    from dsv4cli.engine.engine import Engine
    from dsv4cli.errors import UsageError

    model = tiny_model("tiny", Numerics())
    model.args = model.args.replace(max_position_embeddings=4096)
    Engine(model, max_context=4096)
    with pytest.raises(UsageError) as err:
        Engine(model, max_context=4097)
    assert err.value.one_line(FLAG_NAMES) == ("a context of 4,097 tokens exceeds the model's max_position_embeddings "
                                              "(4,096) (lower --ctx to 4,096 or less)")
