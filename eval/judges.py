"""Judges: who decides which of two responses is better.

A judge takes a `Comparison` (one prompt, response A and response B) and returns a `Judgement`:
`A`, `B`, `tie`, `none` (the judge answered but named no winner) or `error` (no answer at all:
counted apart, never as a loss or a tie).

`ModelJudge` asks a judge model what a protocol (eval/protocols.py) asks, through a back end
(eval/backends.py: an OpenAI-compatible server, or a local Hugging Face chat model).

`RulesJudge` needs no model: the demo data's questions have checkable answers (the capital of a
country, a sum, a product, the larger of two decimals), so a response wins when it is correct and
the other is not. It gives real win rates offline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from preference_datasets import CAPITALS, PHRASINGS, Messages

VERDICTS = ("A", "B", "tie", "none", "error")


@dataclass(frozen=True)
class Comparison:
    """Response `a` (the evaluated model's) against `b` (the baseline's) to one prompt, at one turn.
    Multi-turn sets carry every turn's question and both models' answers (`turn` is 0-based)."""

    id: str
    prompt: Messages
    a: str
    b: str
    turn: int = 0
    questions: tuple[str, ...] = ()
    a_turns: tuple[str, ...] = ()
    b_turns: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    category: str = ""

    @property
    def key(self) -> str:
        """Unique within a judgement file: the prompt id, and the turn after the first."""
        return self.id if self.turn == 0 else f"{self.id}#turn{self.turn + 1}"


@dataclass(frozen=True)
class Judgement:
    verdict: str  # one of VERDICTS
    detail: str = ""  # why (the rules judge) or what failed
    requests: tuple = ()  # what a model judge was asked, message lists
    answers: tuple[str, ...] = ()  # and its raw answers


class JudgeError(RuntimeError):
    """A judge that could not answer (after its retries): the comparison is recorded as an error."""


class ModelJudge:
    """A judge model behind a back end (`complete(messages, max_tokens) -> text`), asked what a
    protocol asks (eval/protocols.py) and read the way it reads."""

    def __init__(self, protocol, backend):
        self.protocol, self.backend = protocol, backend
        self.name = f"{backend.name} / {protocol.name}"
        self.concurrency = getattr(backend, "concurrency", 1)
        self.settings = {"judge": backend.name, "protocol": protocol.name, "model": getattr(backend, "model_name", None),
                         "seed": getattr(protocol, "seed", None)}

    def judge(self, comparison: Comparison) -> Judgement:
        requests = self.protocol.requests(comparison)
        answers = tuple(self.backend.complete(request.messages, self.protocol.max_tokens) for request in requests)
        verdict = self.protocol.verdict(requests, answers)
        return Judgement(verdict, "", tuple(request.messages for request in requests), answers)


class RulesJudge:
    """Checks each response against the demo question's correct answer."""

    name = "rules"
    settings = {"judge": "rules"}

    def judge(self, comparison: Comparison) -> Judgement:
        question = comparison.prompt[-1]["content"]
        a, b = demo_answer_correct(question, comparison.a), demo_answer_correct(question, comparison.b)
        verdict = "A" if a and not b else "B" if b and not a else "tie"
        return Judgement(verdict, f"A {'correct' if a else 'wrong'}, B {'correct' if b else 'wrong'}")


def _pattern(phrasing: str) -> re.Pattern:
    return re.compile("^" + re.escape(phrasing).replace(r"\{\}", "(.+?)") + "$")


QUESTIONS = [(topic, _pattern(phrasing)) for topic, phrasings in PHRASINGS.items() for phrasing in phrasings]
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
COMPARATIVE = re.compile(r"\b(larger|greater|bigger|higher)\b", re.IGNORECASE)


def demo_question(question: str) -> tuple[str, tuple[str, ...]]:
    """The topic and the blanks of a demo question; `ValueError` for any other text."""
    for topic, pattern in QUESTIONS:
        match = pattern.match(question.strip())
        if match:
            return topic, match.groups()
    raise ValueError(f"not a demo question (the rules judge knows only the demo data's questions): {question[:80]!r}")


def demo_answer_correct(question: str, response: str) -> bool:
    """Whether `response` gives the correct answer to a demo question: the answer it states is the
    first city of the demo's table it names, the first number that is not an operand, or the
    number it calls larger."""
    topic, blanks = demo_question(question)
    if topic == "capitals":
        capital = CAPITALS[blanks[0]][0].split(",")[0]
        cities = [capital, *sorted({city.split(",")[0] for pair in CAPITALS.values() for city in pair} - {capital})]
        return _first_named(response, tuple(cities)) == 0
    if topic in ("addition", "times"):
        a, b = (int(blank) for blank in blanks)
        expected = a + b if topic == "addition" else a * b
        stated = [value for value in _numbers(response) if value not in (a, b)]
        return bool(stated) and stated[0] == expected
    stated = _called_larger(response)
    return stated is not None and stated == max(float(blank) for blank in blanks) and stated in {float(blank) for blank in blanks}


def _first_named(text: str, names: tuple[str, ...]) -> int | None:
    """Which of `names` the text mentions first (None: neither)."""
    found = [(match.start(), index) for index, name in enumerate(names) if (match := re.search(re.escape(name), text, re.IGNORECASE))]
    return min(found)[1] if found else None


def _numbers(text: str) -> list[float]:
    return [float(token.replace(",", "")) for token in NUMBER.findall(text)]


def _called_larger(text: str) -> float | None:
    """The number the text calls larger: the last one before the first comparative of its sentence
    ("9.9 is larger than 9.11"), else the first one after it ("The larger number is 9.9")."""
    match = COMPARATIVE.search(text)
    if match is None:
        return None
    sentence_start = max(text.rfind(mark, 0, match.start()) for mark in (". ", "! ", "? ", "\n")) + 1
    before, after = _numbers(text[sentence_start : match.start()]), _numbers(text[match.end() :])
    return before[-1] if before else after[0] if after else None
