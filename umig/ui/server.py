"""The ``umig ui`` web app: a Starlette app serving the page (``umig/ui/static/``) and its JSON API
(:mod:`umig.ui.api`), run by uvicorn.

Starlette and uvicorn come with the ``ui`` extra and are imported inside the functions that need
them, so this module (and ``umig ui`` saying which extra is missing) works without them.

Read-only unless ``allow_write``: without it the app has no route that changes the store (a
``POST`` answers 403 and says how to enable writes). With it, ``POST /api/unlearn`` and
``POST /api/operations/{id}/revert`` exist; they accept only ``application/json`` bodies from the
page's own origin, so another web site open in the same browser cannot submit them. Every request
must name this machine in its ``Host`` header when the server listens on a loopback address (no DNS
rebinding). The store's one SQLite connection is shared by the server's threads under one lock. The
graph's JSON is built once (in the background as the server starts) and again only after the database
changed, so opening the page of a large lineage waits for no rebuild.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from umig.api import Store
from umig.errors import LockTimeout, NotFoundError, UmigError
from umig.ui import api

STATIC = Path(__file__).resolve().parent / "static"
EXTRA_HINT = "umig ui needs the 'ui' extra: pip install 'umig[ui]'"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The page loads nothing from anywhere but this server.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class GraphCache:
    """The ``/api/graph`` body, rebuilt only when the database changed (``Store.change_token``).

    The graph of a 10,000-node store takes about half a second to build and serialise; the page asks
    for it on every open. The state is read before building, so a commit that lands while it builds
    makes the next request build again.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.state: Any = None
        self.body: bytes = b""

    def get(self) -> bytes:
        """The current graph as JSON bytes (call under the server's store lock)."""
        state = self.store.change_token()
        if state != self.state or not self.body:
            self.body = api.dumps(api.graph(self.store))
            self.state = state
        return self.body


def require_extra() -> None:
    """Raise one clear line naming the extra when Starlette or uvicorn is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UmigError(EXTRA_HINT) from None


def create_app(store: Store, *, allow_write: bool = False, allowed_hosts: list[str] | None = None) -> Any:
    """The ASGI app (a ``starlette.applications.Starlette``) serving ``store``.

    ``allowed_hosts``: the ``Host`` header values accepted (default: the loopback names, which is what a
    browser on this machine sends to 127.0.0.1); ``["*"]`` accepts any.
    """
    require_extra()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    lock = threading.Lock()  # one SQLite connection, many server threads
    cache = GraphCache(store)

    def warm() -> None:
        """Build the graph's JSON while the user opens the page (errors surface on the request)."""
        try:
            with lock:
                cache.get()
        except Exception:  # noqa: BLE001 - the request builds it again and reports the error
            pass

    threading.Thread(target=warm, name="umig-ui-warm", daemon=True).start()

    def answer(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Response:
        try:
            with lock:
                data = fn(*args, **kwargs)
        except NotFoundError as e:
            return error(404, str(e))
        except LockTimeout as e:
            return error(409, str(e))
        except UmigError as e:
            return error(400, str(e))
        return Response(api.dumps(data), media_type="application/json", headers={"Cache-Control": "no-store"})

    def error(status: int, message: str) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})

    def query_list(request: Request, key: str) -> list[str]:
        return [v for v in request.query_params.getlist(key) if v]

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache",
                                                             "Content-Security-Policy": CSP})

    def info(request: Request) -> Response:
        return answer(api.info, store, allow_write=allow_write)

    def graph(request: Request) -> Response:
        try:
            with lock:
                body = cache.get()
        except UmigError as e:
            return error(400, str(e))
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    def node(request: Request) -> Response:
        return answer(api.node, store, request.path_params["name"])

    def operations(request: Request) -> Response:
        q = request.query_params
        return answer(api.operations, store, node=q.get("node") or None, ticket=q.get("ticket") or None,
                      requester=q.get("requester") or None)

    def operation(request: Request) -> Response:
        return answer(api.operation, store, request.path_params["op"])

    def plan(request: Request) -> Response:
        q = request.query_params
        try:
            params = api.parse_params(query_list(request, "param"), "param")
        except UmigError as e:
            return error(400, str(e))
        return answer(api.plan, store, labels=q.get("labels") or None, clients=query_list(request, "client"),
                      method=q.get("method") or None, params=params, discovery=q.get("discovery") or "first",
                      from_nodes=query_list(request, "from"))

    def methods(request: Request) -> Response:
        return answer(api.methods)

    def write_refusal(request: Request) -> str | None:
        """Why a write request is refused (not JSON, or from another origin), or None."""
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return "write requests must send JSON (Content-Type: application/json)"
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            return f"write request from another origin ({origin}) refused"
        return None

    async def unlearn(request: Request) -> Response:
        refusal = write_refusal(request)
        if refusal:
            return error(403, refusal)
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not valid JSON")
        return await run_in_threadpool(answer, api.unlearn, store, body)

    async def revert(request: Request) -> Response:
        refusal = write_refusal(request)
        if refusal:
            return error(403, refusal)
        return await run_in_threadpool(answer, api.revert, store, request.path_params["op"])

    def unknown(request: Request) -> Response:
        if request.method not in ("GET", "HEAD") and not allow_write:
            return error(403, "umig ui is read-only: restart it with --allow-write to run or revert operations")
        return error(404, f"no endpoint {request.method} {request.url.path}")

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/graph", graph),
        Route("/api/nodes/{name:path}", node),
        Route("/api/operations", operations),
        Route("/api/operations/{op}", operation),
        Route("/api/plan", plan),
        Route("/api/methods", methods),
    ]
    if allow_write:
        routes += [Route("/api/unlearn", unlearn, methods=["POST"]),
                   Route("/api/operations/{op}/revert", revert, methods=["POST"])]
    routes += [Route("/api/{rest:path}", unknown, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
               Mount("/static", StaticFiles(directory=STATIC), name="static")]
    hosts = allowed_hosts if allowed_hosts is not None else list(LOOPBACK_HOSTS)
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])


def default_hosts(host: str) -> list[str]:
    """The ``Host`` headers to accept when listening on ``host``: loopback names for a loopback
    address, else any (the user chose to listen on a network)."""
    return list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else ["*"]


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (``port`` 0: any free one), or one clear error line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UmigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections made before the server runs wait in the backlog
    except OSError as e:
        sock.close()
        raise UmigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """The page's address for a bound socket."""
    port = sock.getsockname()[1]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def _server(app: Any) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))


def serve(store: Store, *, host: str = "127.0.0.1", port: int = 8000, allow_write: bool = False,
          announce: Callable[[str], None] | None = None) -> None:
    """Serve ``store`` until interrupted (Ctrl-C); ``announce(url)`` once the socket is bound."""
    app = create_app(store, allow_write=allow_write, allowed_hosts=default_hosts(host))
    sock = listen(host, port)
    try:
        if announce is not None:
            announce(url_of(sock, host))
        _server(app).run(sockets=[sock])  # uvicorn re-raises the Ctrl-C it shut down on
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a server stops, not an interruption
    finally:
        sock.close()


@contextmanager
def running(store: Store, *, allow_write: bool = False, host: str = "127.0.0.1", port: int = 0,
            timeout: float = 10.0) -> Iterator[str]:
    """Serve ``store`` from a background thread for the ``with`` block; yields the page's URL.

    For tests, benchmarks and notebooks: it listens on a free port of 127.0.0.1 by default, and
    stops (and joins its thread) when the block ends, whatever happens in it.
    """
    app = create_app(store, allow_write=allow_write, allowed_hosts=default_hosts(host))
    sock = listen(host, port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="umig-ui", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UmigError(f"umig ui did not start within {timeout:g} s")
            time.sleep(0.01)
        yield url_of(sock, host)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
