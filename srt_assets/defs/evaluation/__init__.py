"""Stage 8, evaluation: pairwise verdicts and a judge-free loss on held-out prompts, AlpacaEval and
MT-Bench, and the experiment report that ends the graph."""

from dagster import Definitions

from srt_assets.defs.evaluation.leaderboards import (
    alpacaeval_outputs,
    alpacaeval_results,
    mt_bench_answers,
    mt_bench_scores,
)
from srt_assets.defs.evaluation.pairwise import (
    evaluation_answers,
    evaluation_prompts,
    pairwise_verdicts,
    reference_loss,
)
from srt_assets.defs.evaluation.report import experiment_report
from srt_assets.defs.partitions import repartition
from srt_assets.partitions import Partitioning

ASSETS = [
    evaluation_prompts,
    evaluation_answers,
    reference_loss,
    pairwise_verdicts,
    alpacaeval_outputs,
    alpacaeval_results,
    mt_bench_answers,
    mt_bench_scores,
    experiment_report,
]


def definitions(layout: Partitioning) -> Definitions:
    return Definitions(assets=repartition(ASSETS, layout))
