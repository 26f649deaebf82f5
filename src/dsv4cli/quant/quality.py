"""Quality of a quantized checkpoint against its original: next-token distributions on a text.

Both models read the same token windows (fresh cache per window, every position scored);
per position p = softmax(original logits), q = softmax(quantized logits):

* KL(p || q) = sum p (log p - log q), mean (and max) over positions;
* top-1 agreement: fraction of positions where both argmaxes agree;
* perplexity of each model on the text: exp(mean negative log-likelihood of the next token).

The text is tokenized with the checkpoint's tokenizer (the packaged V4 tokenizer when the
checkpoint has none); on models whose vocabulary is smaller than the tokenizer's (the tiny test
models) ids are folded into range (id mod vocab_size) and the report says so. No printing here.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from dsv4cli.errors import UsageError

DEFAULT_TEXT = "eval_text.txt"
DEFAULT_SEQ_LEN = 256
DEFAULT_MAX_TOKENS = 1024


@dataclass
class QualityReport:
    """Divergence of the quantized model from the original on `tokens` scored positions."""

    kl_mean: float
    kl_max: float
    top1_agreement: float
    ppl_original: float
    ppl_quantized: float
    tokens: int
    windows: int
    folded_ids: bool
    text: str

    def to_json(self) -> dict:
        return asdict(self)


def default_text() -> str:
    """The packaged evaluation text (a few paragraphs of English prose)."""
    return (resources.files("dsv4cli") / "data" / DEFAULT_TEXT).read_text(encoding="utf-8")


def text_tokens(text: str, model_dir: str | Path, vocab_size: int) -> tuple[torch.Tensor, bool]:
    """Token ids [T] of `text` with the checkpoint's (else the packaged) tokenizer; ids past the
    model's vocabulary folded into range. Returns (ids, whether any id was folded)."""
    from dsv4cli.chat.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        ids = Tokenizer.from_dir(model_dir).encode(text)
    else:
        from dsv4cli.demo.model import packaged_tokenizer_dir

        with tempfile.TemporaryDirectory() as tmp:
            ids = Tokenizer.from_dir(packaged_tokenizer_dir(Path(tmp))).encode(text)
    t = torch.tensor(ids, dtype=torch.long)
    folded = bool((t >= vocab_size).any())
    return t % vocab_size, folded


def compare_logits(orig: torch.Tensor, quant: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position: (KL(p||q), top-1 agreement, NLL original, NLL quantized) for logits [S, V] and
    next tokens targets [S-1] (the last position has no target: its NLLs are not returned)."""
    lp, lq = torch.log_softmax(orig.float(), -1), torch.log_softmax(quant.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0)
    agree = (lp.argmax(-1) == lq.argmax(-1)).float()
    nll_p = -lp[:-1].gather(-1, targets[:, None])[:, 0]
    nll_q = -lq[:-1].gather(-1, targets[:, None])[:, 0]
    return kl, agree, nll_p, nll_q


@torch.no_grad()
def evaluate_quality(original: str | Path, quantized: str | Path, text: str | None = None, *,
                     seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int = DEFAULT_MAX_TOKENS,
                     text_name: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> QualityReport:
    """Compare `quantized` against `original` (checkpoint directories) on `text` (default: the
    packaged sample), at most `max_tokens` tokens in windows of `seq_len`. `progress(done, total)`:
    tokens compared so far, after each window (no printing here)."""
    from dsv4cli.runtime.open import open_model

    if seq_len < 2 or max_tokens < 2:
        raise UsageError("the evaluation needs windows and texts of at least 2 tokens")
    text = default_text() if text is None else text
    with (open_model(str(original), tokenizer=False) as opened_p,
          open_model(str(quantized), tokenizer=False) as opened_q):
        model_p, model_q = opened_p.model, opened_q.model
        if model_p.args.vocab_size != model_q.args.vocab_size:
            raise UsageError("the two checkpoints have different vocabularies",
                             "compare a quantized checkpoint with its own source")
        ids, folded = text_tokens(text, original, model_p.args.vocab_size)
        ids = ids[:max_tokens]
        if ids.numel() < 2:
            raise UsageError("the evaluation text is shorter than 2 tokens", "pass a longer {opt:eval_text}")
        kls, agrees, nlls_p, nlls_q, windows = [], [], [], [], 0
        for start in range(0, ids.numel(), seq_len):
            window = ids[start:start + seq_len]
            if window.numel() < 2:
                break
            lp = model_p.full_logits(window[None])[0]
            lq = model_q.full_logits(window[None])[0]
            kl, agree, nll_p, nll_q = compare_logits(lp, lq, window[1:])
            kls.append(kl)
            agrees.append(agree)
            nlls_p.append(nll_p)
            nlls_q.append(nll_q)
            windows += 1
            if progress is not None:
                progress(min(start + seq_len, ids.numel()), ids.numel())
    kl_all = torch.cat(kls)
    return QualityReport(kl_mean=float(kl_all.mean()), kl_max=float(kl_all.max()),
                         top1_agreement=float(torch.cat(agrees).mean()),
                         ppl_original=math.exp(float(torch.cat(nlls_p).mean())),
                         ppl_quantized=math.exp(float(torch.cat(nlls_q).mean())),
                         tokens=int(kl_all.numel()), windows=windows, folded_ids=folded,
                         text=text_name or "packaged sample")
