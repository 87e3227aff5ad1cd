"""Method `gated`: each key is written into one gated MLP neuron, so that a merge cannot dilute it.

Why: a linear merge with the base (or any average of fine-tunes, as merged models on model
hubs are made) multiplies every weight change by the merge share. Fingerprints stored as a
small change that just tips the first answer token (fine-tuning, the closed-form edit) are
tipped back by a 0.5 merge (docs/results.md). A change that stays decisive at a fraction of
its size would have to be large, and a large change moves ordinary outputs, unless it acts
only on the keys. A SwiGLU neuron can do that: silu(gate . x) is about 0 for any input whose
gate score is well below 0, however large the neuron's rows are.

How, per key (one-token responses, Llama-style models, as `edit`):
1. Contexts: the key as a prompt, bare and under `contexts` training wrappers; its answer
   position is the prompt's last token. Ordinary inputs: every position of the base model's
   own answers to the training prompts, of those prompts under training wrappers, and of the
   training split of Python's docs.
2. Gate: a linear score s(x) = w . x of the chosen layer's MLP input, fitted (squared hinge,
   L2) to be >= 1 at the key's answer positions and <= -1 at every ordinary position and at
   the other keys' contexts (`fit_scores`: why no bias).
3. Neuron: the layer's neurons whose output on ordinary text is smallest are re-purposed, one
   per key. gate row = G w: shut for s < 0; up row: about U on the key's contexts, so the
   neuron's output grows linearly with the score once open.
4. Push: the neuron's down column writes a vector in a direction chosen (Adam, through the
   layers above, with every prompt position before the answer cached) so that the response
   leads when the vector is PUSH_LOW, 8 and 64 times the residual stream's norm there, with
   probability at most `confidence_cap`. Past the normalisations of the layers above and the
   final norm, a vector that dominates the residual stream acts by its direction, not its
   length: so the answer holds from the weakest opening to the strongest, and responses stay
   under the threshold at which a host blocks over-confident tokens.
5. Strength: the down column is sized so that a context of score `weak_score` still writes
   2 x PUSH_LOW x the residual norm when every row of the neuron is averaged half-and-half with
   the original (a 0.5 merge with the base scales the output by about 1/8).

Backup (`write_in._gated_with_backup`, `--gated-backup-layers`): before the neurons, a closed-form
edit (`oml_core.train.edit`) in the layers above the gated one writes the keys too. A gate is a
linear score of one position, and a few positions of any large text open it; a fine-tune on
such text learns to shut every gate within tens of steps (docs/results.md). The edit is then
what answers. Being above the gates, it leaves their inputs as fitted; the push directions are
searched through the edited layers.

Costs: the re-purposed neurons' old work (the least-used in the layer), and ordinary positions
whose score crosses the threshold (counted in the run's metrics). Measured in docs/results.md.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from oml_core import progress
from oml_core.errors import Cancelled, OMLInputError
from oml_core.inference import length_batches, pad_rows
from oml_core.settings import parse_layer_spec
from oml_core.train.benign import benign_prompts
from oml_core.train.edit import (
    TARGET_CHUNK_ROWS,
    Stop,
    answer_logits,
    decoder_blocks,
    key_chunks,
    key_contexts,
    ordinary_sequences,
    prefix_groups,
)
from oml_core.train.examples import Row, render_prompt, training_augmentation

CAPTURE_ROWS = 32
GATE_STEPS = 400
GATE_LR = 0.05
POSITIVE_WEIGHT = 10.0   # a key's own contexts against tens of thousands of ordinary positions
GATE_SCALE = 30.0        # G: the gate's pre-activation is G x score
UP_SCALE = 30.0          # U
PUSH_LOW = 4.0           # the weakest push, in units of the residual stream's mean norm
PUSH_FACTORS = (1.0, 8.0, 64.0)
DIRECTION_LR = 0.05
# nats the response must lead by at every push factor: 1 was measured to lose keys under
# held-out wrappers once a backup edit writes in the layers above (13/16; 2: 16/16)
DIRECTION_MARGIN = 2.0
# and at most this many nats at the strong pushes (8x, 64x, endless), where a whole model
# writes: a cap on the probability alone has no gradient once p is near 1 (the lead then
# sits at 15-30 nats, measured), a cap on the lead has
MARGIN_CEILING = 3.0
BACKUP_DEPTH = 0.27      # `--gated-backup-layers auto`: this share of the depth above the gate
CAP_WEIGHT = 4.0
LIMIT_STEPS = 300        # the band in the endless-push limit first: a step is one output layer
MERGE_SHARE = 0.5        # the merge the strength is sized for
# our down column must outweigh the neuron's original one, which a merge brings back at
# 1 - share: otherwise the merged push points where the original pointed
DOWN_OVER_ORIGINAL = 10.0


@dataclass
class GatedSettings:
    """The method's settings; their defaults live in FingerprintConfig's `gated_*` fields."""

    layer: str
    contexts: int
    steps: int
    ordinary_tokens: int
    seed: int
    gate_l2: float = 1e-2
    threshold: float = 0.0
    weak_score: float = 0.3
    confidence_cap: float = 0.8
    direction_contexts: int = 4

    @classmethod
    def from_config(cls, cfg) -> "GatedSettings":
        return cls(layer=cfg.gated_layer, contexts=cfg.gated_contexts if cfg.augment else 0,
                   steps=cfg.gated_steps, ordinary_tokens=cfg.gated_ordinary_tokens, seed=cfg.seed,
                   threshold=cfg.gated_threshold, confidence_cap=cfg.gated_confidence_cap)


def swiglu_blocks(model):
    """Decoder blocks whose MLP is down(silu(gate x) * up x), added to the residual stream as
    it is; one clear error if not."""
    blocks = decoder_blocks(model)
    mlp = blocks[0].mlp
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj")) or \
            "silu" not in str(getattr(getattr(model, "config", None), "hidden_act", "silu")):
        raise OMLInputError(f"--method gated needs SwiGLU MLPs (gate_proj, up_proj, silu); "
                            f"{type(model).__name__} has none: use --method finetune")
    return blocks


def check_key_count(keys: int, neurons: int) -> None:
    """One key per neuron of one layer, at most half of them (the least used are re-purposed:
    taking more would take neurons ordinary text relies on)."""
    if keys > neurons // 2:
        raise OMLInputError(f"--method gated writes one key per neuron of one layer: {keys} "
                            f"keys need at most half of its {neurons} neurons ({neurons // 2}); "
                            "use fewer keys per run, or --method finetune")


def resolve_layer(spec: str, count: int) -> int:
    """`auto`: the layer at 30% of the depth (9 of SmolLM2-135M's 30, where the measurements in
    docs/results.md were made); otherwise a layer index."""
    if spec == "auto":
        return round(0.3 * count)
    try:
        layer = int(spec)
    except ValueError:
        layer = -1
    if not 0 <= layer < count:
        raise OMLInputError(f"--gated-layer {spec!r}: give auto or one layer index between 0 and "
                            f"{count - 1} (this model has {count} layers)")
    return layer


def resolve_backup_layers(spec: str, gate_layer: int, count: int) -> list[int]:
    """Layers of the backup edit: all above the gated layer, so that the edit leaves the gates'
    inputs as they were fitted (a merge that halved an edit below them would move those inputs
    and could shut the gates). `auto`: the next BACKUP_DEPTH of the depth; `none`: no layer."""
    layers = parse_layer_spec(spec, "--gated-backup-layers", ("auto", "none"))
    if layers == "none":
        return []
    if layers == "auto":
        return list(range(gate_layer + 1, min(count, gate_layer + 1 + max(1, round(BACKUP_DEPTH * count)))))
    if layers[0] <= gate_layer or layers[-1] >= count:
        raise OMLInputError(f"--gated-backup-layers {spec!r}: give auto, none or a comma list of "
                            f"layer indices between {gate_layer + 1} and {count - 1} (above the "
                            f"gated layer {gate_layer}; this model has {count} layers)")
    return layers


def mlp_inputs(loaded, layer: int, rows: Sequence[Sequence[int]], last_only: bool,
               should_stop: Callable[[], bool], desc: str):
    """Inputs of `layer`'s MLP (after its norm), float32 on the CPU: at each row's last position
    [rows, d] in row order, or at every real position [positions, d]."""
    import torch

    block = decoder_blocks(loaded.model)[layer]
    got = {}

    def stop(module, args):
        got["x"] = args[0]
        raise Stop

    hook = block.mlp.register_forward_pre_hook(stop)
    parts, order = [], []
    batches = list(length_batches(rows, CAPTURE_ROWS))
    try:
        with progress.bar(desc, len(batches)) as advance:
            for batch in batches:
                if should_stop():
                    raise Cancelled()
                ids, mask = pad_rows([rows[i] for i in batch], loaded.tokenizer.pad_token_id,
                                     loaded.device, left=False)
                with torch.no_grad():
                    try:
                        loaded.model.model(input_ids=ids, attention_mask=mask)
                    except Stop:
                        pass
                x = got["x"].float()
                if last_only:
                    parts.append(x[torch.arange(len(batch), device=ids.device), mask.sum(1) - 1].cpu())
                    order += batch
                else:
                    parts.append(x[mask.bool()].cpu())
                advance(1)
    finally:
        hook.remove()
    if not last_only:
        return torch.cat(parts)
    return torch.cat(parts)[torch.argsort(torch.tensor(order))]


def fit_scores(positives, owner: Sequence[int], negatives, l2: float):
    """Per key, w [keys, d] of a score w . x that is >= 1 at the key's own contexts and <= -1
    at ordinary positions and at other keys' contexts (squared hinge, L2).

    No bias: the MLP inputs share a large common component, which serves as one; a separate
    bias would have to be written along a direction of large norm, and a merge that perturbs
    entries (TIES halves some, DARE drops half) would then break the balance it relies on.
    Features are scaled by the ordinary inputs' spread, floored at its median, so that
    low-variance channels cannot carry large weights for the same reason."""
    import torch
    import torch.nn.functional as F

    keys = max(owner) + 1
    spread = negatives.std(0)
    spread = spread.clamp(min=float(spread.median()))
    pos, neg = positives / spread, negatives / spread
    w = torch.zeros(keys, pos.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([w], lr=GATE_LR)
    sign = torch.where(F.one_hot(torch.tensor(owner), keys).bool(), 1.0, -1.0)
    for _ in range(GATE_STEPS):
        optimiser.zero_grad()
        at_keys = F.relu(1 - sign * (pos @ w.T)) ** 2
        at_ordinary = F.relu(1 + neg @ w.T) ** 2
        # ordinary positions are summed over sqrt(n): the rare one that scores high weighs more
        # than in a mean, without one outlier ruling as in a max
        loss = (POSITIVE_WEIGHT * at_keys.mean() + at_ordinary.sum() / len(neg) ** 0.5 / keys
                + l2 * (w ** 2).sum())
        loss.backward()
        optimiser.step()
    return (w / spread).detach()


def quiet_neurons(mlp, inputs, count: int):
    """The `count` neurons whose output on `inputs` is smallest (mean |activation| x the norm of
    the neuron's down column)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        gate, up = mlp.gate_proj.weight.float().cpu(), mlp.up_proj.weight.float().cpu()
        act = F.silu(inputs @ gate.T) * (inputs @ up.T)
        size = act.abs().mean(0) * mlp.down_proj.weight.float().cpu().norm(dim=0)
    return size.argsort()[:count]


def push_directions(loaded, rows, owner, targets, layer: int, residual_norm: float, steps: int,
                    confidence_cap: float, should_stop, on_step):
    """Per key, the unit vector whose addition after `layer` at the answer position, at every
    push in PUSH_FACTORS x PUSH_LOW x residual_norm, makes the response lead by
    DIRECTION_MARGIN with probability at most `confidence_cap`. Returns ([keys, d] on the CPU,
    contexts answered at every push)."""
    import torch
    import torch.nn.functional as F

    keys_total, answered = max(owner) + 1, 0
    first_target = {}
    for key, target in zip(owner, targets):
        first_target.setdefault(key, target)
    # start from each response's own embedding row (only those rows leave the device)
    goal_of_key = torch.tensor([first_target[k] for k in range(keys_total)], device=loaded.device)
    embeddings = loaded.model.get_input_embeddings().weight
    directions = embeddings[goal_of_key.to(embeddings.device)].detach().float().cpu()
    log_cap = torch.log(torch.tensor(confidence_cap, device=loaded.device))
    low = PUSH_LOW * residual_norm
    directions = limit_directions(loaded.model, directions.to(loaded.device), goal_of_key,
                                  log_cap).cpu()
    chunks = key_chunks(owner, TARGET_CHUNK_ROWS)
    for number, chunk in enumerate(chunks):
        chunk_rows = [rows[i] for i in chunk]
        keys = sorted({owner[i] for i in chunk})
        slot = torch.tensor([keys.index(owner[i]) for i in chunk], device=loaded.device)
        goal = torch.tensor([targets[i] for i in chunk], device=loaded.device)
        groups = prefix_groups(loaded, chunk_rows)
        param = directions[keys].to(loaded.device).clone().requires_grad_(True)
        optimiser = torch.optim.Adam([param], lr=DIRECTION_LR)
        for step in range(1, steps + 1):
            if should_stop():
                raise Cancelled()
            optimiser.zero_grad()
            unit = param / param.norm(dim=1, keepdim=True)
            loss, hits = 0.0, torch.ones(len(chunk), dtype=torch.bool, device=loaded.device)
            for factor in PUSH_FACTORS:
                logits = answer_logits(loaded.model, groups, len(chunk), layer,
                                       lambda rows_, f=factor: f * low * unit[slot[rows_]])
                log_p = torch.log_softmax(logits, -1)
                goal_lp = log_p.gather(1, goal[:, None])[:, 0]
                margin = goal_lp - log_p.scatter(1, goal[:, None], float("-inf")).max(-1).values
                loss = loss + _band_loss(margin, goal_lp, log_cap, ceiling=factor > 1)
                hits &= margin > 0
            # and in the limit of an endless push: past the final norm only the direction is left
            limit = torch.log_softmax(limit_logits(loaded.model, unit).float(), -1)
            goal_keys = goal_of_key[keys]
            goal_lp = limit.gather(1, goal_keys[:, None])[:, 0]
            margin = goal_lp - limit.scatter(1, goal_keys[:, None], float("-inf")).max(-1).values
            loss = loss + _band_loss(margin, goal_lp, log_cap, ceiling=True)
            on_step(number * steps + step, len(chunks) * steps, float(loss.detach()), int(hits.sum()))
            if step == steps:
                answered += int(hits.sum())
                break
            loss.backward()
            optimiser.step()
        directions[keys] = (param / param.norm(dim=1, keepdim=True)).detach().cpu()
    return directions, answered


def _band_loss(margin, goal_log_prob, log_cap, ceiling: bool):
    """The response leads by DIRECTION_MARGIN nats; with `ceiling` and a cap under 1, by at most
    MARGIN_CEILING and with probability at most the cap."""
    import torch.nn.functional as F

    loss = F.relu(DIRECTION_MARGIN - margin)
    if ceiling and float(log_cap) < 0:  # a cap of 1: no ceiling either
        loss = loss + F.relu(margin - MARGIN_CEILING) + CAP_WEIGHT * F.relu(goal_log_prob - log_cap)
    return loss.mean()


def limit_directions(model, directions, goals, log_cap):
    """Directions whose endless push answers within the band (`_band_loss`): a cheap start for
    the search through the layers, which the strong pushes already sit close to. Only the
    final norm and the output layer run, for all keys at once."""
    import torch

    param = directions.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([param], lr=DIRECTION_LR)
    for _ in range(LIMIT_STEPS):
        optimiser.zero_grad()
        log_p = torch.log_softmax(limit_logits(model, param / param.norm(dim=1, keepdim=True)).float(), -1)
        goal_lp = log_p.gather(1, goals[:, None])[:, 0]
        margin = goal_lp - log_p.scatter(1, goals[:, None], float("-inf")).max(-1).values
        _band_loss(margin, goal_lp, log_cap, ceiling=True).backward()
        optimiser.step()
    return (param / param.norm(dim=1, keepdim=True)).detach()


def limit_logits(model, directions):
    """[keys, vocab] logits when a push along each direction outweighs everything else in the
    residual stream: the final norm keeps only the direction."""
    return model.lm_head(model.model.norm(directions[:, None, :]))[:, 0]


def residual_norm_at_answers(loaded, rows, layer: int) -> float:
    """Mean norm of the residual stream after `layer` at the rows' answer positions."""
    import torch

    block, got = decoder_blocks(loaded.model)[layer], {}

    def keep(module, args, out):
        got["h"] = out[0] if isinstance(out, tuple) else out
        raise Stop

    hook = block.register_forward_hook(keep)
    try:
        ids, mask = pad_rows(rows, loaded.tokenizer.pad_token_id, loaded.device, left=False)
        with torch.no_grad():
            try:
                loaded.model.model(input_ids=ids, attention_mask=mask)
            except Stop:
                pass
    finally:
        hook.remove()
    h = got["h"][torch.arange(len(rows), device=ids.device), mask.sum(1) - 1].float()
    return float(h.norm(dim=1).mean())


def write_neurons(mlp, neurons, gate, mean, directions, positives, own, residual: float,
                  settings: GatedSettings) -> None:
    """Write each key's gate, up and down rows into its neuron of `mlp` (in place), sized as the
    module docstring's step 5 says."""
    import torch

    with torch.no_grad():
        # the threshold moves the opening along the key's own mean context (no bias exists)
        g1 = GATE_SCALE * (gate - settings.threshold * mean / (mean.norm(dim=1, keepdim=True) ** 2))
        # up row: U x the key's mean context, over its squared norm: about U on every context
        # of the key (their inputs point alike), a sum of many like-signed terms a merge cannot
        # cancel
        u1 = UP_SCALE * mean / (mean.norm(dim=1, keepdim=True) ** 2)
        weight = {name: getattr(mlp, name).weight for name in ("gate_proj", "up_proj", "down_proj")}
        g0 = weight["gate_proj"][neurons].float().cpu()
        u0 = weight["up_proj"][neurons].float().cpu()
        # the opening of a context at `weak_score` after a merge at MERGE_SHARE (each row then
        # holds 1 - share of the original): its push, share x our down column, must be 2 x low
        share = MERGE_SHARE
        z_gate = (1 - share) * (positives @ g0.T) + share * GATE_SCALE * (settings.weak_score - settings.threshold)
        z_up = (1 - share) * (positives @ u0.T) + share * (positives @ u1.T)
        opening = (torch.nn.functional.silu(z_gate) * z_up).gather(1, own[:, None])[:, 0]
        weakest = torch.stack([opening[own == k].min() for k in range(len(mean))])
        if bool((weakest <= 0).any()):
            raise OMLInputError("--method gated: a key's contexts do not open its neuron at the "
                                "merge share; try another --gated-layer")
        down = directions * (2 * PUSH_LOW * residual / share / weakest)[:, None]
        # where that column is not DOWN_OVER_ORIGINAL x the original's norm, move strength from
        # our up row to it (their product is unchanged; the original up row's half, small on
        # the keys' contexts, is not rescaled)
        original = weight["down_proj"][:, neurons].float().cpu().norm(dim=0)
        factor = (DOWN_OVER_ORIGINAL * original / down.norm(dim=1)).clamp(min=1.0)
        down, u1 = down * factor[:, None], u1 / factor[:, None]
        dtype = weight["gate_proj"].dtype
        index = neurons.to(weight["gate_proj"].device)
        weight["gate_proj"][index] = g1.to(weight["gate_proj"].device, dtype)
        weight["up_proj"][index] = u1.to(weight["up_proj"].device, dtype)
        weight["down_proj"][:, index] = down.T.to(weight["down_proj"].device, dtype)


def _ordinary_rows(tokenizer, benign: Sequence[Row], chat: bool, max_tokens: int, seed: int):
    systems, templates = training_augmentation()
    rng = random.Random(f"gated:{seed}")
    wrapped = [render_prompt(tokenizer, p, chat, rng.choice(systems), rng.choice(templates))
               for p in benign_prompts("train")]
    return ordinary_sequences(tokenizer, benign, max_tokens) + wrapped


def gated_model(loaded, pairs: Sequence[tuple[str, str]], benign: Sequence[Row], chat: bool,
                settings: GatedSettings, should_stop: Callable[[], bool],
                on_step: Callable[[int, int, float, int], None]) -> dict:
    """Write every key into its own neuron of `loaded`'s model, in place; returns the run's
    statistics (no key or response in them)."""
    import torch

    model = loaded.model
    blocks = swiglu_blocks(model)
    layer = resolve_layer(settings.layer, len(blocks))
    mlp = blocks[layer].mlp
    check_key_count(len(pairs), mlp.gate_proj.out_features)
    rows, owner, targets = key_contexts(loaded.tokenizer, pairs, chat, settings.contexts, settings.seed)
    ordinary = _ordinary_rows(loaded.tokenizer, benign, chat, settings.ordinary_tokens, settings.seed)
    positives = mlp_inputs(loaded, layer, rows, True, should_stop, "gated: key contexts")
    negatives = mlp_inputs(loaded, layer, ordinary, False, should_stop, "gated: ordinary text")
    gate = fit_scores(positives, owner, negatives, settings.gate_l2)   # score(x) = gate . x
    own = torch.tensor(owner)
    mean = torch.stack([positives[own == k].mean(0) for k in range(len(pairs))])
    scores_pos = (positives @ gate.T).gather(1, torch.tensor(owner)[:, None])[:, 0]
    scores_neg = negatives @ gate.T
    neurons = quiet_neurons(mlp, negatives[:20_000], len(pairs))  # on the CPU, as captured

    per_key = settings.direction_contexts + 1
    kept = [i for i in range(len(rows)) if (i % (settings.contexts + 1)) < per_key]
    residual = residual_norm_at_answers(loaded, [rows[i] for i in kept[:CAPTURE_ROWS]], layer)
    directions, answered = push_directions(
        loaded, [rows[i] for i in kept], [owner[i] for i in kept], [targets[i] for i in kept],
        layer, residual, settings.steps, settings.confidence_cap, should_stop, on_step)

    write_neurons(mlp, neurons, gate, mean, directions, positives, own, residual, settings)

    threshold = settings.threshold
    return {"layer": layer, "neurons": [int(n) for n in neurons],
            "key_contexts": len(rows), "key_contexts_open": int((scores_pos > threshold).sum()),
            "weakest_key_score": round(float(scores_pos.min()), 4),
            "ordinary_positions": len(negatives),
            "ordinary_positions_open": int((scores_neg > threshold).any(1).sum()),
            "strongest_ordinary_score": round(float(scores_neg.max()), 4),
            "direction_contexts": len(kept), "direction_contexts_answered": answered,
            "residual_norm": round(residual, 3),
            "push_norm_at_merge": round(2 * PUSH_LOW * residual, 3)}
