"""Stage 8, evaluation: the registered metrics (metrics.py: pairwise verdicts and a judge-free loss on
held-out prompts, AlpacaEval and MT-Bench), what the model calls cost, and the experiment report that ends the graph."""

from dagster import Definitions

from srt_assets.defs.evaluation.costs import run_costs
from srt_assets.defs.evaluation.metrics import METRICS
from srt_assets.defs.evaluation.report import experiment_report
from srt_assets.defs.partitions import repartition
from srt_assets.partitions import Partitioning

ASSETS = [*(definition for metric in METRICS for definition in metric.ASSETS), run_costs, experiment_report]


def definitions(layout: Partitioning) -> Definitions:
    return Definitions(assets=repartition(ASSETS, layout))
