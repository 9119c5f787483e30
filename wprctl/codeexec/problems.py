"""APPS problems in the `codeparrot/apps` schema, from the hub or from local files.

`solutions` and `input_output` are JSON strings in that schema. A problem whose tests cannot be
read is kept with an `error`, so that a large file with a few broken rows still loads; evaluating
such a problem is a UserError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wprctl.errors import UserError

DIFFICULTIES = ("introductory", "interview", "competition")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Problem:
    problem_id: str
    question: str = ""
    solutions: list[str] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)  # str (stdin) or list of arguments (call)
    outputs: list[Any] = field(default_factory=list)
    fn_name: str | None = None
    starter_code: str = ""
    difficulty: str = "unknown"
    url: str = ""
    error: str | None = None  # why the tests could not be read

    @property
    def kind(self) -> str:
        return "call" if self.fn_name else "stdin"

    @property
    def use_class(self) -> bool:
        return bool(self.fn_name) and "class Solution" in self.starter_code

    @property
    def n_tests(self) -> int:
        return len(self.inputs)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Problem:
        if "problem_id" not in row:
            raise ValueError("no `problem_id`")
        pid = str(row["problem_id"])
        p = cls(
            problem_id=pid,
            question=str(row.get("question") or ""),
            starter_code=str(row.get("starter_code") or ""),
            difficulty=str(row.get("difficulty") or "unknown"),
            url=str(row.get("url") or ""),
        )
        try:
            p.solutions = _solutions(row.get("solutions"))
        except ValueError as exc:
            p.error = f"`solutions`: {exc}"
        try:
            p.inputs, p.outputs, p.fn_name = parse_input_output(row.get("input_output"))
        except ValueError as exc:
            p.error = f"`input_output`: {exc}"
        return p


def _decoded(raw: Any) -> Any:
    """A field that holds JSON text (the hub's form) or the value itself (local JSON files)."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


def _solutions(raw: Any) -> list[str]:
    if raw in (None, ""):
        return []
    raw = _decoded(raw)
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise ValueError("expected a JSON list of program texts")
    return raw


def parse_input_output(raw: Any) -> tuple[list[Any], list[Any], str | None]:
    """`input_output` (JSON text or dict) -> (inputs, outputs, fn_name); ValueError if malformed."""
    if raw in (None, ""):
        raise ValueError("empty: the problem has no tests")
    raw = _decoded(raw)
    if not isinstance(raw, dict):
        raise ValueError(
            f"expected a JSON object with `inputs` and `outputs`, got {type(raw).__name__}"
        )
    inputs, outputs = raw.get("inputs"), raw.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError("`inputs` and `outputs` must both be lists")
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise ValueError("no test cases")
    fn_name = raw.get("fn_name")
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise ValueError(f"`fn_name` must be a Python identifier, got {fn_name!r}")
    if fn_name:
        for i, args in enumerate(inputs):
            if not isinstance(args, list):
                raise ValueError(f"test {i}: call-based inputs must be argument lists")
        inputs = [_int_keys(args) for args in inputs]
    else:
        for i, (x, y) in enumerate(zip(inputs, outputs)):
            if isinstance(x, list):  # some APPS rows store stdin as a list of lines
                x = "\n".join(map(str, x)) + "\n"
                inputs[i] = x
            if isinstance(y, list):
                outputs[i] = "\n".join(map(str, y)) + "\n"
            if not isinstance(inputs[i], str) or not isinstance(outputs[i], str):
                raise ValueError(f"test {i}: stdin problems need string inputs and outputs")
    return inputs, outputs, fn_name or None


def _int_keys(args: list[Any]) -> list[Any]:
    # JSON turned integer dict keys into strings; APPS undoes that for a single dict argument.
    if len(args) == 1 and isinstance(args[0], dict) and args[0]:
        try:
            return [{int(k): v for k, v in args[0].items()}]
        except (TypeError, ValueError):
            return args
    return args


BUILTIN_SAMPLES = "builtin:apps-samples"
BUILTIN_SAMPLES_PATH = (
    Path(__file__).resolve().parents[1] / "assets" / "apps" / "apps_samples.jsonl"
)


def load_problems(source: str | Path, split: str | None = None) -> dict[str, Problem]:
    """Problems by id from a local .jsonl/.json/.parquet file or folder, or a hub id
    (`codeparrot/apps`, optionally `codeparrot/apps:test`), or `builtin:apps-samples` (the 104
    real APPS problems shipped with wprctl for the demo)."""
    if str(source) == BUILTIN_SAMPLES:
        source = BUILTIN_SAMPLES_PATH
    elif str(source).startswith("builtin:"):  # not a hub id: do not ask the hub about it
        raise UserError(f"{source}: unknown built-in problem set; available: {BUILTIN_SAMPLES}")
    path = Path(source)
    if path.exists():
        rows = list(_local_rows(path))
        where = str(path)
    else:
        text = str(source)
        if text.endswith(LOCAL_SUFFIXES) or text.startswith((".", "/")):
            raise UserError(f"{source}: no such problems file or folder")
        rows, where = _hub_rows(text, split)
    problems: dict[str, Problem] = {}
    for n, (line, row) in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(
                f"{where}: row {line or n}: expected a JSON object, got {type(row).__name__}"
            )
        try:
            p = Problem.from_row(row)
        except ValueError as exc:
            raise UserError(f"{where}: row {line or n}: {exc}") from None
        problems[p.problem_id] = p
    if not problems:
        raise UserError(f"{where}: no APPS problems found")
    return problems


def _local_rows(path: Path):
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"{path}: no .jsonl, .json or .parquet files in this folder")
        for f in files:
            yield from _file_rows(f)
    else:
        yield from _file_rows(path)


def _file_rows(path: Path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise UserError(f"{path}: cannot read parquet: {exc}") from None
        for row in table.to_pylist():
            yield None, row
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        for row in data:
            yield None, row
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {n}: not valid JSON: {exc}") from None


def _hub_rows(hub_id: str, split: str | None):
    name, _, given_split = hub_id.partition(":")
    split = given_split or split or "test"
    from wprctl.hub import offline_unless_reachable

    offline_unless_reachable()
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split=split)
    except Exception as exc:
        raise UserError(
            f"{hub_id}: cannot load the APPS problems from the hub ({type(exc).__name__}: {exc}). "
            "Pass --problems with a local .jsonl/.json/.parquet file or folder in the codeparrot/apps schema."
        ) from None
    return ((None, row) for row in ds), f"{name}[{split}]"
