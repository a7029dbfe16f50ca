"""Where the MLflow UI lands for an experiment, seen by a first visit (a fresh headless Chromium profile).

    apt-get install chromium && pip install playwright          # a docs tool: not a project dependency
    mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --port 5000 --workers 1 &
    python docs/check_mlflow_landing.py http://127.0.0.1:5000 EXPERIMENT [--url URL ...] [--shots DIR]

Every check opens its own browser context: no cookies, no localStorage, as in a profile that has
never seen this server. The checks, one output line each:

    list   the server's root, the sidebar's Experiments, a click on EXPERIMENT (what a user does)
    page   <server>/#/experiments/<id>  (the experiment's own address)
    runs   <server>/#/experiments/<id>/runs?workflowType=machine_learning  (the form the driver prints)
    url    each --url: a link the driver printed; its host and port are replaced by the server's

A page counts as the runs table when it shows the runs table's "Run Name" column header; the line
also says whether a test_dice_mean column is on screen and, when the page is something else, the
route it landed on and the GenAI overview's texts (Token Usage, Tool calls, ...) that it shows.
Exits 1 when any check does not land on the runs table.

What MLflow 3.17 does (read in its UI bundle, mlflow/server/js/build): the experiment page opens
on the side named by the address's ``workflowType`` (``genai`` or ``machine_learning``), else on
the side the browser last chose with the sidebar's GenAI / Model training switch (localStorage
``mlflow.workflowType_v1``), else GenAI, whose default tab is the overview (traces). The
experiment's ``mlflow.experimentKind`` tag is read only where that switch is off.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

GENAI_ROUTE = re.compile(r"#/experiments/[^/?]+/(overview|traces|chat-sessions)")
GENAI_TEXTS = ("Token Usage", "Tool calls", "Tokens per Trace", "Detect Issues")


def experiment_id(server: str, name: str) -> str:
    url = f"{server}/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": name})
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)["experiment"]["experiment_id"]


def on_server(server: str, url: str) -> str:
    """``url`` (a full link or a ``#/...`` fragment) pointed at ``server``."""
    return f"{server}/#{url.split('#', 1)[1]}" if "#" in url else url


def wait_landed(page: Page, timeout_ms: int) -> None:
    """Until the runs table's header or a GenAI overview/traces route shows, or ``timeout_ms``."""
    waited = 0
    while waited < timeout_ms:
        if page.get_by_role("columnheader", name="Run Name").count() or GENAI_ROUTE.search(page.url):
            break
        page.wait_for_timeout(500)
        waited += 500
    page.wait_for_timeout(2000)  # let the table or overview fill in


def verdict(page: Page) -> tuple[bool, str]:
    route = "#" + page.url.split("#", 1)[1] if "#" in page.url else page.url
    route = route if len(route) <= 100 else route[:97] + "..."
    runs = page.get_by_role("columnheader", name="Run Name").count() > 0
    body = page.inner_text("body")
    dice = "test_dice_mean" in body
    if runs:
        return True, f"runs table ('Run Name' header; test_dice_mean column: {'yes' if dice else 'no'}) at {route}"
    genai = [t for t in GENAI_TEXTS if t in body]
    what = "GenAI overview/traces" if GENAI_ROUTE.search(page.url) or genai else "no runs table"
    return False, f"{what} (no 'Run Name' header; shows {genai or 'none of ' + str(list(GENAI_TEXTS))}) at {route}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("server", help="the tracking server's UI root, e.g. http://127.0.0.1:5000")
    p.add_argument("experiment", help="experiment name")
    p.add_argument("--url", action="append", default=[], help="a link the driver printed (repeatable)")
    p.add_argument("--shots", type=Path, help="folder for a screenshot per check (<check>.png)")
    p.add_argument("--timeout-ms", type=int, default=30000)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    server = args.server.rstrip("/")
    exp = experiment_id(server, args.experiment)
    checks = [("list", f"{server}/ > Experiments > '{args.experiment}'"),
              ("page", f"{server}/#/experiments/{exp}"),
              ("runs", f"{server}/#/experiments/{exp}/runs?workflowType=machine_learning")]
    checks += [(f"url{i}", on_server(server, u)) for i, u in enumerate(args.url, 1)]
    if args.shots:
        args.shots.mkdir(parents=True, exist_ok=True)
    failed = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        for name, url in checks:
            context = browser.new_context(viewport={"width": 1600, "height": 900})  # a fresh profile
            page = context.new_page()
            if name == "list":
                page.goto(f"{server}/")
                page.get_by_role("link", name="Experiments", exact=True).first.click()
                page.get_by_role("link", name=args.experiment, exact=True).first.click(timeout=args.timeout_ms)
            else:
                page.goto(url)
            wait_landed(page, args.timeout_ms)
            ok, says = verdict(page)
            failed += not ok
            print(f"{'OK  ' if ok else 'FAIL'} {name:5} {url} -> {says}", flush=True)
            if args.shots:
                page.screenshot(path=str(args.shots / f"{name}.png"))
            context.close()
        browser.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
