"""The model on tiny configs: incremental decoding equals a full forward, cache structure, QAT, MTP, routing."""

from __future__ import annotations

import pytest
import torch

from dsv4cli.formats import fake_quant_fp4
from dsv4cli.kernels import ref
from dsv4cli.loader import load_model
from dsv4cli.model.args import CSA, HCA
from dsv4cli.model.layers import Numerics
from dsv4cli.presets import PRESETS
from tests.conftest import tiny_model

PLAIN = Numerics.plain(torch.float32)
OFFICIAL = Numerics()  # bf16 activations with every QAT simulation on
SEQ = 300  # > 128 so HCA emits entries; > 4 * index_topk so the indexer selects


def tokens(preset: str, batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PRESETS[preset].vocab_size, (batch, seq), generator=g)


def run_in_chunks(model, ids: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Logits at every position, feeding ids in the chunks given by `bounds`, then one by one."""
    cache = model.new_cache(ids.shape[0], max_len=ids.shape[1])
    parts, start = [], 0
    for end in [*bounds, *range(bounds[-1] + 1, ids.shape[1] + 1)]:
        parts.append(model(ids[:, start:end], cache, last_only=False))
        start = end
    assert cache.pos == ids.shape[1]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mix"])
@pytest.mark.parametrize("numerics,tol", [(PLAIN, 2e-5), (OFFICIAL, 2e-3)], ids=["fp32", "bf16-qat"])
def test_chunked_prefill_then_decode_equals_full_forward(preset, numerics, tol):
    model = tiny_model(preset, numerics)
    ids = tokens(preset)
    with torch.no_grad():
        full = model.full_logits(ids)
        # chunk borders inside windows of 4 and 128, a single-token chunk, then token-by-token decode
        chunked = run_in_chunks(model, ids, [5, 130, 131, 283])
    assert full.shape == (2, SEQ, PRESETS[preset].vocab_size)
    assert (chunked - full).abs().max().item() < tol * full.abs().max().item()


def test_prefill_then_decode_from_position_zero_is_token_by_token():
    model = tiny_model("tiny", PLAIN)
    ids = tokens("tiny", batch=1, seq=140)
    with torch.no_grad():
        full = model.full_logits(ids)
        stepwise = run_in_chunks(model, ids, [1])
    assert torch.allclose(stepwise, full, atol=2e-5, rtol=0)


def test_last_only_returns_the_final_position():
    model = tiny_model("tiny", PLAIN)
    ids = tokens("tiny", batch=2, seq=20)
    with torch.no_grad():
        last = model(ids, model.new_cache(2, 20))
        full = model.full_logits(ids)
    assert last.shape == (2, PRESETS["tiny"].vocab_size)
    assert torch.allclose(last, full[:, -1], atol=1e-6)


def test_batch_rows_are_independent():
    model = tiny_model("tiny-mix", PLAIN)
    ids = tokens("tiny-mix", batch=3, seq=150)
    with torch.no_grad():
        together = model.full_logits(ids)
        alone = model.full_logits(ids[1:2])
    assert torch.allclose(together[1:2], alone, atol=2e-5)


def test_cache_structure_follows_the_reference_layout():
    args = PRESETS["tiny"]
    model = tiny_model("tiny", PLAIN)
    ids = tokens("tiny", batch=1, seq=SEQ)
    cache = model.new_cache(1, 512)
    with torch.no_grad():
        model(ids[:, :261], cache)
        assert cache.pos == 261
        csa, hca = cache.layers[1], cache.layers[2]
        assert args.layer_ratio(1) == CSA and args.layer_ratio(2) == HCA
        assert csa.compressor.pool.shape == (1, 512 // 4, args.head_dim)
        assert csa.indexer.pool.shape == (1, 512 // 4, args.index_head_dim)
        assert hca.compressor.pool.shape == (1, 512 // 128, args.head_dim)
        assert cache.layers[0].window.shape == (1, args.window_size, args.head_dim)
        # 261 tokens: 65 CSA entries and 2 HCA entries emitted, later slots untouched
        assert csa.compressor.pool[0, 64].abs().sum() > 0 and csa.compressor.pool[0, 65].abs().sum() == 0
        assert hca.compressor.pool[0, 1].abs().sum() > 0 and hca.compressor.pool[0, 2].abs().sum() == 0
        ring_before = cache.layers[0].window.clone()
        model(ids[:, 261:262], cache)  # position 261 -> ring slot 261 % 8 = 5; 262 % 4 != 0: no entry
        changed = (cache.layers[0].window != ring_before).any(-1)[0]
        assert changed.nonzero().flatten().tolist() == [261 % args.window_size]
        assert csa.compressor.pool[0, 65].abs().sum() == 0
        model(ids[:, 262:264], cache)  # position 263 closes window 65
        assert csa.compressor.pool[0, 65].abs().sum() > 0


def test_qat_simulations_are_applied_to_the_cached_rows():
    args = PRESETS["tiny"]
    model = tiny_model("tiny", OFFICIAL)
    cache = model.new_cache(1, SEQ)
    with torch.no_grad():
        model(tokens("tiny", batch=1), cache)
    rd = args.rope_head_dim
    window = cache.layers[0].window
    assert torch.equal(ref.kv_fp8_quant(window, rd), window)  # FP8-representable non-RoPE dims
    entries = cache.layers[1].compressor.pool[:, : SEQ // 4]
    assert torch.equal(ref.kv_fp8_quant(entries, rd), entries)
    keys = cache.layers[1].indexer.pool[:, : SEQ // 4]
    assert torch.equal(fake_quant_fp4(keys), keys)  # FP4-representable after the Hadamard rotation
    plain_cache = tiny_model("tiny", Numerics.plain(torch.bfloat16)).new_cache(1, SEQ)
    with torch.no_grad():
        tiny_model("tiny", Numerics.plain(torch.bfloat16))(tokens("tiny", batch=1), plain_cache)
    assert not torch.equal(plain_cache.layers[0].window, window)


def test_qat_changes_logits_a_little_not_a_lot():
    ids = tokens("tiny", batch=1, seq=64)
    with torch.no_grad():
        qat = tiny_model("tiny", OFFICIAL).full_logits(ids)
        plain = tiny_model("tiny", Numerics.plain(torch.bfloat16)).full_logits(ids)
    diff = (qat - plain).abs().mean() / plain.abs().mean()
    assert 1e-4 < diff.item() < 0.3


def test_mtp_layer_predicts_from_trunk_streams_and_decodes_incrementally():
    model = tiny_model("tiny", PLAIN)
    ids = tokens("tiny", batch=1, seq=40)
    with torch.no_grad():
        cache = model.new_cache(1, 40)
        streams = model.streams(ids, cache)
        full = model.mtp_logits(streams[:, :-1], ids[:, 1:], cache)
        cache2 = model.new_cache(1, 40)
        streams2 = model.streams(ids, cache2)
        steps = torch.cat([model.mtp_logits(streams2[:, i:i + 1], ids[:, i + 1:i + 2], cache2)
                           for i in range(39)], 1)
    assert full.shape == (1, 39, PRESETS["tiny"].vocab_size)
    assert torch.allclose(steps, full, atol=2e-5)
    assert cache.mtp_pos == 39


def test_cache_overflow_is_an_error():
    model = tiny_model("tiny", PLAIN)
    with pytest.raises(ValueError, match="exceeds the cache size"):
        model(tokens("tiny", batch=1, seq=10), model.new_cache(1, 8))


def test_hash_layers_route_by_token_id_and_learned_layers_by_score_plus_bias():
    model = tiny_model("tiny", PLAIN)
    args = PRESETS["tiny"]
    hash_gate, learned_gate = model.layers[0].ffn.gate, model.layers[3].ffn.gate
    assert hash_gate.is_hash and not learned_gate.is_hash
    x = torch.randn(5, args.dim)
    ids = torch.tensor([3, 7, 3, 100, 511])
    weights, picked = hash_gate(x, ids)
    assert torch.equal(picked, hash_gate.tid2eid[ids])
    assert torch.allclose(weights.sum(-1), torch.full((5,), args.route_scale))
    scores = learned_gate.scores(x)
    weights, picked = learned_gate(x, ids)
    expected = (scores + learned_gate.bias).topk(args.n_activated_experts).indices
    assert torch.equal(picked.sort(-1).values, expected.sort(-1).values)
    chosen = scores.gather(1, picked)
    assert torch.allclose(weights, chosen / chosen.sum(-1, keepdim=True) * args.route_scale)


def test_loading_from_disk_equals_in_memory_and_is_zero_copy(tiny_checkpoint):
    model, checkpoint = load_model(tiny_checkpoint, PLAIN)
    with checkpoint:
        ids = tokens("tiny", batch=1, seq=30)
        with torch.no_grad():
            assert torch.equal(model.full_logits(ids), tiny_model("tiny", PLAIN).full_logits(ids))
        weight = model.layers[1].ffn.experts[3].w1.weight
        assert weight.data_ptr() == checkpoint.get("layers.1.ffn.experts.3.w1.weight").data_ptr()
        assert len(model.mtp) == 1


def test_native_cpu_kernels_give_the_reference_logits():
    from dsv4cli import kernels
    from dsv4cli.kernels import cpu

    if not cpu.available():
        pytest.skip("no C++ compiler for the native kernels")
    ids = tokens("tiny", batch=1, seq=40)
    try:
        kernels.reset()
        with torch.no_grad():
            reference = tiny_model("tiny", OFFICIAL).full_logits(ids)
        kernels.select("cpu")
        assert "cpu" in kernels.active()["moe_experts"]
        with torch.no_grad():
            native = tiny_model("tiny", OFFICIAL).full_logits(ids)
    finally:
        kernels.reset()
    assert (native - reference).abs().max().item() < 1e-3 * reference.abs().max().item()
