"""The server process: one dataplane behind its listeners (gRPC, and the OpenAI-compatible
HTTP API), start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from sidecar.batching.batcher import BatchLimits
from sidecar.config import Settings
from sidecar.dataplane.registry import ModelRegistry
from sidecar.dataplane.service import DataPlane
from sidecar.domain import ModelState
from sidecar.errors import ConfigError
from sidecar.grpc.auth import TransportSecurity
from sidecar.grpc.server import GrpcListener
from sidecar.http.listener import HttpListener
from sidecar.runtime.threads import ThreadBudget, cpu_count
from sidecar.serving.engines import Engines
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.observer import Telemetry
from sidecar.telemetry.tracing import tracer_provider

log = logging.getLogger(__name__)


class SidecarServer:
    """A started server. Use `await SidecarServer.start(settings)`, then `await stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Certificates and token first: a bad file stops the start before anything runs.
        self.security = TransportSecurity.load(settings)
        # Tracing follows the OTEL_* variables of the process, as the OTel SDK reads them.
        provider = tracer_provider(os.environ)
        self.telemetry = Telemetry(Metrics(), provider, log_inputs=settings.log_inputs)
        # Adapting passes count cores (a pass takes one, or all of them): intra_op_threads
        # of them (the chart sets it to the pod's CPU request), else what this process may
        # use. Fixed workers count passes, one unit each.
        cores = settings.intra_op_threads or cpu_count()
        if settings.adaptive_passes:
            workers, budget = cores, ThreadBudget(cores, wide=cores)
        else:
            workers = settings.inference_workers
            budget = ThreadBudget(workers)
        self._inference_pool = ThreadPoolExecutor(workers, thread_name_prefix="inference")
        # Tokenizing is short and releases the GIL; two threads keep it off the batch's path.
        self._prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        limits = BatchLimits(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            workers=workers,
        )
        self.engines = Engines(
            limits,
            settings.max_decode_batch_size,
            self._inference_pool,
            self._prepare_pool,
            self.telemetry,
            budget,
        )
        self.registry = ModelRegistry(
            settings, self.telemetry.metrics.model_loaded, self.engines.attach
        )
        self.dataplane = DataPlane(
            settings, self.registry, self.engines, self._prepare_pool, self.telemetry
        )
        self._draining = False
        self._loaded = False
        self.grpc = GrpcListener(settings, self.dataplane, self.security, self.telemetry)
        self.http = (
            HttpListener(settings, self.dataplane, self.security.token, self._state)
            if settings.http_address
            else None
        )
        self.port = self.metrics_port = self.health_port = self.http_port = 0
        self.ready_seconds = 0.0

    def _state(self) -> str:
        """What the HTTP /health route says: loading, serving or draining."""
        if self._draining:
            return "draining"
        return "serving" if self._loaded else "loading"

    async def _report(self, name: str, state: ModelState) -> None:
        if self._draining:
            return
        await self.grpc.report(name, serving=state is ModelState.SERVING)

    @classmethod
    async def start(cls, settings: Settings) -> SidecarServer:
        """Bind, start answering (health NOT_SERVING), load the models, then report SERVING."""
        began = time.perf_counter()
        self = cls(settings)
        try:
            self._bind()
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
        self.grpc.bind()
        self.port, self.health_port = self.grpc.port, self.grpc.health_port
        if self.http is not None:
            self.http_port = self.http.bind()
        try:
            self.metrics_port = self.telemetry.metrics.serve(settings.metrics_address)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {settings.metrics_address} ({exc}): choose another "
                "--metrics-address, or an empty one to turn the endpoint off"
            ) from None

    async def _serve_and_load(self) -> None:
        """Answer (everything NOT_SERVING but liveness), load the models, report SERVING."""
        await self.grpc.start([status.name for status in self.registry])
        if self.http is not None:
            await self.http.start()
        log.info(
            "listening on %s (%s)%s; loading %d model(s)",
            self.settings.address,
            self.security.describe(),
            f", HTTP on {self.settings.http_address}" if self.http else "",
            len(self.settings.models),
        )
        await self.registry.load_all(self._load_pool, self._report)
        if not self.registry.serving:
            failed = "; ".join(f"{s.name}: {s.error}" for s in self.registry)
            raise ConfigError(f"no model could be loaded ({failed})")
        self._loaded = True
        await self.grpc.serving()

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, give in-flight ones the grace period to finish."""
        grace = self.settings.grace_period_s if grace is None else grace
        began = time.monotonic()
        self._draining = True
        await self.grpc.draining([status.name for status in self.registry])
        admission = self.dataplane.admission
        admission.drain()
        if not await admission.wait_idle(grace):
            log.warning(
                "grace period over: cancelling %d call(s) still in flight", admission.active
            )
        # Whatever is left (a response still being written) gets the rest of the grace period.
        remaining = max(grace - (time.monotonic() - began), 0)
        if self.http is not None:
            await self.http.stop(remaining)
        await self.grpc.stop(max(grace - (time.monotonic() - began), 0))
        await self.dataplane.close()
        self.telemetry.close()
        self._inference_pool.shutdown(wait=False, cancel_futures=True)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)


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
