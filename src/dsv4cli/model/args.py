"""`ModelArgs`: the DeepSeek-V4 hyper-parameters, read from either config format (spec §1).

Field names follow the official `inference/config.json` (`dim`, `n_layers`, ...);
`from_hf_config` maps the Hugging Face `config.json` names onto them through one
explicit table, and rejects unknown or inconsistent keys with a `ConfigError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dsv4cli.errors import ConfigError
from dsv4cli.recipe import QUANT_KEY, Recipe, RecipeError, parse_recipe

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
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Reject combinations the architecture cannot run."""
        problems = []
        n_ratios = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != n_ratios:
            problems.append(
                f"compress_ratios has {len(self.compress_ratios)} entries, expected "
                f"n_layers + n_mtp_layers = {n_ratios}"
            )
        bad = sorted({r for r in self.compress_ratios if r not in ATTENTION_KINDS})
        if bad:
            problems.append(f"compress_ratios may only contain 0, 4 or 128, found {bad}")
        for i in range(self.n_layers, len(self.compress_ratios)):
            if self.compress_ratios[i] != SWA:
                problems.append(f"MTP layer {i - self.n_layers} must be sliding-only (ratio 0)")
        if not 0 <= self.n_hash_layers <= self.n_layers:
            problems.append(f"n_hash_layers={self.n_hash_layers} outside [0, n_layers={self.n_layers}]")
        if not 1 <= self.n_activated_experts <= self.n_routed_experts:
            problems.append("n_activated_experts must be between 1 and n_routed_experts")
        if self.n_shared_experts != 1:
            problems.append(f"n_shared_experts must be 1 for V4, got {self.n_shared_experts}")
        if self.n_heads % self.o_groups:
            problems.append(f"n_heads={self.n_heads} is not divisible by o_groups={self.o_groups}")
        if not 0 < self.rope_head_dim <= self.head_dim or self.rope_head_dim % 2:
            problems.append("rope_head_dim must be even and at most head_dim")
        if not 0 < self.rope_head_dim <= self.index_head_dim:
            problems.append("index_head_dim must be at least rope_head_dim")
        if self.index_head_dim & (self.index_head_dim - 1):
            problems.append(f"index_head_dim={self.index_head_dim} must be a power of two (Hadamard)")
        if self.score_func not in ("sqrtsoftplus", "softmax", "sigmoid"):
            problems.append(f"unknown score_func {self.score_func!r}")
        if self.dtype not in ("fp8", "bf16"):
            problems.append(f"dtype must be 'fp8' or 'bf16', got {self.dtype!r}")
        if self.expert_dtype not in ("fp4", "fp8", "bf16"):
            problems.append(f"expert_dtype must be 'fp4', 'fp8' or 'bf16', got {self.expert_dtype!r}")
        if self.expert_dtype == "fp4" and (self.dim % 32 or self.moe_inter_dim % 32):
            problems.append("FP4 experts need dim and moe_inter_dim divisible by 32")
        if self.quantization is not None:
            problems += self._quantization_problems()
        if self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            problems.append("hc_mult and hc_sinkhorn_iters must be positive")
        for name in ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_heads", "q_lora_rank",
                     "head_dim", "o_lora_rank", "window_size", "index_n_heads", "index_topk"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if problems:
            raise ConfigError("inconsistent model config: " + "; ".join(problems),
                              "check config.json against the official DeepSeek-V4 release")

    def _quantization_problems(self) -> list[str]:
        recipe, problems = self.quantization, []
        if recipe.max_layer() >= self.n_layers:
            problems.append(f"quantization recipe names layer {recipe.max_layer()}, the model has {self.n_layers}")
        used = recipe.formats_used()
        if used & {"fp4", "int3", "int2"} and (self.dim % 32 or self.moe_inter_dim % 32):
            problems.append("quantized experts need dim and moe_inter_dim divisible by 32")
        dense_in = (self.dim, self.q_lora_rank, self.n_heads * self.head_dim // self.o_groups,
                    self.o_groups * self.o_lora_rank, self.moe_inter_dim)
        if "fp4" in used and any(n % 32 for n in dense_in):
            problems.append("FP4 dense linears need every dense in_features divisible by 32")
        return problems

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
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in cfg.items():
            if key in HF_TO_ARGS:
                kwargs[HF_TO_ARGS[key]] = value
            elif key in HF_FIXED:
                if value != HF_FIXED[key]:
                    raise ConfigError(f"config.json: {key}={value!r} is not supported by DeepSeek-V4 "
                                      f"(expected {HF_FIXED[key]!r})", "is this a DeepSeek-V4 checkpoint?")
            elif key in ("rope_scaling", "quantization_config") or key in HF_IGNORED:
                continue
            elif key == QUANT_KEY:
                kwargs["quantization"] = _recipe(value, "config.json")
            else:
                unknown.append(key)
        if unknown:
            raise ConfigError(f"config.json has unknown keys {sorted(unknown)}",
                              "is this a DeepSeek-V4 config.json? remove the keys or update dsv4")
        if "model_type" not in cfg:
            raise ConfigError("config.json has no model_type", "expected model_type 'deepseek_v4'")
        rope = cfg.get("rope_scaling")
        if rope is not None:
            kind = rope.get("type", rope.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported",
                                  "DeepSeek-V4 uses 'yarn'")
            kwargs.update(rope_factor=rope["factor"], original_seq_len=rope["original_max_position_embeddings"],
                          beta_fast=rope["beta_fast"], beta_slow=rope["beta_slow"])
        quant = cfg.get("quantization_config")
        if quant is not None:
            _check_quantization(quant)
            kwargs["dtype"] = "fp8"
            kwargs.setdefault("expert_dtype", quant.get("expert_dtype", "fp4"))
        else:
            kwargs["dtype"] = "bf16"
            kwargs.setdefault("expert_dtype", "bf16")
        return _construct(cls, kwargs, "config.json")

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
            raise ConfigError(f"inference config: dtype {cfg['dtype']!r} not supported", "use fp8 or bf16")
        if cfg.get("scale_fmt", "ue8m0") not in ("ue8m0", None):
            raise ConfigError(f"inference config: scale_fmt {cfg['scale_fmt']!r} not supported", "use ue8m0")
        kwargs.setdefault("expert_dtype", "fp4" if cfg.get("dtype", "fp8") == "fp8" else "bf16")
        return _construct(cls, kwargs, "inference config")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Either format, told apart by its keys (`hidden_size` = HF, `dim` = inference)."""
        if "hidden_size" in cfg:
            return cls.from_hf_config(cfg)
        if "dim" in cfg:
            return cls.from_inference_config(cfg)
        raise ConfigError("config has neither 'hidden_size' nor 'dim'", "is this a DeepSeek-V4 config.json?")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config file at {path}", "point to a model directory containing config.json")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}", "re-download or fix the file") from exc
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path} does not hold a JSON object", "re-download or fix the file")
        return cls.from_dict(cfg)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict for these args (what the checkpoint writer emits)."""
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
        else:
            del cfg["expert_dtype"]
        if self.quantization is not None:
            cfg[QUANT_KEY] = self.quantization.to_config()
        return cfg

    def replace(self, **changes: Any) -> ModelArgs:
        return replace(self, **changes)


def _check_quantization(quant: dict[str, Any]) -> None:
    expected = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    for key, value in expected.items():
        if quant.get(key, value) != value:
            raise ConfigError(f"config.json quantization_config.{key}={quant.get(key)!r} is not supported "
                              f"(expected {value!r})", "dsv4 reads the official FP8/FP4 release format")


def _recipe(value: Any, source: str) -> Recipe:
    try:
        return parse_recipe(value)
    except RecipeError as exc:
        raise ConfigError(f"{source}: {QUANT_KEY}: {exc.message}", "re-run `dsv4 quantize`, or fix the key") from None


def _construct(cls, kwargs: dict[str, Any], source: str) -> ModelArgs:
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}", "check the config keys") from exc


def yarn_correction_range(args: ModelArgs, base: float) -> tuple[int, int]:
    """YaRN (low, high) frequency indices, floor/ceil and clamped as the reference does (§2.6)."""
    dim = args.rope_head_dim

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(correction_dim(args.beta_fast))
    high = math.ceil(correction_dim(args.beta_slow))
    return max(low, 0), min(high, dim - 1)
