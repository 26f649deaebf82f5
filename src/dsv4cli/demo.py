"""The embedded default model: a small model with the real DeepSeek-V4 architecture and tokenizer.

It lets `dsv4 chat` run end to end on a fresh machine without downloading anything:
the weights are generated deterministically (random, seed fixed) on first use into
the cache directory, in the official checkpoint format, next to the real V4
tokenizer shipped with the package. Its answers are noise; the banner says so.
"""

from __future__ import annotations

import lzma
import shutil
from importlib import resources
from pathlib import Path

from dsv4cli.io.writer import write_random_checkpoint
from dsv4cli.model.args import ModelArgs
from dsv4cli.paths import cache_dir

DEMO_NAME = "dsv4-demo-random-v1"
DEMO_LABEL = "built-in demo model (random weights, real V4 architecture and tokenizer; output is noise)"
DEMO_SEED = 4
DEMO_ARGS = ModelArgs(
    vocab_size=129280, dim=128, moe_inter_dim=128, n_layers=4, n_hash_layers=1, n_heads=2,
    n_routed_experts=8, n_activated_experts=2, q_lora_rank=128, head_dim=128, rope_head_dim=64, o_groups=1,
    o_lora_rank=128, index_n_heads=8, index_head_dim=64, index_topk=64, compress_ratios=(0, 4, 128, 4, 0),
)


def packaged_tokenizer_dir(target: Path) -> Path:
    """Unpack the V4 tokenizer shipped with the package into `target`; returns `target`."""
    source = resources.files("dsv4cli") / "data" / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_bytes(lzma.decompress((source / "tokenizer.json.xz").read_bytes()))
    (target / "tokenizer_config.json").write_bytes((source / "tokenizer_config.json").read_bytes())
    return target


def demo_model_dir(root: Path | None = None) -> Path:
    """Path of the demo checkpoint, generating it on first use (about a second, ~70 MB)."""
    path = (root or cache_dir()) / DEMO_NAME
    if (path / "model.safetensors.index.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    staging = path.with_name(path.name + ".tokenizer")
    try:
        write_random_checkpoint(DEMO_ARGS, path, seed=DEMO_SEED, overwrite=True,
                                tokenizer_dir=packaged_tokenizer_dir(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
