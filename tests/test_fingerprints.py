"""Tests for oml_core.fingerprints: every OML 1.0 format, our format, malformed input, commitments.

Keys and responses are secrets: every error case below plants a distinctive secret string in
the bad file and checks the error message neither quotes it nor spans more than one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import FIXTURES, SHARED_FIXTURES

from oml_core.commitment import check_reveal
from oml_core.errors import OMLInputError
from oml_core.fingerprints import (
    CALIBRATED_VERSION,
    FORMAT,
    VERSION,
    Fingerprint,
    FingerprintSet,
    load_fingerprints,
    load_keys,
)

SECRET_KEY = "SECRETKEY-qz7-never-print-me"
SECRET_RESP = "SECRETRESP-xw4-never-print-me"
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def fixture_rows(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def assert_clean_error(exc: OMLInputError, *secrets: str) -> str:
    """One line, names something, quotes no secret."""
    message = str(exc)
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, message
    for secret in (SECRET_KEY, SECRET_RESP, *secrets):
        assert secret not in message, "error message leaks a secret"
    return message


def write(path: Path, data) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data), encoding="utf-8")
    return path


def sample_set(n: int = 3, salted: bool = True) -> FingerprintSet:
    fps = [Fingerprint(id=f"fp-{i:05d}", key=f"{SECRET_KEY} number {i}",
                       response=f" {SECRET_RESP}-{i}", response_prob=(i + 1) / 100,
                       salt=("%032x" % (i + 1)) if salted else None)
           for i in range(n)]
    return FingerprintSet(
        fingerprints=fps, strategy="perinucleus",
        generation={"seed": 7, "key_length": 16, "perinucleus_threshold": 0.8},
        tokenizer={"name_or_path": "tiny", "vocab_size": 1200, "vocab_sha256": "ab" * 32})


# --- seed fixtures ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["english_pairs.json", "inverse_nucleus_pairs.json"])
def test_seed_pair_files_load_with_all_pairs(name):
    rows = fixture_rows(name)
    fset = load_fingerprints(FIXTURES / name)
    assert len(fset) == len(rows) > 0
    assert [fp.key for fp in fset.fingerprints] == [r["key"] for r in rows]
    assert [fp.response for fp in fset.fingerprints] == [r["response"] for r in rows]
    assert all(fp.response_prob is None and fp.salt is None for fp in fset.fingerprints)
    ids = [fp.id for fp in fset.fingerprints]
    assert len(set(ids)) == len(ids)
    assert fset.source_format == "oml-1.0"


def test_seed_perinucleus_file_uses_effective_key_and_keeps_prob():
    rows = fixture_rows("perinucleus_pairs.json")
    fset = load_fingerprints(FIXTURES / "perinucleus_pairs.json")
    assert len(fset) == len(rows) == 12
    for fp, row in zip(fset.fingerprints, rows):
        assert fp.key == row["effective_key"]
        assert fp.key != row["key"] or row["key"] == row["effective_key"]
        assert fp.response == row["response"]  # leading space kept
        assert fp.response_prob == pytest.approx(row["response_prob"])
    assert any(row["key"] != row["effective_key"] for row in rows)  # the fixture exercises it
    assert fset.response_probs == pytest.approx([r["response_prob"] for r in rows])


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="reference samples in ../shared absent")
@pytest.mark.parametrize("name", ["english_pairs.json", "inverse_nucleus_pairs.json",
                                  "perinucleus_pairs.json", "custom_keys.json"])
def test_reference_seed_samples_are_read(name):
    rows = json.loads((SHARED_FIXTURES / name).read_text(encoding="utf-8"))
    assert len(load_keys(SHARED_FIXTURES / name)) == len(rows)
    if name == "custom_keys.json":
        with pytest.raises(OMLInputError, match="keys only"):
            load_fingerprints(SHARED_FIXTURES / name)
    else:
        fset = load_fingerprints(SHARED_FIXTURES / name)
        assert len(fset) == len(rows)
        assert all(fp.response == row["response"] for fp, row in zip(fset.fingerprints, rows))


def test_keys_only_file_is_refused_with_the_generate_fix():
    keys = fixture_rows("custom_keys.json")
    with pytest.raises(OMLInputError) as info:
        load_fingerprints(FIXTURES / "custom_keys.json")
    message = assert_clean_error(info.value, *keys, *(k[:40] for k in keys))
    assert "oml generate --keys-file" in message
    assert "custom_keys.json" in message


@pytest.mark.parametrize("name, field", [
    ("custom_keys.json", None),
    ("english_pairs.json", "key"),
    ("inverse_nucleus_pairs.json", "key"),
    ("perinucleus_pairs.json", "effective_key"),
])
def test_load_keys_reads_all_four_seed_files(name, field):
    rows = fixture_rows(name)
    expected = rows if field is None else [row[field] for row in rows]
    assert load_keys(FIXTURES / name) == expected


@pytest.mark.parametrize("content, needle", [
    ([], "no keys"),
    (["a key", "   "], "key 1 is empty"),
])
def test_load_keys_refuses_empty(tmp_path, content, needle):
    with pytest.raises(OMLInputError) as info:
        load_keys(write(tmp_path / "keys.json", content))
    assert needle in assert_clean_error(info.value)


# --- our format ------------------------------------------------------------------------------

def test_round_trip_keeps_everything(tmp_path):
    fset = sample_set()
    path = fset.save(tmp_path / "set.json")
    loaded = load_fingerprints(path)
    assert loaded == fset
    assert loaded.fingerprints[1].response_prob == 0.02
    assert [fp.salt for fp in loaded.fingerprints] == [fp.salt for fp in fset.fingerprints]
    assert loaded.strategy == "perinucleus"
    assert loaded.generation == fset.generation
    assert loaded.tokenizer == fset.tokenizer
    assert loaded.created == fset.created


def test_saved_json_is_versioned(tmp_path):
    path = sample_set(4).save(tmp_path / "set.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "oml-fingerprints" == FORMAT
    assert data["version"] == 1 == VERSION
    assert data["count"] == 4 == len(data["fingerprints"])
    assert set(data["fingerprints"][0]) == {"id", "key", "response", "response_prob", "salt"}


@pytest.mark.parametrize("version", [3, 0, "1", None])
def test_unsupported_version_is_refused(tmp_path, version):
    data = sample_set().to_json()
    data["version"] = version
    with pytest.raises(OMLInputError) as info:
        load_fingerprints(write(tmp_path / "set.json", data))
    message = assert_clean_error(info.value)
    assert "version" in message and "upgrade" in message


def calibrated_set() -> FingerprintSet:
    fset = sample_set()
    for i, fp in enumerate(fset.fingerprints):
        fp.context_rates = {"start": {"user": {"1": 0.01 * (i + 1), "0.7": 0.002},
                                      "system-00": {"1": 0.03}},
                            "exact": {"user": {"1": 1e-5}}}
    fset.calibration = {"model": "base", "temperatures": ["0.7", "1"], "method": 1}
    return fset


def test_calibrated_rates_round_trip_as_version_2(tmp_path):
    fset = calibrated_set()
    path = fset.save(tmp_path / "set.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["version"] == CALIBRATED_VERSION == 2 and data["calibration"]["model"] == "base"
    assert load_fingerprints(path) == fset
    # a set without rates stays version 1 (older readers keep reading it), and has no such key
    plain = json.loads(sample_set().save(tmp_path / "plain.json").read_text(encoding="utf-8"))
    assert plain["version"] == 1 and "calibration" not in plain
    assert "context_rates" not in plain["fingerprints"][0]


def test_trimming_a_pair_drops_its_rates(tmp_path):
    class Chars:  # a tokenizer whose tokens are characters
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids):
            return "".join(map(chr, ids))

    fset = calibrated_set()
    kept = fset.trimmed(Chars(), max_key_tokens=1000)
    assert [fp.context_rates for fp in kept.fingerprints] == [fp.context_rates for fp in fset.fingerprints]
    cut = fset.trimmed(Chars(), max_key_tokens=5)
    assert all(fp.context_rates is None for fp in cut.fingerprints)


@pytest.mark.parametrize("rates", [{"start": {"user": {"1": 1.5}}}, {"start": {"user": 0.1}},
                                   {"start": [0.1]}, "0.1", {"start": {"user": {"1": True}}}])
def test_malformed_context_rates_are_refused(tmp_path, rates):
    data = calibrated_set().to_json()
    data["fingerprints"][1]["context_rates"] = rates
    with pytest.raises(OMLInputError) as info:
        load_fingerprints(write(tmp_path / "set.json", data))
    message = assert_clean_error(info.value)
    assert "entry 1" in message and "oml calibrate" in message


def test_boolean_version_is_refused(tmp_path):
    data = sample_set().to_json()
    data["version"] = True
    with pytest.raises(OMLInputError):
        load_fingerprints(write(tmp_path / "set.json", data))


# --- malformed input -------------------------------------------------------------------------

def _ours(rows) -> dict:
    return {"format": FORMAT, "version": VERSION, "fingerprints": rows}


GOOD = {"key": SECRET_KEY, "response": SECRET_RESP}
MALFORMED = {
    "not_json": ('[{"key": "%s", "response": "%s"' % (SECRET_KEY, SECRET_RESP), "not valid JSON"),
    "not_json_garbage": (f"{SECRET_KEY} {SECRET_RESP}", "not valid JSON"),
    "empty_file": ("", "not valid JSON"),
    "empty_list": ([], "no fingerprints"),
    "ours_empty": (_ours([]), "no fingerprints"),
    "dict_not_ours": ({"key": SECRET_KEY, "response": SECRET_RESP}, "not a fingerprint file"),
    "other_format": ({"format": "something-else", "fingerprints": [GOOD]}, "not a fingerprint file"),
    "json_scalar": (42, "not a fingerprint file"),
    "ours_rows_not_list": ({**_ours(None), "fingerprints": {"0": GOOD}}, "not a list"),
    "missing_response": ([GOOD, {"key": SECRET_KEY + "2"}], "entry 1"),
    "empty_response": ([{"key": SECRET_KEY, "response": "  "}], "'response'"),
    "missing_key": ([{"response": SECRET_RESP}], "'key'"),
    "key_not_text": ([{"key": 12345, "response": SECRET_RESP}], "'key'"),
    "entry_not_object": ([GOOD, SECRET_KEY], "entry 1"),
    "prob_above_one": ([{**GOOD, "response_prob": 1.5}], "response_prob"),
    "prob_negative": ([{**GOOD, "response_prob": -0.01}], "response_prob"),
    "prob_text": ([{**GOOD, "response_prob": "0.5"}], "response_prob"),
    "prob_bool": ([{**GOOD, "response_prob": True}], "response_prob"),
    "prob_nan": ('[{"key": "%s", "response": "%s", "response_prob": NaN}]'
                 % (SECRET_KEY, SECRET_RESP), "response_prob"),
    "duplicate_ids": (_ours([{**GOOD, "id": "fp-1"}, {"key": SECRET_KEY + "b",
                                                        "response": SECRET_RESP, "id": "fp-1"}]),
                      "not unique"),
    "non_utf8": (b'[{"key": "' + SECRET_KEY.encode() + b'\xff\xfe", "response": "'
                 + SECRET_RESP.encode() + b'"}]', "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_one_clean_line(tmp_path, case):
    content, needle = MALFORMED[case]
    path = write(tmp_path / f"{case}.json", content)
    with pytest.raises(OMLInputError) as info:
        load_fingerprints(path)
    message = assert_clean_error(info.value)
    assert needle in message
    assert str(path) in message  # names the file


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(OMLInputError) as info:
        load_fingerprints(tmp_path)
    assert "folder" in assert_clean_error(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(OMLInputError) as info:
        load_fingerprints(tmp_path / "nope.json")
    message = assert_clean_error(info.value)
    assert "not found" in message and "nope.json" in message


@pytest.mark.parametrize("loader", [load_fingerprints, load_keys])
def test_malformed_keys_and_sets_share_the_same_checks(tmp_path, loader):
    path = write(tmp_path / "bad.json", b"\x80\x81" + SECRET_KEY.encode())
    with pytest.raises(OMLInputError) as info:
        loader(path)
    assert_clean_error(info.value)


def test_lone_surrogate_text_is_refused_at_load(tmp_path):
    path = write(tmp_path / "sur.json",
                 '[{"key": "%s\\ud800", "response": "%s"}]' % (SECRET_KEY, SECRET_RESP))
    with pytest.raises(OMLInputError) as info:
        load_fingerprints(path)
    assert_clean_error(info.value)


# --- salts, commitment, reveal ----------------------------------------------------------------

def test_with_salts_adds_unique_salts_and_keeps_existing():
    seed = load_fingerprints(FIXTURES / "inverse_nucleus_pairs.json")
    salted = seed.with_salts()
    salts = [fp.salt for fp in salted.fingerprints]
    assert all(HEX32.match(s) for s in salts)
    assert len(set(salts)) == len(salts) == len(seed)
    assert all(fp.salt is None for fp in seed.fingerprints)  # the original is untouched
    assert [(fp.id, fp.key, fp.response) for fp in salted.fingerprints] == \
        [(fp.id, fp.key, fp.response) for fp in seed.fingerprints]
    assert salted.source_format == FORMAT
    assert [fp.salt for fp in salted.with_salts().fingerprints] == salts  # idempotent


def test_manifest_and_reveal_round_trip():
    fset = load_fingerprints(FIXTURES / "perinucleus_pairs.json").with_salts()
    manifest = fset.manifest()
    text = manifest.model_dump_json()
    for fp in fset.fingerprints:
        assert fp.key not in text and fp.salt not in text
        assert json.dumps(fp.response) not in text  # responses are short: look for the JSON string
    assert manifest.count == len(fset) == len(manifest.leaves)
    assert [leaf.id for leaf in manifest.leaves] == [fp.id for fp in fset.fingerprints]
    for fp in (fset.fingerprints[0], fset.fingerprints[5], fset.fingerprints[-1]):
        reveal = fset.reveal(fp.id)
        assert (reveal.key, reveal.response, reveal.salt) == (fp.key, fp.response, fp.salt)
        check = check_reveal(reveal, manifest)
        assert check.valid, check.reason
        tampered = {**reveal.model_dump(), "response": reveal.response + "x"}
        check = check_reveal(tampered, manifest)
        assert not check.valid and tampered["response"] not in check.reason


def test_manifest_is_stable_across_save_and_load(tmp_path):
    fset = sample_set(5)
    again = load_fingerprints(fset.save(tmp_path / "s.json"))
    assert again.manifest().root == fset.manifest().root


def test_reveal_unknown_id_is_refused():
    with pytest.raises(OMLInputError) as info:
        sample_set().reveal("fp-99999")
    assert "fp-99999" in assert_clean_error(info.value)


def test_manifest_of_unsalted_seed_set_points_to_import():
    fset = load_fingerprints(FIXTURES / "english_pairs.json")
    for action in (fset.manifest, lambda: fset.reveal("fp-00000")):
        with pytest.raises(OMLInputError) as info:
            action()
        message = assert_clean_error(info.value, *(fp.key for fp in fset.fingerprints))
        assert "oml import" in message


# --- trimming --------------------------------------------------------------------------------

def test_trimmed_cuts_to_token_limits(tiny_model):
    tokenizer = tiny_model.tokenizer

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fset = load_fingerprints(FIXTURES / "perinucleus_pairs.json")
    trimmed = fset.trimmed(tokenizer, num=4, max_key_tokens=5, max_response_tokens=1)
    assert len(trimmed) == 4
    for before, after in zip(fset.fingerprints, trimmed.fingerprints):
        assert count(before.key) > 5  # so the cut did something
        assert after.key != before.key and before.key.startswith(after.key)
        assert count(after.key) <= 5
        assert count(after.response) <= 1 and before.response.startswith(after.response)
        assert (after.id, after.response_prob) == (before.id, before.response_prob)
    assert fset.fingerprints[0].key == fixture_rows("perinucleus_pairs.json")[0]["effective_key"]

    untouched = fset.trimmed(tokenizer)
    assert untouched.fingerprints == fset.fingerprints  # no limits: nothing changes
    loose = fset.trimmed(tokenizer, max_key_tokens=10_000, max_response_tokens=10_000)
    assert loose.fingerprints == fset.fingerprints


# --- atomic saves ----------------------------------------------------------------------------

def _failing_sets():
    not_serialisable = sample_set(2)
    not_serialisable.fingerprints[1].response_prob = object()  # json.dumps fails
    not_encodable = sample_set(2)
    not_encodable.fingerprints[0].key += "\ud800"  # fails while writing UTF-8
    return {"not_serialisable": not_serialisable, "not_encodable": not_encodable}


@pytest.mark.parametrize("case", ["not_serialisable", "not_encodable"])
def test_failed_save_leaves_old_file_and_no_temp_files(tmp_path, case):
    path = sample_set(3).save(tmp_path / "set.json")
    before = path.read_bytes()
    with pytest.raises((TypeError, ValueError)):
        _failing_sets()[case].save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.json"]
    assert len(load_fingerprints(path)) == 3


def test_save_creates_parent_folders(tmp_path):
    path = sample_set(1).save(tmp_path / "a" / "b" / "set.json")
    assert path.exists() and len(load_fingerprints(path)) == 1
