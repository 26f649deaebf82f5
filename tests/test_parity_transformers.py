"""Logit parity with transformers' DeepseekV4ForCausalLM on the same weights.

transformers omits the official QAT simulations (FP8 activations and KV rows,
Hadamard + FP4 in the indexer), so our side runs with them switched off
(`Numerics.plain`); `test_model.py` and `test_formats.py` cover the switched-on path.

Tolerances: float32, max |diff| < 1e-4 on logits of std ~1 (observed ~5e-6).
bfloat16: routing decisions flip on near-ties in both implementations, so per-logit
maxima are not comparable; we require our mean |error| against the float32 result to
be within 1.5x of transformers' own bf16 error (observed ratio 0.8-1.2).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from dsv4cli.io.hf_export import transformers_config, transformers_tensors, write_transformers_checkpoint  # noqa: E402
from dsv4cli.model.layers import Numerics  # noqa: E402
from dsv4cli.model.presets import PRESETS  # noqa: E402
from tests.conftest import tiny_model, tiny_tensors  # noqa: E402

transformers.logging.set_verbosity_error()
PRESET_IDS = ["tiny", "tiny-mix"]  # different layer mixes, hc_mult 4 / 2, 2 / 1 hash layers
SEQ, PREFILL = 300, 137


def hf_model_fp32(preset: str) -> DeepseekV4ForCausalLM:
    args = PRESETS[preset]
    config = DeepseekV4Config(**transformers_config(args))
    config._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(config).float().eval()
    state = dict(transformers_tensors(args, tiny_tensors(preset).__getitem__, torch.float32))
    model.load_state_dict(state, strict=True)
    return model


def token_ids(preset: str) -> torch.Tensor:
    return torch.randint(0, PRESETS[preset].vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("preset", PRESET_IDS)
def test_prefill_logits_match_fp32(preset):
    ids = token_ids(preset)
    with torch.no_grad():
        ours = tiny_model(preset, Numerics.plain(torch.float32)).full_logits(ids)
        theirs = hf_model_fp32(preset)(ids).logits
    assert ours.std() > 0.5
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("preset", PRESET_IDS)
def test_decode_steps_match_fp32(preset):
    ids = token_ids(preset)
    hf = hf_model_fp32(preset)
    ours = tiny_model(preset, Numerics.plain(torch.float32))
    with torch.no_grad():
        hf_cache = DynamicCache(config=hf.config)
        theirs = [hf(ids[:, :PREFILL], cache=hf_cache, use_cache=True).logits[:, -1]]
        cache = ours.new_cache(1, SEQ)
        mine = [ours(ids[:, :PREFILL], cache)]
        for pos in range(PREFILL, PREFILL + 12):  # crosses CSA window borders; 128-window wraps
            theirs.append(hf(ids[:, pos:pos + 1], cache=hf_cache, use_cache=True).logits[:, -1])
            mine.append(ours(ids[:, pos:pos + 1], cache))
    assert (torch.stack(mine) - torch.stack(theirs)).abs().max().item() < 1e-4


@pytest.mark.parametrize("preset", PRESET_IDS)
def test_bf16_error_is_no_worse_than_transformers(preset, tmp_path):
    args = PRESETS[preset]
    export = write_transformers_checkpoint(args, tiny_tensors(preset).__getitem__, tmp_path / "hf",
                                           max_shard_bytes=2 << 20)
    ids = token_ids(preset)
    with torch.no_grad():
        exact = tiny_model(preset, Numerics.plain(torch.float32)).full_logits(ids)
        ours = tiny_model(preset, Numerics.plain(torch.bfloat16)).full_logits(ids)
        hf = DeepseekV4ForCausalLM.from_pretrained(export, dtype=torch.bfloat16, attn_implementation="eager")
        theirs = hf.eval()(ids).logits.float()
    our_err = (ours - exact).abs().mean().item()
    their_err = (theirs - exact).abs().mean().item()
    assert our_err < 1.5 * their_err + 1e-3
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() > 0.8


def test_export_loads_in_fp32_with_exact_logits(tmp_path):
    export = write_transformers_checkpoint(PRESETS["tiny"], tiny_tensors("tiny").__getitem__, tmp_path / "hf",
                                           dtype=torch.float32)
    ids = token_ids("tiny")[:, :64]
    with torch.no_grad():
        hf = DeepseekV4ForCausalLM.from_pretrained(export, dtype=torch.float32, attn_implementation="eager")
        theirs = hf.eval()(ids).logits
        ours = tiny_model("tiny", Numerics.plain(torch.float32)).full_logits(ids)
    assert (ours - theirs).abs().max().item() < 1e-4
