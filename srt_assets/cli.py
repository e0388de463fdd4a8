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


def materialize_partition(
    source: str, selection: str | None = None, raise_on_error: bool = False, run_config: dict | None = None
):
    """Materialize the selected assets (default: all) of one source partition, recorded in the
    persistent Dagster instance so the runs show in the UI."""
    _ensure_dagster_home()
    from dagster import AssetSelection, DagsterInstance

    from srt_assets.definitions import defs

    job = defs.resolve_implicit_global_asset_job_def()
    asset_keys = None
    if selection:
        asset_keys = list(
            AssetSelection.from_string(selection).required_multi_asset_neighbors().resolve(defs.resolve_asset_graph())
        )
    return job.execute_in_process(
        instance=DagsterInstance.get(),
        partition_key=source,
        asset_selection=asset_keys,
        # progress lines (teacher calls, training steps) without Dagster's per-event debug output
        run_config=run_config or load_run_config(None),
        raise_on_error=raise_on_error,
        tags={"srt/launched_by": "cli"},
    )


def _report(result, source: str, started: float) -> int:
    from dagster import DagsterEventType

    print(
        f"\nrun {result.run_id} for source '{source}': {'SUCCESS' if result.success else 'FAILURE'} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.step_materialization_data.materialization
            rows = mat.metadata.get("row_count") or mat.metadata.get("dagster/row_count")
            rows_text = f" ({rows.value} rows)" if rows is not None else ""
            print(f"  materialized {mat.asset_key.to_user_string()}{rows_text}")
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            print(f"  FAILED step {event.step_key}: {error.message.strip() if error else ''}")
    for evaluation in result.get_asset_check_evaluations():
        mark = "ok  " if evaluation.passed else "FAIL"
        print(f"  check {mark} {evaluation.asset_key.to_user_string()}:{evaluation.check_name}")
    return 0 if result.success else 1


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
    result = materialize_partition(args.source, args.select, run_config=load_run_config(args.config))
    return _report(result, args.source, started)


EXPLAINED_TABLES = (
    "raw_samples",
    "instruction_candidates",
    "response_candidates",
    "student_scores",
    "selection_decisions",
    "selected_dataset",
    "baseline_random",
)


def load_partition_tables(source: str, storage: Path | None = None) -> dict:
    """The materialized tables of one source partition that mention samples (absent ones skipped)."""
    import polars as pl

    base = storage or paths.storage_dir()
    files = {name: base / name / f"{source}.parquet" for name in EXPLAINED_TABLES}
    return {name: pl.read_parquet(path) for name, path in files.items() if path.is_file()}


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from srt_assets.core.provenance import explain_sample, format_story, source_of

    try:
        source = source_of(args.sample_id)
    except ValueError as error:
        print(f"srt explain: {error}", file=sys.stderr)
        return 2
    tables = load_partition_tables(source, Path(args.storage) if args.storage else None)
    if "raw_samples" not in tables:
        where = args.storage or paths.storage_dir()
        print(f"srt explain: no materialized raw_samples for source '{source}' under {where}", file=sys.stderr)
        return 1
    story = explain_sample(args.sample_id, tables)
    if not story.get("raw_samples"):
        print(f"srt explain: sample {args.sample_id} is not in raw_samples of '{source}'", file=sys.stderr)
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
    mat.set_defaults(func=cmd_materialize)
    explain = sub.add_parser("explain", help="trace one sample: raw row, teacher calls, scores, decision")
    explain.add_argument("sample_id")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--storage", default=None, help="storage folder (default: $SRT_STORAGE_DIR)")
    explain.set_defaults(func=cmd_explain)
    demo = sub.add_parser("demo", help="materialize the whole pipeline for the demo source")
    demo.add_argument("--source", default="demo")
    demo.add_argument("--config", default=None, help="YAML run config (ops: ... as in the launchpad)")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
