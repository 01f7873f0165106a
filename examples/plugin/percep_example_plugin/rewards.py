"""Runtime side of the example plugin's reward term (used by GRPO stages)."""


def brevity(completion: str, max_words: int = 60, **_: object) -> float:
    n = len(completion.split())
    return 1.0 if n <= max_words else max(0.0, 2.0 - n / max_words)
