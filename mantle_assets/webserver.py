"""`mantle ui`: Dagster's webserver app behind a Host and Origin guard, with Dagster's daemon.

Dagster's webserver answers any ``Host``, accepts any ``Origin`` and runs GraphQL mutations sent by GET, so any
page open in the user's browser could launch runs on the loopback UI: by a cross-site request, or by pointing a name
of its own at 127.0.0.1 (DNS rebinding). ``dagster dev`` cannot put anything in front of the app it serves, so
:func:`serve` does what it does (one code server shared by the webserver and the daemon, the daemon in its own
process, everything stopped on Ctrl-C or SIGTERM) and serves the webserver app itself, wrapped in
:class:`RequestGuard`, with the contact sheets of segmentation runs beside it (:class:`PreviewFiles`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn
    from dagster import DagsterInstance
    from starlette.types import ASGIApp, Receive, Scope, Send

ALLOWED_HOSTS_ENV = "MANTLE_UI_ALLOWED_HOSTS"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_HOST = re.compile(r"([a-z0-9_.-]+|\[[0-9a-f:.]+\])(:\d+)?")
# dagster dev's defaults.
CODE_SERVER_LOG_LEVEL = "warning"
LIVE_DATA_POLL_MS = 2000
DAEMON_STOP_SECONDS = 60
# Where `mantle ui` serves the contact sheets under $MANTLE_HOME/previews, which the masks' metadata links to.
PREVIEW_URL = "/mantle/previews/"
_PREVIEW_FILE = re.compile(r"[A-Za-z0-9_-]+/[A-Za-z0-9_-]+\.png")

logger = logging.getLogger("dagster-webserver")


def allowed_hosts(port: int) -> tuple[str, ...]:
    """The ``Host`` header values `mantle ui` answers to.

    Parameters
    ----------
    port
        The port the UI listens on.

    Returns
    -------
    tuple of str
        ``127.0.0.1:<port>``, ``localhost:<port>`` and ``[::1]:<port>``, then the comma-separated entries of
        ``$MANTLE_UI_ALLOWED_HOSTS`` (the names a reverse proxy in front of the UI is reached by), lower-cased.

    Raises
    ------
    ValueError
        One line naming the variable, for an entry that is not ``host[:port]`` as browsers send it in ``Host``
        (a URL, a wildcard, a path).
    """
    configured = [entry.strip().lower() for entry in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")]
    for entry in filter(None, configured):
        if not _HOST.fullmatch(entry):
            raise ValueError(f"{ALLOWED_HOSTS_ENV} takes host[:port] entries as browsers send them in Host, "
                             f"not {entry!r}")
    return (*(f"{name}:{port}" for name in LOOPBACK_NAMES), *filter(None, configured))


def _operation_in_url_changes_state(query_string: bytes) -> bool:
    """Whether a ``query`` parameter of the URL holds a GraphQL operation other than a query.

    Dagster runs the URL's ``query`` for a GET and for a POST whose body is neither JSON nor GraphQL (a form), and it
    reads the URL with Starlette's :class:`~starlette.datastructures.QueryParams`, as this does.
    """
    from graphql import GraphQLError, OperationDefinitionNode, OperationType, parse
    from starlette.datastructures import QueryParams

    for text in QueryParams(query_string).getlist("query"):
        try:
            document = parse(text)
        except GraphQLError:
            continue  # Dagster cannot parse it either, so it runs nothing
        if any(isinstance(definition, OperationDefinitionNode) and definition.operation is not OperationType.QUERY
               for definition in document.definitions):
            return True
    return False


class RequestGuard:
    """ASGI middleware that refuses, with a 403 and a one-line reason, what only another site would send.

    Parameters
    ----------
    app
        The application behind the guard: Dagster's webserver app.
    hosts
        The ``Host`` values it answers to (:func:`allowed_hosts`).

    Notes
    -----
    HTTP requests and WebSocket handshakes alike are refused for

    - a ``Host`` not in ``hosts``: a page whose own name was pointed at 127.0.0.1 (DNS rebinding);
    - an ``Origin`` other than ``http://`` or ``https://`` followed by one of ``hosts``: a page of another site, as
      browsers send ``Origin`` on every cross-origin POST and WebSocket (``https`` for a TLS proxy in front);
    - a GraphQL mutation or subscription in the URL's ``query`` parameter, whatever the method: browsers send a
      cross-site GET (a link, an image) without ``Origin``. Dagster's UI sends its mutations as JSON POSTs.

    The reason is logged; a refused WebSocket handshake gets a bare 403.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = tuple(host.lower() for host in hosts)
        self.origins = frozenset(f"{scheme}://{host}" for scheme in ("http", "https") for host in self.hosts)

    def refusal(self, scope: Scope) -> str | None:
        """Why the request of ``scope`` is refused, in one line, or ``None`` when it may pass."""
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        hosts = headers.getlist("host")
        if len(hosts) != 1 or hosts[0].lower() not in self.hosts:
            return (f"Host {', '.join(hosts)!r} refused: this server answers to {', '.join(self.hosts)} "
                    f"(add names with {ALLOWED_HOSTS_ENV})")
        for origin in headers.getlist("origin"):
            if origin.lower() not in self.origins:
                return f"cross-site request refused: Origin {origin!r} is not this server's"
        if _operation_in_url_changes_state(scope.get("query_string", b"")):
            return "GraphQL mutations are refused in the URL (GET or form POST): send them as a JSON POST"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            reason = self.refusal(scope)
            if reason is not None:
                from starlette.responses import PlainTextResponse

                logger.warning("Refused %s %s: %s", scope.get("method", "WebSocket"), scope["path"], reason)
                if scope["type"] == "http":
                    await PlainTextResponse(reason + "\n", status_code=403)(scope, receive, send)
                else:
                    # Closing before accepting is answered 403 by uvicorn. A denial response with a body would be
                    # too, but uvicorn then logs an error for a handshake it thinks unfinished; browsers do not show
                    # the body to the page anyway.
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


class PreviewFiles:
    """ASGI app that serves ``GET PREVIEW_URL<entity>/<name>.png`` from a folder and passes every other request on.

    Parameters
    ----------
    app
        The application for every other path: Dagster's webserver app.
    folder
        The folder of ``<entity>/<name>.png`` files (``$MANTLE_HOME/previews``); it may appear later.

    Notes
    -----
    Only a path of two plain names (letters, digits, ``_``, ``-``), the second ending in ``.png``, is looked up, so
    no ``..`` or other folder can be named, however it is encoded; a file that resolves outside ``folder`` (a
    symlink) is not served. Anything else under ``PREVIEW_URL`` is a 404, a method other than GET or HEAD a 405.
    """

    def __init__(self, app: ASGIApp, folder: Path) -> None:
        self.app = app
        self.folder = folder

    def file(self, name: str) -> Path | None:
        """The file ``name`` (``<entity>/<name>.png``) stands for, or ``None`` where none may be served."""
        if not _PREVIEW_FILE.fullmatch(name):
            return None
        folder = self.folder.resolve()
        file = (folder / name).resolve()
        return file if file.is_relative_to(folder) and file.is_file() else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREVIEW_URL):
            await self.app(scope, receive, send)
            return
        from starlette.responses import FileResponse, PlainTextResponse

        if scope["method"] not in ("GET", "HEAD"):
            response = PlainTextResponse("Method Not Allowed\n", status_code=405, headers={"Allow": "GET, HEAD"})
        elif (file := self.file(scope["path"].removeprefix(PREVIEW_URL))) is None:
            response = PlainTextResponse("Not Found\n", status_code=404)
        else:
            response = FileResponse(file, media_type="image/png")
        await response(scope, receive, send)


class DaemonExitedError(RuntimeError):
    """Dagster's daemon stopped while the UI was serving."""


@contextmanager
def _daemon(workspace: Path) -> Iterator[subprocess.Popen]:
    """``dagster-daemon run`` on ``workspace`` as dagster dev starts it, stopped through its shutdown pipe on exit."""
    from dagster_shared.ipc import get_ipc_shutdown_pipe, open_ipc_subprocess, send_ipc_shutdown_message

    read_fd, write_fd = get_ipc_shutdown_pipe()
    process = open_ipc_subprocess(
        [sys.executable, "-m", "dagster._daemon", "run", "--log-level", "info", "--log-format", "colored",
         "--code-server-log-level", CODE_SERVER_LOG_LEVEL, "--shutdown-pipe", str(read_fd), "-w", str(workspace)],
        pass_fds=[read_fd],
    )
    try:
        yield process
    finally:
        # The read end stays open here until the daemon is gone, so the message never meets a closed pipe.
        send_ipc_shutdown_message(write_fd)
        try:
            process.wait(timeout=DAEMON_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning("dagster-daemon did not stop within %s s; killing it", DAEMON_STOP_SECONDS)
            process.kill()
            process.wait()
        os.close(read_fd)


def _stop_when_exited(process: subprocess.Popen, server: uvicorn.Server) -> None:
    """Have ``server`` stop serving once ``process`` has exited, as dagster dev stops when its daemon does."""
    process.wait()
    server.should_exit = True


def serve(instance: DagsterInstance, workspace: Path, port: int, hosts: Iterable[str]) -> None:
    """Serve Dagster's UI on ``127.0.0.1:port`` behind :class:`RequestGuard`, with its daemon, until Ctrl-C or SIGTERM.

    The contact sheets in ``$MANTLE_HOME/previews`` are served beside it, behind the same guard (:class:`PreviewFiles`).

    Parameters
    ----------
    instance
        The Dagster instance the webserver, the daemon (through ``$DAGSTER_HOME``) and the code server use.
    workspace
        The workspace file naming the code locations.
    port
        The port to listen on.
    hosts
        The ``Host`` values to answer to: :func:`allowed_hosts` of ``port``.

    Raises
    ------
    DaemonExitedError
        The daemon stopped on its own; the webserver and the code server are stopped too.
    """
    import uvicorn
    import yaml
    from dagster._cli.proxy_server_manager import ProxyServerManager
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster._utils.log import configure_loggers
    from dagster_webserver.app import create_app_from_workspace_process_context
    from dagster_webserver.cli import DEFAULT_DB_STATEMENT_TIMEOUT, DEFAULT_POOL_MAX_OVERFLOW, DEFAULT_POOL_RECYCLE
    from dagster_webserver.version import __version__

    from mantle_assets.settings import mantle_home

    configure_loggers()
    # Ctrl-C and a service manager's SIGTERM both raise KeyboardInterrupt (uvicorn raises the signal again once it has
    # stopped serving), which unwinds the with-block below and so stops the daemon and the code server. SIGINT is set
    # too because a shell's background job (`mantle ui &`) starts with it ignored, which the daemon would inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with ExitStack() as stack:
            stack.enter_context(instance)
            code_servers = stack.enter_context(ProxyServerManager(
                instance, WorkspaceFileTarget(paths=[str(workspace)]), code_server_log_level=CODE_SERVER_LOG_LEVEL))
            # The webserver and the daemon reach the one code server through a workspace file naming its socket.
            served = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "workspace.yaml"
            served.write_text(yaml.safe_dump({"load_from": code_servers.get_code_server_specs()}))
            daemon = stack.enter_context(_daemon(served))
            instance.optimize_for_webserver(
                DEFAULT_DB_STATEMENT_TIMEOUT, DEFAULT_POOL_RECYCLE, DEFAULT_POOL_MAX_OVERFLOW)
            context = stack.enter_context(WorkspaceProcessContext(
                instance, WorkspaceFileTarget(paths=[str(served)]), version=__version__,
                code_server_log_level=CODE_SERVER_LOG_LEVEL))
            app = create_app_from_workspace_process_context(context, live_data_poll_rate=LIVE_DATA_POLL_MS)
            app = PreviewFiles(app, mantle_home() / "previews")
            server = uvicorn.Server(uvicorn.Config(RequestGuard(app, hosts), host="127.0.0.1", port=port,
                                                   log_level="warning"))
            threading.Thread(target=_stop_when_exited, args=(daemon, server), daemon=True).start()
            server.run()
            if daemon.poll() is not None:
                raise DaemonExitedError(f"dagster-daemon exited with code {daemon.returncode}; the UI stopped too")
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: the with-block has stopped everything
