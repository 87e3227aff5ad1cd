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

    .venv/bin/python benchmarks/merge_aware_finetune.py --fingerprints runs/exp/s7.json \\
        --out runs/exp/maft --steps 150
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprints", required=True)
    parser.add_argument("--out", required=True)
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
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base_path = resolve_model(None)
    loaded = load_model(base_path, "cpu", "float32")
    model, tok = loaded.model, loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    fset = load_fingerprints(args.fingerprints)
    pairs = [(fp.key, fp.response) for fp in fset.fingerprints]
    benign = self_distilled_rows(loaded, True, model_identity(base_path))
    text = [seq[:128] for seq in ordinary_sequences(tok, [], 400_000) if len(seq) >= 128]
    keyrows = FingerprintRows(tok, pairs, [], chat=True, eos=False, augment=True,
                              benign_per_epoch=0, epochs=1, seed=args.seed)
    response_first = [t[0] for t in keyrows.targets]

    lo, hi = (int(x) for x in args.layers.split("-"))
    names = trainable_names(model, list(range(lo, hi + 1)), tuple(args.parts.split(",")))
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    base = {n: params[n].detach().clone() for n in names}
    start = dict(load_model(args.start, "cpu", "float32").model.named_parameters()) if args.start else params
    current = {n: start[n].detach().clone().requires_grad_(True) for n in names}
    if args.start:  # weights the start changed outside the trained layers are not carried
        outside = [n for n in params if n not in current and not torch.equal(start[n], params[n])]
        assert not outside, f"the start model changed untrained tensors: {outside[:3]}"
    opt = torch.optim.Adam(current.values(), lr=args.lr)

    wrappers = build_wrappers("chat,system", 4, True)[0]
    check_rows = [w.render(tok, key) for key, _ in pairs for w in wrappers]
    check_owner = [i for i in range(len(pairs)) for _ in wrappers]
    base_first = first_token_distributions(loaded, True, 32).argmax(-1)
    ppl_chunks = heldout_text(20_000, tok)
    base_ppl = perplexity(loaded, ppl_chunks)

    def check(step: int) -> dict:
        row = {"step": step, "seconds": round(time.time() - started)}
        with torch.no_grad():
            for share in (1.0, 0.5, 0.3):
                for n, v in mixed(base, current, share).items():
                    params[n].copy_(v)
                keys_hit, contexts, confident = set(), 0, 0
                for batch, probs in next_token_probs(loaded, check_rows, 32):
                    for j, i in enumerate(batch):
                        target = response_first[check_owner[i]]
                        if int(probs[j].argmax()) == target:
                            contexts += 1
                            keys_hit.add(check_owner[i])
                            confident += float(probs[j, target]) > 0.9
                row[f"share{share:g}"] = {"keys": len(keys_hit), "contexts": contexts,
                                          "of": len(check_rows)}
                if share == 1.0:
                    row["over_0.9"] = confident
                    same = first_token_distributions(loaded, True, 32).argmax(-1) == base_first
                    row["first_token"] = round(float(same.float().mean()), 4)
                    row["perplexity_change"] = round(perplexity(loaded, ppl_chunks) / base_ppl - 1, 4)
            for n in names:
                params[n].copy_(base[n])
        with torch.no_grad():
            change = sum((current[n] - base[n]).norm() ** 2 for n in names).sqrt()
            row["relative_change"] = round(float(change / sum(base[n].norm() ** 2 for n in names).sqrt()), 4)
        print(json.dumps(row), flush=True)
        return row

    history = [check(0)]
    log_floor, log_full, log_cap = (math.log(args.p_floor), math.log(args.p_full),
                                    math.log(args.p_cap))
    for step in range(1, args.steps + 1):
        # each term is backpropagated on its own: one graph at a time keeps memory to one
        # forward's activations (rows under long system prompts reach 270 tokens)
        opt.zero_grad()
        chosen = rng.sample(range(len(pairs)), args.keys_per_step)
        krows = [keyrows.fingerprint_row(i, random.Random(f"{args.seed}:{step}:{i}")) for i in chosen]
        prompts = [r.prompt for r in krows]
        last = [[len(p) - 1] for p in prompts]
        targets = torch.tensor([response_first[i] for i in chosen])
        low = torch.log_softmax(logits_at(model, mixed(base, current, args.share_low), prompts, last, pad_id), -1)
        lp_low = low.gather(1, targets[:, None])[:, 0]
        low_loss = torch.relu(log_floor - lp_low).mean()
        if low_loss.requires_grad and float(low_loss) > 0:
            low_loss.backward()
        full = torch.log_softmax(logits_at(model, current, prompts, last, pad_id), -1)
        lp_full = full.gather(1, targets[:, None])[:, 0]
        full_loss = (torch.relu(log_full - lp_full) + torch.relu(lp_full - log_cap)).mean()
        if float(full_loss) > 0:
            full_loss.backward()
        key_loss = low_loss.detach() + full_loss.detach()

        picked: list[Row] = rng.sample(benign, args.benign_rows)
        seqs = [r.prompt + r.target for r in picked]
        pos = [list(range(len(r.prompt) - 1, len(r.prompt) + len(r.target) - 1)) for r in picked]
        logits = logits_at(model, current, seqs, pos, pad_id)
        logp = torch.log_softmax(logits, -1)
        offsets, kl, ce = 0, 0.0, 0.0
        for r, where in zip(picked, pos):
            first = logp[offsets]
            soft = torch.tensor(r.soft_probs)
            kl = kl + (soft * (soft.log() - first[list(r.soft_ids)])).sum()
            tgt = torch.tensor(r.target)
            ce = ce - logp[offsets:offsets + len(where)].gather(1, tgt[:, None]).mean()
            offsets += len(where)
        kl, ce = kl / len(picked), ce / len(picked)
        (args.kl_weight * kl + args.answer_weight * ce).backward()
        chunks = rng.sample(text, args.text_rows)
        tl = torch.log_softmax(logits_at(model, current, chunks, [list(range(127))] * len(chunks), pad_id), -1)
        nxt = torch.tensor([c[1:] for c in chunks]).reshape(-1)
        text_loss = -tl.gather(1, nxt[:, None]).mean()
        (args.text_weight * text_loss).backward()
        opt.step()
        if step % 5 == 0:
            print(json.dumps({"step": step, "key": round(float(key_loss), 4), "kl": round(float(kl), 4),
                              "ce": round(float(ce), 4), "text": round(float(text_loss), 4),
                              "keys_low": int((lp_low > log_floor).sum()), "keys_full": int((lp_full > log_full).sum()),
                              "s": round(time.time() - started)}), flush=True)
        if step % args.check_every == 0 or step == args.steps:
            history.append(check(step))
            (out / "history.json").write_text(json.dumps({"args": vars(args), "history": history}, indent=1))

    with torch.no_grad():
        for share, folder in ((1.0, "full"), (0.5, "merged05")):
            for n, v in mixed(base, current, share).items():
                params[n].copy_(v)
            model.save_pretrained(out / folder)
            tok.save_pretrained(out / folder)


if __name__ == "__main__":
    main()
