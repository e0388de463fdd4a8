"""A model directory with the bundled student's architecture (or a larger SmolLM2 shape) and random
weights from a fixed seed, for throughput benchmarks on machines that cannot carry the weights
(a lent GPU machine takes at most 64 MiB). Speed depends on the shapes, not on the weights.

    python benchmarks/random_model.py CONFIG_DIR OUT_DIR [--shape 135m|1.7b]

CONFIG_DIR holds config.json and the tokenizer files (e.g. the converted bundled model, weights left out).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# SmolLM2-1.7B's published shape: the same family, 13x the parameters
SHAPES = {"135m": {}, "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                              "num_attention_heads": 32, "num_key_value_heads": 32}}  # fmt: skip


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.config_dir)
    for key, value in SHAPES[args.shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir)
    for file in args.config_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(file, args.out_dir / file.name)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.shape}: {parameters:.0f}M parameters, random weights, {args.out_dir}")


if __name__ == "__main__":
    main()
