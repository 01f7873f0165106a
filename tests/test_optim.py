"""The AdamW both stage kinds build: trainable parameters only, matrices decayed, 1-D not."""

from __future__ import annotations

import torch

from percepdsl_runtime.optim import adamw


def test_adamw_decays_trainable_matrices_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].requires_grad_(False)  # frozen: in no group
    opt = adamw(model, lr=0.01, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    decay, plain = opt.param_groups
    assert [p is model[0].weight for p in decay["params"]] == [True] and decay["weight_decay"] == 0.1
    assert {id(p) for p in plain["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert plain["weight_decay"] == 0.0
    assert all(g["lr"] == 0.01 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)


def test_adamw_step_leaves_undecayed_parameters_alone_without_gradient() -> None:
    model = torch.nn.Linear(2, 2)
    opt = adamw(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.999), eps=1e-8)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.weight, w * (1 - 0.1 * 0.5))  # decoupled decay: θ ← θ(1 − lr·λ)
    assert torch.equal(model.bias, b)
