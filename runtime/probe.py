"""The visual-dependency probe: is the model reading the image at this token?

For each item, the reference target is teacher-forced three times: with the item's own
image, with a blank image, and with another item's image (the next item's, cyclically).
At every target token the probe measures the Jensen–Shannon divergence, in bits (0 = the
image changes nothing, 1 = disjoint predictions), between the next-token distribution
under the true image and under each uninformative one, then averages it per role and,
for perception, per slot (the k-th perception token of the target).

Teacher forcing on the *reference* target, not on the model's own generation: the three
forwards then read the same text, so any difference comes from the image alone; the
reference exists for every test item, whatever the model writes (an untrained or blind
model's generation would be mostly malformed, and a generation conditioned on the true
image would favour it). JS rather than KL: symmetric, bounded, and finite where one
distribution puts zero mass.

A model trained with shuffled images (the image carries no information about the target)
learns to ignore it, and scores ≈0; one that reads its image scores clearly higher on the
perception tokens. No labels are needed beyond the reference text.

``visual_dependency`` (the eval metric) is the mean JS on perception tokens against another
item's image; the blank image is reported beside it (a blank image is out of distribution,
so it can move a model that does not read *this* image's content).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .encoding import collate, model_inputs
from .generation import eval_mode

BASELINES = ("other", "blank")  # another item's image; a blank one
METRIC_ROLE = "perception"
PROBE_ITEMS = 64  # items the eval metric probes (teacher forcing: three forwards per item, no generation)
BATCH = 16


def js_bits(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits between the softmaxes of ``logits_p`` and
    ``logits_q`` over the last dim (float32)."""
    lp, lq = torch.log_softmax(logits_p.float(), -1), torch.log_softmax(logits_q.float(), -1)
    lm = torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2.0)
    kl_pm = (lp.exp() * (lp - lm)).sum(-1)
    kl_qm = (lq.exp() * (lq - lm)).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / math.log(2.0)).clamp(min=0.0)


def blank_like(image: Image.Image) -> Image.Image:
    """A white image of the same size and mode (the tasks draw on white)."""
    return Image.new(image.mode, image.size, "white")


@dataclass
class ProbeResult:
    """Per baseline: mean JS (bits) per role, per perception slot, and token counts."""

    items: int
    roles: dict[str, dict[str, float | None]]  # baseline -> role -> mean JS
    tokens: dict[str, int]  # role -> token count
    slots: dict[str, list[float]] = field(default_factory=dict)  # baseline -> JS of perception slot k
    # threshold -> precision / recall of "JS vs another image > threshold" as a perception tagger
    grounded: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def metric(self) -> float | None:
        """``visual_dependency``: perception tokens, another item's image."""
        return self.roles["other"].get(METRIC_ROLE)

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "visual_dependency": self.metric(),
            "roles": self.roles,
            "tokens": self.tokens,
            "slots": self.slots,
            "grounded": self.grounded,
        }

    def flat(self) -> dict[str, float]:
        """``visual_dependency/<baseline>/<role>`` for logs and summaries."""
        return {f"visual_dependency/{b}/{r}": v for b, per in self.roles.items() for r, v in per.items() if v is not None}


@torch.no_grad()
def probe(loaded: Any, encoder: Any, task: Any, split: str = "test", n: int | None = PROBE_ITEMS, batch: int = BATCH) -> ProbeResult:
    """Visual dependency of ``loaded`` on the first ``n`` items of ``split`` (at least 2)."""
    model = loaded.model
    n = min(n or task.size(split), task.size(split))
    if n < 2:
        raise ValueError("the probe compares an item's image with another item's: it needs at least 2 items")
    samples = [task.sample(split, i) for i in range(n)]
    names = list(encoder.role_names)
    sums = {b: torch.zeros(len(names), dtype=torch.float64) for b in BASELINES}
    counts = torch.zeros(len(names), dtype=torch.long)
    slot_sum: dict[str, list[float]] = {b: [] for b in BASELINES}
    slot_n: list[float] = []
    p_id = names.index(METRIC_ROLE) if METRIC_ROLE in names else None
    token_js: list[torch.Tensor] = []
    token_roles: list[torch.Tensor] = []
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, n, batch):
            idx = range(start, min(start + batch, n))
            images = {
                "true": [samples[i].image for i in idx],
                "other": [samples[(i + 1) % n].image for i in idx],
                "blank": [blank_like(samples[i].image) for i in idx],
            }
            batches = {
                which: collate(
                    [encoder.encode_train(samples[i].query, img, samples[i].response) for i, img in zip(idx, imgs)], encoder.pad_token_id
                )
                for which, imgs in images.items()
            }
            # the texts are the same under every image (same-size images: same image-token count)
            labels, roles = batches["true"]["labels"][:, 1:], batches["true"]["role_ids"][:, 1:]
            keep = labels != -100  # position t predicts token t+1: the target positions
            logits = {}
            for which, b in batches.items():
                out = model(**{k: v.to(device) for k, v in model_inputs(b).items()}, use_cache=False)
                logits[which] = out.logits[:, :-1][keep.to(device)].float().cpu()  # [targets, V]
            r = roles[keep]
            counts += torch.bincount(r, minlength=len(names))[: len(names)]
            token_js.append(js_bits(logits["true"], logits["other"]))
            token_roles.append(r)
            row_of = keep.nonzero()[:, 0]
            for base in BASELINES:
                js = js_bits(logits["true"], logits[base])  # [targets]
                sums[base] += torch.zeros(len(names), dtype=torch.float64).index_add(0, r, js.double())
                if p_id is not None:  # per slot: the k-th perception token of each target
                    for row in range(keep.shape[0]):
                        _add_slots(slot_sum[base], js[(row_of == row) & (r == p_id)].tolist())
            if p_id is not None:
                for row in range(keep.shape[0]):
                    _add_slots(slot_n, [1] * int(((row_of == row) & (r == p_id)).sum()))
    roles_out = {b: {nm: (float(sums[b][i] / counts[i]) if counts[i] else None) for i, nm in enumerate(names)} for b in BASELINES}
    slots = {b: [s / c for s, c in zip(slot_sum[b], slot_n)] for b in BASELINES} if p_id is not None else {}
    grounded = grounding(torch.cat(token_js), torch.cat(token_roles) == p_id) if p_id is not None else {}
    return ProbeResult(items=n, roles=roles_out, tokens=dict(zip(names, counts.tolist())), slots=slots, grounded=grounded)


THRESHOLDS = (0.01, 0.05, 0.1, 0.2)  # bits


def grounding(js: torch.Tensor, perception: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, dict[str, float | None]]:
    """Tokens whose visual dependency exceeds a threshold, read as a label-free perception tag:
    its precision and recall against the marked perception section, per threshold."""
    out: dict[str, dict[str, float | None]] = {}
    for t in thresholds:
        tagged = js > t
        hit = int((tagged & perception).sum())
        out[f"{t:g}"] = {
            "tagged": int(tagged.sum()),
            "precision": hit / int(tagged.sum()) if bool(tagged.any()) else None,
            "recall": hit / int(perception.sum()) if bool(perception.any()) else None,
        }
    return out


# --------------------------------------------------------------------------- GRPO rollouts
class RolloutDependency:
    """Visual dependency of sampled completions on their own image: what the
    ``visual_dependency`` reward term reads (no perception labels).

    Teacher-forced on the rollouts themselves (not on a reference target: a GRPO prompt has
    none the reward may use): for each completion, the JS divergence (bits, ``js_bits``)
    between the policy's next-token distributions with the true image and with an
    uninformative one (``against``: another item's image, or a blank one) at the tokens of
    one role (``perception``). Computed lazily, once per ``against`` for the whole generated
    batch: a batched no-grad forward under the true prompt (shared by both baselines) and
    one under the changed one, over the rows that have such tokens, up to the last of them
    (a causal model's prediction at t reads tokens < t only, and perception comes first:
    most of a completion never runs). ``seconds`` is the time spent (logged as
    ``visual_dependency_s``).

    ``forward(prompt, rows, length)``: [n, length, V] logits of the first ``length`` completion
    tokens of rollout rows ``rows`` under a prompt batch (``None``: the sampled one);
    ``prompt(against)``: the prompt batch with the changed images; ``roles``: [N, T] role ids of
    the rollout tokens (or a function giving them, called on first use); ``role``: the role id
    whose tokens count (``None``: the spec declares no such role, and no completion has any).
    """

    def __init__(self, forward: Any, prompt: Any, roles: Any, role: int | None):
        self.forward, self.prompt, self.roles, self.role = forward, prompt, roles, role
        self._true: torch.Tensor | None = None
        self._js: dict[str, list[torch.Tensor]] = {}
        self.seconds = 0.0

    def __call__(self, against: str) -> list[torch.Tensor]:
        """Per completion, the JS (bits) at each of its role tokens; empty for a completion
        without any."""
        if against not in self._js:
            t0 = time.perf_counter()
            roles = self.roles() if callable(self.roles) else self.roles  # [N, T], computed on first use
            tokens = roles == self.role if self.role is not None else torch.zeros(roles.shape, dtype=torch.bool)
            rows = tokens.any(dim=1).nonzero()[:, 0]
            out = [torch.zeros(0)] * tokens.shape[0]
            if len(rows):
                length = int(tokens.any(dim=0).nonzero().max()) + 1  # the forwards stop at the last role token
                sel = tokens[rows, :length]
                if self._true is None:
                    self._true = self.forward(None, rows, length)[sel].cpu()
                js = js_bits(self._true, self.forward(self.prompt(against), rows, length)[sel].cpu())
                for row, part in zip(rows.tolist(), js.split(sel.sum(dim=1).tolist())):
                    out[row] = part
            self._js[against] = out
            self.seconds += time.perf_counter() - t0
        return self._js[against]

    def view(self, lo: int, hi: int) -> Any:
        """The same, restricted to completions ``lo:hi`` (one group)."""
        return lambda against: self(against)[lo:hi]


# --------------------------------------------------------------------------- the `visual` role rule
def visual_role_ids(role_ids: torch.Tensor, js: torch.Tensor, rules: Sequence[tuple[int, float]], rest_id: int) -> torch.Tensor:
    """Role ids after the `visual` rules: for each rule ``(role id, threshold)``, in declaration
    order, a token whose ``js`` exceeds the threshold takes the rule's role if its current role
    comes from a rule declared after it (a larger id: ids follow declaration order) or from
    `rest` / the implicit `other` (``rest_id``): the first rule that claims a token wins, as for
    text rules. ``role_ids``/``js``: matching shapes; ids < 0 (no target) are left alone."""
    out = role_ids.clone()
    for rid, threshold in rules:
        out[(js > threshold) & (out >= 0) & ((out > rid) | (out == rest_id))] = rid
    return out


def changed_pixels(batch: Mapping[str, Any], against: str, blank: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The image inputs of a batch with uninformative images: ``other``, each item gets the
    next item's image (cyclically, as in ``probe``: a single-item batch keeps its own, and tags
    nothing); ``blank``, every image is ``blank`` (the pixel values of one white image). Works for
    one image per item, as ``pixel_values [items, C, H, W]`` or flattened patches with
    ``image_grid_thw`` (Qwen2-VL)."""
    pv, grid = batch["pixel_values"], batch.get("image_grid_thw")
    n = grid.shape[0] if grid is not None else pv.shape[0]
    if against == "blank":
        if blank is None:
            raise ValueError("against = blank needs the pixel values of a white image")
        return {"pixel_values": blank.to(pv).repeat(n, *([1] * (blank.dim() - 1)))}
    if grid is None:
        return {"pixel_values": torch.roll(pv, -1, dims=0)}
    blocks = list(pv.split(grid.prod(dim=-1).tolist()))
    return {"pixel_values": torch.cat(blocks[1:] + blocks[:1]), "image_grid_thw": torch.roll(grid, -1, dims=0)}


class VisualRoles:
    """The `visual(...)` role rules of one training stage (``percepdsl.ir.RoleRuleIR`` of kind
    ``visual``), applied to each SFT batch (``tag``) or GRPO generated batch (``tag_rollouts``): a target token takes the rule's role when the JS
    divergence (bits, ``js_bits``) between a frozen reference model's next-token distributions with
    the item's image and with an uninformative one (``changed_pixels``) exceeds the threshold
    (``visual_role_ids`` settles the order with the text rules).

    ``rules``: (role id, rule); ``references``: the reference model of each (``reference``,
    ``refresh``) the rules name, frozen (no grad, eval mode); ``rest_id``: the `rest` role's id (or
    the implicit `other`'s). Per batch: one no-grad forward per reference under the true images,
    one per (reference, ``against``) under the changed ones, logits at target positions only
    (``sft.target_logits``: padded or packed batches). ``refresh(policy, step)`` re-copies a
    reference from the policy every ``refresh`` steps (0: never). ``seconds``: the last batch's time.
    """

    def __init__(self, rules: Sequence[tuple[int, Any]], references: Mapping[tuple[str | None, int], Any], rest_id: int, blank: Any = None):
        self.rules, self.references, self.rest_id, self.blank = list(rules), dict(references), rest_id, blank
        self.seconds = 0.0  # of the last `tag`

    def refresh(self, policy: Any, step: int, since: int | None = None) -> None:
        """Re-copy each reference whose `refresh` period has a multiple in (`since`, `step`]: the steps
        taken since the last call (default the one before `step`; a grpo batch with `updates = u` is
        u steps, whose multiples it would otherwise skip unless one falls on a batch's start)."""
        since = step - 1 if since is None else since
        for (_, every), ref in self.references.items():
            if every and step > 0 and step // every > max(since, 0) // every:
                ref.load_state_dict(policy.state_dict())

    @torch.no_grad()
    def tag(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with its ``role_ids`` re-tagged by the visual rules."""
        from .sft import target_logits

        t0 = time.perf_counter()
        sel = batch["labels"][:, 1:] != -100  # position t predicts token t+1: the target positions
        true: dict[Any, torch.Tensor] = {}
        js: dict[Any, torch.Tensor] = {}
        for _, rule in self.rules:
            key = (rule.reference, rule.refresh)
            ref = self.references[key]
            if key not in true:
                true[key] = target_logits(ref, batch)[0].float()
            if (key, rule.against) not in js:
                changed = {**batch, **changed_pixels(batch, rule.against, self.blank)}
                js[key, rule.against] = js_bits(true[key], target_logits(ref, changed)[0].float())
        roles = batch["role_ids"].clone()
        tagged = roles[:, 1:][sel]
        for rid, rule in self.rules:  # one rule at a time, in declaration order (visual_role_ids' contract)
            tagged = visual_role_ids(
                tagged, js[(rule.reference, rule.refresh), rule.against].to(tagged.device), [(rid, rule.threshold)], self.rest_id
            )
        roles[:, 1:][sel] = tagged
        self.seconds = time.perf_counter() - t0
        return {**batch, "role_ids": roles}

    @torch.no_grad()
    def tag_rollouts(self, logits: Any, prompt: Mapping[str, Any], roles: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """GRPO: the role ids [n, T] of completion tokens re-tagged by the visual rules, each
        reference teacher-forced on the completions (``logits(model, prompt)``: [n, T, V] logits of
        the completion positions under a prompt batch, ``grpo.completion_logits``) with the
        prompts' true images and with ``changed_pixels`` of them; ``mask``: the generated tokens."""
        t0 = time.perf_counter()
        true: dict[Any, torch.Tensor] = {}
        js: dict[Any, torch.Tensor] = {}
        out = roles
        for rid, rule in self.rules:
            key = (rule.reference, rule.refresh)
            if key not in true:
                true[key] = logits(self.references[key], prompt)
            if (key, rule.against) not in js:
                changed = {**prompt, **changed_pixels(prompt, rule.against, self.blank)}
                js[key, rule.against] = js_bits(true[key], logits(self.references[key], changed))
            tag = js[key, rule.against].to(roles.device).masked_fill(~mask.bool().to(roles.device), 0.0)
            out = visual_role_ids(out, tag, [(rid, rule.threshold)], self.rest_id)
        self.seconds = time.perf_counter() - t0
        return out

    def state_dict(self) -> dict[str, Any]:
        """The references that a refresh changed (for a resume); the others are rebuilt as they started.
        A PEFT reference by its adapter alone: a refresh copies the policy, whose base model is frozen,
        so only the adapter moves (the whole state would put a copy of the base in every checkpoint)."""
        from peft.utils import get_peft_model_state_dict

        return {
            f"{ref}/{every}": get_peft_model_state_dict(m) if hasattr(m, "peft_config") else m.state_dict()
            for (ref, every), m in self.references.items()
            if every
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from peft.utils import set_peft_model_state_dict

        for (ref, every), m in self.references.items():
            if f"{ref}/{every}" in state:
                if hasattr(m, "peft_config"):
                    set_peft_model_state_dict(m, state[f"{ref}/{every}"])
                else:
                    m.load_state_dict(state[f"{ref}/{every}"])


def _add_slots(acc: list[float], vals: Sequence[float]) -> None:
    acc.extend([0.0] * (len(vals) - len(acc)))
    for j, v in enumerate(vals):
        acc[j] += v


# --------------------------------------------------------------------------- outputs
def write_outputs(result: ProbeResult, out_dir: Any, title: str) -> list[Any]:
    """``probe.json``, ``probe.csv`` (baseline, role, tokens, mean JS), ``probe.md`` and
    ``probe.png`` (per-role bars and the perception-slot curve), each written atomically."""
    import csv
    import io
    from pathlib import Path

    from percepdsl.io import atomic_path, write_json_atomic, write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json_atomic(out / "probe.json", result.as_dict())]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["baseline", "role", "tokens", "js_bits"])
    for b, per in result.roles.items():
        for role, v in per.items():
            w.writerow([b, role, result.tokens[role], "" if v is None else f"{v:.6f}"])
    paths.append(write_text_atomic(out / "probe.csv", buf.getvalue()))
    names = [r for r in result.tokens if result.tokens[r]]
    lines = [
        f"# Visual dependency: {title}",
        "",
        f"Jensen–Shannon divergence (bits) between next-token distributions with the true image and with another item's "
        f"image / a blank image, teacher-forced on the reference target; {result.items} items. "
        f"`visual_dependency` (perception, other image) = {_fmt(result.metric())}.",
        "",
        "| role | tokens | " + " | ".join(f"JS vs {b}" for b in BASELINES) + " |",
        "|---|---|" + "---|" * len(BASELINES),
    ]
    lines += [f"| {r} | {result.tokens[r]} | " + " | ".join(_fmt(result.roles[b][r]) for b in BASELINES) + " |" for r in names]
    if result.grounded:
        lines += [
            "",
            "Tokens with JS vs another image above a threshold, as a label-free perception tag, against the marked section:",
            "",
            "| threshold (bits) | tagged | precision | recall |",
            "|---|---|---|---|",
        ]
        lines += [f"| {t} | {g['tagged']} | {_fmt(g['precision'])} | {_fmt(g['recall'])} |" for t, g in result.grounded.items()]
    paths.append(write_text_atomic(out / "probe.md", "\n".join(lines) + "\n"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(BASELINES)
    for k, b in enumerate(BASELINES):
        axes[0].bar([i + k * width for i in range(len(names))], [result.roles[b][r] or 0.0 for r in names], width, label=f"vs {b} image")
        if result.slots.get(b):
            axes[1].plot(range(1, len(result.slots[b]) + 1), result.slots[b], marker=".", label=f"vs {b} image")
    axes[0].set_xticks([i + width * (len(BASELINES) - 1) / 2 for i in range(len(names))], names)
    axes[0].set_ylabel("JS divergence (bits)")
    axes[0].set_title("per role")
    axes[1].set_xlabel("perception token (slot)")
    axes[1].set_title("per perception slot")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out / "probe.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    paths.append(out / "probe.png")
    return paths


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


# --------------------------------------------------------------------------- `percep probe`
class ProbeRefused(Exception):
    """The run directory or stage cannot be probed (exit 2)."""


def probe_run(run_dir: Any, stage: str | None = None, items: int = PROBE_ITEMS, echo: Any = print) -> tuple[ProbeResult, Any]:
    """Probe a stage of a run directory (default: its last finished stage) on the first
    ``items`` test items; writes ``probe/<stage>/probe.{json,csv,md,png}`` there."""
    from pathlib import Path

    from percepdsl.io import read_json
    from percepdsl.ir import ExperimentIR

    from .models import ModelLoadError, load_weights
    from .run import RunRefused, prepare, stage_dir

    run_dir = Path(run_dir)
    record = read_json(run_dir / "ir.json")
    if not isinstance(record, dict) or "ir" not in record:
        raise ProbeRefused(f"{run_dir} is not a run directory (no readable ir.json)")
    try:
        ir = ExperimentIR.model_validate(record["ir"])
    except ValueError as exc:  # pydantic's ValidationError: another version's IR, or an edited one
        raise ProbeRefused(f"{run_dir}/ir.json is not an IR this version reads: {str(exc).splitlines()[0]}") from exc
    names = [s.name for s in ir.stages]
    done = [n for n in names if (run_dir / "stages" / n / "model").exists()]
    if stage is not None and stage not in names:
        raise ProbeRefused(f"the run has no stage `{stage}`; its stages are {', '.join(names)}")
    stage = stage or (done[-1] if done else None)
    if stage is None or stage not in done:
        raise ProbeRefused(
            f"stage `{stage or names[-1]}` of {run_dir} has no saved model yet; finished stages: {', '.join(done) or 'none'}"
        )
    if items < 2:
        raise ProbeRefused("the probe compares an item's image with another item's: --items must be at least 2")
    try:
        ctx = prepare(ir, run_dir, lambda _msg: None)
    except RunRefused as exc:
        raise ProbeRefused(str(exc)) from exc
    try:
        load_weights(ctx.loaded, stage_dir(ctx, ir.stage(stage)) / "model")
    except ModelLoadError as exc:
        raise ProbeRefused(str(exc)) from exc
    result = probe(ctx.loaded, ctx.encoder, ctx.task, "test", items)
    paths = write_outputs(result, run_dir / "probe" / stage, f"{ir.name}, stage `{stage}`")
    return result, paths


__all__ = [
    "BASELINES",
    "PROBE_ITEMS",
    "ProbeRefused",
    "ProbeResult",
    "RolloutDependency",
    "VisualRoles",
    "changed_pixels",
    "blank_like",
    "grounding",
    "js_bits",
    "probe",
    "probe_run",
    "visual_role_ids",
    "write_outputs",
]
