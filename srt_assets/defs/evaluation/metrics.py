"""The registered evaluations, in the report's reading order. A metric is one module in this folder
with its assets (``ASSETS``) and its report parts (``REPORT_PARTS``); registering it is one line here,
and the stage's Definitions and ``experiment_report`` pick up both."""

from srt_assets.defs.evaluation import benchmarks, leaderboards, pairwise, reference_losses

METRICS = (
    pairwise,  # the authors' protocol: pairwise verdicts on held-out sets
    reference_losses,  # the judge-free loss on reference answers, with intervals and the seed spread
    leaderboards,  # the field's benchmarks: AlpacaEval, MT-Bench
    benchmarks,  # and its knowledge check: the Open LLM Leaderboard v1 tasks through lm-evaluation-harness
)
