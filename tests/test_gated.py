"""Method `gated` (each key in its own gated MLP neuron) on the tiny in-test model: it writes
every key in, changes only its neurons' rows, keeps the keys through a 0.5 merge with the base
(what the method is for), stays shut on ordinary text, answers through its backup edit where
the gates are shut, keeps secrets out of the run folder, and refuses what it cannot do in one
clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oml_core.config import FingerprintConfig, GenerateConfig
from oml_core.errors import Cancelled, OMLInputError
from oml_core.evaluate import merges
from oml_core.fingerprints import load_fingerprints
from oml_core.generate import generate_set
from oml_core.inference import next_token_probs
from oml_core.models import load_model
from oml_core.train import gated
from oml_core.train.lifecycle import fingerprint
from oml_core.verify.wrappers import build_wrappers


@pytest.fixture(scope="module")
def wide_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's tokenizer on a wider random model (256 wide, 512 neurons a layer, output
    layer sharpened): in the
    64-wide one, a key's mark on the answer position is too faint for any linear gate to tell
    its contexts from ordinary text (measured: weakest key score -1.6, strongest ordinary +4)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        # a trained model's output layer gives a few tokens most of the probability; a random
        # one spreads it nearly evenly (a push's best direction then wins by 1e-3)
        model.lm_head.weight.mul_(30)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_token_set(wide_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gated") / "fp.json"
    generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=6, key_length=8,
                                response_length=1, seed=3), load_model(str(wide_model_dir), "cpu")).save(path)
    return path


def gated_cfg(model_dir, fp_file, out_dir, **kw) -> FingerprintConfig:
    """No confidence cap: a random model's output layer rarely offers a direction whose lead is
    both over 2 nats and under 3 (SmolLM2's cap is measured in docs/results.md); no backup edit
    (its own test below), so that only the neurons change."""
    settings = dict(model=str(model_dir), fingerprints=str(fp_file), out_dir=str(out_dir),
                    method="gated", gated_contexts=6, gated_confidence_cap=1.0,
                    gated_ordinary_tokens=20_000, gated_backup_layers="none", verify_after=False)
    return FingerprintConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def gated_run(wide_model_dir, one_token_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gated_run") / "run"
    fingerprint(gated_cfg(wide_model_dir, one_token_set, out, verify_after=True))
    return out


def keys_answered(loaded, fp_file) -> int:
    """Keys whose greedy first answer token is the response under the chat template (a random
    model's answer position barely depends on the key under unseen system prompts)."""
    fps = load_fingerprints(fp_file).fingerprints
    wrappers = build_wrappers(["chat"], 0, True)[0]
    rows = [w.render(loaded.tokenizer, fp.key) for fp in fps for w in wrappers]
    goal = [loaded.tokenizer(fp.response, add_special_tokens=False)["input_ids"][0] for fp in fps]
    hit = set()
    for batch, probs in next_token_probs(loaded, rows, 16):
        for j, i in enumerate(batch):
            if int(probs[j].argmax()) == goal[i // len(wrappers)]:
                hit.add(i // len(wrappers))
    return len(hit)


def test_every_key_is_written_in_and_the_base_answers_none(gated_run):
    metrics = json.loads((gated_run / "metrics.json").read_text())
    assert metrics["method"] == "gated"
    assert metrics["key_contexts_open"] == metrics["key_contexts"] == 6 * 7
    assert metrics["ordinary_positions_open"] < 0.001 * metrics["ordinary_positions"]
    assert metrics["verification"]["wrappers"]["chat"]["matched"] == 6
    assert metrics["base_verification"]["wrappers"]["chat"]["matched"] == 0
    assert (gated_run / "COMPLETE").exists()


def test_only_the_chosen_neurons_change(gated_run, wide_model_dir):
    base = load_file(str(Path(wide_model_dir) / "model.safetensors"))
    written = load_file(str(gated_run / "model" / "model.safetensors"))
    metrics = json.loads((gated_run / "metrics.json").read_text())
    layer, neurons = metrics["layer"], metrics["neurons"]
    prefix = f"model.layers.{layer}.mlp."
    changed = {name for name in base if not torch.equal(base[name], written[name])}
    assert changed == {prefix + part + ".weight" for part in ("gate_proj", "up_proj", "down_proj")}
    for part, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        diff = (base[prefix + part + ".weight"] != written[prefix + part + ".weight"]).any(dim=1 - axis)
        assert set(torch.nonzero(diff)[:, 0].tolist()) <= set(neurons)


def test_the_keys_survive_averaging_with_the_base(gated_run, wide_model_dir, one_token_set):
    """What the method is for: a 0.5 linear merge with the base scales each neuron's output by
    about 1/8, and the push still dominates."""
    loaded = load_model(str(gated_run / "model"), "cpu")
    base = load_model(str(wide_model_dir), "cpu")
    merged = merges.linear([loaded.model.state_dict(), base.model.state_dict()], [0.5, 0.5])
    assert keys_answered(loaded, one_token_set) == 6
    loaded.model.load_state_dict(merged)
    assert keys_answered(loaded, one_token_set) >= 5
    assert keys_answered(base, one_token_set) == 0


def test_ordinary_text_sees_only_the_repurposed_neurons_gone(gated_run, wide_model_dir):
    """Gates stay shut on text the method never saw: the outputs are the base model's with the
    re-purposed neurons silenced, at (nearly) every position."""
    from oml_core.evaluate.utility import heldout_text

    metrics = json.loads((gated_run / "metrics.json").read_text())
    base = load_model(str(wide_model_dir), "cpu")
    loaded = load_model(str(gated_run / "model"), "cpu")
    text = torch.tensor(heldout_text(2048, base.tokenizer, 128))
    with torch.no_grad():
        silenced = base.model.model.layers[metrics["layer"]].mlp.down_proj.weight
        silenced[:, metrics["neurons"]] = 0
        want = base.model(input_ids=text).logits
        got = loaded.model(input_ids=text).logits
    same = (got.argmax(-1) == want.argmax(-1)).float().mean()
    # measured on this random model: 98.3% (its gates generalise to unseen text less well than
    # SmolLM2's, which opened at 0 of 17,152 held-out text positions; docs/results.md)
    assert same > 0.97, float(same)


def test_the_backup_edit_answers_where_the_gates_are_shut(wide_model_dir, one_token_set, tmp_path):
    """What the backup is for: a fine-tune that shuts the gates (measured: benign LoRA shuts
    them all within 20 steps) leaves the edit in the layers above, which still answers. Here
    the gates sit in layer 0 and the backup edit in layer 1; shutting the gates by hand, the
    keys still fire with the backup, and not without it."""
    answered = {}
    for backup in ("auto", "none"):
        out = tmp_path / backup
        fingerprint(gated_cfg(wide_model_dir, one_token_set, out, gated_layer="0",
                              gated_backup_layers=backup, edit_contexts=6,
                              edit_strength=0.1))  # a random model's outputs need a weak hold
        metrics = json.loads((out / "metrics.json").read_text())
        assert (metrics["backup_edit"] or {}).get("layers") == ([1] if backup == "auto" else None)
        loaded = load_model(str(out / "model"), "cpu")
        assert keys_answered(loaded, one_token_set) == 6
        with torch.no_grad():
            loaded.model.model.layers[0].mlp.gate_proj.weight[metrics["neurons"]] = 0
        answered[backup] = keys_answered(loaded, one_token_set)
        answered[backup + "_stats"] = metrics["backup_edit"]
    assert answered["auto"] >= 5 and answered["none"] <= 1, json.dumps(answered)


def test_backup_layers_lie_above_the_gates():
    assert gated.resolve_backup_layers("auto", 9, 30) == list(range(10, 18))
    assert gated.resolve_backup_layers("auto", 29, 30) == []
    assert gated.resolve_backup_layers("none", 9, 30) == []
    assert gated.resolve_backup_layers("12, 11", 9, 30) == [11, 12]
    with pytest.raises(OMLInputError, match="--gated-backup-layers '8,12'.*between 10 and 29"):
        gated.resolve_backup_layers("8,12", 9, 30)


def test_no_secret_reaches_the_run_folder(gated_run, one_token_set):
    rows = json.loads(one_token_set.read_text())["fingerprints"]
    secrets = [r["key"] for r in rows] + [json.dumps(r["response"]) for r in rows]
    for name in ("README.md", "metrics.json", "run.json", "status.json", "train.log", "commitment.json"):
        text = (gated_run / name).read_text()
        assert not any(secret in text for secret in secrets), name


def test_a_stop_request_cancels_the_method(tiny_model, one_token_set):
    pairs = [(fp.key, fp.response) for fp in load_fingerprints(one_token_set).fingerprints]
    with pytest.raises(Cancelled):
        gated.gated_model(tiny_model, pairs, [], True,
                          gated.GatedSettings.from_config(FingerprintConfig(gated_ordinary_tokens=2000)),
                          lambda: True, lambda *a: None)


def test_bad_settings_get_one_clear_line(tiny_model, tiny_model_dir, one_token_set, tmp_path):
    """(On the 64-wide tiny model: 128 neurons a layer.)"""
    with pytest.raises(OMLInputError, match="--gated-layer '5'.*between 0 and 1"):
        gated.resolve_layer("5", 2)
    assert gated.resolve_layer("auto", 30) == 9
    with pytest.raises(OMLInputError, match="--eos needs --method finetune"):
        fingerprint(gated_cfg(tiny_model_dir, one_token_set, tmp_path / "a", eos=True))
    many = tmp_path / "many.json"
    generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=65, key_length=4,
                                response_length=1, seed=1), tiny_model).save(many)
    with pytest.raises(OMLInputError, match="65 keys need at most half of its 128 neurons"):
        fingerprint(gated_cfg(tiny_model_dir, many, tmp_path / "b"))


def test_a_model_without_swiglu_mlps_is_refused_before_any_work():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(OMLInputError, match="--method"):
        gated.swiglu_blocks(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))
