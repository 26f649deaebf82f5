"""Build a runnable `Transformer` from a checkpoint directory or from in-memory tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsv4cli.io.checkpoint import Checkpoint
from dsv4cli.io.dsv4_layout import Dsv4Checkpoint, open_checkpoint
from dsv4cli.model.args import ModelArgs
from dsv4cli.model.layers import Numerics
from dsv4cli.model.transformer import Transformer
from dsv4cli.model.weights import assign_weights


def build_model(args: ModelArgs, get_tensor: Callable[[str], torch.Tensor], numerics: Numerics | None = None,
                with_mtp: bool = True, device: torch.device | str | None = None) -> Transformer:
    """A model whose parameters are `get_tensor(name)` (zero-copy when on the same device)."""
    with torch.device("meta"):
        model = Transformer(args, numerics, with_mtp=with_mtp)
    assign_weights(model, get_tensor, device=device)
    return model.eval()


def load_model(model_dir: str | Path, numerics: Numerics | None = None, with_mtp: bool = True,
               device: torch.device | str | None = None) -> tuple[Transformer, Checkpoint | Dsv4Checkpoint]:
    """Open and validate the checkpoint, then map its tensors into a model.

    On the CPU the weights stay in the memory-mapped files (nothing is read until used);
    the returned `Checkpoint` owns those mappings and must outlive the model. Reads the
    official layout and the dsv4 layout (`dsv4 convert --to dsv4`) alike.
    """
    checkpoint = open_checkpoint(model_dir)
    try:
        model = build_model(checkpoint.args, checkpoint.get, numerics, with_mtp and checkpoint.has_mtp, device)
    except BaseException:
        checkpoint.close()
        raise
    return model, checkpoint
