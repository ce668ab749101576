"""Transport security against real servers: TLS and mTLS from certificates made by trustme,
a bearer token on unary, server-streaming and bidi calls (through the tracing interceptor),
health left open, the `sidecar client` flags against a `sidecar serve` process, certificate
reloads, start-up errors that name the file, and the warning for an unprotected listener."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import ModelSettings, Settings
from sidecar.errors import ConfigError
from sidecar.grpc.auth import BearerTokenInterceptor
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import models_pb2, models_pb2_grpc
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import serving
from tests.processes import BIN, free_port, start_sidecar, stop_sidecar, wait_serving
from tools.otlp_receiver import OtlpReceiver

TOKEN = "0123456789abcdef-the-real-token"
WRONG = "SENTINEL-wrong-token-4111111111111111"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
SERVING = health_pb2.HealthCheckResponse.SERVING
# Each channel gets its own connections: a handshake per test, never one shared by another.
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def write_cert(cert: trustme.LeafCert, directory: Path, stem: str) -> tuple[Path, Path]:
    """The certificate chain and key of `cert` as PEM files: (chain, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    chain, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return chain, key


@dataclass(frozen=True)
class Pki:
    """Two unrelated CAs and the files the tests hand to servers and clients."""

    dir: Path
    ca: trustme.CA
    other_ca: trustme.CA
    ca_file: Path
    other_ca_file: Path
    server_cert: Path  # localhost, 127.0.0.1 and ::1, signed by ca
    server_key: Path
    client_cert: Path  # signed by ca
    client_key: Path
    rogue_cert: Path  # signed by other_ca
    rogue_key: Path
    token_file: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def client_pair(self) -> tuple[bytes, bytes]:
        return self.client_key.read_bytes(), self.client_cert.read_bytes()

    def rogue_pair(self) -> tuple[bytes, bytes]:
        return self.rogue_key.read_bytes(), self.rogue_cert.read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    other_ca.cert_pem.write_to_path(str(directory / "other-ca.crt"))
    server = write_cert(ca.issue_cert("localhost", "127.0.0.1", "::1"), directory, "server")
    client = write_cert(ca.issue_cert("support-api@example.test"), directory, "client")
    rogue = write_cert(other_ca.issue_cert("support-api@example.test"), directory, "rogue")
    token_file = directory / "token"
    token_file.write_text(f"  {TOKEN}\n")  # as an editor or `echo` leaves it
    return Pki(
        directory,
        ca,
        other_ca,
        directory / "ca.crt",
        directory / "other-ca.crt",
        *server,
        *client,
        *rogue,
        token_file,
    )


def settings_for(*models: ModelSettings, **overrides: object) -> Settings:
    return Settings(
        **{
            "address": "127.0.0.1:0",
            "metrics_address": "127.0.0.1:0",
            "http_address": "",
            "models": models,
            "intra_op_threads": 1,
            "grace_period_s": 0.0,
            **overrides,
        }  # type: ignore[arg-type]
    )


def tls_channel(
    port: int, ca: bytes, client: tuple[bytes, bytes] | None = None
) -> grpc.aio.Channel:
    key, chain = client or (None, None)
    credentials = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=CHANNEL_OPTIONS)


def plain_channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)


async def embed(channel: grpc.aio.Channel, token: str | None = None) -> pb.EmbedResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    reply: pb.EmbedResponse = await InferenceStub(channel).Embed(
        pb.EmbedRequest(inputs=["refund not received"]), metadata=metadata, timeout=30
    )
    return reply


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The code of an Embed that must fail (the connection, or the call)."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await embed(channel)
    code: grpc.StatusCode = failed.value.code()
    return code


# ---- TLS and mTLS --------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tls_server(minilm_dir: Path, pki: Pki) -> AsyncIterator[SidecarServer]:
    settings = settings_for(
        ModelSettings(path=minilm_dir),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        health_address="127.0.0.1:0",
    )
    async with serving(settings) as server:
        yield server


async def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plain_text(
    tls_server: SidecarServer, pki: Pki
) -> None:
    async with tls_channel(tls_server.port, pki.ca_pem) as channel:
        assert (await embed(channel)).dimensions == 384
        check = health_pb2_grpc.HealthStub(channel).Check
        assert (await check(health_pb2.HealthCheckRequest(), timeout=10)).status == SERVING
    # A plain-text client gets no answer from a TLS listener, and a client that trusts
    # another CA does not accept the server.
    async with plain_channel(tls_server.port) as channel:
        assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
    async with tls_channel(tls_server.port, pki.other_ca.cert_pem.bytes()) as channel:
        assert await refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_the_health_listener_stays_plain_text_and_health_only(
    tls_server: SidecarServer,
) -> None:
    async with plain_channel(tls_server.health_port) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "sidecar.v1.Inference", "liveness"):
            request = health_pb2.HealthCheckRequest(service=service)
            assert (await check(request, timeout=10)).status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as embedded:
            await embed(channel)
        assert embedded.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture(scope="module")
async def mtls_server(minilm_dir: Path, pki: Pki) -> AsyncIterator[SidecarServer]:
    settings = settings_for(
        ModelSettings(path=minilm_dir),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca_file),
    )
    async with serving(settings) as server:
        yield server


async def test_mtls_serves_a_client_certificate_from_the_ca(
    mtls_server: SidecarServer, pki: Pki
) -> None:
    async with tls_channel(mtls_server.port, pki.ca_pem, pki.client_pair()) as channel:
        assert (await embed(channel)).dimensions == 384
        models = await models_pb2_grpc.ModelsStub(channel).ListModels(
            models_pb2.ListModelsRequest(), timeout=10
        )
        assert [m.name for m in models.models] == ["minilm"]


@pytest.mark.parametrize("client", ["none", "another CA's"])
async def test_mtls_refuses_a_client_without_a_certificate_from_the_ca(
    mtls_server: SidecarServer, pki: Pki, client: str
) -> None:
    pair = None if client == "none" else pki.rogue_pair()
    async with tls_channel(mtls_server.port, pki.ca_pem, pair) as channel:
        assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
        # Not even health: without a valid certificate there is no connection at all.
        with pytest.raises(grpc.aio.AioRpcError):
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )


async def test_tls_on_a_unix_socket(minilm_dir: Path, pki: Pki) -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="sock"))  # short: socket paths stop at 107 bytes
    address = f"unix:{socket_dir}/sidecar.sock"
    settings = settings_for(
        ModelSettings(path=minilm_dir),
        address=address,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
    )
    try:
        async with serving(settings):
            credentials = grpc.ssl_channel_credentials(pki.ca_pem)
            # A socket path is no host name: the client checks the certificate for localhost.
            options = (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "localhost"))
            async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
                assert (await embed(channel)).dimensions == 384
            async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        shutil.rmtree(socket_dir)


def replace_file(path: Path, data: bytes) -> None:
    """Swap a file's content in one step, as Kubernetes updates a mounted Secret."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    os.replace(staged, path)


async def test_certificates_are_reloaded_when_the_files_change(
    minilm_dir: Path, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    settings = settings_for(
        ModelSettings(path=minilm_dir), tls_cert_file=str(cert), tls_key_file=str(key)
    )
    async with serving(settings) as server:
        async with tls_channel(server.port, pki.ca_pem) as channel:
            assert (await embed(channel)).dimensions == 384
        # Renewed by another CA: new connections get the new certificate.
        renewed_ca = trustme.CA()
        renewed = renewed_ca.issue_cert("localhost", "127.0.0.1")
        replace_file(cert, b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
        replace_file(key, renewed.private_key_pem.bytes())
        async with tls_channel(server.port, renewed_ca.cert_pem.bytes()) as channel:
            assert (await embed(channel)).dimensions == 384
        async with tls_channel(server.port, pki.ca_pem) as channel:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
        # A renewal whose key does not match is logged, and the certificate in use stays.
        with caplog.at_level(logging.ERROR, logger="sidecar.grpc.auth"):
            replace_file(key, pki.client_key.read_bytes())
            async with tls_channel(server.port, renewed_ca.cert_pem.bytes()) as channel:
                assert (await embed(channel)).dimensions == 384
        (logged,) = [r for r in caplog.records if r.name == "sidecar.grpc.auth"]
        assert "keeping the ones loaded" in logged.getMessage()
        assert f"tls_key_file {key} is not the private key" in logged.getMessage()


# ---- the bearer token ----------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


@pytest.fixture(scope="module")
async def token_server(
    minilm_dir: Path, gpt2_dir: Path, pki: Pki, receiver: OtlpReceiver
) -> AsyncIterator[SidecarServer]:
    """Plain text with a token, and tracing on: the token check runs behind the tracing
    interceptor, so both wrap every call."""
    settings = settings_for(
        ModelSettings(path=minilm_dir),
        ModelSettings(path=gpt2_dir, name="writer"),
        auth_token_file=str(pki.token_file),
    )
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    async with serving(settings, env) as server:
        yield server


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_unary_calls_need_the_token(token_server: SidecarServer) -> None:
    async with plain_channel(token_server.port) as channel:
        stub = InferenceStub(channel)
        request = pb.EmbedRequest(inputs=["refund not received"])
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Embed(request, timeout=10)
        assert missing.value.code() == UNAUTHENTICATED
        assert "authorization: Bearer <token>" in (missing.value.details() or "")
        for metadata in (bearer(WRONG), (("authorization", WRONG),), bearer("")):
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stub.Embed(request, metadata=metadata, timeout=10)
            assert wrong.value.code() == UNAUTHENTICATED
            assert WRONG not in (wrong.value.details() or "")
            assert TOKEN not in (wrong.value.details() or "")
        # The refusals above did not stop the server: the right token is served.
        assert (await stub.Embed(request, metadata=bearer(TOKEN), timeout=30)).dimensions == 384
        # The scheme is case-insensitive (RFC 7235).
        lower = (("authorization", f"bearer {TOKEN}"),)
        assert (await stub.Embed(request, metadata=lower, timeout=30)).dimensions == 384
        models = models_pb2_grpc.ModelsStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await models.ListModels(models_pb2.ListModelsRequest(), timeout=10)
        assert listing.value.code() == UNAUTHENTICATED
        listed = await models.ListModels(
            models_pb2.ListModelsRequest(), metadata=bearer(TOKEN), timeout=10
        )
        assert {m.name for m in listed.models} == {"minilm", "writer"}


async def test_server_streaming_generate_needs_the_token(token_server: SidecarServer) -> None:
    request = pb.GenerateRequest(model="writer", prompt="Refund", max_new_tokens=3)
    async with plain_channel(token_server.port) as channel:
        stub = InferenceStub(channel)
        for metadata in (None, bearer(WRONG)):
            call = stub.Generate(request, metadata=metadata, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as refused_call:
                _ = [step async for step in call]
            assert refused_call.value.code() == UNAUTHENTICATED
            assert WRONG not in (refused_call.value.details() or "")
        steps = [step async for step in stub.Generate(request, metadata=bearer(TOKEN), timeout=30)]
        assert len(steps) == 3
        assert steps[-1].finish_reason == pb.FINISH_REASON_LENGTH


def sync_stream(port: int, metadata: tuple[tuple[str, str], ...] | None) -> grpc.StatusCode:
    """A blocking client that sends two items and then reads: the code the call ends with."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        items = [pb.StreamRequest(id=i, embed=pb.EmbedRequest(inputs=[i])) for i in "ab"]
        answers = InferenceStub(channel).Stream(iter(items), metadata=metadata, timeout=30)
        try:
            return grpc.StatusCode.OK if len(list(answers)) == 2 else grpc.StatusCode.UNKNOWN
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code


async def test_bidi_stream_needs_the_token(token_server: SidecarServer) -> None:
    # An asyncio client that writes after the server has ended the call may be told INTERNAL
    # rather than the server's status (grpc/grpc#36066), so these read before writing; the
    # blocking client below writes first.
    async with plain_channel(token_server.port) as channel:
        stub = InferenceStub(channel)
        for metadata in (None, bearer(WRONG)):
            call = stub.Stream(metadata=metadata, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
                await call.read()
            assert refused_stream.value.code() == UNAUTHENTICATED
            assert WRONG not in (refused_stream.value.details() or "")
        call = stub.Stream(metadata=bearer(TOKEN), timeout=30)
        for item in ("a", "b"):
            await call.write(pb.StreamRequest(id=item, embed=pb.EmbedRequest(inputs=[item])))
        await call.done_writing()
        answers = {answer.id: answer async for answer in call}
        assert set(answers) == {"a", "b"}
        assert all(a.embed.dimensions == 384 for a in answers.values())
    port = token_server.port
    assert await asyncio.to_thread(sync_stream, port, None) == UNAUTHENTICATED
    assert await asyncio.to_thread(sync_stream, port, bearer(WRONG)) == UNAUTHENTICATED
    assert await asyncio.to_thread(sync_stream, port, bearer(TOKEN)) == grpc.StatusCode.OK


async def test_health_is_open_and_reflection_needs_the_token(
    token_server: SidecarServer,
) -> None:
    async with plain_channel(token_server.port) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "sidecar.v1.Inference", "sidecar.v1.Inference/minilm", "liveness"):
            request = health_pb2.HealthCheckRequest(service=service)
            assert (await check(request, timeout=10)).status == SERVING, service
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await reflect(timeout=10).read()
        assert listing.value.code() == UNAUTHENTICATED
        question = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [a async for a in reflect(iter([question]), metadata=bearer(TOKEN), timeout=10)]
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"sidecar.v1.Inference", "grpc.health.v1.Health"} <= names


async def test_refusals_are_counted_traced_and_never_logged_with_the_token(
    token_server: SidecarServer, receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    def refused_embeds() -> float:
        url = f"http://127.0.0.1:{token_server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "sidecar_requests_total"
            and sample.labels["rpc"] == "Embed"
            and sample.labels["code"] == "UNAUTHENTICATED"
        )

    parent = "00f067aa0ba902c1"
    traceparent = ("traceparent", f"00-4bf92f3577b34da6a3ce929d0e0e4736-{parent}-01")
    before = refused_embeds()
    with caplog.at_level(logging.DEBUG):
        async with plain_channel(token_server.port) as channel:
            stub = InferenceStub(channel)
            request = pb.EmbedRequest(inputs=["x"])
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Embed(request, metadata=(traceparent, *bearer(WRONG)), timeout=10)
    assert refused_embeds() - before == 2
    # The tracing interceptor saw the refusal: a server span with UNAUTHENTICATED (a
    # caller's mistake, so the span's own status stays unset, as OTel's conventions say).
    spans = await receiver.wait_for(lambda s: s.parent_span_id == parent, timeout=10, count=2)
    for span in spans:
        assert span.name == "/sidecar.v1.Inference/Embed"
        assert span.attributes["rpc.grpc.status_code"] == UNAUTHENTICATED.value[0]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert WRONG not in logged
    assert TOKEN not in logged


@pytest.mark.parametrize(
    ("metadata", "accepted"),
    [
        ([("authorization", f"Bearer {TOKEN}")], True),
        ([("authorization", f"BEARER   {TOKEN}  ")], True),
        ([("x-other", "1"), ("authorization", f"Bearer {TOKEN}")], True),
        ([], False),
        ([("authorization", f"Bearer {TOKEN}x")], False),
        ([("authorization", f"Bearer {TOKEN[:-1]}")], False),
        ([("authorization", f"Basic {TOKEN}")], False),
        ([("authorization", TOKEN)], False),
        ([("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")], False),
    ],
)
def test_what_the_token_check_accepts(metadata: list[tuple[str, str]], accepted: bool) -> None:
    check = BearerTokenInterceptor(TOKEN.encode(), refused=lambda rpc: None)
    problem = check.problem(metadata)
    assert (problem is None) == accepted
    assert TOKEN not in (problem or "")


# ---- start-up: bad files, and the listener's exposure ----------------------------------


def encrypted_key(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing cert", "cannot read tls_cert_file {dir}/nope.crt: No such file or directory"),
        ("missing key", "cannot read tls_key_file {dir}/nope.key: No such file or directory"),
        ("missing ca", "cannot read tls_client_ca_file {dir}/nope-ca.crt: No such file"),
        ("missing token", "cannot read auth_token_file {dir}/nope-token: No such file"),
        ("unreadable cert", "cannot read tls_cert_file {dir}: Is a directory"),
        ("cert is not PEM", "tls_cert_file {dir}/server.key holds no PEM certificate"),
        ("key is not PEM", "tls_key_file {dir}/server.crt holds no usable PEM private key"),
        ("mismatched key", "tls_key_file {dir}/client.key is not the private key of the"),
        ("encrypted key", "tls_key_file {dir}/encrypted.key is encrypted"),
        ("ca is not PEM", "tls_client_ca_file {dir}/token holds no PEM CA certificate"),
        ("cert without key", "tls_cert_file is set but tls_key_file is not"),
        ("key without cert", "tls_key_file is set but tls_cert_file is not"),
        ("ca without tls", "tls_client_ca_file is set but TLS is not"),
        ("empty token", "auth_token_file {dir}/empty-token is empty"),
        ("token with a space", "auth_token_file {dir}/spaced-token holds a character"),
    ],
)
async def test_bad_files_stop_the_start_with_a_clear_message(
    pki: Pki, case: str, message: str
) -> None:
    d = pki.dir
    (d / "encrypted.key").write_bytes(encrypted_key(pki.server_key.read_bytes()))
    (d / "empty-token").write_text(" \n")
    (d / "spaced-token").write_text("two words\n")
    tls = {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key)}
    settings = {
        "missing cert": {**tls, "tls_cert_file": f"{d}/nope.crt"},
        "missing key": {**tls, "tls_key_file": f"{d}/nope.key"},
        "missing ca": {**tls, "tls_client_ca_file": f"{d}/nope-ca.crt"},
        "missing token": {"auth_token_file": f"{d}/nope-token"},
        "unreadable cert": {**tls, "tls_cert_file": str(d)},
        "cert is not PEM": {**tls, "tls_cert_file": str(pki.server_key)},
        "key is not PEM": {**tls, "tls_key_file": str(pki.server_cert)},
        "mismatched key": {**tls, "tls_key_file": str(pki.client_key)},
        "encrypted key": {**tls, "tls_key_file": f"{d}/encrypted.key"},
        "ca is not PEM": {**tls, "tls_client_ca_file": str(pki.token_file)},
        "cert without key": {"tls_cert_file": str(pki.server_cert)},
        "key without cert": {"tls_key_file": str(pki.server_key)},
        "ca without tls": {"tls_client_ca_file": str(pki.ca_file)},
        "empty token": {"auth_token_file": f"{d}/empty-token"},
        "token with a space": {"auth_token_file": f"{d}/spaced-token"},
    }[case]
    # The files are checked before anything starts, so no model is needed to see it.
    with pytest.raises(ConfigError) as refused_start:
        async with serving(settings_for(ModelSettings(path=d / "no-model"), **settings)):
            pass
    assert message.format(dir=d) in str(refused_start.value)


@pytest.mark.parametrize(
    ("address", "protection", "warned"),
    [
        ("0.0.0.0:0", "none", True),
        ("0.0.0.0:0", "token", False),
        ("0.0.0.0:0", "tls", False),
        ("127.0.0.1:0", "none", False),
        ("localhost:0", "none", False),
    ],
)
async def test_an_unprotected_listener_beyond_loopback_is_warned_about(
    minilm_dir: Path,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    address: str,
    protection: str,
    warned: bool,
) -> None:
    overrides = {
        "none": {},
        "token": {"auth_token_file": str(pki.token_file)},
        "tls": {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key)},
    }[protection]
    with caplog.at_level(logging.WARNING, logger="sidecar.grpc.server"):
        async with serving(
            settings_for(ModelSettings(path=minilm_dir), address=address, **overrides)
        ):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "sidecar.grpc.server"]
    warnings = [w for w in warnings if "beyond loopback" in w]
    assert bool(warnings) == warned
    if warned:
        (warning,) = warnings
        assert "tls_cert_file" in warning
        assert "auth_token_file" in warning
        assert "127.0.0.1" in warning


# ---- `sidecar serve` and `sidecar client` as processes ---------------------------------


@pytest.mark.slow
def test_client_flags_against_sidecar_serve_with_mtls_and_a_token(
    minilm_dir: Path, pki: Pki, tmp_path: Path
) -> None:
    # The certificate names only sidecar.test: a client dialling 127.0.0.1 must say which
    # name to check (--tls-server-name), as it would through a port-forward.
    cert, key = write_cert(pki.ca.issue_cert("sidecar.test"), tmp_path, "named")
    address, health = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    process = start_sidecar(
        tmp_path / "serve.log",
        *("--model", str(minilm_dir), "--address", address, "--health-address", health),
        *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-client-ca-file", str(pki.ca_file), "--auth-token-file", str(pki.token_file)),
        *("--metrics-address", ""),
    )
    try:
        wait_serving(health, process)  # the probe listener: plain text, no token
        secure = [
            *("--tls-ca", str(pki.ca_file), "--tls-server-name", "sidecar.test"),
            *("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)),
        ]

        def client(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            command = [BIN / "sidecar", "client", "--address", address, *args]
            return subprocess.run(command, capture_output=True, text=True, timeout=60, input=stdin)

        done = client(*secure, "--token-file", str(pki.token_file), "embed", "some text")
        assert done.returncode == 0, done.stderr
        assert '"dimensions": 384' in done.stdout
        piped = client(*secure, "--token-file", "-", "models", stdin=TOKEN + "\n")
        assert piped.returncode == 0, piped.stderr
        assert '"name": "minilm"' in piped.stdout
        # Health needs no token; the rest does.
        assert client(*secure, "health").returncode == 0
        no_token = client(*secure, "tokenize", "x")
        assert no_token.returncode == 1
        assert no_token.stderr.startswith("UNAUTHENTICATED: this server needs a bearer token")
        # Without the server name, without a client certificate, without the CA, or in
        # plain text: no connection.
        for flags in (
            ["--tls-ca", str(pki.ca_file), *secure[4:]],
            secure[:4],
            secure[4:],
            [],
        ):
            failed = client(*flags, "--token-file", str(pki.token_file), "embed", "x")
            assert failed.returncode != 0, flags
        half = client("--tls-ca", str(pki.ca_file), "--tls-cert", str(pki.client_cert), "models")
        assert half.returncode == 2
        assert "--tls-cert and --tls-key go together" in half.stderr
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)
    assert TOKEN not in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "mismatched"])
def test_sidecar_serve_exits_with_a_message_not_a_traceback(
    minilm_dir: Path, pki: Pki, tmp_path: Path, case: str
) -> None:
    key = {"missing": tmp_path / "absent.key", "mismatched": pki.client_key}[case]
    command = [
        *(BIN / "sidecar", "serve", "--model", str(minilm_dir)),
        *("--address", f"127.0.0.1:{free_port()}", "--metrics-address", ""),
        "--http-address=",
        *("--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(key)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    expected = {
        "missing": f"sidecar: cannot read tls_key_file {key}: No such file or directory",
        "mismatched": f"sidecar: tls_key_file {key} is not the private key of the certificate",
    }[case]
    assert expected in done.stderr


async def test_the_http_api_serves_tls_and_mtls_from_the_same_files(
    minilm_dir: Path, pki: Pki
) -> None:
    settings = settings_for(
        ModelSettings(path=minilm_dir, name="minilm"),
        http_address="127.0.0.1:0",
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca_file),
    )
    body = {"model": "minilm", "input": "over TLS"}
    async with serving(settings) as server:
        url = f"https://localhost:{server.http_port}/v1/embeddings"
        trusted = ssl.create_default_context(cafile=str(pki.ca_file))
        trusted.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        async with httpx.AsyncClient(verify=trusted) as client:
            answer = await client.post(url, json=body)
        assert answer.status_code == 200
        assert len(answer.json()["data"][0]["embedding"]) == 384
        # No client certificate: the handshake fails (mTLS), as on the gRPC port.
        anonymous = ssl.create_default_context(cafile=str(pki.ca_file))
        async with httpx.AsyncClient(verify=anonymous) as client:
            with pytest.raises(httpx.TransportError):
                await client.post(url, json=body)
        # Plain HTTP to the TLS port gets no answer.
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.TransportError):
                await client.post(url.replace("https", "http"), json=body)
