"""Is the fingerprinted model still the base model off the keys?

- perplexity on held-out ordinary text (Python's own documentation, `pydoc_data`, split here:
  every fifth topic is held out and never used for training data);
- greedy answers to held-out ordinary prompts: how often the first answer token equals the
  base model's, and how often an answer starts with a fingerprint response;
- near-miss keys (a word dropped, case changed): how often they still fire.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

from oml_core.data import python_docs_text
from oml_core.evaluate.results import Accuracy, Behaviour, Fired, LmEval, UtilityResult
from oml_core.inference import greedy
from oml_core.train.benign import benign_prompts
from oml_core.train.examples import render_prompt
from oml_core.verify.matching import is_match

ANSWER_TOKENS = 24


def heldout_text(num_tokens: int, tokenizer, chunk: int = 256) -> list[list[int]]:
    ids = tokenizer(python_docs_text("heldout"), add_special_tokens=False)["input_ids"][:num_tokens]
    return [ids[i:i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)]


def perplexity(loaded, chunks: list[list[int]], batch_size: int = 8) -> float:
    import torch

    total, count = 0.0, 0
    device = loaded.device
    with torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            ids = torch.tensor(chunks[start:start + batch_size], device=device)
            logits = loaded.model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(loss), count + ids[:, 1:].numel()
    return math.exp(total / count)


def _answers(loaded, chat: bool, batch_size: int, tokens: int = ANSWER_TOKENS) -> list[list[int]]:
    prompts = [render_prompt(loaded.tokenizer, p, chat) for p in benign_prompts("heldout")]
    return greedy(loaded, prompts, tokens, batch_size)


def first_answer_tokens(loaded, chat: bool, batch_size: int) -> list[list[int]]:
    """The greedy first answer token to each held-out prompt (one decoding step: all that
    `first_token_agreement` reads)."""
    return _answers(loaded, chat, batch_size, tokens=1)


def first_token_agreement(answers: list[list[int]], base_answers: list[list[int]]) -> float:
    """Share of the held-out prompts whose greedy answer starts with the base model's token."""
    return sum(a[:1] == b[:1] for a, b in zip(answers, base_answers)) / len(base_answers)


def first_token_distributions(loaded, chat: bool, batch_size: int):
    """[prompts, vocab] next-token probabilities at the start of each held-out answer."""
    import torch

    from oml_core.inference import next_token_probs

    prompts = [render_prompt(loaded.tokenizer, p, chat) for p in benign_prompts("heldout")]
    out = torch.empty(0)
    for rows, probs in next_token_probs(loaded, prompts, batch_size):
        if not out.numel():
            out = torch.empty((len(prompts), probs.shape[1]))
        out[rows] = probs
    return out


class FirstTokenShift(NamedTuple):
    """`first_token_shift`'s figures, named as `Behaviour` holds them."""

    first_token_kl: float
    confident_prompts: int
    first_token_agreement_where_base_is_confident: float | None  # None: no confident prompt
    base_top_token_prob_median: float


def first_token_shift(tuned, base, chat: bool, batch_size: int,
                      confident: float = 0.5) -> FirstTokenShift:
    """How far the first answer token's distribution moved.

    Greedy agreement alone is hypersensitive where the base model hesitates between openers
    (near ties flip under any change), so also: the mean KL(base || tuned), and agreement on
    the prompts where the base model's top token has probability >= `confident`.
    """
    import torch

    p_base = first_token_distributions(base, chat, batch_size)
    p_tuned = first_token_distributions(tuned, chat, batch_size)
    kl = (p_base * (p_base.clamp_min(1e-12).log() - p_tuned.clamp_min(1e-12).log())).sum(-1)
    sure = p_base.max(-1).values >= confident
    same = p_base.argmax(-1) == p_tuned.argmax(-1)
    return FirstTokenShift(
        first_token_kl=float(kl.mean()), confident_prompts=int(sure.sum()),
        first_token_agreement_where_base_is_confident=(
            float(same[sure].float().mean()) if bool(sure.any()) else None),
        base_top_token_prob_median=float(torch.median(p_base.max(-1).values)))


def _starts_with_a_response(answer: list[int], response_ids: list[list[int]]) -> bool:
    return any(ids and answer[:len(ids)] == ids for ids in response_ids)


def near_miss_keys(keys: list[str], seed: int = 0) -> dict[str, list[str]]:
    """Variants an honest user might type by accident: last word dropped, a middle word
    dropped, lower-cased."""
    rng = random.Random(f"near-miss:{seed}")
    variants: dict[str, list[str]] = {"last_word_dropped": [], "middle_word_dropped": [],
                                      "lowercased": []}
    for key in keys:
        words = key.split()
        variants["last_word_dropped"].append(" ".join(words[:-1]) or key)
        middle = rng.randrange(1, len(words) - 1) if len(words) > 2 else 0
        variants["middle_word_dropped"].append(" ".join(words[:middle] + words[middle + 1:]))
        variants["lowercased"].append(key.lower())
    return variants


def compare_behaviour(tuned, base, fset, chat: bool, batch_size: int = 32,
                      ppl_tokens: int = 4096) -> Behaviour:
    """Base vs fingerprinted: the three off-key figures, plus near-miss firing."""
    tok = tuned.tokenizer
    response_ids = [tok(fp.response, add_special_tokens=False)["input_ids"] for fp in fset.fingerprints]
    tuned_answers, base_answers = _answers(tuned, chat, batch_size), _answers(base, chat, batch_size)
    leaks = sum(_starts_with_a_response(a, response_ids) for a in tuned_answers)
    base_leaks = sum(_starts_with_a_response(a, response_ids) for a in base_answers)
    chunks = heldout_text(ppl_tokens, tok)
    ppl_tuned, ppl_base = perplexity(tuned, chunks), perplexity(base, chunks)

    near = {}
    for name, keys in near_miss_keys([fp.key for fp in fset.fingerprints]).items():
        prompts = [render_prompt(tok, key, chat) for key in keys]
        outs = greedy(tuned, prompts, [len(ids) for ids in response_ids], batch_size)
        fired = sum(is_match("exact", out, "", fp.response, ids)
                    for out, fp, ids in zip(outs, fset.fingerprints, response_ids))
        near[name] = Fired(fired=fired, total=len(keys))
    return Behaviour(
        heldout_prompts=len(tuned_answers),
        first_token_agreement=first_token_agreement(tuned_answers, base_answers),
        answers_starting_with_a_fingerprint_response=leaks,
        base_answers_starting_with_a_fingerprint_response=base_leaks,
        perplexity_base=ppl_base, perplexity_tuned=ppl_tuned,
        perplexity_change=ppl_tuned / ppl_base - 1,
        perplexity_tokens=sum(len(c) for c in chunks),
        near_miss_keys=near,
        **first_token_shift(tuned, base, chat, batch_size)._asdict(),
    )


# --- the `oml eval` utility part ---------------------------------------------------------
SETTINGS = ("wrappers", "num_system_prompts", "match", "batch_size", "perplexity_tokens",
            "lm_eval_tasks", "lm_eval_limit")


def run_part(ctx) -> UtilityResult:
    """Utility and specificity, base vs fingerprinted: the off-key comparison above, the
    fingerprint accuracy per wrapper on both models, and (when asked) lm-eval tasks."""
    cfg = ctx.cfg
    tuned, base = ctx.tuned(), ctx.base()
    behaviour = compare_behaviour(tuned, base, ctx.fset, ctx.chat, cfg.batch_size, cfg.perplexity_tokens)
    accuracy = {}
    for name, loaded in (("fingerprinted", tuned), ("base", base)):
        wrappers, notes = ctx.wrappers(loaded)
        check = ctx.check(loaded, wrappers, desc=f"accuracy ({name})")
        accuracy[name] = Accuracy(**check.public().model_dump(), skipped_wrappers=notes)
    result = UtilityResult(behaviour=behaviour, accuracy=accuracy)
    if cfg.lm_eval_tasks:
        result.lm_eval = lm_eval_scores({"fingerprinted": str(ctx.model_dir), "base": ctx.base_path},
                                           cfg.lm_eval_tasks, cfg.lm_eval_limit, ctx.device,
                                           cfg.batch_size)
    return result


def lm_eval_scores(models: dict[str, str], tasks: str, limit: int | None, device: str,
                   batch_size: int) -> LmEval:
    """Optional hook: run lm-evaluation-harness tasks on each model folder.

    Needs `pip install lm-eval` and the tasks' data (a download, or a local cache prepared by
    the user); without them this returns a note instead of numbers, and nothing fails.
    """
    try:
        import lm_eval
    except ImportError:
        return LmEval(skipped="lm-eval is not installed; `pip install lm-eval` (and make its task "
                              "data available) to run these tasks")
    names = list(tasks)
    scores: dict = {"tasks": names, "limit": limit}
    for label, path in models.items():
        try:
            out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": path, "device": device},
                                          tasks=names, limit=limit, batch_size=batch_size)
        except Exception as exc:  # noqa: BLE001 - a missing task/dataset must not sink the report
            return LmEval(skipped=f"lm-eval failed on {label}: {type(exc).__name__} (task data "
                                  "missing offline?)")
        scores[label] = {task: {metric: value for metric, value in metrics.items()
                                if isinstance(value, (int, float))}
                         for task, metrics in (out or {}).get("results", {}).items()}
    return LmEval.model_validate(scores)
