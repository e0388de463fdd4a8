"""Untrusted text (rows, teacher and judge replies) shown in Markdown metadata renders as the
characters themselves: no image (a beacon), link, autolink or HTML; and a rewrite that adds such
markup is flagged."""

import html as html_module
import re

import polars as pl
import pytest
from markdown_it import MarkdownIt

from srt_assets.core.candidate_quality import Candidate, adds_markup, candidate_flags
from srt_assets.plots import markdown_table, markdown_text

HOSTILE = [
    "![x](http://127.0.0.1:9/beacon?leak=1)",
    '<img src="http://127.0.0.1:9/b">',
    "[click](javascript:alert(1)) and [docs](https://example.com)",
    "<https://example.com/autolink> and www.example.com and ops@example.com",
    "see https://example.com/a`b`` for `more`",
    "**bold** _em_ `code` # not a heading",
    "[ref]: http://127.0.0.1:9/ref\n![x][ref]",
    "a | b | c\n| --- |",
    "&lt;img src=x&gt; &amp;",
    "one\r| --- |\rtwo",  # a lone carriage return ended the table row
]


def render(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(markdown)


@pytest.mark.parametrize("text", HOSTILE)
def test_a_hostile_cell_renders_as_its_own_characters(text: str):
    html = render(markdown_table(pl.DataFrame({"instruction": [text], "n": [1]}), max_chars=400))
    assert "<img" not in html and "<a " not in html and "<strong>" not in html and "<em>" not in html
    assert html.count("<tr>") == 2  # the header and one row: the cell's pipes and newlines did not split it
    cell = render(markdown_text(text)).removeprefix("<p>").removesuffix("</p>\n")
    shown = re.sub(r"</?code>", "", cell)  # URLs and e-mail addresses show as inline code
    assert html_module.unescape(shown) == text.replace("\r", "\n").replace("\n", "⏎ ")


def test_an_unescaped_table_would_render_the_beacon():
    """The check above can fail: the same payload unescaped is an image."""
    assert "<img" in render("| a |\n|---|\n| ![x](http://127.0.0.1:9/beacon) |")


def candidate(output: str, source_output: str = "Paris is the capital of France.") -> Candidate:
    return Candidate("A", "What is the capital of France?", output, "What is the capital of France?", source_output)


@pytest.mark.parametrize(
    "output",
    [
        "Paris. ![map](http://127.0.0.1:9/beacon?leak=1)",
        "Paris, see [the map](https://example.com/map).",
        'Paris <img src="x" onerror="fetch(1)">',
        "Paris.\n\n[1]: https://example.com",
        'Paris <iframe src="http://127.0.0.1:9/"></iframe>',
        # the hostile re-test's bypasses of the first rule
        "Paris ![a [b] c](http://127.0.0.1:9/b)",
        "Paris ![a\nb](http://127.0.0.1:9/b)",
        "Paris [click]( http://127.0.0.1:9/b)",
        "Paris [a [b] c](http://127.0.0.1:9/b)",
        "Paris <image src=http://127.0.0.1:9/b>",
        "Paris <input type=image src=http://127.0.0.1:9/b>",
        '<div style="background:url(http://127.0.0.1:9/b)">Paris</div>',
        "<table background=http://127.0.0.1:9/b><tr><td>Paris</td></tr></table>",
        "Paris, see http://127.0.0.1:9/b",
        "Paris, see <http://127.0.0.1:9/b>",
        "Hi ``` ![x](http://127.0.0.1:9/b)",
        "Hi ~~~ ![x](http://127.0.0.1:9/b)",
        "Paris ![x]\n\n[x]: http://127.0.0.1:9/b",
    ],
)
def test_a_rewrite_that_adds_markup_is_flagged(output: str):
    assert adds_markup(candidate(output))
    assert "adds_markup" in candidate_flags(candidate(output))


@pytest.mark.parametrize(
    ("output", "source_output"),
    [
        ("Paris is the capital; 3 < 4 and 5 > 2.", "Paris."),  # comparisons are not tags
        ("Use `<div>` here:\n```html\n<p><a href='x'>hi</a></p>\n```", "A div."),  # markup inside code
        ("The list [1, 2] (sorted).", "A list."),  # brackets then parentheses with a space
        ('<a href="x">Paris</a> is the capital.', '<img src="y">.'),  # the source already had such HTML
        ("<b>Paris</b> <nooutput>", "Paris."),  # tags that load or link nothing
        ("See [the docs](https://a.b) again.", "See [docs](https://a.b)."),
        ("An image by reference: ![x][r]", "See [r].\n\n[r]: https://a.b\n\n![logo][r]"),
        ("Use fenced code:\n```\n![x](http://a.b)\n```", "Code."),
    ],
)
def test_markup_the_source_had_or_code_is_not_flagged(output: str, source_output: str):
    assert not adds_markup(candidate(output, source_output))
