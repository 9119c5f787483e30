"""The demo task: synthetic "summarize a post" data with preferences and a known gold oracle.

What it is
    Short Reddit-like posts (12-40 words, lower case) about one incident: *someone did something
    to my thing some time ago, and I feel a certain way*, padded with neutral filler sentences,
    sentences that restate a fact with a synonym, and "aside" sentences about other people and
    things. A summary (4-14 words) should say who did what to which thing, when, and how the
    writer feels. Rows are in the TL;DR ``comparisons`` schema (info{id,post,title,subreddit,
    site,article}, summaries[{text,policy,note}], choice, worker, batch, split,
    extra{confidence}), so the ``tldr`` adapter reads them and prompts have the exact TL;DR
    format ``POST\\nSubreddit: r/{subreddit}\\n{post}\\nTL;DR: ``.

Vocabulary and synonyms
    About 270 distinct words. Every fact word belongs to a *concept* in one of six *slots*, and
    each concept has near-synonyms (e.g. car/vehicle/auto, mom/mother/mum, angry/mad/furious,
    three/3/few, week/weeks). Posts and summaries pick synonyms at random, so a summary can be
    right without copying the post's word; this gives embedding geometry (WPR's cost graph)
    something real to use. The full lexicon is :data:`CONCEPTS`.

What is a fact
    A post's *key facts* are the concepts mentioned in its non-aside sentences, one per slot:
    person (who acted), action, object, number and unit (when: "3 weeks ago") and feeling.
    Sentences that open with an aside word (also, btw, unrelated, separately) mention *minor*
    concepts: they are true but not what the summary is for.

The oracle (:func:`oracle_score`, gold preference function; higher is better)
    Words are ``[a-z0-9]+`` runs of the lower-cased summary. With slot weights person 1,
    action 1, object 1, number 0.5, unit 0.5, feeling 1 (total 5)::

        coverage = (sum of weights of key slots whose concept the summary mentions) / 5
        score = -1 + 3 * coverage
                - 0.75 * wrong        # fact words whose concept is not in the post (a wrong detail)
                - 0.3  * irrelevant   # minor concepts from aside sentences
                - 0.3  * repeats      # extra mentions of a concept or a non-function word
                - 0.15 * max(0, words - 14)
        clipped to [-2, 2]

    An empty summary scores -1, a perfect one 2 (e.g. "my roommate borrowed my car 3 weeks ago
    and i feel angry"). Each fact moves the score by 0.3-0.6, so the reward is graded, not a
    cliff. ``oracle_score`` accepts the raw post or the full TL;DR prompt.

The preference data
    Each row holds two summaries by a noisy writer whose quality q ~ U(0, 1) is drawn per
    summary: it drops facts, swaps in wrong details (rarely: P_SWAP), mentions aside facts,
    rambles past the length budget and repeats itself, each with a probability that falls with
    q. The chosen summary is the one the oracle prefers, except for 3% rater noise; pairs
    closer than MIN_MARGIN are redrawn. The chosen summaries (the SFT targets) average about
    1.2 under the oracle (the best possible is 2).

What a tiny reward model can learn here
    Most preferences show without reading the post: a dropped fact leaves a neutral phrase
    ("someone", "my stuff"), rambles are long, repeats repeat. A wrong detail shows only
    against the post. A 2-layer reward model trained for minutes does not learn that matching
    (with P_SWAP 0.35 its held-out accuracy levelled off at 0.74, where a scorer that never
    reads the post reaches 0.76), so wrong details are rare in the data and about 0.85
    held-out accuracy is reachable. The gold oracle still counts wrong details, so a policy
    that over-optimizes this reward model by inventing details loses gold score: the
    over-optimization a regularizer is there to limit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wprctl.data.prompts import post_from_prompt, tldr_prompt
from wprctl.jsonl import jsonl_text, write_text_atomic

# --------------------------------------------------------------------------------------------
# lexicon

SLOTS = ("person", "action", "object", "number", "unit", "feeling")
SLOT_WEIGHTS = {
    "person": 1.0,
    "action": 1.0,
    "object": 1.0,
    "number": 0.5,
    "unit": 0.5,
    "feeling": 1.0,
}
LENGTH_BUDGET = 14
# Short posts: a tiny model must learn to copy facts from them within a few hundred SFT steps.
POST_WORDS = (12, 40)

# slot -> concept -> synonyms (first = canonical). Single words only, so matching is by word.
CONCEPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "mom": ("mom", "mother", "mum"),
        "dad": ("dad", "father", "pops"),
        "sister": ("sister", "sis"),
        "brother": ("brother", "bro"),
        "friend": ("friend", "buddy", "pal"),
        "roommate": ("roommate", "flatmate", "housemate"),
        "boss": ("boss", "manager", "supervisor"),
        "coworker": ("coworker", "colleague"),
        "neighbor": ("neighbor", "neighbour"),
        "girlfriend": ("girlfriend", "gf"),
        "boyfriend": ("boyfriend", "bf"),
        "cousin": ("cousin",),
        "landlord": ("landlord",),
    },
    "action": {
        "broke": ("broke", "smashed", "wrecked"),
        "lost": ("lost", "misplaced"),
        "sold": ("sold", "pawned"),
        "borrowed": ("borrowed", "took"),
        "hid": ("hid", "stashed"),
        "scratched": ("scratched", "dented"),
        "gave": ("donated", "gifted"),
        "ruined": ("ruined", "destroyed"),
    },
    "object": {
        "car": ("car", "vehicle", "auto"),
        "phone": ("phone", "cellphone", "mobile"),
        "laptop": ("laptop", "computer", "notebook"),
        "bike": ("bike", "bicycle"),
        "dog": ("dog", "puppy", "pup"),
        "cat": ("cat", "kitten", "kitty"),
        "watch": ("watch", "wristwatch"),
        "guitar": ("guitar",),
        "couch": ("couch", "sofa"),
        "ring": ("ring",),
        "camera": ("camera", "cam"),
        "tv": ("tv", "television"),
        "wallet": ("wallet", "purse"),
        "keys": ("keys", "keychain"),
    },
    "number": {
        "2": ("two", "2", "couple"),
        "3": ("three", "3", "few"),
        "4": ("four", "4"),
        "5": ("five", "5"),
        "6": ("six", "6"),
        "7": ("seven", "7"),
        "8": ("eight", "8"),
        "9": ("nine", "9"),
        "10": ("ten", "10"),
        "11": ("eleven", "11"),
        "12": ("twelve", "12"),
    },
    "unit": {
        "hour": ("hours", "hrs"),
        "day": ("days", "day"),
        "week": ("weeks", "week", "wks"),
        "month": ("months", "month", "mos"),
        "year": ("years", "year", "yrs"),
    },
    "feeling": {
        "angry": ("angry", "mad", "furious"),
        "sad": ("sad", "upset", "heartbroken"),
        "worried": ("worried", "anxious", "nervous"),
        "confused": ("confused", "unsure", "puzzled"),
        "hurt": ("hurt", "betrayed"),
        "embarrassed": ("embarrassed", "ashamed"),
        "annoyed": ("annoyed", "irritated"),
        "relieved": ("relieved", "glad"),
    },
}

# word -> (slot, concept)
LEXICON: dict[str, tuple[str, str]] = {
    word: (slot, concept)
    for slot, concepts in CONCEPTS.items()
    for concept, words in concepts.items()
    for word in words
}
# singular unit words for "last week" style asides
_UNIT_SINGULAR = {"hour": "hour", "day": "day", "week": "week", "month": "month", "year": "year"}

ASIDE_OPENERS = ("also", "btw", "unrelated", "separately")

# Words that carry no content: repeating them is not penalized.
FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "so",
        "i",
        "my",
        "me",
        "it",
        "its",
        "is",
        "am",
        "was",
        "are",
        "to",
        "of",
        "for",
        "in",
        "on",
        "at",
        "with",
        "about",
        "that",
        "this",
        "ago",
        "feel",
        "feeling",
        "because",
        "now",
        "be",
        "been",
        "has",
        "have",
        "had",
        "just",
    ]
)

_SUBREDDITS = {
    "car": "cars", "bike": "bicycling", "dog": "pets", "cat": "pets", "phone": "techsupport",
    "laptop": "techsupport", "camera": "photography", "tv": "techsupport", "guitar": "guitar",
}  # fmt: skip
_GENERIC_SUBREDDITS = ("relationships", "tifu", "advice", "offmychest", "legaladvice")

# --------------------------------------------------------------------------------------------
# post templates ({P} person, {A} action, {O} object, {N} number, {U} unit, {F} feeling)

_KEY_SENTENCES = (
    "my {P} {A} my {O} {N} {U} ago.",
    "{N} {U} ago my {P} {A} my {O}.",
    "so {N} {U} ago, my {P} {A} my {O}.",
    "about {N} {U} ago my {P} {A} my {O} without asking.",
    "my {P} {A} my {O} about {N} {U} ago and did not even tell me.",
)
_FEELING_SENTENCES = (
    "i am so {F} right now.",
    "honestly i feel {F} about the whole thing.",
    "it left me {F}.",
    "i have been {F} ever since.",
    "i am really {F} and cannot stop thinking about it.",
)
_RESTATE_SENTENCES = (
    "that {O} meant a lot to me.",
    "i paid for that {O} myself.",
    "the {O} was basically new.",
    "my {P} says it was not a big deal.",
    "i talked to my {P} and got nowhere.",
)
_FILLERS = (
    "we have known each other for a long time.",
    "i did not say anything at first.",
    "it was a normal evening and i was at home.",
    "i tried to talk about it but it went badly.",
    "nobody else seems to care.",
    "i do not want to overreact.",
    "we usually get along pretty well.",
    "this is not the first time something like this happened.",
    "i had just come back from the store.",
    "things have been tense at home since then.",
    "i work long shifts and rarely have free time.",
    "money is tight for me right now.",
)
_ASIDES = (
    "{X} my {p} {a} a {o} last {u}.",
    "{X} my {p} has been {f} lately.",
    "{X} my {p} wants a new {o}.",
    "{X} my {p} is {f} about the {o}.",
)
_ASKS = (
    "what should i do?",
    "am i overreacting?",
    "any advice?",
    "how do i bring this up?",
    "should i ask them to pay me back?",
    "is it worth ending things over this?",
)

# summary templates; a missing slot is realized by the neutral words in _MISSING
_SUMMARY_TEMPLATES = (
    "{subj} {verb} {obj} {time}, i am {F}",
    "{subj} {verb} {obj} {time} and i feel {F}",
    "feeling {F} because {subj} {verb} {obj} {time}",
    "{subj} {verb} {obj} {time}. {F}.",
)
_MISSING = {
    "subj": ("someone", "they"),
    "verb": ("messed with", "did something to"),
    "obj": ("my stuff", "my things"),
}
_RAMBLES = (
    "not sure what to do now honestly",
    "any advice would help a lot",
    "so yeah that is basically it",
    "and it is really getting to me",
    "what do i even say to them",
)

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# --------------------------------------------------------------------------------------------
# oracle


@dataclass(frozen=True)
class PostFacts:
    key: dict[str, frozenset[str]]  # slot -> concepts in non-aside sentences
    minor: frozenset[tuple[str, str]]  # (slot, concept) only in aside sentences


@dataclass(frozen=True)
class OracleBreakdown:
    score: float
    coverage: float
    covered: tuple[str, ...]
    wrong: int
    irrelevant: int
    repeats: int
    words: int


@functools.lru_cache(maxsize=65536)
def parse_post(text: str) -> PostFacts:
    """Key and minor facts of a post (or of a TL;DR prompt holding it)."""
    post = post_from_prompt(text).lower()
    key: dict[str, set[str]] = {s: set() for s in SLOTS}
    minor: set[tuple[str, str]] = set()
    for sentence in re.split(r"[.!?\n]+", post):
        words = _words(sentence)
        if not words:
            continue
        aside = words[0] in ASIDE_OPENERS
        for w in words:
            hit = LEXICON.get(w)
            if hit is None:
                continue
            if aside:
                minor.add(hit)
            else:
                key[hit[0]].add(hit[1])
    minor_only = frozenset(m for m in minor if m[1] not in key[m[0]])
    return PostFacts({s: frozenset(c) for s, c in key.items()}, minor_only)


def oracle_breakdown(prompt_or_post: str, summary: str) -> OracleBreakdown:
    facts = parse_post(prompt_or_post)
    words = _words(summary)
    mentioned: dict[str, set[str]] = {s: set() for s in SLOTS}
    wrong = irrelevant = 0
    units: Counter[str] = Counter()
    for w in words:
        hit = LEXICON.get(w)
        if hit is None:
            if w not in FUNCTION_WORDS:
                units[w] += 1
            continue
        slot, concept = hit
        units[f"{slot}:{concept}"] += 1
        if units[f"{slot}:{concept}"] > 1:
            continue  # counted once; the extra mention is a repeat
        if concept in facts.key[slot]:
            mentioned[slot].add(concept)
        elif hit in facts.minor:
            irrelevant += 1
        else:
            wrong += 1
    covered = tuple(s for s in SLOTS if mentioned[s])
    total = sum(SLOT_WEIGHTS[s] for s in SLOTS if facts.key[s])
    coverage = sum(SLOT_WEIGHTS[s] for s in covered) / total if total else 0.0
    repeats = sum(n - 1 for n in units.values())
    raw = (
        -1.0
        + 3.0 * coverage
        - 0.75 * wrong
        - 0.3 * irrelevant
        - 0.3 * repeats
        - 0.15 * max(0, len(words) - LENGTH_BUDGET)
    )
    return OracleBreakdown(
        score=max(-2.0, min(2.0, raw)),
        coverage=coverage,
        covered=covered,
        wrong=wrong,
        irrelevant=irrelevant,
        repeats=repeats,
        words=len(words),
    )


def oracle_score(prompt_or_post: str, summary: str) -> float:
    """The demo task's gold reward of `summary` for a post (raw, or the full TL;DR prompt)."""
    return oracle_breakdown(prompt_or_post, summary).score


# --------------------------------------------------------------------------------------------
# generator


@dataclass
class _Scenario:
    key: dict[str, str]  # slot -> concept
    words: dict[str, str] = field(
        default_factory=dict
    )  # slot -> the word the incident sentence used
    minor: list[dict[str, str]] = field(default_factory=list)


def _syn(rng: random.Random, slot: str, concept: str) -> str:
    return rng.choice(CONCEPTS[slot][concept])


def _other(rng: random.Random, slot: str, *exclude: str) -> str:
    return rng.choice([c for c in CONCEPTS[slot] if c not in exclude])


def _make_post(rng: random.Random) -> tuple[_Scenario, str, str, str]:
    key = {s: rng.choice(list(CONCEPTS[s])) for s in SLOTS}
    sc = _Scenario(key)

    def fill(template: str, words: dict[str, str] | None = None) -> str:
        w = words or {s: _syn(rng, s, key[s]) for s in SLOTS}
        return template.format(
            P=w["person"], A=w["action"], O=w["object"], N=w["number"], U=w["unit"], F=w["feeling"]
        )

    for _attempt in range(50):
        sc.minor = []
        sc.words = {s: _syn(rng, s, key[s]) for s in SLOTS}
        body = [
            fill(rng.choice(_KEY_SENTENCES), sc.words),
            fill(rng.choice(_FEELING_SENTENCES), sc.words),
        ]
        for t in rng.sample(_RESTATE_SENTENCES, rng.randint(0, 1)):
            body.append(fill(t))
        body += rng.sample(_FILLERS, rng.randint(0, 1))
        asides = []
        for _ in range(rng.choice((0, 1))):
            m = {
                s: _other(rng, s, key[s]) for s in ("person", "action", "object", "unit", "feeling")
            }
            sc.minor.append(m)
            asides.append(
                rng.choice(_ASIDES).format(
                    X=rng.choice(ASIDE_OPENERS),
                    p=_syn(rng, "person", m["person"]),
                    a=_syn(rng, "action", m["action"]),
                    o=_syn(rng, "object", m["object"]),
                    u=_UNIT_SINGULAR[m["unit"]],
                    f=_syn(rng, "feeling", m["feeling"]),
                )
            )
        # the incident comes first; everything else in a shuffled order, the question last
        rest = body[1:] + asides
        rng.shuffle(rest)
        sentences = [body[0], *rest, rng.choice(_ASKS)]
        post = " ".join(sentences)
        if POST_WORDS[0] <= len(_words(post)) <= POST_WORDS[1]:
            break
    title = fill("my {P} {A} my {O}")
    subreddit = _SUBREDDITS.get(key["object"]) or rng.choice(_GENERIC_SUBREDDITS)
    if rng.random() < 0.4:
        subreddit = rng.choice(_GENERIC_SUBREDDITS)
    return sc, post, title, subreddit


# How often a writer reuses the post's own word for a fact rather than a synonym. Summaries that
# often copy make the task learnable by a tiny model in minutes; the synonyms that remain keep
# the semantic structure WPR's cost graph uses.
P_REUSE = 0.75
# How often (at quality 0) a writer swaps a fact for a wrong one.
P_SWAP = 0.1
# Pairs closer than this under the oracle are redrawn: raters compare summaries that differ.
MIN_MARGIN = 0.3


def _reuse(rng: random.Random, sc: _Scenario, slot: str) -> str:
    if sc.words.get(slot) and rng.random() < P_REUSE:
        return sc.words[slot]
    return _syn(rng, slot, sc.key[slot])


def write_summary(rng: random.Random, sc: _Scenario, quality: float) -> str:
    """A summary by the noisy writer: the lower `quality`, the more it drops, swaps and rambles."""
    p_keep = 0.4 + 0.55 * quality
    p_swap = P_SWAP * (1 - quality)
    used_minor = {(s, c) for m in sc.minor for s, c in m.items()}

    def pick(slot: str) -> str | None:
        if rng.random() >= p_keep:
            return None
        concept = sc.key[slot]
        if rng.random() < p_swap:
            taken = {c for s, c in used_minor if s == slot}
            concept = _other(rng, slot, sc.key[slot], *taken)
            return _syn(rng, slot, concept)
        return _reuse(rng, sc, slot)

    person, action, obj, feeling = pick("person"), pick("action"), pick("object"), pick("feeling")
    time = ""
    if rng.random() < p_keep:
        number = sc.key["number"]
        unit = sc.key["unit"]
        if rng.random() < p_swap / 2:
            number = _other(rng, "number", number)
        if rng.random() < p_swap / 2:
            unit = _other(rng, "unit", unit, *(c for s, c in used_minor if s == "unit"))
        n_word = (
            _reuse(rng, sc, "number") if number == sc.key["number"] else _syn(rng, "number", number)
        )
        u_word = _reuse(rng, sc, "unit") if unit == sc.key["unit"] else _syn(rng, "unit", unit)
        time = f"{n_word} {u_word} ago"
    parts = {
        "subj": f"my {person}" if person else rng.choice(_MISSING["subj"]),
        "verb": action or rng.choice(_MISSING["verb"]),
        "obj": f"my {obj}" if obj else rng.choice(_MISSING["obj"]),
        "time": time,
    }
    if feeling:
        text = rng.choice(_SUMMARY_TEMPLATES).format(F=feeling, **parts)
    else:
        text = "{subj} {verb} {obj} {time}".format(**parts)
    noise = 1 - quality
    text = text.rstrip(".")
    if obj and rng.random() < 0.35 * noise:  # repetition
        text += f", the {obj} {rng.choice(('!', 'again', obj))}"
    if sc.minor and rng.random() < 0.4 * noise:  # an aside fact
        m = rng.choice(sc.minor)
        text += rng.choice(
            (
                f" and my {_syn(rng, 'person', m['person'])} is {_syn(rng, 'feeling', m['feeling'])}",
                f", also my {_syn(rng, 'person', m['person'])}",
                f" plus the {_syn(rng, 'object', m['object'])}",
            )
        )
    if rng.random() < 0.5 * noise:  # rambling past the length budget
        text += ", " + rng.choice(_RAMBLES)
    return " ".join(text.split()).replace(" ,", ",").replace(" .", ".")


def generate_rows(n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """`n` comparison rows in the TL;DR `comparisons` schema, deterministic in (seed, split)."""
    rng = random.Random(f"wprctl-demo:{seed}:{split}")
    rows = []
    for i in range(n):
        sc, post, title, subreddit = _make_post(rng)
        q1, q2 = rng.random(), rng.random()
        s1 = write_summary(rng, sc, q1)
        s2 = write_summary(rng, sc, q2)
        r1, r2 = oracle_score(post, s1), oracle_score(post, s2)
        for _ in range(20):  # redraw near-ties so that every pair has a real preference
            if abs(r1 - r2) >= MIN_MARGIN:
                break
            q2 = rng.random()
            s2 = write_summary(rng, sc, q2)
            r2 = oracle_score(post, s2)
        choice = 0 if r1 >= r2 else 1
        if rng.random() < 0.03:  # rater noise
            choice = 1 - choice
        margin = abs(r1 - r2)
        rows.append(
            {
                "info": {
                    "id": f"demo-{split}-{seed}-{i:06d}",
                    "post": post,
                    "title": title,
                    "subreddit": subreddit,
                    "site": None,
                    "article": None,
                },
                "summaries": [
                    # a leading space, as in the real data (its prompts ended in "TL;DR:")
                    {"text": " " + s1, "policy": f"demo-writer-q{q1:.2f}", "note": None},
                    {"text": " " + s2, "policy": f"demo-writer-q{q2:.2f}", "note": None},
                ],
                "choice": choice,
                "worker": "demo-oracle",
                "batch": f"demo-{split}",
                "split": "train" if split == "train" else "valid1",
                "extra": {"confidence": min(9, 1 + int(margin * 3))},
            }
        )
    return rows


def demo_split_seed(seed: int, split: str) -> int:
    """Each split gets its own generator seed, so validation posts are not training posts."""
    return seed if split == "train" else seed + 1_000_003


def demo_rows(seed: int, split: str, n: int) -> list[dict[str, Any]]:
    name = "train" if split == "train" else "validation"
    return generate_rows(n, demo_split_seed(seed, split), name)


def demo_file(folder: Path, seed: int, split: str, n: int) -> Path:
    return folder / f"demo-seed{seed}-{split}-{n}.jsonl"


def kept_demo_rows(folder: Path, seed: int, split: str, n: int) -> list[dict[str, Any]]:
    """`demo_rows`, kept as jsonl in `folder` (``demo_file``) for the next run and for a look.

    Generating the demo's 40000 training rows takes 10-20 s, and every stage of a project reads
    them; reading the file back takes under a second. A file is read back only when its key
    (``.<name>.key`` beside it) records this generator (the hash of its source and the Python
    version: ``random``'s draws may change between versions) and the file's own sha256, so an
    edited, truncated or stale file is generated again and replaced, never used. Keeping is
    best effort: where the folder cannot take the file, the run goes on with the rows it made
    and says so."""
    path = demo_file(folder, seed, split, n)
    key_path = path.with_name(f".{path.name}.key")
    want = _generator_key(seed, split, n)
    try:
        key = json.loads(key_path.read_text(encoding="utf-8"))
        data = path.read_bytes()
        if key == {**want, "sha256": hashlib.sha256(data).hexdigest()}:
            # split on "\n" only: splitlines would also split at characters JSON leaves raw
            return [json.loads(line) for line in data.decode("utf-8").split("\n")[:-1]]
    except (OSError, ValueError, TypeError):
        pass  # no file, or not one of ours: generate it
    if path.exists():
        _say(f"{path} does not match its key {key_path.name} (edited, truncated, or from another "
             "version of the generator): generating the demo rows again")  # fmt: skip
    rows = demo_rows(seed, split, n)
    text = jsonl_text(rows)
    try:
        write_text_atomic(path, text)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        write_text_atomic(key_path, json.dumps({**want, "sha256": digest}) + "\n")
    except OSError as exc:
        _say(f"could not keep the demo rows in {path} ({exc.strerror or exc}); this run uses the "
             "rows it generated, and the next one generates them again")  # fmt: skip
    return rows


def _say(message: str) -> None:
    from wprctl.console import err_console, is_main_process

    if is_main_process():
        err_console.print(f"[yellow]note:[/] {message}", soft_wrap=True)


@functools.cache
def _source_hash() -> str:
    # this module and the prompt helpers it calls
    here = Path(__file__)
    return hashlib.sha256(here.read_bytes() + here.with_name("prompts.py").read_bytes()).hexdigest()


def _generator_key(seed: int, split: str, n: int) -> dict[str, Any]:
    version = ".".join(map(str, sys.version_info[:2]))
    return {"generator": _source_hash(), "python": version, "seed": seed, "split": split, "n": n}


def demo_tokenizer_corpus(seed: int = 0, n_posts: int = 3000) -> Iterator[str]:
    """Text to train the tiny BPE tokenizer on: every lexicon word, then full TL;DR prompts
    with their summaries, from a generator stream separate from the train/validation data."""
    vocab = sorted({w for words in _all_template_words() for w in words})
    for _ in range(3):  # each word several times so that BPE merges it into a single token
        yield " ".join(vocab)
    for row in generate_rows(n_posts, seed, split="tokenizer"):
        info = row["info"]
        prompt = tldr_prompt(info["subreddit"], info["post"])
        for s in row["summaries"]:
            yield prompt + s["text"].lstrip()


def _all_template_words() -> Iterator[list[str]]:
    yield list(LEXICON)
    for group in (_KEY_SENTENCES, _FEELING_SENTENCES, _RESTATE_SENTENCES, _FILLERS, _ASIDES,
                  _ASKS, _SUMMARY_TEMPLATES, _RAMBLES, *_MISSING.values()):  # fmt: skip
        for t in group:
            yield [w for w in _words(re.sub(r"\{\w+\}", " ", t))]
    yield list(ASIDE_OPENERS) + list(_UNIT_SINGULAR.values())
