"""A minimal W3C WebDriver client (HTTP + JSON, standard library only) for chromedriver.

Enough for an end-to-end page test: open a URL, find elements, type, click, read text, take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C element reference key
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1000,800",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    """Poll `url` until it answers (any HTTP status) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout} s") from None
            time.sleep(0.1)


class WebDriver:
    """One chromedriver process and one browser session."""

    def __init__(self, chromedriver: str, chromium: str, profile: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [chromedriver, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.base}/status", 20)
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"webdriver {method} {path}: {exc.read()[:500]!r}") from None

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def get(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def find(self, css: str) -> str:
        return self._call("POST", self._s("/element"), {"using": "css selector", "value": css})[ELEMENT]

    def type(self, element: str, text: str) -> None:
        self._call("POST", self._s(f"/element/{element}/value"), {"text": text})

    def click(self, element: str) -> None:
        self._call("POST", self._s(f"/element/{element}/click"), {})

    def text(self, element: str) -> str:
        return self._call("GET", self._s(f"/element/{element}/text"))

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", self._s("/screenshot"))))
        return path

    def wait_text(self, css: str, expected: str, timeout: float) -> str:
        """Wait until the element's text equals `expected`; return it."""
        deadline = time.monotonic() + timeout
        while (text := self.text(self.find(css))) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{css}: text {text!r} after {timeout} s (waiting for {expected!r})")
            time.sleep(0.1)
        return text

    def quit(self) -> None:
        try:
            self._call("DELETE", self._s(""))
        finally:
            self.process.terminate()
            self.process.wait(10)


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip the test where headless Chromium is not installed."""
    import pytest

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    if not chromium or not driver:
        pytest.skip(
            "headless Chromium not installed (Debian: chromium chromium-driver; scripts/system-deps.sh)"
        )
    return chromium, driver


@dataclass
class PageAnswer:
    shown: str  # the answer box's text when the status said done
    screenshot: Path
    server_log: str
    port: int


def ask_through_page(
    model: str | Path, serve_args: list[str], question: str, workdir: Path, timeout: float, shot_name: str
) -> PageAnswer:
    """Start `medmerge serve MODEL`, ask `question` on its page in headless Chromium, stop both."""
    chromium, chromedriver = find_browser()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "medmerge.cli", "serve", str(model), "--port", str(port), *serve_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/info", 180)
        browser = WebDriver(chromedriver, chromium, workdir / "profile")
        browser.get(f"http://127.0.0.1:{port}/")
        browser.type(browser.find("#question"), question)
        browser.click(browser.find("#ask"))
        browser.wait_text("#status", "done", timeout)
        shown = browser.text(browser.find("#answer"))
        shot = browser.screenshot(workdir / shot_name)
        print(f"screenshot: {shot}")
    finally:
        if browser:
            browser.quit()
        server.terminate()
        log = server.communicate(timeout=10)[0]
    return PageAnswer(shown, shot, log, port)


@contextlib.contextmanager
def serve_in_thread(app: Any, timeout: float = 20) -> Iterator[str]:
    """Serve a FastAPI `app` with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/v1/models", timeout)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
