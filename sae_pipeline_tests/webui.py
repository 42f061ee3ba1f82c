"""The Dagster web UI under test: `dagster-webserver` on a temporary instance (one that a real `run-sweep` has
materialised, for pages with something on them) and a headless Chromium page driven over the DevTools protocol.

Subprocesses import this checkout's `sae_pipeline` (PYTHONPATH first), not whatever the environment has
installed in editable mode."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
UI_SWEEP = """name: ui_test
base: {architecture: topk, expansion_factor: 2, k: 8, lr: 0.001, batch_size: 256, train_tokens: 2560,
       log_every: 5, checkpoint_every: 5, dead_tokens: 5120}
grid: {seed: [0], k: [4, 8]}
"""


class UIHome(NamedTuple):
    """A webserver on an instance where a two-config `run-sweep` materialised every asset it runs, with checks."""

    port: int
    """The webserver's port on 127.0.0.1."""
    home: Path
    """DAGSTER_HOME (the shipped dagster.yaml, SQLite storage)."""
    root: Path
    """SAE_PIPELINE_ROOT."""
    keys: list[str]
    """The sweep's partition keys, in registration order."""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def checkout_env(**extra: str) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH, plus `extra`."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


@contextmanager
def webserver(env: dict[str, str], log: Path, timeout: float = 180.0) -> Iterator[int]:
    """`dagster-webserver -w workspace.yaml` from the repository root on a free port, once it answers; its output
    goes to `log` (a pipe would fill and stall it), whose tail a failed start reports."""
    port = free_port()
    binary = Path(sys.executable).with_name("dagster-webserver")
    with log.open("wb") as sink:
        process = subprocess.Popen([str(binary), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                                   cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"webserver did not start: {log.read_text()[-2000:]}") from None
                time.sleep(1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


RUN_SWEEP_OUTPUT = "run-sweep.out"
"""What `run-sweep` printed in `materialise_home`, kept beside the root and the home."""


def materialise_home(source_root: Path, folder: Path) -> tuple[dict[str, str], list[str]]:
    """A storage root under `folder` holding `source_root`'s corpus + activations, a DAGSTER_HOME with the shipped
    dagster.yaml, and `run-sweep` of UI_SWEEP run on them (sae, features, feature_labels, sweep_analysis with
    their checks); returns the environment and the sweep's keys."""
    from sae_pipeline.sweep_spec import load_sweep

    root, home = folder / "root", folder / "home"
    for name in ("corpus", "activations"):
        shutil.copytree(source_root / name, root / name)
    home.mkdir(parents=True)
    shutil.copy(REPO / "data/dagster_home/dagster.yaml", home / "dagster.yaml")
    spec = folder / "ui_test.yaml"
    spec.write_text(UI_SWEEP)
    keys = [config.partition_key() for config in load_sweep(spec).expand()]
    env = checkout_env(SAE_PIPELINE_ROOT=str(root), DAGSTER_HOME=str(home), SAE_PIPELINE_DEVICE="cpu",
                       OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "sae_pipeline.cli", "run-sweep", str(spec)], env=env, cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (folder / RUN_SWEEP_OUTPUT).write_text(done.stdout)
    return env, keys


CHROMIUM_MISSING = ("chromium is not installed (make test installs Debian's chromium package; "
                    "`apt-get install -y chromium`): the browser test cannot run")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium() -> str:
    """The chromium binary, or a skip that says how to get one."""
    path = find_chromium()
    if path is None:
        pytest.skip(CHROMIUM_MISSING)
    return path


class DevToolsPage:
    """One tab of a headless Chromium, driven over the Chrome DevTools Protocol (`websockets`' sync client).
    Runtime, Log and Page events are kept: `errors()` lists what the page reported as an error."""

    def __init__(self, binary: str, profile: Path, width: int = 1600, height: int = 1000, timeout: float = 60.0):
        from websockets.sync.client import connect

        self.log = profile.with_name(profile.name + ".log")  # a pipe would fill and stall chromium
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--remote-debugging-port=0",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
                stdout=sink, stderr=subprocess.STDOUT)
        try:
            port = self._devtools_port(profile / "DevToolsActivePort", timeout)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
                targets = json.loads(response.read())
            (page,) = [target for target in targets if target["type"] == "page"]
            self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
        except BaseException:
            self.process.kill()
            self.process.wait(timeout=30)
            raise
        self.events: list[dict] = []
        self._next_id = 0
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")
        # headless --window-size counts the window frame; the page itself gets exactly width x height
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _devtools_port(self, path: Path, timeout: float) -> int:
        """The port Chromium chose, from the file it writes once it listens (port, then the browser's path)."""
        deadline = time.monotonic() + timeout
        while not (path.exists() and len(path.read_text().splitlines()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait(timeout=30)
                raise RuntimeError(f"chromium wrote no {path.name}: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        return int(path.read_text().splitlines()[0])

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (an exception in it fails here)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:200]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, ready: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        """Poll the page's visible text until `ready(text)`; fails with what was on screen."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if ready(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not on screen after {timeout:.0f}s; the page shows:\n{text[-4000:]}")
            time.sleep(0.25)

    def open(self, url: str, ready: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        self.call("Page.navigate", url=url)
        return self.wait_for(ready, what, timeout)

    def click(self, selector: str, text: str, within: str = "document") -> None:
        """Click the element matching `selector` (inside the element expression `within`) whose visible text is
        `text`."""
        found = self.evaluate(f"""(() => {{
            const hit = [...{within}.querySelectorAll({json.dumps(selector)})]
                .find(e => e.innerText.trim() === {json.dumps(text)});
            if (!hit) return false;
            hit.click();
            return true;
        }})()""")
        assert found, f"no {selector} reading {text!r} to click"

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and error log entries (network, CSP, ...) seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + (details.get("exception", {}).get("description") or details["text"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                found.append("console.error: " + " ".join(str(arg.get("value", arg.get("description", "")))
                                                          for arg in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log ({entry['source']}): {entry['text']} {entry.get('url', '')}".rstrip())
        return found

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # the browser may close the socket before it answers
            pass
        finally:
            self.socket.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
