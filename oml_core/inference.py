"""Batched model calls shared by generation and verification.

Every call here takes many prompts at once, runs them in batches of `batch_size` and returns
results in the caller's order. Decoding (greedy and sampled) is our own loop over the model's
forward pass rather than `transformers`' `generate`: it shares each batch's common prompt
prefix, stops each row at its own limit and samples without sorting the vocabulary.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

Progress = Callable[[int], None]  # called with the number of rows just finished


def length_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def eos_set(model, stop_at_eos: bool) -> set[int]:
    """The model's end-of-sequence token ids (empty when decoding should not stop at them)."""
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


def cut_after_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Keep the first EOS itself, drop the padding that follows it."""
    for pos, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:pos + 1]
    return tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device):
    """Input ids and attention mask, padded on the left to the longest row."""
    return pad_rows(prompts, pad_id, device, left=True)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device, left: bool):
    """Input ids and attention mask, padded to the longest row on the left (for decoding: every
    row's last token in the last column) or on the right (positions start at 0)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        if tokens:
            span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
            ids[row, span] = torch.tensor(list(tokens), dtype=torch.long)
            mask[row, span] = 1
    return ids.to(device), mask.to(device)


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    first, shortest = rows[0], min(len(r) for r in rows)
    for pos in range(shortest):
        if any(r[pos] != first[pos] for r in rows):
            return pos
    return shortest


def greedy(loaded, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
           batch_size: int, *, progress: Progress | None = None,
           stop_at_eos: bool = True, adjust_logits: Callable | None = None) -> list[list[int]]:
    """Greedy continuation of every prompt, in input order.

    `max_new_tokens` is one limit for all rows or one per row; a batch stops as soon as every
    row has produced its own limit (or EOS). `adjust_logits` ([rows, vocab] -> [rows, vocab])
    rewrites each step's logits before the argmax (a decoding-time intervention, e.g. the
    suppression attack in evaluate/robustness).
    """
    def pick(logits, rows, step):
        return (adjust_logits(logits) if adjust_logits else logits).argmax(-1)

    return _decode(loaded, prompts, max_new_tokens, batch_size, pick, progress, stop_at_eos)


def sample(loaded, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int, *,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
           progress: Progress | None = None, stop_at_eos: bool = True) -> list[list[int]]:
    """Sampled continuation of every prompt (temperature, then nucleus `top_p`), in input order.

    Reproducible and independent of batching: the uniform draw for the prompt at position i
    of `prompts` at step t is fixed up front from `seed`, and each token is the inverse-CDF
    pick of that draw in the row's nucleus. The nucleus is found among the top-k tokens (k
    grown until it holds `top_p` of the mass), never by sorting the whole vocabulary: the
    sort and a full-vocabulary multinomial cost as much as the model's forward pass per step
    on a CPU.
    """
    import torch

    if temperature <= 0:
        raise ValueError(f"sampling temperature must be above 0, got {temperature}")
    draws = torch.rand((len(prompts), max(max_new_tokens, 1)),
                       generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def pick(logits, rows, step):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return nucleus_pick(probs, top_p, draws[rows, step].to(probs.device))

    return _decode(loaded, prompts, max_new_tokens, batch_size, pick, progress, stop_at_eos)


def nucleus(probs, top_p: float):
    """(probabilities of each row's nucleus, zero past it; their token ids), most likely first
    (in vocabulary order when `top_p` >= 1).

    The nucleus is the smallest set of most likely tokens holding at least `top_p` of the
    mass: a token is in it when the tokens ranked above it hold less than `top_p`.
    """
    import torch

    vocab = probs.shape[-1]
    if top_p >= 1:  # the whole vocabulary, unsorted: no ranking needed
        return probs, torch.arange(vocab, device=probs.device).expand_as(probs)
    k = min(vocab, 64)
    while True:
        top, ids = probs.topk(k, dim=-1)
        mass_above = top.cumsum(-1) - top
        if k == vocab or bool((mass_above[:, -1] + top[:, -1] >= top_p).all()):
            break
        k = min(vocab, k * 8)
    return torch.where(mass_above < top_p, top, torch.zeros_like(top)), ids


def nucleus_pick(probs, top_p: float, draws):
    """One token per row: the inverse-CDF pick of `draws` (uniform in [0, 1)) in the row's
    renormalised nucleus."""
    top, ids = nucleus(probs, top_p)
    cdf = top.double().cumsum(-1)
    target = draws.double()[:, None] * cdf[:, -1:]
    index = (cdf <= target).sum(-1).clamp(max=top.shape[-1] - 1)
    return ids.gather(-1, index[:, None]).squeeze(-1)


def _prefilled(batch: Sequence[Sequence[int]], model, pad_id: int, device):
    """(KV cache, suffix ids, attention mask, suffix positions) for a batch whose rows share a
    prefix: the prefix runs once and its cache is repeated for every row; each row keeps at
    least one token of its own, so the next forward returns a logit for every row."""
    import torch
    from transformers import DynamicCache

    batch = [list(row) for row in batch]
    shared = min(_common_prefix_len(batch), min(len(r) for r in batch) - 1)
    cache = DynamicCache(config=model.config)
    if shared > 0:
        prefix = torch.tensor([batch[0][:shared]], device=device)
        model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(batch))
    ids, suffix_mask = left_pad([r[shared:] for r in batch], pad_id, device)
    mask = torch.cat([torch.ones(len(batch), shared, dtype=torch.long, device=device),
                      suffix_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    return cache, ids, mask, positions


def _decode(loaded, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
            batch_size: int, pick: Callable, progress: Progress | None,
            stop_at_eos: bool) -> list[list[int]]:
    """The decoding loop: `pick(last_logits [rows, vocab], row_ids, step)` -> tokens [rows].

    Prompts are sorted lexicographically, so a batch shares a long common prefix (the chat
    template and system prompt), which is run once and its KV cache shared by every row; only
    each row's own suffix is computed per row. Only the last position's logits are computed,
    and a batch stops as soon as every row has produced its own limit (or EOS). Tests check
    greedy decoding here returns exactly what `transformers`' `generate` returns.
    """
    import torch

    limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
              else list(max_new_tokens))
    model, pad_id, device = loaded.model, loaded.tokenizer.pad_token_id, loaded.device
    stop_ids = eos_set(model, stop_at_eos)
    eos_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        row_ids = torch.tensor(rows, dtype=torch.long)
        with torch.inference_mode():
            cache, ids, mask, positions = _prefilled([prompts[i] for i in rows], model, pad_id, device)
            row_limits = torch.tensor([limits[i] for i in rows], device=device)
            steps = int(row_limits.max())
            generated = torch.full((len(rows), steps), pad_id, dtype=torch.long, device=device)
            done = row_limits <= 0
            for step in range(steps):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               cache=cache, use_cache=True, logits_to_keep=1).logits
                token = pick(logits[:, -1, :], row_ids, step)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                generated[:, step] = token
                done = done | (step + 1 >= row_limits) | torch.isin(token, eos_ids)
                if bool(done.all()):
                    break
                ids = token[:, None]
                positions = positions[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        for row, i in enumerate(rows):
            out[i] = cut_after_eos(generated[row, :limits[i]].tolist(), stop_ids)
        if progress:
            progress(len(rows))
    return out  # type: ignore[return-value]


def next_token_probs(loaded, prompts: Sequence[Sequence[int]], batch_size: int,
                     progress: Progress | None = None) -> Iterator[tuple[list[int], "object"]]:
    """Yield (row indices, probabilities of the next token [rows, vocab] in float32)."""
    import torch

    pad_id = loaded.tokenizer.pad_token_id
    for rows in length_batches(prompts, batch_size):
        ids, mask = left_pad([prompts[i] for i in rows], pad_id, loaded.device)
        with torch.inference_mode():
            logits = loaded.model(input_ids=ids, attention_mask=mask).logits[:, -1, :]
        yield rows, torch.softmax(logits.float(), dim=-1).cpu()
        if progress:
            progress(len(rows))


Branch = Callable[[int, list, "object"], list]  # (depth, handles, probs) -> [(parent, token, handle)]


def next_token_probs_tree(loaded, prompts: Sequence[Sequence[int]], batch_size: int,
                          branch: Branch, progress: Progress | None = None) -> None:
    """Next-token probabilities of every prompt, and of the continuations `branch` asks for.

    Batches are formed and their common prefix (chat template, system prompt) run once as in
    decoding (`_decode`). For each batch, `branch(0, prompt indices, probs [rows, vocab])` sees
    the prompts' probabilities (float32, on the CPU) and returns the continuations to follow:
    (row of `probs`, next token, handle); their probabilities come next as `branch(1, handles,
    probs)`, and so on until it returns none. Each level costs one token per continuation: the
    batch's KV cache is kept and each row's is copied to its continuations.
    """
    import torch

    model, pad_id, device = loaded.model, loaded.tokenizer.pad_token_id, loaded.device
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        with torch.inference_mode():
            cache, ids, mask, positions = _prefilled([prompts[i] for i in rows], model, pad_id, device)
            handles: list = list(rows)
            for depth in itertools.count():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
                children = branch(depth, handles, torch.softmax(logits.float(), dim=-1).cpu())
                if depth == 0 and progress:
                    progress(len(rows))
                if not children:
                    break
                parents = torch.tensor([parent for parent, _, _ in children], device=device)
                cache.batch_select_indices(parents)
                ids = torch.tensor([[token] for _, token, _ in children], device=device)
                mask = torch.cat([mask[parents], torch.ones_like(ids)], dim=1)
                positions = positions[parents, -1:] + 1
                handles = [handle for _, _, handle in children]
