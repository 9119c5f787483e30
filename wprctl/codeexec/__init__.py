"""Sandboxed execution of generated programs against APPS tests, and the metrics on top of it.

from wprctl.codeexec import ExecConfig, evaluate_samples, load_problems
results = evaluate_samples(load_problems("apps.jsonl"), [("0", completion)], ExecConfig())
"""

from wprctl.codeexec.compare import outputs_match
from wprctl.codeexec.config import ExecConfig
from wprctl.codeexec.demo import reference_generations
from wprctl.codeexec.executor import (
    VERDICT_CODES,
    ExecPool,
    SampleResult,
    evaluate_samples,
    execution_reward,
    sample_reward,
)
from wprctl.codeexec.extract import extract_code
from wprctl.codeexec.passk import mean_pass_at_k, pass_at_k
from wprctl.codeexec.problems import Problem, load_problems, parse_input_output
from wprctl.codeexec.summary import summarize

__all__ = [
    "VERDICT_CODES",
    "ExecConfig",
    "ExecPool",
    "Problem",
    "SampleResult",
    "evaluate_samples",
    "execution_reward",
    "extract_code",
    "load_problems",
    "mean_pass_at_k",
    "outputs_match",
    "parse_input_output",
    "pass_at_k",
    "reference_generations",
    "sample_reward",
    "summarize",
]
