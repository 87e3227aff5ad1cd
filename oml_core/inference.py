"""Batched model calls shared by generation and verification.

Every call here takes many prompts at once: rows are sorted by length (so a batch carries
little padding), left-padded with an attention mask, run in batches of `batch_size`, and
returned in the caller's order. Nothing here ever calls `generate` once per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

Progress = Callable[[int], None]  # called with the number of rows just finished


def _batches(prompts: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device):
    """Input ids and attention mask, padded on the left to the longest row."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def generate(loaded, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int,
             *, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, progress: Progress | None = None,
             stop_at_eos: bool = True) -> list[list[int]]:
    """New token ids per prompt (greedy unless `sample`), in input order.

    Sampling is reproducible: the torch RNG is reseeded from `seed` and the batch index
    before each batch. Trailing padding after EOS is removed from the returned ids.
    """
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    out: list[list[int] | None] = [None] * len(prompts)
    for batch_no, rows in enumerate(_batches(prompts, batch_size)):
        ids, mask = left_pad([prompts[i] for i in rows], pad_id, loaded.device)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
        if sample:
            torch.manual_seed(seed * 1_000_003 + batch_no)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        for row, i in enumerate(rows):
            tokens = new[row].tolist()
            for pos, token in enumerate(tokens):
                if token in eos_ids:  # keep the EOS itself, drop what follows it
                    tokens = tokens[:pos + 1]
                    break
            out[i] = tokens
        if progress:
            progress(len(rows))
    return out  # type: ignore[return-value]


def next_token_probs(loaded, prompts: Sequence[Sequence[int]], batch_size: int,
                     progress: Progress | None = None) -> Iterator[tuple[list[int], "object"]]:
    """Yield (row indices, probabilities of the next token [rows, vocab] in float32)."""
    import torch

    pad_id = loaded.tokenizer.pad_token_id
    for rows in _batches(prompts, batch_size):
        ids, mask = left_pad([prompts[i] for i in rows], pad_id, loaded.device)
        with torch.inference_mode():
            logits = loaded.model(input_ids=ids, attention_mask=mask).logits[:, -1, :]
        yield rows, torch.softmax(logits.float(), dim=-1).cpu()
        if progress:
            progress(len(rows))
