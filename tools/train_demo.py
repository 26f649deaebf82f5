"""Train, export and evaluate the built-in demo model (real DeepSeek-V4 architecture and tokenizer).

    python tools/train_demo.py --steps 6000 --threads 1 --out build/demo --package

1. Corpus: the seeded synthetic chat corpus of `dsv4cli.demo.corpus`, every problem in thinking
   and non-thinking mode, packed into rows; the loss covers the assistant's tokens only.
2. Model: `DEMO_ARGS` with float weights, trained in float32 on the token ids the corpus uses
   (a compact embedding and head; at export they are scattered into the full 129280-row
   matrices, unused rows zero). Next-token loss plus the MTP layer's loss (weight 0.3); the
   learned gates' biases follow the auxiliary-loss-free balancing rule; the last part of
   training fake-quantizes the weights as they will be stored (FP8 blocks, FP4 experts).
3. Export: the official checkpoint format, FP8 non-expert linears and FP4 experts.
4. Evaluation: held-out questions through the real chat path (`load_model`, `ChatSession`,
   greedy) in non-think and think-high mode, on the float32 weights and on the checkpoint.
5. `--package`: xz-compressed shards and a sha256 manifest into `src/dsv4cli/data/demo/`.

Same seed, steps and thread count on the same machine give the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsv4cli import kernels
from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.chat.session import ChatSession, ChatSettings
from dsv4cli.chat.tokenizer import Tokenizer
from dsv4cli.demo.corpus import EVAL_KINDS, Example, Problem, eval_problems, is_correct, training_examples
from dsv4cli.demo.model import DEMO_ARGS, DEMO_NAME, PACKAGE_DIR, packaged_tokenizer_dir
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.formats.official import (
    dequantize_fp4_rows,
    dequantize_fp8_blocks,
    quantize_fp4_rows,
    quantize_fp8_blocks,
)
from dsv4cli.io.schema import checkpoint_specs
from dsv4cli.io.writer import random_tensors, write_checkpoint
from dsv4cli.kernels import ref
from dsv4cli.model.layers import Numerics
from dsv4cli.model.moe import Gate
from dsv4cli.model.transformer import Transformer
from dsv4cli.runtime.loader import build_model, load_model

ROOT = Path(__file__).resolve().parents[1]
MTP_WEIGHT = 0.3
BIAS_UPDATE_RATE = 1e-3
FLOAT_WEIGHTS = "float32.pt"  # the trained weights before quantization, in --out
VOCAB_SAMPLE = 20000  # corpus examples scanned for the token ids the model uses
#: what `dsv4 chat` uses for the demo model (cli.py): reply and reasoning budgets.
CHAT_MAX_TOKENS, CHAT_REASONING_BUDGET = 256, 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "demo", help="work directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--qat-from", type=float, default=0.75, help="fake-quantize weights after this fraction")
    p.add_argument("--eval-per-kind", type=int, default=50, help="held-out questions per task kind")
    p.add_argument("--eval-kinds", default=",".join(EVAL_KINDS), help="comma-separated task kinds to evaluate")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="evaluate (and --package) what --out already holds")
    p.add_argument("--package", action="store_true", help="write the compressed checkpoint to --package-dir")
    p.add_argument("--package-dir", type=Path, default=PACKAGE_DIR, help="where --package writes")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--no-digit-init", action="store_true", help="random init for number tokens too")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the mHC Sinkhorn op")
    return p.parse_args(argv)


# ============================================================================ data


def corpus_vocab(tokenizer: Tokenizer) -> list[int]:
    """Sorted token ids the model will ever see or write: a large corpus sample, every number
    0..999 and the chat-format special tokens."""
    ids: set[int] = set()
    stream = training_examples(seed=12345)
    for _ in range(VOCAB_SAMPLE):
        ex = next(stream)
        ids.update(tokenizer.encode(ex.prompt + ex.completion))
    for n in range(1000):
        ids.update(tokenizer.encode(str(n)))
    sp = tokenizer.special
    ids.update((sp.bos, sp.eos, sp.user, sp.assistant, sp.think_start, sp.think_end))
    return sorted(ids)


class Packer:
    """Packs tokenized conversations into [batch, seq] rows; a row starts with a conversation at
    position 0 and takes more while they fit. The mask marks the assistant's tokens."""

    def __init__(self, examples: Iterator[Example], tokenizer: Tokenizer, lookup: np.ndarray, seq: int):
        self.examples, self.tokenizer, self.lookup, self.seq = examples, tokenizer, lookup, seq
        self.pad = int(lookup[tokenizer.special.eos])
        self.pending: tuple[np.ndarray, np.ndarray] | None = None

    def _next(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pending is not None:
            item, self.pending = self.pending, None
            return item
        ex = next(self.examples)
        prompt, completion = self.tokenizer.encode(ex.prompt), self.tokenizer.encode(ex.completion)
        ids = self.lookup[np.asarray(prompt + completion)]
        if (ids < 0).any():
            raise RuntimeError(f"token outside the demo vocabulary in {ex.prompt + ex.completion!r}")
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(prompt):] = True
        return ids, mask

    def row(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full(self.seq, self.pad, dtype=np.int64)
        mask = np.zeros(self.seq, dtype=bool)
        used = 0
        while True:
            item = self._next()
            n = len(item[0])
            if n > self.seq:
                continue
            if used + n > self.seq:
                self.pending = item
                return ids, mask
            ids[used:used + n], mask[used:used + n] = item
            used += n

    def batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.row() for _ in range(rows)]
        return (torch.from_numpy(np.stack([p[0] for p in pairs])),
                torch.from_numpy(np.stack([p[1] for p in pairs])))


# ============================================================================ model


def train_args(vocab_size: int):
    """DEMO_ARGS with float weights and the compact vocabulary (what is trained)."""
    return DEMO_ARGS.replace(vocab_size=vocab_size, dtype="bf16", expert_dtype="bf16")


def init_model(vocab_size: int, seed: int) -> Transformer:
    args = train_args(vocab_size)
    tensors = dict(random_tensors(args, seed))
    model = build_model(args, tensors.__getitem__, Numerics.plain(torch.float32)).float().train()
    for name, param in model.named_parameters():
        # the indexer's top-k selection has no gradient; the gate bias moves by the balancing rule
        trainable = param.is_floating_point() and ".indexer." not in name and not name.endswith("gate.bias")
        param.requires_grad_(trainable)
    return model


def number_tokens(tokenizer: Tokenizer, vocab: list[int]) -> dict[int, str]:
    """Compact id -> digits, for the vocabulary's number tokens ("0" .. "999")."""
    out = {}
    for cid, tid in enumerate(vocab):
        text = tokenizer.decode([tid])
        if text.isascii() and text.isdigit():
            out[cid] = text
    return out


@torch.no_grad()
def digit_init(model: Transformer, numbers: dict[int, str], seed: int) -> None:
    """Start every number token's embedding and head row as a sum of one random vector per
    (digit position from the right, digit) plus one per length: the digits are readable from
    the first step, and the rest is learned as usual."""
    generator = torch.Generator().manual_seed(seed + 1)
    for param, std in ((model.embed.weight, 1.0), (model.head.weight, model.args.dim ** -0.5)):
        parts = torch.randn(3, 10, param.shape[1], generator=generator) * std / 2
        length = torch.randn(3, param.shape[1], generator=generator) * std / 2
        for cid, digits in numbers.items():
            row = length[len(digits) - 1].clone()
            for k, d in enumerate(reversed(digits)):
                row += parts[k, int(d)]
            param[cid] = row


def stored_formats() -> dict[str, str]:
    """Checkpoint weight name -> "fp8" / "fp4" for the linears that are stored quantized."""
    specs = checkpoint_specs(DEMO_ARGS)
    return {name: {"F8_E4M3": "fp8", "I8": "fp4"}[spec.dtype] for name, spec in specs.items()
            if spec.dtype in ("F8_E4M3", "I8")}


def fake_quant(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weight as it will be stored, with a straight-through gradient."""
    with torch.no_grad():
        if fmt == "fp8":
            stored = dequantize_fp8_blocks(*quantize_fp8_blocks(weight))
        else:
            stored = dequantize_fp4_rows(*quantize_fp4_rows(weight))
    return weight + (stored - weight).detach()


class QuantAwareKernels:
    """Routes `linear`, `grouped_linear`, `swiglu_expert` and `moe_experts` through fake-quantized
    weights (quantization-aware training)."""

    def __init__(self, model: Transformer):
        formats = stored_formats()
        self.formats = {id(p): formats[name] for name, p in model.named_parameters() if name in formats}

    def _q(self, weight: torch.Tensor) -> torch.Tensor:
        fmt = self.formats.get(id(weight))
        return weight if fmt is None else fake_quant(weight, fmt)

    def linear(self, x, weight, scale=None, act_quant=False):
        return ref.linear(x, self._q(weight), scale, act_quant)

    def grouped_linear(self, x, weight, scale=None):
        return ref.grouped_linear(x, self._q(weight), scale)

    def swiglu_expert(self, x, w1, s1, w2, s2, w3, s3, route_weight, swiglu_limit, act_quant):
        return ref.swiglu_expert(x, self._q(w1), s1, self._q(w2), s2, self._q(w3), s3, route_weight,
                                 swiglu_limit, act_quant)

    def moe_experts(self, x, weights, indices, experts, swiglu_limit, act_quant):
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert_id in range(len(experts.experts)):
            token, slot = torch.where(indices == expert_id)
            if token.numel() == 0:
                continue
            w1, s1, w2, s2, w3, s3 = experts.experts[expert_id]
            y = self.swiglu_expert(x[token], w1, s1, w2, s2, w3, s3, weights[token, slot, None], swiglu_limit,
                                   act_quant)
            out = out.index_add(0, token, y)
        return out

    def install(self) -> None:
        for name in ("linear", "grouped_linear", "swiglu_expert", "moe_experts"):
            kernels.use(name, getattr(self, name))


class GateBalancer:
    """Auxiliary-loss-free load balancing of the learned gates: after each step every expert's
    selection bias moves by `rate` toward an even load."""

    def __init__(self, model: Transformer, rate: float = BIAS_UPDATE_RATE):
        self.rate = rate
        self.counts: dict[Gate, torch.Tensor] = {}
        for module in model.modules():
            if isinstance(module, Gate) and not module.is_hash:
                module.register_forward_hook(self._record)

    def _record(self, gate: Gate, _inputs, output) -> None:
        counts = torch.bincount(output[1].flatten(), minlength=gate.args.n_routed_experts).float()
        self.counts[gate] = self.counts.get(gate, 0) + counts

    @torch.no_grad()
    def step(self) -> None:
        for gate, counts in self.counts.items():
            gate.bias += self.rate * torch.sign(counts.mean() - counts)
        self.counts.clear()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, n_unused: int) -> torch.Tensor:
    """Cross-entropy over the full vocabulary: the unused rows of the exported head are zero, so
    they add `n_unused` logits of 0 (one column of log n_unused) to every softmax."""
    flat = logits.reshape(-1, logits.shape[-1])
    unused = flat.new_full((flat.shape[0], 1), math.log(n_unused))
    losses = F.cross_entropy(torch.cat([flat, unused], 1), targets.reshape(-1), reduction="none")
    weights = mask.reshape(-1).float()
    return (losses * weights).sum() / weights.sum().clamp(min=1)


def train_step(model: Transformer, ids: torch.Tensor, mask: torch.Tensor, n_unused: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    streams = model.streams(ids, cache)
    loss = lm_loss(model.logits(streams)[:, :-1], ids[:, 1:], mask[:, 1:], n_unused)
    mtp = model.mtp_logits(streams[:, :-1], ids[:, 1:], cache)
    mtp_loss = lm_loss(mtp[:, :-1], ids[:, 2:], mask[:, 2:], n_unused)
    return loss, mtp_loss


def make_optimizer(model: Transformer, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def compile_sinkhorn(log) -> None:
    """Fuse the mHC Sinkhorn iterations (many tiny element-wise ops) with torch.compile."""
    try:
        fn = torch.compile(ref.hc_split_sinkhorn, dynamic=False)
        probe = torch.randn(2, 3, DEMO_ARGS.hc_dim, requires_grad=True)
        fn(probe, torch.ones(3), torch.zeros(DEMO_ARGS.hc_dim), DEMO_ARGS.hc_mult, 3, 1e-6)[2].sum().backward()
    except Exception as exc:  # no compiler: the reference op is only slower
        log(f"torch.compile unavailable ({type(exc).__name__}: {exc}); using the reference Sinkhorn")
        return
    kernels.use("hc_split_sinkhorn", fn)


def train(model: Transformer, packer: Packer, opts: argparse.Namespace, n_unused: int, log) -> dict:
    if not opts.no_compile:
        compile_sinkhorn(log)
    optimizer = make_optimizer(model, opts.lr)
    balancer = GateBalancer(model)
    qat_step = int(opts.steps * opts.qat_from)
    started = time.perf_counter()
    history = []
    running = None
    for step in range(opts.steps):
        if step == qat_step:
            QuantAwareKernels(model).install()  # keeps the compiled Sinkhorn
            log(f"step {step}: quantization-aware training from here on")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opts.steps, opts.lr, opts.warmup)
        ids, mask = packer.batch(opts.batch)
        loss, mtp_loss = train_step(model, ids, mask, n_unused)
        optimizer.zero_grad(set_to_none=True)
        (loss + MTP_WEIGHT * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        balancer.step()
        value = (loss.item(), mtp_loss.item())
        running = value if running is None else tuple(0.95 * r + 0.05 * v for r, v in zip(running, value, strict=True))
        if (step + 1) % opts.log_every == 0 or step + 1 == opts.steps:
            elapsed = time.perf_counter() - started
            log(f"step {step + 1}/{opts.steps}  loss {running[0]:.4f}  mtp {running[1]:.4f}  "
                f"{elapsed / (step + 1):.3f} s/step  {elapsed / 60:.1f} min")
            history.append({"step": step + 1, "loss": round(running[0], 5), "mtp_loss": round(running[1], 5)})
    kernels.reset()
    return {"seconds": time.perf_counter() - started, "history": history}


# ============================================================================ export


def full_float_tensors(model: Transformer, vocab: list[int]) -> dict[str, torch.Tensor]:
    """The trained tensors with full-vocabulary embed/head (unused rows zero) and hash table,
    float32, under the checkpoint names."""
    index = torch.tensor(vocab)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        tensor = param.detach().clone()
        if name in ("embed.weight", "head.weight"):
            full = tensor.new_zeros(DEMO_ARGS.vocab_size, tensor.shape[1])
            full[index] = tensor
            tensor = full
        elif name.endswith("gate.tid2eid"):
            full = torch.arange(tensor.shape[1]).repeat(DEMO_ARGS.vocab_size, 1)  # unused ids: constant rows
            full[index] = tensor
            tensor = full
        out[name] = tensor
    return out


def quantized_tensors(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official-format tensors of `DEMO_ARGS`: FP8 blocks, FP4 experts, bf16/f32 the rest."""
    from dsv4cli.io.safetensors_file import TORCH_DTYPES

    out: dict[str, torch.Tensor] = {}
    for name, spec in checkpoint_specs(DEMO_ARGS).items():
        if name.endswith(".scale"):
            continue
        tensor = full[name]
        if spec.dtype == "F8_E4M3":
            out[name], out[name[:-len("weight")] + "scale"] = quantize_fp8_blocks(tensor)
        elif spec.dtype == "I8":
            out[name], out[name[:-len("weight")] + "scale"] = quantize_fp4_rows(tensor)
        else:
            out[name] = tensor.to(TORCH_DTYPES[spec.dtype])
    return out


def float_model(full: dict[str, torch.Tensor]) -> Transformer:
    """The trained weights before quantization as a full-vocabulary float32 model."""
    args = DEMO_ARGS.replace(dtype="bf16", expert_dtype="bf16")
    with torch.device("meta"):
        model = Transformer(args, Numerics.plain(torch.float32))
    for name, _ in list(model.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, leaf, nn.Parameter(full[name], requires_grad=False))
    return model.eval()


# ============================================================================ evaluation


class QuietRenderer:
    """A renderer that shows nothing (the session still parses reasoning and answer)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def held_out_problems(training_seed: int, per_kind: int, kinds: tuple[str, ...]) -> list[Problem]:
    """The evaluation questions of a run trained with `training_seed` (a different stream: never trained on)."""
    return eval_problems(training_seed + 1, per_kind, kinds)


def evaluate(model: Transformer, tokenizer: Tokenizer, problems: list[Problem], mode: ThinkMode) -> dict:
    """Greedy answers through the chat session, as `dsv4 chat --temperature 0` on the demo gives them."""
    torch.set_grad_enabled(False)
    settings = ChatSettings(mode=mode, sampling=SamplingParams(temperature=0), max_tokens=CHAT_MAX_TOKENS,
                            reasoning_budget=CHAT_REASONING_BUDGET if mode is not ThinkMode.NON_THINK else None)
    session = ChatSession(Engine(model, max_context=1024), tokenizer, settings)
    per_kind: dict[str, list[int]] = {}
    traces = 0
    samples = []
    for problem in problems:
        session.clear()
        result = session.send(problem.question, QuietRenderer())
        ok = is_correct(problem, result.content)
        per_kind.setdefault(problem.kind, []).append(int(ok))
        traces += bool(result.reasoning.strip())
        if len(samples) < 12 or (not ok and len(samples) < 24):
            samples.append({"q": problem.question, "reasoning": result.reasoning, "answer": result.content,
                            "expected": problem.value, "ok": ok})
    torch.set_grad_enabled(True)
    total = sum(sum(v) for v in per_kind.values())
    return {"accuracy": round(total / len(problems), 4),
            "per_kind": {k: round(sum(v) / len(v), 4) for k, v in per_kind.items()},
            "with_reasoning": traces, "questions": len(problems), "samples": samples}


def evaluate_both(model: Transformer, tokenizer: Tokenizer, problems: list[Problem], log, label: str) -> dict:
    out = {}
    for mode in (ThinkMode.NON_THINK, ThinkMode.THINK_HIGH):
        started = time.perf_counter()
        out[mode.value] = evaluate(model, tokenizer, problems, mode)
        log(f"{label} {mode.value}: accuracy {out[mode.value]['accuracy']:.3f} {out[mode.value]['per_kind']} "
            f"({time.perf_counter() - started:.0f} s)")
    return out


# ============================================================================ packaging


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package(checkpoint: Path, target: Path, info: dict) -> dict:
    """xz-compress the checkpoint's shards into `target` with the json files and a manifest
    (name, and per file its sha256 and size once unpacked)."""
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files = {}
    for path in sorted(checkpoint.iterdir()):
        if path.name.startswith("tokenizer"):
            continue  # the package ships the tokenizer once, in data/tokenizer
        data = path.read_bytes()
        files[path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if path.suffix == ".safetensors":
            (staging / (path.name + ".xz")).write_bytes(
                lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        else:
            (staging / path.name).write_bytes(data)
    manifest = {"name": DEMO_NAME, "files": files, "training": info}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return {p.name: p.stat().st_size for p in sorted(target.iterdir())}


# ============================================================================ main


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    log = Logger(opts.out / "train.log")
    wall_started = time.perf_counter()
    log(f"command: {' '.join(sys.argv)}")
    tokenizer = Tokenizer.from_dir(packaged_tokenizer_dir(opts.out / "tokenizer"))
    results_path = opts.out / "results.json"
    if opts.eval_only:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        saved = torch.load(opts.out / FLOAT_WEIGHTS, weights_only=True)
        full = saved["tensors"]
    else:
        full, results = train_and_export(opts, tokenizer, log, argv)
    info = results["info"]
    if not opts.skip_eval:
        problems = held_out_problems(opts.seed, opts.eval_per_kind, tuple(opts.eval_kinds.split(",")))
        kernels.reset()
        results["float32"] = evaluate_both(float_model(full), tokenizer, problems, log, "float32")
        kernels.select()
        net, checkpoint = load_model(opts.out / "checkpoint")
        results["checkpoint"] = evaluate_both(net, tokenizer, problems, log, "checkpoint")
        checkpoint.close()
        kernels.reset()
        info.update({f"{where}_{mode}": results[where][mode]["accuracy"]
                     for where in ("float32", "checkpoint") for mode in ("non-think", "think-high")})
        info["eval_questions"] = len(problems)
    info.setdefault("run_wall_seconds", round(time.perf_counter() - wall_started, 1))  # train + export + eval
    if opts.package:
        info["package_command"] = "python tools/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
        sizes = package(opts.out / "checkpoint", opts.package_dir, info)
        log(f"packaged into {opts.package_dir}: {sum(sizes.values()) / 1e6:.2f} MB {sizes}")
        results["package_bytes"] = sizes
    results["wall_seconds"] = round(time.perf_counter() - wall_started, 1)
    results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"done in {results['wall_seconds'] / 60:.1f} min; results in {results_path}")
    return 0


class Logger:
    """Prints timestamped lines and appends them to a log file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"[{datetime.now().strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def train_and_export(opts: argparse.Namespace, tokenizer: Tokenizer, log: Logger, argv: list[str] | None
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """Train, write the official checkpoint to `<out>/checkpoint` and the float32 weights next to it."""
    vocab = corpus_vocab(tokenizer)
    lookup = np.full(DEMO_ARGS.vocab_size, -1, dtype=np.int64)
    lookup[vocab] = np.arange(len(vocab))
    log(f"vocabulary: {len(vocab)} of {DEMO_ARGS.vocab_size} token ids used")
    model = init_model(len(vocab), opts.seed)
    if not opts.no_digit_init:
        digit_init(model, number_tokens(tokenizer, vocab), opts.seed)
    n_params = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    log(f"model: {n_params:,} float parameters (compact vocabulary), {opts.steps} steps of "
        f"{opts.batch}x{opts.seq} tokens, {opts.threads} thread(s)")
    packer = Packer(training_examples(opts.seed), tokenizer, lookup, opts.seq)
    training = train(model, packer, opts, DEMO_ARGS.vocab_size - len(vocab), log)
    log(f"training took {training['seconds'] / 60:.1f} min")

    full = full_float_tensors(model, vocab)
    torch.save({"tensors": full, "vocab": vocab}, opts.out / FLOAT_WEIGHTS)
    write_checkpoint(quantized_tensors(full), DEMO_ARGS, opts.out / "checkpoint", overwrite=True,
                     tokenizer_dir=opts.out / "tokenizer")
    log(f"checkpoint written to {opts.out / 'checkpoint'}")
    command = "python tools/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {"command": command, "seed": opts.seed, "steps": opts.steps, "batch": opts.batch, "seq": opts.seq,
            "threads": opts.threads, "train_seconds": round(training["seconds"], 1),
            "machine": f"{platform.machine()} {_cpu_name()}", "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    return full, {"info": info, "history": training["history"], "vocab": len(vocab)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
