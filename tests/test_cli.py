"""Tests for the `oml` command line, on the tiny in-test model.

Most calls run in-process (`main([...])` with capsys); a few run the installed `oml` script to
check real exit codes and stderr. Bad input must give one line on stderr, exit code 2, and
leave no output file behind (or the existing one untouched). Keys and responses are secrets:
no error line and no non-reveal output may contain them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

from oml_core.cli import main
from oml_core.config import GenerateConfig
from oml_core.fingerprints import Fingerprint, FingerprintSet, load_fingerprints

OML = Path(sys.executable).parent / "oml"
SECRET_KEY = "SECRETKEY-cli-9fz-never-print-me"
SECRET_RESP = "SECRETRESP-cli-3kq-never-print-me"


def all_subcommands(parser=None, path=()) -> list[tuple[str, ...]]:
    """Every (nested) subcommand of `oml`, read from the parser so the list cannot go stale."""
    import argparse

    from oml_core.cli import build_parser

    parser = parser or build_parser()
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.append((*path, name))
                found.extend(all_subcommands(child, (*path, name)))
    return found


# --- helpers ---------------------------------------------------------------------------------

def run(capsys, *args) -> tuple[int, str, str]:
    """Call the CLI in-process; argparse errors (SystemExit) count as return codes."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_bad_input(rc: int, out: str, err: str, needle: str = "", secrets=()) -> str:
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("oml"), line
    assert needle in line, line
    assert out == ""
    for secret in (SECRET_KEY, SECRET_RESP, *secrets):
        assert secret not in err
    return line


def strings_in(data) -> list[str]:
    """Every string (values and keys) in a parsed JSON document."""
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        return [s for k, v in data.items() for s in (k, *strings_in(v))]
    if isinstance(data, list):
        return [s for item in data for s in strings_in(item)]
    return []


def assert_no_secrets(text: str, fset: FingerprintSet) -> None:
    """Neither a key nor a response (nor a salt) of `fset` appears in `text`.

    Long texts are searched for as substrings; short responses (one or two tokens of the tiny
    model) could occur by chance, so for those no JSON string may contain or equal them.
    """
    try:
        values = strings_in(json.loads(text))
    except ValueError:
        values = None
    for fp in fset.fingerprints:
        for secret in (fp.key, fp.response, fp.salt):
            if not secret:
                continue
            if len(secret.strip()) >= 12:
                assert secret not in text
            elif values is not None:
                assert not any(v == secret or v.strip() == secret.strip() for v in values)


def secret_set(n: int = 4) -> FingerprintSet:
    return FingerprintSet(fingerprints=[
        Fingerprint(id=f"fp-{i:05d}", key=f"{SECRET_KEY} {i}", response=f" {SECRET_RESP}-{i}",
                    salt="%032x" % (i + 11)) for i in range(n)], strategy="custom")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model runs ~50x faster on one thread when the CPUs are shared (OpenMP spin-waits);
    restored afterwards so other modules keep their setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_set(tiny_model_dir, tiny_model, tmp_path_factory) -> Path:
    """A 5-pair random_word set on the tiny model, made through the engine."""
    from oml_core.generate import generate_set

    cfg = GenerateConfig(model=str(tiny_model_dir), strategy="random_word", num_fingerprints=5,
                         key_length=6, response_length=2, seed=11)
    return generate_set(cfg, loaded=tiny_model).save(tmp_path_factory.mktemp("sets") / "rw.json")


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory) -> Path:
    return secret_set().save(tmp_path_factory.mktemp("secret") / "secret.json")


@pytest.fixture
def malformed(tmp_path) -> Path:
    """A truncated JSON file full of secrets."""
    path = tmp_path / "broken.json"
    path.write_text('[{"key": "%s", "response": "%s"}, {"key": "%s' % (
        SECRET_KEY, SECRET_RESP, SECRET_KEY), encoding="utf-8")
    return path


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- real subprocesses -----------------------------------------------------------------------

def test_help_everywhere_exits_zero():
    commands = all_subcommands()
    assert {("fingerprint",), ("eval",), ("eval", "capacity"), ("generate",)} <= set(commands)
    for args in ([], *commands):
        proc = subprocess.run([str(OML), *args, "--help"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "usage: oml" in proc.stdout
    generate_help = subprocess.run([str(OML), "generate", "--help"], capture_output=True,
                                   text=True, timeout=60).stdout
    for flag in ("--model", "--strategy", "--num-fingerprints", "--key-length",
                 "--response-length", "--seed", "--out", "--keys-file", "--json", "--force"):
        assert flag in generate_help


def test_subprocess_missing_model_exits_2_with_one_line(tmp_path):
    out = tmp_path / "set.json"
    proc = subprocess.run([str(OML), "generate", "--model", "/nonexistent/model", "--out",
                           str(out), "--num-fingerprints", "3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "/nonexistent/model" in lines[0] and "--model" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_subprocess_malformed_set_exits_2_without_secrets(malformed):
    proc = subprocess.run([str(OML), "verify", "--fingerprints", str(malformed)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "not valid JSON" in proc.stderr
    assert SECRET_KEY not in proc.stderr and SECRET_RESP not in proc.stderr
    assert proc.stdout == ""


# --- generate: bad input ---------------------------------------------------------------------

GENERATE_BAD = {
    "missing_model": (["--model", "/nonexistent/model"], "model not found"),
    "model_folder_without_config": (["--model", "{empty_dir}"], "config.json"),
    "unknown_strategy": (["--model", "{tiny}", "--strategy", "bogus"], "--strategy"),
    "key_length_0": (["--model", "{tiny}", "--key-length", "0"], "--key-length"),
    "key_length_5000": (["--model", "{tiny}", "--key-length", "5000"], "--key-length"),
    "key_length_not_int": (["--model", "{tiny}", "--key-length", "six"], "--key-length"),
    "response_length_0": (["--model", "{tiny}", "--response-length", "0"], "--response-length"),
    "num_fingerprints_0": (["--model", "{tiny}", "--num-fingerprints", "0"], "--num-fingerprints"),
    "num_fingerprints_negative": (["--model", "{tiny}", "--num-fingerprints", "-3"],
                                  "--num-fingerprints"),
    "unknown_dtype": (["--model", "{tiny}", "--dtype", "int3"], "--dtype"),
    "unknown_device": (["--model", "{tiny}", "--device", "tpu"], "--device"),
    "unknown_flag": (["--model", "{tiny}", "--colour", "red"], "--colour"),
    "too_many_for_keys_file": (["--model", "{tiny}", "--keys-file", str(FIXTURES / "custom_keys.json"),
                                "--num-fingerprints", "21"], "--num-fingerprints"),
    "keys_file_missing": (["--model", "{tiny}", "--keys-file", "{empty_dir}/keys.json"],
                          "not found"),
    "keys_file_malformed": (["--model", "{tiny}", "--keys-file", "{malformed}"], "not valid JSON"),
    "keys_file_wrong_shape": (["--model", "{tiny}", "--keys-file", "{dict_keys}"],
                              "not a fingerprint file"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_BAD))
def test_generate_bad_input(capsys, tmp_path, tiny_model_dir, malformed, case):
    args, needle = GENERATE_BAD[case]
    empty_dir = tmp_path / "empty_model"
    empty_dir.mkdir()
    dict_keys = tmp_path / "dict_keys.json"
    dict_keys.write_text(json.dumps({"keys": [SECRET_KEY]}), encoding="utf-8")
    args = [a.format(tiny=tiny_model_dir, empty_dir=empty_dir, malformed=malformed,
                     dict_keys=dict_keys) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.json"
    rc, stdout, err = run(capsys, "generate", *args, "--out", out, "--json")
    custom = json.loads((FIXTURES / "custom_keys.json").read_text(encoding="utf-8"))
    assert_bad_input(rc, stdout, err, needle, secrets=[k[:30] for k in custom])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp files either


def test_generate_cuda_asked_but_absent(capsys, tmp_path, tiny_model_dir):
    if cuda_available():
        pytest.skip("a CUDA GPU is present")
    out = tmp_path / "out.json"
    rc, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--device", "cuda",
                          "--num-fingerprints", "2", "--key-length", "4", "--out", out)
    line = assert_bad_input(rc, stdout, err, "CUDA")
    assert "--device cpu" in line  # names the fix
    assert not out.exists()


def test_generate_refuses_to_overwrite_without_force(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "set.json"
    out.write_text("OLD CONTENT\n", encoding="utf-8")
    args = ["generate", "--model", tiny_model_dir, "--strategy", "random_word",
            "--num-fingerprints", "2", "--key-length", "4", "--response-length", "1", "--out", out]
    rc, stdout, err = run(capsys, *args)
    assert_bad_input(rc, stdout, err, "--force")
    assert out.read_text(encoding="utf-8") == "OLD CONTENT\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.json"]

    rc, stdout, err = run(capsys, *args, "--force")
    assert rc == 0, err
    assert len(load_fingerprints(out)) == 2


def test_generate_out_is_a_folder(capsys, tmp_path, tiny_model_dir):
    folder = tmp_path / "taken"
    folder.mkdir()
    rc, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--strategy",
                          "random_word", "--num-fingerprints", "2", "--key-length", "4",
                          "--out", folder, "--force")
    assert_bad_input(rc, stdout, err, "folder")
    assert folder.is_dir() and list(folder.iterdir()) == []


# --- generate: happy paths -------------------------------------------------------------------

def test_generate_random_word(capsys, tmp_path, tiny_model_dir, tiny_model):
    out = tmp_path / "F.json"
    args = ["generate", "--model", tiny_model_dir, "--strategy", "random_word",
            "--num-fingerprints", "5", "--key-length", "6", "--response-length", "2",
            "--seed", "3", "--json"]
    rc, stdout, err = run(capsys, *args, "--out", out)
    assert rc == 0, err
    report = json.loads(stdout)
    fset = load_fingerprints(out)
    assert len(fset) == 5 == report["count"]
    assert report["strategy"] == fset.strategy == "random_word"
    assert report["path"] == str(out)
    assert report["commitment_root"] == fset.manifest().root
    assert_no_secrets(stdout, fset)
    assert_no_secrets(err, fset)

    tokenizer = tiny_model.tokenizer
    for fp in fset.fingerprints:
        assert len(tokenizer(fp.key, add_special_tokens=False)["input_ids"]) == 6
        assert len(tokenizer(fp.response, add_special_tokens=False)["input_ids"]) == 2
        assert fp.salt and fp.response_prob is None
    assert len({fp.key for fp in fset.fingerprints}) == 5
    assert fset.generation["seed"] == 3 and fset.generation["key_length"] == 6
    assert fset.tokenizer["vocab_size"] == len(tokenizer.get_vocab())

    # the same seed gives the same pairs (fresh salts); another seed gives others
    rc, _, err = run(capsys, *args, "--out", tmp_path / "G.json")
    assert rc == 0, err
    again = load_fingerprints(tmp_path / "G.json")
    pairs = [(fp.key, fp.response) for fp in fset.fingerprints]
    assert [(fp.key, fp.response) for fp in again.fingerprints] == pairs
    assert [fp.salt for fp in again.fingerprints] != [fp.salt for fp in fset.fingerprints]
    rc, _, err = run(capsys, *args[:-2], "4", "--json", "--out", tmp_path / "H.json")
    assert rc == 0, err
    assert [(fp.key, fp.response) for fp in load_fingerprints(tmp_path / "H.json").fingerprints] != pairs


def test_generate_human_output_has_no_secrets(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "F.json"
    rc, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--strategy",
                          "random_word", "--num-fingerprints", "3", "--key-length", "5",
                          "--out", out)
    assert rc == 0, err
    assert "wrote 3" in stdout and str(out) in stdout
    fset = load_fingerprints(out)
    for fp in fset.fingerprints:
        assert fp.key not in stdout and fp.salt not in stdout


def test_inverse_nucleus_alias_is_recorded_as_perinucleus(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "P.json"
    rc, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--strategy",
                          "inverse_nucleus", "--num-fingerprints", "3", "--key-length", "6",
                          "--response-length", "1", "--seed", "2", "--out", out, "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    fset = load_fingerprints(out)
    assert report["strategy"] == fset.strategy == fset.generation["strategy"] == "perinucleus"
    assert len(fset) == 3
    assert all(0 < fp.response_prob < 1 for fp in fset.fingerprints)
    assert report["mean_response_prob"] == pytest.approx(
        sum(fp.response_prob for fp in fset.fingerprints) / 3)
    assert_no_secrets(stdout, fset)


def test_generate_with_keys_file(capsys, tmp_path, tiny_model_dir, tiny_model):
    out = tmp_path / "K.json"
    custom = json.loads((FIXTURES / "custom_keys.json").read_text(encoding="utf-8"))
    rc, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--strategy",
                          "random_word", "--keys-file", FIXTURES / "custom_keys.json",
                          "--num-fingerprints", "4", "--key-length", "8", "--out", out, "--json")
    assert rc == 0, err
    fset = load_fingerprints(out)
    assert len(fset) == 4
    for fp in fset.fingerprints:
        assert any(key.startswith(fp.key) for key in custom)
        assert len(tiny_model.tokenizer(fp.key, add_special_tokens=False)["input_ids"]) <= 8
        assert fp.key not in stdout


# --- verify ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["malformed", "empty_list", "ours_empty", "keys_only",
                                  "missing_file", "no_fingerprints_flag"])
def test_verify_bad_fingerprint_file(capsys, tmp_path, tiny_model_dir, malformed, case):
    empty = tmp_path / "empty.json"
    if case == "empty_list":
        empty.write_text("[]", encoding="utf-8")
    elif case == "ours_empty":
        FingerprintSet(fingerprints=[]).save(empty)
    files = {"malformed": malformed, "empty_list": empty, "ours_empty": empty,
             "keys_only": FIXTURES / "custom_keys.json", "missing_file": tmp_path / "nope.json"}
    needles = {"malformed": "not valid JSON", "empty_list": "no fingerprints",
               "ours_empty": "no fingerprints", "keys_only": "--keys-file",
               "missing_file": "not found", "no_fingerprints_flag": "--fingerprints"}
    args = ["verify", "--model", tiny_model_dir, "--json"]
    if case in files:
        args += ["--fingerprints", files[case]]
    rc, stdout, err = run(capsys, *args)
    custom = json.loads((FIXTURES / "custom_keys.json").read_text(encoding="utf-8"))
    assert_bad_input(rc, stdout, err, needles[case], secrets=[k[:30] for k in custom])


@pytest.mark.parametrize("extra, needle", [
    (["--wrappers", "bare,shouting"], "--wrappers"),
    (["--wrappers", ""], "--wrappers"),
    (["--num-system-prompts", "13"], "--num-system-prompts"),   # more than the 12 held-out
    (["--num-system-prompts", "100"], "--num-system-prompts"),  # above the declared range
    (["--num-system-prompts", "0"], "--num-system-prompts"),
    (["--match", "fuzzy"], "--match"),
    (["--alpha", "0.9"], "--alpha"),
    (["--null-rate", "1.5"], "--null-rate"),
    (["--null-model", "/nonexistent/base"], "/nonexistent/base"),
])
def test_verify_bad_settings(capsys, tiny_model_dir, secret_file, extra, needle):
    rc, stdout, err = run(capsys, "verify", "--model", tiny_model_dir, "--fingerprints",
                          secret_file, "--json", *extra)
    assert_bad_input(rc, stdout, err, needle)


def test_verify_no_usable_wrapper(capsys, tiny_base_model_dir, secret_file):
    rc, stdout, err = run(capsys, "verify", "--model", tiny_base_model_dir, "--fingerprints",
                          secret_file, "--wrappers", "chat,system")
    assert_bad_input(rc, stdout, err, "bare")


def test_verify_json_report(capsys, tiny_model_dir, random_set):
    rc, stdout, err = run(capsys, "verify", "--model", tiny_model_dir, "--fingerprints",
                          random_set, "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["total"] == 5
    assert 0 <= report["matched"] <= 5
    assert 0 <= report["p_value"] <= 1
    assert report["verdict"] in ("match", "no_match")
    assert isinstance(report["null_rate_source"], str) and report["null_rate_source"]
    wrappers = report["wrappers"]
    assert {"bare", "chat", "system-00", "system-03"} <= set(wrappers)
    assert len(wrappers) == 2 + 4  # default: 4 held-out system prompts
    for row in wrappers.values():
        assert row["total"] == 5 and 0 <= row["matched"] <= report["matched"]
    assert report["null_models"] == []
    assert_no_secrets(stdout, load_fingerprints(random_set))


def test_verify_with_null_model_measures_the_rate(capsys, tiny_model_dir, tiny_base_model_dir,
                                                  random_set):
    rc, stdout, err = run(capsys, "verify", "--model", tiny_model_dir, "--fingerprints",
                          random_set, "--null-model", tiny_base_model_dir, "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert len(report["null_models"]) == 1
    null = report["null_models"][0]
    assert null["model"] == str(tiny_base_model_dir)
    assert null["total"] == 5 and 0 <= null["matched"] <= 5
    assert "bare" in null["wrappers"]
    assert "measured" in report["null_rate_source"]
    assert_no_secrets(stdout, load_fingerprints(random_set))


def test_verify_detects_the_models_own_answers(capsys, tmp_path, tiny_model_dir,
                                               tiny_base_model_dir, tiny_model):
    """Responses equal to the tiny model's own greedy next token must all be matched."""
    from decoding_reference import hf_greedy
    from oml_core.verify.wrappers import Wrapper

    tokenizer = tiny_model.tokenizer
    keys = [f"{SECRET_KEY} river {i} stone" for i in range(12)]
    prompts = [Wrapper("bare", "bare").render(tokenizer, key) for key in keys]
    outputs = hf_greedy(tiny_model, prompts, max_new_tokens=1)
    fps = []
    for key, out in zip(keys, outputs):
        text = tokenizer.decode(out)
        if text.strip() and tokenizer(text, add_special_tokens=False)["input_ids"] == out:
            fps.append(Fingerprint(id=f"fp-{len(fps):05d}", key=key, response=text,
                                   salt="%032x" % (len(fps) + 1)))
    assert len(fps) >= 4, "too few round-tripping greedy tokens to test with"
    path = FingerprintSet(fingerprints=fps).save(tmp_path / "own.json")

    rc, stdout, err = run(capsys, "verify", "--model", tiny_model_dir, "--fingerprints", path,
                          "--wrappers", "bare", "--null-model", tiny_base_model_dir, "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["matched"] == report["total"] == len(fps)
    assert report["wrappers"] == {"bare": {"matched": len(fps), "total": len(fps)}}
    assert all(row["matched"] and row["wrappers"] == ["bare"] for row in report["per_fingerprint"])
    assert report["null_models"][0]["matched"] < len(fps)  # other weights, other answers
    assert SECRET_KEY not in stdout


def test_verify_seed_perinucleus_file_uses_response_prob(capsys, tiny_model_dir):
    rc, stdout, err = run(capsys, "verify", "--model", tiny_model_dir, "--fingerprints",
                          FIXTURES / "perinucleus_pairs.json", "--wrappers", "bare,chat", "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["total"] == 12
    assert set(report["wrappers"]) == {"bare", "chat"}
    assert "response_prob" in report["null_rate_source"]
    rows = json.loads((FIXTURES / "perinucleus_pairs.json").read_text(encoding="utf-8"))
    for row in rows:
        assert row["effective_key"] not in stdout and row["key"][:40] not in stdout


@pytest.mark.parametrize("as_json", [True, False])
def test_verify_output_never_contains_secrets(capsys, tiny_model_dir, tiny_base_model_dir,
                                              secret_file, as_json):
    args = ["verify", "--model", tiny_model_dir, "--fingerprints", secret_file,
            "--null-model", tiny_base_model_dir] + (["--json"] if as_json else [])
    rc, stdout, err = run(capsys, *args)
    assert rc == 0, err
    for text in (stdout, err):
        assert SECRET_KEY not in text and SECRET_RESP not in text
        assert "%032x" % 11 not in text  # a salt
    if not as_json:
        assert "verdict:" in stdout and "p-value" in stdout


# --- import, commit, reveal, check-reveal ----------------------------------------------------

@pytest.fixture
def imported(capsys, tmp_path) -> Path:
    out = tmp_path / "set.json"
    rc, stdout, err = run(capsys, "import", "--fingerprints", FIXTURES / "english_pairs.json",
                          "--out", out, "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report == {"path": str(out), "count": 7}
    return out


def test_import_seed_pairs_adds_salts(imported):
    rows = json.loads((FIXTURES / "english_pairs.json").read_text(encoding="utf-8"))
    data = json.loads(imported.read_text(encoding="utf-8"))
    assert data["format"] == "oml-fingerprints" and data["version"] == 1
    fset = load_fingerprints(imported)
    assert [(fp.key, fp.response) for fp in fset.fingerprints] == \
        [(r["key"], r["response"]) for r in rows]
    salts = [fp.salt for fp in fset.fingerprints]
    assert all(salts) and len(set(salts)) == len(salts)


def test_import_perinucleus_keeps_prob(capsys, tmp_path):
    out = tmp_path / "p.json"
    rc, _, err = run(capsys, "import", "--fingerprints", FIXTURES / "perinucleus_pairs.json",
                     "--out", out)
    assert rc == 0, err
    rows = json.loads((FIXTURES / "perinucleus_pairs.json").read_text(encoding="utf-8"))
    fset = load_fingerprints(out)
    assert [fp.key for fp in fset.fingerprints] == [r["effective_key"] for r in rows]
    assert fset.response_probs == pytest.approx([r["response_prob"] for r in rows])


@pytest.mark.parametrize("source, needle", [
    ("custom_keys.json", "--keys-file"),
    ("broken", "not valid JSON"),
])
def test_import_bad_input(capsys, tmp_path, malformed, source, needle):
    src = malformed if source == "broken" else FIXTURES / source
    out = tmp_path / "new.json"
    rc, stdout, err = run(capsys, "import", "--fingerprints", src, "--out", out)
    assert_bad_input(rc, stdout, err, needle)
    assert not out.exists()


def test_import_refuses_to_overwrite(capsys, imported):
    before = imported.read_bytes()
    rc, stdout, err = run(capsys, "import", "--fingerprints", FIXTURES / "english_pairs.json",
                          "--out", imported)
    assert_bad_input(rc, stdout, err, "--force")
    assert imported.read_bytes() == before


def test_commit_prints_and_writes_manifest_without_secrets(capsys, tmp_path, imported):
    manifest_path = tmp_path / "manifest.json"
    rc, stdout, err = run(capsys, "commit", "--fingerprints", imported, "--json",
                          "--out", manifest_path)
    assert rc == 0, err
    manifest = json.loads(stdout)
    assert manifest == json.loads(manifest_path.read_text(encoding="utf-8"))
    assert manifest["format"] == "oml-commitment" and manifest["count"] == 7
    fset = load_fingerprints(imported)
    assert manifest["root"] == fset.manifest().root
    assert [leaf["id"] for leaf in manifest["leaves"]] == [fp.id for fp in fset.fingerprints]
    assert_no_secrets(stdout, fset)
    assert_no_secrets(manifest_path.read_text(encoding="utf-8"), fset)

    rc, stdout, err = run(capsys, "commit", "--fingerprints", imported)
    assert rc == 0 and manifest["root"] in stdout
    assert_no_secrets(stdout, fset)


def test_commit_unsalted_seed_file_points_to_import(capsys, tmp_path):
    out = tmp_path / "m.json"
    rc, stdout, err = run(capsys, "commit", "--fingerprints", FIXTURES / "english_pairs.json",
                          "--out", out, "--json")
    assert_bad_input(rc, stdout, err, "oml import")
    assert not out.exists()


def _commit_and_reveal(capsys, tmp_path, fset_path: Path, fp_id: str) -> tuple[Path, Path, str]:
    manifest = tmp_path / "manifest.json"
    rc, _, err = run(capsys, "commit", "--fingerprints", fset_path, "--out", manifest)
    assert rc == 0, err
    reveal = tmp_path / "reveal.json"
    rc, stdout, err = run(capsys, "reveal", "--fingerprints", fset_path, "--id", fp_id,
                          "--out", reveal)
    assert rc == 0, err
    return manifest, reveal, stdout


def test_reveal_and_check_reveal(capsys, tmp_path, imported):
    fset = load_fingerprints(imported)
    target = fset.fingerprints[3]
    manifest, reveal, stdout = _commit_and_reveal(capsys, tmp_path, imported, target.id)
    shown = json.loads(stdout)
    assert shown == json.loads(reveal.read_text(encoding="utf-8"))
    assert (shown["id"], shown["key"], shown["response"], shown["salt"]) == \
        (target.id, target.key, target.response, target.salt)
    for other in fset.fingerprints:  # only the asked-for pair is revealed
        if other.id != target.id:
            assert other.key not in stdout

    rc, stdout, err = run(capsys, "check-reveal", "--manifest", manifest, "--reveal", reveal)
    assert rc == 0, err
    assert stdout.startswith("valid")
    rc, stdout, err = run(capsys, "check-reveal", "--manifest", manifest, "--reveal", reveal,
                          "--json")
    assert rc == 0 and json.loads(stdout)["valid"] is True

    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps({**shown, "response": " TAMPERED-RESPONSE-zz"}),
                        encoding="utf-8")
    rc, stdout, err = run(capsys, "check-reveal", "--manifest", manifest, "--reveal", tampered)
    assert rc == 1
    assert "INVALID" in stdout and "TAMPERED-RESPONSE-zz" not in stdout + err
    rc, stdout, _ = run(capsys, "check-reveal", "--manifest", manifest, "--reveal", tampered,
                        "--json")
    assert rc == 1 and json.loads(stdout)["valid"] is False


def test_reveal_against_another_sets_manifest_is_invalid(capsys, tmp_path, imported):
    other = tmp_path / "other"
    other.mkdir()
    manifest, _, _ = _commit_and_reveal(capsys, other, secret_set().save(other / "s.json"),
                                        "fp-00000")
    _, reveal, _ = _commit_and_reveal(capsys, tmp_path, imported, "fp-00000")
    rc, stdout, err = run(capsys, "check-reveal", "--manifest", manifest, "--reveal", reveal)
    assert rc == 1 and "INVALID" in stdout


def test_reveal_unknown_id(capsys, imported):
    rc, stdout, err = run(capsys, "reveal", "--fingerprints", imported, "--id", "fp-99999")
    assert_bad_input(rc, stdout, err, "fp-99999")
    assert_no_secrets(err, load_fingerprints(imported))


@pytest.mark.parametrize("case", ["not_json", "list", "fingerprint_set", "missing", "folder"])
def test_check_reveal_malformed_manifest(capsys, tmp_path, secret_file, case):
    manifest, reveal, _ = _commit_and_reveal(capsys, tmp_path, secret_file, "fp-00001")
    bad = tmp_path / "bad.json"
    if case == "not_json":
        bad.write_text('{"format": "oml-commitment", "root": ', encoding="utf-8")
    elif case == "list":
        bad.write_text(json.dumps([json.loads(manifest.read_text(encoding="utf-8"))]),
                       encoding="utf-8")
    elif case == "fingerprint_set":  # the secret set passed by mistake: must not be echoed
        bad = secret_file
    elif case == "folder":
        bad = tmp_path
    else:
        bad = tmp_path / "nope.json"
    rc, stdout, err = run(capsys, "check-reveal", "--manifest", bad, "--reveal", reveal)
    assert_bad_input(rc, stdout, err, "manifest")


def test_check_reveal_malformed_reveal(capsys, tmp_path, secret_file):
    manifest, _, _ = _commit_and_reveal(capsys, tmp_path, secret_file, "fp-00001")
    bad = tmp_path / "bad_reveal.json"
    bad.write_text(json.dumps({"key": SECRET_KEY, "response": SECRET_RESP}), encoding="utf-8")
    rc, stdout, err = run(capsys, "check-reveal", "--manifest", manifest, "--reveal", bad)
    assert_bad_input(rc, stdout, err, "reveal")
