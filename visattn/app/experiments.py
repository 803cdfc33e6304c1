"""Classroom experiments: two or three training runs that differ in one setting, trained
one after the other and compared side by side (curves, final attention, accuracy).

>>> [e.key for e in EXPERIMENTS]
['similarity', 'pos_encoding', 'heads']
>>> [name for name, _ in experiment_runs(EXPERIMENTS[2], "lesson1", {"heads": 4, "width": 32})]
['lesson1-heads1', 'lesson1-heads8']
>>> [form["heads"] for _, form in experiment_runs(EXPERIMENTS[2], "lesson1", {"heads": 4, "width": 32})]
[1, 8]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Experiment:
    """A question answered by runs that differ only in the form setting ``setting``."""

    key: str
    question: str
    setting: str  # a keyword of visattn.app.runs.train_argv
    values: tuple[Any, ...]


EXPERIMENTS = (
    Experiment("similarity", "Dot product or cosine similarity: does the attention look elsewhere?",
               "similarity", ("dot", "cosine")),
    Experiment("pos_encoding", "Does attention need to know where things are? No positional encoding, "
               "a fixed sinusoidal one, or a learned bias per relative offset", "pos_encoding",
               ("none", "sinusoidal", "relative")),
    Experiment("heads", "One attention head or eight: what do more heads buy?", "heads", (1, 8)),
)


def experiment(key: str) -> Experiment:
    """The experiment called ``key``."""
    for e in EXPERIMENTS:
        if e.key == key:
            return e
    raise KeyError(key)


def experiment_runs(exp: Experiment, base: str, form: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(run name, form)]``: ``form`` with ``exp.setting`` set to each of ``exp.values``,
    named ``BASE-VALUE`` (``BASE-headsN`` for numbers)."""
    out = []
    for value in exp.values:
        suffix = f"{exp.setting}{value}" if isinstance(value, int) else str(value)
        out.append((f"{base}-{suffix}", {**form, exp.setting: value}))
    return out
