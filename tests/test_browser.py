"""The Dagster UI in a real browser (Playwright driving Debian's Chromium; nothing is downloaded at
run time): a person opens the catalog, launches one source partition of raw_samples by clicking,
waits for it, and sees that partition's checks pass while another partition's failed check stays on
that other partition."""

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import alpaca_rows, write_jsonl
from dagster_ui import dagster_dev, poll, run_raw_partition, wait_for_location

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
            page.goto(f"{base}/assets")
            page.locator('a[href="/assets/raw_samples"]').first.click()
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
