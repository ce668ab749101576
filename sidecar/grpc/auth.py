"""Transport security of the main listener: TLS or mTLS from PEM files, and a bearer token.

The files are read, and checked with the standard library's `ssl`, when the server starts,
so a missing, unreadable or mismatched file is a ConfigError that names it rather than
gRPC's "Failed to bind". The certificate files are checked again at each new connection
(one stat each) and reloaded when they change, as cert-manager renews a mounted Secret:
a renewal that does not check out is logged and the certificates in use are kept.

The token is read once. `BearerTokenInterceptor` refuses every call that lacks it with
UNAUTHENTICATED, except `grpc.health.v1` (probes and load balancers carry no token), and
never echoes what was sent. The health-only listener (`health_address`) has neither: the
kubelet's gRPC probes speak plain text.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from sidecar.config import Settings, check_transport_security
from sidecar.errors import ConfigError
from sidecar.grpc.refusal import refusing

if TYPE_CHECKING:
    from sidecar.grpc.refusal import Continuation

log = logging.getLogger(__name__)

# Services any caller may use without a token: health checks come from probes and load
# balancers that cannot carry one, and tell nothing about the models' inputs or outputs.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
# Below this many characters a token is guessable; a warning says so (the server still starts).
SHORT_TOKEN = 16
# A refusal is logged at most this often (the metric counts every one).
REFUSAL_LOG_INTERVAL_S = 60.0

_FileSignature = tuple[int, int, int]  # inode, size, mtime_ns


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot read {setting} {path}: {reason}") from None


def _signature(path: str) -> _FileSignature:
    # stat follows symlinks: a Secret mount swaps its ..data link, which changes the inode.
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@contextlib.contextmanager
def _as_files(*contents: bytes) -> Iterator[list[str]]:
    """Paths that read back `contents`, for `ssl`, which loads a key pair only from files.

    Memory-backed files where Linux has them, so a private key never touches a disk; a
    private temporary dir elsewhere."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = [os.memfd_create("sidecar-pem", 0) for _ in contents]
        try:
            for fd, data in zip(fds, contents, strict=True):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="sidecar-pem-") as tmp:  # pragma: no cover
        paths = []
        for index, data in enumerate(contents):
            path = Path(tmp) / f"{index}.pem"
            path.touch(mode=0o600)
            path.write_bytes(data)
            paths.append(str(path))
        yield paths


def _no_password() -> bytes:
    # Never let OpenSSL prompt on a terminal for an encrypted key: fail instead.
    return b""


@dataclass(frozen=True)
class CertificateFiles:
    """The PEM files of TLS on the main listener, as read and checked together."""

    cert_file: str
    key_file: str
    client_ca_file: str
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    signatures: tuple[_FileSignature, ...]

    @classmethod
    def read(cls, cert_file: str, key_file: str, client_ca_file: str) -> CertificateFiles:
        """Read and check the files; ConfigError names the file that is wrong."""
        paths = [cert_file, key_file, *([client_ca_file] if client_ca_file else [])]
        try:
            signatures = tuple(_signature(path) for path in paths)
        except OSError:
            signatures = ()  # _read below says which file and why
        chain = _read("tls_cert_file", cert_file)
        key = _read("tls_key_file", key_file)
        ca = _read("tls_client_ca_file", client_ca_file) if client_ca_file else None
        files = cls(cert_file, key_file, client_ca_file, chain, key, ca, signatures)
        files._check()
        return files

    def _check(self) -> None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                cadata=self.cert_chain.decode("latin-1")
            )
        except (ssl.SSLError, ValueError):
            raise ConfigError(
                f"tls_cert_file {self.cert_file} holds no PEM certificate (-----BEGIN "
                "CERTIFICATE-----): give the server's certificate chain in PEM"
            ) from None
        # PKCS #8 ("BEGIN ENCRYPTED PRIVATE KEY") or OpenSSL's own ("Proc-Type: 4,ENCRYPTED").
        if b"-----BEGIN ENCRYPTED" in self.private_key or b",ENCRYPTED" in self.private_key:
            raise ConfigError(
                f"tls_key_file {self.key_file} is encrypted: gRPC needs an unencrypted PEM key "
                "(protect the file instead, for example as a Secret mounted read-only)"
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with _as_files(self.cert_chain, self.private_key) as (chain_path, key_path):
            try:
                context.load_cert_chain(chain_path, key_path, password=_no_password)
            except ssl.SSLError as exc:
                if exc.reason == "KEY_VALUES_MISMATCH":
                    raise ConfigError(
                        f"tls_key_file {self.key_file} is not the private key of the "
                        f"certificate in tls_cert_file {self.cert_file} (the server's own "
                        "certificate must come first in the chain)"
                    ) from None
                raise ConfigError(
                    f"tls_key_file {self.key_file} holds no usable PEM private key "
                    "(-----BEGIN ... PRIVATE KEY-----)"
                ) from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cadata=self.client_ca.decode("latin-1"))
            except (ssl.SSLError, ValueError):
                raise ConfigError(
                    f"tls_client_ca_file {self.client_ca_file} holds no PEM CA certificate "
                    "(-----BEGIN CERTIFICATE-----): give the CA that signs client certificates"
                ) from None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC's certificate configuration."""
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


class CertificateReloader:
    """gRPC's certificate fetcher: called at each new connection, it reloads the files
    when they changed and checked out, and otherwise keeps what is in use."""

    def __init__(self, files: CertificateFiles) -> None:
        self.current = files
        self._seen = files.signatures
        self._lock = threading.Lock()  # gRPC calls fetchers from its own threads

    def _paths(self) -> list[str]:
        files = self.current
        return [files.cert_file, files.key_file, *filter(None, [files.client_ca_file])]

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                seen = tuple(_signature(path) for path in self._paths())
            except OSError:
                return None  # mid-swap, or gone: keep serving what is loaded
            if seen == self._seen:
                return None
            self._seen = seen  # a bad renewal is reported once, not at every connection
            files = self.current
            try:
                fresh = CertificateFiles.read(files.cert_file, files.key_file, files.client_ca_file)
            except ConfigError as exc:
                log.error("TLS files changed but cannot be used; keeping the ones loaded: %s", exc)
                return None
            except Exception:  # never let an error escape into gRPC's handshake thread
                log.exception(
                    "TLS files changed but could not be reloaded; keeping the ones loaded"
                )
                return None
            self.current = fresh
            log.info("reloaded the TLS certificate from %s", files.cert_file)
            return fresh.configuration()


def read_token(path: str) -> bytes:
    """The bearer token in `path`, whitespace around it stripped."""
    token = _read("auth_token_file", path).strip()
    if not token:
        raise ConfigError(
            f"auth_token_file {path} is empty: put the token in it (for example the output "
            "of `openssl rand -hex 32`)"
        )
    if any(byte < 0x21 or byte > 0x7E for byte in token):
        raise ConfigError(
            f"auth_token_file {path} holds a character gRPC metadata cannot carry: the token "
            "must be printable ASCII without spaces"
        )
    if len(token) < SHORT_TOKEN:
        log.warning(
            "the token in auth_token_file %s has only %d characters: use a long random one "
            "(for example `openssl rand -hex 32`)",
            path,
            len(token),
        )
    return token


@dataclass(frozen=True)
class TransportSecurity:
    """What protects the main listener, read from the settings' files."""

    certificates: CertificateReloader | None
    token: bytes | None

    @classmethod
    def load(cls, settings: Settings) -> TransportSecurity:
        """Read and check the files the settings name; ConfigError names a bad one."""
        check_transport_security(settings)
        certificates = None
        if settings.tls_cert_file:
            files = CertificateFiles.read(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
            )
            certificates = CertificateReloader(files)
        token = read_token(settings.auth_token_file) if settings.auth_token_file else None
        return cls(certificates, token)

    @property
    def unprotected(self) -> bool:
        """Neither TLS nor a token: any caller that reaches the listener is served."""
        return self.certificates is None and self.token is None

    @property
    def client_auth(self) -> bool:
        """Whether callers must present a client certificate (mTLS)."""
        return self.certificates is not None and self.certificates.current.client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for the listener, or None for plain text."""
        if self.certificates is None:
            return None
        return grpc.dynamic_ssl_server_credentials(
            self.certificates.current.configuration(),
            self.certificates,  # type: ignore[arg-type]  # None means "unchanged" to gRPC
            require_client_authentication=self.client_auth,
        )

    def describe(self) -> str:
        """A few words for the start-up log line."""
        parts = []
        if self.certificates is not None:
            parts.append("mTLS" if self.client_auth else "TLS")
        if self.token is not None:
            parts.append("bearer token")
        return ", ".join(parts) or "plain text"


def _service(method: str) -> str:
    """The service of a method path: sidecar.v1.Inference of /sidecar.v1.Inference/Embed."""
    return method.lstrip("/").partition("/")[0]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED.

    `refused(rpc)` is called once per refused call (the server counts it in its metrics).
    Compares SHA-256 digests with hmac.compare_digest, so neither the token's content nor its
    length shows in how long a refusal takes. Put it after the tracing interceptor, so that
    a refused call still has its span with the status code.
    """

    def __init__(self, token: bytes, refused: Callable[[str], None]) -> None:
        self._digest = hashlib.sha256(token).digest()
        self._refused = refused
        self._lock = threading.Lock()
        self._last_logged = -REFUSAL_LOG_INTERVAL_S
        self._unlogged = 0

    def problem(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """Why a call with this metadata is refused; None when it carries the token."""
        values = [value for key, value in metadata or () if key.lower() == "authorization"]
        if not values:
            return (
                "this server needs a bearer token: send `authorization: Bearer <token>` "
                "metadata on every call (the token is the one in the server's auth_token_file)"
            )
        if len(values) > 1:
            return "more than one authorization metadata entry: send exactly one"
        value = values[0]
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the authorization metadata must read `Bearer <token>`"
        digest = hashlib.sha256(token.strip().encode("latin-1", "replace")).digest()
        if not hmac.compare_digest(digest, self._digest):
            return "the bearer token does not match this server's token"
        return None

    def _log(self, method: str, peer: str, problem: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last_logged < REFUSAL_LOG_INTERVAL_S:
                self._unlogged += 1
                return
            unlogged, self._unlogged, self._last_logged = self._unlogged, 0, now
        more = f" ({unlogged} more since the last report)" if unlogged else ""
        log.warning("refused %s from %s: %s%s", method, peer, problem, more)

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _service(method) in OPEN_SERVICES:
            return handler  # an unknown method is UNIMPLEMENTED with or without a token
        problem = self.problem(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        return self._refusal(handler, method, problem)

    def _refusal(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, problem: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""
        rpc = method.rpartition("/")[2]

        async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self._refused(rpc)
            self._log(method, context.peer(), problem)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return refusing(handler, refuse)
