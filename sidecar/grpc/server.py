"""The gRPC server: services, health, reflection, start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from sidecar.batching.batcher import BatchLimits
from sidecar.config import Settings, is_local_address
from sidecar.dataplane.registry import ModelRegistry
from sidecar.dataplane.service import DataPlane
from sidecar.domain import ModelState
from sidecar.errors import ConfigError
from sidecar.grpc.auth import BearerTokenInterceptor, TransportSecurity
from sidecar.grpc.metadata import MetadataLimitInterceptor, core_options
from sidecar.grpc.servicers import add_servicers
from sidecar.serving.engines import Engines
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.observer import Telemetry
from sidecar.telemetry.tracing import tracer_provider
from sidecar.v1 import inference_pb2, models_pb2

log = logging.getLogger(__name__)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
MODELS = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# SERVING for as long as the process answers, through loading and draining alike: a liveness
# probe must not restart a server that is busy loading or finishing its in-flight calls.
LIVENESS = "liveness"
# A socket only its owner and group may connect to (connecting needs write permission); the
# app container reaches it through a shared group, such as the pod's fsGroup.
SOCKET_MODE = 0o660


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name that reports one model."""
    return f"{INFERENCE}/{model}"


class SidecarServer:
    """A started server. Use `await SidecarServer.start(settings)`, then `await stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Certificates and token first: a bad file stops the start before anything runs.
        self.security = TransportSecurity.load(settings)
        # Tracing follows the OTEL_* variables of the process, as the OTel SDK reads them.
        provider = tracer_provider(os.environ)
        self.telemetry = Telemetry(Metrics(), provider, log_inputs=settings.log_inputs)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if provider:
            # Server spans that join the caller's trace (W3C traceparent / baggage metadata).
            # First, so that a call the token check refuses still has its span and status.
            interceptors.append(aio_server_interceptor(tracer_provider=provider))  # type: ignore[no-untyped-call]
        # Before the token check: metadata past the bound is refused whoever sends it.
        interceptors.append(MetadataLimitInterceptor(settings.max_metadata_bytes, self._refused))
        if self.security.token is not None:
            interceptors.append(
                BearerTokenInterceptor(
                    self.security.token,
                    lambda rpc: self._refused(rpc, grpc.StatusCode.UNAUTHENTICATED.name),
                )
            )
        self._inference_pool = ThreadPoolExecutor(
            settings.inference_workers, thread_name_prefix="inference"
        )
        # Tokenizing is short and releases the GIL; two threads keep it off the batch's path.
        self._prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        limits = BatchLimits(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            workers=settings.inference_workers,
        )
        self.engines = Engines(
            limits,
            settings.max_decode_batch_size,
            self._inference_pool,
            self._prepare_pool,
            self.telemetry,
        )
        self.registry = ModelRegistry(
            settings, self.telemetry.metrics.model_loaded, self.engines.attach
        )
        self.dataplane = DataPlane(
            settings, self.registry, self.engines, self._prepare_pool, self.telemetry
        )
        self.health = HealthServicer()
        self._draining = False
        self._health_server: grpc.aio.Server | None = None
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                *core_options(settings.max_metadata_bytes),
                # Two sidecars on one port would split traffic silently: fail to bind instead.
                ("grpc.so_reuseport", 0),
                # gRPC keeps one connection per client: without an age, replicas added behind
                # a Service get no traffic. Unset, core's grace is unlimited, so open streams
                # are never cut.
                *(
                    [("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000))]
                    if settings.max_connection_age_s > 0
                    else []
                ),
            ],
            interceptors=interceptors,
        )
        # A request protobuf cannot parse is answered INVALID_ARGUMENT, not gRPC's UNKNOWN.
        add_servicers(self.dataplane, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (
                INFERENCE,
                MODELS,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        self.port = self.metrics_port = self.health_port = 0
        self.ready_seconds = 0.0

    def _refused(self, rpc: str, code: str) -> None:
        """A call an interceptor refused, counted like any other answered call."""
        self.telemetry.answered(rpc, "", code, 0.0)

    async def _report(self, name: str, state: ModelState) -> None:
        if self._draining:
            return
        await self.health.set(
            model_health_name(name), SERVING if state is ModelState.SERVING else NOT_SERVING
        )

    @classmethod
    async def start(cls, settings: Settings) -> SidecarServer:
        """Bind, start answering (health NOT_SERVING), load the models, then report SERVING."""
        began = time.perf_counter()
        self = cls(settings)
        self._bind()
        try:
            await self._serve_and_load()
        except asyncio.CancelledError:
            # Stopped while loading: models that already serve may have calls in flight,
            # which get the grace period as at any SIGTERM.
            await self.stop()
            raise
        except BaseException:
            await self.stop(grace=0)
            raise
        self.ready_seconds = time.perf_counter() - began
        log.info("SERVING after %.2fs on %s", self.ready_seconds, settings.address)
        return self

    def _bind(self) -> None:
        """Take the listeners' ports (ConfigError naming the address when one is held)."""
        settings = self.settings
        credentials = self.security.server_credentials()
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(settings.address)
            else:
                self.port = self._server.add_secure_port(settings.address, credentials)
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot listen on {settings.address} (another process may hold it; choose "
                f"another --address): {exc}"
            ) from None
        restrict_socket(settings.address)
        if self.security.unprotected and not is_local_address(settings.address):
            log.warning(
                "listening on %s beyond loopback in plain text and without a token: anything "
                "that reaches this port can call every model. Set tls_cert_file and "
                "tls_key_file (and tls_client_ca_file for mTLS) or auth_token_file, or listen "
                "on 127.0.0.1 or a unix: socket",
                settings.address,
            )
        if settings.health_address:
            self._health_server = grpc.aio.server(options=core_options(settings.max_metadata_bytes))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            try:
                self.health_port = self._health_server.add_insecure_port(settings.health_address)
            except RuntimeError as exc:
                raise ConfigError(
                    f"cannot listen for health checks on {settings.health_address} ({exc}): "
                    "choose another --health-address"
                ) from None
        try:
            self.metrics_port = self.telemetry.metrics.serve(settings.metrics_address)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {settings.metrics_address} ({exc}): choose another "
                "--metrics-address, or an empty one to turn the endpoint off"
            ) from None

    async def _serve_and_load(self) -> None:
        """Answer (everything NOT_SERVING but liveness), load the models, report SERVING."""
        await self.health.set(LIVENESS, SERVING)
        for service in ("", INFERENCE, MODELS):
            await self.health.set(service, NOT_SERVING)
        for status in self.registry:
            await self.health.set(model_health_name(status.name), NOT_SERVING)
        if self._health_server:
            await self._health_server.start()
        await self._server.start()
        log.info(
            "listening on %s (%s); loading %d model(s)",
            self.settings.address,
            self.security.describe(),
            len(self.settings.models),
        )
        await self.registry.load_all(self._load_pool, self._report)
        if not self.registry.serving:
            failed = "; ".join(f"{s.name}: {s.error}" for s in self.registry)
            raise ConfigError(f"no model could be loaded ({failed})")
        for service in ("", INFERENCE, MODELS):
            await self.health.set(service, SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, give in-flight ones the grace period to finish."""
        grace = self.settings.grace_period_s if grace is None else grace
        began = time.monotonic()
        self._draining = True
        for service in ("", INFERENCE, MODELS, *(model_health_name(s.name) for s in self.registry)):
            await self.health.set(service, NOT_SERVING)
        admission = self.dataplane.admission
        admission.drain()
        if not await admission.wait_idle(grace):
            log.warning(
                "grace period over: cancelling %d call(s) still in flight", admission.active
            )
        # Whatever is left (a response still being written) gets the rest of the grace period.
        await self._server.stop(max(grace - (time.monotonic() - began), 0))
        if self._health_server:
            await self._health_server.stop(0)
        await self.dataplane.close()
        self.telemetry.close()
        self._inference_pool.shutdown(wait=False, cancel_futures=True)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)


def restrict_socket(address: str) -> None:
    """Give a Unix socket's file SOCKET_MODE (grpc creates it with the process umask)."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        # unix:///abs/path and unix:relative/path are both grpc's forms.
        os.chmod(path.removeprefix("//") if path.startswith("///") else path, SOCKET_MODE)


async def serve(settings: Settings) -> bool:
    """Run until SIGTERM or SIGINT, then drain gracefully. A signal while models load stops
    the start too; returns True when a model was left loading on its thread."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    starting = asyncio.ensure_future(SidecarServer.start(settings))
    signalled = asyncio.ensure_future(stopping.wait())
    await asyncio.wait((starting, signalled), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.warning("shutting down while models are still loading")
        starting.cancel()  # start() drains what already serves and stops what it started
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopped")
        return True
    signalled.cancel()
    server = starting.result()  # a start that failed raises here
    await stopping.wait()
    log.info("shutting down: draining in-flight calls for up to %.1fs", settings.grace_period_s)
    await server.stop()
    log.info("stopped")
    return False
