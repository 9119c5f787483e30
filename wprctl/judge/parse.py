"""Reading a judge's reply into a verdict about the two *shown* responses.

A verdict is "A" (the response shown first is better), "B" (the one shown second), "E" (equal)
or None (unparseable: counted as invalid, never as a loss). Mapping shown positions back to the
models being compared is the runner's job (it knows the order).

Both parsers accept the usual ways models dress up an answer: markdown emphasis, quotes,
"Answer: B", "Summary A is better", "E (equal)", "tie", a JSON object inside a code fence or after
some prose, single-quoted pseudo-JSON. When a reply names several verdicts the *last* labelled one
wins, because models that reason before answering put the answer at the end.
"""

from __future__ import annotations

import json
import re
from typing import Literal

Verdict = Literal["A", "B", "E"]

_TIE_WORDS = {
    "e",
    "tie",
    "equal",
    "equally good",
    "equally helpful",
    "both",
    "same",
    "neither",
    "draw",
    "none",
}
# "Answer: A", "Preferred summary: B", "Choice - E", "More helpful: A", "verdict = 'B'"
_LABELLED = re.compile(
    r"(?:answer|choice|verdict|preferred|preference|winner|better|more helpful|decision)"
    r"(?:\s+(?:summary|response|reply|one|is))*\s*[:=\-]?\s*[\"'*(\[]*\s*"
    r"(?:summary|response|reply)?\s*\b([ABE]|tie|equal)\b",
    re.IGNORECASE,
)
# "Summary A is better", "Response B is more helpful", "A is better"
_IS_BETTER = re.compile(
    r"\b(?:summary|response|reply|option)?\s*\b([AB])\b\s+is\s+(?:the\s+)?"
    r"(?:better|more helpful|preferred|superior|stronger)",
    re.IGNORECASE,
)
_LEADING_LETTER = re.compile(r"^[\s*_`\"'(\[]*([ABE])[*_`\"')\]]*\s*(?:[.,:;!]|\s?[-\u2013(]|$)")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def _clean(token: str) -> str:
    return token.strip().strip("*_`\"'.,:;!()[]{}<> \t\n").strip()


def _letter(token: str) -> Verdict | None:
    t = _clean(token).lower()
    t = re.sub(r"^(?:summary|response|reply|option)\s+", "", t)
    if t in ("a", "b"):
        return t.upper()  # type: ignore[return-value]
    if t in _TIE_WORDS:
        return "E"
    return None


def parse_letter(reply: str | None) -> Verdict | None:
    """One-letter A/B/E answers and their common variants."""
    if not reply or not reply.strip():
        return None
    text = reply.strip()
    whole = _letter(text)
    if whole is not None:
        return whole
    # "E (equal)", "B - more concise", "**A**.", "A: ..." : a bare letter, then an aside. The letter
    # must be followed by punctuation, a dash/paren or the end, so "A summary ..." is not an answer.
    m = _LEADING_LETTER.match(text.splitlines()[0])
    if m:
        return m.group(1)  # type: ignore[return-value]
    labelled = _LABELLED.findall(text)
    if labelled:
        return _letter(labelled[-1])
    better = _IS_BETTER.findall(text)
    if better:
        return better[-1].upper()  # type: ignore[return-value]
    # A reasoning reply whose last line is the bare answer.
    last = _letter(text.splitlines()[-1])
    return last


def _json_candidates(text: str) -> list[str]:
    found = [m.group(1) for m in _FENCE.finditer(text)]
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                found.append(text[start : i + 1])
    return found


def parse_json_choice(reply: str | None) -> Verdict | None:
    """`{"comparison": ..., "choice": "A"}` and its variants; falls back to a labelled letter."""
    if not reply or not reply.strip():
        return None
    for candidate in reversed(_json_candidates(reply)):
        for attempt in (candidate, candidate.replace("'", '"')):
            try:
                obj = json.loads(attempt)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                keys = {str(k).lower(): v for k, v in obj.items()}
                for key in ("choice", "verdict", "answer", "winner", "more_helpful"):
                    if key in keys and isinstance(keys[key], str):
                        return _letter(keys[key])
    m = re.findall(r"[\"']?choice[\"']?\s*[:=]\s*[\"']?\s*([A-Za-z]+)", reply, re.IGNORECASE)
    if m:
        return _letter(m[-1])
    return parse_letter(reply)


def parse_verdict(reply: str | None, answer: Literal["letter", "json"]) -> Verdict | None:
    return parse_json_choice(reply) if answer == "json" else parse_letter(reply)
