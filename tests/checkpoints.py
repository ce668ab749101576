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
