"""The paper's prompt formats, in one place, and the instruction suffixes truncation must keep.

- TL;DR (openai/summarize_from_feedback): ``POST\\nSubreddit: r/{subreddit}\\n{post}\\nTL;DR: ``;
  CNN/DM rows (no post) use ``ARTICLE\\nSite: {site}\\n{article}\\nTL;DR: `` (the ``Site:`` line
  is dropped when the row has no site).
- APPS (codeparrot/apps): ``### Problem:\\n{question}\\n\\n### Response:\\n``.
- HH-RLHF (Dahoas/full-hh-rlhf): the ``prompt`` field as is (it ends with ``\\n\\nAssistant:``).
"""

from __future__ import annotations

TLDR_SUFFIX = "TL;DR: "
APPS_SUFFIX = "### Response:\n"
HH_SUFFIX = "\n\nAssistant:"

# Longest first so that a prompt ending with one of them is split at the longest match.
INSTRUCTION_SUFFIXES: tuple[str, ...] = tuple(
    sorted((TLDR_SUFFIX, APPS_SUFFIX, HH_SUFFIX, "TL;DR:"), key=len, reverse=True)
)


def tldr_prompt(subreddit: str | None, post: str) -> str:
    return f"POST\nSubreddit: r/{subreddit or ''}\n{post}\n{TLDR_SUFFIX}"


def article_prompt(site: str | None, article: str) -> str:
    site_line = f"Site: {site}\n" if site else ""
    return f"ARTICLE\n{site_line}{article}\n{TLDR_SUFFIX}"


def apps_prompt(question: str) -> str:
    return f"### Problem:\n{question}\n\n{APPS_SUFFIX}"


def split_instruction(prompt: str) -> tuple[str, str]:
    """(body, suffix): the suffix is the instruction tail that truncation must never cut."""
    for suffix in INSTRUCTION_SUFFIXES:
        if prompt.endswith(suffix):
            return prompt[: -len(suffix)], suffix
    return prompt, ""


def post_from_prompt(text: str) -> str:
    """The post (or article) inside a TL;DR-format prompt; a raw post comes back unchanged."""
    cut = text.rfind("TL;DR:")
    if cut >= 0:
        text = text[:cut]
    for head, meta in (("POST\n", "Subreddit:"), ("ARTICLE\n", "Site:")):
        if text.startswith(head):
            text = text[len(head) :]
            if text.startswith(meta):
                text = text.split("\n", 1)[1] if "\n" in text else ""
            break
    return text.strip()
