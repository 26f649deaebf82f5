"""Importance matrix ("imatrix") for `dsv4 quantize`: how much each input channel of each
routed-expert linear matters, measured by running calibration text through the model.

For routed expert e of layer l the imatrix holds the mean square of the inputs that expert saw
over the calibration tokens routed to it: `layers.l.ffn.experts.e.w1` (the MoE input, shared
by w1 and w3) and `layers.l.ffn.experts.e.w2` (the routing-weighted SwiGLU hidden state that
w2 reads). The squared error of a quantized weight row weighted by it estimates the squared
error of that output (E[(dw . x)^2] with independent inputs), which is what the quantizer's
scale search minimises. Experts that saw no token get no entry (plain MSE for them).

`boost_layers` turns the imatrix into a per-layer recipe: the layers whose experts would carry
the largest importance-weighted quantization error move one format up (int2 -> int3 -> fp4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv4cli import kernels
from dsv4cli.errors import CheckpointError
from dsv4cli.io.safetensors_file import SafetensorsFile
from dsv4cli.io.writer import write_safetensors
from dsv4cli.kernels import ref


#: one format up, for the layers `boost_layers` picks
@dataclass
class Imatrix:
    """Per-linear mean squared inputs (`sums / counts`), keyed by linear name."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, x: torch.Tensor) -> None:
        """Accumulate the squares of inputs x [N, in] of linear `name`."""
        sq = x.detach().float().pow(2).sum(0).cpu()
        if name in self.sums:
            self.sums[name] += sq
        else:
            self.sums[name] = sq
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def importance(self, linear: str) -> torch.Tensor | None:
        """Mean square input of `linear` (w3 shares w1's inputs); None when it saw no token."""
        if linear.endswith(".w3"):
            linear = linear[:-3] + ".w1"
        if linear not in self.sums or not self.counts.get(linear):
            return None
        return self.sums[linear] / self.counts[linear]

    def tokens_seen(self, linear: str) -> int:
        if linear.endswith(".w3"):
            linear = linear[:-3] + ".w1"
        return self.counts.get(linear, 0)

    def digest(self) -> str:
        """SHA-256 of the importance vectors and counts (identifies the imatrix a quantization used)."""
        h = hashlib.sha256()
        for name in sorted(self.sums):
            h.update(f"{name}:{self.counts[name]}:".encode())
            h.update(self.sums[name].float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        """As safetensors: one F32 tensor per linear, token counts in the metadata."""
        names = sorted(self.sums)
        write_safetensors(path, [(n, self.sums[n] / max(self.counts[n], 1)) for n in names],
                          metadata={n: str(self.counts[n]) for n in names})

    @classmethod
    def load(cls, path: str | Path) -> Imatrix:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no imatrix file at {path}", "pass the imatrix.safetensors a calibration wrote")
        out = cls()
        with SafetensorsFile(path) as f:
            for name in f.names():
                try:
                    count = int(f.metadata.get(name, "1"))
                except ValueError:
                    raise CheckpointError(f"{path}: bad token count for {name}", "re-run the calibration") from None
                mean = f.get(name).float().clone()
                if mean.dim() != 1:
                    raise CheckpointError(f"{path}: {name} is not a vector", "re-run the calibration")
                out.sums[name], out.counts[name] = mean * count, count
        if not out.sums:
            raise CheckpointError(f"{path} holds no importance vectors", "re-run the calibration")
        return out


@torch.no_grad()
def collect_imatrix(model, token_ids: torch.Tensor, seq_len: int = 512) -> Imatrix:
    """Run `token_ids` [T] through `model` (a loaded `Transformer`) in fresh windows of `seq_len`
    tokens, recording every routed expert's inputs. The MoE layers' `runner` hook is borrowed for
    the run and restored after."""
    imatrix = Imatrix()
    previous = model.use_routed_experts(None)
    model.use_routed_experts(_Recorder(model, imatrix, previous))
    try:
        for start in range(0, token_ids.numel(), seq_len):
            window = token_ids[start:start + seq_len]
            if window.numel():
                model.full_logits(window[None].to(model.device))
    finally:
        model.use_routed_experts(previous)
    return imatrix


class _Recorder:
    """A `RoutedExperts` runner that adds every routed expert's inputs to `imatrix`, then runs the experts
    as `inner` (the runner it replaced) or the layer's own kernel would."""

    def __init__(self, model, imatrix: Imatrix, inner):
        self.model, self.imatrix, self.inner = model, imatrix, inner

    def run(self, layer_id: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        moe, prefix, imatrix = self.model.layers[layer_id].ffn, f"layers.{layer_id}.ffn", self.imatrix
        table = moe.expert_table()
        limit, act_quant = moe.experts[0].swiglu_limit, moe.experts[0].w1.act_quant
        for e in indices.flatten().unique().tolist():
            token, slot = torch.where(indices == e)
            xe = x[token]
            w1, s1, _, _, w3, s3 = table.experts[e]
            gate = ref.linear(xe, w1, s1, act_quant).float()
            up = ref.linear(xe, w3, s3, act_quant).float()
            if limit > 0:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            hidden = torch.nn.functional.silu(gate) * up * weights[token, slot, None]
            imatrix.add(f"{prefix}.experts.{e}.w1", xe)
            imatrix.add(f"{prefix}.experts.{e}.w2", hidden)
        if self.inner is not None:
            return self.inner.run(layer_id, x, weights, indices)
        return kernels.moe_experts(x, weights, indices, table, limit, act_quant)
