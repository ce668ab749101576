"""Tiny random checkpoints built locally (no Hub): a WordPiece tokenizer trained on a few
lines, and BERT classifiers small enough to export in a second."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "I was charged twice for my subscription this month.",
    "The app crashes when I open the settings page.",
    "How do I reset my password? The link expired.",
    "Refund request: order 1234 never arrived.",
    "Login fails with error 500 since the last update!",
    "Please close my account and delete my data.",
    "Café, naïve, façade: unicode text also appears in tickets.",
]
LABELS = {0: "billing", 1: "bug", 2: "account"}


def train_tokenizer(out: Path) -> int:
    """Train a small uncased WordPiece tokenizer on CORPUS; save it as a fast BERT tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        CORPUS * 4, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=64)
    fast.save_pretrained(out)
    return int(tokenizer.get_vocab_size())


def build_classifier(out: Path, multi_label: bool = False, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BertForSequenceClassification with LABELS, random weights, safetensors."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(out, safe_serialization=True)
    return out


# A ChatML-style template, so chat rendering is exercised on a model that has one.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(out: Path, specials: list[str], vocab_size: int = 400) -> dict[str, int]:
    """Train a byte-level BPE tokenizer (GPT-2 / BART style) on CORPUS; return special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "raw-tokenizer.json"))
    return {s: int(tokenizer.token_to_id(s)) for s in specials}


def _fast_tokenizer(out: Path, model_max_length: int = 128, **specials: str) -> object:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = out / "raw-tokenizer.json"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(raw)),
        model_max_length=model_max_length,
        **specials,
    )
    raw.unlink()
    return tokenizer


def build_gpt2(
    out: Path,
    seed: int = 0,
    context: int = 128,
    width: int = 32,
    layers: int = 2,
    min_new_tokens: int = 0,
) -> Path:
    """A small random GPT2LMHeadModel (2 layers, 32 wide by default) with a trained
    byte-level BPE and a chat template; EOS is not generated before `min_new_tokens`."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    ids = train_bpe_tokenizer(out, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    eos = "<|endoftext|>"
    tokenizer = _fast_tokenizer(
        out, eos_token=eos, bos_token=eos, unk_token=eos, model_max_length=context
    )
    tokenizer.chat_template = CHAT_TEMPLATE  # type: ignore[attr-defined]
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    config = GPT2Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        # Wider than the default init, so greedy decoding varies instead of repeating a token.
        initializer_range=0.2,
        bos_token_id=ids[eos],
        eos_token_id=ids[eos],
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=ids[eos],
        eos_token_id=ids[eos],
        max_new_tokens=24,
        **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}),
    ).save_pretrained(out)
    return out


def build_bart(out: Path, seed: int = 0) -> Path:
    """A 2+2-layer, 32-wide BartForConditionalGeneration with a trained byte-level BPE."""
    import torch
    from tokenizers import Tokenizer, processors
    from transformers import BartConfig, BartForConditionalGeneration

    ids = train_bpe_tokenizer(out, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    raw = Tokenizer.from_file(str(out / "raw-tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    raw.save(str(out / "raw-tokenizer.json"))
    tokenizer = _fast_tokenizer(
        out, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    config = BartConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        init_std=0.2,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        decoder_start_token_id=ids["</s>"],
        forced_eos_token_id=ids["</s>"],
    )
    torch.manual_seed(seed)
    BartForConditionalGeneration(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def build_starcoder2(out: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide Starcoder2ForCausalLM: an architecture optimum-onnx 0.1.0 has no
    ONNX export for, so it is served by the PyTorch backend."""
    import torch
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    eos = "<|endoftext|>"
    ids = train_bpe_tokenizer(out, [eos])
    tokenizer = _fast_tokenizer(out, eos_token=eos, bos_token=eos, unk_token=eos)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    config = Starcoder2Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=ids[eos],
        eos_token_id=ids[eos],
    )
    torch.manual_seed(seed)
    Starcoder2ForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out


# BIO tags of a small named-entity tagger (CoNLL-style entity types).
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-ORG", 4: "I-ORG", 5: "B-LOC", 6: "I-LOC"}
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}


def _build_bert(out: Path, head: str, labels: dict[int, str], seed: int) -> Path:
    """A 2-layer, 32-wide BERT with the named transformers head class, random weights."""
    import torch
    import transformers
    from transformers import BertConfig

    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=train_tokenizer(out),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, head)(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_token_classifier(out: Path, seed: int = 0, labels: dict[int, str] | None = None) -> Path:
    """A BertForTokenClassification tagging NER_LABELS (BIO) or `labels`: an entity extractor."""
    return _build_bert(out, "BertForTokenClassification", labels or NER_LABELS, seed)


def _sentencepiece_like(kind: str) -> object:
    """A byte-level BPE (RoBERTa) or Unigram (XLM-R) tokenizer trained on CORPUS: tokenizers
    that mark no word pieces, so entity extraction must find words the pipeline's way."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    lines = [*CORPUS, "x=None and y=None here", "Hello😀world from Zürich"] * 6
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=420,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=200, special_tokens=specials, unk_token="<unk>"
        )
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tokenizer


def build_roberta_token_classifier(out: Path, kind: str = "bpe", seed: int = 0) -> Path:
    """A RoBERTa (byte-level BPE) or XLM-R (Unigram) token classifier tagging NER_LABELS."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        RobertaConfig,
        RobertaForTokenClassification,
        XLMRobertaConfig,
        XLMRobertaForTokenClassification,
    )

    out.mkdir(parents=True, exist_ok=True)
    raw = _sentencepiece_like(kind)
    PreTrainedTokenizerFast(
        tokenizer_object=raw,
        model_max_length=60,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
    ).save_pretrained(out)
    config_class, model_class = (
        (RobertaConfig, RobertaForTokenClassification)
        if kind == "bpe"
        else (XLMRobertaConfig, XLMRobertaForTokenClassification)
    )
    config = config_class(
        vocab_size=raw.get_vocab_size(),  # type: ignore[attr-defined]
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        id2label=NER_LABELS,
        label2id={v: k for k, v in NER_LABELS.items()},
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # sharper label choices than a random head gives, so entities form
        model.classifier.weight.mul_(40)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_cross_encoder(out: Path, seed: int = 0) -> Path:
    """A BertForSequenceClassification with one output: a cross-encoder reranker scoring
    (query, passage) pairs, like cross-encoder/ms-marco-MiniLM-L6-v2. sentence-transformers
    5 marks its own saves with modules.json and config_sentence_transformers.json instead;
    plain transformers saves, like this one, have only num_labels 1 to go by."""
    return _build_bert(out, "BertForSequenceClassification", {0: "LABEL_0"}, seed)


def build_nli(out: Path, seed: int = 0) -> Path:
    """A BertForSequenceClassification with NLI_LABELS: an NLI model, as zero-shot
    classification uses it (premise, "This example is {label}.")."""
    return _build_bert(out, "BertForSequenceClassification", NLI_LABELS, seed)


GERMAN = [
    "Ich wurde diesen Monat zweimal für mein Abonnement belastet.",
    "Die App stürzt ab, wenn ich die Einstellungen öffne.",
    "Wie setze ich mein Passwort zurück? Der Link ist abgelaufen.",
    "Rückerstattung: Bestellung 1234 ist nie angekommen.",
    "Bitte schließen Sie mein Konto und löschen Sie meine Daten.",
]


def build_marian(out: Path, seed: int = 0) -> Path:
    """A 2+2-layer, 32-wide MarianMTModel with SentencePiece source and target models and a
    shared vocab.json, laid out as Helsinki-NLP's opus-mt checkpoints are (no tokenizer.json:
    transformers has no fast Marian tokenizer)."""
    import json

    import sentencepiece as spm
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

    out.mkdir(parents=True, exist_ok=True)
    # English in, German out, as an en-de model: the shared vocab.json then holds pieces only
    # the target side has, which the source side must never produce.
    sides = {"source": CORPUS * 4, "target": GERMAN * 4}
    for side, lines in sides.items():
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(out / side),
            vocab_size=100,
            hard_vocab_limit=False,
            minloglevel=2,
            model_type="unigram",
            character_coverage=1.0,
            # As opus-mt: </s> is id 0 and <unk> id 1; no BOS, and padding lives in vocab.json.
            eos_id=0,
            unk_id=1,
            bos_id=-1,
            pad_id=-1,
        )
        (out / f"{side}.model").rename(out / f"{side}.spm")
        (out / f"{side}.vocab").unlink()
    pieces: dict[str, int] = {}
    for side in ("source", "target"):
        model = spm.SentencePieceProcessor(model_file=str(out / f"{side}.spm"))
        for i in range(model.get_piece_size()):
            pieces.setdefault(model.id_to_piece(i), len(pieces))
    pieces["<pad>"] = len(pieces)
    (out / "vocab.json").write_text(json.dumps(pieces, ensure_ascii=False))
    MarianTokenizer(
        str(out / "source.spm"),
        str(out / "target.spm"),
        str(out / "vocab.json"),
        model_max_length=128,
    ).save_pretrained(out)
    pad = pieces["<pad>"]
    config = MarianConfig(
        vocab_size=len(pieces),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        init_std=0.2,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
    )
    torch.manual_seed(seed)
    MarianMTModel(config).eval().save_pretrained(out, safe_serialization=True)
    # As opus-mt: the padding token (also the decoder's start) is never generated.
    GenerationConfig(
        bad_words_ids=[[pad]],
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        pad_token_id=pad,
        max_length=40,
        num_beams=4,
    ).save_pretrained(out)
    return out


def build_gemma(out: Path, kind: str = "gemma", seed: int = 0) -> Path:
    """A 2-layer, 32-wide GemmaForCausalLM or Gemma2ForCausalLM (sliding window, soft-capped
    logits) with a trained byte-level BPE: architectures whose optimum ONNX config has no
    position_ids input."""
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GemmaConfig,
        GemmaForCausalLM,
        GenerationConfig,
    )

    ids = train_bpe_tokenizer(out, ["<pad>", "<eos>", "<bos>"])
    tokenizer = _fast_tokenizer(
        out,
        eos_token="<eos>",
        bos_token="<bos>",
        pad_token="<pad>",
        unk_token="<eos>",
        model_max_length=256,
    )
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    common = {
        "vocab_size": len(tokenizer),  # type: ignore[arg-type]
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 256,
        # Wide enough that greedy decoding varies instead of repeating one token (Gemma 2's
        # extra norms need less).
        "initializer_range": 0.5 if kind == "gemma" else 0.2,
        "pad_token_id": ids["<pad>"],
        "bos_token_id": ids["<bos>"],
        "eos_token_id": ids["<eos>"],
    }
    torch.manual_seed(seed)
    if kind == "gemma":
        model: object = GemmaForCausalLM(GemmaConfig(**common))
    else:
        config = Gemma2Config(**common, sliding_window=64, query_pre_attn_scalar=16)
        model = Gemma2ForCausalLM(config)
    model.eval().save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    GenerationConfig(
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        pad_token_id=ids["<pad>"],
        max_new_tokens=24,
    ).save_pretrained(out)
    return out


def build_bare_encoder(out: Path, kind: str, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BertModel, XLMRobertaModel or ModernBertModel without any
    sentence-transformers files: an encoder that names no pooling."""
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        ModernBertConfig,
        ModernBertModel,
        PreTrainedTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaModel,
    )

    out.mkdir(parents=True, exist_ok=True)
    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(seed)
    if kind == "xlm-roberta":
        raw = _sentencepiece_like("unigram")
        PreTrainedTokenizerFast(
            tokenizer_object=raw,
            model_max_length=60,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            cls_token="<s>",
            sep_token="</s>",
        ).save_pretrained(out)
        model: object = XLMRobertaModel(
            XLMRobertaConfig(
                vocab_size=raw.get_vocab_size(),  # type: ignore[attr-defined]
                intermediate_size=64,
                max_position_embeddings=64,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                **size,
            )
        )
    elif kind == "modernbert":
        vocab = train_tokenizer(out)
        model = ModernBertModel(
            ModernBertConfig(
                vocab_size=vocab,
                intermediate_size=64,
                max_position_embeddings=64,
                local_attention=16,
                pad_token_id=0,
                cls_token_id=2,
                sep_token_id=3,
                bos_token_id=2,
                eos_token_id=3,
                **size,
            )
        )
    else:
        vocab = train_tokenizer(out)
        model = BertModel(
            BertConfig(vocab_size=vocab, intermediate_size=64, max_position_embeddings=64, **size)
        )
    model.eval().save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    return out
