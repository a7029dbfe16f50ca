"""Screenshots of the MLflow UI for the README, taken in headless Chromium against `mlflow server`.

    apt-get install chromium && pip install playwright          # a docs tool: not a project dependency
    mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --port 5000 --workers 1 &
    python docs/screenshot_mlflow.py 'http://127.0.0.1:5000/#/experiments/1/runs?workflowType=...' out.png

The URL is one the experiment's driver printed (its saved views "cssl: runs" / "cssl: cells"). The
browser starts with MLflow's assistant panel closed (its first-visit default is open) and waits for
the page's charts to draw.
"""
from __future__ import annotations

import argparse

from playwright.sync_api import sync_playwright


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--width", type=int, default=1800)
    p.add_argument("--height", type=int, default=760)
    p.add_argument("--wait-ms", type=int, default=8000)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": args.width, "height": args.height})
        context.add_init_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                                "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
        page = context.new_page()
        page.goto(args.url)
        page.wait_for_timeout(args.wait_ms)
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()
