"""Reading a checkpoint's task, labels, pooling and limits; where it comes from; the int8
helpers (which MatMuls stay fp32, the quality measures and gate, the manifest entry)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest

from export import checkpoint, convert, generation, pipeline, quality, source
from export.errors import ExportError, ValidationError
from export.progress import Progress
from export.quantize import fp32_matmuls
from sidecar.errors import ModelLoadError
from sidecar.models.manifest import GenerationDefaults, Task, format_version, read_manifest
from sidecar.tasks import pairs


def test_minilm_is_a_normalized_mean_pooled_embedder(minilm_source: Path) -> None:
    assert checkpoint.detect_task(minilm_source) is Task.EMBED
    info = checkpoint.inspect(minilm_source, Task.EMBED)
    assert (info.max_length, info.sentence_transformers) == (256, True)
    assert (info.pooling.mode, info.pooling.normalize) == ("mean", True)  # type: ignore[union-attr]


def test_flags_override_the_checkpoint(minilm_source: Path) -> None:
    info = checkpoint.inspect(
        minilm_source, Task.EMBED, max_length=128, pooling="cls", normalize=False
    )
    assert (info.max_length, info.pooling.mode, info.pooling.normalize) == (128, "cls", False)  # type: ignore[union-attr]
    capped = checkpoint.inspect(minilm_source, Task.EMBED, max_length=4096)
    assert capped.max_length == 512  # never past the position embeddings


def test_classifier_labels_and_problem_type(
    classifier_source: Path, multilabel_source: Path
) -> None:
    assert checkpoint.detect_task(classifier_source) is Task.CLASSIFY
    info = checkpoint.inspect(classifier_source, Task.CLASSIFY)
    assert (info.labels, info.multi_label, info.max_length) == (
        ("billing", "bug", "account"),
        False,
        64,
    )
    assert checkpoint.inspect(multilabel_source, Task.CLASSIFY).multi_label is True


def write_config(path: Path, **config: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_unknown_architecture_asks_for_task(tmp_path: Path) -> None:
    ckpt = write_config(tmp_path / "c", architectures=["SomethingForImageSegmentation"])
    with pytest.raises(ExportError, match="pass --task"):
        checkpoint.detect_task(ckpt)


def test_classifier_without_labels(tmp_path: Path) -> None:
    ckpt = write_config(
        tmp_path / "c", architectures=["BertForSequenceClassification"], max_position_embeddings=32
    )
    with pytest.raises(ExportError, match="has no id2label"):
        checkpoint.inspect(ckpt, Task.CLASSIFY)


def test_combined_pooling_modes_are_refused(tmp_path: Path) -> None:
    ckpt = write_config(tmp_path / "c", max_position_embeddings=32)
    (ckpt / "modules.json").write_text(
        json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (ckpt / "1_Pooling").mkdir()
    (ckpt / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True})
    )
    with pytest.raises(ExportError, match=r"combines pooling modes \['cls', 'max'\]"):
        checkpoint.inspect(ckpt, Task.EMBED)


def test_local_dirs_and_bad_names(tmp_path: Path, classifier_source: Path) -> None:
    assert source.resolve(str(classifier_source)).path == classifier_source
    with pytest.raises(ExportError, match="--revision applies to Hub ids"):
        source.resolve(str(classifier_source), revision="main")
    with pytest.raises(ExportError, match="neither a checkpoint directory nor a Hub id"):
        source.resolve(str(tmp_path / "missing"))
    with pytest.raises(ExportError, match="holds no weights: export a transformers checkpoint"):
        source.check_weights(tmp_path, allow_pickle=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    source.check_weights(tmp_path, allow_pickle=True)


@pytest.mark.parametrize("revision", [None, "main", "v1.2", "3f1c2b7"])
def test_remote_code_needs_a_commit_pinned_revision(
    revision: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="pin --revision to a full commit sha"):
        source.resolve("acme/custom-model", revision, trust_remote_code=True)


def test_a_pinned_revision_lets_remote_code_through_to_the_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    # Past the pin check, the download is tried: offline and not cached, it says so.
    with pytest.raises(ExportError, match="not in the local Hugging Face cache"):
        source.resolve("acme/custom-model", commit, trust_remote_code=True)


def matmul_graph() -> onnx.ModelProto:
    """Square and non-square weight MatMuls, an activation x activation MatMul and a Gather."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {
        "square": np.zeros((4, 4), np.float32),
        "wide": np.zeros((4, 8), np.float32),
        "stacked": np.zeros((2, 4, 4), np.float32),
        "table": np.zeros((10, 4), np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "square"], ["a"], name="attention"),
        helper.make_node("MatMul", ["a", "wide"], ["b"], name="feed_forward"),
        helper.make_node("MatMul", ["b", "stacked"], ["c"], name="batched"),
        helper.make_node("MatMul", ["a", "a"], ["d"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return helper.make_model(graph)


def test_only_non_square_weight_matmuls_stay_fp32() -> None:
    assert fp32_matmuls(matmul_graph()) == ["feed_forward"]


def test_texts_cover_short_long_and_many_scripts() -> None:
    inputs = quality.texts()
    assert len(inputs) == len(set(inputs)) == 24
    assert min(map(len, inputs)) <= 3
    assert all(len(text) > 4000 for text in inputs[-2:])  # over 512 tokens: truncated
    assert any("\u0400" <= char <= "\u04ff" for char in "".join(inputs))  # Cyrillic
    assert any("\u4e00" <= char <= "\u9fff" for char in "".join(inputs))  # CJK


def unit_rows(*rows: list[float]) -> npt.NDArray[np.float32]:
    array = np.array(rows, np.float32)
    normalized: npt.NDArray[np.float32] = array / np.linalg.norm(array, axis=1, keepdims=True)
    return normalized


def test_embedding_quality_is_worst_and_mean_cosine() -> None:
    reference = unit_rows([1, 0], [0, 1])
    measured = quality.embedding_quality(reference, unit_rows([1, 0], [1, 1]))
    assert measured == pytest.approx({"cosine_min": 0.5**0.5, "cosine_mean": (1 + 0.5**0.5) / 2})
    broken = unit_rows([1, 0], [0, 1])
    broken[1, 0] = np.nan
    assert np.isnan(quality.embedding_quality(reference, broken)["cosine_min"])


def test_classifier_quality_is_top1_agreement_and_largest_difference() -> None:
    reference = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], np.float32)
    quantized = np.array([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32)
    measured = quality.classifier_quality(reference, quantized)
    assert measured == pytest.approx({"top1_agreement": 2 / 3, "max_abs_prob_diff": 0.2})


def test_quality_gate() -> None:
    quality.check({"cosine_min": 0.99, "sentences": 24}, Task.EMBED, 0.99, 0.9)
    with pytest.raises(ValidationError, match=r"min cosine 0.9800 over 24 sentences is below"):
        quality.check({"cosine_min": 0.98, "sentences": 24}, Task.EMBED, 0.99, 0.9)
    with pytest.raises(ValidationError, match="min cosine nan"):
        quality.check({"cosine_min": float("nan"), "sentences": 24}, Task.EMBED, 0.0, 0.9)
    quality.check({"top1_agreement": 0.9, "sentences": 24}, Task.CLASSIFY, 0.99, 0.9)
    with pytest.raises(ValidationError, match=r"agreement 87.5% over 24 sentences is below"):
        quality.check({"top1_agreement": 0.875, "sentences": 24}, Task.CLASSIFY, 0.99, 0.9)


def write_manifest(model_dir: Path, quantization: object) -> Path:
    model_dir.mkdir()
    data = {
        "format_version": 2,
        "name": "m",
        "task": "feature-extraction",
        "onnx_file": "model.onnx",
        "source": {"path": "/ckpt"},
        "max_length": 8,
        "files": {},
        "quantization": quantization,
    }
    (model_dir / "manifest.json").write_text(json.dumps(data))
    return model_dir


def test_manifest_reads_both_quantization_forms(tmp_path: Path) -> None:
    plain = read_manifest(write_manifest(tmp_path / "fp32", "none"))
    assert (plain.quantization, plain.quantization_quality) == ("none", {})
    entry = {"mode": "int8-dynamic", "quality": {"cosine_min": 0.995, "sentences": 24}}
    quantized = read_manifest(write_manifest(tmp_path / "int8", entry))
    assert quantized.quantization == "int8-dynamic"
    assert quantized.quantization_quality == {"cosine_min": 0.995, "sentences": 24}
    assert read_manifest(write_manifest(tmp_path / "old", None)).quantization == "none"
    embed = {"task": "feature-extraction", "onnx_file": "model.onnx"}
    assert format_version({**embed, "quantization": "none"}) == 1
    assert format_version({**embed, "quantization": entry}) == 2
    assert format_version({**embed, "weights": ["model.safetensors"]}) == 3
    assert format_version({**embed, "onnx_file": ""}) == 3
    assert format_version({"task": "text-generation", "onnx_file": "model.onnx"}) == 3
    with pytest.raises(ModelLoadError, match=r"malformed \(KeyError: 'mode'\)"):
        read_manifest(write_manifest(tmp_path / "bad", {"quality": {}}))


@pytest.mark.parametrize(
    ("config", "task"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, Task.GENERATE),
        ({"architectures": ["LlamaForCausalLM"]}, Task.GENERATE),
        (
            {"architectures": ["BartForConditionalGeneration"], "is_encoder_decoder": True},
            Task.SEQ2SEQ,
        ),
        ({"architectures": ["MarianMTModel"], "is_encoder_decoder": True}, Task.SEQ2SEQ),
        ({"architectures": ["GPT2Model"]}, Task.EMBED),
    ],
)
def test_generative_tasks_are_detected(
    tmp_path: Path, config: dict[str, object], task: Task
) -> None:
    assert checkpoint.detect_task(write_config(tmp_path / "c", **config)) is task


def test_conditional_generation_without_an_encoder_decoder_asks_for_task(tmp_path: Path) -> None:
    ckpt = write_config(tmp_path / "c", architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(ExportError, match="pass --task"):
        checkpoint.detect_task(ckpt)


def write_tokenizer_limit(path: Path, limit: int) -> None:
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": limit}))


def test_generative_max_length_is_the_context(tmp_path: Path) -> None:
    gpt2 = write_config(tmp_path / "gpt2", n_positions=1024, eos_token_id=0)
    assert checkpoint.inspect(gpt2, Task.GENERATE).max_length == 1024
    write_tokenizer_limit(gpt2, 256)  # a real tokenizer limit bounds it
    assert checkpoint.inspect(gpt2, Task.GENERATE).max_length == 256
    write_tokenizer_limit(gpt2, 1_000_000_000_000_000_019_884_624_838_656)  # "no limit"
    assert checkpoint.inspect(gpt2, Task.GENERATE).max_length == 1024
    assert checkpoint.inspect(gpt2, Task.GENERATE, max_length=4096).max_length == 1024
    ctrl = write_config(tmp_path / "ctrl", n_ctx=256)
    assert checkpoint.inspect(ctrl, Task.GENERATE).max_length == 256


def test_relative_position_models_use_the_tokenizer_limit_or_512(tmp_path: Path) -> None:
    # T5 configs carry n_positions, which the model does not use.
    t5 = write_config(
        tmp_path / "t5", relative_attention_num_buckets=32, n_positions=64, decoder_start_token_id=0
    )
    assert checkpoint.inspect(t5, Task.SEQ2SEQ).max_length == 512
    write_tokenizer_limit(t5, 1024)
    assert checkpoint.inspect(t5, Task.SEQ2SEQ).max_length == 1024


def test_generation_defaults_come_from_generation_config(tmp_path: Path) -> None:
    ckpt = write_config(tmp_path / "c", n_positions=128, eos_token_id=9, do_sample=True)
    (ckpt / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": [1, 2],
                "max_new_tokens": 24,
                "temperature": 0.7,
                # Marian's padding token is a bad word; Whisper-style models suppress tokens.
                "bad_words_ids": [[5], [6, 7]],
                "suppress_tokens": [3],
                "num_beams": 4,
            }
        )
    )
    info = checkpoint.inspect(ckpt, Task.GENERATE)
    generation = info.generation
    assert generation == {
        "max_new_tokens": 24,
        # The file wins whole, as in transformers: config.json's do_sample is not merged in.
        "do_sample": False,
        "temperature": 0.7,
        "top_k": 50,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,
        "eos_token_ids": [1, 2],
        "pad_token_id": None,
        "bos_token_id": None,
        "decoder_start_token_id": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "suppressed_token_ids": [3, 5],
    }
    assert GenerationDefaults.from_json(generation).eos_token_ids == (1, 2)
    assert GenerationDefaults.from_json(generation).suppressed_token_ids == (3, 5)
    # What the sidecar cannot honour is said at export.
    assert any("sequences of more than one token" in note for note in info.notes)
    assert any("beam search (num_beams 4)" in note for note in info.notes)


def test_generation_defaults_fall_back_to_config(tmp_path: Path) -> None:
    ckpt = write_config(
        tmp_path / "c", n_positions=128, eos_token_id=9, do_sample=True, max_length=50
    )
    generation = checkpoint.inspect(ckpt, Task.GENERATE).generation
    assert generation is not None
    assert (generation["eos_token_ids"], generation["do_sample"]) == ([9], True)
    # A decoder-only max_length counts the prompt: no max_new_tokens follows from it.
    assert generation["max_new_tokens"] == 127  # 256, bounded by the context


def test_seq2seq_lengths_count_the_decoder_start_token(tmp_path: Path) -> None:
    ckpt = write_config(
        tmp_path / "c",
        max_position_embeddings=1024,
        bos_token_id=0,
        max_length=142,
        min_length=56,
        no_repeat_ngram_size=3,
    )
    generation = checkpoint.inspect(ckpt, Task.SEQ2SEQ).generation
    assert generation is not None
    assert (generation["max_new_tokens"], generation["min_new_tokens"]) == (141, 55)
    assert generation["no_repeat_ngram_size"] == 3
    # transformers starts the decoder on BOS when no start token is named.
    assert generation["decoder_start_token_id"] == 0
    nothing = write_config(tmp_path / "n", max_position_embeddings=64)
    with pytest.raises(ExportError, match="neither decoder_start_token_id nor bos_token_id"):
        checkpoint.inspect(nothing, Task.SEQ2SEQ)


def test_chat_template_is_normalised_to_a_jinja_file(tmp_path: Path) -> None:
    assert generation.write_chat_template(tmp_path) == ""
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert generation.write_chat_template(tmp_path) == "chat_template.jinja"
    assert (tmp_path / "chat_template.jinja").read_text() == "{{ messages }}"

    several = tmp_path / "several"
    several.mkdir()
    templates = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "chat"},
    ]
    (several / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert generation.write_chat_template(several) == "chat_template.jinja"
    assert (several / "chat_template.jinja").read_text() == "chat"

    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    (unnamed / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates[:1]}))
    assert generation.write_chat_template(unnamed) == ""  # transformers would not pick one


def test_optimum_support_is_asked_of_optimum(tmp_path: Path) -> None:
    assert (
        convert.unsupported(write_config(tmp_path / "gpt2", model_type="gpt2"), Task.GENERATE)
        is None
    )
    bart = write_config(tmp_path / "bart", model_type="bart")
    assert convert.unsupported(bart, Task.SEQ2SEQ) is None
    assert "no ONNX export for model type 'starcoder2'" in str(
        convert.unsupported(write_config(tmp_path / "s", model_type="starcoder2"), Task.GENERATE)
    )
    gpt2 = write_config(tmp_path / "g", model_type="gpt2")
    assert "not as text2text-generation-with-past" in str(convert.unsupported(gpt2, Task.SEQ2SEQ))


def test_backend_plan(tmp_path: Path) -> None:
    ckpt = write_config(tmp_path / "c", model_type="starcoder2")
    (ckpt / "model.safetensors").write_bytes(b"")
    info = checkpoint.CheckpointInfo(task=Task.EMBED, max_length=32)
    lines = io.StringIO()
    planned = pipeline._plan("auto", ckpt, info, int8=False, progress=Progress(5, lines))
    assert planned == (False, True)
    assert "falling back to the PyTorch backend" in lines.getvalue()
    with pytest.raises(ExportError, match="--quantize int8 needs an ONNX model"):
        pipeline._plan("auto", ckpt, info, int8=True, progress=Progress(5, lines))
    with pytest.raises(ExportError, match="pass --backend torch"):
        pipeline._plan("onnx", ckpt, info, int8=False, progress=Progress(5, lines))
    planned = pipeline._plan("torch", ckpt, info, int8=False, progress=Progress(5, lines))
    assert planned == (False, True)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="convert the checkpoint to safetensors"):
        pipeline._plan("torch", ckpt, info, int8=False, progress=Progress(5, lines))


def test_backend_and_int8_flags_are_checked_first(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--backend 'tpu' is not one of auto, onnx, torch, both"):
        pipeline.export_model("missing", tmp_path / "out", backend="tpu")
    with pytest.raises(ExportError, match="--backend torch has none"):
        pipeline.export_model("missing", tmp_path / "out", backend="torch", quantize="int8")
    assert list(tmp_path.iterdir()) == []


BERT = {"model_type": "bert", "max_position_embeddings": 64}


@pytest.mark.parametrize(
    ("config", "task"),
    [
        (
            {"architectures": ["BertForTokenClassification"], "id2label": {"0": "O"}},
            Task.EXTRACT_ENTITIES,
        ),
        (
            {
                "architectures": ["DebertaV2ForSequenceClassification"],
                "id2label": {"0": "ENTAILMENT", "1": "NEUTRAL", "2": "CONTRADICTION"},
            },
            Task.ZERO_SHOT,
        ),
        (
            {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"}},
            Task.RERANK,
        ),
        # Older configs spell num_labels out; it wins over a default two-label id2label.
        (
            {
                "architectures": ["BertForSequenceClassification"],
                "num_labels": 1,
                "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
            },
            Task.RERANK,
        ),
        (
            {
                "architectures": ["BertForSequenceClassification"],
                "id2label": {"0": "negative", "1": "positive"},
            },
            Task.CLASSIFY,
        ),
    ],
)
def test_encoder_heads_are_detected(tmp_path: Path, config: dict[str, object], task: Task) -> None:
    assert checkpoint.detect_task(write_config(tmp_path / "c", **BERT, **config)) is task


def test_builders_are_detected(
    token_classifier_source: Path, cross_encoder_source: Path, nli_source: Path
) -> None:
    assert checkpoint.detect_task(token_classifier_source) is Task.EXTRACT_ENTITIES
    assert checkpoint.detect_task(cross_encoder_source) is Task.RERANK
    assert checkpoint.detect_task(nli_source) is Task.ZERO_SHOT


def test_sentence_transformers_cross_encoders_are_not_embedders(tmp_path: Path) -> None:
    # What sentence-transformers 5's CrossEncoder.save writes beside the transformers files.
    head = {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    ckpt = write_config(tmp_path / "st5", **BERT, **head)
    (ckpt / "modules.json").write_text(
        json.dumps(
            [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.Transformer"}]
        )
    )
    (ckpt / "config_sentence_transformers.json").write_text(
        json.dumps({"model_type": "CrossEncoder", "activation_fn": "torch.nn.Sigmoid"})
    )
    assert checkpoint.detect_task(ckpt) is Task.RERANK
    # An NLI cross-encoder (cross-encoder/nli-*) is still an NLI model.
    nli = {**head, "id2label": {"0": "contradiction", "1": "entailment", "2": "neutral"}}
    write_config(ckpt, **BERT, **nli)
    assert checkpoint.detect_task(ckpt) is Task.ZERO_SHOT
    # sentence-transformers 4 marked the config.json itself, without modules.json.
    legacy = write_config(
        tmp_path / "st4", **BERT, **head, sentence_transformers={"activation_fn": "x"}
    )
    assert checkpoint.detect_task(legacy) is Task.RERANK


def test_encoder_task_labels(
    token_classifier_source: Path, cross_encoder_source: Path, nli_source: Path
) -> None:
    ner = checkpoint.inspect(token_classifier_source, Task.EXTRACT_ENTITIES)
    assert ner.labels == ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
    assert (ner.max_length, ner.multi_label) == (64, False)
    assert checkpoint.inspect(cross_encoder_source, Task.RERANK).labels == ("LABEL_0",)
    nli = checkpoint.inspect(nli_source, Task.ZERO_SHOT).labels
    assert nli == ("contradiction", "neutral", "entailment")
    assert pairs.entailment_id(nli) == 2


def test_forced_pair_tasks_need_matching_outputs(classifier_source: Path, nli_source: Path) -> None:
    with pytest.raises(ExportError, match=r"has no entailment label .* starting with 'entail'"):
        checkpoint.inspect(classifier_source, Task.ZERO_SHOT)
    with pytest.raises(ExportError, match=r"has 3 outputs .* single relevance score"):
        checkpoint.inspect(nli_source, Task.RERANK)
    # An NLI model may still be served as a plain 3-way classifier of single texts.
    assert checkpoint.inspect(nli_source, Task.CLASSIFY).labels[2] == "entailment"


@pytest.mark.parametrize("task", [Task.EXTRACT_ENTITIES, Task.RERANK, Task.ZERO_SHOT])
def test_int8_is_refused_for_tasks_without_a_quality_measure(tmp_path: Path, task: Task) -> None:
    info = checkpoint.CheckpointInfo(task=task, max_length=32, labels=("a",))
    with pytest.raises(ExportError, match=f"embedding and classification models only, not {task}"):
        pipeline._plan("onnx", tmp_path, info, int8=True, progress=Progress(5, io.StringIO()))


def test_encoder_tasks_export_with_optimum(tmp_path: Path) -> None:
    bert = write_config(tmp_path / "bert", model_type="bert")
    for task in (Task.EXTRACT_ENTITIES, Task.RERANK, Task.ZERO_SHOT):
        assert convert.unsupported(bert, task) is None
        assert convert.SERVED[task] == ("model.onnx", "")
    assert convert.OPTIMUM_TASKS[Task.EXTRACT_ENTITIES] == "token-classification"
