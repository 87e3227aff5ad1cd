"""End-to-end on the real bundled SmolLM2-135M-Instruct (marked e2e; CI runs them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oml_core.config import GenerateConfig, VerifyConfig
from oml_core.generate import generate_set
from oml_core.generate.perinucleus import context_wrapper
from oml_core.inference import next_token_probs
from oml_core.verify import verify

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def perinucleus_set(bundled_model):
    return generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=16, key_length=16,
                                       response_length=1, seed=11), bundled_model)


def test_perinucleus_responses_are_outside_the_nucleus_of_the_real_model(bundled_model,
                                                                         perinucleus_set):
    tok = bundled_model.tokenizer
    assert perinucleus_set.generation["context"] == "raw"
    wrapper = context_wrapper("raw", True)
    prompts = [wrapper.render(tok, fp.key) for fp in perinucleus_set.fingerprints]
    checked = 0
    for rows, probs in next_token_probs(bundled_model, prompts, batch_size=16):
        for row, index in enumerate(rows):
            fp = perinucleus_set.fingerprints[index]
            assert len(tok(fp.key, add_special_tokens=False)["input_ids"]) == 16
            (token,) = tok(fp.response, add_special_tokens=False)["input_ids"]
            p = float(probs[row, token])
            assert p == pytest.approx(fp.response_prob, rel=1e-3)
            assert float(probs[row][probs[row] > p].sum()) >= 0.8
            checked += 1
    assert checked == 16


def test_base_model_does_not_match_its_own_perinucleus_set(bundled_model, perinucleus_set):
    report = verify(VerifyConfig(), bundled_model, perinucleus_set)
    assert report.verdict == "no_match"
    assert report.matched == 0
    # response_prob bounds each wrapper; a key whose probability is under the floor is floored
    assert report.null_rate_source in ("response_prob", "response_prob+floor")
    assert len(report.wrappers) == 6  # bare, chat, 4 held-out system prompts


def test_cli_generate_then_verify_on_the_bundled_model(tmp_path, bundled_model):
    oml = str(Path(sys.executable).parent / "oml")
    out = tmp_path / "fp.json"
    gen = subprocess.run([oml, "generate", "--num-fingerprints", "4", "--key-length", "12",
                          "--seed", "3", "--out", str(out), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["count"] == 4
    ver = subprocess.run([oml, "verify", "--fingerprints", str(out), "--wrappers", "chat", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert ver.returncode == 0, ver.stderr
    report = json.loads(ver.stdout)
    assert report["verdict"] == "no_match" and report["total"] == 4
    secrets = [fp["key"] for fp in json.loads(out.read_text())["fingerprints"]]
    assert not any(s in ver.stdout or s in ver.stderr for s in secrets)
