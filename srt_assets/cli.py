"""`srt`: the command line around the Dagster code location (list sources, materialize, demo)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from srt_assets import paths


def _ensure_dagster_home() -> Path:
    home = paths.dagster_home()
    os.environ.setdefault("DAGSTER_HOME", str(home))
    home.mkdir(parents=True, exist_ok=True)
    return home


def load_run_config(path: str | None) -> dict:
    """Run config from a YAML file (the launchpad's format: ops, resources, loggers); console
    logging at INFO unless the file says otherwise."""
    import yaml

    config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else {}
    if not isinstance(config, dict):
        raise SystemExit(f"srt: {path}: expected a YAML mapping of run config (ops:, loggers:, ...)")
    config.setdefault("loggers", {"console": {"config": {"log_level": "INFO"}}})
    return config


def plan_partition_runs(
    asset_graph, asset_keys, source: str, shard: int | None = None, skip_shards: bool = False
) -> list[tuple[str, list]]:
    """The runs that materialize ``asset_keys`` for one source, in order: a single run when every
    asset is per source; with a sharded catalog, the per-source assets the shards need, then one
    run per shard of the row stages (or only ``shard``), then the per-source assets after them.
    ``skip_shards``: one run of the per-source assets only, for when the shards ran elsewhere."""
    from dagster import AssetSelection, MultiPartitionKey, MultiPartitionsDefinition

    from srt_assets.partitions import SHARD_DIMENSION, SOURCE_DIMENSION

    keys = set(asset_keys)
    sharded = {k for k in keys if isinstance(asset_graph.get(k).partitions_def, MultiPartitionsDefinition)}
    if not sharded:
        if shard is not None or skip_shards:
            raise SystemExit("srt: --shard/--skip-shards need a sharded catalog ('shards: N' in the sources file)")
        return [(source, sorted(keys))]
    dimension = asset_graph.get(next(iter(sharded))).partitions_def.get_partitions_def_for_dimension(SHARD_DIMENSION)
    names = dimension.get_partition_keys()

    def shard_key(name: str) -> str:
        return str(MultiPartitionKey({SOURCE_DIMENSION: source, SHARD_DIMENSION: name}))

    if shard is not None:
        if str(shard) not in names:
            raise SystemExit(f"srt: no shard {shard} (shards are 0..{len(names) - 1})")
        return [(shard_key(str(shard)), sorted(sharded))]
    after = (AssetSelection.assets(*sharded).downstream().resolve(asset_graph) & keys) - sharded
    before = keys - sharded - after
    if skip_shards:
        return [(source, sorted(before | after))] if before | after else []
    runs = [(source, sorted(before))] if before else []
    runs += [(shard_key(name), sorted(sharded)) for name in names]
    return runs + ([(source, sorted(after))] if after else [])


def selected_asset_keys(graph, selection: str | None) -> set:
    """What a selection string (default: everything) runs: its assets with the multi-assets they
    need, and the observable source_files too, so after `srt demo` the UI shows the files it read."""
    from dagster import AssetSelection
    from dagster._core.definitions.asset_selection import DagsterInvalidAssetSelectionError

    if not selection:
        return set(graph.executable_asset_keys)
    try:
        chosen = AssetSelection.from_string(selection)
    except DagsterInvalidAssetSelectionError:
        raise SystemExit(
            f"srt: cannot read the selection {selection!r}: name assets (raw_samples), add + for upstream "
            "(+selected_dataset), or combine with 'key:a or key:b'"
        ) from None
    return chosen.required_multi_asset_neighbors().resolve(graph) & graph.executable_asset_keys


def materialize_partition(
    source: str,
    selection: str | None = None,
    raise_on_error: bool = False,
    run_config: dict | None = None,
    shard: int | None = None,
    skip_shards: bool = False,
    defs=None,
    instance=None,
) -> list:
    """Materialize the selected assets (default: all) of one source partition, recorded in the
    persistent Dagster instance so the runs show in the UI. Returns the run results; stops after
    the first failed run (a rerun resumes: finished shards and cached model calls are reused)."""
    import uuid

    from dagster import DagsterInstance

    from srt_assets.recovery import (
        HOST_TAG,
        PoolWatcher,
        ensure_pool_limit,
        free_dead_runs,
        free_slots_of_ended_runs,
        this_host,
    )

    # the job's own executor ($SRT_EXECUTOR) needs a job its workers can rebuild: the module's defs
    out_of_process = defs is None and bool(os.environ.get("SRT_EXECUTOR", "").strip())
    if defs is None:
        _ensure_dagster_home()
        from srt_assets.definitions import defs
    instance = instance or DagsterInstance.get()
    try:  # the pool's limit exists before two launchers race to create it; a killed run holds no slot
        ensure_pool_limit(instance)
        for line in free_dead_runs(instance):
            print(f"srt: {line}", file=sys.stderr)
    except Exception as error:
        print(f"srt: could not look for dead runs ({type(error).__name__}: {error}); going on", file=sys.stderr)
    job = defs.resolve_implicit_global_asset_job_def()
    graph = defs.resolve_asset_graph()
    asset_keys = selected_asset_keys(graph, selection)
    results = []
    for partition_key, keys in plan_partition_runs(graph, asset_keys, source, shard, skip_shards):
        run_id = str(uuid.uuid4())  # known before the run starts, so the pool watcher can follow it
        # progress lines (teacher calls, training steps) without Dagster's per-event debug output
        config = run_config or load_run_config(None)
        tags = {"srt/launched_by": "cli", HOST_TAG: this_host()}
        with PoolWatcher(instance, run_id):
            if out_of_process:
                result = execute_on_executor(job, instance, partition_key, keys, config, tags, run_id, raise_on_error)
            else:
                result = job.execute_in_process(
                    instance=instance,
                    partition_key=partition_key,
                    asset_selection=keys,
                    run_config=config,
                    raise_on_error=raise_on_error,
                    run_id=run_id,
                    tags=tags,
                )
        for line in free_slots_of_ended_runs(instance, [run_id]):
            print(f"srt: {line}", file=sys.stderr)
        results.append(result)
        if not result.success:
            break
    return results


def execute_on_executor(job, instance, partition_key: str, keys, run_config: dict, tags: dict, run_id: str,
                        raise_on_error: bool):  # fmt: skip
    """Run ``keys`` of one partition on the job's executor (Celery, Kubernetes, subprocesses): the
    steps run elsewhere and rebuild the job from ``srt_assets.definitions``, as a code location does."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import execute_run

    repository = ReconstructableRepository.for_module("srt_assets.definitions", "defs", str(paths.REPO_ROOT))
    recon_job = repository.get_reconstructable_job(job.name)
    run = instance.create_run_for_job(
        job_def=job,
        run_id=run_id,
        run_config=run_config,
        tags={**tags, **job.get_tags_for_partition_key(partition_key, keys)},
        asset_selection=frozenset(keys),
        job_code_origin=recon_job.get_python_origin(),
    )
    return execute_run(recon_job, run, instance, raise_on_error=raise_on_error)


def failure_reason(error) -> str:
    """The line that says what went wrong: the innermost cause of a step failure (Dagster's own
    message, "Error occurred while executing op ...", only says where)."""
    if error is None:
        return "unknown error"
    while error.cause is not None:
        error = error.cause
    return " ".join(error.message.split())


def _report(results: list, source: str, started: float) -> int:
    from dagster import AssetCheckSeverity, DagsterEventType

    from srt_assets.io_managers import PARTITION_ROW_COUNT, ROW_COUNT

    for result in results:
        partition = result.dagster_run.tags.get("dagster/partition", source)
        print(f"\nrun {result.run_id} for partition '{partition}': {'SUCCESS' if result.success else 'FAILURE'}")
        observed = [e for e in result.all_events if e.event_type == DagsterEventType.ASSET_OBSERVATION]
        if observed:
            print(f"  observed source_files ({len(observed)} sources of the catalog)")
        for event in result.all_events:
            if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                mat = event.step_materialization_data.materialization
                rows = mat.metadata.get(PARTITION_ROW_COUNT) or mat.metadata.get(ROW_COUNT)
                rows_text = f" ({rows.value} rows)" if rows is not None else ""
                print(f"  materialized {mat.asset_key.to_user_string()}{rows_text}")
            elif event.event_type == DagsterEventType.STEP_FAILURE:
                print(f"  FAILED step {event.step_key}: {failure_reason(event.step_failure_data.error)}")
        for evaluation in result.get_asset_check_evaluations():
            warns = evaluation.severity == AssetCheckSeverity.WARN  # a result check: it informs, it does not block
            mark = "ok  " if evaluation.passed else ("warn" if warns else "FAIL")
            print(f"  check {mark} {evaluation.asset_key.to_user_string()}:{evaluation.check_name}")
    success = bool(results) and all(result.success for result in results)
    print(f"\nsource '{source}': {'SUCCESS' if success else 'FAILURE'} in {time.perf_counter() - started:.1f}s")
    return 0 if success else 1


def cmd_sources(_: argparse.Namespace) -> int:
    from srt_assets.core.sources import load_catalog

    catalog = load_catalog(paths.sources_file())
    print(f"sources in {catalog.file}:")
    for name in catalog.names:
        spec = catalog.get(name)
        status = "ok" if spec.path.is_file() else "MISSING"
        print(f"  {name:16s} {status:8s} {spec.format:8s} {spec.path}")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    results = materialize_partition(
        args.source,
        args.select,
        run_config=load_run_config(args.config),
        shard=args.shard,
        skip_shards=args.skip_shards,
    )
    return _report(results, args.source, started)


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from srt_assets.core.files import UnreadableFileError
    from srt_assets.core.provenance import SampleNotFound, format_story, sample_story
    from srt_assets.core.sources import load_catalog

    catalog = load_catalog(paths.sources_file())
    storage = Path(args.storage) if args.storage else paths.storage_dir()
    try:
        story = sample_story(args.sample_id, storage, catalog.names, catalog.shards)
    except (SampleNotFound, UnreadableFileError) as error:
        print(f"srt explain: {error}", file=sys.stderr)
        return 1
    print(json.dumps(story, indent=1, default=str) if args.json else format_story(story))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    home = _ensure_dagster_home()
    print(
        f"srt demo: materializing every asset of the '{args.source}' partition on the embedded default "
        f"(Dagster instance: {home})"
    )
    started = time.perf_counter()
    code = _report(materialize_partition(args.source, run_config=load_run_config(args.config)), args.source, started)
    report = paths.storage_dir() / "reports" / args.source
    if (report / "report.html").is_file():
        print(f"\nExperiment report: {report / 'report.html'}\n  (Markdown with PNG figures: {report / 'report.md'})")
    print(
        "\nOpen the Dagster UI to browse the assets, their lineage, metadata and checks:\n"
        f"  cd {paths.REPO_ROOT} && DAGSTER_HOME={home} .venv/bin/dagster dev -w workspace.yaml"
        " -h 127.0.0.1 -p 3000\n"
        "  (or: make ui) then visit http://127.0.0.1:3000"
    )
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sources", help="list the declared sources and whether their files exist").set_defaults(
        func=cmd_sources
    )
    mat = sub.add_parser("materialize", help="materialize assets of one source partition")
    mat.add_argument("--source", required=True, help="partition (source name from sources.yaml)")
    mat.add_argument("--select", default=None, help="Dagster asset selection, e.g. 'raw_samples+' (default: all)")
    mat.add_argument("--config", default=None, help="YAML run config (ops: ... as in the launchpad)")
    mat.add_argument(
        "--shard",
        type=int,
        default=None,
        help="sharded catalogs: run only this shard's reflection and scoring (one GPU machine's part)",
    )
    mat.add_argument(
        "--skip-shards",
        action="store_true",
        help="sharded catalogs: run only the per-source assets, reading the shards other machines wrote",
    )
    mat.set_defaults(func=cmd_materialize)
    explain = sub.add_parser("explain", help="trace one sample: raw row, teacher calls, scores, decision")
    explain.add_argument("sample_id")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--storage", default=None, help="storage folder (default: $SRT_STORAGE_DIR)")
    explain.set_defaults(func=cmd_explain)
    demo = sub.add_parser("demo", help="materialize the whole pipeline for the demo source")
    demo.add_argument("--source", default="demo")
    demo.add_argument(
        "--config",
        default=str(paths.REPO_ROOT / "configs" / "demo.yaml"),
        help="YAML run config (default: configs/demo.yaml, the settings for the bundled 135M teacher)",
    )
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
