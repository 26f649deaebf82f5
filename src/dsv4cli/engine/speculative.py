"""Speculative decoding with the checkpoint's MTP layer (spec §2.10): the drafts and their verification.

The MTP layer predicts the token after next from the trunk's streams and the next token; chained on its
own streams it drafts further. The engine feeds the pending token and k drafts to the trunk in one
forward and keeps what this module accepts:

* greedy (temperature 0): a draft is kept while it equals the trunk's argmax at its position, so the
  output is the non-speculative greedy output;
* sampled: speculative sampling (Leviathan et al. 2023, Chen et al. 2023). A draft d ~ q is kept with
  probability min(1, p(d) / q(d)); the first rejected one is replaced by a sample of max(p - q, 0)
  (normalized), and when all k are kept a bonus token is sampled from the last p. p and q are the
  trunk's and the drafter's distributions after the same temperature / top-k / top-p / min-p, so the
  output follows the non-speculative distribution exactly.
"""

from __future__ import annotations

import torch

from dsv4cli.engine.sampling import SamplingParams, filter_logits

#: most draft tokens per step (the MTP layer is chained on its own streams beyond the first)
MAX_DRAFT = 3
#: draft tokens per step when neither --draft nor --no-draft is given, for a model that runs wholly on the
#: CPU with its MTP layer (docs/performance.md, "MTP speculative decoding": the rule and its measurements)
AUTO_DRAFT = 1


def auto_draft(has_mtp: bool, cpu_only: bool) -> int:
    """The default draft length: AUTO_DRAFT where drafting pays (every weight read from host memory, where a
    2-token verify costs little more than a plain step), else 0 (on a GPU it is not measured yet; with routed
    experts on the CPU behind a GPU each verified token reads more distinct experts)."""
    return AUTO_DRAFT if has_mtp and cpu_only else 0


class DraftSampler:
    """Draws drafts and decides which survive verification, for one generation's sampling settings."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.greedy = params.temperature == 0
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed % 2**64)
        else:
            self.generator.seed()

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution [V] of `logits` [V] under these settings."""
        return filter_logits(logits.cpu(), self.params).softmax(-1)

    def _draw(self, probs: torch.Tensor) -> int:
        race = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return int((probs / race).argmax())

    def draft(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A draft token from the drafter's logits [V], with its distribution q (None when greedy)."""
        if self.greedy:
            return int(logits.argmax()), None
        q = self.probs(logits)
        return self._draw(q), q

    def verify(self, drafts: list[int], draft_probs: list[torch.Tensor | None], target_logits: torch.Tensor
               ) -> tuple[int, int]:
        """(drafts kept, the token after them) given the trunk's logits [len(drafts) + 1, V]: row i is
        its prediction for the position of drafts[i] (the last row: for the token after all of them)."""
        for i, token in enumerate(drafts):
            if self.greedy:
                best = int(target_logits[i].argmax())
                if best != token:
                    return i, best
                continue
            p, q = self.probs(target_logits[i]), draft_probs[i]
            ratio = float(p[token]) / float(q[token])  # q[token] > 0: the draft was drawn from q
            if float(torch.rand((), generator=self.generator)) < ratio:
                continue
            residual = (p - q).clamp(min=0)
            return i, self._draw(residual if float(residual.sum()) > 0 else p)
        last = target_logits[len(drafts)]
        return len(drafts), int(last.argmax()) if self.greedy else self._draw(self.probs(last))
