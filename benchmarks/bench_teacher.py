"""Teacher throughput: batched local generation vs one prompt at a time, and HTTP concurrency.

    python benchmarks/bench_teacher.py [--prompts 16] [--max-tokens 48] [--latency 0.25]

1. The bundled SmolLM2 teacher (transformers, CPU) answers ``--prompts`` response-reflection prompts
   one at a time and then in batches; prints tokens/s and the speed-up (target: at least 4x).
2. The HTTP teacher against a local server that adds ``--latency`` seconds per request, with
   concurrency 1 and 8; prints requests/s and the ratio to concurrency x single.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from srt_assets import paths
from srt_assets.core.generation import GenerationParams
from srt_assets.core.reflection import ReflectionPrompts, response_messages
from srt_assets.models.identity import ensure_bundled_model_dir
from srt_assets.models.openai_compatible import OpenAIChatSettings, OpenAICompatibleModel
from srt_assets.models.transformers_chat import TransformersGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from openai_server import ScriptedOpenAIServer  # the test server doubles as load target


def conversations(n: int):
    prompts = ReflectionPrompts()
    return [response_messages(prompts, f"Give {i + 2} tips for learning to cook.", "", "Practice.") for i in range(n)]


def local(args) -> None:
    model_dir = args.model or ensure_bundled_model_dir(paths.storage_dir() / "models")
    params = GenerationParams(max_tokens=args.max_tokens)
    convs = conversations(args.prompts)
    rows = []
    for batch_size in (1, args.batch_size):
        teacher = TransformersGenerator(str(model_dir), "bench", device=args.device, batch_size=batch_size)
        started = time.perf_counter()
        out = teacher.generate(convs, params)
        seconds = time.perf_counter() - started
        tokens = sum(g.completion_tokens for g in out)
        rows.append((batch_size, seconds, tokens / seconds))
    print(f"local transformers teacher on {args.device}, {args.prompts} prompts, max {args.max_tokens} new tokens")
    for batch_size, seconds, rate in rows:
        print(f"  batch {batch_size:3d}: {seconds:7.1f} s  {rate:7.1f} tokens/s  x{rate / rows[0][2]:.2f}")


def http(args) -> None:
    convs = conversations(args.requests)
    params = GenerationParams(max_tokens=16)
    rates = {}
    with ScriptedOpenAIServer(latency=args.latency) as server:
        for concurrency in (1, 8):
            settings = OpenAIChatSettings(model="bench", base_url=server.base_url, concurrency=concurrency)
            teacher = OpenAICompatibleModel(settings)
            started = time.perf_counter()
            teacher.generate(convs, params)
            rates[concurrency] = args.requests / (time.perf_counter() - started)
    print(f"HTTP teacher, {args.requests} requests, server latency {args.latency}s")
    for concurrency, rate in rates.items():
        ideal = concurrency * rates[1]
        print(f"  concurrency {concurrency}: {rate:6.2f} req/s  ({rate / ideal:.0%} of concurrency x single)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default: bundled)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--skip-http", action="store_true", help="only the local teacher")
    args = parser.parse_args()
    if not args.skip_http:
        http(args)
    local(args)


if __name__ == "__main__":
    main()
