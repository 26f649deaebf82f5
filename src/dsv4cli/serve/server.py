"""Running the API: a socket bound before the model loads (a taken port is a clear error, not a log line
after minutes of loading), uvicorn on it, and the worker started and stopped with it."""

from __future__ import annotations

import ipaddress
import socket
import threading

import uvicorn

from dsv4cli.errors import UsageError
from dsv4cli.serve.app import ServeConfig, create_app
from dsv4cli.serve.worker import Worker


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); UsageError when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"cannot listen on {host!r}: {err.strerror}", "give an IP address or a host name "
                                                                         "of this machine") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        reason = "it is already in use" if err.errno == 98 else err.strerror or str(err)
        raise UsageError(f"cannot listen on {host}:{port}: {reason}", "choose another port") from None
    sock.set_inheritable(True)
    return sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


class ApiServer:
    """The worker and uvicorn on a bound socket: `run()` blocks until Ctrl-C (the CLI); `start()` / `stop()`
    run it on a background thread (tests, `dsv4 bench --api`)."""

    def __init__(self, worker: Worker, tokenizer, config: ServeConfig, sock: socket.socket):
        self.worker = worker
        self.sock = sock
        self.url = address_of(sock)
        self.app = create_app(worker, tokenizer, config)
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                     timeout_graceful_shutdown=5, lifespan="off"))
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self.worker.start()
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self.worker.stop()
            self.sock.close()

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.run, name="dsv4-http", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            self._thread.join(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
