"""The user's own data: rows with a prompt and optionally chosen/rejected responses, under the
field names `data.prompt_field`, `data.chosen_field`, `data.rejected_field` (dotted for nested).
A response field that is absent means "none" (e.g. prompt-only data for PPO); present but empty
is a bad row. Other fields are kept in `meta`."""

from __future__ import annotations

from typing import Any

from wprctl.data.base import Example, RawRow, as_row, register, text_field


class JsonlAdapter:
    name = "jsonl"
    hub_id: str | None = None
    hub_config: str | None = None

    def parse(self, raw: RawRow, cfg: Any) -> Example:
        row = as_row(raw)
        fields = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
        prompt = text_field(row, fields[0]) or ""
        chosen = text_field(row, fields[1], required=False)
        rejected = text_field(row, fields[2], required=False)
        rid = row.get("id")
        meta = {k: v for k, v in row.items() if k not in fields and k != "id"}
        return Example(id=str(rid) if rid is not None else f"row{raw.index}", prompt=prompt,
                       chosen=chosen, rejected=rejected, meta=meta)  # fmt: skip


register(JsonlAdapter())
