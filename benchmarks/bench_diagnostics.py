"""Can the student judge, in float32 and in bfloat16? The student_diagnosis AUCs for both precisions.

    python benchmarks/bench_diagnostics.py [--rows 64] [--data FILE] [--model DIR] [--device cpu]

Builds the probes of `core/diagnostics.py` on the first rows of Alpaca (``--data``, else
``../shared/data``, else the demo sample), scores every pair with the packed engine in each precision,
and prints the paired AUC with its 95% interval per probe and statistic, and the seconds each took.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_scoring import load_rows

from srt_assets import paths
from srt_assets.core.diagnostics import Pair, aucs, build_probes
from srt_assets.core.ifd import ScoringConfig, ScoringItem, score_items
from srt_assets.models.identity import ensure_bundled_model_dir
from srt_assets.models.student import build_text_builder, load_tokenizer
from srt_assets.models.student_hf import TransformersStudent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default: bundled)")
    parser.add_argument("--template", default="chat")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_dir = args.model or ensure_bundled_model_dir(paths.storage_dir() / "models")
    rows = [Pair(i.instruction, i.input, i.response) for i in load_rows(args.rows, args.data)]
    chosen, probes = build_probes(rows, args.rows, args.seed)
    items = [ScoringItem(p.instruction, p.input, p.output) for p in [q.true for q in probes] + [q.fake for q in probes]]
    builder = build_text_builder(load_tokenizer(str(model_dir)), args.template, ScoringConfig())
    print(f"{len(chosen)} rows, {len(probes)} probes, template {args.template}, model {model_dir.name}")
    print(f"{'dtype':9s} {'probe':19s} {'stat':5s} {'AUC':>6s}  95% interval  seconds")
    for dtype in ("float32", "bfloat16"):
        started = time.perf_counter()
        scores, _ = score_items(items, builder, TransformersStudent(model_dir, device=args.device, dtype=dtype))
        seconds = time.perf_counter() - started
        values = [{"ifd": s.ifd, "rifd": s.rifd} for s in scores]
        for auc in aucs(probes, values[: len(probes)], values[len(probes) :], args.seed):
            shown = "n/a" if auc.auc is None else f"{auc.auc:6.3f}  {auc.low:.2f}–{auc.high:.2f}"
            print(f"{dtype:9s} {auc.probe:19s} {auc.statistic:5s} {shown}  {seconds:7.1f}")


if __name__ == "__main__":
    main()
