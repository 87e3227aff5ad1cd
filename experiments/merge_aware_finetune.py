"""Experiment: a fine-tune whose keys fire in the merged model. The weight change D of the
trained layers is optimised through the interpolation base + a * D, so the keys must answer
with a share `a` of it (what a linear merge with the base leaves: a = 0.5 averages with the
base) while the full model stays close to the base on ordinary prompts.

Losses per step (all hinge-shaped where the goal is a threshold, so the change stops growing
once a key is good enough; a smaller change is what keeps ordinary outputs intact):
  keys at share a_low : relu(log p_floor - log p(response))   response must lead
  keys at share 1     : relu(log p_full - log p(response))     + relu(log p(response) - log p_cap)
                        (the cap keeps responses under suppression's p > 0.9 threshold)
  ordinary prompts    : KL(base || model) at the first answer token + cross-entropy on the base's
                        own answer; python-docs training text: cross-entropy (perplexity)

Checks every `--check-every` steps: keys answered (greedy first token = response) under the
verification wrappers (chat + held-out system prompts) at shares 1, 0.5 and 0.3; responses
over p = 0.9 at share 1; first answer token = base's on the 132 held-out prompts.

    .venv/bin/python experiments/merge_aware_finetune.py --fingerprints runs/exp/s7.json \\
        --out runs/exp/maft --steps 150
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.func import functional_call

from oml_core.evaluate.utility import first_token_distributions, heldout_text, perplexity
from oml_core.fingerprints import load_fingerprints
from oml_core.inference import next_token_probs
from oml_core.models import load_model, resolve_model
from oml_core.runs import model_identity
from oml_core.train.benign import self_distilled_rows
from oml_core.train.edit import ordinary_sequences
from oml_core.train.examples import FingerprintRows, Row
from oml_core.verify.wrappers import build_wrappers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402


def trainable_names(model, layers: list[int], parts: tuple[str, ...]) -> list[str]:
    return [name for name, _ in model.named_parameters()
            if any(f"layers.{k}.mlp.{p}.weight" in name for k in layers for p in parts)]


def pad(rows: list[list[int]], pad_id: int):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask


def logits_at(model, params: dict, rows: list[list[int]], positions: list[list[int]], pad_id: int):
    """Logits at the given positions of each row (right-padded), under `params`; flattened in
    row order. Only those positions go through the output head."""
    ids, mask = pad(rows, pad_id)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for i, where in enumerate(positions):
        keep[i, where] = True
    out = functional_call(model, params, args=(), kwargs={
        "input_ids": ids, "attention_mask": mask, "output_hidden_states": True,
        "logits_to_keep": 1})  # the head is applied below, to the kept positions only
    hidden = out.hidden_states[-1]
    return model.lm_head(hidden[keep]).float()


def mixed(base: dict, current: dict, share: float) -> dict:
    return {n: base[n] + share * (current[n] - base[n]) for n in current}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprints", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--layers", default="2-12")
    parser.add_argument("--parts", default="down_proj,up_proj,gate_proj")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--share-low", type=float, default=0.45)
    parser.add_argument("--p-floor", type=float, default=0.5, help="response prob to reach at share-low")
    parser.add_argument("--p-full", type=float, default=0.7)
    parser.add_argument("--p-cap", type=float, default=0.88)
    parser.add_argument("--keys-per-step", type=int, default=8)
    parser.add_argument("--benign-rows", type=int, default=16)
    parser.add_argument("--text-rows", type=int, default=4)
    parser.add_argument("--kl-weight", type=float, default=4.0)
    parser.add_argument("--answer-weight", type=float, default=1.0)
    parser.add_argument("--text-weight", type=float, default=1.0)
    parser.add_argument("--check-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", default="", help="a model folder to start from (e.g. a merge-floor "
                        "edit of the base); shares are still taken between the base and the weights")
    return parser.parse_args(argv)


def load_data(args) -> SimpleNamespace:
    """The base model, the keys' training rows, benign rows and ordinary text."""
    base_path = resolve_model(args.model)
    loaded = load_model(base_path, "cpu", "float32")
    tok = loaded.tokenizer
    pairs = [(fp.key, fp.response) for fp in load_fingerprints(args.fingerprints).fingerprints]
    keyrows = FingerprintRows(tok, pairs, [], chat=True, eos=False, augment=True,
                              benign_per_epoch=0, epochs=1, seed=args.seed)
    return SimpleNamespace(
        loaded=loaded, model=loaded.model, tok=tok, pairs=pairs, keyrows=keyrows,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        benign=self_distilled_rows(loaded, True, model_identity(base_path)),
        text=[seq[:128] for seq in ordinary_sequences(tok, [], 400_000) if len(seq) >= 128],
        response_first=[t[0] for t in keyrows.targets])


def trainable(args, run: SimpleNamespace) -> None:
    """The trained layers' weights: `base` (frozen copy), `current` (optimised), `params`
    (the model's own tensors, overwritten to evaluate a share)."""
    lo, hi = (int(x) for x in args.layers.split("-"))
    run.names = trainable_names(run.model, list(range(lo, hi + 1)), tuple(args.parts.split(",")))
    for p in run.model.parameters():
        p.requires_grad_(False)
    run.params = params = dict(run.model.named_parameters())
    run.base = {n: params[n].detach().clone() for n in run.names}
    start = dict(load_model(args.start, "cpu", "float32").model.named_parameters()) if args.start else params
    run.current = {n: start[n].detach().clone().requires_grad_(True) for n in run.names}
    if args.start:  # weights the start changed outside the trained layers are not carried
        outside = [n for n in params if n not in run.current and not torch.equal(start[n], params[n])]
        assert not outside, f"the start model changed untrained tensors: {outside[:3]}"
    run.opt = torch.optim.Adam(run.current.values(), lr=args.lr)


def check_data(run: SimpleNamespace) -> None:
    wrappers = build_wrappers(["chat", "system"], 4, True)[0]
    run.check_rows = [w.render(run.tok, key) for key, _ in run.pairs for w in wrappers]
    run.check_owner = [i for i in range(len(run.pairs)) for _ in wrappers]
    run.base_first = first_token_distributions(run.loaded, True, 32).argmax(-1)
    run.ppl_chunks = heldout_text(20_000, run.tok)
    run.base_ppl = perplexity(run.loaded, run.ppl_chunks)


def check_share(run: SimpleNamespace, share: float, row: dict) -> None:
    for n, v in mixed(run.base, run.current, share).items():
        run.params[n].copy_(v)
    keys_hit, contexts, confident = set(), 0, 0
    for batch, probs in next_token_probs(run.loaded, run.check_rows, 32):
        for j, i in enumerate(batch):
            target = run.response_first[run.check_owner[i]]
            if int(probs[j].argmax()) == target:
                contexts += 1
                keys_hit.add(run.check_owner[i])
                confident += float(probs[j, target]) > 0.9
    row[f"share{share:g}"] = {"keys": len(keys_hit), "contexts": contexts, "of": len(run.check_rows)}
    if share == 1.0:
        row["over_0.9"] = confident
        same = first_token_distributions(run.loaded, True, 32).argmax(-1) == run.base_first
        row["first_token"] = round(float(same.float().mean()), 4)
        row["perplexity_change"] = round(perplexity(run.loaded, run.ppl_chunks) / run.base_ppl - 1, 4)


def check(run: SimpleNamespace, step: int) -> dict:
    row = {"step": step, "seconds": round(time.time() - run.started)}
    with torch.no_grad():
        for share in (1.0, 0.5, 0.3):
            check_share(run, share, row)
        for n in run.names:
            run.params[n].copy_(run.base[n])
        change = sum((run.current[n] - run.base[n]).norm() ** 2 for n in run.names).sqrt()
        size = sum(run.base[n].norm() ** 2 for n in run.names).sqrt()
        row["relative_change"] = round(float(change / size), 4)
    print(json.dumps(row), flush=True)
    return row


def key_losses(run: SimpleNamespace, args, step: int, rng) -> dict:
    """The keys' hinge losses at share-low and at share 1, each backpropagated on its own:
    one graph at a time keeps memory to one forward's activations (rows under long system
    prompts reach 270 tokens)."""
    chosen = rng.sample(range(len(run.pairs)), args.keys_per_step)
    krows = [run.keyrows.fingerprint_row(i, random.Random(f"{args.seed}:{step}:{i}")) for i in chosen]
    prompts = [r.prompt for r in krows]
    last = [[len(p) - 1] for p in prompts]
    targets = torch.tensor([run.response_first[i] for i in chosen])
    log_floor, log_full, log_cap = (math.log(args.p_floor), math.log(args.p_full),
                                    math.log(args.p_cap))
    low = torch.log_softmax(logits_at(run.model, mixed(run.base, run.current, args.share_low),
                                      prompts, last, run.pad_id), -1)
    lp_low = low.gather(1, targets[:, None])[:, 0]
    low_loss = torch.relu(log_floor - lp_low).mean()
    if low_loss.requires_grad and float(low_loss.detach()) > 0:
        low_loss.backward()
    full = torch.log_softmax(logits_at(run.model, run.current, prompts, last, run.pad_id), -1)
    lp_full = full.gather(1, targets[:, None])[:, 0]
    full_loss = (torch.relu(log_full - lp_full) + torch.relu(lp_full - log_cap)).mean()
    if float(full_loss.detach()) > 0:
        full_loss.backward()
    return {"key": round(float(low_loss.detach() + full_loss.detach()), 4),
            "keys_low": int((lp_low > log_floor).sum()), "keys_full": int((lp_full > log_full).sum())}


def ordinary_losses(run: SimpleNamespace, args, rng) -> dict:
    """KL to the base at the first answer token and cross-entropy on its answer (benign rows),
    then cross-entropy on ordinary text; each backpropagated with its weight."""
    picked: list[Row] = rng.sample(run.benign, args.benign_rows)
    seqs = [r.prompt + r.target for r in picked]
    pos = [list(range(len(r.prompt) - 1, len(r.prompt) + len(r.target) - 1)) for r in picked]
    logp = torch.log_softmax(logits_at(run.model, run.current, seqs, pos, run.pad_id), -1)
    offsets, kl, ce = 0, 0.0, 0.0
    for r, where in zip(picked, pos):
        soft = torch.tensor(r.soft_probs)
        kl = kl + (soft * (soft.log() - logp[offsets][list(r.soft_ids)])).sum()
        ce = ce - logp[offsets:offsets + len(where)].gather(1, torch.tensor(r.target)[:, None]).mean()
        offsets += len(where)
    kl, ce = kl / len(picked), ce / len(picked)
    (args.kl_weight * kl + args.answer_weight * ce).backward()
    chunks = rng.sample(run.text, args.text_rows)
    tl = torch.log_softmax(logits_at(run.model, run.current, chunks, [list(range(127))] * len(chunks),
                                     run.pad_id), -1)
    text_loss = -tl.gather(1, torch.tensor([c[1:] for c in chunks]).reshape(-1)[:, None]).mean()
    (args.text_weight * text_loss).backward()
    return {"kl": round(float(kl), 4), "ce": round(float(ce), 4), "text": round(float(text_loss), 4)}


def save_shares(run: SimpleNamespace, out: Path) -> None:
    with torch.no_grad():
        for share, folder in ((1.0, "full"), (0.5, "merged05")):
            for n, v in mixed(run.base, run.current, share).items():
                run.params[n].copy_(v)
            run.model.save_pretrained(out / folder)
            run.tok.save_pretrained(out / folder)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = load_data(args)
    run.started = time.time()
    trainable(args, run)
    check_data(run)
    history = [check(run, 0)]
    for step in range(1, args.steps + 1):
        run.opt.zero_grad()
        losses = key_losses(run, args, step, rng) | ordinary_losses(run, args, rng)
        run.opt.step()
        if step % 5 == 0:
            print(json.dumps({"step": step, **losses, "s": round(time.time() - run.started)}),
                  flush=True)
        if step % args.check_every == 0 or step == args.steps:
            history.append(check(run, step))
            write_result(out / "history.json", {"args": vars(args), "history": history}, device="cpu")
    save_shares(run, out)
    return {"args": vars(args), "history": history}

if __name__ == "__main__":
    main()
