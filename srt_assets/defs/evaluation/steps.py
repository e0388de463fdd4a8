"""What the evaluation steps share: their decorator arguments, and answering with every checkpoint
of a source through the call cache."""

from collections.abc import Callable
from typing import TypeVar

from srt_assets.core.cache import open_cache
from srt_assets.core.generation import CachedGenerator, Generation, GenerationParams, Messages
from srt_assets.defs.common import GPU_STEP
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.training.assets import CHECKPOINT_KEYS, TRAINING_SETS, checkpoint_dir
from srt_assets.models.checkpoint_generator import CheckpointGenerator
from srt_assets.resources import ComputeResource, StorageResource, StudentModelResource

T = TypeVar("T")
Answer = Callable[[list[Messages], GenerationParams], list[tuple[str, Generation]]]


def checkpoint_step(*also_reads: str) -> dict:
    """A model step that reads all three checkpoints of a source (and ``also_reads``)."""
    return {
        "partitions_def": SOURCES,
        "group_name": "evaluation",
        "kinds": {"pytorch", "polars"},
        "deps": [*CHECKPOINT_KEYS, *also_reads],
        **GPU_STEP,
    }


JUDGE_STEP = {"partitions_def": SOURCES, "group_name": "evaluation", "kinds": {"polars"}, **GPU_STEP}


def answer_with_checkpoints(
    storage: StorageResource,
    source: str,
    student: StudentModelResource,
    gpu: ComputeResource,
    batch_size: int,
    ask: Callable[[Answer], T],
) -> tuple[dict[str, T], dict[str, dict[str, int]]]:
    """``ask(answer)`` once per checkpoint of ``source``, where ``answer(conversations, params)``
    gives that checkpoint's greedy replies through the call cache (vLLM or transformers, per
    ``gpu``; the engine loads on the first miss and is released after). Returns what ``ask``
    returned and the calls made and served from the cache, per checkpoint."""
    results, stats = {}, {}
    cache = open_cache(storage.cache_location, "answers")
    try:
        for checkpoint in TRAINING_SETS:
            model_path = str(checkpoint_dir(storage, source, checkpoint))
            generator = CheckpointGenerator(model_path, student.template, gpu, batch_size)
            cached = CachedGenerator(generator, cache, chunk_size=32)
            try:
                results[checkpoint] = ask(cached.generate)
            finally:
                generator.close()
            stats[checkpoint] = {"generated": cached.stats.calls, "from_cache": cached.stats.cache_hits}
    finally:
        cache.close()
    return results, stats
