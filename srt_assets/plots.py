"""Rendering for asset metadata and reports: Markdown tables, and figures (matplotlib, headless) as
PNG bytes or inline Markdown."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Mapping

import polars as pl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    _pyplot().close(fig)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """A PNG embedded in Markdown as a data URI (the Dagster UI renders it inline)."""

    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def histogram_figure(series: dict[str, list[float]], bins: int = 30):
    fig, axes = _pyplot().subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for axis, (name, values) in zip(axes[0], series.items(), strict=True):
        finite = [v for v in values if v is not None]
        axis.hist(finite, bins=bins, color="#4f6fad")
        axis.axvline(1.0, color="#b04040", linestyle="--", linewidth=1)
        axis.set_title(f"{name} (n={len(finite)})")
    return fig


def histogram_markdown(series: dict[str, list[float]], bins: int = 30) -> str:
    """Histograms of a few numeric columns as one PNG embedded in Markdown."""
    return png_markdown(figure_png(histogram_figure(series, bins)), "histograms")


def text_histogram(values: list[float | None], label: str, bins: int = 10, width: int = 20, mark: float = 1.0) -> str:
    """A histogram as a short Markdown table of bars, small enough (under 1,000 characters) for the
    Dagster UI to show inline; the bin that holds ``mark`` (the selection threshold) is flagged."""
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return f"_no {label} values to show_"
    low, high = finite[0], finite[-1]
    if high == low:
        return f"| {label} | n |\n|---|---:|\n| {low:.3g} (every value) | {len(finite)} |"
    step = (high - low) / bins
    counts = [0] * bins
    for value in finite:
        counts[min(int((value - low) / step), bins - 1)] += 1
    top = max(counts)
    rows = [f"| {label} | n | |", "|---|---:|---|"]
    for index, count in enumerate(counts):
        start, end = low + index * step, low + (index + 1) * step
        flag = f" ◂ {mark:g}" if start <= mark < end or (index == bins - 1 and mark == end) else ""
        bar = "█" * round(width * count / top)
        rows.append(f"| {start:.3g}–{end:.3g}{flag} | {count} | {bar} |")
    return "\n".join(rows)


def text_curve(values: list[float], x_label: str, y_label: str, points: int = 12, width: int = 20) -> str:
    """A curve as a short Markdown table of bars (at most ``points`` evenly spaced rows), small enough
    for the Dagster UI to show inline; bars span the range between the lowest and highest value."""
    finite = [(i + 1, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not finite:
        return f"_no {y_label} values to show_"
    stride = max(1, math.ceil(len(finite) / points))
    shown = finite[::stride] + ([finite[-1]] if (len(finite) - 1) % stride else [])
    low, high = min(v for _, v in finite), max(v for _, v in finite)
    rows = [f"| {x_label} | {y_label} | |", "|---:|---:|---|"]
    for x, value in shown:
        bar = "█" * (1 + round((width - 1) * (value - low) / (high - low))) if high > low else "█"
        rows.append(f"| {x} | {value:.4g} | {bar} |")
    return "\n".join(rows)


def line_figure(series: dict[str, list[float]], xlabel: str):
    fig, axis = _pyplot().subplots(figsize=(5, 3))
    for name, values in series.items():
        axis.plot(range(1, len(values) + 1), values, marker="o" if len(values) < 30 else None, label=name)
    axis.set_xlabel(xlabel)
    if series:
        axis.legend()
    return fig


def line_plot_markdown(series: dict[str, list[float]], xlabel: str) -> str:
    return png_markdown(figure_png(line_figure(series, xlabel)), "curve")


_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # ASCII punctuation: CommonMark can escape each one
# What GitHub-flavoured Markdown turns into a link by itself, escaped or not: URLs, www. names, e-mails
_AUTOLINKED = re.compile(r"(?:[a-z][a-z0-9+.-]*://|www\.)[^\s<>]*|[\w.+-]+@[\w-]+\.[\w.-]+", re.IGNORECASE)


def _code_span(text: str) -> str:
    """``text`` as inline code, which renders no link: fenced by one backtick more than it holds."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    inside = text.replace("|", "\\|")  # a table cell's pipe stays escaped inside code
    return f"{fence} {inside} {fence}"


def markdown_text(text: str) -> str:
    """Untrusted text (data, model replies) as literal Markdown text on one line: every ASCII
    punctuation mark backslash-escaped, so no image (a beacon that loads in the viewer's browser), link,
    HTML tag or emphasis renders, and URLs and e-mail addresses as inline code, so the renderer's
    autolinking makes no live link of them; the reader sees the characters themselves."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "⏎ ")  # a lone \r ends a line too
    parts, last = [], 0
    for match in _AUTOLINKED.finditer(text):
        parts += [_MARKDOWN_SPECIAL.sub(r"\\\1", text[last : match.start()]), _code_span(match.group())]
        last = match.end()
    return "".join([*parts, _MARKDOWN_SPECIAL.sub(r"\\\1", text[last:])])


def markdown_table(frame: pl.DataFrame, max_chars: int = 80) -> str:
    """Render a few rows as a Markdown table for the Dagster UI, long texts shortened; cells are
    untrusted text (see ``markdown_text``)."""
    if frame.is_empty():
        return "_(no rows)_"

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.4g}"
        text = "" if value is None else str(value)
        return markdown_text(text if len(text) <= max_chars else text[: max_chars - 1] + "…")

    header = "| " + " | ".join(frame.columns) + " |"  # our column names, not data
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


def for_people(value: object) -> str:
    """A value as a person reads it: floats to 4 significant digits, None as a dash, collections as
    compact JSON (the tables and JSON metadata keep the exact value)."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def mapping_table(data: Mapping[str, object], key: str = "name", value: str = "value", empty: str = "_(none)_") -> str:
    """A dict as a small Markdown table instead of a JSON block: a dict of dicts (per column, per
    source) becomes one row per key and one column per inner key; any other dict one row per key;
    an empty dict reads as the sentence ``empty``, not as ``{}``."""
    if not data:
        return empty
    if all(isinstance(v, Mapping) for v in data.values()):
        inner = list(dict.fromkeys(name for v in data.values() for name in v))  # type: ignore[union-attr]
        rows = [{key: str(k), **{c: for_people(v.get(c)) for c in inner}} for k, v in data.items()]  # type: ignore[union-attr]
    else:
        rows = [{key: str(k), value: for_people(v)} for k, v in data.items()]
    return markdown_table(pl.DataFrame(rows, schema=dict.fromkeys(rows[0], pl.String())), max_chars=200)


def preview_markdown(frame: pl.DataFrame, total: int, max_chars: int = 80) -> str:
    """A preview table that says how much of the table it shows ("showing 5 of 6 rows")."""
    shown = f"_showing {frame.height} of {total} rows_"
    return shown if frame.is_empty() else f"{shown}\n\n{markdown_table(frame, max_chars)}"


def explain_config(sample_id: str) -> str:
    """The explain_sample launchpad config for one sample, ready to paste (a code block renders no
    Markdown; a sample id is ``<catalog source>-<16 hex digits>``, but newlines are dropped anyway)."""
    clean = " ".join(sample_id.split()).replace("`", "")
    return f"```yaml\nops:\n  explain_sample_op:\n    config:\n      sample_id: {clean}\n```"


def full_rows_markdown(frame: pl.DataFrame, max_chars: int = 4000) -> str:
    """Each row whole, one small two-column table per row (a long text stays readable, not cut at 80
    characters), each with the explain_sample config of its ``sample_id``; cells are untrusted text."""
    parts = []
    for row in frame.iter_rows(named=True):
        fields = pl.DataFrame(
            {"field": list(row), "value": [for_people(v) for v in row.values()]},
            schema={"field": pl.String(), "value": pl.String()},
        )
        parts.append(markdown_table(fields, max_chars=max_chars))
        if row.get("sample_id"):
            parts.append(f"explain_sample config:\n\n{explain_config(str(row['sample_id']))}")
    return "\n\n".join(parts) if parts else "_(no rows)_"
