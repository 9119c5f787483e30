"""Dahoas/full-hh-rlhf (prompt, response, chosen, rejected); also reads Anthropic/hh-rlhf rows
(chosen, rejected only), splitting both at their last "\\n\\nAssistant:" the way Dahoas built it."""

from __future__ import annotations

from typing import Any

from wprctl.data.base import Example, RawRow, SkipRow, as_row, register, text_field
from wprctl.data.prompts import HH_SUFFIX


class HHRLHFAdapter:
    name = "hh-rlhf"
    hub_id: str | None = "Dahoas/full-hh-rlhf"
    hub_config: str | None = None

    def parse(self, raw: RawRow, cfg: Any) -> Example:
        row = as_row(raw)
        if "prompt" not in row and "response" not in row and "chosen" in row:
            return self._anthropic(raw, row)
        prompt = text_field(row, "prompt") or ""
        chosen = text_field(row, "chosen", required=False)
        if chosen is None:
            chosen = text_field(row, "response", required=False)
        if chosen is None:
            raise SkipRow("missing field 'chosen'")
        rejected = text_field(row, "rejected", required=False)
        rid = row.get("id")
        return Example(id=str(rid) if rid is not None else f"hh-{raw.index}", prompt=prompt,
                       chosen=chosen, rejected=rejected)  # fmt: skip

    def _anthropic(self, raw: RawRow, row: dict[str, Any]) -> Example:
        full_chosen = text_field(row, "chosen") or ""
        full_rejected = text_field(row, "rejected") or ""
        cut_c = full_chosen.rfind(HH_SUFFIX)
        cut_r = full_rejected.rfind(HH_SUFFIX)
        if cut_c < 0 or cut_r < 0:
            raise SkipRow("no '\\n\\nAssistant:' turn")
        prompt = full_chosen[: cut_c + len(HH_SUFFIX)]
        if full_rejected[: cut_r + len(HH_SUFFIX)] != prompt:
            raise SkipRow("chosen and rejected contexts differ")
        chosen = full_chosen[cut_c + len(HH_SUFFIX) :]
        rejected = full_rejected[cut_r + len(HH_SUFFIX) :]
        if not chosen.strip() or not rejected.strip():
            raise SkipRow(
                "empty field 'chosen'" if not chosen.strip() else "empty field 'rejected'"
            )
        return Example(id=f"hh-{raw.index}", prompt=prompt, chosen=chosen, rejected=rejected)


register(HHRLHFAdapter())
