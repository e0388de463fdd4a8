"""Take the README's screenshot of the asset graph from a running Dagster UI (after `make demo`).

    make ui &   # or: dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000
    pip install playwright && python docs/screenshot_asset_graph.py http://127.0.0.1:3000 docs/asset_graph.png

Uses the machine's Chromium (/usr/bin/chromium) rather than downloading a browser.
"""

from __future__ import annotations

import contextlib
import sys

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main(base_url: str, out: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1900, "height": 1000})
        # the report's upstream lineage is the whole graph, drawn with every asset as a node
        page.goto(f"{base_url}/assets/experiment_report?view=lineage&lineageScope=upstream&lineageDepth=20")
        with contextlib.suppress(Exception):  # the first visit shows a newsletter dialog; later ones do not
            page.get_by_role("button", name="Skip").click(timeout=15000)
        page.wait_for_timeout(4000)
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:3000",
        sys.argv[2] if len(sys.argv) > 2 else "docs/asset_graph.png",
    )
