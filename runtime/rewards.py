"""GRPO rewards: the built-in reward terms, the reward algebra, and reward diagnostics.

A reward term is a function of one *group* — the G completions sampled for one prompt —
returning one value per completion::

    def term(group: RolloutGroup, **params) -> Sequence[float]      # len(result) == len(group)

``group.completions`` are the generated texts, ``group.scores`` the task's verdicts on each
(``Scores``: format_ok, outcome, perception_exact, perception_partial, reasoning, slot_errors;
computed once per completion and shared by every term and the diagnostics),
``group.perceptions`` each completion's parsed perception (hashable, ``None`` if it does not
parse), ``group.sample`` the task ``Sample`` (query, image, instance, p*), ``group.task`` the
task. Terms see the whole group so that group-relative rewards (``self_consistency``) are
ordinary terms; a per-completion reward just loops. Plugin terms (catalogue ``impl``,
resolved by ``percepdsl_runtime.plugins.resolve``) have the same signature; parameters come
from the spec as keyword arguments, so accept ``**_`` for forward compatibility.

``compile_reward(ir)`` turns a ``RewardIR`` tree (term / const / sum / product / scale /
gate) into a ``Reward``: called on a group at optimiser step ``step`` of ``total`` it evaluates
each distinct term once, checks every value is finite (else ``RewardError`` naming the term),
and combines them. A ``scale`` weight may be a schedule (``linear(0.1, 0.5) * perception_match``),
evaluated at that step by ``percepdsl.ir.value_at`` — the evaluator of learning rates and loss
weights — and reported by name (``Reward.weights``: ``reward_weight/<what it weights>``).

``RewardDiagnostics`` accumulates, step by step, what shows reward coupling in an RL run (an
outcome reward that tracks reasoning correctness far more than perception correctness): term
means, the Pearson correlation of the total reward with perception correctness and with
reasoning correctness (overall and within group), each surrogate term's correlation with
true perception correctness, and the share of groups with constant reward (no GRPO signal);
it warns when the reward stays flat for many consecutive steps.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from percepdsl.ir import value_at

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]

WARN_AFTER = 10  # consecutive flat-reward steps before a RewardWarning (a diagnostic threshold, not a spec setting)


def is_surrogate(name: str) -> bool:
    """Whether a reward term is a candidate perception surrogate, whose correlation with true
    perception correctness is reported (``surrogate_corr/<term>``): the catalogue says so
    (`Entry.surrogate`: not for the labelled terms and `format`); a term the catalogue does
    not know is one."""
    from percepdsl.catalogue import default_catalogue

    entry = default_catalogue().get("reward", name)
    return entry is None or entry.surrogate


class RewardError(Exception):
    """A reward term produced an unusable value (NaN, ±inf, wrong length) or raised.

    Raised from ``GRPOModule.training_step`` *before* any optimizer update of that step, so
    the weights are still those of the last good step: a runner catches it (Lightning calls
    the callbacks' ``on_exception`` first) and keeps the last good checkpoint.
    """

    def __init__(self, term: str, message: str):
        super().__init__(f"reward term `{term}`: {message}")
        self.term = term
        self.message = message


class RewardWarning(UserWarning):
    """The reward gives no learning signal (constant within every group) for many steps."""


# --------------------------------------------------------------------------- groups
@dataclass
class RolloutGroup:
    """The G completions of one prompt, scored once by the task."""

    sample: Any  # tasks.Sample: query, image, perception (p*), instance, ...
    completions: list[str]
    scores: list[Any]  # tasks.Scores, one per completion
    perceptions: list[Hashable | None]  # task.parse_perception of each completion
    truncated: list[bool] = field(default_factory=list)  # hit max_new_tokens without EOS
    task: Any = None
    # against -> per completion, the JS (bits) of each of its perception tokens between the
    # policy's predictions with the true image and with an uninformative one (probe.RolloutDependency);
    # set by the GRPO module, which holds the model; None outside a GRPO rollout
    dependency: Callable[[str], list[Any]] | None = None

    def __len__(self) -> int:
        return len(self.completions)

    @classmethod
    def score(
        cls, task: Any, sample: Any, completions: Sequence[str], truncated: Sequence[bool] | None = None, dependency: Any = None
    ) -> RolloutGroup:
        """Score every completion against ``sample.instance`` and parse its perception."""
        texts = list(completions)
        return cls(
            sample=sample,
            completions=texts,
            scores=[task.score(sample.instance, t) for t in texts],
            perceptions=[task.parse_perception(t) for t in texts],
            truncated=list(truncated) if truncated is not None else [False] * len(texts),
            task=task,
            dependency=dependency,
        )


# --------------------------------------------------------------------------- built-in terms
def outcome(group: RolloutGroup, **_: Any) -> list[float]:
    """1 if the answer is correct for the true instance."""
    return [float(s.outcome) for s in group.scores]


def perception_match(group: RolloutGroup, **_: Any) -> list[float]:
    """1 if the parsed perception equals p*."""
    return [float(s.perception_exact) for s in group.scores]


def perception_partial(group: RolloutGroup, **_: Any) -> list[float]:
    """Edge F1 (graph colouring) or cell accuracy (sudoku) of the perception."""
    return [float(s.perception_partial) for s in group.scores]


def format_ok(group: RolloutGroup, **_: Any) -> list[float]:
    """1 if the three sections appear once each, in order, and parse."""
    return [float(s.format_ok) for s in group.scores]


def perceived_consistency(group: RolloutGroup, **_: Any) -> list[float]:
    """Surrogate (no p*): 1 if the answer solves the instance the completion itself
    perceived (``Scores.reasoning``): internal consistency of perception and answer."""
    return [float(s.reasoning) for s in group.scores]


def self_consistency(group: RolloutGroup, *, mode: str, **_: Any) -> list[float]:
    """Surrogate (no p*): agreement of each completion's perception with the group's.

    Perceptions are compared exactly (``task.parse_perception``: the same graph, the same
    grid); a perception that does not parse agrees with nothing and scores 0. ``mode`` (the
    catalogue's default is ``agreement``):

    * ``agreement``: the fraction of the *other* G−1 completions whose parsed
      perception equals this one's. A soft majority vote: the plurality perception scores
      highest, ties need no breaking, and a lone perception scores 0.
    * ``majority``: 1 if this perception is a plurality of the group's parsed perceptions
      (every tied mode counts) and is shared by at least 2 completions, else 0.
    """
    seen = [p for p in group.perceptions if p is not None]
    counts = Counter(seen)
    n = len(group.perceptions)
    if mode == "agreement":
        return [0.0 if p is None or n < 2 else (counts[p] - 1) / (n - 1) for p in group.perceptions]
    if mode == "majority":
        top = max(counts.values(), default=0)
        return [float(p is not None and top >= 2 and counts[p] == top) for p in group.perceptions]
    raise ValueError(f"self_consistency: unknown mode {mode!r}; expected 'agreement' or 'majority'")


def visual_dependency(group: RolloutGroup, *, against: str, threshold: float | None, **_: Any) -> list[float]:
    """Surrogate (no p*): how much the rollout's own perception tokens depend on its image.

    The mean, over the completion's perception tokens, of the JS divergence (bits) between
    the policy's next-token distributions with the true image and with ``against`` (``other``:
    another item's image; ``blank``: a white one), teacher-forced on the completion itself
    (``probe.RolloutDependency``); with ``threshold``, the share of those tokens whose JS
    exceeds it. A completion without perception tokens scores 0: it shows no reading of the
    image (a blind model's score), so leaving the section out never beats writing one.
    """
    if group.dependency is None:
        raise RewardError("visual_dependency", "needs the policy model's forwards, which only a grpo stage's rollouts carry")
    per = group.dependency(against)
    if threshold is None:
        return [float(js.mean()) if js.numel() else 0.0 for js in per]
    return [float((js > threshold).float().mean()) if js.numel() else 0.0 for js in per]


# --------------------------------------------------------------------------- algebra
@dataclass
class RewardValues:
    """One group's rewards: the total and each term's values (keyed by term name)."""

    total: np.ndarray  # [G]
    terms: dict[str, np.ndarray]  # term key -> [G]


def term_key(name: str, params: Mapping[str, Any]) -> str:
    """Log name of a term: its name, with the parameters that differ from the catalogue's
    defaults (``brevity(max_words=40)``, ``self_consistency(mode=majority)``), so the same
    term with two settings logs apart and a term at its defaults logs by its bare name."""
    from percepdsl.catalogue import default_catalogue

    entry = default_catalogue().get("reward", name)

    def is_default(k: str) -> bool:
        spec = entry.param(k) if entry is not None else None
        return spec is not None and spec.default == params[k]

    shown = sorted(k for k in params if not is_default(k))
    return f"{name}({', '.join(f'{k}={params[k]}' for k in shown)})" if shown else name


class Reward:
    """A compiled reward expression: ``reward(group) -> RewardValues``."""

    def __init__(self, ir: Any, resolve: Callable[[str], RewardFn] | None = None):
        from .plugins import resolve as default_resolve

        resolve = resolve or default_resolve
        self.ir = ir
        self.fns: dict[str, tuple[RewardFn, dict[str, Any]]] = {}  # key -> (fn, params), first-use order
        self.names: dict[str, str] = {}  # key -> catalogue name
        for t in ir.terms():
            key = term_key(t.name, t.params)
            if key not in self.fns:
                if not t.impl:
                    raise RewardError(t.name, "has no implementation path (`impl`) in the IR")
                self.fns[key] = (resolve(t.impl), dict(t.params))
                self.names[key] = t.name

    @property
    def term_names(self) -> list[str]:
        """Term keys in first-use order (what ``RewardValues.terms`` and the logs use)."""
        return list(self.fns)

    @property
    def surrogates(self) -> list[str]:
        """Terms that read no labels: their correlation with perception is diagnosed."""
        return [k for k, name in self.names.items() if is_surrogate(name)]

    def weights(self, step: int, total: int) -> dict[str, float]:
        """The scheduled weights at optimiser step ``step`` of ``total``, by log name:
        ``reward_weight/<what the weight multiplies>`` (``reward_weight/perception_match``;
        a second weight on the same thing gets ``#2``)."""
        out: dict[str, float] = {}
        for node in self.ir.scheduled():
            name = f"reward_weight/{label(node.children[0])}"
            k = 2
            while name in out:
                name, k = f"reward_weight/{label(node.children[0])}#{k}", k + 1
            out[name] = value_at(node.value, step, total)
        return out

    def __call__(self, group: RolloutGroup, step: int = 0, total: int = 1) -> RewardValues:
        """The rewards of one group at optimiser step ``step`` of ``total`` (what scheduled
        weights are evaluated at; a reward without schedules does not depend on them)."""
        n = len(group)
        values = {key: self._term(key, fn, params, group, n) for key, (fn, params) in self.fns.items()}
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as an error
            total_reward = self._eval(self.ir, values, n, step, total)
        if not np.isfinite(total_reward).all():  # finite terms can still overflow under products/scales
            raise RewardError("total", f"non-finite total reward {total_reward.tolist()} for {_where(group)}")
        return RewardValues(total=total_reward, terms=values)

    @staticmethod
    def _term(key: str, fn: RewardFn, params: dict[str, Any], group: RolloutGroup, n: int) -> np.ndarray:
        try:
            raw = fn(group, **params)
            vals = np.asarray(raw, dtype=np.float64).reshape(-1)
        except RewardError:
            raise
        except Exception as exc:  # a plugin bug is reported as that term's error
            raise RewardError(key, f"raised {type(exc).__name__}: {exc} (on {_where(group)})") from exc
        if vals.shape[0] != n:
            raise RewardError(key, f"returned {vals.shape[0]} values for a group of {n} completions")
        bad = ~np.isfinite(vals)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RewardError(key, f"returned {vals[i]} for completion {i} of {_where(group)}")
        return vals

    def _eval(self, node: Any, values: dict[str, np.ndarray], n: int, step: int, total: int) -> np.ndarray:
        kind = node.kind
        if kind == "term":
            return values[term_key(node.name, node.params)]
        if kind == "const":
            return np.full(n, float(node.value))
        kids = [self._eval(c, values, n, step, total) for c in node.children]
        if kind == "sum":
            return np.sum(kids, axis=0) if kids else np.zeros(n)
        if kind == "product":
            return np.prod(kids, axis=0) if kids else np.ones(n)
        if kind == "scale":
            return value_at(node.value, step, total) * kids[0]
        if kind == "gate":  # value where the gate is exactly 1 (gates are 0/1 terms), else 0
            return np.where(kids[1] == 1.0, kids[0], 0.0)
        raise ValueError(f"unknown reward node kind {kind!r}")


def label(node: Any) -> str:
    """A reward node as expression text, for log names: a term by its log key (``outcome``,
    ``brevity(max_words=40)``), ``0.5 * format``, ``gate(outcome, format)``; a scheduled weight
    shows its schedule's kind (``linear * outcome``)."""
    if node.kind == "term":
        return term_key(node.name, node.params)
    if node.kind == "const":
        return f"{float(node.value):g}"
    kids = [label(c) for c in node.children]
    if node.kind == "scale":
        w = f"{float(node.value):g}" if isinstance(node.value, (int, float)) else node.value.kind
        return f"{w} * {kids[0] if node.children[0].kind in ('term', 'gate') else f'({kids[0]})'}"
    if node.kind == "gate":
        return f"gate({kids[0]}, {kids[1]})"
    return (" + " if node.kind == "sum" else " * ").join(kids)


def compile_reward(ir: Any, resolve: Callable[[str], RewardFn] | None = None) -> Reward:
    """Compile a ``RewardIR`` tree; ``resolve`` maps an ``impl`` path to a function."""
    return Reward(ir, resolve)


def _where(group: RolloutGroup) -> str:
    return f"prompt `{getattr(group.sample, 'id', '?')}`"


# --------------------------------------------------------------------------- statistics
def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Pearson r, or ``None`` when undefined (fewer than 2 points, or a constant vector)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return None
    return _r(x - x.mean(), y - y.mean())


def within_group_pearson(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, groups: Sequence[int] | np.ndarray
) -> float | None:
    """Pooled within-group Pearson r: both variables centred on their group means, then
    correlated — what a group-centred advantage can see. A group where one variable is
    constant adds no covariance but its spread in the other still counts. ``None`` when
    either centred variable is all zeros."""
    x, y, g = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(groups)
    if x.size < 2:
        return None
    _, inv = np.unique(g, return_inverse=True)
    cnt = np.bincount(inv)
    xc = x - (np.bincount(inv, weights=x) / cnt)[inv]
    yc = y - (np.bincount(inv, weights=y) / cnt)[inv]
    return _r(xc, yc)


def group_mean_pearson(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, groups: Sequence[int] | np.ndarray
) -> tuple[float | None, int]:
    """The mean of the per-group Pearson r over the groups where it is defined (both variables
    vary within the group), and how many groups that is; ``(None, 0)`` when there are none."""
    x, y, g = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(groups)
    if x.size == 0:
        return None, 0
    _, inv = np.unique(g, return_inverse=True)
    cnt = np.bincount(inv)
    xc = x - (np.bincount(inv, weights=x) / cnt)[inv]  # centred per group: one pass for every group
    yc = y - (np.bincount(inv, weights=y) / cnt)[inv]
    sxx, syy, sxy = (np.bincount(inv, weights=a * b) for a, b in ((xc, xc), (yc, yc), (xc, yc)))
    ok = (sxx > 1e-12) & (syy > 1e-12)  # as `_r`: a constant variable has no correlation
    if not ok.any():
        return None, 0
    rs = np.clip(sxy[ok] / np.sqrt(sxx[ok] * syy[ok]), -1.0, 1.0)
    return float(rs.mean()), int(ok.sum())


def checkpoint_coupling(history: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """Coupling across a stage's evaluation points: for the total reward and each term, the
    Pearson r over the points of its mean over the training steps before the point
    (``reward_window``) with the point's a_p (``perception``) and a_r (``reasoning``)."""
    pts = [h for h in history if h.get("reward_window")]
    out: dict[str, float | int | None] = {"term_corr_ckpt_points": len(pts)}
    for term in dict.fromkeys(k for h in pts for k in h["reward_window"]):
        for metric, label in (("perception", "perception"), ("reasoning", "reasoning")):
            xy = [(h["reward_window"][term], h[metric]) for h in pts if h.get(metric) is not None and term in h["reward_window"]]
            out[f"term_corr_ckpt/{term}/{label}"] = pearson(*zip(*xy)) if len(xy) >= 2 else None
    return out


def _r(xc: np.ndarray, yc: np.ndarray) -> float | None:
    # relative threshold: a vector of equal floats can centre to ±1e-17 instead of 0
    sxx, syy = float(xc @ xc), float(yc @ yc)
    if sxx <= 1e-12 or syy <= 1e-12:
        return None
    r = float(xc @ yc) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def constant_groups(rewards: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """[B] bool: groups (rows of ``rewards[B, G]``) whose values are all equal."""
    rewards = np.atleast_2d(rewards)
    return (rewards.max(axis=1) - rewards.min(axis=1)) <= tol


# --------------------------------------------------------------------------- diagnostics
class RewardDiagnostics:
    """Running reward statistics over a GRPO stage, plus the flat-reward warning.

    ``update(groups, values)`` once per generated batch returns that step's logs;
    ``summary()`` returns the aggregates over every step so far (keys below). A
    correlation that is undefined (a constant vector) is ``None``, never NaN.

    Keys: ``reward`` (mean total), ``reward/<term>`` (term means),
    ``reward_perception_corr`` / ``reward_reasoning_corr`` (r of the total with
    ``perception_exact`` / ``reasoning``) and their ``_within`` variants (pooled
    within-group), ``surrogate_corr/<term>`` and ``surrogate_corr_within/<term>`` (r of a
    label-free term with ``perception_exact``), ``perception_rate``, ``reasoning_rate``,
    ``constant_group_frac``; for every term, its own coupling with perception and reasoning
    correctness: ``term_corr/<term>/<perception|reasoning>`` (pooled r),
    ``term_corr_group_mean/<term>/…`` (the mean of the per-group r over the groups where it is
    defined) and ``term_corr_groups/<term>/…`` (how many groups that is); ``summary()`` adds
    ``rollouts``, ``groups``, ``steps``. ``window()`` gives the term means since its last call
    (an evaluation point), from which ``checkpoint_coupling`` correlates across checkpoints.

    The warning: when the total reward — or a term — is constant within every group of a
    step for ``warn_after`` consecutive steps, a ``RewardWarning`` names what is flat and
    for how long (once per streak).
    """

    def __init__(self, term_names: Sequence[str], surrogates: Sequence[str] = (), warn_after: int = WARN_AFTER, stage: str = "grpo"):
        self.term_names, self.surrogates = list(term_names), list(surrogates)
        self.warn_after, self.stage = int(warn_after), stage
        self._cols: dict[str, list[np.ndarray]] = {k: [] for k in ("total", "perception", "reasoning", "group")}
        self._terms: dict[str, list[np.ndarray]] = {k: [] for k in self.term_names}
        self._constant: list[np.ndarray] = []
        self._streak: dict[str, int] = {}
        self._mark = 0  # the step where the current evaluation window starts (see `window`)
        self._n_groups = 0
        self.steps = 0

    # -- per step -------------------------------------------------------------------------
    def update(self, groups: Sequence[RolloutGroup], values: Sequence[RewardValues]) -> dict[str, float]:
        cols = self._step_columns(groups, values)
        self._n_groups += len(groups)
        for k in self._cols:
            self._cols[k].append(cols[k])
        for k in self.term_names:
            self._terms[k].append(cols["terms"][k])
        const = constant_groups(np.stack([v.total for v in values]))
        self._constant.append(const)
        self.steps += 1
        self._watch_flat(values, bool(const.all()))
        logs = self._stats(cols["total"], cols["perception"], cols["reasoning"], cols["group"], cols["terms"], const)
        return {k: v for k, v in logs.items() if v is not None}

    def _step_columns(self, groups: Sequence[RolloutGroup], values: Sequence[RewardValues]) -> dict[str, Any]:
        gid = np.concatenate([np.full(len(g), self._n_groups + i) for i, g in enumerate(groups)])
        return {
            "total": np.concatenate([v.total for v in values]),
            "perception": np.array([float(s.perception_exact) for g in groups for s in g.scores]),
            "reasoning": np.array([float(s.reasoning) for g in groups for s in g.scores]),
            "group": gid,
            "terms": {k: np.concatenate([v.terms[k] for v in values]) for k in self.term_names},
        }

    def _watch_flat(self, values: Sequence[RewardValues], total_flat: bool) -> None:
        flat = {"total reward": total_flat}
        for k in self.term_names:
            flat[k] = bool(constant_groups(np.stack([v.terms[k] for v in values])).all())
        reached = []
        for k, is_flat in flat.items():
            self._streak[k] = self._streak.get(k, 0) + 1 if is_flat else 0
            if self._streak[k] == self.warn_after:
                reached.append(k)
        if reached:
            what = ", ".join(self._describe_flat(k, values) for k in reached)
            msg = (
                f"GRPO stage `{self.stage}`: {what} constant within every group for "
                f"{self.warn_after} consecutive steps (step {self.steps}); a constant reward "
                f"gives zero advantages, so these steps do not learn from it"
            )
            log.warning(msg)
            warnings.warn(msg, RewardWarning, stacklevel=3)

    @staticmethod
    def _describe_flat(key: str, values: Sequence[RewardValues]) -> str:
        vals = np.concatenate([v.total if key == "total reward" else v.terms[key] for v in values])
        same = float(vals.min()) == float(vals.max())
        label = key if key == "total reward" else f"term `{key}`"
        return f"{label} (always {float(vals[0]):g})" if same else label

    def window(self) -> dict[str, float]:
        """The total reward's (``reward``) and each term's mean over the steps since the previous
        call: what the policy earned just before an evaluation point (see ``checkpoint_coupling``)."""
        start, self._mark = self._mark, self.steps
        out = {}
        for name, arrays in (("reward", self._cols["total"]), *self._terms.items()):
            vals = arrays[start:]
            if vals:
                out[name] = float(np.concatenate(vals).mean())
        return out

    # -- checkpointing (plain lists: safe for weights-only checkpoint loading) ---------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "cols": {k: [a.tolist() for a in v] for k, v in self._cols.items()},
            "terms": {k: [a.tolist() for a in v] for k, v in self._terms.items()},
            "constant": [a.tolist() for a in self._constant],
            "streak": dict(self._streak),
            "n_groups": self._n_groups,
            "steps": self.steps,
            "mark": self._mark,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._cols = {k: [np.asarray(a, dtype=np.float64) for a in v] for k, v in state["cols"].items()}
        self._terms = {k: [np.asarray(a, dtype=np.float64) for a in state["terms"].get(k, [])] for k in self.term_names}
        self._constant = [np.asarray(a, dtype=bool) for a in state["constant"]]
        self._streak = dict(state["streak"])
        self._n_groups, self.steps = int(state["n_groups"]), int(state["steps"])
        self._mark = int(state.get("mark", 0))

    @classmethod
    def merged(
        cls, states: Sequence[Mapping[str, Any]], term_names: Sequence[str], surrogates: Sequence[str] = (), stage: str = "grpo"
    ) -> RewardDiagnostics:
        """One set of statistics over several ``state_dict``s (data-parallel ranks of one stage):
        their rollouts together, group ids kept apart, ``steps`` the stage's (every rank runs each)."""
        out = cls(term_names, surrogates, stage=stage)
        for state in states:
            part = cls(term_names, surrogates, stage=stage)
            part.load_state_dict(state)
            for k, arrays in part._cols.items():
                out._cols[k] += [a + out._n_groups for a in arrays] if k == "group" else arrays
            for k in out.term_names:
                out._terms[k] += part._terms[k]
            out._constant += part._constant
            out._n_groups += part._n_groups
            out.steps = max(out.steps, part.steps)
        return out

    # -- aggregates -------------------------------------------------------------------------
    def _stats(
        self, total: np.ndarray, perc: np.ndarray, reas: np.ndarray, gid: np.ndarray, terms: Mapping[str, np.ndarray], const: np.ndarray
    ) -> dict[str, float | None]:
        out: dict[str, float | None] = {"reward": float(total.mean()) if total.size else None}
        out.update({f"reward/{k}": float(v.mean()) if v.size else None for k, v in terms.items()})
        out["reward_perception_corr"] = pearson(total, perc)
        out["reward_reasoning_corr"] = pearson(total, reas)
        out["reward_perception_corr_within"] = within_group_pearson(total, perc, gid)
        out["reward_reasoning_corr_within"] = within_group_pearson(total, reas, gid)
        for k in self.surrogates:
            out[f"surrogate_corr/{k}"] = pearson(terms[k], perc)
            out[f"surrogate_corr_within/{k}"] = within_group_pearson(terms[k], perc, gid)
        for k in self.term_names:  # each term's own coupling: an α-mixed total contains perception_match by construction
            for label, truth in (("perception", perc), ("reasoning", reas)):
                out[f"term_corr/{k}/{label}"] = pearson(terms[k], truth)
                mean_r, n = group_mean_pearson(terms[k], truth, gid)
                out[f"term_corr_group_mean/{k}/{label}"] = mean_r
                out[f"term_corr_groups/{k}/{label}"] = n
        out["perception_rate"] = float(perc.mean()) if perc.size else None
        out["reasoning_rate"] = float(reas.mean()) if reas.size else None
        out["constant_group_frac"] = float(const.mean()) if const.size else None
        return out

    def summary(self) -> dict[str, float | int | None]:
        """Aggregates over every rollout seen so far (JSON-ready: floats, ints, None)."""
        cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self._cols.items()}
        terms = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self._terms.items()}
        const = np.concatenate(self._constant) if self._constant else np.zeros(0, dtype=bool)
        out: dict[str, float | int | None] = dict(
            self._stats(cat["total"], cat["perception"], cat["reasoning"], cat["group"], terms, const)
        )
        out.update(rollouts=int(cat["total"].size), groups=self._n_groups, steps=self.steps)
        return out


__all__ = [
    "WARN_AFTER",
    "Reward",
    "RewardDiagnostics",
    "RewardError",
    "RewardFn",
    "RewardValues",
    "RewardWarning",
    "RolloutGroup",
    "compile_reward",
    "checkpoint_coupling",
    "constant_groups",
    "format_ok",
    "group_mean_pearson",
    "is_surrogate",
    "label",
    "outcome",
    "pearson",
    "perceived_consistency",
    "perception_match",
    "perception_partial",
    "self_consistency",
    "term_key",
    "visual_dependency",
    "within_group_pearson",
]
