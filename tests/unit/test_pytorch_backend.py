"""PyTorch backend: dtype and device choice (CUDA faked where needed), loading, lazy import."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sidecar.errors import ConfigError, ModelLoadError
from sidecar.models.manifest import Task
from sidecar.runtime.pytorch import (
    TorchBackend,
    TorchCausalDecoder,
    TorchSeq2SeqDecoder,
    torch_device,
    torch_dtype,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CUDA devices without bfloat16, as torch would report them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: False)


@pytest.mark.parametrize(
    ("device", "setting", "expected"),
    [
        ("cpu", "auto", torch.float32),
        ("cpu", "float32", torch.float32),
        ("cpu", "bfloat16", torch.bfloat16),
        ("cuda", "auto", torch.float16),
        ("cuda:1", "float16", torch.float16),
        ("cuda:0", "float32", torch.float32),
    ],
)
def test_dtype_choice(device: str, setting: str, expected: torch.dtype) -> None:
    assert torch_dtype(device, setting) == expected


def test_float16_on_cpu_is_refused_with_an_alternative() -> None:
    with pytest.raises(ConfigError, match=r"float16 on CPU .* use float32, or bfloat16"):
        torch_dtype("cpu", "float16")


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ConfigError, match="'fp8' is not one of auto, float32, float16, bfloat16"):
        torch_dtype("cpu", "fp8")


@pytest.mark.usefixtures("fake_gpus")
def test_bfloat16_on_a_gpu_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"no native bfloat16 support .* use dtype float16"):
        torch_dtype("cuda:1", "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: True)
    assert torch_dtype("cuda:1", "bfloat16") == torch.bfloat16


@pytest.mark.usefixtures("fake_gpus")
def test_cuda_devices_resolve_to_their_index() -> None:
    assert torch_device("cuda") == torch.device("cuda", 0)
    assert torch_device("cuda:1") == torch.device("cuda", 1)
    assert torch_device("cpu") == torch.device("cpu")


@pytest.mark.usefixtures("fake_gpus")
def test_cuda_index_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'cuda:2' does not exist: .* 2 CUDA .*cuda:0 to cuda:1"):
        torch_device("cuda:2")


def test_cuda_on_a_cpu_only_torch_build_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match="CPU-only: install a CUDA build of torch"):
        torch_device("cuda")
    with pytest.raises(ConfigError, match="CPU-only"):
        TorchCausalDecoder(Path("unused"), "cuda:0")


def test_cuda_build_without_a_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ConfigError, match="sees no CUDA GPU: check the driver"):
        torch_device("cuda:0")


def test_bad_device_string() -> None:
    with pytest.raises(ConfigError, match="is not one of cpu, cuda"):
        torch_device("gpu")


def test_sdpa_attention_for_bert_and_gpt2(classifier_source: Path, gpt2_source: Path) -> None:
    backend = TorchBackend(classifier_source, Task.CLASSIFY, "cpu")
    assert (backend.name, backend.device, backend.dtype) == ("torch", "cpu", "float32")
    assert backend.attention == "sdpa"
    assert TorchCausalDecoder(gpt2_source, "cpu").attention == "sdpa"


def test_eager_attention_where_the_architecture_has_no_sdpa(tmp_path: Path) -> None:
    from transformers import ElectraConfig, ElectraForSequenceClassification

    config = ElectraConfig(
        vocab_size=40,
        embedding_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    ElectraForSequenceClassification(config).save_pretrained(tmp_path)
    backend = TorchBackend(tmp_path, Task.CLASSIFY, "cpu")
    assert backend.attention == "eager"
    assert backend.input_names == ("input_ids", "attention_mask", "token_type_ids")


def test_pickle_weights_are_never_loaded(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    BertModel(config).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file()
    with pytest.raises(ModelLoadError, match=r"PyTorch cannot load .*model\.safetensors"):
        TorchBackend(tmp_path, Task.EMBED, "cpu")


def test_missing_dir_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="PyTorch cannot load"):
        TorchSeq2SeqDecoder(tmp_path / "absent", "cpu", decoder_start_token_id=2)


def test_generation_tasks_are_not_a_backend(gpt2_source: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"runs encoder models \(embed, classify, token"):
        TorchBackend(gpt2_source, Task.GENERATE, "cpu")


@pytest.mark.parametrize(
    ("source", "task", "head"),
    [
        ("token_classifier_source", Task.EXTRACT_ENTITIES, "AutoModelForTokenClassification"),
        ("cross_encoder_source", Task.RERANK, "AutoModelForSequenceClassification"),
        ("nli_source", Task.ZERO_SHOT, "AutoModelForSequenceClassification"),
    ],
)
def test_encoder_tasks_give_the_transformers_logits(
    source: str, task: Task, head: str, request: pytest.FixtureRequest
) -> None:
    import numpy as np
    import transformers

    path: Path = request.getfixturevalue(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    # Pairs for the pair tasks, as the sidecar feeds them; padded, so the mask matters.
    texts = ["Refund not received.", "The app crashes when I open the settings page."]
    batch = tokenizer(texts, texts[::-1], padding=True, return_tensors="np")
    model = getattr(transformers, head).from_pretrained(path).eval()
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

    backend = TorchBackend(path, task, "cpu")
    logits = backend.run(dict(batch))["logits"]
    labels = len(model.config.id2label)
    shape = (
        (2, batch["input_ids"].shape[1], labels) if task is Task.EXTRACT_ENTITIES else (2, labels)
    )
    assert logits.shape == expected.shape == shape
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_serving_path_does_not_import_torch() -> None:
    code = (
        "import sys, sidecar.server, sidecar.serving.loader; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
