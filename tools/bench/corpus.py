"""A fixed, seeded corpus of support-ticket-like texts with exact token lengths."""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer

_VOCABULARY = """
the a my our your this that it is was not can cannot will would should please
help thanks hello again still since after before when while because but and or
account login password reset email invoice billing charge refund card payment plan
upgrade downgrade subscription order shipping delivery tracking package address
app page button screen error crash bug timeout slow fails failed broken missing
update version install android ios browser chrome safari windows mac server api
customer support ticket team manager urgent today yesterday week month twice
received charged double wrong amount cancel renew trial discount code coupon
export report dashboard data sync file upload download attachment pdf csv
notification alert message chat call phone number verify code sms two factor
settings profile name language timezone region permission access denied admin
"""
WORDS = _VOCABULARY.split()
PUNCTUATION = [".", ",", "?", "!", ":", ";"]


def _paragraph(rng: random.Random, words: int) -> str:
    out: list[str] = []
    for _ in range(words):
        out.append(rng.choice(WORDS))
        if rng.random() < 0.12:
            out[-1] += rng.choice(PUNCTUATION)
    return " ".join(out)


def build(tokenizer_file: Path, size: int, seed: int, low: int = 8, high: int = 256) -> list[str]:
    """`size` texts whose token counts (special tokens included) are uniform in [low, high]."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    special = len(tokenizer.encode("", add_special_tokens=True).ids)
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < size:
        target = rng.randint(low, high) - special
        text = _paragraph(rng, target + 8)
        encoding = tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) < target:
            continue
        # Cut at a token boundary so the text is exactly `target` tokens long.
        cut = text[: encoding.offsets[target - 1][1]]
        if len(tokenizer.encode(cut, add_special_tokens=False).ids) == target:
            texts.append(cut)
    return texts


def build_words(size: int, seed: int, low: int = 4, high: int = 64) -> list[str]:
    """`size` short texts whose word counts are uniform in [low, high], ticket-like."""
    rng = random.Random(seed)
    return [_paragraph(rng, rng.randint(low, high)) for _ in range(size)]


def with_repeats(texts: list[str], share: float, seed: int) -> list[str]:
    """The texts in order with repeats mixed in: `share` of the result repeats an earlier text.

    The load generator walks a corpus in order, so each repeat comes after the call that
    first sent its text, at a random distance, as a service's recurring questions would.
    """
    rng = random.Random(seed)
    total = round(len(texts) / (1 - share))
    repeats = set(rng.sample(range(1, total), total - len(texts)))
    fresh = iter(texts)
    out: list[str] = []
    seen: list[str] = []
    for position in range(total):
        if position in repeats:
            out.append(rng.choice(seen))
        else:
            seen.append(next(fresh))
            out.append(seen[-1])
    return out
