"""Runtime side of the example plugin's reward term (used by GRPO stages).

A reward term is called once per *group* (the G completions sampled for one prompt) and
returns one value per completion: ``term(group, **params) -> list[float]``. ``group`` is a
``percepdsl_runtime.rewards.RolloutGroup``: ``completions`` (texts), ``scores`` (the task's
verdicts), ``perceptions`` (parsed perceptions), ``sample`` (the prompt's task sample).
Parameters come from the spec as keyword arguments; accept ``**_`` for the rest.
"""

from collections.abc import Sequence
from typing import Any


def brevity(group: Any, max_words: int = 60, **_: object) -> Sequence[float]:
    """1 for completions at most ``max_words`` words long, decaying linearly to 0 at twice that."""
    return [brevity_of(text, max_words) for text in group.completions]


def brevity_of(completion: str, max_words: int = 60) -> float:
    n = len(completion.split())
    return 1.0 if n <= max_words else max(0.0, 2.0 - n / max_words)
