"""Training speed: srt's TRL path (SFTTrainer) against the plain torch loop it replaced, one process.

    python benchmarks/bench_training.py [--rows 32] [--steps 8] [--batch-size 4] [--max-length 256]
                                         [--device cpu|cuda] [--launch]

Both train the default student on the same examples (the first ``--rows`` Alpaca rows, ``../shared``
or the demo sample) with the same hyperparameters, and the script prints response-token loss and
tokens per second of each, and the ratio TRL / loop. ``--launch`` also times the path the checkpoint
asset takes: the worker started by ``accelerate launch`` (one process), start-up included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench_scoring import load_rows
from reference_loop import train_sft as loop_train_sft

from srt_assets.core.ifd import ScoringConfig
from srt_assets.core.training import TrainingHyperparameters, launch_command, run_identity, sft_examples
from srt_assets.models.identity import ensure_bundled_model_dir
from srt_assets.models.sft_launch import write_job
from srt_assets.models.student import build_text_builder, load_tokenizer
from srt_assets.models.trainer import train_sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--launch", action="store_true", help="also time accelerate launch of the worker")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="srt-bench-training-"))
    model = str(ensure_bundled_model_dir(work / "models"))
    tokenizer = load_tokenizer(model)
    hp = TrainingHyperparameters(
        learning_rate=5e-5, epochs=100, max_steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, warmup_ratio=0.0, save_every=10**6,
    )  # fmt: skip
    builder = build_text_builder(tokenizer, "chat", ScoringConfig(max_length=hp.max_length))
    rows = [(item.instruction, item.input, item.response) for item in load_rows(args.rows)]
    examples = sft_examples(builder, rows, tokenizer.eos_token_id)
    identity = run_identity("bench", "bench", "chat", hp)
    print(f"{len(examples)} examples, {args.steps} steps of {args.batch_size}, max length {args.max_length}")

    results = {}
    for name, train in (("loop", loop_train_sft), ("trl", train_sft)):
        started = time.perf_counter()
        result = train(model, examples, hp, work / name, identity, device=args.device)
        seconds = time.perf_counter() - started
        results[name] = (result.tokens_trained / seconds, result.losses[-1], seconds)
        print(f"{name:>5}: {seconds:6.1f} s, {results[name][0]:7.1f} tokens/s, final loss {result.losses[-1]:.4f}")
    if args.launch:
        job = write_job(
            work / "launch.job", model_path=model, examples=examples, hp=hp, out_dir=work / "launch",
            identity=identity, device=args.device, dtype="float32", manifest_extra={},
        )  # fmt: skip
        started = time.perf_counter()
        subprocess.run(launch_command(job, 1, None, on_gpu=args.device != "cpu"), check=True, capture_output=True)
        seconds = time.perf_counter() - started
        training = json.loads((work / "launch" / "srt_manifest.json").read_text())["training"]
        results["launch"] = (training["tokens_trained"] / seconds, training["losses"][-1], seconds)
        print(f"launch: {seconds:6.1f} s, {results['launch'][0]:7.1f} tokens/s (start-up included)")
    print(f"ratio trl/loop tokens per second: {results['trl'][0] / results['loop'][0]:.2f}x")
    if "launch" in results:
        print(f"ratio launched/loop tokens per second: {results['launch'][0] / results['loop'][0]:.2f}x")


if __name__ == "__main__":
    main()
