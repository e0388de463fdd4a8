"""Take the README's screenshots from a running Dagster UI (after `make demo`).

    make ui &   # or: dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000
    python docs/screenshots.py http://127.0.0.1:3000 [good_partition bad_partition]

Writes docs/asset_graph.png (the whole graph), docs/source_files.png (the catalog as the UI shows it),
the auditor's views of the `demo` partition (docs/sample_decisions.png: why candidates were none and the
failed reflections; docs/decisions_preview.png: the previewed decisions whole; docs/training_sets.png:
the sets side by side; docs/run_costs.png: the model calls' cost) and, given a partition whose
raw_samples checks passed and one whose reject-ratio check failed, docs/checks_per_partition.png.
Uses the machine's Chromium (/usr/bin/chromium); nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
DOCS = Path(__file__).resolve().parent
WIDE = 2200


def metadata_row(page, label: str):
    row = page.locator("tr", has=page.get_by_text(label, exact=True)).first
    row.wait_for()
    row.evaluate("row => row.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    return row


def dialog_to_top(page) -> None:
    """Scroll an open dialog back to its first line (it opens scrolled to its Close button)."""
    page.evaluate(
        """() => { const d = document.querySelector('[role=dialog]');
        for (let e = d; e; e = e.parentElement) e.scrollTop = 0;
        for (const e of d.querySelectorAll('*')) e.scrollTop = 0; }"""
    )
    page.wait_for_timeout(300)


def audit_screenshots(page, base_url: str, source: str) -> None:
    """What an auditor looks at: the decisions' metadata, one previewed decision whole, the sets."""
    page.goto(f"{base_url}/assets/sample_decisions?partition={source}")
    metadata_row(page, "branches")
    page.screenshot(path=str(DOCS / "sample_decisions.png"))
    metadata_row(page, "decisions_preview").get_by_text("[Show Markdown]", exact=True).click()
    page.get_by_role("dialog").locator(".dagster-markdown").first.wait_for()
    page.wait_for_timeout(800)
    dialog_to_top(page)
    page.screenshot(path=str(DOCS / "decisions_preview.png"))
    page.keyboard.press("Escape")
    # the comparison and cost tables are wide: a wider window shows all their columns
    page.set_viewport_size({"width": WIDE, "height": 900})
    page.goto(f"{base_url}/assets/training_sets?partition={source}")
    metadata_row(page, "comparison")
    page.screenshot(path=str(DOCS / "training_sets.png"))
    page.goto(f"{base_url}/assets/run_costs?partition={source}")
    metadata_row(page, "total_calls_made")
    page.screenshot(path=str(DOCS / "run_costs.png"))
    page.set_viewport_size({"width": 1600, "height": 900})


def main(base_url: str, good: str | None, bad: str | None) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        context = browser.new_context(viewport={"width": 1600, "height": 900})
        context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
        page = context.new_page()
        # the report's upstream lineage is the whole graph, every asset a node; the graph is taller
        # than wide, so a tall window, cut to the graph, keeps the names readable
        page.set_viewport_size({"width": 1600, "height": 2000})
        page.goto(f"{base_url}/assets/experiment_report?view=lineage&lineageScope=upstream&lineageDepth=20")
        page.wait_for_timeout(5000)
        page.screenshot(path=str(DOCS / "asset_graph.png"), clip={"x": 240, "y": 160, "width": 1360, "height": 1840})
        # the catalog table is wide (its last column says whether each file is there)
        page.set_viewport_size({"width": WIDE, "height": 900})
        page.goto(f"{base_url}/assets/source_files")
        page.get_by_text("file present").first.wait_for()
        # the whole catalog, not its first rows under Dagster's "Show more"
        more = page.get_by_text("Show more", exact=True)
        if more.count():
            more.first.click()
            page.mouse.move(0, 0)
            page.wait_for_timeout(500)
        page.screenshot(path=str(DOCS / "source_files.png"))
        page.set_viewport_size({"width": 1600, "height": 900})
        audit_screenshots(page, base_url, "demo")
        if good and bad:
            page.goto(f"{base_url}/assets/raw_samples?view=checks&checkDetail=reject_ratio_below_bound")
            page.get_by_text("Execution history", exact=True).wait_for()
            page.get_by_text("Partitions", exact=True).last.click()
            search = page.get_by_placeholder("Filter by partition…")
            search.wait_for()
            column = page.locator("div", has=search).filter(has=page.get_by_text(bad, exact=True)).last
            next(e for e in column.get_by_text(good, exact=True).all() if e.is_visible()).click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(DOCS / "checks_per_partition.png"))
        browser.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "http://127.0.0.1:3000", *(args[1:3] if len(args) >= 3 else (None, None)))
