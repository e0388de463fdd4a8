"""The offline default teacher: a local transformers model with a chat template.

It generates in batches of similar prompt length with left padding, which on a CPU is several times
faster than one prompt at a time (see benchmarks/bench_teacher.py). A small model often breaks the
output markers, which the reflection step records as parse failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from srt_assets.core.generation import Generation, GenerationParams, Messages, OnDone, continues_reply
from srt_assets.models.chat_model import LocalChatModelSettings
from srt_assets.models.compute import ComputeSettings


class TransformersChatSettings(LocalChatModelSettings):
    """A local Hugging Face causal LM (the bundled SmolLM2-135M-Instruct by default) on the ``gpu``
    resource's device."""

    backend = "transformers"

    batch_size: int = Field(16, description="prompts per generate() batch")

    def build(
        self, compute: ComputeSettings, models_dir: Path, model_id: str, *, cache_location: str | Path | None = None
    ) -> TransformersGenerator:
        return TransformersGenerator(
            self.model_path(models_dir),
            model_id=model_id,
            device=compute.resolved_device(),
            dtype=compute.resolved_generation_dtype(),
            batch_size=self.batch_size,
        )


class TransformersGenerator:
    """``ChatModel`` over a local causal LM; also continues ready-made prompt texts."""

    def __init__(
        self, model_path: str, model_id: str, device: str = "auto", dtype: str = "float32", batch_size: int = 8
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from srt_assets.models.loading import DTYPES, resolve_device

        self.model_id = model_id
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype]).to(self.device).eval()
        # generate() stops at any of the generation config's end ids (a chat model may end its turn on
        # another token than the tokenizer's EOS); a reply without one of them ran out of tokens
        ends = self.model.generation_config.eos_token_id
        ends = ends if isinstance(ends, list) else [ends] if ends is not None else []
        self.end_ids = sorted({*ends, self.tokenizer.eos_token_id} - {None})

    def _prompt(self, messages: Messages) -> str:
        if continues_reply(messages):  # a prefilled reply: continue it rather than open a new turn
            return self.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        return self.generate_texts([self._prompt(m) for m in conversations], params, on_done)

    def generate_texts(
        self, prompts: Sequence[str], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        """Continue ready-made prompt texts (e.g. a training template), batched by length."""
        import torch

        lengths = [len(self.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
        end_ids = torch.tensor(self.end_ids, device=self.device)
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        results: list[Generation | None] = [None] * len(prompts)
        sampling = params.temperature > 0
        for begin in range(0, len(order), self.batch_size):
            batch = order[begin : begin + self.batch_size]
            encoded = self.tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            torch.manual_seed(params.seed)
            with torch.inference_mode():
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
                finished = torch.isin(tokens, end_ids).nonzero()
                used = int(finished[0]) + 1 if len(finished) else len(tokens)
                results[i] = Generation(
                    text=self.tokenizer.decode(tokens[:used], skip_special_tokens=True).strip(),
                    prompt_tokens=lengths[i],
                    completion_tokens=used,
                    finish_reason="stop" if len(finished) else "length",
                )
                if on_done:
                    on_done(i, results[i])
        return results  # type: ignore[return-value]
