"""The program inside a model's completion.

Rules, in order:
  1. fenced blocks: the first block tagged python/py/python3 (or untagged); blocks tagged with other
     languages (text, input, output...) are skipped. An unterminated fence (a truncated generation)
     runs to the end of the text.
  2. otherwise plain code: whatever follows the last prompt marker (`### Response:`, APPS's
     `ANSWER:`) if the completion still contains the prompt, minus APPS format lines such as
     `Use Standard Input format`.
  3. call-based problems whose completion continues the starter code (does not define the function
     or `class Solution` itself) get the starter code put back in front.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^[ \t]*(```+|~~~+)[ \t]*([\w+#.-]*)[^\n]*\n", re.MULTILINE)
_PY_TAGS = {"", "python", "py", "python3", "py3", "python2"}
_PROMPT_MARKERS = ("### Response:", "ANSWER:")
_FORMAT_LINES = re.compile(r"^\s*Use (?:Standard Input|Call-Based) format\s*$", re.MULTILINE)


def extract_code(completion: str, starter_code: str = "", fn_name: str | None = None) -> str:
    code = _fenced(completion)
    if code is None:
        code = completion
        for marker in _PROMPT_MARKERS:
            if marker in code:
                code = code.rsplit(marker, 1)[1]
                break
        code = _FORMAT_LINES.sub("", code)
    code = code.strip("\n")
    if fn_name and starter_code.strip() and not _defines(code, fn_name):
        code = starter_code.rstrip() + "\n" + _indent_like_starter(code, starter_code)
    return code + "\n"


def _fenced(text: str) -> str | None:
    pos = 0
    untagged: str | None = None
    while True:
        m = _FENCE.search(text, pos)
        if not m:
            return untagged
        fence, tag = m.group(1), m.group(2).lower()
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE)
        end = close.search(text, m.end())
        body = text[m.end() : end.start()] if end else text[m.end() :]
        if tag in _PY_TAGS and tag:
            return body
        if not tag and untagged is None:
            untagged = body
        if not end:
            return untagged
        pos = end.end()


def _defines(code: str, fn_name: str) -> bool:
    return bool(re.search(rf"^\s*(def\s+{re.escape(fn_name)}\b|class\s+Solution\b)", code, re.M))


def _indent_like_starter(body: str, starter: str) -> str:
    # A completion that continues `def f(x):\n\t` is the function body; if it came back without
    # indentation, indent it one level deeper than the starter's last `def`.
    lines = body.splitlines()
    if lines and lines[0][:1] not in (" ", "\t"):
        defs = [ln for ln in starter.splitlines() if ln.lstrip().startswith("def ")]
        if defs:
            lead = defs[-1][: len(defs[-1]) - len(defs[-1].lstrip())] + "    "
            return "\n".join(lead + ln if ln.strip() else ln for ln in lines)
    return body
