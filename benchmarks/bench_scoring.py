"""Student scoring speed: the reference batch-of-one loop versus the packed engine (exact and fast).

    python benchmarks/bench_scoring.py [--rows 64] [--model DIR] [--device cpu|cuda] [--token-budget N]
                                       [--kernels segments,flex]

Scores the first ``--rows`` rows of Alpaca (``../shared/data``; the demo sample when absent) with the
default student, and prints, per attention kernel and precision, tokens/s, the speed ratio over the
reference loop, the largest relative error of the four perplexities and the Spearman correlation of
IFD against the reference. Each engine first scores two rows untimed (FlexAttention compiles then).
Needs only torch and transformers besides this repository (a GPU machine with random weights from
``benchmarks/random_model.py`` is enough).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import time
from pathlib import Path

import numpy as np

from srt_assets import paths
from srt_assets.core.ifd import ScoringConfig, ScoringItem, TextBuilder, score_items
from srt_assets.models.identity import ensure_bundled_model_dir
from srt_assets.models.student import build_text_builder
from srt_assets.models.student_hf import TransformersStudent, batch_of_one_losses

REPO = Path(__file__).resolve().parent.parent
ALPACA = REPO.parent / "shared" / "data" / "alpaca_data.json.gz"
STATS = ("ppl_A_direct", "ppl_A_condition", "ppl_Q_direct", "ppl_Q_condition")


def load_rows(n: int, data: Path | None = None) -> list[ScoringItem]:
    if data is not None:
        records = json.loads(gzip.decompress(data.read_bytes()) if data.suffix == ".gz" else data.read_text())[:n]
    elif ALPACA.is_file():
        records = json.loads(gzip.decompress(ALPACA.read_bytes()))[:n]
    else:
        lines = (REPO / "data" / "demo" / "alpaca_demo.jsonl").read_text().splitlines()[:n]
        records = [json.loads(line) for line in lines]
    return [ScoringItem(r["instruction"], r["input"], r["output"]) for r in records]


class ReferenceScorer:
    """The straightforward loop, wrapped in the LossScorer protocol."""

    def __init__(self, model_dir: Path, device: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").to(device).eval()

    def mean_losses(self, sequences, target_starts):
        return batch_of_one_losses(self.model, sequences, target_starts)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a = np.argsort(np.argsort(a))
    ranks_b = np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def timed(scorer, items: list[ScoringItem], builder: TextBuilder):
    started = time.perf_counter()
    scores, stats = score_items(items, builder, scorer)
    return scores, stats, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default: bundled)")
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--token-budget", type=int, default=1024, help="tokens per packed forward pass")
    parser.add_argument("--data", type=Path, default=None, help="Alpaca-format JSON (default: ../shared, else demo)")
    parser.add_argument("--kernels", default="segments,flex", help="attention kernels to measure, comma-separated")
    args = parser.parse_args()
    model_dir = args.model or ensure_bundled_model_dir(paths.storage_dir() / "models")
    items = load_rows(args.rows, args.data)

    reference = ReferenceScorer(model_dir, args.device)
    builder = build_text_builder(_tokenizer(model_dir), args.template, ScoringConfig(max_length=args.max_length))
    ref_scores, stats, ref_time = timed(reference, items, builder)
    tokens = stats["tokens"]
    print(f"{len(items)} rows, {stats['unique_texts']} texts, {tokens} tokens ({stats['target_tokens']} targets)"
          f" on {_device_name(args.device)}, token budget {args.token_budget}")  # fmt: skip
    print(f"{'mode':28s} {'seconds':>8s} {'tokens/s':>9s} {'speedup':>8s} {'max rel err':>12s} {'spearman IFD':>13s}")
    print(f"{'reference batch-of-one fp32':28s} {ref_time:8.1f} {tokens / ref_time:9.0f} {1.0:8.2f}")
    ref_matrix = np.array([[getattr(s, k) for k in STATS] for s in ref_scores], dtype=float)
    ref_ifd = np.array([s.ifd for s in ref_scores], dtype=float)
    del reference
    for kernel, dtype in itertools.product(args.kernels.split(","), ("float32", "bfloat16")):
        engine = TransformersStudent(
            model_dir, device=args.device, dtype=dtype, token_budget=args.token_budget, attention_kernel=kernel
        )
        warm_up = timed(engine, items[:2], builder)[2]  # compiling (flex) is paid once per process, not per row
        scores, _, seconds = timed(engine, items, builder)
        matrix = np.array([[getattr(s, k) for k in STATS] for s in scores], dtype=float)
        error = float(np.nanmax(np.abs(matrix - ref_matrix) / np.abs(ref_matrix)))
        rho = spearman(np.array([s.ifd for s in scores], dtype=float), ref_ifd)
        label = f"packed {kernel} {'exact fp32' if dtype == 'float32' else 'fast bf16'}"
        print(f"{label:28s} {seconds:8.1f} {tokens / seconds:9.0f} {ref_time / seconds:8.2f} {error:12.2e} {rho:13.4f}"
              f"   (warm-up {warm_up:.1f} s)")  # fmt: skip


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


if __name__ == "__main__":
    main()
