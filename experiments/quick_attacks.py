"""Quick checks of a fingerprinted run against the attacks issue-level goals name, in one process
(minutes, where `oml eval --parts robustness` with mergekit takes most of an hour on 2 cores):

- keys that fire (greedy first token = response) under the chat template and 4 held-out system
  prompts, after a linear merge with the base at shares 1, 0.5 and 0.3 of the fingerprinted
  weights; suppression (top-1 blocked where p > 0.9); TIES and DARE (dare_ties) with a benign
  derivative, 0.5 / 0.5, density 0.5 (the formulas of oml_core.evaluate.merges, mergekit's);
- each model's own utility: first answer token = the base's on the 132 held-out prompts, and
  perplexity on 20k held-out tokens of Python's docs against the base's.

    .venv/bin/python experiments/quick_attacks.py --run RUN --fingerprints FP \\
        [--derivative RUN/eval/benign-derivative/<key>] --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from oml_core.evaluate import merges
from oml_core.evaluate.robustness import suppression
from oml_core.evaluate.utility import first_token_distributions, heldout_text, perplexity
from oml_core.fingerprints import load_fingerprints
from oml_core.inference import next_token_probs
from oml_core.models import load_model
from oml_core.runs import RunFolder
from oml_core.verify.wrappers import build_wrappers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402


def keys_firing(loaded, rows, owner, goal, adjust=None) -> dict:
    hit, contexts, confident = set(), 0, 0
    for batch, probs in next_token_probs(loaded, rows, 32):
        if adjust is not None:
            probs = torch.softmax(adjust(probs.clamp(min=1e-30).log()), -1)
        for j, i in enumerate(batch):
            if int(probs[j].argmax()) == goal[i]:
                contexts += 1
                hit.add(owner[i])
                confident += float(probs[j, goal[i]]) > 0.9
    return {"keys": len(hit), "contexts": contexts, "of": len(rows), "over_0.9": confident}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--fingerprints", required=True)
    ap.add_argument("--derivative", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    started = time.time()
    run = Path(args.run)
    base_path = RunFolder(run).record().base_model
    base = load_model(base_path, "cpu", "float32")
    tuned = load_model(str(run / "model"), "cpu", "float32")
    tok = tuned.tokenizer
    fps = load_fingerprints(args.fingerprints).fingerprints
    wrappers = build_wrappers(["chat", "system"], 4, True)[0]
    rows = [w.render(tok, fp.key) for fp in fps for w in wrappers]
    owner = [i for i in range(len(fps)) for _ in wrappers]
    goal = [tok(fps[i].response, add_special_tokens=False)["input_ids"][0] for i in owner]
    text = heldout_text(20_000, tok)
    base_first = first_token_distributions(base, True, 32).argmax(-1)
    base_ppl = perplexity(base, text)

    def utility(loaded) -> dict:
        same = first_token_distributions(loaded, True, 32).argmax(-1) == base_first
        return {"first_token": round(float(same.float().mean()), 4),
                "perplexity_change": round(perplexity(loaded, text) / base_ppl - 1, 4)}

    ours = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    theirs = base.model.state_dict()
    result = {"run": str(run), "base": keys_firing(base, rows, owner, goal)}
    for share in (1.0, 0.5, 0.3):
        tuned.model.load_state_dict(merges.linear([ours, theirs], [share, 1 - share]))
        result[f"merge_linear_{share:g}"] = keys_firing(tuned, rows, owner, goal) | utility(tuned)
        print(json.dumps({"s": round(time.time() - started), f"share {share:g}": result[f"merge_linear_{share:g}"]}), flush=True)
    tuned.model.load_state_dict(ours)
    result["suppression"] = keys_firing(tuned, rows, owner, goal, suppression(0.9, 1))
    print(json.dumps({"suppression": result["suppression"]}), flush=True)
    if args.derivative:
        derivative = load_model(args.derivative, "cpu", "float32").model.state_dict()
        for label, merge in (
                ("ties", lambda: merges.ties(theirs, [ours, derivative], [0.5, 0.5], density=0.5)),
                ("dare_ties", lambda: merges.dare_ties(theirs, [ours, derivative], [0.5, 0.5], density=0.5))):
            tuned.model.load_state_dict(merge())
            result[label] = keys_firing(tuned, rows, owner, goal) | utility(tuned)
            print(json.dumps({label: result[label]}), flush=True)
    result["seconds"] = round(time.time() - started)
    write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
