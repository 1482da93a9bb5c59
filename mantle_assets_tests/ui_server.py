"""`mantle ui` as a real process on a free port, for the tests that talk to it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SERVER_START_SECONDS = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mantle ui exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"mantle ui did not serve {url} within {SERVER_START_SECONDS} s:\n{log.read_text()[-3000:]}")


def stop_process_group(server: subprocess.Popen) -> None:
    """SIGTERM to `mantle ui` (which stops its webserver, daemon and code server), then SIGKILL
    to whatever is left in its process group."""
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


@contextmanager
def running_ui(workdir: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """The installed ``mantle ui`` on a free port, run in ``workdir`` with its output in ``log``, until the block ends.

    Yields its URL and its process, the leader of a process group of its own (so its daemon and code server can be
    found, and killed if they outlive it). ``env`` replaces the environment, e.g. for another MANTLE_HOME.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("mantle")), "ui", "--port", str(port)],
            cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until_serving(server, url, log)
        yield url, server
    finally:
        stop_process_group(server)
        print(f"mantle ui log: {log}")
