"""The experiment report: sections (title, note, table, figure) rendered as Markdown + HTML files with
PNG figures, and as Markdown with the figures embedded for the UI."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from srt_assets.core.datasets import BASE
from srt_assets.core.files import atomic_write_bytes, atomic_write_text
from srt_assets.plots import _pyplot, markdown_table, png_markdown

VERDICT_COLOURS = {"win": "#3f8f4f", "tie": "#b0b0b0", "lose": "#b04040"}


@dataclass(frozen=True)
class Figure:
    file_name: str  # written beside report.md, which links it; embedded in the UI's copy
    png: bytes


@dataclass(frozen=True)
class Section:
    """One part of the report: a title, a sentence that says what it shows, a table, a figure. Each
    evaluation contributes its own (defs/evaluation/report.py lists them in reading order)."""

    title: str
    note: str = ""
    table: pl.DataFrame | None = None
    figure: Figure | None = None
    key: str | None = None  # the name of its table in the report's results (default: the title)


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
        datasets.append(BASE)
        base = losses.filter((pl.col("dataset") == datasets[0]) & pl.col("base_loss").is_finite())
        data.append(base["base_loss"].to_list())
    if data:
        axis.boxplot(data, tick_labels=datasets)
    axis.set_ylabel("mean loss on reference answers")
    return fig


INTRO = (
    "_{stamp}._ The student fine-tuned on its selected data (`selected`) against the same student fine-tuned on "
    "a random sample of equal size (`random`), on all original rows (`full`) and on every teacher rewrite without the "
    "student's choice (`teacher`). Verdicts are from the first "
    "model's side, judged by the judge in both answer orders; winning score = (wins − losses) / judged + 1 "
    "(above 1: the first model is better).\n"
)
HTML_STYLE = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:2px 6px}"


def write_report(source: str, sections: Sequence[Section], out_dir: Path) -> Report:
    """The report of ``sections`` as report.md (with PNG files beside it) and report.html in
    ``out_dir``, and as Markdown with the figures embedded, for the UI."""
    out_dir.mkdir(parents=True, exist_ok=True)
    intro = INTRO.format(stamp=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    heading = f"# srt experiment report: source `{source}`\n\n"
    md_file, md_inline, html_parts = [heading + intro], [heading + intro], [f"<p>{html.escape(intro)}</p>"]
    for section in sections:
        for target in (md_file, md_inline):
            target.append(f"\n## {section.title}\n")
            if section.note:
                target.append(f"\n{section.note}\n\n")
            if section.table is not None:
                target.append(markdown_table(section.table, max_chars=200) + "\n")
        html_parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.note:
            html_parts.append(f"<p>{html.escape(section.note)}</p>")
        if section.table is not None:
            html_parts.append(_table_html(section.table))
        if section.figure is not None:
            name = section.figure.file_name
            atomic_write_bytes(out_dir / name, section.figure.png)
            md_file.append(f"\n![{section.title}]({name})\n")
            md_inline.append("\n" + png_markdown(section.figure.png, section.title) + "\n")
            html_parts.append(f'<img src="{html.escape(name)}" alt="{html.escape(section.title)}">')
    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(markdown_path, "".join(md_file))
    title = html.escape(source)
    atomic_write_text(
        html_path,
        f"<!doctype html><html><head><meta charset='utf-8'><title>srt report {title}</title>"
        f"<style>{HTML_STYLE}</style></head><body><h1>srt experiment report: {title}</h1>"
        + "".join(html_parts)
        + "</body></html>",
    )
    results = {s.key or s.title: s.table.to_dicts() for s in sections if s.table is not None}
    return Report(markdown_path, html_path, "".join(md_inline), results)
