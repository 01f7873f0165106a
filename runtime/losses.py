"""SFT objectives over roles: token mean, per-role mixes, and NGDiff.

The loss spec comes from the IR as a dict:

    {"kind": "token_mean"}                          # optional "roles": [...] (default: all)
    {"kind": "mix", "terms": [{"weight": W, "roles": ["perception"]},
                              {"weight": W, "roles": ["reasoning", "answer"]}]}
    {"kind": "ngdiff", "groups": [["perception"], ["reasoning", "answer"]], "auto_lr": False}

A weight ``W`` is a number or a schedule dict (``schedule_value``). A mix term is
``W * (token mean of the cross-entropy over tokens whose role is in roles)``; a term
with no tokens in the batch contributes 0. NGDiff (DESIGN §1) steps along
``g = Σ_i g_i / ‖g_i‖`` where ``g_i`` is the gradient of group i's token-mean loss.

Everything starts from ``role_token_losses``: one cross-entropy pass over the target
tokens, then per-role sums and counts by ``index_add`` — the cost is independent of the
number of roles and terms.

Logged per step (``logs``): ``loss``; per role ``loss/<role>`` (its token mean),
``token_share/<role>``, ``loss_share/<role>`` (share of the summed token losses);
per term ``lambda/<term>`` (normalised weight); ``eff_lambda`` (the normalised weight of
the perception term — for token_mean the perception token share, which is the λ plain
token averaging implicitly uses); for NGDiff also ``grad_norm/<group>`` and ``grad_cos``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Weight = float | int | Mapping[str, Any]


# --------------------------------------------------------------------------- schedules
def schedule_value(spec: Weight, step: int, total: int) -> float:
    """Value of a constant or schedule at ``step`` of ``total`` (``step`` in [0, total]).

    - number, or ``{"kind": "constant", "value"|"start": v}``
    - ``linear``:  start → end over the run
    - ``cosine``:  start → end along half a cosine
    - ``step``:    start × factor^⌊step / every⌋
    Every kind also takes ``warmup``: a linear ramp 0 → start over the
    first ``warmup`` steps (at step 0 the value is 0, as in the usual LR warmup), after
    which the schedule runs over the remaining ``total - warmup`` steps.
    """
    if isinstance(spec, (int, float)):
        return float(spec)
    kind = spec.get("kind", "constant")
    start = float(spec.get("start", spec.get("value", 1.0)))
    end = float(spec.get("end", start if kind in ("constant", "step") else 0.0))
    warmup = int(spec.get("warmup", 0))
    if kind not in ("constant", "linear", "cosine", "step"):
        raise ValueError(f"unknown schedule kind {kind!r}")
    if step < warmup:
        return start * step / warmup
    if kind == "constant":
        return start
    frac = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    every = int(spec.get("every", max(total // 4, 1)))
    return start * float(spec.get("factor", 0.5)) ** ((step - warmup) // max(every, 1))


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
    """A loss spec bound to the encoder's role names."""

    def __init__(self, spec: Mapping[str, Any], role_names: Sequence[str]):
        self.spec = dict(spec)
        self.kind = str(spec.get("kind", "token_mean"))
        self.role_names = list(role_names)
        self.auto_lr = bool(spec.get("auto_lr", False))
        self._norms: dict[int, float] = {}  # NGDiff: last measured group gradient norms
        if self.kind == "token_mean":
            roles = list(spec.get("roles") or role_names)
            self.terms: list[tuple[str, torch.Tensor, Weight]] = [("+".join(roles), self._mask(roles), 1.0)]
        elif self.kind == "mix":
            self.terms = [("+".join(t["roles"]), self._mask(t["roles"]), t.get("weight", 1.0)) for t in spec["terms"]]
        elif self.kind == "ngdiff":
            groups = [list(g) for g in spec["groups"]]
            if len(groups) < 2:
                raise ValueError("ngdiff needs at least two role groups")
            self.terms = [("+".join(g), self._mask(g), 1.0) for g in groups]
        else:
            raise ValueError(f"unknown loss kind {self.kind!r}; expected token_mean, mix or ngdiff")

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
            out.append(sums[m].sum() / n if int(n) > 0 else None)
        return out

    def loss(self, sums: torch.Tensor, counts: torch.Tensor, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to backpropagate (token_mean, mix) and the step's logs.

        For ngdiff this returns the equal-weight sum of the group losses (for logging
        and for the auto-LR line search); use ``ngdiff_backward`` for the gradient.
        """
        parts = self.term_losses(sums, counts)
        logs = self._role_logs(sums, counts)
        if self.kind == "token_mean":
            loss = parts[0] if parts[0] is not None else sums.sum() * 0.0
            # each role's implicit weight is its share of the tokens in the loss
            in_loss = self.terms[0][1].tolist()
            logs.update(self._lambda_logs([float(c) * m for c, m in zip(counts.tolist(), in_loss)], self.role_names))
        else:
            weights = [schedule_value(w, step, total) for _, _, w in self.terms]
            loss = sums.sum() * 0.0  # keeps the graph when every term is absent
            for w, part in zip(weights, parts):
                if part is not None:
                    loss = loss + (w if self.kind == "mix" else 1.0) * part
            if self.kind == "mix":
                logs.update(self._lambda_logs(weights))
        logs["loss"] = float(loss.detach())
        return loss, logs

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

        ``norm_every: n`` in the spec (default 1 = exact) recomputes the norms only every
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
            return self._ngdiff_logs({i: self._norms[i] for i in present}, eps)
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
        logs = self._ngdiff_logs(norms, eps)
        if diagnostics and len(present) == 2:  # ‖u+v‖² = 2 + 2cos for unit u, v: the cosine for one norm
            logs["grad_cos"] = (float(_global_norm(grads)) ** 2 - 2.0) / 2.0
        return logs

    def exact_step(self, step: int) -> bool:
        """Whether NGDiff measures the group gradient norms at this step (see norm_every)."""
        every = int(self.spec.get("norm_every", 1))
        return every <= 1 or step % every == 0 or not self._norms

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

    def _ngdiff_logs(self, norms: Mapping[int, float], eps: float) -> dict[str, float]:
        logs = {f"grad_norm/{self.terms[i][0]}": n for i, n in norms.items()}
        logs.update(self._lambda_logs([1.0 / (norms[i] + eps) if i in norms else 0.0 for i in range(len(self.terms))]))
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

    def _lambda_logs(self, weights: Sequence[float], names: Sequence[str] | None = None) -> dict[str, float]:
        """Normalised weights as ``lambda/<name>`` (terms by default, or roles) and
        ``eff_lambda``: the perception one (else the first)."""
        names = list(names) if names is not None else [n for n, _, _ in self.terms]
        total = sum(weights) or 1.0
        lam = {n: w / total for n, w in zip(names, weights)}
        logs = {f"lambda/{n}": v for n, v in lam.items()}
        perception = next((n for n in names if "perception" in n.split("+")), names[0])
        logs["eff_lambda"] = lam[perception]
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
