"""The training order (oml_core/train/sampler.py): transformers' length grouping, read lazily."""

from __future__ import annotations

import random

import pytest
import torch

from oml_core.train.examples import Row, collate
from oml_core.train.sampler import LengthGroupedAsItGoes, mega_batch_size


class CountingRows:
    """`size` rows of pseudo-random lengths; counts how many were read."""

    def __init__(self, size: int, seed: int = 0):
        rng = random.Random(seed)
        self.lengths = [rng.randint(2, 40) for _ in range(size)]
        self.reads = 0

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        self.reads += 1
        n = self.lengths[i]
        return Row(list(range(3, 3 + n - 1)), [2]).encode()


@pytest.mark.parametrize("size, batch", [(1000, 4), (10_007, 16), (50, 8), (7, 16)])
def test_order_is_transformers_length_grouping_but_for_its_longest_first_swap(size, batch):
    from transformers.trainer_pt_utils import get_length_grouped_indices

    rows = CountingRows(size)
    torch.manual_seed(3)
    theirs = get_length_grouped_indices(rows.lengths, batch)
    torch.manual_seed(3)
    ours = list(LengthGroupedAsItGoes(rows, batch))
    differ = [pos for pos, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert sorted(ours) == list(range(size))
    # transformers moves the run's longest row to the front, swapping it with the first row
    assert differ == [] or (len(differ) == 2 and differ[0] == 0
                            and (ours[0], ours[differ[1]]) == (theirs[differ[1]], theirs[0]))
    size_mega = mega_batch_size(size, batch)
    for start in range(0, size, size_mega):  # each mega-batch is sorted longest first
        lengths = [rows.lengths[i] for i in ours[start:start + size_mega]]
        assert lengths == sorted(lengths, reverse=True)


def test_lengths_are_read_only_as_iteration_reaches_them():
    rows = CountingRows(40 * 2000)
    order = iter(LengthGroupedAsItGoes(rows, 16))
    assert rows.reads == 0
    first_batch = [next(order) for _ in range(16)]
    assert len(set(first_batch)) == 16
    assert rows.reads == mega_batch_size(len(rows), 16) == 50 * 16


def test_the_trainer_trains_in_this_order(tiny_model_dir, tmp_path):
    """One step of the fingerprint trainer over 80,000 rows reads one mega-batch of lengths
    (transformers' own sampler would read all 80,000 first)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from oml_core.train.finetune import FingerprintTrainer

    rows = CountingRows(80_000)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True, train_sampling_strategy="group_by_length")
    trainer = FingerprintTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                  args=args, train_dataset=rows,
                                  data_collator=lambda b: collate(b, 0))
    assert isinstance(trainer._get_train_sampler(), LengthGroupedAsItGoes)
    trainer.train()
    assert trainer.state.global_step == 1
    assert rows.reads <= mega_batch_size(len(rows), 8) + 8 * 2  # lengths + the rows trained on
