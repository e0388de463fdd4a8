"""The pipeline at scale with simulated models: wall time, items per second and peak memory per stage.

    python benchmarks/bench_scale.py --rows 52000 [--shards 0] [--stages raw,teacher,scores,selection] [--statistics]
    (``selection`` is ``decisions`` then ``sets``: name those to see each part's peak)
    python benchmarks/bench_scale.py --rows 25000,100000 --statistics   # memory at 4x the rows

With several sizes, each runs in its own work directory and the last line per stage gives its peak
RSS at the largest size as a ratio to the smallest: a stage whose memory follows its blocks, not
its rows, stays near 1.0.

A generated source of ``--rows`` tiny Alpaca-like rows goes through ``srt materialize`` one stage at
a time, each a fresh process (as a user runs it), so each stage's peak RSS is its own (``wait4``;
this process stays small, since a child starts from its parent's peak):

- the teacher is an instant OpenAI-compatible server on 127.0.0.1 (starlette on uvicorn in its own
  process; a reply the parser accepts, no latency), so the figures are srt's own overhead per call;
- the student is a tiny random model with SmolLM2's tokenizer (2 layers, width 64): the figures are
  srt's bookkeeping around the model, which a real GPU would dwarf (items: texts scored); with
  ``--statistics`` its scores come from generated statistics files instead (``use: instead``, items:
  variant rows), so selection runs at a million rows;
- ``rerun`` repeats both teacher stages unchanged: every call comes from the cache.

Prints one line per stage and the ratios that matter: calls/s against the server's own capacity
(measured first, in the same run, with as many client threads as the teacher's concurrency) and the
rerun's time per row against the first run's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from openai_server import scripted_reply  # noqa: E402  the replies the tests' endpoint gives

STAGES = {
    "raw": ["raw_samples"],
    "teacher": ["new_instructions", "better_responses"],
    "scores": ["student_scores"],
    "selection": ["sample_decisions", "selected_dataset", "baseline_random", "baseline_full"],
    "decisions": ["sample_decisions"],  # the selection's two parts apart: each one's peak RSS
    "sets": ["selected_dataset", "baseline_random", "baseline_full"],
}


def completion(payload: dict) -> dict:
    text = scripted_reply(payload["messages"])
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": payload["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip


def serve_forever(port: int) -> None:
    """The instant endpoint: starlette on uvicorn (both come with dagster-webserver), one process."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        return JSONResponse(completion(await request.json()))

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_server() -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server, port
        time.sleep(0.1)
    raise SystemExit("the instant endpoint did not start")


def server_capacity(port: int, threads: int, seconds: float = 3.0) -> float:
    """Requests/s the server answers to bare keep-alive clients: the ceiling srt is measured against."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "[Instruction]\nx\n\n"}]})
    stop = time.monotonic() + seconds

    def client() -> int:
        connection, count = HTTPConnection("127.0.0.1", port), 0
        while time.monotonic() < stop:
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            connection.getresponse().read()
            count += 1
        return count

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda _: client(), range(threads))) / seconds


def tiny_student(directory: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from srt_assets.models.identity import ensure_bundled_model_dir

    bundled = ensure_bundled_model_dir(directory / "bundled")
    config = AutoConfig.from_pretrained(bundled)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32})  # fmt: skip
    torch.manual_seed(0)
    out = directory / "tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for file in bundled.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            (out / file.name).write_bytes(file.read_bytes())
    return out


def write_source(directory: Path, rows: int, shards: int, statistics: bool) -> Path:
    with open(directory / "rows.jsonl", "w", encoding="utf-8") as out:
        for i in range(rows):
            row = {"instruction": f"Describe item {i} in one sentence.", "input": "", "output": f"Item {i} is small."}
            out.write(json.dumps(row) + "\n")
    source: dict = {"path": "rows.jsonl"}
    if statistics:
        source["statistics"] = {"use": "instead", "label": "synthetic", **write_statistics(directory, rows)}
    catalog = {"sources": {"bench": source}, **({"shards": shards} if shards else {})}
    (directory / "sources.yaml").write_text(yaml.safe_dump(catalog))
    return directory / "sources.yaml"


def write_statistics(directory: Path, rows: int) -> dict[str, str]:
    """A student's statistics per variant in the authors' layout (``data: {loss, ppl}`` in the order
    Q_direct, A_direct, Q_condition, A_condition), seeded per row: ``student_scores`` reads them
    instead of scoring, so the selection stages run at a size the tiny student would take hours for."""
    files = {}
    for v, variant in enumerate(("ori", "Q", "A", "QA")):
        files[variant] = f"statistics_{variant}.jsonl"
        with open(directory / files[variant], "w", encoding="utf-8") as out:
            for i in range(rows):
                draw = random.Random(i * 4 + v)
                ppl = [draw.uniform(2, 30), draw.uniform(2, 30)]
                ppl += [ppl[0] * draw.uniform(0.3, 1.1), ppl[1] * draw.uniform(0.3, 1.1)]
                out.write(json.dumps({"data": {"loss": [round(math.log(x), 6) for x in ppl], "ppl": ppl}}) + "\n")
    return files


def run_stage(env: dict, assets: list[str], shards: int) -> tuple[float, float, str]:
    """One ``srt materialize`` of ``assets``: wall seconds, peak RSS (MB) of the process, its output."""
    selection = " or ".join(f"key:{name}" for name in assets)
    command = [sys.executable, "-m", "srt_assets.cli", "materialize", "--source", "bench", "--select", selection]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"stage {assets} failed:\n{output[-4000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="5000", help="row count, or several separated by commas")
    parser.add_argument("--shards", type=int, default=0)
    parser.add_argument("--stages", default="raw,teacher,scores,selection,rerun")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--statistics",
        action="store_true",
        help="scores from generated statistics files (use: instead) rather than the tiny student",
    )
    parser.add_argument("--work", type=Path, help="a work directory to reuse (the stages already materialized there)")
    parser.add_argument("--make-student", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_forever(args.serve)
        return
    if args.make_student:
        tiny_student(args.make_student)
        return
    sizes = [int(size) for size in args.rows.split(",")]
    if args.work and len(sizes) > 1:
        raise SystemExit("--work takes one --rows size")
    server, port = start_server()
    try:
        peaks = [run_benchmark(args, rows, port) for rows in sizes]
    finally:  # a failed stage must not leave the endpoint running (it holds the caller's stdout)
        server.terminate()
    if len(sizes) > 1:
        print(f"peak RSS at {sizes[-1]:,} rows against {sizes[0]:,} ({sizes[-1] / sizes[0]:.1f}x the rows):")
        for stage in peaks[0]:
            large, small = peaks[-1][stage], peaks[0][stage]
            print(f"  {stage:10s} {large:7.0f} MB / {small:7.0f} MB = {large / small:.2f}")


def run_benchmark(args: argparse.Namespace, rows: int, port: int) -> dict[str, float]:
    """Every stage of ``args.stages`` at ``rows`` rows: prints a line each, returns peak RSS per stage."""
    work = args.work or Path(tempfile.mkdtemp(prefix="srt-bench-scale-"))
    capacity = server_capacity(port, min(args.concurrency, 16))
    models = {"teacher": {"backend": "openai", "model": "instant", "base_url": f"http://127.0.0.1:{port}/v1",
                          "concurrency": args.concurrency}}  # fmt: skip
    if "scores" in args.stages and not args.statistics:  # made in a child: a stage inherits this one's peak RSS
        make = [sys.executable, __file__, "--make-student", str(work)]
        subprocess.run(make, check=True, env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL)
        models["student"] = {"model": str(work / "tiny")}
    (work / "models.yaml").write_text(yaml.safe_dump(models))
    (work / "home").mkdir(exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(work / "home"), "SRT_STORAGE_DIR": str(work / "store"),
           "SRT_SOURCES_FILE": str(write_source(work, rows, args.shards, args.statistics)),
           "SRT_MODELS_FILE": str(work / "models.yaml"), "SRT_EXECUTOR": ""}  # fmt: skip
    print(f"{rows:,} rows, {args.shards or 'no'} shards, work in {work}")
    print(f"server capacity (bare keep-alive clients): {capacity:,.0f} requests/s")
    teacher_seconds, peaks = None, {}
    for stage in args.stages.split(","):
        assets = STAGES.get(stage, STAGES["teacher"])
        seconds, rss, _ = run_stage(env, assets, args.shards)
        items = {"raw": rows, "teacher": 3 * rows, "rerun": 3 * rows,
                 "scores": (4 if args.statistics else 16) * rows, "selection": rows, "decisions": rows,
                 "sets": rows}[stage]  # fmt: skip
        peaks[stage] = rss
        line = f"{stage:10s} {seconds:8.1f} s  {1000 * seconds / items:7.3f} ms/item  peak RSS {rss:7.0f} MB"
        if stage == "teacher":
            teacher_seconds = seconds
            line += f"  {items / seconds:,.0f} calls/s = {items / seconds / capacity:.2f} of the server's capacity"
        if stage == "rerun" and teacher_seconds:
            line += f"  ({seconds / teacher_seconds:.2f} of the first run's time, 0 calls)"
        print(line, flush=True)
    return peaks


if __name__ == "__main__":
    main()
