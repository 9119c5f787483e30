"""openai/summarize_from_feedback, config `comparisons` (also CNN/DM rows and the demo task).

A row is one human comparison: `info` (id, post, title, subreddit, site, article), two
`summaries` ({text, policy, note}) and `choice` (the preferred index). chosen =
summaries[choice], rejected = the other. Summary texts carry a leading space in the data
(their prompts ended in "TL;DR:"); the prompt here ends in "TL;DR: ", so responses are stripped.
"""

from __future__ import annotations

from typing import Any

from wprctl.data.base import Example, RawRow, SkipRow, as_row, get_field, register, text_field
from wprctl.data.prompts import article_prompt, tldr_prompt


class TldrAdapter:
    name = "tldr"
    hub_id: str | None = "openai/summarize_from_feedback"
    hub_config: str | None = "comparisons"

    def parse(self, raw: RawRow, cfg: Any) -> Example:
        row = as_row(raw)
        info = get_field(row, "info")
        if not isinstance(info, dict):
            raise SkipRow("field 'info' is not an object")
        post = info.get("post")
        if isinstance(post, str) and post.strip():
            text_field(row, "info.post")
            subreddit = text_field(row, "info.subreddit")
            prompt = tldr_prompt(subreddit, post)
        elif isinstance(info.get("article"), str) and info["article"].strip():
            article = text_field(row, "info.article")
            site = info.get("site") if isinstance(info.get("site"), str) else None
            prompt = article_prompt(site, article or "")
        elif post is None and info.get("article") is None:
            raise SkipRow("missing field 'info.post'")
        else:
            raise SkipRow("empty field 'info.post'")
        summaries = get_field(row, "summaries")
        if not isinstance(summaries, list) or len(summaries) != 2:
            raise SkipRow("summaries is not a pair")
        choice = get_field(row, "choice")
        if isinstance(choice, bool) or choice not in (0, 1):
            raise SkipRow("invalid choice", f"got {choice!r}")
        if not all(isinstance(s, dict) for s in summaries):
            raise SkipRow("summaries is not a pair")
        texts = [text_field(s, "text") or "" for s in summaries]
        chosen, rejected = texts[choice].strip(), texts[1 - choice].strip()
        policies = [s.get("policy") for s in summaries]
        meta = {
            "post_id": info.get("id"),
            "title": info.get("title"),
            "subreddit": info.get("subreddit"),
            "site": info.get("site"),
            "chosen_policy": policies[choice],
            "rejected_policy": policies[1 - choice],
            "confidence": (row.get("extra") or {}).get("confidence"),
            "split": row.get("split"),
        }
        return Example(id=str(info.get("id") or f"row{raw.index}"), prompt=prompt,
                       chosen=chosen, rejected=rejected, meta=meta)  # fmt: skip


register(TldrAdapter())


class DemoAdapter(TldrAdapter):
    """The synthetic demo task (wprctl.data.demo) is generated in the TL;DR comparisons schema."""

    name = "demo"
    hub_id = None
    hub_config = None


register(DemoAdapter())
