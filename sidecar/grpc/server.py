"""The gRPC listener: services, interceptors, health, reflection, and its ports."""

from __future__ import annotations

import logging
import os

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from sidecar.config import Settings, is_local_address
from sidecar.dataplane.service import DataPlane
from sidecar.errors import ConfigError
from sidecar.grpc.auth import BearerTokenInterceptor, TransportSecurity
from sidecar.grpc.metadata import MetadataLimitInterceptor, core_options
from sidecar.grpc.servicers import add_servicers
from sidecar.telemetry.observer import Telemetry
from sidecar.v1 import inference_pb2, models_pb2

log = logging.getLogger(__name__)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
MODELS = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name
SERVICES = ("", INFERENCE, MODELS)  # "" is the server as a whole
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


class GrpcListener:
    """The main gRPC server and, when configured, the health-only one beside it."""

    def __init__(
        self,
        settings: Settings,
        dataplane: DataPlane,
        security: TransportSecurity,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.security = security
        self.telemetry = telemetry
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if telemetry.provider:
            # Server spans that join the caller's trace (W3C traceparent / baggage metadata).
            # First, so that a call the token check refuses still has its span and status.
            interceptors.append(aio_server_interceptor(tracer_provider=telemetry.provider))  # type: ignore[no-untyped-call]
        # Before the token check: metadata past the bound is refused whoever sends it.
        interceptors.append(MetadataLimitInterceptor(settings.max_metadata_bytes, self._refused))
        if security.token is not None:
            interceptors.append(
                BearerTokenInterceptor(
                    security.token,
                    lambda rpc: self._refused(rpc, grpc.StatusCode.UNAUTHENTICATED.name),
                )
            )
        self.health = HealthServicer()
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
        add_servicers(dataplane, self._server)
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
        self.port = self.health_port = 0

    def _refused(self, rpc: str, code: str) -> None:
        """A call an interceptor refused, counted like any other answered call."""
        self.telemetry.answered(rpc, "", code, 0.0)

    def bind(self) -> None:
        """Take the ports (ConfigError naming the address when one is held)."""
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

    async def start(self, models: list[str]) -> None:
        """Answer: liveness SERVING, the services and `models` NOT_SERVING until `serving`."""
        await self.health.set(LIVENESS, SERVING)
        for service in (*SERVICES, *map(model_health_name, models)):
            await self.health.set(service, NOT_SERVING)
        if self._health_server:
            await self._health_server.start()
        await self._server.start()

    async def report(self, model: str, *, serving: bool) -> None:
        """One model's health."""
        await self.health.set(model_health_name(model), SERVING if serving else NOT_SERVING)

    async def serving(self) -> None:
        """The services SERVING: the models are loaded."""
        for service in SERVICES:
            await self.health.set(service, SERVING)

    async def draining(self, models: list[str]) -> None:
        """The services and every model NOT_SERVING (liveness stays SERVING)."""
        for service in (*SERVICES, *map(model_health_name, models)):
            await self.health.set(service, NOT_SERVING)

    async def stop(self, grace: float) -> None:
        """Stop both servers; what is still being written gets `grace` seconds."""
        await self._server.stop(grace)
        if self._health_server:
            await self._health_server.stop(0)


def restrict_socket(address: str) -> None:
    """Give a Unix socket's file SOCKET_MODE (grpc creates it with the process umask)."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        # unix:///abs/path and unix:relative/path are both grpc's forms.
        os.chmod(path.removeprefix("//") if path.startswith("///") else path, SOCKET_MODE)
