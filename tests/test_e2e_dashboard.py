"""End to end, the dashboard in a real browser: Debian's Chromium driven by
Playwright against a real server process and a real worker process.

The tests fail on any page error and on any console error (the one exception:
the test of API keys expects the browser's own "Failed to load resource" lines
for the 401 and 403 answers it provokes).

With ``TRIO_TASKWORKER_SCREENSHOTS=DIR`` set, the first test also saves a
screenshot of each page in DIR (the ones in ``docs/_static/ui/`` come from
there)::

    TRIO_TASKWORKER_SCREENSHOTS=docs/_static/ui pytest tests/test_e2e_dashboard.py

Playwright's sync API is used from plain ``def`` tests: pytest-trio leaves
those alone, and Playwright runs its own event loop in its own thread. Every
wait is Playwright's auto-waiting ``expect``, never a sleep.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import ConsoleMessage, Locator, Page, expect, sync_playwright

from . import e2e_dashboard_tasks as t
from .conftest import Proc, free_port, start_server, worker

pytestmark = pytest.mark.e2e

TASKS = "tests.e2e_dashboard_tasks"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = os.environ.get("TRIO_TASKWORKER_SCREENSHOTS")
#: Long enough for a worker process to start and take a run on a slow machine.
WAIT_MS = 20_000

ADMIN_KEY = "dashboard-admin-0123456789abcdef"
SUBMIT_KEY = "dashboard-submit-0123456789abcdef"


@contextmanager
def browser_page(problems: list[str]) -> Iterator[Page]:
    """A page of a fresh headless Chromium; console errors and page errors go
    to ``problems``."""

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console: {message.text} at {message.location.get('url')}")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            yield page
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.mouse.move(0, 0)  # no hover highlight in the picture
        page.screenshot(path=str(Path(SCREENSHOTS, f"{name}.png")))


def row(page: Page, run_id: object) -> Locator:
    return page.locator(f'#runs-table tr[data-run-id="{run_id}"]')


def test_runs_appear_change_state_and_are_cancelled_and_retried_from_the_page(
    tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    worker(server, procs, tmp_path, f"{TASKS}:greet", f"{TASKS}:flaky", f"{TASKS}:hold",
           "--limit", "4")  # fmt: skip
    monkeypatch.setenv("TRIO_TASKWORKER_API_URL", server.url)
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    problems: list[str] = []
    try:
        with browser_page(problems) as page:
            listings: list[str] = []
            page.on(
                "request",
                lambda request: (
                    listings.append(request.url) if urlsplit(request.url).path == "/runs" else None
                ),
            )
            page.clock.install()
            page.goto(f"{server.url}/ui/")
            expect(page.locator("#live")).to_have_text("live")
            expect(page.locator("#runs-table + .empty")).to_be_visible()
            # Set on this document: still there at the end means no reload happened.
            page.evaluate("window.loadedOnce = true")
            # Stop the page's timers: what changes from now on can only come
            # through the event stream, not from polling.
            # (Half a second ahead: the page's clock moves on while this is sent.)
            now = page.evaluate("Date.now()") / 1000
            page.clock.pause_at(datetime.datetime.fromtimestamp(now + 0.5, datetime.UTC))

            # Runs submitted now appear and move through their states, pushed.
            held = t.hold.delay_sync(str(gate), str(marker))
            expect(row(page, held.task_run_id).locator(".badge")).to_have_text("RUNNING")
            greeted = [t.greet.delay_sync(name) for name in ("ada", "grace", "barbara")]
            kept_failed = t.flaky.delay_sync(str(tmp_path / "count-a"))
            to_retry = t.flaky.delay_sync(str(tmp_path / "count-b"))
            for greeting in greeted:
                expect(row(page, greeting.task_run_id).locator(".badge")).to_have_text("COMPLETED")
            for failure in (kept_failed, to_retry):
                expect(row(page, failure.task_run_id).locator(".badge")).to_have_text("FAILED")
            rows = page.locator("#runs-table tbody tr")
            expect(rows).to_have_count(6)
            # Newest first.
            expect(rows.first).to_have_attribute("data-run-id", str(to_retry.task_run_id))
            expect(rows.last).to_have_attribute("data-run-id", str(held.task_run_id))
            # An unnamed run shows the end of its id: the start is the time it
            # was made, the same for all of these.
            for greeting in greeted:
                link = row(page, greeting.task_run_id).locator("a.run-link")
                expect(link).to_have_text(str(greeting.task_run_id)[-8:])
            # The list was fetched when the page was shown and again when the
            # event stream said it was ready, and not since.
            assert len(listings) == 2, listings
            page.clock.resume()
            screenshot(page, "runs")

            # Filters: by state (the select applies at once), then by tag.
            page.select_option("#filter-state", "FAILED")
            expect(rows).to_have_count(2)
            expect(page.locator("#runs-table .badge")).to_have_text(["FAILED", "FAILED"])
            page.click("a.clear")
            expect(rows).to_have_count(6)
            page.fill("#filter-tag", "flaky")
            page.click("#run-filters button[type=submit]")
            expect(rows).to_have_count(2)
            page.click("a.clear")
            expect(rows).to_have_count(6)

            # A failed run: its error and traceback, logs and parameters, as text.
            row(page, to_retry.task_run_id).locator("a.run-link").click()
            error = page.locator("#run-error")
            expect(error).to_contain_text(f"ValueError: call 1 fails {t.MARKUP}")
            traceback = error.locator("pre.traceback")
            expect(traceback).to_contain_text("Traceback (most recent call last)")
            expect(traceback).to_contain_text('raise ValueError(f"call {calls} fails')
            expect(page.locator("#run-logs")).to_contain_text(f"giving up on call 1 {t.MARKUP}")
            expect(page.locator("#run-parameters")).to_contain_text("count-b")
            # Markup from the server is shown, never parsed.
            expect(page.locator("main b, main img")).to_have_count(0)
            timeline = page.locator("#run-timeline li .badge")
            expect(timeline).to_have_text(["SCHEDULED", "PENDING", "RUNNING", "FAILED"])
            expect(page.locator("#cancel-run")).to_be_disabled()
            screenshot(page, "run-failed")

            # Retry it from the page: a second attempt, which succeeds.
            page.click("#retry-run")
            expect(page.locator(".run-head .badge")).to_have_text("COMPLETED")
            expect(page.locator("#run-result")).to_contain_text("2")
            expect(page.locator("#run-attempts tbody tr")).to_have_count(2)
            expect(timeline.last).to_have_text("COMPLETED")
            expect(page.locator("#run-logs")).to_contain_text("call 2")
            # Refused by the server (the button is greyed out; clicked here from a
            # script, in one step, since a pushed update redraws it): the reason shows.
            page.locator("#retry-run").evaluate("b => { b.disabled = false; b.click(); }")
            expect(page.locator("#errors")).to_contain_text("Retry failed: ")
            expect(page.locator("#errors")).to_contain_text("is COMPLETED: only a FAILED")
            expect(page.locator(".action-message")).to_contain_text("is COMPLETED: only")
            page.click("#errors .close")
            expect(page.locator("#errors")).to_be_empty()

            # Cancel the held run from the page; its finally: block runs.
            page.click("text=← Runs")
            expect(row(page, to_retry.task_run_id).locator(".badge")).to_have_text("COMPLETED")
            row(page, held.task_run_id).locator("a.run-link").click()
            expect(page.locator(".run-head .badge")).to_have_text("RUNNING")
            expect(page.locator("#retry-run")).to_be_disabled()
            page.click("#cancel-run")
            expect(page.locator(".run-head .badge")).to_have_text("CANCELLED")
            assert marker.read_text() == "finally ran"
            expect(page.locator("#retry-run")).to_be_enabled()

            # The tasks page, with the counts of what happened above.
            page.click("nav.tabs >> text=Tasks")
            counts = {
                "greet": ("3", "0", "0"),  # completed, failed, running
                "flaky": ("1", "1", "0"),
                "hold": ("0", "0", "0"),
            }
            for name, (completed, failed, running) in counts.items():
                task_row = page.locator(f'#tasks-table tr[data-task-key="{TASKS}:{name}"]')
                expect(task_row.locator("td.completed")).to_have_text(completed)
                expect(task_row.locator("td.failed")).to_have_text(failed)
                expect(task_row.locator("td.running")).to_have_text(running)
                expect(task_row.locator("td.workers")).to_have_text("1")
            # Every run above has ended in the last hour, the retried one once.
            expect(page.locator("#throughput + p")).to_have_text("6 runs ended in the last hour.")
            expect(page.locator("#throughput rect.bar:not(.empty)")).not_to_have_count(0)
            screenshot(page, "tasks")

            # The workers page: the one worker, its keys and its limit.
            page.click("nav.tabs >> text=Workers")
            workers = page.locator("#workers-table tbody tr")
            expect(workers).to_have_count(1)
            expect(workers.locator(".task-key")).to_have_text(
                [f"{TASKS}:flaky", f"{TASKS}:greet", f"{TASKS}:hold"]
            )
            expect(workers.locator("td.limit")).to_have_text("4")
            expect(workers.locator("td.in-flight")).to_have_text("0")
            screenshot(page, "workers")
            assert page.evaluate("window.loadedOnce") is True
    finally:
        gate.write_text("done")
    # Chromium logs the one refusal provoked above; nothing else may appear.
    conflict = re.compile(r"^console: Failed to load resource: .* status of 409 .*/retry$")
    assert [p for p in problems if not conflict.match(p)] == []
    assert len(problems) == 1


def test_the_page_asks_for_an_api_key_and_says_when_it_lacks_the_role(
    tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(
        tmp_path / "data",
        TRIO_TASKWORKER_SERVER_API_KEY=f"{SUBMIT_KEY}:submit,{ADMIN_KEY}:admin",
    )
    procs.append(server)
    monkeypatch.setenv("TRIO_TASKWORKER_API_URL", server.url)
    monkeypatch.setenv("TRIO_TASKWORKER_API_KEY", SUBMIT_KEY)
    waiting = t.greet.delay_sync("nobody serves this")  # no worker: it stays SCHEDULED
    problems: list[str] = []
    with browser_page(problems) as page:
        page.goto(f"{server.url}/ui/")
        form = page.locator("#key-panel")
        expect(form).to_be_visible()
        # A key the server does not know.
        page.fill("#key-input", "not-a-key-0123456789abcdef")
        page.click("#key-form button")
        expect(page.locator("#key-message")).to_have_text(re.compile("refused"))
        # A known key without the admin role: said plainly.
        page.fill("#key-input", SUBMIT_KEY)
        page.click("#key-form button")
        expect(form).to_be_hidden()
        expect(page.locator("#errors")).to_contain_text("admin role")
        expect(page.locator("#live")).to_contain_text("lacks the admin role")
        # Forget it and give the admin key: the runs show, and updates are live.
        page.click("#forget-key")
        expect(form).to_be_visible()
        page.fill("#key-input", ADMIN_KEY)
        page.click("#key-form button")
        expect(row(page, waiting.task_run_id).locator(".badge")).to_have_text("SCHEDULED")
        expect(page.locator("#live")).to_have_text("live")
        expect(page.locator("#errors")).to_be_empty()
        # The key lasts as long as the tab: a reload does not ask again.
        page.reload()
        expect(row(page, waiting.task_run_id)).to_be_visible()
        expect(page.locator("#live")).to_have_text("live")
        expect(form).to_be_hidden()
        fresh = t.greet.delay_sync("after the reload")
        expect(row(page, fresh.task_run_id).locator(".badge")).to_have_text("SCHEDULED")

        # Pages: 32 runs, 25 a page.
        t.greet.map_sync([f"guest {i}" for i in range(30)])
        rows = page.locator("#runs-table tbody tr")
        expect(rows).to_have_count(32)
        page.select_option("#filter-limit", "25")
        expect(rows).to_have_count(25)
        expect(page.locator(".pager")).to_contain_text("runs 1\u201325")
        page.click("text=Older →")
        expect(page.locator(".pager")).to_contain_text("runs 26\u201332")
        expect(rows).to_have_count(7)
        expect(rows.last).to_have_attribute("data-run-id", str(waiting.task_run_id))
        # A run submitted meanwhile is not slipped into this page: a note offers it.
        newest = t.greet.delay_sync("newest")
        page.click("text=1 newer run: show")
        expect(page.locator(".pager")).to_contain_text("runs 1\u201325")
        expect(rows.first).to_have_attribute("data-run-id", str(newest.task_run_id))
    # Chromium logs each 401 and 403 answer it received; nothing else may appear.
    refused = re.compile(r"^console: Failed to load resource: .* status of 40[13] ")
    assert [p for p in problems if not refused.match(p)] == []
    assert any(" 401 " in p for p in problems) and any(" 403 " in p for p in problems)


#: One stream of events with every kind of line end, comments and a data field
#: on two lines; the parser must find the same three events wherever it is cut.
SSE_TEXT = (
    ": keepalive\r\n\r\n"
    'event: run\r\ndata: {"a": 1}\r\n\r\n'
    "event: multi\ndata: [1,\ndata:2]\n\n"
    ": a comment\rdata: {}\r\r"
)
PARSE_EVERY_CUT = """async (text) => {
    const { SSEParser } = await import(new URL("live.js", document.baseURI).href);
    const seen = new Set();
    for (let cut = 0; cut <= text.length; cut++) {
        const events = [];
        const parser = new SSEParser((type, data) => events.push([type, data]));
        parser.push(text.slice(0, cut));
        parser.push(text.slice(cut));
        seen.add(JSON.stringify(events));
    }
    return [...seen].map((events) => JSON.parse(events));
}"""


def test_the_event_stream_is_parsed_and_reconnected_after_a_server_restart(
    tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    server = start_server(tmp_path / "data", port=port)
    procs.append(server)
    monkeypatch.setenv("TRIO_TASKWORKER_API_URL", server.url)
    problems: list[str] = []
    with browser_page(problems) as page:
        page.goto(f"{server.url}/ui/")
        live = page.locator("#live")
        expect(live).to_have_text("live")
        assert page.evaluate(PARSE_EVERY_CUT, SSE_TEXT) == [
            [["run", '{"a": 1}'], ["multi", "[1,\n2]"], ["message", "{}"]]
        ]
        # The server dies and the stream breaks: the page says so and tries
        # again, waiting longer each time, until a server is back on the port.
        page.evaluate("window.loadedOnce = true")
        server.popen.kill()
        server.wait()
        expect(live).to_contain_text("reconnecting")
        procs.append(start_server(tmp_path / "data", port=port, log_name="server2.log"))
        expect(live).to_have_text("live")
        # Live again: a run submitted now appears without a reload.
        fresh = t.greet.delay_sync("after the restart")  # no worker: it stays SCHEDULED
        expect(row(page, fresh.task_run_id).locator(".badge")).to_have_text("SCHEDULED")
        assert page.evaluate("window.loadedOnce") is True
    # Chromium logs the broken stream and each connection refused while no server ran.
    refused = re.compile(
        r"^console: Failed to load resource: "
        r"net::ERR_(CONNECTION_REFUSED|INCOMPLETE_CHUNKED_ENCODING) "
    )
    assert [p for p in problems if not refused.match(p)] == []
