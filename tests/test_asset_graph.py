"""The shape of the asset graph, snapshotted: keys, groups, partitions, checks (blocking or not),
pools, GPU tags, kinds and dependencies. A change to the graph shows up here as a diff to review;
after an intended change, rerun with SRT_UPDATE_SNAPSHOTS=1 to record the new shape."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT
from dagster import AssetKey

from srt_assets.definitions import build_definitions

SNAPSHOT = REPO_ROOT / "tests" / "snapshots" / "asset_graph.json"


def partitions_of(partitions_def) -> str | None:
    if partitions_def is None:
        return None
    dimensions = getattr(partitions_def, "partitions_defs", None)
    if dimensions:
        return " x ".join(d.name for d in dimensions)
    return "source"


def graph_shape(defs) -> dict:
    """Everything about the graph that a reviewer or a deployment relies on, as plain JSON."""
    graph = defs.resolve_asset_graph()
    shape = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets_def = node.assets_def
        op_tags = assets_def.node_def.tags if assets_def.is_executable else {}
        checks = sorted((spec.name, spec.blocking) for spec in assets_def.check_specs if spec.asset_key == key)
        shape[key.to_user_string()] = {
            "group": node.group_name,
            "partitions": partitions_of(node.partitions_def),
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "kinds": sorted(node.kinds),
            "pool": getattr(assets_def.node_def, "pool", None) if assets_def.is_executable else None,
            "gpu_tags": sorted(t for t in op_tags if t.startswith(("dagster-k8s", "dagster-celery", "srt/"))),
            "checks": [{"name": name, "blocking": blocking} for name, blocking in checks],
            "observable": assets_def.is_observable,
        }
    return {"assets": shape, "jobs": sorted(job.name for job in defs.jobs or [])}


def test_asset_graph_matches_the_snapshot():
    shape = graph_shape(build_definitions(sources_file=REPO_ROOT / "sources.yaml"))
    if os.environ.get("SRT_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(shape, indent=1, sort_keys=True) + "\n")
    assert shape == json.loads(SNAPSHOT.read_text())


def module_level_kinds() -> dict[str, str | None]:
    """Each asset's kind of partitions as its stage module declares it: sources, rows or none."""
    from srt_assets.defs import evaluation, raw, selection, student, teacher, training
    from srt_assets.defs.partitions import ROWS, SOURCES

    kinds = {}
    for stage in (raw, teacher, student, selection, training, evaluation):
        for definition in stage.ASSETS:
            for key in getattr(definition, "keys", None) or [definition.key]:
                kinds[key.to_user_string()] = next(
                    (name for name, p in (("sources", SOURCES), ("rows", ROWS)) if definition.partitions_def is p), None
                )
    return kinds


def test_each_checkpoint_is_importable_by_its_asset_name():
    """The one factory's assets are module-level names too: go-to-definition and direct calls work."""
    from srt_assets.defs import training
    from srt_assets.defs.training.assets import TRAINING_SETS

    for checkpoint in TRAINING_SETS:
        definition = getattr(training.assets, f"finetuned_{checkpoint}")
        assert definition.key.to_user_string() == f"finetuned_{checkpoint}"
        assert definition in training.ASSETS
    assert len(training.ASSETS) == len(TRAINING_SETS)


@pytest.mark.parametrize("shards", [1, 3])
def test_definitions_over_another_catalog_put_its_partitions_on_every_asset_and_check(tmp_path, shards):
    """The stage modules' assets carry the partitions of the catalog the code location loaded;
    Definitions over another catalog (other sources, with and without shards) carry that one's: the
    same kind on every asset as its module declares, the asset's own on every check, the catalog's
    table in the source files' description, and the reviewed graph otherwise."""
    catalog = tmp_path / "sources.yaml"
    entries = {"one": {"path": "one.jsonl"}, "two": {"path": "two.jsonl"}}
    catalog.write_text(yaml.safe_dump({"shards": shards, "sources": entries}), encoding="utf-8")
    defs = build_definitions(sources_file=catalog)
    reviewed = json.loads(SNAPSHOT.read_text())["assets"]
    shape = graph_shape(defs)["assets"]
    assert {k: {**v, "partitions": None} for k, v in shape.items()} == {
        k: {**v, "partitions": None} for k, v in reviewed.items()
    }
    rows = {f"{s}|{n}" for s in ("one", "two") for n in range(shards)} if shards > 1 else {"one", "two"}
    expected = {"sources": {"one", "two"}, "rows": rows, None: None}
    kinds = module_level_kinds()
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        keys = set(node.partitions_def.get_partition_keys()) if node.partitions_def else None
        assert keys == expected[kinds[key.to_user_string()]], key
        for spec in node.assets_def.check_specs:
            assert spec.partitions_def == node.partitions_def, spec.key
    files = graph.get(AssetKey("source_files")).assets_def
    assert str(catalog) in (files.specs_by_key[AssetKey("source_files")].description or "")


def test_the_dagster_internals_repartition_uses_are_still_what_it_passes():
    """repartition rebuilds assets through Dagster's internal constructors: a Dagster upgrade that
    adds a parameter (which it would silently drop) fails here, not in a user's graph."""
    import inspect

    from dagster._core.definitions.source_asset import SourceAsset

    from srt_assets.defs.raw.assets import raw_samples

    source = inspect.getsource(sys.modules["srt_assets.defs.partitions"]._source_asset)
    passed = set(re.findall(r"^\s+(\w+)=", source, re.MULTILINE))
    assert passed == set(inspect.signature(SourceAsset.dagster_internal_init).parameters) - {"self"}
    assert set(raw_samples.get_attributes_dict()) == {
        "keys_by_input_name", "keys_by_output_name", "node_def", "selected_asset_keys", "can_subset",
        "resource_defs", "hook_defs", "backfill_policy", "check_specs_by_output_name", "selected_asset_check_keys",
        "specs", "is_subset", "execution_type",
    }  # fmt: skip


def gpu_steps() -> set[str]:
    """The assets the reviewed snapshot puts in the gpu pool (the model steps)."""
    return {name for name, node in json.loads(SNAPSHOT.read_text())["assets"].items() if node["pool"] == "gpu"}


def live_shape() -> dict:
    return graph_shape(build_definitions(sources_file=REPO_ROOT / "sources.yaml"))["assets"]


def test_the_gpu_pool_holds_the_model_steps_and_they_carry_the_gpu_tags():
    shape = live_shape()
    pool = {name for name, node in shape.items() if node["pool"] == "gpu"}
    assert pool >= {"new_instructions", "better_responses", "student_scores", "finetuned_selected"}
    for name, node in shape.items():
        assert bool(node["gpu_tags"]) == (node["pool"] == "gpu"), name


@pytest.mark.integration
def test_the_code_location_loads_without_model_libraries():
    """The webserver's code server and every step process import the definitions: torch,
    transformers and vLLM are imported only inside the sessions that use them."""
    probe = (
        "import sys, srt_assets.definitions\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm', 'openai') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_every_asset_can_be_selected_alone():
    """What `dagster asset materialize --select <asset>` asks of the job: a subset of one asset
    (a multi-asset that cannot be subset made Dagster's own CLI fail outright)."""
    defs = build_definitions(sources_file=REPO_ROOT / "sources.yaml")
    job = defs.resolve_implicit_global_asset_job_def()
    graph = defs.resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        subset = job.get_subset(asset_selection={key})
        assert subset.asset_layer.executable_asset_keys >= {key}, key
        assert not (subset.asset_layer.executable_asset_keys - {key}), key  # nothing else comes along


def test_srt_runs_observe_the_source_files_and_a_selection_takes_what_it_names():
    """`srt demo` (every asset) observes source_files, so the UI does not read "Never observed"
    after a complete run; a named selection runs just that asset."""
    from srt_assets.cli import selected_asset_keys

    graph = build_definitions(sources_file=REPO_ROOT / "sources.yaml").resolve_asset_graph()
    everything = selected_asset_keys(graph, None)
    assert AssetKey("source_files") in everything and everything >= graph.materializable_asset_keys
    assert selected_asset_keys(graph, "raw_samples") == {AssetKey("raw_samples")}  # raw_rejects may stay
    with pytest.raises(SystemExit, match="cannot read the selection"):
        selected_asset_keys(graph, "raw_samples+(")


@pytest.mark.integration
def test_dagsters_own_cli_materializes_one_raw_asset(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "SRT_STORAGE_DIR": str(tmp_path / "store")}
    dagster = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "srt_assets.definitions"]
    for asset in ("raw_samples", "raw_rejects"):
        result = subprocess.run(
            [*dagster, "--select", asset, "--partition", "demo"],
            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / "store" / asset / "demo.parquet").is_file()
    assert not (tmp_path / "store" / "new_instructions").exists()


def test_asset_names_fit_the_nodes_of_a_zoomed_out_graph():
    """Dagster's lineage graph shortens names longer than 18 characters in its zoomed-out nodes."""
    assert [name for name in live_shape() if len(name) > 18] == []


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_shipped_run_config_is_valid_for_the_graph(name):
    """configs/*.yaml are launchpad run configs: a renamed asset or field must not leave them stale."""
    from dagster import validate_run_config

    run_config = yaml.safe_load((REPO_ROOT / "configs" / name).read_text(encoding="utf-8"))
    job = build_definitions().resolve_implicit_global_asset_job_def()
    assert validate_run_config(job, run_config)
