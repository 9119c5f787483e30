"""Judge prompt templates: loading (built-in names or user paths), rendering, and recovery.

A template is a TOML file with `system`, `user` (holding the placeholders `{{prompt}}`,
`{{response_a}}`, `{{response_b}}`), `answer` ("letter" or "json": which verdict parser applies),
`max_tokens` and `expected_completion_tokens` (for cost estimates). Built-ins live in
`templates/judge/` at the repository root; a user template is any such file given by path.

"response_a" is always the response *shown first*, whichever model wrote it: the runner decides
the order, the template only lays out text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import tomllib

import wprctl
from wprctl.errors import UserError

PLACEHOLDERS = ("prompt", "response_a", "response_b")
_PLACEHOLDER_RE = re.compile(r"\{\{(prompt|response_a|response_b)\}\}")
AnswerKind = Literal["letter", "json"]


def builtin_dir() -> Path:
    # a link to the source tree's templates/judge (a copy in a built wheel)
    return Path(wprctl.__file__).resolve().parent / "assets" / "templates" / "judge"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


@dataclass(frozen=True)
class JudgeTemplate:
    name: str
    system: str
    user: str
    answer: AnswerKind
    max_tokens: int
    expected_completion_tokens: int
    source: str

    @property
    def fingerprint(self) -> str:
        """Identity for the cache: editing a template's wording invalidates its cached verdicts."""
        blob = json.dumps([self.system, self.user, self.answer, self.max_tokens])
        return f"{self.name}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def render(self, prompt: str, response_a: str, response_b: str) -> list[dict[str, str]]:
        values = {
            "prompt": prompt.strip(),
            "response_a": response_a.strip(),
            "response_b": response_b.strip(),
        }
        # One regex pass, so placeholder-like text inside the responses is never substituted.
        user = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.user)
        messages = [{"role": "user", "content": user}]
        if self.system.strip():
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def recover(self, user_message: str) -> tuple[str, str, str] | None:
        """(prompt, response_a, response_b) from a user message this template rendered, or None."""
        m = _recovery_regex(self.user).fullmatch(user_message)
        if m is None:
            return None
        return m.group("prompt"), m.group("response_a"), m.group("response_b")

    def format_answer(self, choice: Literal["A", "B", "E"], comparison: str = "") -> str:
        """A well-formed reply choosing `choice` (A = first shown, B = second, E = equal)."""
        if self.answer == "letter":
            return choice
        return json.dumps(
            {"comparison": comparison or f"Reply {choice} is preferred.", "choice": choice}
        )


@cache
def _recovery_regex(user: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER_RE.split(user)
    # split() alternates literal text and placeholder names: lit, name, lit, name, lit, ...
    pattern = ""
    for i, part in enumerate(parts):
        pattern += re.escape(part) if i % 2 == 0 else f"(?P<{part}>.*?)"
    return re.compile(pattern, re.DOTALL)


def load_template(spec: str | Path) -> JudgeTemplate:
    """A built-in template by name (`summarize`, `hh-rlhf`) or a user template by path."""
    text = str(spec)
    path = Path(text).expanduser()
    looks_like_path = path.suffix == ".toml" or "/" in text or "\\" in text
    if not looks_like_path:
        path = builtin_dir() / f"{text}.toml"
        if not path.is_file():
            raise UserError(
                f"--template {text!r}: no built-in judge template of that name; built-ins: "
                f"{', '.join(builtin_names()) or '(none found in ' + str(builtin_dir()) + ')'}; "
                "or give the path of a .toml template"
            )
    elif not path.is_file():
        raise UserError(f"{path}: judge template file not found")
    return _load_file(path.resolve())


@cache
def _load_file(path: Path) -> JudgeTemplate:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read judge template: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: judge template is not valid TOML: {exc}") from None
    allowed = {
        "name",
        "description",
        "answer",
        "system",
        "user",
        "max_tokens",
        "expected_completion_tokens",
    }
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    user = raw.get("user")
    if not isinstance(user, str) or not user.strip():
        raise UserError(f"{path}: key 'user' (the user message with placeholders) is required")
    missing = [p for p in PLACEHOLDERS if user.count("{{" + p + "}}") != 1]
    if missing:
        raise UserError(
            f"{path}: the 'user' message must contain each of "
            f"{', '.join('{{' + p + '}}' for p in PLACEHOLDERS)} exactly once; "
            f"wrong count for {', '.join(missing)}"
        )
    answer = raw.get("answer", "letter")
    if answer not in ("letter", "json"):
        raise UserError(f'{path}: key \'answer\' must be "letter" or "json" (got {answer!r})')
    try:
        max_tokens = int(raw.get("max_tokens", 512))
        expected = int(raw.get("expected_completion_tokens", min(max_tokens, 64)))
    except (TypeError, ValueError):
        raise UserError(
            f"{path}: max_tokens and expected_completion_tokens must be integers"
        ) from None
    return JudgeTemplate(
        name=str(raw.get("name", path.stem)),
        system=str(raw.get("system", "")),
        user=user,
        answer=answer,
        max_tokens=max_tokens,
        expected_completion_tokens=expected,
        source=str(path),
    )


def template_for_task(task: str, override: str | Path | None) -> JudgeTemplate:
    return load_template(override if override else task)


def builtin_templates() -> list[JudgeTemplate]:
    return [load_template(name) for name in builtin_names()]


def match_builtin(user_message: str) -> tuple[JudgeTemplate, tuple[str, str, str]]:
    """Which built-in template rendered this user message, and the texts it was given."""
    for template in builtin_templates():
        texts = template.recover(user_message)
        if texts is not None:
            return template, texts
    raise ValueError("the message was not rendered by a built-in judge template")


def recover_pair(user_message: str) -> tuple[str, str, str]:
    """(prompt, response_a, response_b) from a rendered built-in template's user message.

    response_a is the response shown first. For a responder behind `JudgeServer`: pick the better
    one and reply with `match_builtin(msg)[0].format_answer("A" | "B" | "E")`.
    """
    return match_builtin(user_message)[1]
