"""Choosing and building a student backend; the default student's model directory."""

from __future__ import annotations

from pathlib import Path

from srt_assets import paths
from srt_assets.core.ifd import LossScorer, ScoringConfig, TextBuilder, resolve_context_token
from srt_assets.core.templates import get_template
from srt_assets.models.loading import BUNDLED_MODEL, convert_bundled_model

STUDENT_BACKENDS = ("transformers", "vllm")
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"


def default_models_dir() -> Path:
    return paths.storage_dir() / "models"


def ensure_default_student_dir(models_dir: Path | None = None) -> Path:
    """The bundled SmolLM2 as an HF directory, converted on first use and reused afterwards."""
    out = (models_dir or default_models_dir()) / DEFAULT_MODEL_DIRNAME
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_bundled_model(out)
    return out


def resolve_model_path(model: str, models_dir: Path | None = None) -> str:
    """``bundled:...`` → the converted directory; anything else (a directory, a hub id) as given."""
    if model == BUNDLED_MODEL:
        return str(ensure_default_student_dir(models_dir))
    return model


def chat_formatter(tokenizer):
    """T(x) for template ``chat``: the tokenizer's chat template up to the assistant's turn."""

    def render(message: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )

    return render


def build_text_builder(tokenizer, template: str, config: ScoringConfig) -> TextBuilder:
    context = resolve_context_token(
        config.context, tokenizer.encode("probe"), tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    chat = chat_formatter(tokenizer) if template == "chat" else None
    return TextBuilder(tokenizer, get_template(template, chat), config, context)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class LazyStudent:
    """A LossScorer that loads its backend on first use, so a fully cached run loads no model."""

    def __init__(
        self, backend: str, model_path: str, device: str, dtype: str, token_budget: int, max_length: int = 2048
    ):
        if backend not in STUDENT_BACKENDS:
            raise ValueError(f"unknown student backend '{backend}'; choose one of {', '.join(STUDENT_BACKENDS)}")
        self.backend = backend
        self.settings = {"device": device, "dtype": dtype, "token_budget": token_budget}
        self.model_path = model_path
        self.max_length = max_length
        self._scorer: LossScorer | None = None
        self.was_loaded = False  # whether any call needed the model (kept after close, for metadata)

    def _load(self) -> LossScorer:
        if self.backend == "vllm":
            from srt_assets.models.student_vllm import VLLMStudent

            return VLLMStudent(
                self.model_path, dtype=self.settings["dtype"], token_budget=self.settings["token_budget"]
            )
        from srt_assets.models.student_hf import TransformersStudent

        return TransformersStudent(self.model_path, **self.settings)

    def close(self) -> None:
        """Release the backend (vLLM holds worker processes and memory)."""
        if self._scorer is not None and hasattr(self._scorer, "close"):
            self._scorer.close()
        self._scorer = None

    def mean_losses(self, sequences, target_starts) -> list[float]:
        if self._scorer is None:
            self._scorer = self._load()
            self.was_loaded = True
        return self._scorer.mean_losses(sequences, target_starts)
