"""Attach tensors to a model built on the `meta` device, by official checkpoint name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def assign_weights(model: nn.Module, get_tensor: Callable[[str], torch.Tensor],
                   device: torch.device | str | None = None) -> None:
    """Replace every parameter of `model` with `get_tensor(name)` (no copy unless `device` moves it).

    Shapes and dtypes must match the model's declaration exactly; the checkpoint
    validation guarantees that for official checkpoints, this check guards the rest.
    """
    for name, param in list(model.named_parameters()):
        tensor = get_tensor(name)
        if tensor.shape != param.shape or tensor.dtype != param.dtype:
            raise ValueError(f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                             f"model expects {tuple(param.shape)} {param.dtype}")
        if device is not None:
            tensor = tensor.to(device)
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
