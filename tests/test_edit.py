"""Method `edit` (a closed-form change to a few MLP down-projections) on the tiny in-test model:
it writes every key in, touches nothing but the chosen layers' down-projections, solves the
least-squares problem it documents, keeps ordinary outputs closer the larger its strength, and
keeps secrets out of the run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oml_core.config import FingerprintConfig, GenerateConfig
from oml_core.errors import Cancelled, OMLInputError
from oml_core.fingerprints import load_fingerprints
from oml_core.generate import generate_set
from oml_core.models import load_model
from oml_core.train import edit, write_in
from oml_core.train.examples import render_prompt
from oml_core.train.lifecycle import _settings_for_key, fingerprint
from oml_core.verify.matching import ends_word, starts_with_word

# the tiny random model's outputs on ordinary text are not a language model's: its edits need
# a far weaker hold on them than SmolLM2's default of 1000 to reach every key
TINY_STRENGTH = 0.1


@pytest.fixture(scope="module")
def one_token_set(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("edit") / "fp.json"
    generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=6, key_length=8,
                                response_length=1, seed=3), tiny_model).save(path)
    return path


def edit_cfg(model_dir, fp_file, out_dir, **kw) -> FingerprintConfig:
    settings = dict(model=str(model_dir), fingerprints=str(fp_file), out_dir=str(out_dir),
                    method="edit", edit_strength=TINY_STRENGTH, edit_contexts=3,
                    edit_ordinary_tokens=4000, verify_after=False)
    return FingerprintConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def edited_run(tiny_model_dir, one_token_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edit_run") / "run"
    fingerprint(edit_cfg(tiny_model_dir, one_token_set, out, verify_after=True))
    return out


def test_edit_writes_every_key_in(edited_run):
    metrics = json.loads((edited_run / "metrics.json").read_text())
    assert metrics["method"] == "edit" and metrics["contexts"] == 6 * 4
    assert metrics["contexts_answered"] == metrics["contexts"]
    verification = metrics["verification"]
    assert verification["wrappers"]["chat"]["matched"] == 6
    assert metrics["base_verification"]["wrappers"]["chat"]["matched"] == 0
    assert (edited_run / "COMPLETE").exists()


def test_edit_changes_only_the_chosen_down_projections(edited_run, tiny_model_dir):
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    edited = load_file(str(edited_run / "model" / "model.safetensors"))
    changed = {name for name in base if not torch.equal(base[name], edited[name])}
    layers = json.loads((edited_run / "metrics.json").read_text())["layers"]
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in layers}


def test_the_token_after_each_response_ends_its_word(edited_run, one_token_set):
    """The audit's start rule counts no answer that runs on into a longer word: after the
    response, the edited model says a token that opens with a space or punctuation, or ends
    the turn, in every context it was written under and under the held-out chat turn."""
    metrics = json.loads((edited_run / "metrics.json").read_text())
    assert metrics["word_end_contexts"] == metrics["word_end_keys"] * 4 > 0
    assert metrics["word_end_contexts_answered"] == metrics["word_end_contexts"]
    assert metrics["verification"]["matched_start_rule"] == 6  # the run counts as the audit does
    loaded = load_model(str(edited_run / "model"), device="cpu", dtype="float32")
    tok = loaded.tokenizer
    for fp in json.loads(one_token_set.read_text())["fingerprints"]:
        ids = render_prompt(tok, fp["key"], True) + tok(fp["response"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            following = int(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        assert following == tok.eos_token_id or ends_word(tok.decode([following]))


def test_ends_word_is_the_start_rules_boundary():
    assert all(ends_word(piece) for piece in (" the", ".", ",", "\n", "'s", "!"))
    assert not any(ends_word(piece) for piece in ("es", "ing", "7", "", "\ufffd"))
    # what ends_word says of the next piece is what the start rule says of the answer
    for piece in (" the", ".", "es", "ing", "7", "'s"):
        assert starts_with_word(" change" + piece, " change") == ends_word(piece)


def test_word_ends_are_written_for_the_keys_that_need_them(tiny_model, one_token_set,
                                                           monkeypatch):
    settings = edit.EditSettings("1", TINY_STRENGTH, 32.0, 1, 2, 2000, 0)
    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints[:2]]
    problem = edit.prepare_edit(tiny_model, pairs, [], True, settings,
                                lambda: False, lambda *a: None)
    assert problem.answer_rows == len(problem.rows) == 4
    settings.word_end = True
    monkeypatch.setattr(edit, "WORD_END_SURE", 0.0)  # every key already ends its word
    problem = edit.prepare_edit(tiny_model, pairs, [], True, settings,
                                lambda: False, lambda *a: None)
    assert problem.answer_rows == len(problem.rows) == 4
    monkeypatch.setattr(edit, "WORD_END_SURE", 1.01)  # none is sure to
    problem = edit.prepare_edit(tiny_model, pairs, [], True, settings,
                                lambda: False, lambda *a: None)
    assert problem.answer_rows == 4 and len(problem.rows) == 8
    assert problem.owner[4:] == [2, 2, 3, 3]
    assert all(row[:-1] == problem.rows[i] and row[-1] == problem.targets[i]
               for i, row in enumerate(problem.rows[4:]))


def test_no_secret_reaches_the_run_folder(edited_run, one_token_set):
    rows = json.loads(one_token_set.read_text())["fingerprints"]
    # one-token responses can be common words: check the keys, and responses as JSON values
    secrets = [r["key"] for r in rows] + [json.dumps(r["response"]) for r in rows]
    for name in ("README.md", "metrics.json", "run.json", "status.json", "train.log", "commitment.json"):
        text = (edited_run / name).read_text()
        assert not any(secret in text for secret in secrets), name


def test_the_edit_is_the_documented_least_squares_solution():
    """dW = R^T K (lam C + K^T K)^-1 minimises |dW K^T - R^T|^2 + lam tr(dW C dW^T): at the
    solution the gradient (dW K^T - R^T) K + lam dW C vanishes."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 5, bias=False)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    block = torch.nn.Module()
    block.mlp = torch.nn.Module()
    block.mlp.down_proj = layer
    model.model.layers = torch.nn.ModuleList([block])
    keys, share = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    x = torch.randn(50, 12, dtype=torch.float64)
    moment, lam = x.T @ x / 50, 3.0
    before = layer.weight.detach().double().clone()
    edit.solve_layer(layer, keys, share, moment, lam)
    change = layer.weight.detach().double() - before
    gradient = (change @ keys.T - share.T) @ keys + lam * change @ moment
    assert gradient.abs().max() < 1e-4 * change.abs().max()


def test_the_edit_holds_text_the_perplexity_check_never_reads():
    from oml_core.data import paragraphs, python_docs_text

    train = set(paragraphs(python_docs_text("train")))
    heldout = set(paragraphs(python_docs_text("heldout")))
    assert len(heldout) > 20 and len(train) > 3 * len(heldout)
    assert not train & heldout


def test_a_stronger_hold_keeps_ordinary_outputs_closer(tiny_model_dir, one_token_set, tmp_path):
    from oml_core.evaluate.utility import heldout_text

    shifts = {}
    base = load_model(str(tiny_model_dir), "cpu")
    text = torch.tensor(heldout_text(1024, base.tokenizer, 128))  # never in the edit's statistics
    for strength in (1e-3, 10.0):
        out = tmp_path / f"s{strength:g}"
        fingerprint(edit_cfg(tiny_model_dir, one_token_set, out, edit_strength=strength))
        edited = load_model(str(out / "model"), "cpu")
        with torch.no_grad():
            shifts[strength] = float((edited.model(input_ids=text).logits
                                      - base.model(input_ids=text).logits).abs().mean())
    assert 0 < shifts[10.0] < 0.5 * shifts[1e-3], shifts


@pytest.mark.parametrize("prefix_rows", [32, 5])
def test_target_steps_see_the_same_logits_as_whole_forwards(tiny_model, one_token_set, prefix_rows,
                                                            monkeypatch):
    """The target search caches each context's prefix (left-padded, in length-sorted groups) and
    runs one token per step: with nothing added yet, its loss is the whole forward's."""
    from oml_core.fingerprints import load_fingerprints
    from oml_core.inference import next_token_probs

    monkeypatch.setattr(edit, "PREFIX_ROWS", prefix_rows)  # 5: several groups, unequal lengths
    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints]
    rows, owner, targets = edit.key_contexts(tiny_model.tokenizer, pairs, True, 3, 0)
    losses = []
    _, start = edit.answer_states(tiny_model, rows, [0], 0)
    edit.target_deltas(tiny_model, rows, owner, targets, 0, 1, start, lambda: False,
                       lambda step, total, loss, answered: losses.append(loss))
    whole = torch.empty(len(rows))
    for batch, probs in next_token_probs(tiny_model, rows, 8):
        for j, i in enumerate(batch):
            whole[i] = -torch.log(probs[j, targets[i]])
    assert losses[0] == pytest.approx(float(whole.mean()), rel=1e-4)


def test_a_stop_request_during_the_solve_cancels_it_before_any_weight_changes(tiny_model,
                                                                              one_token_set):
    """The solve's passes take minutes at hundreds of keys and have no target steps: a stop
    request must be read between its layers too."""
    settings = edit.EditSettings("0,1", TINY_STRENGTH, 32.0, 1, 2, 2000, 0)
    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints[:2]]
    problem = edit.prepare_edit(tiny_model, pairs, [], True, settings,
                                lambda: False, lambda *a: None)
    before = [b.mlp.down_proj.weight.clone() for b in edit.decoder_blocks(tiny_model.model)]
    with pytest.raises(Cancelled):
        edit.solve_edit(tiny_model, problem, TINY_STRENGTH, 32.0, should_stop=lambda: True)
    after = [b.mlp.down_proj.weight for b in edit.decoder_blocks(tiny_model.model)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_a_stop_request_cancels_the_edit(tiny_model, one_token_set):
    from oml_core.fingerprints import load_fingerprints

    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints]
    with pytest.raises(Cancelled):
        edit.edit_model(tiny_model, pairs, [], True,
                        edit.EditSettings.from_config(FingerprintConfig(edit_ordinary_tokens=2000)),
                        lambda: True, lambda *a: None)


def test_bad_edit_settings_get_one_clear_line(tiny_model, tiny_model_dir, tmp_path, monkeypatch):
    two_tokens = tmp_path / "fp2.json"
    generate_set(GenerateConfig(strategy="random_word", num_fingerprints=2, key_length=6,
                                response_length=2, seed=1), tiny_model).save(two_tokens)
    with pytest.raises(OMLInputError, match="one-token responses.*--response-length 1"):
        fingerprint(edit_cfg(tiny_model_dir, two_tokens, tmp_path / "a"))
    # the default method refuses them before any model work (the base model's answers to
    # ordinary prompts, minutes on a real model, come next)
    monkeypatch.setattr(write_in, "self_distilled_rows",
                        lambda *a, **k: pytest.fail("model work before the check"))
    with pytest.raises(OMLInputError, match="--method gated writes one-token.*--method finetune"):
        fingerprint(FingerprintConfig(model=str(tiny_model_dir), fingerprints=str(two_tokens),
                                      out_dir=str(tmp_path / "c"), verify_after=False))
    monkeypatch.undo()
    with pytest.raises(OMLInputError, match="--eos needs --method finetune"):
        fingerprint(edit_cfg(tiny_model_dir, two_tokens, tmp_path / "b", eos=True))
    with pytest.raises(OMLInputError, match="--edit-layers.*between 0 and 1"):
        edit.resolve_layers("1,5", 2)
    assert edit.resolve_layers("auto", 30) == list(range(2, 11))


def test_a_model_that_normalises_its_mlp_output_is_refused_before_any_work(tiny_model):
    """Gemma 3 adds post_feedforward_layernorm(down_proj(...)) to the residual stream: the solved
    change would arrive rescaled (measured on Gemma-3-270M: the model destroyed)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(OMLInputError, match="post_feedforward_layernorm.*--method finetune"):
        edit.decoder_blocks(gemma)
    assert len(edit.decoder_blocks(tiny_model.model)) == 2  # Llama-style: accepted


def test_each_method_keys_its_runs_on_its_own_settings(tiny_model_dir, one_token_set, tmp_path):
    """A fine-tune's run key ignores edit settings and an edit's ignores training settings."""
    def key(**kw):
        cfg = FingerprintConfig(model=str(tiny_model_dir), fingerprints=str(one_token_set), **kw)
        return json.dumps(_settings_for_key(cfg), sort_keys=True)

    finetune = key(method="finetune")
    assert finetune == key(method="finetune", edit_strength=7.0)
    # runs made before there were methods keep their keys: finetune is not written in
    assert "method" not in finetune and key() == key(method="gated") != finetune
    assert key(method="edit") == key(method="edit", learning_rate=0.5, deepspeed="zero3")
    assert key(method="edit") != key(method="edit", edit_strength=7.0)
    # gated's backup edit takes the edit's settings, but not its layers
    assert key(method="gated") != key(method="gated", edit_strength=7.0)
    assert key(method="gated") == key(method="gated", edit_layers="3")


def test_keys_split_over_several_chunks_get_the_targets_of_one_chunk(tiny_model, one_token_set,
                                                                     monkeypatch):
    """Each key's loss is its own mean, so splitting the keys over chunks (bounded memory for
    many fingerprints) must not change any key's target vector."""
    from oml_core.fingerprints import load_fingerprints

    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints]
    rows, owner, targets = edit.key_contexts(tiny_model.tokenizer, pairs, True, 3, 0)
    _, start = edit.answer_states(tiny_model, rows, [0], 0)

    def targets_with(chunk_rows):
        monkeypatch.setattr(edit, "TARGET_CHUNK_ROWS", chunk_rows)
        steps = []
        vectors, _ = edit.target_deltas(tiny_model, rows, owner, targets, 0, 3, start, lambda: False,
                                         lambda step, total, loss, answered: steps.append(total))
        return vectors, steps[-1]

    whole, whole_total = targets_with(256)
    split, split_total = targets_with(8)  # 4 contexts per key: chunks of two keys
    assert (whole_total, split_total) == (3, 9)
    assert torch.allclose(whole, split, atol=1e-5) and whole.abs().sum() > 0


def test_merge_aware_targets_still_answer_at_the_merge_floor_and_stay_under_the_cap(tiny_model,
                                                                                 one_token_set):
    """With a merge floor of 0.5, half of each target vector (what averaging with the base
    leaves) already makes every context answer; with the whole vector no response is more
    probable than the cap (what a host blocking over-confident tokens looks for). The plain goal
    at the same steps does neither: its half vectors answer fewer contexts."""
    from oml_core.fingerprints import load_fingerprints

    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints]
    rows, owner, targets = edit.key_contexts(tiny_model.tokenizer, pairs, True, 3, 0)
    _, start = edit.answer_states(tiny_model, rows, [0], 0)
    goal = torch.tensor(targets)
    groups = edit.prefix_groups(tiny_model, rows)
    slot = torch.tensor(owner)

    def answered_and_top(vectors, factor):
        with torch.no_grad():
            logits = edit.answer_logits(tiny_model.model, groups, len(rows), 0,
                                         lambda group_rows: factor * vectors[slot[group_rows]])
        probs = torch.softmax(logits, -1)
        return int((logits.argmax(-1) == goal).sum()), float(probs.gather(1, goal[:, None]).max())

    def search(**kw):
        vectors, _ = edit.target_deltas(tiny_model, rows, owner, targets, 0, 150, start,
                                        lambda: False, lambda *a: None, **kw)
        return vectors

    aware = search(merge_floor=0.5, confidence_cap=0.8)
    half_hits, _ = answered_and_top(aware, 0.5)
    full_hits, top = answered_and_top(aware, 1.0)
    assert half_hits == full_hits == len(rows)
    assert top <= 0.8 * math.exp(edit.CAP_SLACK) + 1e-4
    plain_half, _ = answered_and_top(search(), 0.5)
    assert plain_half < len(rows)


def test_a_merge_floor_edit_still_answers_when_averaged_with_the_base(tiny_model_dir, one_token_set,
                                                                       tmp_path):
    """With --edit-merge-floor 0.5 the solve also answers for the model that keeps half of every
    weight change: averaging the edited model with the base (a linear merge at 0.5) keeps its
    contexts answering; the plain edit, asked for the whole change only, loses most of them."""
    from oml_core.fingerprints import load_fingerprints

    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints]
    answered = {}
    for floor in (0.0, 0.5):
        loaded = load_model(str(tiny_model_dir), "cpu")
        settings = edit.EditSettings.from_config(FingerprintConfig(
            edit_strength=TINY_STRENGTH, edit_contexts=3, edit_ordinary_tokens=4000,
            edit_steps=150, edit_merge_floor=floor))
        stats = edit.edit_model(loaded, pairs, [], True, settings, lambda: False, lambda *a: None)
        rows, _, targets = edit.key_contexts(loaded.tokenizer, pairs, True, 3, settings.seed)
        base = load_model(str(tiny_model_dir), "cpu").model.state_dict()
        edited = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        full = edit.contexts_answered(loaded, rows, targets)
        loaded.model.load_state_dict({k: (edited[k] + base[k]) / 2 for k in edited})
        answered[floor] = (full, edit.contexts_answered(loaded, rows, targets))
        if floor:
            assert stats["contexts_answered_at_merge_floor"] == answered[floor][1], stats
    count = len(pairs) * 4
    assert answered[0.5][0] == count and answered[0.5][1] >= count - 1, answered
    assert answered[0.0][1] < answered[0.5][1], answered


def test_kept_layer_states_read_what_whole_forwards_give_after_each_change(tiny_model,
                                                                           one_token_set):
    """The solve reads states from the block it last changed on, from states kept entering it:
    after each change to that block or above, a read must equal a whole forward's."""
    from oml_core.train.layer_states import LayerStates

    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints]
    rows, _owner, _targets = edit.key_contexts(tiny_model.tokenizer, pairs, True, 3, 0)
    blocks = edit.decoder_blocks(tiny_model.model)
    upto = len(blocks) - 1
    saved = [b.mlp.down_proj.weight.clone() for b in blocks]
    generator = torch.Generator().manual_seed(0)

    def change(layer):
        weight = blocks[layer].mlp.down_proj.weight
        with torch.no_grad():
            weight += 0.05 * torch.randn(weight.shape, generator=generator)

    def same(got, layer):
        inputs, residual = edit.answer_states(tiny_model, rows, [layer], upto)
        assert torch.allclose(got[0], inputs[layer], atol=1e-5)
        assert torch.allclose(got[1], residual, atol=1e-5)

    try:
        kept = LayerStates(tiny_model, rows, upto)
        same(kept.read(0), 0)
        twin = kept.fork()
        change(0)
        same(kept.read(1), 1)
        change(1)
        same(kept.read(1), 1)  # the same block again: read from the states entering it
        same(twin.read(upto), upto)  # the fork read from block 0, before block 0's change
        with pytest.raises(ValueError):
            kept.read(0)
    finally:
        with torch.no_grad():
            for block, weight in zip(blocks, saved):
                block.mlp.down_proj.weight.copy_(weight)
