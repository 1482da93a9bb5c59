"""`mantle ui` refuses what only another site would send: the requests of issue 14, to a real `mantle ui`.

A page open in the user's browser could launch runs on the loopback UI with a cross-site POST, a GET whose URL holds
the mutation (a link, an image), or by pointing a name of its own at 127.0.0.1 (DNS rebinding). Each is sent here
over real HTTP (and a real WebSocket), with the headers a browser would send, and must get a 403 and launch nothing;
the UI's own requests still pass. Then Ctrl-C, SIGTERM and a dead daemon must stop every process of the UI.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mantle_assets.cli import main
from mantle_assets.imaging.preview import png_bytes
from mantle_assets.webserver import ALLOWED_HOSTS_ENV, allowed_hosts
from mantle_assets_tests.ui_server import running_ui

# The request: launch a (cheap) job of the code location.
LAUNCH_RUN = ('mutation { launchRun(executionParams: {selector: {repositoryLocationName: "mantle_assets", '
              'repositoryName: "__repository__", jobName: "observe_image_directories_job"}}) { __typename } }')
FOREIGN_ORIGIN = "https://evil.example"
PROXY_HOST = "mantle.lab.example"
STOP_SECONDS = 60
# Less than the code server's heartbeat timeout (45 s), after which it would stop by itself anyway.
LEFTOVER_SECONDS = 30


@dataclass
class UI:
    """A running `mantle ui` and its DAGSTER_HOME."""

    port: int
    dagster_home: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def response(self, method: str, target: str, body: str | None = None,
                 **headers: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send one request, with ``Host`` this UI's unless given; return the status, the headers and the body."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, target, body=body, headers={"Host": self.host, **headers})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def request(self, method: str, target: str, body: str | None = None, **headers: str) -> tuple[int, str]:
        """Send one request, with ``Host`` this UI's unless given; return the status and the body as text."""
        status, _, content = self.response(method, target, body, **headers)
        return status, content.decode()

    def graphql(self, query: str, **headers: str) -> tuple[int, str]:
        """POST ``query`` as JSON, as Dagster's UI does."""
        return self.request("POST", "/graphql", json.dumps({"query": query}),
                            **{"Content-Type": "application/json", **headers})

    def run_count(self) -> int:
        status, body = self.graphql("{ runsOrError { ... on Runs { count } } }", Origin=f"http://{self.host}")
        assert status == 200, body
        return json.loads(body)["data"]["runsOrError"]["count"]


def environment(home: Path, **settings: str) -> dict[str, str]:
    return {**os.environ, "MANTLE_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), **settings}


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> UI:
    """One `mantle ui` for the requests below, which answers to ``PROXY_HOST`` too (a reverse proxy's name)."""
    folder = tmp_path_factory.mktemp("ui guard")
    home = folder / "mantle home"
    with running_ui(folder, folder / "mantle-ui.log", environment(home, **{ALLOWED_HOSTS_ENV: PROXY_HOST})) as (url, _):
        yield UI(urllib.parse.urlsplit(url).port, home / "dagster")


def refused(response: tuple[int, str], reason: str) -> bool:
    status, body = response
    return status == 403 and reason in body and len(body.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_mutation_posted_from_another_site_is_refused(ui):
    assert refused(ui.graphql(LAUNCH_RUN, Origin=FOREIGN_ORIGIN), f"Origin {FOREIGN_ORIGIN!r}")
    # A page of another site on the same machine is another origin too.
    assert refused(ui.graphql(LAUNCH_RUN, Origin=f"http://127.0.0.1:{ui.port + 1}"), "cross-site request refused")
    assert refused(ui.graphql(LAUNCH_RUN, Origin="null"), "cross-site request refused")
    assert ui.run_count() == 0


@pytest.mark.slow
@pytest.mark.parametrize(("method", "headers", "reason"), [
    ("GET", {}, "GraphQL mutations are refused in the URL"),  # a link or an image: browsers send no Origin
    ("GET", {"Origin": FOREIGN_ORIGIN}, "cross-site request refused"),
    # A form's POST, whose body Dagster ignores for the URL's query.
    ("POST", {"Content-Type": "application/x-www-form-urlencoded"}, "GraphQL mutations are refused in the URL"),
    ("POST", {"Content-Type": "text/plain", "Origin": FOREIGN_ORIGIN}, "cross-site request refused"),
])
def test_a_mutation_in_the_url_is_refused(ui, method, headers, reason):
    target = "/graphql?" + urllib.parse.urlencode({"query": LAUNCH_RUN})
    assert refused(ui.request(method, target, "" if method == "POST" else None, **headers), reason)
    # Hidden behind a query of the same document, or in a second `query` parameter.
    hidden = "/graphql?" + urllib.parse.urlencode([("query", "{ version }"),
                                                    ("query", "query A { version } " + LAUNCH_RUN)])
    assert refused(ui.request(method, hidden, "" if method == "POST" else None, **headers), reason)
    assert ui.run_count() == 0


@pytest.mark.slow
def test_another_host_is_refused(ui):
    """DNS rebinding: the attacker's own name, pointed at 127.0.0.1, arrives as the Host of a same-origin request."""
    rebound = f"evil.example:{ui.port}"
    assert refused(ui.graphql(LAUNCH_RUN, Host=rebound, Origin=f"http://{rebound}"), f"Host {rebound!r} refused")
    assert refused(ui.graphql("{ version }", Host=rebound), f"Host {rebound!r} refused")
    assert refused(ui.request("GET", "/", Host=rebound, Accept="text/html"), f"Host {rebound!r} refused")
    assert refused(ui.request("GET", "/", Host=f"localhost:{ui.port + 1}"), "refused")
    assert ui.run_count() == 0


@pytest.mark.slow
def test_the_ui_own_requests_pass(ui):
    status, page = ui.request("GET", "/", Accept="text/html")
    assert status == 200 and "<!DOCTYPE html>" in page
    for host in (ui.host, f"localhost:{ui.port}"):
        status, body = ui.graphql("{ version }", Host=host, Origin=f"http://{host}")
        assert status == 200 and json.loads(body)["data"]["version"], body
    status, body = ui.request("GET", "/graphql?" + urllib.parse.urlencode({"query": "{ version }"}))
    assert status == 200 and json.loads(body)["data"]["version"], body
    # A mutation sent as the UI sends it passes, and does what it says.
    status, body = ui.graphql("mutation { setNuxSeen }", Origin=f"http://{ui.host}")
    assert (status, json.loads(body)) == (200, {"data": {"setNuxSeen": True}})
    assert (ui.dagster_home / ".nux" / "nux.yaml").exists()


@pytest.mark.slow
def test_the_proxy_name_from_the_setting_passes(ui):
    status, body = ui.graphql("{ version }", Host=PROXY_HOST, Origin=f"https://{PROXY_HOST}")
    assert status == 200, body
    assert refused(ui.graphql(LAUNCH_RUN, Host=PROXY_HOST, Origin=FOREIGN_ORIGIN), "cross-site request refused")


@pytest.mark.slow
def test_a_websocket_from_another_site_is_refused(ui):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    uri = f"ws://{ui.host}/graphql"
    with pytest.raises(InvalidStatus) as refusal:
        connect(uri, origin=FOREIGN_ORIGIN, subprotocols=["graphql-ws"])
    assert refusal.value.response.status_code == 403
    with connect(uri, origin=f"http://{ui.host}", subprotocols=["graphql-ws"]) as websocket:
        websocket.send(json.dumps({"type": "connection_init"}))
        assert json.loads(websocket.recv(timeout=30)) == {"type": "connection_ack"}


@pytest.fixture(scope="module")
def previews(ui) -> Path:
    """A contact sheet in the UI's ``$MANTLE_HOME/previews``, a PNG outside that folder, and symlinks out to it."""
    home = ui.dagster_home.parent
    sheet = home / "previews" / "E000001" / "run-1.png"
    sheet.parent.mkdir(parents=True)
    sheet.write_bytes(png_bytes(np.zeros((4, 6, 3), np.uint8)))
    outside = home / "outside.png"
    outside.write_bytes(sheet.read_bytes())
    (sheet.parent / "linked.png").symlink_to(outside)
    (home / "previews" / "linked").symlink_to(home, target_is_directory=True)
    return sheet


@pytest.mark.slow
def test_a_preview_is_served_as_png(ui, previews):
    status, headers, content = ui.response("GET", "/mantle/previews/E000001/run-1.png")
    assert (status, headers["Content-Type"], content) == (200, "image/png", previews.read_bytes())
    assert ui.response("POST", "/mantle/previews/E000001/run-1.png", "")[0] == 405
    # Everything else still goes to Dagster's app.
    status, page = ui.request("GET", "/mantle", Accept="text/html")
    assert status == 200 and "<!DOCTYPE html>" in page


@pytest.mark.slow
@pytest.mark.parametrize("target", [
    "/mantle/previews/../outside.png",
    "/mantle/previews/E000001/../../outside.png",
    "/mantle/previews/%2e%2e/outside.png",
    "/mantle/previews/E000001/%2e%2e%2f%2e%2e%2foutside.png",
    "/mantle/previews/../../mantle.duckdb",
    "/mantle/previews/E000001/linked.png",  # a symlink out of the folder
    "/mantle/previews/linked/outside.png",  # a folder symlinked out
    "/mantle/previews/E000001/missing.png",
    "/mantle/previews/E000001/run-1.png/",
])
def test_only_files_in_the_previews_folder_are_served(ui, previews, target):
    assert (previews.parent.parent.parent / "outside.png").is_file()
    status, body = ui.request("GET", target)
    assert (status, body) == (404, "Not Found\n")


@pytest.mark.slow
def test_a_preview_for_another_host_is_refused(ui, previews):
    rebound = f"evil.example:{ui.port}"
    assert refused(ui.request("GET", "/mantle/previews/E000001/run-1.png", Host=rebound), f"Host {rebound!r} refused")


def test_the_allowed_hosts_setting_adds_names_and_refuses_urls(monkeypatch):
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, " Mantle.Lab.Example , 10.0.0.5:8443,[fd00::1]:443,")
    assert allowed_hosts(3000) == ("127.0.0.1:3000", "localhost:3000", "[::1]:3000",
                                   "mantle.lab.example", "10.0.0.5:8443", "[fd00::1]:443")
    for entry in ("https://mantle.lab.example", "*.lab.example", "mantle.lab.example/dagster"):
        monkeypatch.setenv(ALLOWED_HOSTS_ENV, entry)
        result = CliRunner().invoke(main, ["ui", "--port", "3000"])
        assert result.exit_code == 1
        assert result.output == (f"Error: {ALLOWED_HOSTS_ENV} takes host[:port] entries as browsers send them in "
                                 f"Host, not {entry!r}\n")


def process_group_left(leader: subprocess.Popen) -> bool:
    """Whether a process of ``leader``'s group (its daemon, its code server) is still alive after it exited."""
    deadline = time.monotonic() + LEFTOVER_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(leader.pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.5)
    return True


STOPS = {
    "ctrl-c": lambda server: os.killpg(server.pid, signal.SIGINT),  # a terminal interrupts its whole foreground group
    "sigterm": lambda server: server.terminate(),  # `kill PID`, a service manager's stop
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", STOPS.values(), ids=STOPS.keys())
def test_ctrl_c_and_sigterm_stop_the_webserver_daemon_and_code_server(tmp_path, stop):
    with running_ui(tmp_path, tmp_path / "mantle-ui.log", environment(tmp_path / "home")) as (_, server):
        stop(server)
        assert server.wait(timeout=STOP_SECONDS) == 0
        assert not process_group_left(server)


@pytest.mark.slow
def test_the_ui_stops_when_its_daemon_dies(tmp_path):
    log = tmp_path / "mantle-ui.log"
    with running_ui(tmp_path, log, environment(tmp_path / "home")) as (_, server):
        (daemon,) = [pid for pid in map(int, subprocess.check_output(["pgrep", "-P", str(server.pid)]).split())
                     if b"dagster._daemon" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(daemon, signal.SIGKILL)
        assert server.wait(timeout=STOP_SECONDS) == 1
        assert log.read_text().splitlines()[-1] == "Error: dagster-daemon exited with code -9; the UI stopped too"
        assert not process_group_left(server)
