"""Bad config input: every malformed, out-of-range or unreadable config is a one-line ConfigError naming the key;
every valid one (the real configs, the presets, each dtype / expert_dtype / recipe combination) round-trips."""

from __future__ import annotations

import itertools
import json
from dataclasses import fields
from pathlib import Path

import pytest

from dsv4cli.demo.model import DEMO_ARGS
from dsv4cli.errors import ConfigError
from dsv4cli.model.args import FIELD_RULES, ModelArgs
from dsv4cli.model.presets import PRESETS
from dsv4cli.model.recipe import parse_recipe
from dsv4cli.quant.recipes import BUILTIN

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"
YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536}


def real_config(name: str = "flash", file: str = "config.json") -> dict:
    return json.loads((CONFIGS / name / file).read_text())


def error_of(call) -> ConfigError:
    """The ConfigError `call()` raises (nothing else), checked to print as one line with a hint."""
    with pytest.raises(ConfigError) as info:
        call()
    assert "\n" not in info.value.one_line() and info.value.hint
    return info.value


@pytest.mark.parametrize(
    "change,key",
    [
        ({"rope_scaling": "yarn"}, "rope_scaling"),
        ({"rope_scaling": {"type": "yarn"}}, "'factor'"),
        ({"rope_scaling": YARN | {"mscale": 1.0}}, "mscale"),
        ({"rope_scaling": YARN | {"factor": "16"}}, "rope_scaling.factor"),
        ({"quantization_config": [128, 128]}, "quantization_config"),
        ({"rope_theta": "10000"}, "rope_theta"),
        ({"compress_rope_theta": None}, "compress_rope_theta"),
        ({"num_hidden_layers": "43"}, "num_hidden_layers"),
        ({"hidden_size": 4096.5}, "hidden_size"),
        ({"n_routed_experts": None}, "n_routed_experts"),
        ({"num_attention_heads": True}, "num_attention_heads"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"compress_ratios": "0,0,4"}, "compress_ratios"),
        ({"compress_ratios": [0, 0, "4", *[4, 128] * 20, 0]}, "compress_ratios"),
        ({"compress_ratios": [0, 0, 4.0, *[4, 128] * 20, 0]}, "compress_ratios"),
        ({"scoring_func": 1}, "scoring_func"),
        ({"expert_dtype": ["fp4"]}, "expert_dtype"),
        ({"num_key_value_heads": True}, "num_key_value_heads"),
        ({"dsv4_quantization": [1]}, "dsv4_quantization"),
    ],
)
def test_malformed_values_name_the_key(change, key):
    assert key in error_of(lambda: ModelArgs.from_hf_config(real_config() | change)).message


@pytest.mark.parametrize(
    "change,key_value,allowed",
    [
        ({"hc_sinkhorn_iters": 10**9}, "hc_sinkhorn_iters=1000000000", "[1, 1000]"),
        ({"rms_norm_eps": -1}, "rms_norm_eps=-1", "(0, 0.1]"),
        ({"hc_eps": 0.5}, "hc_eps=0.5", "(0, 0.1]"),
        ({"rope_theta": 0}, "rope_theta=0", "(1, 1e12]"),
        ({"hidden_size": 0}, "hidden_size=0", "[1, 65536]"),
        ({"vocab_size": 10**9}, "vocab_size=1000000000", "[1, 16777216]"),
        ({"routed_scaling_factor": -1.5}, "routed_scaling_factor=-1.5", "(0, 1000]"),
        ({"swiglu_limit": -1}, "swiglu_limit=-1", "[0, 1e6]"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok=300", "[1, n_routed_experts=256]"),
        ({"num_hash_layers": 44}, "num_hash_layers=44", "[0, num_hidden_layers=43]"),
        ({"eos_token_id": 129280}, "eos_token_id=129280", "[0, vocab_size=129280)"),
        ({"bos_token_id": -1}, "bos_token_id=-1", "[0, vocab_size=129280)"),
        ({"qk_rope_head_dim": 1024}, "qk_rope_head_dim=1024", "[2, head_dim=512]"),
        ({"index_head_dim": 32}, "index_head_dim=32", "[qk_rope_head_dim=64, 65536]"),
        ({"sliding_window": 0}, "sliding_window=0", "[1, max_position_embeddings=1048576]"),
        ({"num_nextn_predict_layers": 100}, "num_nextn_predict_layers=100", "[0, 16]"),
        ({"rope_scaling": YARN | {"factor": 0.5}}, "rope_scaling.factor=0.5", "[1, 10000]"),
        ({"rope_scaling": YARN | {"beta_slow": 64}}, "rope_scaling.beta_slow=64", "(0, rope_scaling.beta_fast=32"),
        ({"expert_dtype": "fp16"}, 'expert_dtype="fp16"', '"fp4", "fp8", "bf16"'),
        ({"compress_ratios": [8] * 44}, "compress_ratios", "0, 4, 128, found [8]"),
        ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries",
         "num_hidden_layers + num_nextn_predict_layers = 44"),
        ({"compress_ratios": [0, 0, *[4, 128] * 20, 4, 4]}, "compress_ratios[43]=4", "sliding-only"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim=63", "even"),
        ({"index_head_dim": 96}, "index_head_dim=96", "power of two"),
        ({"o_groups": 7}, "num_attention_heads=64", "o_groups=7"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(change, key_value, allowed):
    message = error_of(lambda: ModelArgs.from_hf_config(real_config() | change)).message
    assert key_value in message and allowed in message


@pytest.mark.parametrize(
    "change,needle",
    [({"dim": "4096"}, "dim must be an integer"), ({"n_layers": None}, "n_layers must be an integer, got null"),
     ({"hc_sinkhorn_iters": 10**9}, "hc_sinkhorn_iters=1000000000"), ({"dtype": ["fp8"]}, "dtype")],
)
def test_inference_config_values_are_checked_by_their_names(change, needle):
    cfg = real_config(file="inference_config.json") | change
    assert needle in error_of(lambda: ModelArgs.from_inference_config(cfg)).message


@pytest.mark.parametrize(
    "kwargs,needle",
    [({"n_layers": "43"}, "n_layers must be an integer"), ({"hc_sinkhorn_iters": 10**9}, "hc_sinkhorn_iters="),
     ({"quantization": {"dense": "fp4"}}, "quantization must be"), ({"compress_ratios": (0, 4)}, "2 entries")],
)
def test_python_api_gets_the_same_checks(kwargs, needle):
    assert needle in error_of(lambda: ModelArgs(**kwargs)).message


def test_valid_configs_still_validate():
    assert set(FIELD_RULES) == {f.name for f in fields(ModelArgs)}
    for name in ("flash", "pro"):
        for file in ("config.json", "inference_config.json"):
            assert ModelArgs.from_file(CONFIGS / name / file) == PRESETS[name]
    for args in (*PRESETS.values(), DEMO_ARGS):
        args.validate()
    edge = PRESETS["tiny"].replace(hc_sinkhorn_iters=1000, swiglu_limit=0, n_mtp_layers=0,
                                   compress_ratios=(0, 4, 128, 4), bos_token_id=511, eos_token_id=511)
    assert ModelArgs.from_hf_config(edge.to_hf_config()) == edge


@pytest.mark.parametrize("dtype,expert_dtype,recipe",
                         list(itertools.product(("fp8", "bf16"), ("fp4", "fp8", "bf16"), (None, *BUILTIN))))
def test_every_format_combination_round_trips(dtype, expert_dtype, recipe):
    quantization = None if recipe is None else parse_recipe(BUILTIN[recipe], recipe)
    args = PRESETS["tiny"].replace(dtype=dtype, expert_dtype=expert_dtype, quantization=quantization)
    assert ModelArgs.from_hf_config(json.loads(json.dumps(args.to_hf_config()))) == args


def test_json_numbers_and_lists_are_stored_as_python_types():
    args = ModelArgs(rope_theta=10000, compress_ratios=[0, 0, *[4, 128] * 20, 4, 0])
    assert isinstance(args.rope_theta, float) and isinstance(args.compress_ratios, tuple)
    assert hash(args) == hash(ModelArgs())


def _deny(*_args, **_kwargs):
    raise PermissionError(13, "Permission denied")


def _unreadable(folder: Path, monkeypatch) -> None:
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(Path, "read_bytes", _deny)  # chmod does not stop root


@pytest.mark.parametrize(
    "setup,needle",
    [
        (_unreadable, "cannot read"),
        (lambda d, mp: mp.setattr(Path, "is_dir", _deny), "cannot access"),
        (lambda d, mp: (d / "config.json").mkdir(), "is a directory"),
        (lambda d, mp: (d / "config.json").write_bytes(b'{"vocab_size": "\xff"}'), "not valid UTF-8"),
        (lambda d, mp: (d / "config.json").write_text('{"vocab_size": 1,}'), "not valid JSON: Expecting"),
        (lambda d, mp: (d / "config.json").write_text("[" * 100_000), "not valid JSON"),
        (lambda d, mp: (d / "config.json").write_text("1" * 5000), "not valid JSON"),
    ],
)
def test_unreadable_config_files(tmp_path, monkeypatch, setup, needle):
    setup(tmp_path, monkeypatch)
    message = error_of(lambda: ModelArgs.from_file(tmp_path)).message
    assert needle in message
    assert "Permission denied" in message or not needle.startswith("cannot")


def test_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(real_config()).encode())
    assert ModelArgs.from_file(tmp_path) == PRESETS["flash"]
