"""The Dagster UI in a real browser (Playwright driving Debian's Chromium; nothing is downloaded at
run time): a person opens the catalog, launches one source partition of raw_samples by clicking,
waits for it, and sees that partition's checks pass while another partition's failed check stays on
that other partition; hostile rows load nothing; an auditor reads a decision whose candidate fell
back, and the training sets side by side."""

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import alpaca_rows, write_catalog, write_jsonl
from dagster_ui import dagster_dev, poll, run_partition, run_raw_partition, wait_for_location

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install -e '.[dev]'")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's Chromium: apt-get install chromium (.ci/run installs it)"
    ),
]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RAW_CHECKS = ("schema_matches", "no_nulls", "text_not_blank", "sample_id_unique", "reject_ratio_below_bound")
RUNS = """{ runsOrError { ... on Runs { results { status tags { key value } } } } }"""


def run_status_of(partition: str):
    def status(data: dict) -> str | None:
        runs = [
            r for r in data["runsOrError"]["results"] if {"key": "dagster/partition", "value": partition} in r["tags"]
        ]
        return runs[0]["status"] if runs else None

    return status


@contextlib.contextmanager
def browser_page() -> Iterator:
    """A page of Debian's Chromium, as if the person had already closed Dagster's one-time "join the
    community" dialog."""
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
        try:
            yield context.new_page()
        finally:
            browser.close()


def click_visible(scope, text: str) -> None:
    """Click the visible element in ``scope`` whose text is exactly ``text`` (Dagster also renders
    hidden copies of names to measure them)."""
    matches = scope.get_by_text(text, exact=True)
    matches.first.wait_for(state="attached")
    next(element for element in matches.all() if element.is_visible()).click()


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "good.jsonl", alpaca_rows(4, with_input=1))
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]
    write_jsonl(tmp_path / "bad.jsonl", rows + [{"instruction": "q", "input": "", "output": ""}] * 2)  # 33% rejected
    path = tmp_path / "sources.yaml"
    path.write_text(
        "sources:\n"
        "  good:\n    path: good.jsonl\n    description: four Alpaca rows\n    license: CC BY-NC 4.0\n"
        "  bad:\n    path: bad.jsonl\n    max_reject_ratio: 0.1\n",
        encoding="utf-8",
    )
    return path


def test_a_person_launches_a_partition_and_sees_its_own_checks(tmp_path: Path, catalog: Path):
    with dagster_dev(tmp_path, SRT_SOURCES_FILE=str(catalog)) as port:
        assert wait_for_location(port)["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        assert run_raw_partition(port, "bad") == "FAILURE"  # its reject-ratio check fails and blocks
        base = f"http://127.0.0.1:{port}"
        with browser_page() as page:
            page.set_viewport_size({"width": 1600, "height": 2200})  # the catalog lists every asset at once
            page.goto(f"{base}/assets")
            page.locator('a[href="/assets/raw_samples"]').first.click()
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.wait_for_url("**/assets/raw_samples**")
            page.get_by_role("button", name="Materialize…").first.click()
            dialog = page.get_by_role("dialog")
            assert "Additional assets" not in dialog.inner_text()  # raw_rejects is not forced along
            page.get_by_text("Select a partition or create one").click()
            page.get_by_placeholder("Filter partitions").fill("good")
            click_visible(page, "good")
            page.keyboard.press("Escape")
            page.get_by_role("button", name="Launch 1 run").click()
            status = poll(port, RUNS, {}, run_status_of("good"), {"SUCCESS", "FAILURE", "CANCELED"}, 240)
            assert status == "SUCCESS"

            for check in RAW_CHECKS:
                page.goto(f"{base}/assets/raw_samples?view=checks&checkDetail={check}")
                page.get_by_text("Execution history", exact=True).wait_for()  # the check's own tabs are there
                page.get_by_text("Partitions", exact=True).last.click()  # ... and its Partitions tab is the last
                search = page.get_by_placeholder("Filter by partition…")
                # the partition column: the innermost block that holds its search field and the partitions
                partition_list = page.locator("div", has=search).filter(has=page.get_by_text("bad", exact=True)).last
                for partition, expected in (
                    ("good", "Passed"),
                    ("bad", "Failed" if check == RAW_CHECKS[-1] else "Passed"),
                ):
                    click_visible(partition_list, partition)
                    title = page.locator(f'div[title="{partition}"]')
                    panel = page.locator("div", has=title).filter(has_text="Latest execution").last
                    panel.locator(f'[data-tooltip="{expected}"]').first.wait_for(state="attached")  # the status tag
                    other = "Passed" if expected == "Failed" else "Failed"
                    assert panel.locator(f'[data-tooltip="{other}"]').count() == 0, (check, partition)


class BeaconServer:
    """A real HTTP server on 127.0.0.1 that records every request: the place a Markdown image, an
    HTML tag or a link in a hostile row would call home to."""

    def __init__(self):
        import http.server
        import threading

        self.paths: list[str] = []
        paths = self.paths

        class Record(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_markdown_beacons_in_rows_load_nothing_in_the_viewers_browser(tmp_path: Path):
    beacon = BeaconServer()
    payloads = [
        f"Describe ![logo]({beacon.url}/image?leak=md) the picture.",
        f'Explain <img src="{beacon.url}/html?leak=tag"> this tag.',
        f"Visit [the docs]({beacon.url}/link?leak=link) and {beacon.url}/auto?leak=autolink today.",
    ]
    rows = [{"instruction": text, "input": "", "output": f"Answer {i}."} for i, text in enumerate(payloads)]
    write_jsonl(tmp_path / "hostile.jsonl", rows)
    catalog = tmp_path / "sources.yaml"
    catalog.write_text("sources:\n  hostile:\n    path: hostile.jsonl\n", encoding="utf-8")
    try:
        with dagster_dev(tmp_path, SRT_SOURCES_FILE=str(catalog)) as port:
            assert wait_for_location(port)["locationOrLoadError"]["__typename"] == "RepositoryLocation"
            assert run_raw_partition(port, "hostile") == "SUCCESS"
            with browser_page() as page:
                page.goto(f"http://127.0.0.1:{port}/assets/raw_samples?partition=hostile")
                page.get_by_text("preview", exact=True).first.wait_for()
                # the preview table, rendered inline by Dagster's Markdown renderer
                table = page.locator(".dagster-markdown", has_text="logo").first
                table.scroll_into_view_if_needed()
                page.wait_for_timeout(1500)  # time for any image request to go out
                page.screenshot(path=str(tmp_path / "beacon.png"))
                shown = table.inner_text()
                to_beacon = f'[src*="{beacon.url}"], [href*="{beacon.url}"]'
                links = page.locator(to_beacon).count() + table.locator("a, img").count()
    finally:
        beacon.close()
    assert beacon.paths == [], f"the browser called the beacon server: {beacon.paths}"
    assert links == 0, "an image or a link to the beacon server is in the page"
    assert "![logo](" in shown and "<img src=" in shown  # the reader sees the characters themselves


SELECTION_RUN = [
    *("raw_samples", "raw_rejects", "new_instructions", "better_responses", "student_scores", "sample_decisions"),
    *("selected_dataset", "baseline_random", "baseline_full", "baseline_teacher", "training_sets"),
]


def metadata_markdown(page, label: str, screenshot: Path | None = None) -> str:
    """The text of the Markdown value under metadata ``label``, as the person reads it: inline, or
    (a long value) in the dialog its "[Show Markdown]" opens, which is then closed again."""
    row = page.locator("tr", has=page.get_by_text(label, exact=True)).first
    row.wait_for()
    row.scroll_into_view_if_needed()
    expand = row.get_by_text("[Show Markdown]", exact=True)
    if not expand.count():
        return row.locator(".dagster-markdown").first.inner_text()
    expand.click()
    dialog = page.get_by_role("dialog")
    dialog.locator(".dagster-markdown").first.wait_for()
    if screenshot:
        page.wait_for_timeout(800)  # the dialog fades in
        page.screenshot(path=str(screenshot))
    shown = dialog.inner_text()
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    return shown


def test_an_auditor_sees_a_fallback_named_as_such_and_the_sets_side_by_side(tmp_path: Path):
    """The demo's decisions read "IFD(Q)=0.3366 not > IFD(ori)=0.3366" where Q's rewrite had failed:
    here a source whose Q reflection of row 0 is missing (its text falls back to the original) runs
    through the selection with no model, and the person reading sample_decisions for `demo` sees that
    candidate named for what it is, then opens the training sets side by side."""
    from test_from_files import authors_layout, reflections_entry, write_statistics

    plan = ["QA", "A", "none", "QA"] * 3  # test_from_files.SCENARIOS
    paths = authors_layout(tmp_path / "files", len(plan))
    for split in ("reflect_instruction", "reflect_both"):  # row 0 has no new instruction, so no QA either
        rows = pl.read_parquet(paths[split]).with_columns(
            pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("")).otherwise("instruction").alias("instruction")
        )
        rows.write_parquet(paths[split])
    statistics = {"use": "instead", **{v: str(p) for v, p in write_statistics(tmp_path / "files", plan).items()}}
    entry = reflections_entry(paths) | {"statistics": statistics, "license": "CC BY-NC 4.0"}
    catalog = write_catalog(tmp_path, {"demo": entry})
    with dagster_dev(tmp_path, SRT_SOURCES_FILE=str(catalog)) as port:
        assert wait_for_location(port)["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        assert run_partition(port, "demo", SELECTION_RUN) == "SUCCESS"
        base = f"http://127.0.0.1:{port}"
        with browser_page() as page:
            page.goto(f"{base}/assets/sample_decisions?partition=demo")
            listed = metadata_markdown(page, "failed_reflections")  # short: inline
            page.screenshot(path=str(tmp_path / "sample_decisions.png"))
            preview = metadata_markdown(page, "decisions_preview", tmp_path / "decisions_preview.png")
            page.goto(f"{base}/assets/training_sets?partition=demo")
            comparison = metadata_markdown(page, "comparison")
            page.screenshot(path=str(tmp_path / "training_sets.png"))
            side = metadata_markdown(page, "samples_side_by_side", tmp_path / "side_by_side.png")
    assert "Q: missing — not a candidate" in preview  # the reason names the fallback, not IFD(Q) = IFD(ori)
    assert f"showing 5 of {len(plan)} rows" in preview and "explain_sample_op" in preview
    assert "showing 2 of 2 rows" in listed  # Q of row 0, and QA, which had no new instruction to answer
    for name in ("selected_dataset", "baseline_random", "baseline_full", "baseline_teacher"):
        assert name in comparison
    assert "original_output" in side
