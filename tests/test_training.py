"""Fine-tuning the real default student in one process (TRL's SFTTrainer, as each launched rank
runs it): the loss on the trained rows drops, the checkpoint reloads with from_pretrained, an
interrupted training resumes where it stopped, and a finished identical training is reused rather
than repeated. Several processes: tests/test_distributed_training.py."""

from __future__ import annotations

import json

import pytest
from conftest import alpaca_rows, table_cells, training_examples

from srt_assets.core.training import TrainingHyperparameters, run_identity
from srt_assets.models.student import load_tokenizer
from srt_assets.models.student_hf import TransformersStudent
from srt_assets.models.trainer import MANIFEST, train_sft

pytestmark = pytest.mark.slow
# 4 rows, batch 2, 3 epochs: 6 optimizer steps; no progress saves unless a test asks for them
HP = TrainingHyperparameters(
    learning_rate=2e-4, epochs=3, batch_size=2, max_length=160, warmup_ratio=0.0, save_every=100
)


@pytest.fixture(scope="module")
def examples(student_model_dir):
    return training_examples(student_model_dir, HP.max_length, 3, with_input=1)


def mean_loss(model_dir, examples) -> float:
    scorer = TransformersStudent(str(model_dir), device="cpu", dtype="float32")
    losses = scorer.mean_losses([ids for ids, _ in examples], [start for _, start in examples])
    return sum(losses) / len(losses)


def test_sft_examples_score_only_the_response(examples, student_model_dir):
    tokenizer = load_tokenizer(str(student_model_dir))
    ids, start = examples[0]
    assert ids[-1] == tokenizer.eos_token_id
    response = alpaca_rows(3, with_input=1)[0]["output"]
    assert tokenizer.decode(ids[start:-1]).strip() == response.strip()[: len(tokenizer.decode(ids[start:-1]).strip())]
    assert "<|im_start|>assistant" in tokenizer.decode(ids[:start])


def test_training_lowers_the_loss_and_the_checkpoint_reloads(examples, student_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    before = mean_loss(student_model_dir, examples)
    identity = run_identity("base", "data", "chat", HP)
    result = train_sft(str(student_model_dir), examples, HP, tmp_path / "ckpt", identity, device="cpu")
    after = mean_loss(tmp_path / "ckpt", examples)
    assert result.steps == 6 and len(result.losses) == 6 and result.target_tokens > 0
    assert after < before * 0.8, (before, after)
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    assert manifest["identity"] == identity and manifest["final_loss"] == result.losses[-1]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").num_parameters() > 100_000_000
    assert not (tmp_path / ".ckpt.progress").exists()  # progress state removed once finished
    again = train_sft(str(student_model_dir), examples, HP, tmp_path / "ckpt", identity, device="cpu")
    assert again.reused and again.losses == result.losses


class Interrupted(Exception):
    pass


def test_interrupted_training_resumes_from_its_last_save(examples, student_model_dir, tmp_path):
    hp = HP.model_copy(update=dict(epochs=2, learning_rate=1e-4, save_every=2))  # 4 steps, saved after step 2
    identity = run_identity("base", "data", "chat", hp)
    reference = train_sft(str(student_model_dir), examples, hp, tmp_path / "whole", identity, device="cpu")

    def crash_at_three(step, total, loss):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_sft(
            str(student_model_dir), examples, hp, tmp_path / "split", identity, device="cpu", on_step=crash_at_three
        )
    assert (tmp_path / ".split.progress" / "checkpoint-2").is_dir() and not (tmp_path / "split").exists()
    resumed = train_sft(str(student_model_dir), examples, hp, tmp_path / "split", identity, device="cpu")
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-4)
    other = run_identity("base", "other data", "chat", hp)  # a different training never resumes this state
    assert other != identity


def test_lora_training_merges_into_a_plain_checkpoint(examples, student_model_dir, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    hp = HP.model_copy(update=dict(lora_r=8, epochs=1, learning_rate=1e-3))
    result = train_sft(str(student_model_dir), examples, hp, tmp_path / "lora", run_identity("b", "d", "chat", hp))
    assert result.steps == 2  # 4 rows, batch 2, one epoch
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")  # merged: no peft needed to load
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert mean_loss(tmp_path / "lora", examples) < mean_loss(student_model_dir, examples)


def test_bf16_gradient_checkpointing_and_packing_train_together(examples, student_model_dir, tmp_path):
    """The memory settings of the shipped 7B configurations, on the small student."""
    import math

    from transformers import AutoModelForCausalLM

    hp = HP.model_copy(update=dict(max_steps=2, gradient_checkpointing=True, packing=True))
    result = train_sft(
        str(student_model_dir), examples, hp, tmp_path / "packed", run_identity("b", "d", "chat", hp), dtype="bfloat16"
    )
    assert result.steps == 2 and all(math.isfinite(loss) and loss > 0 for loss in result.losses)
    # 2 steps x 2 sequences: unpacked that is the 4 rows; packed, the sequences carry more than 4 rows
    assert len(examples) == 4 and result.tokens_trained > sum(len(ids) for ids, _ in examples)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "packed").num_parameters() > 100_000_000


def test_a_checkpoint_asset_called_directly_reuses_an_identical_training(student_model_dir, tmp_path):
    """The training stage's asset runs on a context built in the test. Dagster's Pipes cannot launch
    from a directly invoked partitioned asset, so the worker's own function trains first, with the
    identity the asset computes; the asset then finds that finished checkpoint and reuses it."""
    import polars as pl
    from dagster import build_asset_context

    from srt_assets.defs.partitions import SOURCES
    from srt_assets.defs.training.assets import CHECKPOINTS, checkpoint_dir, checkpoint_key, dataset_fingerprint
    from srt_assets.models.identity import model_fingerprint
    from srt_assets.resources import ComputeResource, StorageResource, StudentModelResource, TrainingResource

    [selected] = [c for c in CHECKPOINTS if c.key == checkpoint_key("selected")]
    rows = pl.DataFrame([{"sample_id": f"s-{i:016x}", "variant": "ori", **r} for i, r in enumerate(alpaca_rows(2))])
    student = StudentModelResource(model=str(student_model_dir))
    storage = StorageResource(base_dir=str(tmp_path))
    training = TrainingResource(max_steps=1, batch_size=2, max_length=96, save_every=100)
    partition = SOURCES.get_partition_keys()[0]
    identity = run_identity(
        model_fingerprint(student_model_dir), dataset_fingerprint(rows), student.template, training, 1
    )
    examples = training_examples(student_model_dir, training.max_length, 2, with_input=1)
    trained = train_sft(
        str(student_model_dir), examples, training, checkpoint_dir(storage, partition, "selected"), identity
    )
    result = selected(build_asset_context(partition_key=partition), rows, student, ComputeResource(), storage, training)
    assert result.metadata["reused_existing"] is True
    assert result.metadata["steps"] == trained.steps == 1
    assert table_cells(result.metadata["dataset"].value) == {
        "asset": "selected_dataset",
        "fingerprint": identity["dataset_fingerprint"],
        "rows": str(rows.height),
    }
