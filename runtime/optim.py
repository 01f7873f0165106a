"""The optimiser both stage kinds train with: AdamW over the trainable parameters."""

from __future__ import annotations

from typing import Any

import torch


def adamw(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters in two groups: matrices (2-D and up) decay at
    ``weight_decay``; biases and norm gains (1-D) do not (the nanoGPT convention). The settings
    come from the stage (``weight_decay``, ``adam_beta1``/``adam_beta2``, ``adam_eps``: the
    catalogue's defaults), so this has none of its own.

    ``fused``: one kernel per step instead of a loop over tensors, where this torch build and
    device have it; otherwise the default implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
