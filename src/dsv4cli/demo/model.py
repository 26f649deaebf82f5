"""The embedded default model: a tiny model with the real DeepSeek-V4 architecture and tokenizer,
trained on synthetic arithmetic chats (`tools/train_demo.py`, corpus in `demo_corpus`).

It lets `dsv4 chat` run end to end on a fresh machine without downloading anything. The
package ships the trained checkpoint in the official format as xz-compressed shards plus a
manifest with each file's sha256 (`data/demo/`, a few MB); on first use it is unpacked,
verified and completed with the packaged V4 tokenizer in the cache directory, atomically.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from dsv4cli.errors import CheckpointError
from dsv4cli.fsutil import check_free_space, disk_errors, made_by_dsv4, mark_output, move_into_place, new_staging_dir
from dsv4cli.model.args import ModelArgs
from dsv4cli.paths import cache_dir

DEMO_NAME = "dsv4-demo-arith-v1"
#: default sampling temperature of `dsv4 chat` on the demo: at DeepSeek's 1.0 the tiny model often
#: miscopies an operand into its trace (4/8 right on "What is 487 + 356?"); at 0.5, 8/8
DEMO_TEMPERATURE = 0.5
#: what MODEL arguments (`dsv4 chat demo`, `dsv4 quantize demo OUT`) call the built-in model
DEMO_ALIAS = "demo"
DEMO_LABEL = ("built-in demo model (tiny, trained only on synthetic arithmetic chats; "
              "real V4 architecture and tokenizer)")
DEMO_ARGS = ModelArgs(
    vocab_size=129280, dim=128, moe_inter_dim=128, n_layers=4, n_hash_layers=1, n_heads=4,
    n_routed_experts=8, n_activated_experts=2, q_lora_rank=128, head_dim=64, rope_head_dim=32, o_groups=2,
    o_lora_rank=64, index_n_heads=4, index_head_dim=64, index_topk=64, compress_ratios=(0, 4, 128, 4, 0),
)
#: Where `tools/train_demo.py --package` writes the shipped files (a source checkout).
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
MANIFEST_NAME = "manifest.json"
#: room the unpacked V4 tokenizer files take (tokenizer.json is about 8 MB)
TOKENIZER_BYTES = 12 << 20
_REINSTALL = "reinstall dsv4, or rebuild the demo with {opt:package_demo}"


def packaged_tokenizer_dir(target: Path) -> Path:
    """Unpack the V4 tokenizer shipped with the package into `target`; returns `target`."""
    source = resources.files("dsv4cli") / "data" / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_bytes(lzma.decompress((source / "tokenizer.json.xz").read_bytes()))
    (target / "tokenizer_config.json").write_bytes((source / "tokenizer_config.json").read_bytes())
    return target


def packaged_demo():
    """The shipped demo files (an importlib resources directory)."""
    return resources.files("dsv4cli") / "data" / "demo"


def demo_manifest() -> dict[str, Any]:
    """The shipped manifest: name, files (sha256 and size once unpacked) and training record."""
    try:
        return json.loads((packaged_demo() / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the built-in demo model is missing from the package ({exc})", _REINSTALL) from None


def demo_model_dir(root: Path | None = None) -> Path:
    """Path of the demo checkpoint, unpacking and verifying it on first use (well under a second)."""
    manifest = demo_manifest()
    path = (root or cache_dir()) / DEMO_NAME
    if _is_unpacked(path, manifest):
        return path
    with disk_errors(f"unpacking the demo model into {path.parent}",
                     "free some space there, or point XDG_CACHE_HOME to a writable directory"):
        path.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(path.parent, sum(entry["bytes"] for entry in manifest["files"].values()) + TOKENIZER_BYTES,
                         "the demo model")
        staging = new_staging_dir(path, "dsv4-unpack")
        try:
            _unpack(staging, manifest)
            _move_into_place(staging, path, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _is_unpacked(path: Path, manifest: dict[str, Any]) -> bool:
    """Cheap check of an earlier unpack: same manifest, every file present with its size."""
    try:
        if json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8")) != manifest:
            return False
    except (OSError, json.JSONDecodeError):
        return False
    sizes_ok = all((path / name).is_file() and (path / name).stat().st_size == entry["bytes"]
                   for name, entry in manifest["files"].items())
    return sizes_ok and (path / "tokenizer.json").is_file()


def _adopt_earlier_unpack(path: Path) -> None:
    """Mark as dsv4's an outdated unpack that an earlier dsv4 version left without a marker (it holds
    a demo manifest), so that it may be replaced; anything else at `path` is left for the user."""
    try:
        earlier = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if isinstance(earlier, dict) and str(earlier.get("name", "")).startswith("dsv4-demo") and not made_by_dsv4(path):
        mark_output(path, "dsv4-unpack")


def _unpack(target: Path, manifest: dict[str, Any]) -> None:
    """Decompress and verify every file into `target`, add the tokenizer, then the manifest (last)."""
    source = packaged_demo()
    target.mkdir(parents=True, exist_ok=True)
    for name, entry in manifest["files"].items():
        packed = source / (name + ".xz")
        data = lzma.decompress(packed.read_bytes()) if packed.is_file() else (source / name).read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"the built-in demo model file {name} fails its sha256 check", _REINSTALL)
        (target / name).write_bytes(data)
    packaged_tokenizer_dir(target)
    (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, path: Path, manifest: dict[str, Any]) -> None:
    """Rename `staging` to `path`, replacing an outdated or broken unpack; a concurrent process
    that finished first wins."""
    if _is_unpacked(path, manifest):
        return  # another process unpacked it meanwhile
    _adopt_earlier_unpack(path)
    try:
        move_into_place(staging, path)
    except OSError:
        if not _is_unpacked(path, manifest):
            raise
