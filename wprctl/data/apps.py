"""codeparrot/apps (problem_id, question, solutions, input_output, difficulty, url, starter_code).

`solutions` and `input_output` are JSON strings on the hub (decoded data is accepted too).
chosen = the first solution; a problem without solutions keeps chosen=None (PPO and evaluation
use it, SFT drops it). meta keeps what `apps-eval` needs: input_output (decoded), starter_code,
difficulty, fn_name, problem_id, url.
"""

from __future__ import annotations

from typing import Any

from wprctl.data.base import (
    Example,
    RawRow,
    SkipRow,
    as_row,
    check_text,
    get_field,
    json_field,
    register,
    text_field,
)
from wprctl.data.prompts import apps_prompt


class AppsAdapter:
    name = "apps"
    hub_id: str | None = "codeparrot/apps"
    hub_config: str | None = None

    def parse(self, raw: RawRow, cfg: Any) -> Example:
        row = as_row(raw)
        pid = get_field(row, "problem_id")
        question = text_field(row, "question") or ""
        solutions = json_field(row, "solutions", "broken solutions JSON")
        if solutions is not None and not (
            isinstance(solutions, list) and all(isinstance(s, str) for s in solutions)
        ):
            raise SkipRow("broken solutions JSON", "expected a list of strings")
        io = json_field(row, "input_output", "broken input_output JSON")
        if io is not None and not (
            isinstance(io, dict) and isinstance(io.get("inputs", []), list)
            and isinstance(io.get("outputs", []), list)
        ):  # fmt: skip
            raise SkipRow("broken input_output JSON", "expected {inputs: [...], outputs: [...]}")
        starter = get_field(row, "starter_code", required=False) or ""
        if not isinstance(starter, str):
            raise SkipRow("field 'starter_code' is not text")
        check_text(starter, "starter_code")
        chosen = next((s for s in solutions or [] if s.strip()), None)
        if chosen is not None:
            check_text(chosen, "solutions")
        meta = {
            "problem_id": pid,
            "input_output": io,
            "starter_code": starter,
            "difficulty": row.get("difficulty"),
            "fn_name": io.get("fn_name") if io else None,
            "url": row.get("url"),
            "n_solutions": len(solutions or []),
        }
        return Example(id=str(pid), prompt=apps_prompt(question), chosen=chosen, meta=meta)


register(AppsAdapter())
