"""Where and how model work runs (device, precision, batch size, student backend): one settings model
that the Dagster ``gpu`` resource is, and that every model session takes. No torch at import."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

StudentBackend = Literal["transformers", "vllm"]


class ComputeSettings(BaseModel):
    """``device: auto`` takes the first CUDA device and falls back to CPU (saying so in the log)."""

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="float32 is exact; bfloat16 is the fast mode"
    )
    token_budget: int = Field(default=1024, description="tokens per packed forward pass (batch size)")
    backend: StudentBackend = Field(default="transformers", description="student backend: transformers or vllm")

    def resolved_device(self) -> str:
        from srt_assets.models.loading import resolve_device

        return str(resolve_device(self.device))

    def describe(self) -> dict[str, str | int]:
        return {
            "device": self.resolved_device(),
            "dtype": self.dtype,
            "backend": self.backend,
            "token_budget": self.token_budget,
        }
