"""Choosing the next batch from the queued inputs: pure arithmetic on token counts."""

from __future__ import annotations

from collections.abc import Sequence

# An input joins a batch only while the padded tokens it adds are at most this many times
# its own tokens. On a CPU a bigger batch buys little and padding costs its full price, so
# an 8-token input is not worth padding to 256; it runs in a batch of its own kind instead.
MAX_ADDED_COST = 1.25


def plan(lengths: Sequence[int], max_tokens: int, max_size: int) -> list[int]:
    """Positions (in `lengths`, oldest first) of the inputs to run next.

    The oldest input always runs, so nothing starves; it is joined by the inputs nearest
    to it in length while the padded batch (count x longest) fits `max_tokens`, the count
    fits `max_size`, and each one pays for its padding (MAX_ADDED_COST). Only the oldest
    `max_size` inputs are candidates: reordering further back would let new inputs of a
    popular length overtake old ones again and again, which stretches the latency tail.
    """
    lengths = lengths[:max_size]
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    anchor = order.index(0)
    low, high = anchor, anchor  # the chosen inputs are order[low : high + 1]
    width, count = lengths[0], 1
    while count < max_size:
        options: list[tuple[float, int, int]] = []  # (cost per own token, side, new width)
        if low > 0:
            shorter = lengths[order[low - 1]]
            options.append((width / max(shorter, 1), -1, width))
        if high < len(order) - 1:
            longer = lengths[order[high + 1]]
            added = (count + 1) * longer - count * width
            options.append((added / max(longer, 1), 1, longer))
        for ratio, side, new_width in sorted(options):
            if ratio <= MAX_ADDED_COST and (count + 1) * new_width <= max_tokens:
                low, high = (low - 1, high) if side < 0 else (low, high + 1)
                width, count = new_width, count + 1
                break
        else:
            break
    return sorted(order[low : high + 1])
