"""One settings object, built once in main: flags > SIDECAR_* environment > YAML file > defaults."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from sidecar.errors import ConfigError
from sidecar.runtime.devices import parse_device
from sidecar.runtime.threads import cpu_count

ENV_PREFIX = "SIDECAR_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BACKENDS = ("auto", "onnx", "torch")
LOG_FORMATS = ("json", "text")
TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelSettings:
    """One model dir to serve and how to run it."""

    path: Path
    # Name callers use; defaults to the name in the manifest, else the dir name.
    name: str | None = None
    # "cpu", "cuda" or "cuda:<index>"; None takes Settings.device.
    device: str | None = None
    # ONNX Runtime intra-op threads; None takes Settings.intra_op_threads.
    intra_op_threads: int | None = None
    # "auto", "onnx" or "torch"; None takes Settings.backend.
    backend: str | None = None
    # Torch backend weights: "auto", "float32", "float16", "bfloat16"; None takes Settings'.
    torch_dtype: str | None = None


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start-up. Field names are also the YAML keys."""

    address: str = _setting(
        "127.0.0.1:50051",
        "host:port or unix:/path.sock to listen on; loopback by default (callers share the pod)",
    )
    models: tuple[ModelSettings, ...] = _setting((), "model dirs to serve: path or name=path")
    default_model: str | None = _setting(
        None, "model for requests with an empty `model` (default: the first)"
    )
    max_client_batch_size: int = _setting(64, "most inputs one unary call or Stream item may carry")
    max_message_bytes: int = _setting(
        16 * 1024 * 1024, "largest request or response message, in bytes"
    )
    max_metadata_bytes: int = _setting(
        16 * 1024,
        "largest request metadata (names + values + 32 per entry), in bytes; past it a call "
        "is refused with a message, and past 4 times it by gRPC itself",
    )
    stream_max_in_flight: int = _setting(
        32, "items in flight on one Stream before the server stops reading it"
    )
    grace_period_s: float = _setting(10.0, "seconds in-flight calls get to finish after SIGTERM")
    max_connection_age_s: float = _setting(
        0.0,
        "seconds after which a client connection is asked to reconnect (calls in flight "
        "finish first), so replicas added behind a Service get their share; 0 = never",
    )
    device: str = _setting("cpu", "default device: cpu, cuda or cuda:<index>")
    backend: str = _setting(
        "auto",
        "default backend: auto (ONNX when the model dir has a graph, else PyTorch), onnx, torch",
    )
    torch_dtype: str = _setting(
        "auto",
        "torch backend weights: auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16",
    )
    intra_op_threads: int = _setting(
        0,
        "ONNX Runtime threads per operator, and with adapting passes the cores forward passes "
        "share; 0 = one per core",
    )
    inference_workers: int = _setting(
        0,
        "forward passes at once, all models together, each on intra_op_threads; 0 = adapt to "
        "the queue on a CPU: one pass on every core while it is shallow, two side by side on "
        "half the cores each while it is deep",
    )
    max_batch_tokens: int = _setting(
        8192, "padded tokens (inputs x longest input) in one forward pass"
    )
    max_batch_size: int = _setting(
        4, "inputs in one forward pass, cut from the oldest this many in the queue"
    )
    max_batch_delay_ms: float = _setting(
        0.0, "longest an input waits for others to share its batch; 0 = never wait"
    )
    max_queue_size: int = _setting(
        1024, "inputs waiting per model; past it calls get RESOURCE_EXHAUSTED at once"
    )
    result_cache_bytes: int = _setting(
        0,
        "bytes of encoder results kept to answer repeated inputs without a forward pass "
        "(least recently used evicted first; all models together); 0 = off",
    )
    max_concurrent_requests: int = _setting(
        512, "calls and Stream items in progress at once; past it RESOURCE_EXHAUSTED at once"
    )
    max_rerank_passages: int = _setting(128, "passages one Rerank call or Stream item may score")
    max_concurrent_generations: int = _setting(
        8, "Generate calls and items in progress at once; past it RESOURCE_EXHAUSTED at once"
    )
    max_decode_batch_size: int = _setting(
        8, "generations of one model that share a decode step; 1 = one at a time"
    )
    health_address: str = _setting(
        "",
        "host:port of a second listener serving only grpc.health.v1, in plain text, for "
        "Kubernetes probes (which reach the pod IP, not loopback or a socket); empty = none",
    )
    metrics_address: str = _setting(
        "127.0.0.1:9464", "host:port of the Prometheus metrics endpoint; empty turns it off"
    )
    http_address: str = _setting(
        "127.0.0.1:8080",
        "host:port or unix:/path.sock of the OpenAI-compatible HTTP API, beside gRPC: the same "
        "models, limits, TLS and token; empty turns it off",
    )
    http_timeout_s: float = _setting(
        300.0,
        "deadline of an HTTP call that sends no X-Request-Timeout header, in seconds; 0 = none",
    )
    tls_cert_file: str = _setting(
        "",
        "PEM certificate chain (server certificate first) for TLS on the main listener, with "
        "tls_key_file; reloaded when the files change; empty = plain text",
    )
    tls_key_file: str = _setting("", "unencrypted PEM private key of tls_cert_file")
    tls_client_ca_file: str = _setting(
        "",
        "PEM CA certificate(s): callers must present a client certificate they signed (mTLS); "
        "needs tls_cert_file",
    )
    auth_token_file: str = _setting(
        "",
        "file holding a bearer token every call but health checks must carry as "
        "`authorization: Bearer <token>` metadata; empty = none",
    )
    log_format: str = _setting("json", "json (one object per line, with trace ids) or text")
    log_inputs: bool = _setting(
        default=False,
        help="put request text in trace spans; off by default, since it may be personal data",
    )
    verify_checksums: bool = _setting(
        default=True, help="check every model file's sha256 against the manifest at load"
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")

    def model_device(self, model: ModelSettings) -> str:
        """The device a model runs on."""
        return model.device or self.device

    def model_backend(self, model: ModelSettings) -> str:
        """The backend a model asks for (auto, onnx or torch)."""
        return model.backend or self.backend

    def model_dtype(self, model: ModelSettings) -> str:
        """The torch dtype setting of a model."""
        return model.torch_dtype or self.torch_dtype

    def model_threads(self, model: ModelSettings) -> int:
        """The ONNX Runtime intra-op thread count of a model (0 = one per core)."""
        return self.intra_op_threads if model.intra_op_threads is None else model.intra_op_threads

    @property
    def adaptive_passes(self) -> bool:
        """Whether forward passes adapt their threads to the queue (inference_workers 0)."""
        return self.inference_workers == 0

    def pass_threads(self, model: ModelSettings) -> int:
        """The threads a model's full-width pass runs on. Adapting passes count the cores
        this process may use (its CPU quota included) rather than leave ONNX Runtime to
        count the machine's."""
        threads = self.model_threads(model)
        return threads or (cpu_count() if self.adaptive_passes else 0)


def check_transport_security(settings: Settings) -> None:
    """Refuse a half-configured TLS (the files themselves are read when the server starts)."""
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        given, missing = (
            ("tls_cert_file", "tls_key_file")
            if settings.tls_cert_file
            else ("tls_key_file", "tls_cert_file")
        )
        raise ConfigError(
            f"{given} is set but {missing} is not: TLS needs both the certificate chain and "
            "its private key (or neither, for plain text)"
        )
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        raise ConfigError(
            "tls_client_ca_file is set but TLS is not: client certificates are checked only "
            "over TLS, so set tls_cert_file and tls_key_file too"
        )


def is_local_address(address: str) -> bool:
    """Whether a listen or dial address stays on this host: a Unix socket, localhost, or a
    loopback IP (127.0.0.0/8, ::1). Other host names and wildcards (0.0.0.0, [::]) do not."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    # Client targets may name their resolver: ipv4:, ipv6:, dns:[//authority/]host:port.
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        address = address.removeprefix(scheme)
    if address.startswith("//"):
        address = address[2:].partition("/")[2]
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def parse_model_spec(spec: str) -> ModelSettings:
    """Parse "path" or "name=path" (the --model flag and SIDECAR_MODELS entries)."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty model spec: give a model dir path, or name=path")
    name, sep, path = spec.partition("=")
    if not sep:
        return ModelSettings(path=Path(spec))
    if not name or not path:
        raise ConfigError(f"model spec {spec!r} must look like name=path/to/model-dir")
    return ModelSettings(path=Path(path), name=name)


def _model_from_yaml(entry: Any) -> ModelSettings:
    if isinstance(entry, str):
        return parse_model_spec(entry)
    if not isinstance(entry, Mapping) or "path" not in entry:
        raise ConfigError(f"each entry of 'models' needs a 'path'; got {entry!r}")
    hints = get_type_hints(ModelSettings)
    unknown = set(entry) - set(hints)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in a 'models' entry; known: {sorted(hints)}"
        )
    values = {k: _coerce(f"models.{k}", v, hints[k]) for k, v in entry.items() if k != "path"}
    return ModelSettings(path=Path(str(entry["path"])), **values)


def _scalar_type(annotation: Any) -> type:
    """The concrete type behind `int`, `str | None` and the like."""
    if get_origin(annotation) in (Union, types.UnionType):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _scalar_type(inner)
    if not isinstance(annotation, type):
        raise TypeError(f"unsupported settings type {annotation!r}")
    return annotation


def _coerce(name: str, raw: Any, annotation: Any) -> Any:
    if raw is None:
        return None
    kind = _scalar_type(annotation)
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (int, float) and isinstance(raw, bool):
            raise ValueError(raw)
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)  # never round 2.9 down to 2 silently
        value = kind(raw)
        if kind is float and not math.isfinite(value):
            raise ValueError(raw)
        return value
    except (ValueError, TypeError):
        raise ConfigError(f"setting {name!r}: {raw!r} is not a valid {kind.__name__}") from None


def _check_ranges(settings: Settings) -> None:
    positive = (
        "max_client_batch_size",
        "max_message_bytes",
        "max_metadata_bytes",
        "stream_max_in_flight",
        "max_batch_tokens",
        "max_batch_size",
        "max_queue_size",
        "max_concurrent_requests",
        "max_concurrent_generations",
        "max_decode_batch_size",
        "max_rerank_passages",
    )
    for name in positive:
        if getattr(settings, name) < 1:
            raise ConfigError(f"setting {name!r} must be at least 1, got {getattr(settings, name)}")
    for name in (
        "intra_op_threads",
        "inference_workers",
        "grace_period_s",
        "max_batch_delay_ms",
        "max_connection_age_s",
        "http_timeout_s",
        "result_cache_bytes",
    ):
        if getattr(settings, name) < 0:
            raise ConfigError(
                f"setting {name!r} must not be negative, got {getattr(settings, name)}"
            )


def _check_grpc_limits(settings: Settings) -> None:
    # gRPC holds both in a C int (the age in milliseconds).
    if settings.max_message_bytes > 2**31 - 1:
        raise ConfigError(
            f"max_message_bytes {settings.max_message_bytes} is over gRPC's limit of {2**31 - 1}"
        )
    if settings.max_metadata_bytes < 1024:
        raise ConfigError(
            f"max_metadata_bytes {settings.max_metadata_bytes} is below 1024: every call "
            "carries a few hundred bytes of metadata (user-agent, deadline, traceparent)"
        )
    if settings.max_metadata_bytes * 4 > 2**31 - 1:
        raise ConfigError(
            f"max_metadata_bytes {settings.max_metadata_bytes} is over the limit of "
            f"{(2**31 - 1) // 4} (gRPC holds 4 times it in a C int)"
        )
    if settings.max_connection_age_s * 1000 > 2**31 - 1:
        raise ConfigError(
            f"max_connection_age_s {settings.max_connection_age_s} is over gRPC's limit of "
            f"{(2**31 - 1) // 1000} s"
        )


def _check_queue(settings: Settings) -> None:
    if settings.max_queue_size < settings.max_client_batch_size:
        raise ConfigError(
            f"max_queue_size {settings.max_queue_size} is below max_client_batch_size "
            f"{settings.max_client_batch_size}: a full-size call could never be queued"
        )
    if settings.max_queue_size < settings.max_rerank_passages:
        raise ConfigError(
            f"max_queue_size {settings.max_queue_size} is below max_rerank_passages "
            f"{settings.max_rerank_passages}: a full Rerank call could never be queued"
        )


def _check_logging(settings: Settings) -> None:
    if settings.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format {settings.log_format!r} is not one of json, text")
    if settings.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level {settings.log_level!r} is not one of {', '.join(LOG_LEVELS)}")


def _check_models(settings: Settings) -> None:
    for model in settings.models:
        parse_device(settings.model_device(model))
        if settings.model_backend(model) not in BACKENDS:
            raise ConfigError(
                f"backend {settings.model_backend(model)!r} of model {model.path} is not one of "
                f"{', '.join(BACKENDS)}"
            )
        if settings.model_dtype(model) not in TORCH_DTYPES:
            raise ConfigError(
                f"torch_dtype {settings.model_dtype(model)!r} of model {model.path} is not one "
                f"of {', '.join(TORCH_DTYPES)}"
            )
        if settings.model_threads(model) < 0:
            raise ConfigError(f"intra_op_threads of model {model.path} must not be negative")
    if not settings.models:
        raise ConfigError(
            "no model to serve: pass --model path/to/model-dir (or name=path), "
            "set SIDECAR_MODELS, or list 'models' in the config file"
        )


def _validate(settings: Settings) -> Settings:
    """The settings, once every check passed (each names the setting at fault)."""
    _check_ranges(settings)
    _check_grpc_limits(settings)
    _check_queue(settings)
    check_transport_security(settings)
    _check_logging(settings)
    _check_models(settings)
    return settings


def _from_file(path: Path) -> tuple[dict[str, Any], tuple[ModelSettings, ...] | None]:
    """The settings a config file holds, and its models (None when it lists none)."""
    hints = _hints()
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    unknown = set(loaded) - set(hints)
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in {path}; known: {sorted(hints)}")
    merged = {
        name: _coerce(name, loaded[name], hints[name]) for name in _scalar_names() if name in loaded
    }
    entries = loaded.get("models") or []
    if not isinstance(entries, list):
        raise ConfigError(f"'models' in {path} must be a list of model dirs or mappings")
    return merged, tuple(_model_from_yaml(m) for m in entries)


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], tuple[ModelSettings, ...] | None]:
    """The settings SIDECAR_* variables hold, and SIDECAR_MODELS (None when unset)."""
    hints = _hints()
    merged: dict[str, Any] = {}
    for name in _scalar_names():
        raw = env.get(f"{ENV_PREFIX}{name.upper()}")
        # An empty variable is unset, except for text settings where empty means something
        # (SIDECAR_METRICS_ADDRESS= turns off the endpoint an image's default turned on).
        if raw is not None and (raw != "" or _scalar_type(hints[name]) is str):
            merged[name] = _coerce(name, raw, hints[name])
    models = None
    if env.get(f"{ENV_PREFIX}MODELS"):
        models = tuple(parse_model_spec(s) for s in env[f"{ENV_PREFIX}MODELS"].split(","))
    return merged, models


def _from_flags(
    flags: Mapping[str, Any],
) -> tuple[dict[str, Any], tuple[ModelSettings, ...] | None]:
    """The settings given as flags (None values are not given), and --model ones."""
    hints = _hints()
    merged: dict[str, Any] = {}
    models = None
    for name, value in flags.items():
        if value is None:
            continue
        if name == "models":
            models = tuple(parse_model_spec(s) for s in value) if value else None
        elif name in hints:
            merged[name] = _coerce(name, value, hints[name])
        else:
            raise ConfigError(f"unknown setting {name!r}")
    return merged, models


@functools.cache
def _hints() -> dict[str, Any]:
    """The settings' types, resolved once."""
    return get_type_hints(Settings)


@functools.cache
def _scalar_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Settings) if f.name != "models")


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge the three sources over the defaults, validate, and return the settings.

    `flags` holds only the flags the user gave (None values are ignored); `env` defaults
    to os.environ; the file is `config_file`, else $SIDECAR_CONFIG, else none. Each source
    overrides the one before it, setting by setting; a source that lists models replaces
    the models of the ones before it.
    """
    env = os.environ if env is None else env
    path = config_file or (
        Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else None
    )
    merged: dict[str, Any] = {}
    models: tuple[ModelSettings, ...] = ()
    sources = [_from_file(path)] if path is not None else []
    sources += [_from_env(env), _from_flags(flags or {})]
    for values, listed in sources:
        merged.update(values)
        models = listed if listed is not None else models
    return _validate(dataclasses.replace(Settings(), models=models, **merged))
