"""`ModelArgs`: the DeepSeek-V4 hyper-parameters, read from either config format (spec §1).

Field names follow the official `inference/config.json` (`dim`, `n_layers`, ...);
`from_hf_config` maps the Hugging Face `config.json` names onto them through one
explicit table. Every field has a type and an allowed range (`FIELD_RULES`); a value
that breaks them, an unknown key or an unreadable file raises a one-line `ConfigError`
that names the key as the file spells it.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dsv4cli.errors import ConfigError
from dsv4cli.model.recipe import QUANT_KEY, Recipe, RecipeError, parse_recipe

SWA, CSA, HCA = 0, 4, 128
ATTENTION_KINDS = {SWA: "sliding", CSA: "csa", HCA: "hca"}

#: HF config.json key -> ModelArgs field (spec §1.3 name map).
HF_TO_ARGS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "num_hash_layers": "n_hash_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "swiglu_limit": "swiglu_limit",
    "q_lora_rank": "q_lora_rank",
    "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_head_dim",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "window_size",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "compress_ratios": "compress_ratios",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "num_nextn_predict_layers": "n_mtp_layers",
    "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "expert_dtype": "expert_dtype",
}
#: HF `rope_scaling` key -> ModelArgs field (YaRN of the compressed layers).
ROPE_SCALING_TO_ARGS = {
    "factor": "rope_factor",
    "original_max_position_embeddings": "original_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
}
#: `rope_scaling` keys without a default (beta_fast / beta_slow default to YaRN's 32 / 1, V4's values).
ROPE_SCALING_REQUIRED = ("factor", "original_max_position_embeddings")
#: HF keys whose value is fixed for V4: key -> accepted value.
HF_FIXED = {
    "num_key_value_heads": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "norm_topk_prob": True,
    "topk_method": "noaux_tc",
    "model_type": "deepseek_v4",
}
#: HF keys that carry no model maths (metadata, training-only settings).
HF_IGNORED = {
    "architectures", "attention_dropout", "initializer_range", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "_name_or_path", "auto_map", "pad_token_id",
    "router_aux_loss_coef", "output_router_logits", "router_jitter_noise",
}
#: inference/config.json keys handled specially (the rest map 1:1 onto fields).
INFERENCE_SPECIAL = {"dtype", "scale_fmt", "original_seq_len", "rope_factor", "beta_fast", "beta_slow"}
#: ModelArgs field -> how config.json spells it, so messages name the key the user has to edit.
HF_LABELS = ({v: k for k, v in HF_TO_ARGS.items()} | {v: f"rope_scaling.{k}" for k, v in ROPE_SCALING_TO_ARGS.items()}
             | {"quantization": QUANT_KEY})

#: Type and allowed values of every field: an interval whose ends are numbers or other fields ("(" / ")" = open
#: end), or a tuple of choices (for `compress_ratios`, of each entry). Relations no single range expresses are in
#: `_structure_problems`. Upper bounds are far above any real model, to stop nonsense before it costs time.
FIELD_RULES: dict[str, tuple[type, str | tuple[Any, ...] | None]] = {
    "vocab_size": (int, "[1, 16777216]"),
    "dim": (int, "[1, 65536]"),
    "moe_inter_dim": (int, "[1, 65536]"),
    "n_layers": (int, "[1, 1024]"),
    "n_hash_layers": (int, "[0, n_layers]"),
    "n_heads": (int, "[1, 1024]"),
    "n_routed_experts": (int, "[1, 65536]"),
    "n_shared_experts": (int, "[1, 1]"),
    "n_activated_experts": (int, "[1, n_routed_experts]"),
    "score_func": (str, ("sqrtsoftplus", "softmax", "sigmoid")),
    "route_scale": (float, "(0, 1000]"),
    "swiglu_limit": (float, "[0, 1e6]"),  # 0 = no clamp
    "q_lora_rank": (int, "[1, 65536]"),
    "head_dim": (int, "[1, 65536]"),
    "rope_head_dim": (int, "[2, head_dim]"),
    "o_groups": (int, "[1, n_heads]"),
    "o_lora_rank": (int, "[1, 65536]"),
    "window_size": (int, "[1, max_position_embeddings]"),
    "rope_theta": (float, "(1, 1e12]"),  # RoPE divides by log(theta)
    "compress_rope_theta": (float, "(1, 1e12]"),
    "rope_factor": (float, "[1, 10000]"),
    "original_seq_len": (int, "[1, max_position_embeddings]"),
    "beta_fast": (float, "(0, 10000]"),
    "beta_slow": (float, "(0, beta_fast]"),
    "index_n_heads": (int, "[1, 1024]"),
    "index_head_dim": (int, "[rope_head_dim, 65536]"),
    "index_topk": (int, "[1, 1048576]"),
    "hc_mult": (int, "[1, 64]"),
    "hc_sinkhorn_iters": (int, "[1, 1000]"),
    "hc_eps": (float, "(0, 0.1]"),
    "norm_eps": (float, "(0, 0.1]"),
    "n_mtp_layers": (int, "[0, 16]"),
    "max_position_embeddings": (int, "[1, 16777216]"),
    "bos_token_id": (int, "[0, vocab_size)"),
    "eos_token_id": (int, "[0, vocab_size)"),
    "dtype": (str, ("fp8", "bf16")),
    "expert_dtype": (str, ("fp4", "fp8", "bf16")),
    "compress_ratios": (tuple, (SWA, CSA, HCA)),
    "quantization": (Recipe, None),
}
_KIND_NAMES = {int: "an integer", float: "a finite number", str: "a string", tuple: "a list of integers",
               Recipe: "a quantization recipe or None"}
_INTERVAL = re.compile(r"([\[(])([^,]+), ([^,]+)([\])])")
_MAX_PROBLEMS = 3
#: Config files are a few KiB; refuse anything that could not be one before reading it all.
_MAX_CONFIG_BYTES = 16 << 20
_FIX_FILE = "re-download or fix the file"


@dataclass(frozen=True)
class ModelArgs:
    """DeepSeek-V4 hyper-parameters. Defaults are V4-Flash's."""

    vocab_size: int = 129280
    dim: int = 4096  # hidden size D
    moe_inter_dim: int = 2048  # expert intermediate size I
    n_layers: int = 43
    n_hash_layers: int = 3  # first layers route by the token-id table tid2eid
    n_heads: int = 64
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    q_lora_rank: int = 1024
    head_dim: int = 512  # single shared K=V head; last rope_head_dim dims carry RoPE
    rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    rope_theta: float = 10000.0  # sliding-only layers (no YaRN)
    compress_rope_theta: float = 160000.0  # compressed layers (with YaRN)
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    n_mtp_layers: int = 1
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    #: "fp8": FP8 block-scaled non-expert linears; "bf16": plain weights.
    dtype: str = "fp8"
    #: routed-expert format: "fp4" (packed e2m1), "fp8" (block-scaled) or "bf16".
    expert_dtype: str = "fp4"
    #: compress ratio per layer, then one per MTP layer: 0 sliding, 4 CSA, 128 HCA.
    compress_ratios: tuple[int, ...] = field(
        default=(0, 0, *([4, 128] * 20), 4, 0)
    )
    #: `dsv4 quantize` recipe (config.json key `dsv4_quantization`): per-linear formats that replace
    #: `dtype` / `expert_dtype` (which keep naming the source checkpoint's formats); None = official.
    quantization: Recipe | None = None

    def __post_init__(self):
        """Check every field, then store plain ints / floats and a tuple of ratios (so equality and hashing
        do not depend on whether a value came from JSON, a list or numpy)."""
        self.validate()
        for name, value in _coerced(self._values()).items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Reject values of the wrong type, outside their range (`FIELD_RULES`), or that cannot be combined."""
        _raise_problems(config_problems(self._values()), "ModelArgs")

    def _values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ----------------------------------------------------------- derived values
    @property
    def n_mtp(self) -> int:
        return self.n_mtp_layers

    def layer_ratio(self, layer_id: int) -> int:
        """Compress ratio of layer `layer_id` (MTP layers follow the trunk)."""
        return self.compress_ratios[layer_id]

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    def layer_prefix(self, layer_id: int) -> str:
        """Checkpoint name prefix of block `layer_id`: 'layers.3', or 'mtp.0' past the trunk."""
        return f"layers.{layer_id}" if layer_id < self.n_layers else f"mtp.{layer_id - self.n_layers}"

    def linear_format(self, layer_id: int, rel: str) -> str:
        """Stored format of quantizable linear `rel` of block `layer_id`: 'ffn.experts.7.w2' (a routed
        expert: `expert_dtype` or the recipe's) or a dense one such as 'attn.wq_a', 'ffn.shared_experts.w1',
        'e_proj' (`dtype` or the recipe's)."""
        expert = rel.startswith("ffn.experts.")
        base = self.expert_dtype if expert else self.dtype
        if self.quantization is None:
            return base
        name = f"{self.layer_prefix(layer_id)}.{rel}"
        layer = layer_id if layer_id < self.n_layers else None
        if expert:
            return self.quantization.expert_format(name, layer, rel.rsplit(".", 1)[1], base)
        return self.quantization.dense_format(name, layer, base)

    def expert_formats(self, layer_id: int, expert: int = 0) -> tuple[str, str, str]:
        """(w1, w2, w3) formats of a routed expert of block `layer_id`."""
        return tuple(self.linear_format(layer_id, f"ffn.experts.{expert}.{p}") for p in ("w1", "w2", "w3"))

    @property
    def hc_dim(self) -> int:
        """Width of the mHC mixing projection: (2 + n_hc) * n_hc."""
        return (2 + self.hc_mult) * self.hc_mult

    # -------------------------------------------------------------- factories
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from a Hugging Face `config.json` dict (spec §1.1, §1.2)."""
        kwargs = _hf_top_level(cfg)
        kwargs.update(_hf_rope_scaling(cfg.get("rope_scaling")))
        kwargs.update(_hf_dtypes(cfg.get("quantization_config"), kwargs))
        return _construct(cls, kwargs, "config.json", _hf_label)

    @classmethod
    def from_inference_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from the official `inference/config.json` (`ModelArgs` names, spec §1.3)."""
        names = {f.name for f in fields(cls)}
        names.discard("quantization")
        unknown = sorted(k for k in cfg if k not in names and k not in INFERENCE_SPECIAL and k != QUANT_KEY
                         and k not in ("n_mtp_layers", "max_batch_size", "max_seq_len", "scale_dtype"))
        if unknown:
            raise ConfigError(f"inference config has unknown keys {unknown}", "is this a DeepSeek-V4 config?")
        kwargs = {k: v for k, v in cfg.items() if k in names}
        if QUANT_KEY in cfg:
            kwargs["quantization"] = _recipe(cfg[QUANT_KEY], "inference config")
        if cfg.get("dtype", "fp8") not in ("fp8", "bf16"):
            raise ConfigError(f"inference config: dtype={_short(cfg['dtype'])} is not supported", "use fp8 or bf16")
        if cfg.get("scale_fmt", "ue8m0") not in ("ue8m0", None):
            raise ConfigError(f"inference config: scale_fmt={_short(cfg['scale_fmt'])} is not supported",
                              "use ue8m0")
        kwargs.setdefault("expert_dtype", "fp4" if cfg.get("dtype", "fp8") == "fp8" else "bf16")
        return _construct(cls, kwargs, "inference config", str)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Either format, told apart by its keys (`hidden_size` = HF, `dim` = inference)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"a config must be a JSON object, got {_describe(cfg)}", "is this a config.json?")
        if "hidden_size" in cfg:
            return cls.from_hf_config(cfg)
        if "dim" in cfg:
            return cls.from_inference_config(cfg)
        raise ConfigError("config has neither 'hidden_size' nor 'dim'", "is this a DeepSeek-V4 config.json?")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        """Read a config file, or the `config.json` of a model directory."""
        path = Path(path)
        if _stat_is_dir(path):
            path = path / "config.json"
        return cls.from_dict(_read_json_object(path))

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict for these args (what the checkpoint writer emits); reads back equal."""
        inverse = {v: k for k, v in HF_TO_ARGS.items()}
        mine = asdict(self.replace(quantization=None))
        cfg: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        for name, value in mine.items():
            if name in inverse:
                cfg[inverse[name]] = list(value) if isinstance(value, tuple) else value
        cfg.update({k: v for k, v in HF_FIXED.items() if k != "model_type"})
        cfg.update(attention_dropout=0.0, initializer_range=0.02, torch_dtype="bfloat16", use_cache=True)
        cfg["rope_scaling"] = {"beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                               "factor": self.rope_factor,
                               "original_max_position_embeddings": self.original_seq_len, "type": "yarn"}
        if self.dtype == "fp8":
            cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
        elif self.expert_dtype == "bf16":
            del cfg["expert_dtype"]  # what a config without quantization_config implies
        if self.quantization is not None:
            cfg[QUANT_KEY] = self.quantization.to_config()
        return cfg

    def replace(self, **changes: Any) -> ModelArgs:
        return replace(self, **changes)


# ============================================================== value checks
def config_problems(values: dict[str, Any], label: Callable[[str], str] = str) -> list[str]:
    """Everything wrong with a full set of field values, one line each; `label` spells a field as its source does.

    Types first (ranges of wrong-typed values mean nothing), then ranges, then relations between fields
    (which may divide by range-checked values). Values are shown as given, before `_coerced`."""
    problems = [p for name in FIELD_RULES if (p := _type_problem(name, values[name], label))]
    if problems:
        return problems
    problems = [p for name in FIELD_RULES if (p := _range_problem(name, values, label))]
    return problems or _structure_problems(values, label)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _has_kind(value: Any, kind: type) -> bool:
    """Whether `value` may stand for a field of type `kind` (a bool is no number, a float no int, NaN no value)."""
    if kind is int:
        return _is_int(value)
    if kind is float:
        return _is_finite_number(value)
    if kind is tuple:
        return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
    if kind is Recipe:
        return value is None or isinstance(value, Recipe)
    return isinstance(value, kind)


def _type_problem(name: str, value: Any, label: Callable[[str], str]) -> str | None:
    kind = FIELD_RULES[name][0]
    if _has_kind(value, kind):
        return None
    return f"{label(name)} must be {_KIND_NAMES[kind]}, got {_describe(value)}"


def _coerced(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (already type-checked) as plain int / float / tuple: JSON's 10000 is the float 10000.0."""
    convert = {int: int, float: float, tuple: lambda v: tuple(int(x) for x in v)}
    return {name: convert.get(FIELD_RULES[name][0], lambda v: v)(value) for name, value in values.items()}


def _range_problem(name: str, values: dict[str, Any], label: Callable[[str], str]) -> str | None:
    """The problem with field `name` against its `FIELD_RULES` entry, if any."""
    allowed, value = FIELD_RULES[name][1], values[name]
    if isinstance(allowed, tuple):
        return _choice_problem(name, value, allowed, label)
    if allowed is None:
        return None
    opening, low, high, closing = _INTERVAL.fullmatch(allowed).groups()
    lo, hi = _bound(low, values), _bound(high, values)
    below = value <= lo if opening == "(" else value < lo
    above = value >= hi if closing == ")" else value > hi
    if not (below or above):
        return None
    shown = f"{opening}{_bound_text(low, values, label)}, {_bound_text(high, values, label)}{closing}"
    return f"{label(name)}={_short(value)} is outside the allowed range {shown}"


def _choice_problem(name: str, value: Any, choices: tuple[Any, ...], label: Callable[[str], str]) -> str | None:
    allowed = ", ".join(_short(c) for c in choices)
    if isinstance(value, (list, tuple)):
        bad = sorted(set(value) - set(choices))
        return f"{label(name)} may only contain {allowed}, found {bad}" if bad else None
    return None if value in choices else f"{label(name)}={_short(value)} is not one of {allowed}"


def _bound(text: str, values: dict[str, Any]) -> int | float:
    """An interval end: another field's value, or a number."""
    return values[text] if text in values else float(text)


def _bound_text(text: str, values: dict[str, Any], label: Callable[[str], str]) -> str:
    return f"{label(text)}={values[text]}" if text in values else text


def _structure_problems(v: dict[str, Any], label: Callable[[str], str]) -> list[str]:
    """Relations between fields that ranges cannot express (all range-checked already: no division by zero)."""
    problems = _schedule_problems(v, label)
    if v["rope_head_dim"] % 2:
        problems.append(f"{label('rope_head_dim')}={v['rope_head_dim']} must be even (RoPE rotates pairs)")
    if v["index_head_dim"] & (v["index_head_dim"] - 1):
        problems.append(f"{label('index_head_dim')}={v['index_head_dim']} must be a power of two (Hadamard)")
    if v["n_heads"] % v["o_groups"]:
        problems.append(f"{label('n_heads')}={v['n_heads']} is not divisible by {label('o_groups')}={v['o_groups']}")
    if v["expert_dtype"] == "fp4" and (v["dim"] % 32 or v["moe_inter_dim"] % 32):
        problems.append(f"FP4 experts need {label('dim')}={v['dim']} and {label('moe_inter_dim')}="
                        f"{v['moe_inter_dim']} divisible by 32")
    if v["quantization"] is not None:
        problems += _quantization_problems(v, label)
    return problems


def _schedule_problems(v: dict[str, Any], label: Callable[[str], str]) -> list[str]:
    """`compress_ratios` holds one ratio per trunk layer, then one sliding-only (0) ratio per MTP layer."""
    ratios, n_layers = v["compress_ratios"], v["n_layers"]
    n_ratios = n_layers + v["n_mtp_layers"]
    if len(ratios) != n_ratios:
        return [f"{label('compress_ratios')} has {len(ratios)} entries, expected "
                f"{label('n_layers')} + {label('n_mtp_layers')} = {n_ratios}"]
    return [f"{label('compress_ratios')}[{i}]={ratios[i]}: MTP layer {i - n_layers} must be sliding-only (ratio 0)"
            for i in range(n_layers, n_ratios) if ratios[i] != SWA]


def _quantization_problems(v: dict[str, Any], label: Callable[[str], str]) -> list[str]:
    recipe, problems = v["quantization"], []
    if recipe.max_layer() >= v["n_layers"]:
        problems.append(f"{label('quantization')}: the recipe names layer {recipe.max_layer()}, "
                        f"the model has {v['n_layers']}")
    used = recipe.formats_used()
    if used & {"fp4", "int3", "int2"} and (v["dim"] % 32 or v["moe_inter_dim"] % 32):
        problems.append("quantized experts need dim and moe_inter_dim divisible by 32")
    dense_in = (v["dim"], v["q_lora_rank"], v["n_heads"] * v["head_dim"] // v["o_groups"],
                v["o_groups"] * v["o_lora_rank"], v["moe_inter_dim"])
    if "fp4" in used and any(n % 32 for n in dense_in):
        problems.append("FP4 dense linears need every dense in_features divisible by 32")
    return problems


def _raise_problems(problems: list[str], source: str) -> None:
    """One ConfigError for all `problems` of `source`, the first few of them on its one line."""
    if not problems:
        return
    more = f"; and {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
    raise ConfigError(f"{source}: {'; '.join(problems[:_MAX_PROBLEMS])}{more}",
                      "set each named key to an allowed value; the official DeepSeek-V4 config.json has working ones")


def _construct(cls, kwargs: dict[str, Any], source: str, label: Callable[[str], str]) -> ModelArgs:
    """`cls(**kwargs)`, checked first so that errors name the keys as `source` spells them."""
    defaults = {f.name: f.default for f in fields(cls)}
    _raise_problems(config_problems(defaults | kwargs, label), source)
    return cls(**kwargs)


def _short(value: Any) -> str:
    """`value` as JSON would write it, cut to fit a one-line message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: Any) -> str:
    """'a string "43"', 'null', 'a list [1, 2]': the JSON kind of `value`, then `value`."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (numbers.Integral, "an integer"), (numbers.Real, "a number"), (str, "a string"),
             ((list, tuple), "a list"), (dict, "an object"))
    kind = next((name for types, name in kinds if isinstance(value, types)), f"a {type(value).__name__}")
    return f"{kind} {_short(value)}"


# ========================================================= HF config.json parts
def _hf_label(name: str) -> str:
    return HF_LABELS.get(name, name)


def _hf_top_level(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelArgs kwargs from the top-level keys; rejects unknown keys and wrong fixed values."""
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in cfg.items():
        if key in HF_TO_ARGS:
            kwargs[HF_TO_ARGS[key]] = value
        elif key in HF_FIXED:
            _check_fixed(key, value)
        elif key == QUANT_KEY:
            kwargs["quantization"] = _recipe(value, "config.json")
        elif key not in HF_IGNORED and key not in ("rope_scaling", "quantization_config"):
            unknown.append(key)
    if unknown:
        raise ConfigError(f"config.json has unknown keys {sorted(unknown)}",
                          "is this a DeepSeek-V4 config.json? remove the keys or update dsv4")
    if "model_type" not in cfg:
        raise ConfigError("config.json has no model_type", "expected model_type 'deepseek_v4'")
    return kwargs


def _check_fixed(key: str, value: Any) -> None:
    """`value` must be V4's, of the same JSON type too (`true` is not 1)."""
    expected = HF_FIXED[key]
    if type(value) is not type(expected) or value != expected:
        raise ConfigError(f"config.json: {key}={_short(value)} is not supported by DeepSeek-V4 "
                          f"(expected {_short(expected)})", "is this a DeepSeek-V4 checkpoint?")


def _hf_rope_scaling(rope: Any) -> dict[str, Any]:
    """ModelArgs kwargs from `rope_scaling` (YaRN); absent or null keeps the V4 defaults."""
    if rope is None:
        return {}
    example = 'the official config.json has {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536}'
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object, got {_describe(rope)}", example)
    kind = rope.get("type", rope.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"config.json: rope_scaling type {_short(kind)} is not supported", "DeepSeek-V4 uses 'yarn'")
    missing = [k for k in ROPE_SCALING_REQUIRED if k not in rope]
    if missing:
        raise ConfigError(f"config.json: rope_scaling lacks {', '.join(map(repr, missing))}", example)
    unknown = sorted(set(rope) - set(ROPE_SCALING_TO_ARGS) - {"type", "rope_type"})
    if unknown:
        raise ConfigError(f"config.json: rope_scaling has unknown keys {unknown}",
                          f"DeepSeek-V4's YaRN takes only type, {', '.join(ROPE_SCALING_TO_ARGS)}")
    return {ROPE_SCALING_TO_ARGS[k]: v for k, v in rope.items() if k in ROPE_SCALING_TO_ARGS}


def _hf_dtypes(quant: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """dtype and expert_dtype: a `quantization_config` means the FP8 release (FP4 experts unless it says else)."""
    if quant is None:
        return {"dtype": "bf16", "expert_dtype": kwargs.get("expert_dtype", "bf16")}
    _check_quantization(quant)
    return {"dtype": "fp8", "expert_dtype": kwargs.get("expert_dtype", quant.get("expert_dtype", "fp4"))}


def _check_quantization(quant: Any) -> None:
    if not isinstance(quant, dict):
        raise ConfigError(f"config.json: quantization_config must be an object, got {_describe(quant)}",
                          "use the official FP8 quantization_config, or remove it for a bf16 checkpoint")
    expected = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    for key, value in expected.items():
        if quant.get(key, value) != value:
            raise ConfigError(f"config.json quantization_config.{key}={_short(quant.get(key))} is not supported "
                              f"(expected {_short(value)})", "dsv4 reads the official FP8/FP4 release format")


def _recipe(value: Any, source: str) -> Recipe:
    try:
        return parse_recipe(value)
    except RecipeError as exc:
        raise ConfigError(f"{source}: {QUANT_KEY}: {exc.message}", "re-run `dsv4 quantize`, or fix the key") from None


# ============================================================== reading files
def _stat_is_dir(path: Path) -> bool:
    """`path.is_dir()`, with an inaccessible parent a ConfigError instead of a traceback."""
    try:
        return path.is_dir()
    except OSError as exc:
        raise ConfigError(f"cannot access {path}: {exc.strerror or exc}", "check the path's permissions") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; every way that can fail is a one-line ConfigError."""
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not valid UTF-8 (bad byte at offset {exc.start})", _FIX_FILE) from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          _FIX_FILE) from None
    except (ValueError, RecursionError) as exc:  # a number with thousands of digits; nesting too deep
        reason = str(exc).partition("\n")[0]
        raise ConfigError(f"{path} is not valid JSON: {reason}", _FIX_FILE) from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} does not hold a JSON object", _FIX_FILE)
    return cfg


def _read_bytes(path: Path) -> bytes:
    """The bytes of config file `path`: not a directory, not missing, readable, of a config's size."""
    try:
        if path.is_dir():
            raise ConfigError(f"{path} is a directory, not a config file", "point to config.json or its directory")
        if not path.is_file():
            raise ConfigError(f"no config file at {path}", "point to a model directory containing config.json")
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {path.stat().st_size} bytes, too large for a config file", _FIX_FILE)
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions") from None


def yarn_correction_range(args: ModelArgs, base: float) -> tuple[int, int]:
    """YaRN (low, high) frequency indices, floor/ceil and clamped as the reference does (§2.6)."""
    dim = args.rope_head_dim

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(correction_dim(args.beta_fast))
    high = math.ceil(correction_dim(args.beta_slow))
    return max(low, 0), min(high, dim - 1)
