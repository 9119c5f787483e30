"""Text-quality metrics shipped as local `evaluate` modules, so they load with no network.

`rouge(predictions, references)` loads `wprctl/metrics/rouge` through `evaluate.load(path)`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
ROUGE_DIR = METRICS_DIR / "rouge"


@functools.lru_cache(maxsize=1)
def load_rouge() -> Any:
    """The ROUGE `evaluate` module from this package's folder (never the hub)."""
    import evaluate

    return evaluate.load(str(ROUGE_DIR))


def rouge(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge1, rouge2, rougeL, rougeLsum) over the pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {}
    out = load_rouge().compute(
        predictions=list(predictions), references=list(references), use_stemmer=use_stemmer
    )
    return {k: float(v) for k, v in out.items()}
