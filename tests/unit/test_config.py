"""Settings: precedence flags > env > file, parsing and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ModelSettings, Settings, load_settings, parse_model_spec
from sidecar.errors import ConfigError


def test_defaults_are_loopback_and_need_a_model() -> None:
    assert Settings().address == "127.0.0.1:50051"
    with pytest.raises(ConfigError, match="no model to serve: pass --model"):
        load_settings({}, env={})


def test_flags_override_env_override_file(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "address: 0.0.0.0:7000\nmax_client_batch_size: 8\ngrace_period_s: 3\n"
        "models:\n  - {path: /m/a, name: a, device: cpu}\n  - b=/m/b\n"
    )
    env = {
        "SIDECAR_CONFIG": str(config),
        "SIDECAR_MAX_CLIENT_BATCH_SIZE": "16",
        "SIDECAR_GRACE_PERIOD_S": "4.5",
    }
    settings = load_settings({"grace_period_s": "7", "address": None}, env=env)
    assert settings.address == "0.0.0.0:7000"  # file
    assert settings.max_client_batch_size == 16  # env over file
    assert settings.grace_period_s == 7.0  # flag over env
    assert settings.models == (
        ModelSettings(path=Path("/m/a"), name="a", device="cpu"),
        ModelSettings(path=Path("/m/b"), name="b"),
    )
    flagged = load_settings({"models": ["c=/m/c"]}, env=env)
    assert [m.name for m in flagged.models] == ["c"]


def test_env_models_and_booleans() -> None:
    settings = load_settings(
        {}, env={"SIDECAR_MODELS": "/m/x, y=/m/y", "SIDECAR_VERIFY_CHECKSUMS": "off"}
    )
    assert [(m.name, str(m.path)) for m in settings.models] == [(None, "/m/x"), ("y", "/m/y")]
    assert settings.verify_checksums is False


def test_empty_variables_clear_text_settings_only() -> None:
    env = {
        "SIDECAR_MODELS": "/m/x",
        "SIDECAR_METRICS_ADDRESS": "",  # turns the endpoint off, over an image's default
        "SIDECAR_MAX_CLIENT_BATCH_SIZE": "",  # unset: the default
    }
    settings = load_settings({}, env=env)
    assert settings.metrics_address == ""
    assert settings.max_client_batch_size == Settings().max_client_batch_size


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SIDECAR_MAX_CLIENT_BATCH_SIZE": "lots"}, "'lots' is not a valid int"),
        ({"SIDECAR_MAX_CLIENT_BATCH_SIZE": "0"}, "must be at least 1"),
        ({"SIDECAR_DEVICE": "tpu"}, "device 'tpu' is not one of cpu, cuda"),
        ({"SIDECAR_DEVICE": "cuda:x"}, "device 'cuda:x'"),
        ({"SIDECAR_VERIFY_CHECKSUMS": "maybe"}, "'maybe' is not a valid bool"),
        ({"SIDECAR_GRACE_PERIOD_S": "nan"}, "'nan' is not a valid float"),
        ({"SIDECAR_LOG_LEVEL": "chatty"}, "log_level 'chatty' is not one of DEBUG"),
        ({"SIDECAR_MAX_BATCH_TOKENS": "0"}, "'max_batch_tokens' must be at least 1"),
        ({"SIDECAR_MAX_BATCH_DELAY_MS": "-1"}, "'max_batch_delay_ms' must not be negative"),
        ({"SIDECAR_MAX_CONCURRENT_REQUESTS": "0"}, "'max_concurrent_requests' must be at least"),
        ({"SIDECAR_MAX_MESSAGE_BYTES": "2147483648"}, "over gRPC's limit of 2147483647"),
        ({"SIDECAR_MAX_CONNECTION_AGE_S": "3000000"}, "over gRPC's limit of 2147483 s"),
        ({"SIDECAR_MAX_METADATA_BYTES": "512"}, "max_metadata_bytes 512 is below 1024"),
        ({"SIDECAR_MAX_METADATA_BYTES": "536870912"}, "over the limit of 536870911"),
        (
            {"SIDECAR_MAX_QUEUE_SIZE": "16"},
            "max_queue_size 16 is below max_client_batch_size 64: a full-size call could never",
        ),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({}, env={"SIDECAR_MODELS": "/m", **env})


def test_unknown_file_keys_are_rejected(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("adress: x\nmodels: [/m]\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['adress'\]"):
        load_settings({}, env={}, config_file=config)
    config.write_text("models:\n  - {path: /m, threads: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['threads'\]"):
        load_settings({}, env={}, config_file=config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: /m/minilm\n", "'models' in .* must be a list"),
        ("max_client_batch_size: [1]\nmodels: [/m]\n", r"\[1\] is not a valid int"),
        ("max_client_batch_size: 2.9\nmodels: [/m]\n", "2.9 is not a valid int"),
        ("models:\n  - {path: /m, intra_op_threads: lots}\n", "models.intra_op_threads"),
        ("models:\n  - {path: /m, intra_op_threads: -3}\n", "must not be negative"),
    ],
)
def test_bad_file_values(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings({}, env={}, config_file=config)


def test_model_entries_are_coerced(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("models:\n  - {path: /m, intra_op_threads: '4', device: cuda}\n")
    (model,) = load_settings({}, env={}, config_file=config).models
    assert (model.intra_op_threads, model.device) == (4, "cuda")


@pytest.mark.parametrize("spec", ["", "=path", "name="])
def test_bad_model_specs(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_model_spec(spec)


def test_per_model_device_and_threads_fall_back_to_globals() -> None:
    settings = Settings(device="cuda", intra_op_threads=3)
    own = ModelSettings(path=Path("/m"), device="cpu", intra_op_threads=1)
    plain = ModelSettings(path=Path("/m"))
    assert (settings.model_device(own), settings.model_threads(own)) == ("cpu", 1)
    assert (settings.model_device(plain), settings.model_threads(plain)) == ("cuda", 3)


def test_readme_documents_every_setting() -> None:
    from dataclasses import fields

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for item in fields(Settings):
        assert f"| `{item.name}` |" in readme, f"README's configuration table lacks {item.name}"
        assert f"SIDECAR_{item.name.upper()}" in readme


def test_readme_yaml_example_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "sidecar.yaml"
    config.write_text(example)
    settings = load_settings({}, env={}, config_file=config)
    assert settings.address == "unix:/var/run/sidecar/sidecar.sock"
    assert settings.default_model == "embedder"
    assert [(m.name, m.intra_op_threads) for m in settings.models] == [
        ("embedder", None),
        (None, 1),
        (None, None),
    ]
    summarizer = settings.models[2]
    assert (summarizer.backend, summarizer.device, summarizer.torch_dtype) == (
        "torch",
        "cuda",
        "bfloat16",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SIDECAR_TLS_CERT_FILE": "/s/tls.crt"}, "tls_cert_file is set but tls_key_file is not"),
        ({"SIDECAR_TLS_KEY_FILE": "/s/tls.key"}, "tls_key_file is set but tls_cert_file is not"),
        ({"SIDECAR_TLS_CLIENT_CA_FILE": "/s/ca.crt"}, "tls_client_ca_file is set but TLS is not"),
    ],
)
def test_half_configured_tls_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({}, env={"SIDECAR_MODELS": "/m", **env})


def test_transport_security_settings_come_from_every_source(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("tls_cert_file: /s/tls.crt\ntls_key_file: /s/tls.key\nmodels: [/m]\n")
    env = {"SIDECAR_TLS_CLIENT_CA_FILE": "/s/ca.crt", "SIDECAR_AUTH_TOKEN_FILE": "/t/token"}
    settings = load_settings({"auth_token_file": "/f/token"}, env=env, config_file=config)
    assert (settings.tls_cert_file, settings.tls_key_file) == ("/s/tls.crt", "/s/tls.key")
    assert settings.tls_client_ca_file == "/s/ca.crt"
    assert settings.auth_token_file == "/f/token"  # the flag over the environment
    # Off by default: plain text and no token, on loopback.
    defaults = Settings()
    assert defaults.tls_cert_file == defaults.tls_key_file == defaults.auth_token_file == ""


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:50051", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("unix:/var/run/sidecar/sidecar.sock", True),
        ("unix-abstract:sidecar", True),
        ("[::ffff:127.0.0.1]:50051", True),
        ("dns:///localhost:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.1.2.3:50051", False),
        ("sidecar.example:50051", False),
    ],
)
def test_which_addresses_stay_on_the_host(address: str, local: bool) -> None:
    from sidecar.config import is_local_address

    assert is_local_address(address) is local
