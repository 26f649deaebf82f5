"""ModelArgs from the real configs, the checkpoint schema against the real tensor lists, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4cli.errors import ConfigError
from dsv4cli.io.schema import checkpoint_specs, logical_params
from dsv4cli.model.args import ModelArgs, yarn_correction_range
from dsv4cli.model.layers import rope_inv_freq
from dsv4cli.model.presets import PRESETS

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def load(name: str, file: str = "config.json") -> ModelArgs:
    return ModelArgs.from_file(REFERENCE / "configs" / name / file)


def real_config(name: str) -> dict:
    return json.loads((REFERENCE / "configs" / name / "config.json").read_text())


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_hf_and_inference_configs_agree(name):
    assert load(name) == load(name, "inference_config.json")


def test_flash_and_pro_values():
    flash, pro = load("flash"), load("pro")
    assert (flash.dim, flash.n_layers, flash.n_routed_experts, flash.index_topk) == (4096, 43, 256, 512)
    assert (pro.dim, pro.n_layers, pro.n_routed_experts, pro.index_topk) == (7168, 61, 384, 1024)
    assert flash.expert_dtype == pro.expert_dtype == "fp4"
    assert flash == PRESETS["flash"] and pro == PRESETS["pro"]
    # layer-type schedule (spec §1.2)
    assert flash.compress_ratios[:4] == (0, 0, 4, 128) and flash.compress_ratios[-1] == 0
    assert pro.compress_ratios[:3] == (128, 128, 4)


@pytest.mark.parametrize(
    "name,total,trunk,tensors,nbytes",
    [
        ("flash", 290.94e9, 284.3e9, 69187, 159_609_485_896),
        ("pro", 1598.8e9, 1573.0e9, 145116, 864_704_792_696),
    ],
)
def test_parameter_totals_match_the_release(name, total, trunk, tensors, nbytes):
    args = load(name)
    full = checkpoint_specs(args)
    assert len(full) == tensors
    assert sum(s.nbytes for s in full.values()) == nbytes
    assert logical_params(full) == pytest.approx(total, rel=1e-3)
    assert logical_params(checkpoint_specs(args, include_mtp=False)) == pytest.approx(trunk, rel=1e-3)


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_schema_equals_real_tensor_list(name):
    expected = {}
    for line in (REFERENCE / f"{name}_tensors.tsv").read_text().splitlines():
        tensor, dtype, shape = line.split("\t")
        expected[tensor] = (dtype, tuple(json.loads(shape)))
    mine = {k: (v.dtype, v.shape) for k, v in checkpoint_specs(load(name), experts=range(1)).items()}
    assert mine == expected


def test_yarn_correction_range_for_compressed_layers():
    assert yarn_correction_range(load("flash"), 160000) == (15, 25)
    inv = rope_inv_freq(load("flash"), compressed=True)
    plain = 1.0 / (160000 ** (2 * __import__("torch").arange(32).float() / 64))
    assert float(inv[0]) == pytest.approx(float(plain[0]))  # high frequencies untouched
    assert float(inv[31]) == pytest.approx(float(plain[31]) / 16)  # low frequencies scaled by 1/factor


def test_hf_config_round_trip():
    for args in PRESETS.values():
        assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_unknown_key_is_rejected():
    cfg = real_config("flash") | {"kv_lora_rank": 512}
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelArgs.from_hf_config(cfg)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"model_type": "deepseek_v3"}, "model_type"),
        ({"o_groups": 7}, "o_groups"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok=300"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "fmt"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_inconsistent_values_are_rejected(change, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelArgs.from_hf_config(real_config("flash") | change)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text('{"foo": 1}')
    with pytest.raises(ConfigError, match="neither"):
        ModelArgs.from_file(tmp_path)


def test_error_is_one_line_with_a_hint():
    with pytest.raises(ConfigError) as info:
        ModelArgs.from_hf_config(real_config("flash") | {"bogus": 1})
    line = info.value.one_line()
    assert "\n" not in line and "bogus" in line and "(" in line
