"""APPS pass@k as a local `evaluate` module, executed in wprctl's sandbox.

    import evaluate
    from wprctl.codeexec.metric import METRIC_PATH
    metric = evaluate.load(METRIC_PATH)          # offline: a local file
    metric.compute(predictions=[[c1, c2, ...], ...], references=[problem_json, ...], k=[1, 5])

Each reference is one APPS problem as JSON text: a `codeparrot/apps` row (with `input_output`,
`starter_code`) or just its `input_output` object. Each prediction is the list of completions
(samples) for that problem; code is extracted from them as `wprctl apps-eval` does.
"""

import json

import datasets
import evaluate

from wprctl.codeexec import ExecConfig, Problem, evaluate_samples, parse_input_output, summarize

_DESCRIPTION = """Unbiased pass@k (Chen et al., 2021), strict accuracy and test-case average
(Hendrycks et al., 2021) of programs run against APPS tests in a real sandbox (namespaces, rlimits,
a process per test)."""

_KWARGS = """
Args:
    predictions: list (one per problem) of lists of completion strings.
    references: list of problems as JSON strings (APPS rows or `input_output` objects).
    k: list of k values (default [1, 10]); pass@k is averaged over problems with >= k samples.
    timeout: wall-clock seconds per test (default 4). mode: "strict" (default) or "compat".
    workers: parallel sandboxes (default: number of cores).
Returns:
    {"pass@1": ..., "strict_accuracy": ..., "test_case_average": ..., "n_problems": ...,
     "n_samples": ..., "results": per-sample verdict lists}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class AppsPassAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(
        self, predictions, references, k=(1, 10), timeout=4.0, mode="strict", workers=None
    ):
        problems: dict[str, Problem] = {}
        samples: list[tuple[str, str]] = []
        for i, (cands, ref) in enumerate(zip(predictions, references)):
            row = json.loads(ref) if isinstance(ref, str) else dict(ref)
            if "input_output" not in row:
                row = {"input_output": row}
            pid = str(row.get("problem_id", i))
            p = Problem.from_row({**row, "problem_id": pid})
            if p.error:
                parse_input_output(row.get("input_output"))  # raises with the reason
                raise ValueError(f"problem {pid}: {p.error}")
            problems[pid] = p
            samples += [(pid, c) for c in cands]
        config = ExecConfig(timeout=float(timeout), mode=mode, workers=workers)
        results = evaluate_samples(problems, samples, config, progress=False)
        summary = summarize(results, list(k))
        out = {f"pass@{kk}": v for kk, v in summary["pass@k"].items()}
        out.update(
            strict_accuracy=summary["strict_accuracy"],
            test_case_average=summary["test_case_average"],
            n_problems=summary["n_problems"],
            n_samples=summary["n_samples"],
            results=[r.verdicts for r in results],
        )
        return out
