"""ROUGE-1/2/L as a local `evaluate` module, so `evaluate.load` needs no hub download.

    import evaluate
    rouge = evaluate.load("/path/to/wprctl/metrics/rouge")
    rouge.compute(predictions=["the cat sat"], references=["the cat lay"])
    # {"rouge1": ..., "rouge2": ..., "rougeL": ..., "rougeLsum": ...}

A thin wrapper around Google's `rouge_score` package (the scorer the hub's `rouge` metric uses),
returning F-measures. With `use_aggregator` (default) each is the plain mean over examples:
unlike the hub metric's bootstrap midpoint, the same inputs always give the same number.
"""

from __future__ import annotations

import datasets
import evaluate
from rouge_score import rouge_scorer

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    pages = "74--81",
}
"""

_DESCRIPTION = """\
ROUGE (Recall-Oriented Understudy for Gisting Evaluation) compares a generated summary with a
reference by n-gram overlap (rouge1, rouge2) and longest common subsequence (rougeL; rougeLsum
splits on newlines first). Scores are F-measures in [0, 1]. Text is lower-cased and split on
non-alphanumeric characters by rouge_score's default tokenizer.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts (one per prediction).
    rouge_types: which scores to return (default: rouge1, rouge2, rougeL, rougeLsum).
    use_stemmer: apply the Porter stemmer before matching (default: False).
    use_aggregator: return the mean over examples (default) instead of per-example lists.
Returns:
    dict: rouge type -> F-measure (mean, or a list per example).
"""

DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://en.wikipedia.org/wiki/ROUGE_(metric)"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        rouge_types: list[str] | None = None,
        use_stemmer: bool = False,
        use_aggregator: bool = True,
    ) -> dict[str, float | list[float]]:
        types = list(rouge_types or DEFAULT_TYPES)
        scorer = rouge_scorer.RougeScorer(rouge_types=types, use_stemmer=use_stemmer)
        per_example: dict[str, list[float]] = {t: [] for t in types}
        for pred, ref in zip(predictions, references):
            scores = scorer.score(ref, pred)  # rouge_score takes (target, prediction)
            for t in types:
                per_example[t].append(float(scores[t].fmeasure))
        if not use_aggregator:
            return per_example
        n = len(predictions)
        return {t: (sum(v) / n if n else 0.0) for t, v in per_example.items()}
