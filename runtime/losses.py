"""SFT objectives over roles: token mean, per-role mixes, and NGDiff.

The loss is the IR's typed ``Loss`` (``percepdsl.ir``): ``TokenMeanLoss``, ``MixLoss``
(terms of a weight and roles) or ``NGDiffLoss`` (role groups, ``auto_lr``). A weight is a
number or a schedule, evaluated at each step by ``percepdsl.ir.value_at`` (the one schedule
evaluator, absolute values). A mix term is ``W * (token mean of the cross-entropy over tokens
whose role is in roles)``; a term with no tokens in the batch contributes 0. NGDiff
(normalised gradient difference) steps along ``g = Σ_i g_i / ‖g_i‖`` where ``g_i`` is the
gradient of group i's token-mean loss: every group contributes a direction of the same
length, whatever the size of its loss and gradient.

Everything starts from ``role_token_losses``: one cross-entropy pass over the target
tokens, then per-role sums and counts by ``index_add`` — the cost is independent of the
number of roles and terms.

Logged per step (``logs``): ``loss``; per role ``loss/<role>`` (its token mean),
``token_share/<role>``, ``loss_share/<role>`` (share of the summed token losses) and
``weight_share/<role>``; per term of a mix or NGDiff ``lambda/<term>`` (its weight over the
sum of the weights); ``eff_lambda``; for NGDiff also ``grad_norm/<group>`` and ``grad_cos``.

**Effective λ.** The loss puts a weight on every target token: a term of weight ``w`` over
``n`` tokens gives each of them ``w / n`` (NGDiff: ``w = 1/‖g_i‖``). ``weight_share/<role>``
is the share of the total token weight that falls on the role's tokens, and ``eff_lambda`` is
``weight_share/perception``: λ for ``λ·mean(perception) + (1−λ)·mean(reasoning, answer)``,
the perception token share for ``token_mean`` (the λ plain token averaging implicitly uses),
0 for a loss without perception, ``(1/‖g_p‖)/(1/‖g_p‖ + 1/‖g_r‖)`` for NGDiff. It is not
logged on a step whose weights are all 0, nor without a role named ``perception``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from percepdsl.ir import Loss, Value, value_at

PERCEPTION = "perception"  # the role whose weight share is logged as `eff_lambda`


# --------------------------------------------------------------------------- per-role losses
def role_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, role_ids: torch.Tensor, n_roles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-role sum of token cross-entropies and per-role token counts.

    ``logits[..., V]`` must already be aligned with ``labels[...]`` (position i predicts
    ``labels[i]``). Tokens with ``role_ids < 0`` or ``labels == -100`` are ignored.
    One cross-entropy over all tokens, then one ``index_add`` into ``n_roles`` bins.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels, role_ids = labels.reshape(-1), role_ids.reshape(-1)
    keep = (role_ids >= 0) & (labels != -100)
    if not bool(keep.all()):
        logits, labels, role_ids = logits[keep], labels[keep], role_ids[keep]
    # float32 CE: log-softmax in bf16 loses ~3 significant digits of the loss
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    sums = torch.zeros(n_roles, dtype=ce.dtype, device=ce.device).index_add(0, role_ids, ce)
    counts = torch.bincount(role_ids, minlength=n_roles)[:n_roles]
    return sums, counts


# --------------------------------------------------------------------------- objective
class Objective:
    """A typed loss (``percepdsl.ir.Loss``) bound to the encoder's role names. NGDiff's
    ``norm_every`` (1 = exact) is read by ``exact_step``; see ``ngdiff_backward``."""

    def __init__(self, loss: Loss, role_names: Sequence[str]):
        self.ir = loss
        self.kind = loss.kind
        self.role_names = list(role_names)
        self.auto_lr = loss.kind == "ngdiff" and loss.auto_lr
        self.norm_every = loss.norm_every if loss.kind == "ngdiff" else 1
        self._norms: dict[int, float] = {}  # NGDiff: last measured group gradient norms
        if loss.kind == "token_mean":
            self.terms: list[tuple[str, torch.Tensor, Value]] = [("+".join(self.role_names), self._mask(self.role_names), 1.0)]
        elif loss.kind == "mix":
            self.terms = [("+".join(t.roles), self._mask(t.roles), t.weight) for t in loss.terms]
        else:
            self.terms = [("+".join(g), self._mask(g), 1.0) for g in loss.groups]

    def _mask(self, roles: Iterable[str]) -> torch.Tensor:
        roles = list(roles)
        unknown = [r for r in roles if r not in self.role_names]
        if unknown:
            raise ValueError(f"loss uses unknown role(s) {unknown}; roles are {self.role_names}")
        return torch.tensor([r in roles for r in self.role_names])

    @property
    def manual_backward(self) -> bool:
        """True when the objective performs its own backward (NGDiff)."""
        return self.kind == "ngdiff"

    def term_losses(self, sums: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor | None]:
        """Token-mean loss of each term (None where the batch has no token of its roles)."""
        out: list[torch.Tensor | None] = []
        for _, mask, _ in self.terms:
            m = mask.to(sums.device)
            n = counts[m].sum()
            out.append(sums[m].sum() / n if float(n) > 0 else None)
        return out

    def loss(self, sums: torch.Tensor, counts: torch.Tensor, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to backpropagate (token_mean, mix) and the step's logs.

        For ngdiff this returns the equal-weight sum of the group losses (for logging
        and for the auto-LR line search); use ``ngdiff_backward`` for the gradient.
        """
        parts = self.term_losses(sums, counts)
        logs = self._role_logs(sums, counts)
        weights = self.weights(step, total)
        loss = sums.sum() * 0.0  # keeps the graph when every term is absent
        for w, part in zip(weights, parts):
            if part is not None:
                loss = loss + w * part
        if self.kind == "mix":
            logs.update(self._lambda_logs(weights))
        if self.kind != "ngdiff":  # NGDiff's effective weights come from its gradient norms
            logs.update(self._weight_logs(weights, counts))
        logs["loss"] = float(loss.detach())
        return loss, logs

    def weights(self, step: int, total: int) -> list[float]:
        """Each term's weight at ``step`` of ``total`` (1 for token mean and NGDiff's groups)."""
        return [value_at(w, step, total) for _, _, w in self.terms]

    def ngdiff_backward(
        self,
        sums: torch.Tensor,
        counts: torch.Tensor,
        params: Sequence[torch.nn.Parameter],
        backward: Callable[[torch.Tensor], None] | None = None,
        step: int = 0,
        all_reduce: Callable[[list[torch.Tensor]], None] | None = None,
        pre_grads: Mapping[int, Sequence[torch.Tensor | None]] | None = None,
        diagnostics: bool = True,
        eps: float = 1e-12,
    ) -> dict[str, float]:
        """Leave ``g = Σ_i g_i/‖g_i‖`` in ``p.grad`` (grads must be zero/None on entry).

        ``pre_grads[i]`` is group i's gradient when the caller already has it (the SFT
        module computes a group whose targets sit in a short prefix — perception — from a
        forward over that prefix only: with causal attention its logits are the same).
        The other groups come from ``sums``/``counts``: all but the last through
        ``torch.autograd.grad`` (graph retained), the last through ``backward`` (default
        ``Tensor.backward``; Lightning passes ``manual_backward``), which leaves its
        gradient in ``.grad``; then ``.grad`` is rescaled and the stored gradients added in
        place (foreach ops). Extra memory: one gradient copy per extra group.

        ``ngdiff(..., norm_every = n)`` in the spec (default 1 = exact) recomputes the norms only every
        n steps; in between it backpropagates ``Σ_i L_i/‖g_i‖`` with the last norms in one
        pass — an approximation (norms drift slowly) that brings the cost near a plain step.
        ``all_reduce`` averages the autograd.grad gradients across data-parallel ranks;
        ``diagnostics=False`` skips the cosine (one more pass over the gradients).
        """
        backward = backward or (lambda t: t.backward())
        pre = dict(pre_grads or {})
        parts = self.term_losses(sums, counts)
        present = [i for i, p in enumerate(parts) if p is not None or i in pre]
        params = [p for p in params if p.requires_grad]
        if not present:
            return {}
        if not self.exact_step(step) and not pre and all(i in self._norms for i in present):
            backward(sum(parts[i] / (self._norms[i] + eps) for i in present))
            return self._ngdiff_logs({i: self._norms[i] for i in present}, counts, eps)
        rest = [i for i in present if i not in pre]  # groups still to differentiate here
        stored: dict[int, list[torch.Tensor | None]] = {i: list(g) for i, g in pre.items()}
        for i in rest[:-1]:
            stored[i] = list(torch.autograd.grad(parts[i], params, retain_graph=True, allow_unused=True))
            if all_reduce is not None:  # data parallel: every rank must normalise the same gradient
                all_reduce([g for g in stored[i] if g is not None])
        last = rest[-1] if rest else None
        if last is not None:
            backward(parts[last])
        norms = {i: _global_norm([g for g in stored[i] if g is not None]) for i in stored}
        if last is not None:
            norms[last] = _global_norm([p.grad for p in params if p.grad is not None])
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / (norms[last] + eps))
        self._norms = norms
        for i, grads_i in stored.items():
            for p, g in zip(params, grads_i):  # a group may reach a parameter the others do not
                if g is not None and p.grad is None:
                    p.grad = torch.zeros_like(p)
            used = [(p.grad, g) for p, g in zip(params, grads_i) if g is not None]
            torch._foreach_add_([a for a, _ in used], [g for _, g in used], alpha=1.0 / (norms[i] + eps))
        grads = [p.grad for p in params if p.grad is not None]  # parameters no group reaches keep None
        logs = self._ngdiff_logs(norms, counts, eps)
        if diagnostics and len(present) == 2:  # ‖u+v‖² = 2 + 2cos for unit u, v: the cosine for one norm
            logs["grad_cos"] = (float(_global_norm(grads)) ** 2 - 2.0) / 2.0
        return logs

    def exact_step(self, step: int) -> bool:
        """Whether NGDiff measures the group gradient norms at this step (see norm_every)."""
        return self.norm_every <= 1 or step % self.norm_every == 0 or not self._norms

    def prefix_ends(self, labels: torch.Tensor, role_ids: torch.Tensor) -> list[int]:
        """Per group: the length of the shortest batch prefix that holds all its targets
        (0 if it has none), for ``pre_grads``. ``labels``/``role_ids``: [B, T]."""
        T = labels.shape[1]
        pos = torch.arange(T, device=labels.device).expand_as(labels)
        out = []
        for _, mask, _ in self.terms:
            mine = mask.to(role_ids.device)[role_ids.clamp(min=0)] & (role_ids >= 0)
            out.append(int(pos[mine].max()) + 1 if bool(mine.any()) else 0)
        return out

    def _ngdiff_logs(self, norms: Mapping[int, float], counts: torch.Tensor, eps: float) -> dict[str, float]:
        logs = {f"grad_norm/{self.terms[i][0]}": n for i, n in norms.items()}
        weights = [1.0 / (norms[i] + eps) if i in norms else 0.0 for i in range(len(self.terms))]
        logs.update(self._lambda_logs(weights))
        logs.update(self._weight_logs(weights, counts))
        return logs

    # -- logging helpers -----------------------------------------------------------------
    def _role_logs(self, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        s, c = sums.detach().tolist(), counts.tolist()
        total_n, total_s = max(sum(c), 1), sum(s) or 1.0
        logs: dict[str, float] = {}
        for name, si, ci in zip(self.role_names, s, c):
            if ci:
                logs[f"loss/{name}"] = si / ci
            logs[f"token_share/{name}"] = ci / total_n
            logs[f"loss_share/{name}"] = si / total_s
        return logs

    def _lambda_logs(self, weights: Sequence[float]) -> dict[str, float]:
        """Each term's weight over the sum of the weights, as ``lambda/<term>``."""
        total = sum(weights) or 1.0
        return {f"lambda/{n}": w / total for (n, _, _), w in zip(self.terms, weights)}

    def role_weights(self, weights: Sequence[float], counts: torch.Tensor) -> list[float]:
        """The total weight the loss puts on each role's tokens: a term of weight w over n
        tokens gives each w/n, so role r gets Σ_terms w · count_r / n (terms without tokens
        in the batch give nothing)."""
        c = [float(x) for x in counts.tolist()]
        out = [0.0] * len(self.role_names)
        for (_, mask, _), w in zip(self.terms, weights):
            roles = [r for r, m in enumerate(mask.tolist()) if m]
            n = sum(c[r] for r in roles)
            for r in roles:
                out[r] += w * c[r] / n if n else 0.0
        return out

    def _weight_logs(self, weights: Sequence[float], counts: torch.Tensor) -> dict[str, float]:
        """``weight_share/<role>`` and ``eff_lambda`` (see the module doc); nothing when the
        loss puts no weight on any token this step."""
        per_role = self.role_weights(weights, counts)
        total = sum(per_role)
        if total <= 0:
            return {}
        logs = {f"weight_share/{n}": w / total for n, w in zip(self.role_names, per_role)}
        if PERCEPTION in self.role_names:
            logs["eff_lambda"] = logs[f"weight_share/{PERCEPTION}"]
        return logs


def _global_norm(tensors: list[torch.Tensor]) -> float:
    """‖concat(tensors)‖₂ with one fused foreach norm (computed in float32)."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


# --------------------------------------------------------------------------- auto LR
def quadratic_step(l0: float, l1: float, l2: float, t_min: float = 0.1, t_max: float = 4.0) -> float:
    """Step multiplier t* minimising the parabola through (0, l0), (1, l1), (2, l2).

    Used by NGDiff's automatic learning rate: the losses are measured along the
    optimiser's update Δ at θ, θ+Δ, θ+2Δ (two extra forwards, no backward). A non-convex
    fit (curvature ≤ 0) means "go further": t_max. Clamped to [t_min, t_max].
    """
    c = (l2 - 2.0 * l1 + l0) / 2.0
    b = l1 - l0 - c
    if c <= 0:  # no minimum ahead: go as far as allowed if the line descends, else as short
        return t_max if min(l1, l2) < l0 else t_min
    return float(min(max(-b / (2.0 * c), t_min), t_max))
