"""Train and evaluate a spec from Python, with a reward term written in Python.

    python examples/api/train_from_python.py [--out runs]

`concise` has TRL's reward signature, `fn(completions, **kwargs) -> list[float]`: the keyword
arguments are the prompts and the task fields of each completion's prompt (`perception`,
`ground_truth`, `instance`, `image`, ...; see `percepdsl.api`). Its keyword-only parameter
`max_words` becomes a parameter in the spec: `concise(max_words = 12)`. No packaging is needed:
`register_reward` makes the term known to the checker and to runs in this process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from percepdsl import api

SPEC = Path(__file__).with_name("python_reward.pd")


def concise(completions: list[str], *, max_words: int = 40, **kwargs) -> list[float]:
    """1 for a completion of at most `max_words` words that ends its answer section, else 0."""
    return [float(len(c.split()) <= max_words and c.rstrip().endswith("</answer>")) for c in completions]


def main(out: str | Path = "runs") -> dict:
    api.register_reward("concise", concise, surrogate=False)  # it reads no perception labels, but it is no perception surrogate
    summary = api.run_spec(SPEC, set={"seed": 1}, out=out)  # the same run as `percep run SPEC --set seed=1`
    final = summary["final"]
    print(
        f"{summary['run_dir']}: end_to_end={final['end_to_end']:.3f} perception={final['perception']:.3f} reasoning={final['reasoning']:.3f}"
    )
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs", help="parent of the run directory")
    main(parser.parse_args().out)
