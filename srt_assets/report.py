"""The experiment report: selected vs random vs full, as Markdown + HTML files with PNG figures."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from srt_assets.core.files import atomic_write_bytes, atomic_write_text
from srt_assets.core.judging import pairwise_summary
from srt_assets.plots import _pyplot, figure_png, line_figure, markdown_table, png_markdown

VERDICT_COLOURS = {"win": "#3f8f4f", "tie": "#b0b0b0", "lose": "#b04040"}


@dataclass(frozen=True)
class Section:
    """One more part of the report: a title, a sentence that says what it shows, a table."""

    title: str
    note: str
    table: pl.DataFrame | None = None


@dataclass
class Report:
    markdown_path: Path
    html_path: Path
    inline_markdown: str  # the same report with figures embedded, for the Dagster UI
    results: dict


def _table_html(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in frame.iter_rows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def finite_mean(values: pl.Series) -> float:
    """Mean over finite values: a reference with no scorable token (null/NaN loss) is left out."""
    finite = values.filter(values.is_finite())
    return float(finite.mean()) if finite.len() else math.nan


def verdict_note(judgements: pl.DataFrame, judged: int) -> str:
    """Why the verdict chart is missing, when it is."""
    if judgements.is_empty():
        return "No verdict chart: no comparison was configured or no answers were there to judge."
    if judged == 0:
        return (
            f"No verdict chart: all {judgements.height} comparisons are unjudged. The judge never put two "
            "ratings on the first line of its reply (its replies are in pairwise_verdicts, columns "
            "judge_text_first and judge_text_second). A small model cannot judge: configure a capable judge "
            "(the `judge` resource), or rely on the judge-free reference loss below."
        )
    return ""


def verdict_figure(summary: pl.DataFrame):
    """Stacked win/tie/lose bars, one bar per (pair, test set)."""
    plt = _pyplot()
    labels = [f"{r['model']} vs {r['opponent']}\n{r['prompt_set']}" for r in summary.iter_rows(named=True)]
    fig, axis = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 3.5))
    bottom = [0] * len(labels)
    for verdict, colour in VERDICT_COLOURS.items():
        values = summary[verdict].to_list() if summary.height else []
        axis.bar(range(len(labels)), values, bottom=bottom, color=colour, label=verdict)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_ylabel("prompts")
    axis.legend()
    return fig


def loss_figure(losses: pl.DataFrame):
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(5, 3))
    datasets = sorted(losses["dataset"].unique()) if losses.height else []
    data = [losses.filter((pl.col("dataset") == d) & pl.col("loss").is_finite())["loss"].to_list() for d in datasets]
    if losses.height:
        datasets.append("base")
        base = losses.filter((pl.col("dataset") == datasets[0]) & pl.col("base_loss").is_finite())
        data.append(base["base_loss"].to_list())
    if data:
        axis.boxplot(data, tick_labels=datasets)
    axis.set_ylabel("mean loss on reference answers")
    return fig


def build_report(
    source: str,
    judgements: pl.DataFrame,
    reference_losses: pl.DataFrame,
    manifests: dict[str, dict | None],
    out_dir: Path,
    extra: Sequence[Section] = (),
    closing: Sequence[Section] = (),
) -> Report:
    """The report; ``extra`` sections (data quality, the student's diagnostics, more metrics) come first,
    so a reader sees what the comparison rests on before the comparison; ``closing`` ones (the
    field's benchmarks) end it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = pairwise_summary(judgements) if judgements.height else pl.DataFrame()
    training_rows = []
    for dataset, manifest in manifests.items():
        training = (manifest or {}).get("training", {})
        part = reference_losses.filter(pl.col("dataset") == dataset)
        training_rows.append(
            {
                "dataset": dataset,
                "rows": (manifest or {}).get("rows"),
                "steps": training.get("steps"),
                "final_train_loss": (manifest or {}).get("final_loss"),
                "train_seconds": training.get("seconds"),
                "reference_loss": finite_mean(part["loss"]),
                "base_reference_loss": finite_mean(part["base_loss"]),
            }
        )
    training_table = pl.DataFrame(training_rows)
    curves = {d: (m or {}).get("training", {}).get("losses", []) for d, m in manifests.items()}
    judged = int(summary["judged"].sum()) if summary.height else 0
    figures = {
        "verdicts.png": figure_png(verdict_figure(summary)) if judged else None,
        "reference_loss.png": figure_png(loss_figure(reference_losses)),
        "training_curves.png": figure_png(line_figure({d: c for d, c in curves.items() if c}, "optimizer step")),
    }
    for name, png in figures.items():
        if png is not None:
            atomic_write_bytes(out_dir / name, png)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    overall = summary.filter(pl.col("prompt_set") == "all") if summary.height else summary
    intro = (
        f"# srt experiment report: source `{source}`\n\n_{stamp}._ The student fine-tuned on its selected data "
        "(`selected`) against the same student fine-tuned on a random sample of equal size (`random`) and on all "
        "original rows (`full`). Verdicts are from the first model's side, judged by the judge in both answer "
        "orders; winning score = (wins − losses) / judged + 1 (above 1: the first model is better).\n"
    )
    notes = {"Pairwise judging (all test sets)": verdict_note(judgements, judged)}
    notes.update({section.title: section.note for section in (*extra, *closing)})
    sections = [
        *((section.title, section.table, None) for section in extra),
        ("Pairwise judging (all test sets)", overall, "verdicts.png"),
        ("Pairwise judging per test set", summary, None),
        ("Training and reference-answer loss (lower is better)", training_table, "reference_loss.png"),
        ("Training curves", None, "training_curves.png"),
        *((section.title, section.table, None) for section in closing),
    ]
    md_file, md_inline, html_parts = [intro], [intro], [f"<p>{html.escape(intro.split(chr(10), 2)[2])}</p>"]
    for title, table, figure in sections:
        note = notes.get(title)
        for target in (md_file, md_inline):
            target.append(f"\n## {title}\n")
            if note:
                target.append(f"\n{note}\n\n")
            if table is not None:
                target.append(markdown_table(table, max_chars=200) + "\n")
        html_parts.append(f"<h2>{html.escape(title)}</h2>")
        if note:
            html_parts.append(f"<p>{html.escape(note)}</p>")
        if table is not None:
            html_parts.append(_table_html(table))
        if figure and figures.get(figure):
            md_file.append(f"\n![{title}]({figure})\n")
            md_inline.append("\n" + png_markdown(figures[figure], title) + "\n")
            html_parts.append(f'<img src="{figure}" alt="{html.escape(title)}">')
    markdown_path = out_dir / "report.md"
    atomic_write_text(markdown_path, "".join(md_file))
    html_path = out_dir / "report.html"
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:2px 6px}"
    atomic_write_text(
        html_path,
        f"<!doctype html><html><head><meta charset='utf-8'><title>srt report {html.escape(source)}</title>"
        f"<style>{style}</style></head><body><h1>srt experiment report: {html.escape(source)}</h1>"
        + "".join(html_parts)
        + "</body></html>",
    )
    results = {
        "pairwise": overall.to_dicts() if overall.height else [],
        "training": training_table.to_dicts(),
        **{section.title: section.table.to_dicts() for section in (*extra, *closing) if section.table is not None},
    }
    return Report(markdown_path, html_path, "".join(md_inline), results)
