"""Triton mHC split + Sinkhorn (spec §2.2 step 3, §6.1 `hc_split_sinkhorn`).

Twin of `ref.hc_split_sinkhorn`: from the mixing logits [.., (2+n)*n] computes pre = sigmoid(.)+eps,
post = 2*sigmoid(.), and comb (row softmax + eps, column normalisation, then `iters - 1` row/column
normalisation rounds), all float32. One program handles BLOCK_T tokens, each an independent n x n
problem held in registers (n = hc_mult, 4 in V4; padded to a power of two, padding kept at 0).
"""

from __future__ import annotations

import torch

from dsv4cli.kernels import ref
from dsv4cli.kernels.triton_quant import INTERPRET, jit, runs_here, tl, triton


@jit
def _hc_split_sinkhorn_kernel(mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, stride_mt, iters, eps,
                              N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, NP)
    t_ok, j_ok = t < T, j < N
    rows = mix_ptr + t.to(tl.int64)[:, None] * stride_mt
    m2 = t_ok[:, None] & j_ok[None, :]
    s0, s1, s2 = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    pre_logit = tl.load(rows + j[None, :], mask=m2, other=0.0) * s0 + tl.load(base_ptr + j, mask=j_ok, other=0.0)
    post_logit = (tl.load(rows + N + j[None, :], mask=m2, other=0.0) * s1
                  + tl.load(base_ptr + N + j, mask=j_ok, other=0.0))
    out2 = t.to(tl.int64)[:, None] * N + j[None, :]
    tl.store(pre_ptr + out2, tl.sigmoid(pre_logit) + eps, mask=m2)
    tl.store(post_ptr + out2, 2.0 * tl.sigmoid(post_logit), mask=m2)

    jj, kk = j[:, None], j[None, :]  # comb[row j, col k] = mixes[2N + j*N + k]
    cell_ok = (jj < N) & (kk < N)
    m3 = t_ok[:, None, None] & cell_ok[None, :, :]
    cell = 2 * N + jj * N + kk
    logit = (tl.load(rows[:, :, None] + cell[None, :, :], mask=m3, other=0.0) * s2
             + tl.load(base_ptr + cell, mask=cell_ok, other=0.0)[None, :, :])
    logit = tl.where((kk < N)[None, :, :], logit, float("-inf"))  # padded rows stay finite
    e = tl.exp(logit - tl.max(logit, axis=2)[:, :, None])
    comb = e / tl.sum(e, axis=2)[:, :, None] + eps
    comb = tl.where(cell_ok[None, :, :], comb, 0.0)
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + eps)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)
    tl.store(comb_ptr + t.to(tl.int64)[:, None, None] * (N * N) + (jj * N + kk)[None, :, :], comb, mask=m3)


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registry op (twin of `ref.hc_split_sinkhorn`): mixes [.., (2+n)*n] -> pre [.., n], post [.., n],
    comb [.., n, n], float32."""
    if not runs_here(mixes):
        return ref.hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)
    n = hc_mult
    lead = mixes.shape[:-1]
    m2 = mixes.reshape(-1, mixes.shape[-1]).float()
    m2 = m2 if m2.stride(-1) == 1 else m2.contiguous()
    t = m2.shape[0]
    pre = torch.empty((t, n), dtype=torch.float32, device=mixes.device)
    post = torch.empty((t, n), dtype=torch.float32, device=mixes.device)
    comb = torch.empty((t, n, n), dtype=torch.float32, device=mixes.device)
    if t:
        block_t = 16 if INTERPRET else 32
        _hc_split_sinkhorn_kernel[(triton.cdiv(t, block_t),)](
            m2, scale.float().contiguous(), base.float().contiguous(), pre, post, comb, t, m2.stride(0),
            int(iters), float(eps), N=n, NP=triton.next_power_of_2(n), BLOCK_T=block_t,
        )
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)
