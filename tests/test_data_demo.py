"""The demo task: deterministic generation, the gold oracle's behaviour, and the preference data
it labels (the oracle agrees with the chosen summary on >= 95% of pairs)."""

from __future__ import annotations

import statistics

import pytest

from wprctl.data import demo_tokenizer_corpus, generate_rows, oracle_breakdown, oracle_score
from wprctl.data.demo import CONCEPTS, LEXICON, POST_WORDS, _words
from wprctl.data.prompts import tldr_prompt

POST = (
    "my roommate borrowed my car 3 weeks ago. i tried to talk about it but it went badly. "
    "also my sister wants a new guitar. i am so angry right now. any advice?"
)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate_rows(1500, seed=3)


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    assert generate_rows(30, seed=5) == generate_rows(30, seed=5)
    other = generate_rows(30, seed=6)
    assert [r["info"]["post"] for r in other] != [
        r["info"]["post"] for r in generate_rows(30, seed=5)
    ]
    # validation is its own stream: no post is shared with train
    train = {r["info"]["post"] for r in generate_rows(300, seed=5)}
    val = {r["info"]["post"] for r in generate_rows(300, seed=5, split="validation")}
    assert not train & val


def test_rows_are_tldr_comparisons_with_small_closed_vocabulary(rows: list[dict]) -> None:
    row = rows[0]
    assert set(row) == {"info", "summaries", "choice", "worker", "batch", "split", "extra"}
    assert set(row["info"]) == {"id", "post", "title", "subreddit", "site", "article"}
    assert all(set(s) == {"text", "policy", "note"} for s in row["summaries"])
    assert row["choice"] in (0, 1) and isinstance(row["extra"]["confidence"], int)
    post_lens = [len(_words(r["info"]["post"])) for r in rows]
    sum_lens = [len(_words(s["text"])) for r in rows for s in r["summaries"]]
    assert min(post_lens) >= POST_WORDS[0] and max(post_lens) <= POST_WORDS[1]
    assert 4 <= statistics.median(sum_lens) <= 14
    vocab = {
        w
        for r in rows
        for t in [r["info"]["post"]] + [s["text"] for s in r["summaries"]]
        for w in _words(t)
    }
    assert 150 <= len(vocab) <= 400


def test_oracle_rewards_coverage_with_synonyms_and_penalizes_errors() -> None:
    perfect = "my roommate borrowed my car 3 weeks ago and i feel angry"
    assert oracle_score(POST, perfect) == pytest.approx(2.0)
    # synonyms are as good as the post's own words
    assert oracle_score(
        POST, "my flatmate took my vehicle three weeks ago, i am furious"
    ) == pytest.approx(2.0)
    assert oracle_score(POST, "") == pytest.approx(-1.0)
    # each dropped fact costs its share; a wrong detail costs more than dropping it
    dropped = oracle_score(POST, "my roommate borrowed my car 3 weeks ago")
    wrong = oracle_score(POST, "my roommate borrowed my car 3 weeks ago and i feel happy glad")
    assert dropped == pytest.approx(1.4) and wrong < dropped
    b = oracle_breakdown(POST, "my roommate borrowed my car 3 months ago, i am angry")
    assert b.wrong == 1 and "unit" not in b.covered
    # the aside's facts are true but irrelevant; repeats and rambling cost too
    assert oracle_breakdown(POST, perfect + " and my sister").irrelevant == 1
    assert oracle_breakdown(POST, "my car car car").repeats == 2
    long = perfect + " so yeah that is basically it honestly what do i even say"
    assert oracle_score(POST, long) < 2.0
    assert -2.0 <= oracle_score(POST, "dad dad mom boss phone tv sold " * 5) <= -1.5


def test_oracle_accepts_the_full_prompt(rows: list[dict]) -> None:
    for r in rows[:50]:
        info = r["info"]
        prompt = tldr_prompt(info["subreddit"], info["post"])
        for s in r["summaries"]:
            assert oracle_score(prompt, s["text"]) == oracle_score(info["post"], s["text"])


def test_oracle_prefers_chosen_on_95_percent_and_chosen_are_mixed_quality(rows: list[dict]) -> None:
    agree, chosen = 0, []
    for r in rows:
        post, texts = r["info"]["post"], [s["text"] for s in r["summaries"]]
        c, j = oracle_score(post, texts[r["choice"]]), oracle_score(post, texts[1 - r["choice"]])
        agree += c > j
        chosen.append(c)
    assert agree / len(rows) >= 0.95
    # the SFT targets leave room for RL: mediocre on average, few perfect
    assert 0.3 <= statistics.mean(chosen) <= 1.3
    assert sum(c == 2.0 for c in chosen) / len(chosen) <= 0.4


def test_every_fact_word_is_one_token_of_a_bpe_trained_on_the_corpus(tiny_tokenizer) -> None:
    multi = [
        w
        for w in LEXICON
        if len(tiny_tokenizer(" " + w, add_special_tokens=False)["input_ids"]) > 1
    ]
    assert multi == []
    assert sum(len(c) for s in CONCEPTS.values() for c in s.values()) == len(
        LEXICON
    )  # no word in two concepts
    corpus = list(demo_tokenizer_corpus(seed=1, n_posts=20))
    assert corpus == list(demo_tokenizer_corpus(seed=1, n_posts=20))
    assert any(t.startswith("POST\nSubreddit: r/") and "\nTL;DR: " in t for t in corpus)
