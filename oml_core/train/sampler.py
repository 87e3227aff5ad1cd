"""Length-grouped training order that reads row lengths as it goes.

`transformers`' LengthGroupedSampler reads the length of every row before the first step. Our
index space is `max_epochs` x (fingerprints + benign rows) and each row is rendered to learn
its length, so at N = 8,192 that pre-pass took ~100 s, and most of it is wasted: training
stops once every fingerprint is memorised, usually long before `max_epochs`.

This sampler draws the same random permutation (`torch.randperm` from the same generator, at
the same moment: the start of iteration) and cuts it into the same mega-batches of 50 batches
sorted longest first, but reads a mega-batch's lengths only when iteration reaches it. The one
difference: `transformers` also swaps the longest row of the whole run into the first batch
(to fail on memory at once); here the first batch holds the longest row of the first
mega-batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized


def mega_batch_size(num_rows: int, batch_size: int) -> int:
    """50 batches, or fewer so that there are at least 4 mega-batches (transformers' rule)."""
    return max(1, min(num_rows // (batch_size * 4), 50)) * batch_size


class LengthGroupedAsItGoes:
    """Sampler over `dataset` (rows are dicts with "input_ids") for `batch_size` rows per
    optimizer step (per-device batch x gradient accumulation)."""

    def __init__(self, dataset: Sized, batch_size: int, generator=None):
        self.dataset, self.batch_size, self.generator = dataset, batch_size, generator

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        import torch

        order = torch.randperm(len(self.dataset), generator=self.generator).tolist()
        size = mega_batch_size(len(order), self.batch_size)
        for start in range(0, len(order), size):
            mega = order[start:start + size]
            lengths = {i: len(self.dataset[i]["input_ids"]) for i in mega}
            yield from sorted(mega, key=lengths.__getitem__, reverse=True)
