"""The transformers student backend: exact float32 or fast bfloat16 losses from packed rows.

Work saved compared with the reference batch-of-one loop (``batch_of_one_losses``):
no padding (packing with a varlen attention), shared template prefixes computed once per pack, and
the vocabulary projection only for positions that predict a target token. In ``float32`` the result
matches the reference to float rounding; ``bfloat16`` trades a little precision for speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from srt_assets.core.packing import plan_packs
from srt_assets.models.compute import PackKernel
from srt_assets.models.loading import DTYPES, resolve_device
from srt_assets.models.packed_attention import ATTENTION_NAME, KERNELS, resolve_kernel


class TransformersStudent:
    """``LossScorer`` over a Hugging Face causal LM (a local directory or a hub id)."""

    backend = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        dtype: str = "float32",
        token_budget: int = 1024,
        attention_kernel: PackKernel = "auto",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        self.model_path = str(model_path)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.token_budget = token_budget
        self.attention_kernel = resolve_kernel(attention_kernel, self.device)
        self._pack_attention = KERNELS[self.attention_kernel]
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=DTYPES[dtype], attn_implementation=ATTENTION_NAME
        ).to(self.device)
        self.model.eval()
        self._decoder = self.model.get_decoder()
        self._head = self.model.get_output_embeddings()
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self._pad_id = self.tokenizer.pad_token_id or 0  # padding rows are computed, never read

    @torch.inference_mode()
    def mean_losses(self, sequences: Sequence[Sequence[int]], target_starts: Sequence[int]) -> list[float]:
        totals = torch.zeros(len(sequences), dtype=torch.float64)
        counts = torch.zeros(len(sequences), dtype=torch.float64)
        for pack in plan_packs(sequences, target_starts, self.token_budget):
            length = self._pack_attention.padded_length(len(pack), self.token_budget)
            padding = length - len(pack)
            ids = torch.tensor([pack.token_ids + [self._pad_id] * padding], device=self.device)
            positions = torch.tensor([pack.position_ids + list(range(padding))], device=self.device)
            hidden = self._decoder(
                input_ids=ids,
                position_ids=positions,
                use_cache=False,
                srt_pack=self._pack_attention.build(pack.segments, length, self.device),
            ).last_hidden_state[0]
            rows = hidden[torch.tensor(pack.predict_rows, device=self.device)]
            # float32 logits stay float32 (exact mode); bfloat16 ones go into the loss as they are,
            # which avoids a full-vocabulary upcast per target token (fast mode).
            logits = self._head(rows)
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            token_losses = F.cross_entropy(
                logits, torch.tensor(pack.target_ids, device=self.device), reduction="none"
            ).double()
            owners = torch.tensor(pack.owners)
            totals.index_add_(0, owners, token_losses.cpu())
            counts.index_add_(0, owners, torch.ones_like(token_losses, device="cpu"))
        return [t / c if c else math.nan for t, c in zip(totals.tolist(), counts.tolist(), strict=True)]


@torch.inference_mode()
def batch_of_one_losses(model, sequences: Sequence[Sequence[int]], target_starts: Sequence[int]) -> list[float]:
    """The reference computation (as the authors do): one sequence at a time, context labels set to
    -100, ``outputs.loss``. Used to prove the packed engine exact and as the benchmark baseline."""
    device = next(model.parameters()).device
    losses = []
    for ids, start in zip(sequences, target_starts, strict=True):
        if not 1 <= start < len(ids):
            losses.append(math.nan)
            continue
        input_ids = torch.tensor([list(ids)], device=device)
        labels = input_ids.clone()
        labels[0, :start] = -100
        losses.append(model(input_ids=input_ids, labels=labels).loss.item())
    return losses
