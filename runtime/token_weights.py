"""Role-weighted GRPO: the per-token policy loss weighted by the token's role (the RL twin of λ).

A grpo stage's ``token_weights`` (``percepdsl.ir.TokenWeights``) is one of:

* ``RoleWeights`` — ``token_weights { perception = 2.0  reasoning = linear(1, 0.5) }``: each
  completion token's loss (clipped surrogate + β·KL) is multiplied by its role's weight at the
  step (``value_at``, the one schedule evaluator; roles not named keep 1) *before* the stage's
  aggregation (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``), whose denominators stay token counts.
  So all weights 1 is plain GRPO, and a weight of 0 removes those tokens' gradient while they
  still count in the denominators (like a masked token in SFT's ``mean`` over other roles, the
  other roles' scale does not change).
* ``NGDiffLoss`` — ``token_weights = ngdiff(perception, [reasoning, answer])``: group i's
  policy loss ``L_i`` is the aggregated loss of its roles' tokens only; the update direction is
  ``g = Σ_i g_i/‖g_i‖`` (each group's policy gradient normalised to unit norm), as NGDiff in
  SFT. ``norm_every = n`` re-measures the norms every n steps and backpropagates
  ``Σ_i L_i/‖g_i‖`` with the last norms in between.

Rollout tokens get roles by the spec's role rules through the tokenizer's offsets
(``Encoder.completion_roles``), also on malformed generations.

Logged (``logs``): ``token_share/<role>`` (the role's share of the loss tokens of the batch),
``token_weight/<role>`` (its weight at the step; fixed weights), and on measured steps
``pg_norm/<role>`` (‖∇ of the role's weighted share of the loss‖) and ``pg_share/<role>``
(its share of Σ_role ‖g_role‖): how much of the policy gradient each role carries. NGDiff
logs ``grad_norm/<group>`` (the norms it normalises by) every exact step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from percepdsl.ir import NGDiffLoss, RoleWeights, value_at

from .losses import _global_norm

EPS = 1e-12  # added to a gradient norm before dividing by it (a group without gradient stays 0)


class TokenWeighting:
    """A stage's ``token_weights`` (or None: plain GRPO) bound to the encoder's role names."""

    def __init__(self, ir: RoleWeights | NGDiffLoss | None, role_names: Sequence[str]):
        self.ir, self.role_names = ir, list(role_names)
        self.kind = "none" if ir is None else ir.kind
        unknown = [r for r in self._named() if r not in self.role_names]
        if unknown:
            raise ValueError(f"token_weights uses unknown role(s) {unknown}; roles are {self.role_names}")
        self.groups: list[list[int]] = [[self.role_names.index(r) for r in g] for g in ir.groups] if self.kind == "ngdiff" else []
        self._norms: dict[int, float] = {}  # NGDiff: the last measured group gradient norms

    def _named(self) -> list[str]:
        if self.kind == "weights":
            return list(self.ir.weights)
        if self.kind == "ngdiff":
            return [r for g in self.ir.groups for r in g]
        return []

    @property
    def normalised(self) -> bool:
        return self.kind == "ngdiff"

    def role_weights(self, step: int, total: int) -> list[float]:
        """Each role's weight at ``step`` of ``total`` (1 for roles not named, and for NGDiff)."""
        named = self.ir.weights if self.kind == "weights" else {}
        return [value_at(named[r], step, total) if r in named else 1.0 for r in self.role_names]

    def token_weights(self, role_ids: torch.Tensor, step: int, total: int) -> torch.Tensor | None:
        """[N, T] float weight of every token (None for plain GRPO and NGDiff). Tokens
        without a role (-1: padding) get 0; they are outside the loss mask anyway."""
        if self.kind != "weights":
            return None
        w = torch.tensor(self.role_weights(step, total) + [0.0], dtype=torch.float32, device=role_ids.device)
        return w[role_ids.clamp(min=-1)]  # index -1 is the appended 0

    def exact_step(self, step: int) -> bool:
        return self.ir.norm_every <= 1 or step % self.ir.norm_every == 0 or not self._norms

    def ngdiff_backward(
        self,
        parts: Sequence[torch.Tensor | None],
        params: Sequence[torch.nn.Parameter],
        backward: Callable[[torch.Tensor], None],
        step: int,
    ) -> dict[str, float]:
        """Leave ``Σ_i g_i/‖g_i‖`` in ``.grad`` (zero on entry) for the groups' losses ``parts``
        (None: a group without tokens this step, left out). Returns ``grad_norm/<group>``."""
        present = [i for i, p in enumerate(parts) if p is not None]
        params = [p for p in params if p.requires_grad]
        if not present:
            return {}
        if not self.exact_step(step) and all(i in self._norms for i in present):
            backward(sum(parts[i] / (self._norms[i] + EPS) for i in present))
            return self._logs({i: self._norms[i] for i in present})
        stored: dict[int, list[torch.Tensor | None]] = {}
        for i in present[:-1]:
            stored[i] = list(torch.autograd.grad(parts[i], params, retain_graph=True, allow_unused=True))
        last = present[-1]
        backward(parts[last])
        norms = {i: _global_norm([g for g in gs if g is not None]) for i, gs in stored.items()}
        grads = [p.grad for p in params if p.grad is not None]
        norms[last] = _global_norm(grads)
        torch._foreach_mul_(grads, 1.0 / (norms[last] + EPS))
        for i, gs in stored.items():
            for p, g in zip(params, gs):
                if g is not None and p.grad is None:
                    p.grad = torch.zeros_like(p)
            used = [(p.grad, g) for p, g in zip(params, gs) if g is not None]
            if used:
                torch._foreach_add_([a for a, _ in used], [g for _, g in used], alpha=1.0 / (norms[i] + EPS))
        self._norms = norms
        return self._logs(norms)

    def _logs(self, norms: dict[int, float]) -> dict[str, float]:
        return {f"grad_norm/{'+'.join(self.role_names[r] for r in self.groups[i])}": n for i, n in norms.items()}

    # -- diagnostics --------------------------------------------------------------------------
    def share_logs(self, role_ids: torch.Tensor, mask: torch.Tensor, step: int, total: int) -> dict[str, float]:
        """``token_share/<role>`` of the loss tokens and, for fixed weights, ``token_weight/<role>``."""
        keep = mask.bool() & (role_ids >= 0)
        counts = torch.bincount(role_ids[keep], minlength=len(self.role_names))[: len(self.role_names)].tolist()
        n = max(sum(counts), 1)
        logs = {f"token_share/{r}": c / n for r, c in zip(self.role_names, counts)}
        if self.kind == "weights":
            logs.update({f"token_weight/{r}": w for r, w in zip(self.role_names, self.role_weights(step, total))})
        return logs


def role_gradient_norms(losses: dict[str, torch.Tensor], params: Sequence[torch.nn.Parameter]) -> dict[str, float]:
    """``pg_norm/<role>``: the gradient norm of each role's share of the loss (``losses``: role
    name → the aggregated loss of its tokens only, so the shares add up to the loss), and
    ``pg_share/<role>``: its share of the sum of those norms. The graph is retained for the
    update's own backward. One extra backward per role: run it on logged steps only."""
    params = [p for p in params if p.requires_grad]
    norms: dict[str, float] = {}
    for name, loss in losses.items():
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[name] = _global_norm([g for g in gs if g is not None])
    total = sum(norms.values())
    logs = {f"pg_norm/{k}": v for k, v in norms.items()}
    if total > 0:
        logs.update({f"pg_share/{k}": v / total for k, v in norms.items()})
    return logs


__all__ = ["TokenWeighting", "role_gradient_norms"]
