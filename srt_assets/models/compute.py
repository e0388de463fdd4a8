"""Where and how model work runs (device, precision, batch size, student backend): one settings model
that the Dagster ``gpu`` resource is, and that every model session takes. No torch at import."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

StudentBackend = Literal["transformers", "vllm"]
Precision = Literal["float32", "bfloat16", "float16"]
PackKernel = Literal["auto", "segments", "flex"]


class ComputeSettings(BaseModel):
    """``device: auto`` takes the first CUDA device and falls back to CPU (saying so in the log)."""

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Precision = Field(default="float32", description="scoring and training: float32 is exact; bfloat16 is fast")
    generation_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="local generation (teacher, judge, answers): auto is bfloat16 where the device computes it "
        "natively (CUDA, CPUs with AMX or AVX512-BF16), else float32; a reply needs no exact log-probabilities",
    )
    token_budget: int = Field(default=1024, description="tokens per packed forward pass (batch size)")
    backend: StudentBackend = Field(default="transformers", description="student backend: transformers or vllm")
    attention_kernel: PackKernel = Field(
        default="auto",
        description="packed attention of the transformers student: flex (one FlexAttention call per layer), "
        "segments (one call per sequence) or auto (flex on CUDA, segments on CPU)",
    )

    def resolved_device(self) -> str:
        from srt_assets.models.loading import resolve_device

        return str(resolve_device(self.device))

    def resolved_generation_dtype(self, device: str | None = None) -> Precision:
        """``generation_dtype`` with ``auto`` decided for ``device`` (default: the resolved device)."""
        if self.generation_dtype != "auto":
            return self.generation_dtype  # type: ignore[return-value]
        from srt_assets.models.loading import computes_bfloat16

        return "bfloat16" if computes_bfloat16(device or self.resolved_device()) else "float32"

    def describe(self) -> dict[str, str | int]:
        device = self.resolved_device()
        return {
            "device": device,
            "dtype": self.dtype,
            "generation_dtype": self.resolved_generation_dtype(device),
            "backend": self.backend,
            "token_budget": self.token_budget,
            "attention_kernel": self.attention_kernel,
        }
