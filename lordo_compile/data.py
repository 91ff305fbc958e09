"""Byte-level text from CPython's own `pydoc_data.topics`: no download, same on every machine."""

from __future__ import annotations

import torch


def pydoc_bytes() -> torch.Tensor:
    """The help topics CPython ships, concatenated in sorted order, as a uint8 tensor."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


class ByteBatches:
    """Random windows of `block_size + 1` bytes: inputs and next-byte targets.

    The last `val_fraction` of the text is held out for validation.
    """

    def __init__(self, block_size: int = 128, val_fraction: float = 0.1, data: torch.Tensor | None = None) -> None:
        data = pydoc_bytes() if data is None else data
        split = int(len(data) * (1 - val_fraction))
        self.block_size = block_size
        self.train = data[:split].long()
        self.val = data[split:].long()

    def batch(self, batch_size: int, generator: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - self.block_size - 1, (batch_size,), generator=generator)
        windows = torch.stack([data[s : s + self.block_size + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def val_batches(self, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of validation batches (seeded), so every run is scored on the same text."""
        generator = torch.Generator().manual_seed(1234)
        return [self.batch(batch_size, generator, "val") for _ in range(count)]

    def val_split(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole held-out text as consecutive, non-overlapping windows (the last partial
        window dropped), in batches of `batch_size`: the evaluation set with no sampling noise."""
        count = (len(self.val) - 1) // self.block_size
        inputs = self.val[: count * self.block_size].view(count, self.block_size)
        targets = self.val[1 : count * self.block_size + 1].view(count, self.block_size)
        return [(inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, count, batch_size)]
