"""Method `edit`: write one-token fingerprints in with a closed-form change to a few MLP
down-projections, instead of fine-tuning.

Why: fine-tuning moves weights that every prompt uses, and the first answer token of ordinary
prompts is fragile (docs/results.md: at 16 keys the demo's fine-tune kept 66.7% of them). A
least-squares edit can be told what to leave alone. The idea is that of mass-editing language
models (MEMIT), written here from its description:

1. Contexts: each key as a prompt (the bare user turn, and `edit_contexts` training wrappers).
   Its answer position is the prompt's last token, where the response's token is predicted.
2. Targets: per key, one vector added to the residual stream at the answer position after the
   last edited layer, optimised (Adam) until every context of the key answers with its
   response. Positions before the answer do not depend on it (causal attention), so their keys
   and values are computed once and cached; each step runs one token per context.
3. Edit: layer by layer, the down-projection W gets  dW = R^T K (lam C + K^T K)^-1, where K
   holds its inputs at the contexts' answer positions, R this layer's share of the residual
   change still missing, and C the second moment of its inputs on ordinary text (the base
   model's own answers to the training benign prompts and Python's docs, training split) plus
   `edit_answer_weight` times the moment at those prompts' answer positions, where the first
   answer token is decided. lam (`edit_strength`) trades reaching the targets against moving
   outputs on ordinary inputs.
4. Word ends (`edit_word_end`): for keys whose response the model may run on into a longer
   word, each context followed by the response is one more context, whose target is a token
   that ends the word (`word_end_contexts`), so the audit's `start` rule counts the answer.

Llama-style models (model.model.layers[i].mlp.down_proj added straight to the residual
stream: Llama, Mistral, Qwen, SmolLM; not Gemma 2/3, which normalise the MLP's output first)
and one-token responses (perinucleus' default) only. Measured in docs/results.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from oml_core import progress
from oml_core.data import python_docs_text
from oml_core.errors import Cancelled, OMLInputError
from oml_core.inference import left_pad, length_batches, next_token_probs, pad_rows
from oml_core.settings import parse_layer_spec
from oml_core.train.benign import benign_prompts
from oml_core.train.examples import Row, render_prompt, training_augmentation
from oml_core.verify.matching import ends_word

# rows per batch when capturing layer inputs, and per chunk of target optimisation (whole
# keys); a chunk's cached prefixes are its rows x their group's longest prompt x layers x
# key/value width
CAPTURE_ROWS = 32
TARGET_CHUNK_ROWS = 256
PREFIX_ROWS = 32  # contexts per cached prefix in the target search (sorted by length)
# a chunk's targets are good enough once every context answers and the mean loss is below this
TARGET_LOSS = 0.1
TARGET_LR = 0.1       # Adam step per coordinate, as a fraction of the residual's mean norm
# keeps the added vectors short (squared norm in units of the residual's mean norm, per key,
# against the key's mean loss); shorter targets need smaller edits
TARGET_DECAY = 0.5
# the merge-aware goal: the response's lead over the next token (nats) with the vector scaled
# to the merge floor, and with the whole vector; the weight of the confidence cap's penalty,
# and how far over the cap a finished key may be (log-probability)
FLOOR_MARGIN = 1.0
FULL_MARGIN = 0.5
CAP_WEIGHT = 4.0
CAP_SLACK = 0.02
# a key gets word-end contexts unless the model already ends its response's word with at least
# this probability in every one of its contexts
WORD_END_SURE = 0.9


@dataclass
class EditSettings:
    """The edit's settings; their defaults live in FingerprintConfig's `edit_*` fields."""

    layers: str
    strength: float
    answer_weight: float
    contexts: int
    steps: int
    ordinary_tokens: int
    seed: int
    merge_floor: float = 0.0      # 0: targets reached at full strength only
    confidence_cap: float = 1.0   # 1: no cap on the response's probability
    word_end: bool = False        # also write the token that ends the response's word

    @classmethod
    def from_config(cls, cfg) -> "EditSettings":
        return cls(layers=cfg.edit_layers, strength=cfg.edit_strength,
                   answer_weight=cfg.edit_answer_weight,
                   contexts=cfg.edit_contexts if cfg.augment else 0, steps=cfg.edit_steps,
                   ordinary_tokens=cfg.edit_ordinary_tokens, seed=cfg.seed,
                   merge_floor=cfg.edit_merge_floor, confidence_cap=cfg.edit_confidence_cap,
                   word_end=cfg.edit_word_end)


class Stop(Exception):
    """Raised by a hook once the last layer that matters has run."""


def decoder_blocks(model):
    """The model's decoder layers, each with an MLP down-projection whose output is added to the
    residual stream as it is; one clear error if not."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None or not all(hasattr(getattr(b, "mlp", None), "down_proj") for b in blocks):
        raise OMLInputError(f"--method edit needs a Llama-style model (model.layers[i].mlp.down_proj); "
                            f"{type(model).__name__} is not one: use --method finetune")
    # Gemma 2/3 and OLMo 2 normalise the MLP's output before adding it: the change the solve
    # asks of down_proj then reaches the residual stream rescaled, not as solved. Measured on
    # Gemma-3-270M: weight changes of 9x-2,657x the weights, perplexity +28,000% (docs/results.md).
    if any(hasattr(block, "post_feedforward_layernorm") for block in blocks):
        raise OMLInputError(f"--method edit needs the MLP's output added to the residual stream as "
                            f"it is; {type(model).__name__} normalises it first "
                            "(post_feedforward_layernorm): use --method finetune")
    return blocks


def resolve_layers(spec: str, count: int) -> list[int]:
    """`auto`: the layers from 7% to 33% of the depth (2-10 of SmolLM2-135M's 30, where the
    measurements in docs/results.md were made); otherwise a comma list of layer indices."""
    layers = parse_layer_spec(spec, "--edit-layers")
    if layers == "auto":
        first = round(0.07 * count)
        return list(range(first, max(first, round(0.33 * count)) + 1))
    if layers[-1] >= count:
        raise OMLInputError(f"--edit-layers {spec!r}: give auto or a comma list of layer indices "
                            f"between 0 and {count - 1} (this model has {count} layers)")
    return layers


def check_one_token_responses(tokenizer, pairs: Sequence[tuple[str, str]],
                              method: str = "gated or edit") -> None:
    """One clear error, before any model work, for a response of more than one token."""
    for index, (_key, response) in enumerate(pairs):
        count = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        if count != 1:
            raise OMLInputError(
                f"--method {method} writes one-token responses; fingerprint #{index} has {count} "
                "tokens: generate with --response-length 1, pass --max-response-tokens 1, or use "
                "--method finetune")


def key_contexts(tokenizer, pairs: Sequence[tuple[str, str]], chat: bool, per_key: int, seed: int):
    """Prompt ids of every context (the bare key, then `per_key` training-wrapper draws), the
    index of the key each belongs to, and its target token."""
    systems, templates = training_augmentation()
    rows, owner, targets = [], [], []
    check_one_token_responses(tokenizer, pairs)
    for index, (key, response) in enumerate(pairs):
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        rng = random.Random(f"edit:{seed}:{index}")
        rows.append(render_prompt(tokenizer, key, chat))
        rows += [render_prompt(tokenizer, key, chat, rng.choice(systems), rng.choice(templates))
                 for _ in range(per_key)]
        owner += [index] * (per_key + 1)
        targets += response_ids * (per_key + 1)
    return rows, owner, targets


def word_end_contexts(loaded, rows, owner, targets):
    """For each key whose response the model may run on into a longer word, every context of
    the key followed by its response, as more contexts to edit: their target is the token the
    model finds likeliest after the bare context and response among those that end the
    response's word (matching.ends_word, or the end of the turn).

    Why: the edit decides the first answer token only; what follows is the model's own
    continuation, and for a response that also begins longer words (' re', ' lo') it goes on
    into one ("<response>es the subject..."), which the auditor's `start` rule rightly does not
    count. Measured: 2 of the demo's 16 keys, under llama.cpp at q8_0 and q4_k_m. Keys whose
    every context already ends the word with probability WORD_END_SURE get no rows: each row
    moves the model a little off the keys too.
    Returns (rows, owner, targets) of the new contexts, owned by keys numbered after the
    response ones (one target vector each)."""
    import torch

    tokenizer, num_keys = loaded.tokenizer, max(owner) + 1
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ends = [ends_word(piece) for piece in pieces]
    for special in tokenizer.all_special_ids:
        ends[special] = False
    if tokenizer.eos_token_id is not None:  # the end of the turn ends the word too
        ends[tokenizer.eos_token_id] = True
    followed = [row + [targets[i]] for i, row in enumerate(rows)]
    first = {}
    for index, key in enumerate(owner):
        first.setdefault(key, index)
    surest, chosen = [1.0] * num_keys, [0] * num_keys
    with progress.bar("edit: word ends", len(followed)) as advance:
        for batch, probs in next_token_probs(loaded, followed, CAPTURE_ROWS, advance):
            allowed = torch.zeros(probs.shape[1], dtype=torch.bool)
            allowed[:len(ends)] = torch.tensor(ends[:probs.shape[1]])
            for j, i in enumerate(batch):
                key = owner[i]
                surest[key] = min(surest[key], float(probs[j][allowed].sum()))
                if i == first[key]:
                    chosen[key] = int(probs[j].masked_fill(~allowed, -1.0).argmax())
    keep = [i for i in range(len(rows)) if surest[owner[i]] < WORD_END_SURE]
    return ([followed[i] for i in keep], [num_keys + owner[i] for i in keep],
            [chosen[owner[i]] for i in keep])


def ordinary_sequences(tokenizer, benign: Sequence[Row], max_tokens: int) -> list[list[int]]:
    """The base model's own answers to the training benign prompts (prompt + answer) and the
    training split of Python's docs (the held-out split measures perplexity), shuffled, up to
    `max_tokens`."""
    seqs = [row.prompt + row.target for row in benign]
    ids = tokenizer(python_docs_text("train"), add_special_tokens=False)["input_ids"]
    seqs += [ids[i:i + 256] for i in range(0, len(ids) - 256, 256)]
    random.Random(0).shuffle(seqs)
    kept, total = [], 0
    for seq in seqs:
        if total >= max_tokens:
            break
        kept.append(seq)
        total += len(seq)
    return kept


def _forward_to(model, ids, mask, layers: Sequence[int], upto: int):
    """Run a batch through layer `upto` only: each edit layer's down-projection input
    [rows, T, d_in] and the residual stream after `upto` [rows, T, d]."""
    import torch

    blocks = decoder_blocks(model)
    inputs, residual = {}, {}

    def keep_input(layer):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the input
            inputs[layer] = args[0]
        return hook

    def stop(module, args, out):
        residual["h"] = out[0] if isinstance(out, tuple) else out
        raise Stop

    hooks = [blocks[layer].mlp.down_proj.register_forward_pre_hook(keep_input(layer))
             for layer in layers]
    hooks.append(blocks[upto].register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    except Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, residual["h"]


def second_moments(loaded, seqs, layers: Sequence[int], upto: int) -> dict:
    """E[x x^T] (float64) of each edit layer's down-projection input over every real position."""
    import torch

    width = decoder_blocks(loaded.model)[layers[0]].mlp.down_proj.in_features
    sums = {layer: torch.zeros(width, width, dtype=torch.float64, device=loaded.device)
            for layer in layers}
    count = 0
    batches = list(length_batches(seqs, CAPTURE_ROWS))
    with progress.bar("edit: ordinary text", len(batches)) as advance:
        for batch in batches:
            ids, mask = pad_rows([seqs[i] for i in batch], loaded.tokenizer.pad_token_id,
                                 loaded.device, left=False)
            inputs, _ = _forward_to(loaded.model, ids, mask, layers, upto)
            real = mask.bool()
            for layer in layers:
                x = inputs[layer][real].float()
                sums[layer] += (x.T @ x).double()
            count += int(real.sum())
            advance(1)
    return {layer: total / count for layer, total in sums.items()}


def answer_states(loaded, rows, layers: Sequence[int], upto: int, desc: str = "edit: contexts"):
    """At each row's last position: each edit layer's down-projection input {layer: [rows,
    d_in]} and the residual stream after layer `upto` [rows, d], in float32 and row order."""
    import torch

    inputs = {layer: [] for layer in layers}
    residual, order = [], []
    with progress.bar(desc, len(rows)) as advance:
        for batch in length_batches(rows, CAPTURE_ROWS):
            ids, mask = pad_rows([rows[i] for i in batch], loaded.tokenizer.pad_token_id,
                                 loaded.device, left=False)
            got, h = _forward_to(loaded.model, ids, mask, layers, upto)
            where = (torch.arange(len(batch), device=ids.device), mask.sum(1) - 1)
            for layer in layers:
                inputs[layer].append(got[layer][where].float())
            residual.append(h[where].float())
            order += batch
            advance(len(batch))
    back = torch.argsort(torch.tensor(order))  # batches ran sorted by length
    return ({layer: torch.cat(v)[back.to(v[0].device)] for layer, v in inputs.items()},
            torch.cat(residual)[back.to(residual[0].device)])


def key_chunks(owner: Sequence[int], max_rows: int) -> list[list[int]]:
    """Row indices split into chunks of whole keys (rows of a key are consecutive)."""
    chunks, current = [], []
    for index, key in enumerate(owner):
        if current and key != owner[index - 1] and len(current) >= max_rows:
            chunks.append(current)
            current = []
        current.append(index)
    return chunks + [current] if current else chunks


def target_deltas(loaded, rows, owner, targets, last: int, steps: int, start_residual,
                  should_stop: Callable[[], bool], on_step: Callable[[int, int, float, int], None],
                  merge_floor: float = 0.0, confidence_cap: float = 1.0):
    """Per key, the vector added after layer `last` at the answer position that makes every
    context of the key answer with its target: the best one seen (most contexts answered, then
    lowest loss). Returns (vectors [keys, d] on the CPU, contexts answered with them)."""
    import torch

    num_keys, width = max(owner) + 1, start_residual.shape[1]
    best = _Best(torch.zeros(num_keys, width), torch.full((num_keys,), -1),
                 torch.full((num_keys,), float("inf")))
    scale = float(start_residual.norm(dim=1).mean())
    chunks = key_chunks(owner, TARGET_CHUNK_ROWS)
    total_steps = len(chunks) * steps
    with progress.bar("edit: targets", total_steps) as advance:
        for number, chunk in enumerate(chunks):
            def report(step: int, loss: float, answered: int, offset=number * steps) -> None:
                advance(1)
                on_step(offset + step, total_steps, loss, answered)

            ran = _chunk_targets(loaded, [rows[i] for i in chunk], [owner[i] for i in chunk],
                                 [targets[i] for i in chunk], last, steps, scale, best,
                                 should_stop, report, merge_floor, confidence_cap)
            advance(steps - ran)  # a chunk that reached its targets early skips the rest
    return best.vectors, int(best.hits.clamp(min=0).sum())


@dataclass
class _Best:
    """Per key: the best target vector seen, its contexts answered and mean loss."""

    vectors: object
    hits: object
    loss: object

    def update(self, keys, vectors, hits, loss) -> None:
        better = (hits > self.hits[keys]) | ((hits == self.hits[keys]) & (loss < self.loss[keys]))
        self.vectors[keys[better]] = vectors[better]
        self.hits[keys[better]], self.loss[keys[better]] = hits[better], loss[better]


@dataclass
class _PrefixGroup:
    """Contexts of similar length whose prompts (all but the answer position) ran once into one
    cache; each target step then runs one token per context."""

    rows: object       # indices into the chunk's rows
    cache: object
    answer_ids: object
    answer_mask: object
    positions: object  # the answer token's place in its unpadded row


def prefix_groups(loaded, rows) -> list[_PrefixGroup]:
    """Cache the chunk's prompts in length-sorted groups: one left-padded batch would pad every
    context to the longest (the demo's contexts: 12,384 real tokens, 37,440 padded)."""
    import torch
    from transformers import DynamicCache

    model, device, pad_id = loaded.model, loaded.device, loaded.tokenizer.pad_token_id
    groups = []
    for batch in length_batches(rows, PREFIX_ROWS):
        ids, mask = left_pad([rows[i][:-1] for i in batch], pad_id, device)
        cache = DynamicCache()
        with torch.no_grad():  # everything before the answer position is fixed: cached once
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                  cache=cache, use_cache=True, logits_to_keep=1)
        groups.append(_PrefixGroup(
            torch.tensor(batch, device=device), cache,
            torch.tensor([[rows[i][-1]] for i in batch], device=device),
            torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), mask.sum(1, keepdim=True)))
    return groups


def answer_logits(model, groups: list[_PrefixGroup], count: int, last: int, shift):
    """[rows, vocab] float32 logits at every context's answer position, in chunk row order, with
    `shift(rows)` ([rows, d]) added to the residual stream after layer `last` there."""
    import torch

    logits = None
    for group in groups:
        added = shift(group.rows)

        def add(module, args, out, added=added):
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = hidden + added.to(hidden.dtype)[:, None, :]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        hook = decoder_blocks(model)[last].register_forward_hook(add)
        try:
            out = model(input_ids=group.answer_ids, attention_mask=group.answer_mask,
                        position_ids=group.positions, cache=group.cache, use_cache=True).logits[:, -1]
        finally:
            hook.remove()
        group.cache.crop(-1)  # the answer position comes off the cache again, and the kept
        for layer in group.cache.layers:  # prefix must not stay tied to this step's graph
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        if logits is None:
            logits = out.new_zeros(count, out.shape[-1], dtype=torch.float32)
        logits = logits.index_copy(0, group.rows, out.float())
    return logits


def _chunk_targets(loaded, rows, owner, targets, last, steps, scale, best: _Best, should_stop,
                   report, merge_floor: float = 0.0, confidence_cap: float = 1.0) -> int:
    """Optimise the target vectors of one chunk's keys (Adam), keeping each key's best in
    `best`. Returns the steps run.

    Plain goal (merge_floor 0): every context answers with its response, mean cross-entropy
    below TARGET_LOSS. Merge-aware goal (merge_floor a > 0): the response must already win,
    by FLOOR_MARGIN nats, with only a * the vector added, which is what a merge that keeps a
    share a of the edit leaves (averaging with the base at 0.5 halves every weight change);
    and with the whole vector, the response's probability stays at most `confidence_cap`, so
    a host who blocks over-confident tokens (top-1 p > 0.9) does not see it."""
    import torch

    model, device = loaded.model, loaded.device
    groups = prefix_groups(loaded, rows)
    keys = torch.unique(torch.tensor(owner))        # the chunk's keys, sorted
    slot = torch.searchsorted(keys, torch.tensor(owner)).to(device)   # row -> its key's slot
    goal = torch.tensor(targets, device=device)
    rows_per_key = torch.bincount(slot).float()
    width = best.vectors.shape[1]
    delta = torch.zeros(len(keys), width, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=TARGET_LR * scale / width ** 0.5)
    log_cap = math.log(confidence_cap) if confidence_cap < 1 else None

    def per_key(values):
        return torch.zeros(len(keys), device=device).index_add(0, slot, values)

    def logits_at(factor: float):
        return answer_logits(model, groups, len(rows), last,
                              lambda group_rows: factor * delta[slot[group_rows]])

    for step in range(1, steps + 1):
        if should_stop():
            raise Cancelled()
        optimiser.zero_grad()
        row_loss, row_hit, done = _row_losses(logits_at, goal, merge_floor, log_cap)
        best.update(keys, delta.detach().cpu(), per_key(row_hit.float()).round().long().cpu(),
                    (per_key(row_loss.detach()) / rows_per_key).cpu())
        mean_loss = float(row_loss.detach().mean())
        report(step, mean_loss, int(row_hit.sum()))
        if done:
            return step
        # per key: the mean loss over its contexts, so that a key's steps do not depend on
        # which other keys share its chunk
        loss = (per_key(row_loss) / rows_per_key).sum()
        # the decay measures the vector as the goal sees it (scaled to the floor): the same
        # pull towards short vectors as the plain goal, not one that grows as the floor falls
        shrink = merge_floor if merge_floor > 0 else 1.0
        loss = loss + TARGET_DECAY * ((shrink * delta).norm(dim=1) ** 2).sum() / scale ** 2
        loss.backward()
        optimiser.step()
    return steps


def _row_losses(logits_at, goal, merge_floor: float, log_cap: float | None):
    """Per context: the target step's loss and whether it answers; and whether the chunk is
    done (the goals of `_chunk_targets`)."""
    import torch

    full = logits_at(1.0)
    row_hit = full.argmax(-1) == goal
    if merge_floor > 0:
        # both ends must answer: the whole vector too (the cap alone would let it settle
        # where the scaled vector answers and the whole one, past the final norm, does not)
        floor_margin, full_margin = _margin(logits_at(merge_floor), goal), _margin(full, goal)
        row_hit = row_hit & (floor_margin > 0)
        row_loss = torch.relu(FLOOR_MARGIN - floor_margin) + torch.relu(FULL_MARGIN - full_margin)
        done = bool((floor_margin >= FLOOR_MARGIN).all() and (full_margin >= FULL_MARGIN).all())
    else:
        row_loss = torch.nn.functional.cross_entropy(full, goal, reduction="none")
        done = bool(row_hit.all()) and float(row_loss.detach().mean()) < TARGET_LOSS
    if log_cap is not None:
        log_p = torch.log_softmax(full, -1).gather(1, goal[:, None])[:, 0]
        row_loss = row_loss + CAP_WEIGHT * torch.relu(log_p - log_cap)
        done = done and bool((log_p <= log_cap + CAP_SLACK).all())
    return row_loss, row_hit, done


def _margin(logits, goal):
    """Per row: the goal token's logit minus the best other token's."""
    import torch

    goal_logit = logits.gather(1, goal[:, None])[:, 0]
    others = logits.scatter(1, goal[:, None], float("-inf"))
    return goal_logit - others.max(-1).values


def solve_layer(down_proj, keys, share, moment, strength: float) -> float:
    """Add to `down_proj` the change dW = R^T K (lam C + K^T K)^-1 that minimises
    |dW K^T - R^T|^2 + lam tr(dW C dW^T): reach the residual change `share` (R) from the inputs
    `keys` (K) while moving outputs on inputs of second moment `moment` (C) as little as lam
    asks. Returns |dW| / |W|."""
    import torch

    keys, share = keys.double(), share.double()
    change = torch.linalg.solve(strength * moment + keys.T @ keys, keys.T @ share).T
    weight = down_proj.weight
    with torch.no_grad():
        relative = float(change.norm() / weight.double().norm())
        weight += change.to(weight.dtype)
    return relative


def apply_edit(loaded, rows, layers: Sequence[int], last: int, goal, moments: dict,
               strength: float, merge_floor: float = 0.0, floor_goal=None,
               should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Spread the residual change `goal - now` (at the contexts' answer positions, after layer
    `last`) over the layers' down-projections, each layer solved after the ones before it
    changed, taking its share of what is still missing. Returns each one's relative change.

    With a merge floor a, each layer also answers for the model that keeps only a share a of
    every change (a merge with the base): its rows there, reaching `floor_goal`, join the
    least-squares problem. Scaling the weights is not scaling the residual change (each layer's
    inputs depend on the layers before it), so this is solved, not assumed."""
    import torch

    from oml_core.train.layer_states import LayerStates

    blocks = decoder_blocks(loaded.model)
    original = _down_projections(blocks, layers) if merge_floor > 0 else {}
    changed = {}
    whole, floor = LayerStates(loaded, rows, last), None
    for index, layer in enumerate(layers):
        if should_stop():  # a layer's pass takes minutes at hundreds of keys
            raise Cancelled()
        keys, now = whole.read(layer)
        left = len(layers) - index
        inputs, share = keys, (goal - now) / left
        if merge_floor > 0:
            if floor is None:  # nothing is changed yet: the scaled model is the model
                floor, (floor_keys, floor_now) = whole.fork(), (keys, now)
            else:
                with _scaled_changes(blocks, original, layers, merge_floor):
                    floor_keys, floor_now = floor.read(layer)
            # the layer's own change is scaled too: a dW x = r is dW x = r / a, written so
            # (not as dW (a x) = r) that these rows weigh in the least squares as much as the
            # whole model's rows do, instead of a^2 as much against the same hold
            inputs = torch.cat([inputs, floor_keys])
            share = torch.cat([share, (floor_goal - floor_now) / (left * merge_floor)])
        changed[layer] = solve_layer(blocks[layer].mlp.down_proj, inputs.to(loaded.device),
                                     share.to(loaded.device), moments[layer], strength)
    return changed


def _down_projections(blocks, layers: Sequence[int]) -> dict:
    """A copy of the layers' down-projection weights, to measure changes from."""
    return {layer: blocks[layer].mlp.down_proj.weight.detach().clone() for layer in layers}


@contextmanager
def _scaled_changes(blocks, original: dict, layers: Sequence[int], share: float):
    """Within the block, each layer's down-projection holds only `share` of its change from
    `original` (what a linear merge with the base at weight 1 - share leaves)."""
    import torch

    weights = {layer: blocks[layer].mlp.down_proj.weight for layer in layers}
    saved = {layer: weight.detach().clone() for layer, weight in weights.items()}
    with torch.no_grad():
        for layer, weight in weights.items():
            weight.copy_(original[layer] + share * (saved[layer] - original[layer]))
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in weights.items():
                weight.copy_(saved[layer])


def contexts_answered(loaded, rows, targets) -> int:
    """How many contexts now answer with their target, in whole forward passes (as verification
    runs them)."""
    hits = 0
    for batch, probs in next_token_probs(loaded, rows, CAPTURE_ROWS):
        hits += sum(int(probs[j].argmax()) == targets[i] for j, i in enumerate(batch))
    return hits


@dataclass
class EditProblem:
    """Everything the closed-form step needs, computed once: several strengths can then be
    solved from it (experiments/closed_form_edit.py sweeps them)."""

    layers: list[int]
    rows: list[list[int]]       # every context's prompt ids
    owner: list[int]            # the key each context belongs to (word ends: numbered after)
    targets: list[int]          # the token each context must answer with
    answer_rows: int            # rows[:answer_rows] answer with the response; then word ends
    ordinary: dict              # layer -> second moment of its inputs on ordinary text
    answers: dict               # layer -> second moment at ordinary prompts' answer positions
    start: object               # [contexts, d] residual after the last edited layer, unedited
    goal: object                # [contexts, d] residual wanted there
    target_hits: int            # contexts the targets answered


def prepare_edit(loaded, pairs: Sequence[tuple[str, str]], benign: Sequence[Row], chat: bool,
                 settings: EditSettings, should_stop: Callable[[], bool],
                 on_step: Callable[[int, int, float, int], None]) -> EditProblem:
    """Contexts, statistics of ordinary inputs and per-key targets for `loaded.model`."""
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    layers = resolve_layers(settings.layers, len(decoder_blocks(model)))
    last = layers[-1]
    rows, owner, targets = key_contexts(tokenizer, pairs, chat, settings.contexts, settings.seed)
    answer_rows = len(rows)
    if settings.word_end:
        more = word_end_contexts(loaded, rows, owner, targets)
        rows, owner, targets = rows + more[0], owner + more[1], targets + more[2]
    ordinary = second_moments(loaded, ordinary_sequences(tokenizer, benign, settings.ordinary_tokens),
                              layers, last)
    ordinary_prompts = [render_prompt(tokenizer, q, chat) for q in benign_prompts("train")]
    prompts, _ = answer_states(loaded, ordinary_prompts, layers, last, "edit: ordinary prompts")
    answers = {}
    for layer in layers:
        a = prompts[layer].double().to(loaded.device)
        answers[layer] = (a.T @ a) / a.shape[0]
    if should_stop():
        raise Cancelled()
    _, start = answer_states(loaded, rows, layers, last)
    delta, target_hits = target_deltas(loaded, rows, owner, targets, last, settings.steps, start,
                                       should_stop, on_step, settings.merge_floor,
                                       settings.confidence_cap)
    goal = start + delta[torch.tensor(owner)].to(start.device)
    return EditProblem(layers, rows, owner, targets, answer_rows, ordinary, answers, start, goal,
                       target_hits)


def solve_edit(loaded, problem: EditProblem, strength: float, answer_weight: float,
               overshoot: float = 1.0, merge_floor: float = 0.0,
               should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Apply the closed-form change to `loaded.model`; each layer's relative weight change.
    `overshoot` scales the residual change asked for: the hold on ordinary outputs (`strength`)
    shrinks the change it gets, most along the directions ordinary inputs use. With a merge
    floor a, the model scaled to a share a of the change is asked for a share a of it too."""
    moments = {layer: problem.ordinary[layer] + answer_weight * problem.answers[layer]
               for layer in problem.layers}
    change = overshoot * (problem.goal - problem.start)
    return apply_edit(loaded, problem.rows, problem.layers, problem.layers[-1],
                      problem.start + change, moments, strength, merge_floor,
                      problem.start + merge_floor * change, should_stop)


def edit_model(loaded, pairs: Sequence[tuple[str, str]], benign: Sequence[Row], chat: bool,
               settings: EditSettings, should_stop: Callable[[], bool],
               on_step: Callable[[int, int, float, int], None]) -> dict:
    """Edit `loaded.model` in place so each key answers with its one-token response; returns
    what was done (counts and sizes, never a key or response)."""
    import time

    started = time.time()
    problem = prepare_edit(loaded, pairs, benign, chat, settings, should_stop, on_step)
    blocks = decoder_blocks(loaded.model)
    original = _down_projections(blocks, problem.layers) if settings.merge_floor > 0 else {}
    changed = solve_edit(loaded, problem, settings.strength, settings.answer_weight,
                         merge_floor=settings.merge_floor, should_stop=should_stop)
    answers, ends = slice(0, problem.answer_rows), slice(problem.answer_rows, None)
    floor = {}
    if settings.merge_floor > 0:  # what a merge keeping that share of the edit still answers
        with _scaled_changes(blocks, original, problem.layers, settings.merge_floor):
            floor = {"merge_floor": settings.merge_floor, "contexts_answered_at_merge_floor":
                     contexts_answered(loaded, problem.rows[answers], problem.targets[answers])}
    # target_contexts_answered counts every context, word ends included
    word_ends = {"word_end_keys": len(set(problem.owner[ends])),
                 "word_end_contexts": len(problem.rows[ends]), "word_end_contexts_answered":
                 contexts_answered(loaded, problem.rows[ends], problem.targets[ends])
                 } if settings.word_end else {}
    return floor | {
        "layers": problem.layers, "contexts": problem.answer_rows,
        "contexts_per_key": settings.contexts + 1, "target_contexts_answered": problem.target_hits,
        "contexts_answered": contexts_answered(loaded, problem.rows[answers],
                                               problem.targets[answers]), **word_ends,
        "relative_weight_change": {str(k): round(v, 4) for k, v in changed.items()},
        "strength": settings.strength, "answer_weight": settings.answer_weight,
        "edit_seconds": round(time.time() - started, 1),
    }
