"""Encoding samples for training and generation through the processor's chat template.

A training sequence is the chat template rendered for ``user: [image, query]`` and
``assistant: response``; only the assistant part (the response and the template's
end-of-turn marker, e.g. ``<eos>`` or ``<|im_end|>``) is a target. Every target token gets
exactly one role (``roles.py``); prompt and image tokens get label -100 and role -1.

How targets are found without relying on processor internals: the processor tokenizes
the full text with the image placeholder expanded (``input_ids``); the tokenizer alone
tokenizes the same text unexpanded, with character offsets. Expansion only happens in
the prompt, so the tokens from the prompt's end on are the same in both, at the end of
each — the offsets of the unexpanded tokenization tell which are targets and their roles.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from percepdsl.ir import RoleRuleIR

from .models import LoadedModel
from .roles import RoleTagger, token_roles

# keys of an encoded item that are one value per token (padded in `collate`), with pad values
_SEQ_PAD = {"labels": -100, "role_ids": -1, "attention_mask": 0}
_NOT_MODEL_INPUTS = ("labels", "role_ids", "n_target", "seq_lengths", "next_labels", "next_roles")


class EncodingError(ValueError):
    """A sample cannot be encoded consistently (template or tokenizer mismatch)."""


class Encoder:
    """Turns (query, image, response) into model inputs, labels and role ids."""

    def __init__(self, loaded: LoadedModel, role_rules: Sequence[RoleRuleIR | Mapping[str, Any]], max_length: int | None = None):
        self.loaded = loaded
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.tagger = RoleTagger.from_rules(role_rules)
        self.role_names: list[str] = list(self.tagger.role_names)
        self.max_length = max_length
        # What the template writes between the generation prompt and the response, and
        # after the response: found by rendering a marker response once.
        marker = "\x00RESPONSE\x00"
        prompt = self._render("q", None)
        full = self._render("q", marker)
        at = full.find(marker, len(prompt))
        if not full.startswith(prompt) or at < 0:
            raise EncodingError("the chat template's generation prompt is not a prefix of the rendered conversation")
        self._sep = full[len(prompt) : at]
        self._tail = full[at + len(marker) :]
        tail_ids = self.tokenizer.encode(self._tail.strip(), add_special_tokens=False) if self._tail.strip() else []
        # the end-of-turn marker ends generation; fall back to the tokenizer's eos
        self.eos_token_id: int = int(tail_ids[0]) if tail_ids else int(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = int(pad if pad is not None else self.eos_token_id)
        self._checked_prefix = False

    def truncating(self, max_length: int | None) -> Encoder:
        """This encoder with another ``max_length`` (an sft stage's own: ``None`` keeps items whole);
        the same model, template and role rules."""
        if max_length == self.max_length:
            return self
        other = copy.copy(self)
        other.max_length = max_length
        return other

    # -- text -------------------------------------------------------------------------
    def _render(self, query: str, response: str | None, image: bool = True) -> str:
        parts = ([{"type": "image"}] if image else []) + [{"type": "text", "text": query}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": parts}]
        if response is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
        try:
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
        except Exception as exc:  # noqa: BLE001 - jinja's TemplateError (raise_exception), or the template's own bugs
            raise EncodingError(f"the chat template cannot render a user turn{' and a reply' if response else ''}: {exc}") from exc

    def _process(self, text: str, image: Any) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if image is not None:
            kwargs["images"] = [[image]]
        try:
            out = self.processor(**kwargs)
        except ValueError as exc:  # e.g. a chat template that writes no image placeholder for the image
            raise EncodingError(f"the processor cannot encode an item its chat template rendered: {exc}") from exc
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    # -- public API ---------------------------------------------------------------------
    def encode_train(self, query: str, image: Any, response: str) -> dict[str, Any]:
        """One training item: 1-D ``input_ids``/``labels``/``role_ids``/``attention_mask``
        (+ per-token model extras), ``pixel_values`` (+ image extras), ``n_target``."""
        prompt = self._render(query, None, image is not None)
        full = self._render(query, response, image is not None)
        start = len(prompt)
        r0 = full.find(response, start)
        if not full.startswith(prompt) or r0 < 0:
            raise EncodingError("the rendered conversation does not contain the prompt and the response in order")
        r1 = r0 + len(response)
        end = r1 + len(full[r1:].rstrip())  # targets: response + end-of-turn marker, not trailing newlines

        out = self._process(full, image)
        ids = out["input_ids"][0]
        raw = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        raw_ids, offsets = raw["input_ids"], raw["offset_mapping"]
        k = sum(1 for s, _ in offsets if s >= start)  # tokens after the prompt, the same in both tokenizations
        if k == 0 or raw_ids[-k:] != ids[-k:].tolist():
            raise EncodingError("tokens after the prompt differ between the processor and the tokenizer")
        if not self._checked_prefix:  # once: prompt tokens must not merge with the response
            n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n_prompt != len(raw_ids) - k:
                raise EncodingError("the prompt's tokens merge with the response's; generation would not match training")
            self._checked_prefix = True

        target = full[start:end]
        char_roles = self.tagger.tag(response)
        # char roles over `target`: template separator before the response takes the first role
        pre = r0 - start
        rel = [(max(s - start, 0), max(e - start, 0)) for s, e in offsets[len(offsets) - k :]]
        is_target = [s < end - start for s, _ in rel]
        roles_all = token_roles(_shift_roles(char_roles, pre), target, [r for r, t in zip(rel, is_target) if t])

        T = ids.shape[0]
        labels = torch.full((T,), -100, dtype=torch.long)
        role_ids = torch.full((T,), -1, dtype=torch.long)
        pos = torch.arange(T - k, T)[torch.tensor(is_target, dtype=torch.bool)]
        labels[pos] = ids[pos]
        role_ids[pos] = torch.tensor(roles_all, dtype=torch.long)
        item = self._item(out)
        item.update(labels=labels, role_ids=role_ids)
        if self.max_length is not None and T > self.max_length:
            if T - k >= self.max_length:  # cutting into the prompt would cut image tokens too
                raise EncodingError(f"max_length {self.max_length} leaves no room for targets after {T - k} prompt tokens")
            item = {key: (v[: self.max_length] if _is_seq(v, T) else v) for key, v in item.items()}
        item["n_target"] = int((item["labels"] != -100).sum())
        return item

    def encode_prompt(self, query: str, image: Any, prefix: str = "", response: str | None = None) -> dict[str, Any]:
        """A generation prompt; ``prefix`` is assistant text already written (e.g. the
        counterfactual ``<perception> p* </perception> <reasoning>``).

        With ``response``, the training response that ``prefix`` is the start of, the prompt is
        the training sequence's own tokens up to the end of ``prefix`` (`prefix_tokens`): what the
        model saw in training, whatever the tokenizer merges across the prefix's end. Otherwise (or
        when ``prefix`` is not the start of ``response``: a plugin task's own prefix) the prompt text
        is tokenized as it stands."""
        cut = self._prefix_cut(query, prefix, response, image is not None) if prefix and response is not None else None
        if cut is not None:
            full, raw_ids, k, n = cut
            item = self._item(self._process(full, image))
            T = int(item["input_ids"].shape[0])
            if k == 0 or item["input_ids"][T - k :].tolist() != raw_ids[-k:]:
                raise EncodingError("tokens after the prompt differ between the processor and the tokenizer")
            keep = T - k + n
            return {key: (v[:keep] if _is_seq(v, T) else v) for key, v in item.items()}
        text = self._render(query, None, image is not None)
        if prefix:
            text += self._sep + prefix
        return self._item(self._process(text, image))

    def prefix_tokens(self, query: str, prefix: str, response: str, image: bool = True) -> tuple[int, int] | None:
        """``(k, n)``: the training sequence of ``response`` has ``k`` tokens after the prompt, of
        which the first ``n`` spell ``prefix``, the start of ``response`` (text only: the image
        expands in the prompt alone). None when ``response`` does not start with ``prefix``.

        EncodingError when ``prefix`` ends inside a token of the training sequence, as with a
        tokenizer whose merges cross spaces (`</perception> <reasoning> try` as one token): no
        sequence of training tokens ends there, and the prefix tokenized alone is one the model
        never saw, so a generation forced to start there would not continue what was trained."""
        cut = self._prefix_cut(query, prefix, response, image)
        return cut[2:] if cut is not None else None

    def _prefix_cut(self, query: str, prefix: str, response: str, image: bool) -> tuple[str, list[int], int, int] | None:
        """`prefix_tokens`, with the training text and its tokenizer ids: ``(full, ids, k, n)``."""
        if not response.startswith(prefix):
            return None
        prompt = self._render(query, None, image)
        full = self._render(query, response, image)
        start = len(prompt)
        r0 = full.find(response, start)
        if not full.startswith(prompt) or r0 < 0:
            raise EncodingError("the rendered conversation does not contain the prompt and the response in order")
        end = r0 + len(prefix)
        raw = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(raw["input_ids"]), raw["offset_mapping"]
        if any(s < start < e for s, e in offsets):
            raise EncodingError("the prompt's tokens merge with the response's; generation would not match training")
        after = [(s, e) for s, e in offsets if s >= start]
        inside = next(((s, e) for s, e in after if s < end < e), None)
        if inside is not None:
            raise EncodingError(
                f"the counterfactual prefix ends inside the training token {full[inside[0] : inside[1]]!r}: the tokenizer merges "
                "across the end of p*, so no training sequence ends there and the prefix tokenized alone is one the model "
                "never saw; evaluate without the `reasoning` metric, or use a tokenizer that does not merge across spaces"
            )
        return full, ids, len(after), sum(1 for _, e in after if e <= end)

    def completion_roles(self, ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """[N, T] role ids of generated tokens (the same role rules as SFT targets), -1 after
        each row's ``lengths[i]`` tokens.

        A row's text is its decoded tokens; each token's character offsets come from
        re-tokenising that text when this gives back the same ids (the usual case), else
        from decoding growing prefixes (a sampled token sequence the tokenizer would not
        produce). Malformed text is tagged as written: an unclosed section runs to the end,
        uncovered text takes the `rest` role (or `other`), and tokens that decode to nothing
        (EOS) take the role of the text before them."""
        out = torch.full(ids.shape, -1, dtype=torch.long)
        for i, n in enumerate(int(x) for x in lengths):
            row = ids[i, :n].tolist()
            if not row:
                continue
            text, offsets = self._offsets(row)
            out[i, :n] = torch.tensor(token_roles(self.tagger.tag(text), text, offsets), dtype=torch.long)
        return out

    def _offsets(self, row: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """The decoded text of generated ids and each id's character span in it."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
        text = decode(row)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        special = set(self.tokenizer.all_special_ids)
        kept = [t for t in row if t not in special]
        if enc["input_ids"] == kept:
            it = iter(enc["offset_mapping"])
            return text, [(len(text), len(text)) if t in special else tuple(next(it)) for t in row]
        offsets, prev = [], 0
        for k in range(1, len(row) + 1):
            end = len(decode(row[:k]))
            offsets.append((min(prev, end), end))
            prev = end
        return text, offsets

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

    def target_text(self, response: str) -> str:
        """The assistant text a model writes for ``response`` (response + end-of-turn)."""
        return response + self._tail.rstrip()

    @staticmethod
    def _item(out: dict[str, torch.Tensor]) -> dict[str, Any]:
        T = out["input_ids"].shape[-1]
        item: dict[str, Any] = {}
        for key, v in out.items():
            # per-token tensors [1, T] → [T]; image tensors keep their leading (image) dim
            item[key] = v[0] if v.dim() == 2 and v.shape == (1, T) else v
        if "attention_mask" not in item:
            item["attention_mask"] = torch.ones(T, dtype=torch.long)
        return item


def _shift_roles(char_roles: np.ndarray, pre: int) -> np.ndarray:
    """Prepend ``pre`` characters (the template's separator) with the first role."""
    if pre <= 0:
        return char_roles
    first = char_roles[0] if len(char_roles) else 0
    return np.concatenate([np.full(pre, first, dtype=np.int64), char_roles])


def _is_seq(v: Any, T: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == T


def collate(items: list[dict[str, Any]], pad_token_id: int, length: int = 0) -> dict[str, Any]:
    """Batch encoded items: per-token tensors are padded (right for training items,
    left for prompt items, i.e. items without labels) to the longest item or ``length``,
    whichever is longer; image tensors are concatenated along their first dim; ints become
    a tensor."""
    left = "labels" not in items[0]
    T = max(max(int(it["input_ids"].shape[0]) for it in items), length)
    batch: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if not isinstance(vals[0], torch.Tensor):
            batch[key] = torch.tensor(vals)
        elif _is_seq(vals[0], int(items[0]["input_ids"].shape[0])):
            pad = pad_token_id if key == "input_ids" else _SEQ_PAD.get(key, 0)
            out = torch.full((len(vals), T), pad, dtype=vals[0].dtype)
            for i, v in enumerate(vals):
                n = v.shape[0]
                if left:
                    out[i, T - n :] = v
                else:
                    out[i, :n] = v
            batch[key] = out
        else:
            batch[key] = torch.cat(vals, dim=0)
    return batch


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without the training-only keys (labels, role ids, counts)."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
