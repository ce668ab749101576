"""The HTTP listener: uvicorn serving the routes in the server's own event loop.

Not uvicorn's `serve()`: that installs its own signal handlers, and this process has one
shutdown (SIGTERM drains every listener through the same admission). The socket is bound
here, so a held port fails the start with the address named, and TLS uses the same files as
the gRPC listener, reloaded when they change.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import uvicorn

from sidecar.config import Settings, is_local_address
from sidecar.dataplane.service import DataPlane
from sidecar.errors import ConfigError
from sidecar.http.routes import HttpApi

log = logging.getLogger(__name__)

# How often the certificate files are checked for a renewal, in seconds.
RELOAD_INTERVAL_S = 10.0
# A socket only its owner and group may connect to, as the gRPC socket.
SOCKET_MODE = 0o660


def _signature(paths: list[str]) -> list[tuple[int, int]]:
    signature = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            signature.append((0, 0))
        else:
            signature.append((stat.st_mtime_ns, stat.st_size))
    return signature


class Certificates:
    """An SSL context from tls_cert_file / tls_key_file (and tls_client_ca_file for mTLS),
    re-read into the same context when the files change: new connections get the new
    certificate, open ones keep theirs. A renewal is tried on a scratch context first: a
    failed load_cert_chain leaves a context without its key. CA certificates are only ever
    added (OpenSSL cannot take one out of a context): removing one needs a restart."""

    def __init__(self, settings: Settings) -> None:
        self._cert, self._key = settings.tls_cert_file, settings.tls_key_file
        self._ca = settings.tls_client_ca_file
        self._paths = [p for p in (self._cert, self._key, self._ca) if p]
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self._load()
        self._seen = _signature(self._paths)

    def _load(self, context: ssl.SSLContext | None = None) -> None:
        context = context or self.context
        context.load_cert_chain(self._cert, self._key)
        if self._ca:
            context.load_verify_locations(self._ca)
            context.verify_mode = ssl.CERT_REQUIRED

    def reload(self) -> None:
        """Re-read the files if they changed; a bad renewal keeps the last good certificate."""
        seen = _signature(self._paths)
        if seen == self._seen:
            return
        try:
            self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))  # a renewal half written fails
            self._load()
        except (OSError, ssl.SSLError) as exc:
            # Tried again at the next check: the other file of a pair may not be written yet.
            log.error("the renewed TLS files cannot be used (%s); HTTP keeps the last ones", exc)
            return
        self._seen = seen
        log.info("HTTP listener: TLS certificate reloaded from %s", self._cert)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def _bind(address: str) -> socket.socket:
    if address.startswith("unix:"):
        path = address.removeprefix("unix:").removeprefix("//")
        if Path(path).is_socket() and not _answers(path):
            os.unlink(path)  # left by a process that is gone; a live one fails the bind
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        os.chmod(path, SOCKET_MODE)
        return sock
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit():
        raise ConfigError(f"http_address {address!r} must be host:port or unix:/path.sock")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family)


class HttpListener:
    """The OpenAI-compatible API on http_address."""

    def __init__(
        self,
        settings: Settings,
        dataplane: DataPlane,
        token: bytes | None,
        state: Callable[[], str],
    ) -> None:
        self._settings = settings
        self._token = token
        self.api = HttpApi(dataplane, token, state)
        self._certificates = Certificates(settings) if settings.tls_cert_file else None
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Future[None]] = []

    def bind(self) -> int:
        """Take the port (ConfigError naming the address when it is held); its number."""
        address = self._settings.http_address
        try:
            self._socket = _bind(address)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for HTTP on {address} ({exc}): choose another --http-address, "
                "or an empty one to turn the HTTP API off"
            ) from None
        unprotected = self._certificates is None and self._token is None
        if unprotected and not is_local_address(address):
            log.warning(
                "HTTP API on %s beyond loopback in plain text and without a token: anything "
                "that reaches this port can call every model. Set tls_cert_file and "
                "tls_key_file or auth_token_file, or listen on 127.0.0.1",
                address,
            )
        name = self._socket.getsockname()
        return name[1] if isinstance(name, tuple) else 0

    async def start(self) -> None:
        """Answer on the bound socket."""
        assert self._socket is not None
        config = uvicorn.Config(
            self.api.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            ws="none",
            server_header=False,
            proxy_headers=False,
        )
        config.load()
        if self._certificates is not None:
            config.ssl = self._certificates.context
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        self._server = server
        # uvicorn's tick: the Date header's clock, and the check of should_exit.
        self._tasks.append(asyncio.ensure_future(server.main_loop()))
        if self._certificates is not None:
            self._tasks.append(asyncio.ensure_future(self._reloading(self._certificates)))

    async def _reloading(self, certificates: Certificates) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_S)
            certificates.reload()

    async def stop(self, grace: float) -> None:
        """Stop listening; responses still being written get `grace` seconds."""
        server = self._server
        if server is None:
            if self._socket is not None:
                self._socket.close()
            return
        server.should_exit = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # uvicorn takes whole seconds; at least one, so a response being written can finish.
        server.config.timeout_graceful_shutdown = max(math.ceil(grace), 1)
        await server.shutdown()
