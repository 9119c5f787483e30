"""One module per CLI command group. Each exposes `register(app)`; `wprctl.cli` imports them all.

Command modules stay light at import time (no torch import at module level) so that
`wprctl --help` and shell completion are fast.
"""

COMMAND_MODULES = (
    "project",  # init, status, run, quickstart
    "data",  # data show, data stats
    "train",  # sft, rm, ppo, dar
    "infer",  # infer
    "sample",  # sample
    "judge",  # judge
    "apps_eval",  # apps-eval
    "report",  # report
    "cost_graph",  # cost-graph
)
