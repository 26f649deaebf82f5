"""Manifold-constrained hyper-connections (mHC): the 4-wide residual stream (spec §2.2, §2.9)."""

from __future__ import annotations

import torch

from dsv4cli import kernels
from dsv4cli.model.args import ModelArgs
from dsv4cli.model.layers import rms_normalize


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, args: ModelArgs
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse the streams x [B,S,n,D] into one block input [B,S,D].

    Returns (y, post [B,S,n], comb [B,S,n,n]); all mixing maths in float32.
    """
    xf = x.flatten(2).float()
    mixes = rms_normalize(xf, args.norm_eps) @ fn.float().T
    pre, post, comb = kernels.hc_split_sinkhorn(mixes, scale, base, args.hc_mult, args.hc_sinkhorn_iters,
                                                args.hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(2)
    return y.to(x.dtype), post, comb


def hc_post(y: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand the block output y [B,S,D] back to n streams: out[k] = post[k] y + sum_j comb[j,k] res[j]."""
    mixed = torch.einsum("bsjk,bsjd->bskd", comb, residual.float())
    return (post.unsqueeze(-1) * y.float().unsqueeze(-2) + mixed).to(y.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, args: ModelArgs
            ) -> torch.Tensor:
    """Final collapse of the streams before the output norm: sigmoid weights, no Sinkhorn."""
    mixes = rms_normalize(x.flatten(2), args.norm_eps) @ fn.float().T
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + args.hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(2).to(x.dtype)
