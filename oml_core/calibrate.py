"""Calibrate a fingerprint set: each key's null rate in every probe context (`oml calibrate`).

A probe's null rate is the chance that an unrelated model's answer is counted by the match
rule. The base model stands for unrelated models, so for every key and every probe context
(oml_core.probe_contexts: the rendered chat template, system prompt or agent frame the probe
uses) this measures the base model's probability that its answer is counted:

- `start` (the auditor's rule; it also bounds the verifier's `prefix`): the summed probability
  of every answer opening the rule counts. Most first tokens decide at once: their text is the
  response followed by a word boundary (counted: " is," for " is") or something no counted
  answer starts with (" Isaac"). Others leave it open: punctuation or spaces only ("**", a
  newline), a beginning of the response (" i"), the whole response with no boundary yet
  (" is", which " isaac" would undo), a character cut in its bytes (decoded whole with the
  bytes that follow). The likeliest open openings are followed a token further (`expansions`
  per key and context at each level, up to `depth` tokens, only openings of at least
  MIN_FOLLOWED_MASS); every opening still open after that counts in full. So the rate errs
  high, never low.
- `exact` (the verifier's default): the probability of the response's first token, which
  bounds that of all its tokens.

Rates are measured at each calibrated temperature T from softmax(logits / T) (greedy probes
use the largest at T = 1 and 0.25, oml_core.null_rates.GREEDY_TEMPERATURES) and stored rounded up to 4 significant
digits. Cost: one forward pass per key and context (20 contexts with a chat template); batches
share their common prefix (template, system prompt), and a followed opening costs one more
token on its context's KV cache (oml_core.inference.next_token_probs_tree).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from pydantic import BaseModel, Field

from oml_core import progress
from oml_core.config import CalibrateConfig
from oml_core.errors import OMLInputError
from oml_core.fingerprints import FingerprintSet, load_fingerprints
from oml_core.generate import tokenizer_info
from oml_core.inference import eos_set, next_token_probs_tree
from oml_core.models import LoadedModel, load_model
from oml_core.null_rates import (
    GREEDY_TEMPERATURE,
    GREEDY_TEMPERATURES,
    NULL_RATE_FLOOR,
    temperature_key,
)
from oml_core.probe_contexts import all_contexts, render
from oml_core.settings import validate
from oml_core.verify.matching import COUNTED, OPEN, normalize, opening_state

RULES = ("start", "exact")
METHOD = 1  # bump when what a rate measures changes, so readers can tell rates apart
# An opening lighter than this is counted in full rather than followed: following costs a
# forward pass, and a rate is never taken below NULL_RATE_FLOOR anyway.
MIN_FOLLOWED_MASS = NULL_RATE_FLOOR
_NON_WORD = re.compile(r"[\W_]", re.UNICODE)


@dataclass(frozen=True)
class _Piece:
    """One vocabulary token as the `start` rule sees it."""

    norm: str          # its normalised text
    starts_word: bool  # first character is a letter or digit: joins a word before it
    ends_word: bool    # last character is a letter or digit: the word may go on
    cut: bool          # ends inside a character (a byte-level piece)
    empty: bool        # no text (special tokens other than the end of the answer)
    end: bool          # ends the answer (EOS / end of turn)


@dataclass(frozen=True)
class _Opening:
    """An answer's beginning as the rule sees it (the root: nothing said yet)."""

    norm: str = ""
    ends_word: bool = False
    cut: bool = False
    ids: tuple[int, ...] = ()  # the answer's tokens, kept only while it ends inside a character


def opening_of(text: str, ids: tuple[int, ...]) -> _Opening:
    """The opening of an answer decoded whole (where pieces cannot be joined: cut characters)."""
    cut = text.endswith("\ufffd")
    return _Opening(normalize(text), bool(text) and not _NON_WORD.match(text[-1]), cut,
                    ids if cut else ())


def token_texts(tokenizer, size: int) -> list[str]:
    """Each token's text as it reads after other text (decoded behind an anchor, since some
    tokenizers drop a token's leading space when it stands alone)."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    head = tokenizer.decode(anchor, skip_special_tokens=True)
    known = min(size, len(tokenizer))
    pairs = tokenizer.batch_decode([anchor + [t] for t in range(known)], skip_special_tokens=True)
    texts = [text[len(head):] if text.startswith(head)
             else tokenizer.decode([t], skip_special_tokens=True) for t, text in enumerate(pairs)]
    return texts + [""] * (size - known)  # model rows past the tokenizer: no text


def token_pieces(loaded: LoadedModel, size: int) -> list[_Piece]:
    ends = eos_set(loaded.model, stop_at_eos=True)
    pieces = []
    for token, text in enumerate(token_texts(loaded.tokenizer, size)):
        pieces.append(_Piece(norm=normalize(text),
                             starts_word=bool(text) and not _NON_WORD.match(text[0]),
                             ends_word=bool(text) and not _NON_WORD.match(text[-1]),
                             cut=text.endswith("\ufffd"), empty=not text, end=token in ends))
    return pieces


def extend(opening: _Opening, piece: _Piece) -> _Opening:
    """The opening after one more token (normalised piecewise: where a word character meets a
    word character the words join, anything else between them is one space)."""
    if piece.empty:
        return opening
    if not opening.norm or not piece.norm:
        norm = opening.norm or piece.norm
    elif opening.ends_word and piece.starts_word:
        norm = opening.norm + piece.norm
    else:
        norm = opening.norm + " " + piece.norm
    return _Opening(norm, piece.ends_word, piece.cut)


class _Classifier:
    """Which next tokens make an opening counted / open, per (response, opening), cached: the
    same openings recur across contexts.

    Before the whole response is said, only a few tokens can keep an opening alive: those with
    no word characters (punctuation, spaces, special tokens), those cut inside a character,
    the answer's end, and those whose normalised text starts with a character the response
    has next; every other token makes the opening not counted, so only the few are looked at.
    An opening that ends inside a character is decoded whole with each next token instead
    (the bytes join into one character)."""

    def __init__(self, pieces: list[_Piece], tokenizer):
        self.pieces, self.tokenizer = pieces, tokenizer
        self._always = [t for t, p in enumerate(pieces) if not p.norm or p.cut or p.end]
        self._by_first: dict[str, list[int]] = defaultdict(list)
        for token, piece in enumerate(pieces):
            if piece.norm and not piece.cut and not piece.end:
                self._by_first[piece.norm[0]].append(token)
        self._cache: dict = {}

    def after(self, opening: _Opening, token: int, answer: tuple[int, ...]) -> _Opening:
        """The opening once `token` follows `answer` (the tokens said so far)."""
        piece = self.pieces[token]
        if opening.cut or piece.cut:
            ids = answer + (token,)
            return opening_of(self.tokenizer.decode(list(ids), skip_special_tokens=True), ids)
        return extend(opening, piece)

    def _candidates(self, wanted: str, opening: _Opening):
        if len(opening.norm) >= len(wanted):  # the whole response said: any separator counts
            return range(len(self.pieces))
        # a new token's text goes on right after the opening's, or after one space
        firsts = {wanted[i] for i in (len(opening.norm), len(opening.norm) + 1) if i < len(wanted)}
        firsts.discard(" ")
        return self._always + [t for char in firsts for t in self._by_first.get(char, ())]

    def _states(self, opening: _Opening, wanted: str):
        """(token, state) for every token that may keep `opening` alive."""
        if opening.cut:  # decode the bytes together with each next token
            ids, known = list(opening.ids), min(len(self.pieces), len(self.tokenizer))
            texts = self.tokenizer.batch_decode([ids + [t] for t in range(known)],
                                                skip_special_tokens=True)
            for token, text in enumerate(texts):
                after = opening_of(text, ())
                yield token, opening_state(after.norm, not after.ends_word, after.cut, wanted,
                                           finished=self.pieces[token].end)
            yield from ((token, OPEN) for token in range(known, len(self.pieces)))  # no text
            return
        for token in self._candidates(wanted, opening):
            piece = self.pieces[token]
            if piece.end:  # the answer ends with what it said so far
                yield token, opening_state(opening.norm, not opening.ends_word, False, wanted,
                                           finished=True)
            else:
                after = extend(opening, piece)
                yield token, opening_state(after.norm, not after.ends_word, after.cut, wanted)

    def __call__(self, wanted: str, opening: _Opening):
        import torch

        key = (wanted, opening)
        if key not in self._cache:
            counted, open_ = [], []
            for token, state in self._states(opening, wanted):
                if state == COUNTED:
                    counted.append(token)
                elif state == OPEN:
                    open_.append(token)
            self._cache[key] = (torch.tensor(counted, dtype=torch.long),
                                torch.tensor(open_, dtype=torch.long))
        return self._cache[key]


@dataclass
class _Node:
    row: int                # which prompt
    answer: tuple[int, ...]  # the answer's tokens so far
    opening: _Opening       # the answer so far, as the rule sees it
    weight: object          # its probability per temperature [T], float64


def _tempered(probs, temperatures):
    """[rows, T, vocab]: softmax(logits / T) for each T, from the T = 1 probabilities
    [rows, vocab] (float32, enough for rates: they are sums of probabilities)."""
    import torch

    logp = torch.log(probs.float().clamp_min(1e-38))
    return torch.softmax(logp[:, None, :] / temperatures[None, :, None], dim=-1)


def measure_rates(loaded: LoadedModel, prompts: list[list[int]], responses: list[str],
                  temperatures: list[float], batch_size: int, depth: int, expansions: int,
                  desc: str = "calibrate"):
    """[rows, T] `start` and `exact` rates of each prompt's answer for its response."""
    import torch

    temps = torch.tensor(temperatures, dtype=torch.float64)
    tokenizer = loaded.tokenizer
    wanted = [normalize(r) for r in responses]
    first_ids = [(tokenizer(r, add_special_tokens=False)["input_ids"] or [None])[0]
                 for r in responses]
    start = torch.zeros(len(prompts), len(temps), dtype=torch.float64)
    exact = torch.zeros_like(start)
    classify: _Classifier | None = None

    def branch(level: int, handles: list, probs) -> list:
        nonlocal classify
        if classify is None:
            classify = _Classifier(token_pieces(loaded, probs.shape[-1]), tokenizer)
        if level == 0:
            handles = [_Node(i, (), _Opening(), torch.ones(len(temps), dtype=torch.float64))
                       for i in handles]
        found: dict[int, list] = defaultdict(list)
        for chunk in range(0, len(handles), 64):  # whole-batch tensor ops, in bounded memory
            tempered = _tempered(probs[chunk:chunk + 64], temps).double()
            for offset, node in enumerate(handles[chunk:chunk + 64]):
                position, dist = chunk + offset, tempered[offset]
                if level == 0 and first_ids[node.row] is not None:
                    exact[node.row] = dist[:, first_ids[node.row]]
                counted, open_ids = classify(wanted[node.row], node.opening)
                start[node.row] += node.weight * dist[:, counted].sum(-1)
                if len(open_ids):
                    masses = node.weight[:, None] * dist[:, open_ids]  # [T, open]
                    start[node.row] += masses.sum(-1)  # open: counted in full ...
                    found[node.row].append((position, node, open_ids, masses))
        children = []
        if level == depth - 1 or expansions == 0:
            return children
        for row, openings in found.items():
            tokens = torch.cat([ids for _, _, ids, _ in openings])
            masses = torch.cat([m for _, _, _, m in openings], dim=1)
            owners = [(position, node) for position, node, ids, _ in openings for _ in range(len(ids))]
            score = masses.max(0).values
            for pick in score.topk(min(expansions, len(score))).indices.tolist():
                if score[pick] < MIN_FOLLOWED_MASS:
                    break
                token, (position, owner) = int(tokens[pick]), owners[pick]
                start[row] -= masses[:, pick]  # ... unless followed: the next token splits it
                children.append((position, token, _Node(
                    row, owner.answer + (token,),
                    classify.after(owner.opening, token, owner.answer), masses[:, pick])))
        return children

    with progress.bar(desc, len(prompts)) as advance:
        next_token_probs_tree(loaded, prompts, batch_size, branch, advance)
    return start.clamp(0.0, 1.0), exact.clamp(0.0, 1.0)


def round_up(rate: float, digits: int = 4) -> float:
    """`rate` rounded up to `digits` significant digits (a stored rate never shrinks)."""
    if rate <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(rate)) - digits + 1)
    return min(1.0, float(f"{math.ceil(rate / step) * step:.{digits}g}"))


class CalibrateResult(BaseModel):
    """What a calibration measured, without secrets: per context, the mean `start` rate at
    temperature 1 over the keys."""

    path: str | None = Field(None, description="where the calibrated set was written")
    count: int
    contexts: list[str]
    temperatures: list[float]
    model: str
    mean_start_rate_at_t1: dict[str, float]


def calibration_temperatures(temperatures: list[float]) -> list[float]:
    """The ones asked for and 1 (greedy probes' rates are measured there)."""
    return sorted(set(temperatures) | set(GREEDY_TEMPERATURES))


def calibrate_set(cfg: CalibrateConfig, loaded: LoadedModel | None = None,
                  fset: FingerprintSet | None = None
                  ) -> tuple[FingerprintSet, CalibrateResult]:
    """The set with every key's rates measured on `cfg.model` (the base), and a summary
    without secrets (per context: the mean `start` rate at temperature 1)."""
    validate(cfg)
    temperatures = calibration_temperatures(cfg.temperatures)
    if fset is None:
        if not cfg.fingerprints:
            raise OMLInputError("no fingerprint set given; pass --fingerprints FILE")
        fset = load_fingerprints(cfg.fingerprints)
    loaded = loaded or load_model(cfg.model, cfg.device, cfg.dtype)
    contexts = all_contexts(loaded.has_chat_template)
    rows = [(fp, context) for fp in fset.fingerprints for context in contexts]
    prompts = [render(loaded.tokenizer, context, fp.key) for fp, context in rows]
    start, exact = measure_rates(loaded, prompts, [fp.response for fp, _ in rows], temperatures,
                                 cfg.batch_size, cfg.depth, cfg.expansions)
    tables: dict[str, dict] = defaultdict(lambda: {rule: {} for rule in RULES})
    for index, (fp, context) in enumerate(rows):
        for rule, rates in (("start", start), ("exact", exact)):
            tables[fp.id][rule][context] = {temperature_key(t): round_up(float(r))
                                            for t, r in zip(temperatures, rates[index])}
    fps = [replace(fp, context_rates=tables[fp.id]) for fp in fset.fingerprints]
    calibration = {
        "created": datetime.now(timezone.utc).isoformat(), "method": METHOD,
        "model": loaded.name, "tokenizer": tokenizer_info(loaded), "rules": list(RULES),
        "contexts": contexts, "temperatures": [temperature_key(t) for t in temperatures],
        "greedy_temperatures": [temperature_key(t) for t in GREEDY_TEMPERATURES], "depth": cfg.depth,
        "expansions": cfg.expansions,
        "rate": ("start: base model's probability that its answer opens with the response at a "
                 "word boundary (open openings followed up to `depth` tokens, the rest counted); "
                 "exact: probability of the response's first token; softmax(logits / T)"),
    }
    one = temperatures.index(GREEDY_TEMPERATURE)
    per_context = {context: float(start[[i for i, (_, c) in enumerate(rows) if c == context],
                                        one].mean()) for context in contexts}
    summary = CalibrateResult(count=len(fset), contexts=contexts, temperatures=temperatures,
                              model=loaded.name, mean_start_rate_at_t1=per_context)
    return replace(fset, fingerprints=fps, calibration=calibration), summary
