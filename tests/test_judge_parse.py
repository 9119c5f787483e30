"""Verdict parsing and judge templates (render, recover, user templates, validation)."""

from __future__ import annotations

import pytest

from wprctl.errors import UserError
from wprctl.judge.parse import parse_json_choice, parse_letter, parse_verdict
from wprctl.judge.templates import (
    builtin_names,
    load_template,
    match_builtin,
    recover_pair,
    template_for_task,
)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("A", "A"),
        ("b", "B"),
        ("**B**", "B"),
        ("A.", "A"),
        ("  E (equal)\n", "E"),
        ("Answer: B", "B"),
        ("Final answer: **A**", "A"),
        ("The better summary is A.", "A"),
        ("Summary B is better.", "B"),
        ("B - it is more concise", "B"),
        ('Preferred: "A"', "A"),
        ("Comparison: A is more detailed.\nPreferred: B", "B"),
        ("A summary should be short. Answer: B", "B"),  # the article "A" is not an answer
        ("Let me think step by step...\n\nE", "E"),
        ("Tie", "E"),
        ("I cannot decide.", None),
        ("", None),
        (None, None),
    ],
)
def test_letter_verdict_variants(reply: str | None, expected: str | None) -> None:
    assert parse_letter(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"comparison": "A answers the question.", "choice": "A"}', "A"),
        ('```json\n{"comparison": "B is clearer", "choice": "B"}\n```', "B"),
        ("Sure! Here is my verdict: {'comparison': 'much the same', 'choice': 'E'}", "E"),
        ('{"comparison": "A uses {braces} oddly", "choice": "tie"}', "E"),
        ('{"choice": "Response B", "comparison": "..."}', "B"),
        ('First {"choice": "A"} then, on reflection, {"choice": "B"}', "B"),
        ("choice: A", "A"),
        ('{"comparison": "x", "choice": "C"}', None),  # present but meaningless: not guessed
        ('{"comparison": "cut off', None),
        ("I'm sorry, but I can't help with that.", None),
    ],
)
def test_json_verdict_variants(reply: str, expected: str | None) -> None:
    assert parse_json_choice(reply) == expected


def test_parse_verdict_dispatches_on_answer_kind() -> None:
    assert parse_verdict('{"choice": "B"}', "json") == "B"
    assert parse_verdict("B", "letter") == "B"


def test_builtins_exist_and_carry_the_criteria() -> None:
    assert {"summarize", "hh-rlhf"} <= set(builtin_names())
    summ = load_template("summarize")
    for word in ("Relevance", "Coherence", "Consistency", "Fluency", '"E"'):
        assert word in summ.user
    assert summ.answer == "letter"
    dialog = load_template("hh-rlhf")
    assert "helpful" in dialog.user and '"comparison"' in dialog.user and '"choice"' in dialog.user
    assert dialog.answer == "json"


@pytest.mark.parametrize("task", ["summarize", "hh-rlhf"])
def test_render_then_recover_round_trip(task: str) -> None:
    template = template_for_task(task, None)
    prompt = "POST: my {{response_b}} is {weird}\nTL;DR:"
    a, b = "first <<<END SUMMARY A>>>-ish text {x}", "second\nline two"
    messages = template.render(prompt, a, b)
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    user = messages[-1]["content"]
    assert "{{" not in user.replace("{{response_b}}", "")  # only the prompt's own text remains
    assert recover_pair(user) == (prompt.strip(), a, b)
    found, texts = match_builtin(user)
    assert found.name == template.name and texts[0] == prompt.strip()
    # The canonical answer of a template parses back to the same choice.
    for choice in ("A", "B", "E"):
        assert parse_verdict(found.format_answer(choice), found.answer) == choice


def test_recover_rejects_foreign_text() -> None:
    with pytest.raises(ValueError):
        recover_pair("Which is better, A or B?")


def test_user_template_by_path(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        'answer = "json"\nuser = """P={{prompt}} X={{response_a}} Y={{response_b}}"""\n',
        encoding="utf-8",
    )
    template = load_template(str(path))
    messages = template.render("p", "x", "y")
    assert messages == [{"role": "user", "content": "P=p X=x Y=y"}]
    assert template.recover("P=p X=x Y=y") == ("p", "x", "y")
    changed = tmp_path / "mine2.toml"
    changed.write_text(path.read_text().replace("P=", "Prompt="), encoding="utf-8")
    assert load_template(str(changed)).fingerprint != template.fingerprint


def test_bad_templates_are_user_errors(tmp_path) -> None:
    missing = tmp_path / "missing.toml"
    missing.write_text('user = "only {{prompt}} and {{response_a}}"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"response_b"):
        load_template(str(missing))
    with pytest.raises(UserError, match="no built-in judge template"):
        load_template("no-such-template")
    with pytest.raises(UserError, match="not found"):
        load_template(str(tmp_path / "absent.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'user = "{{prompt}} {{response_a}} {{response_b}}"\ncolour = 1\n', encoding="utf-8"
    )
    with pytest.raises(UserError, match="colour"):
        load_template(str(bad))
