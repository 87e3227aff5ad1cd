"""Tests for oml_core.commitment: round trips, tamper detection and no secret leakage."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from oml_core.commitment import (
    build_manifest,
    build_reveal,
    check_proof,
    check_reveal,
    leaf_hash,
    merkle_proof,
    merkle_root,
    new_salt,
    root_from_proof,
)
from oml_core.errors import OMLInputError

META = {"model": "demo-model", "created": "2025-01-01"}


def _manifest(entries, meta: dict) -> dict:
    """The manifest as `oml commit` writes it (a JSON document the tests may tamper with)."""
    return build_manifest(entries, meta).model_dump(mode="json")


def _reveal(entries, index: int) -> dict:
    """The reveal as `oml reveal` writes it."""
    return build_reveal(entries, index).model_dump(mode="json")


def make_entries(n: int, tag: str = "A") -> list[tuple[str, str, str, str]]:
    """n pairs with distinctive secret text that must never leak into a manifest or reason."""
    return [
        (f"fp-{tag}-{i}", f"SECRETKEY-{tag}-{i}-zq", f"SECRETRESP-{tag}-{i}-xw", new_salt())
        for i in range(n)
    ]


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def tree_leaf(leaf_hex: str) -> bytes:
    return h(b"\x00" + bytes.fromhex(leaf_hex))


def node(left: bytes, right: bytes) -> bytes:
    return h(b"\x01" + left + right)


def leaves_of(entries: list[tuple[str, str, str, str]]) -> list[str]:
    return [leaf_hash(*entry) for entry in entries]


def assert_no_secret(text: str, entries: list[tuple[str, str, str, str]]) -> None:
    for _, key, response, salt in entries:
        assert key not in text
        assert response not in text
        assert salt not in text


# --- primitives ------------------------------------------------------------------------------


def test_new_salt_is_fresh_hex() -> None:
    salts = {new_salt() for _ in range(50)}
    assert len(salts) == 50
    for salt in salts:
        assert len(salt) == 32
        bytes.fromhex(salt)


def test_leaf_hash_encoding_by_hand() -> None:
    salt = "00" * 16
    expected = hashlib.sha256(
        b"oml-leaf-v1\x00"
        + bytes(16)
        + (2).to_bytes(8, "big") + b"id"
        + (1).to_bytes(8, "big") + b"k"
        + (3).to_bytes(8, "big") + "r\u00e9".encode()  # "ré" is three UTF-8 bytes
    ).hexdigest()
    assert leaf_hash("id", "k", "r\u00e9", salt) == expected


def test_length_prefix_prevents_boundary_collision() -> None:
    salt = new_salt()
    assert leaf_hash("x", "ab", "c", salt) != leaf_hash("x", "a", "bc", salt)
    assert leaf_hash("xa", "b", "c", salt) != leaf_hash("x", "ab", "c", salt)


def test_leaf_hash_depends_on_every_field() -> None:
    salt, other_salt = new_salt(), new_salt()
    base = leaf_hash("id", "key", "resp", salt)
    assert base == leaf_hash("id", "key", "resp", salt)
    assert base != leaf_hash("id2", "key", "resp", salt)
    assert base != leaf_hash("id", "key2", "resp", salt)
    assert base != leaf_hash("id", "key", "resp2", salt)
    assert base != leaf_hash("id", "key", "resp", other_salt)


@pytest.mark.parametrize("salt", ["zz" * 16, "abc", "00" * 8, ""])
def test_leaf_hash_rejects_bad_salt(salt: str) -> None:
    with pytest.raises(OMLInputError, match="salt"):
        leaf_hash("id", "key", "resp", salt)


def test_single_leaf_root_is_tree_leaf() -> None:
    leaves = leaves_of(make_entries(1))
    assert merkle_root(leaves) == tree_leaf(leaves[0]).hex()
    assert merkle_proof(leaves, 0) == []


def test_two_leaf_root_by_hand() -> None:
    leaves = leaves_of(make_entries(2))
    expected = node(tree_leaf(leaves[0]), tree_leaf(leaves[1]))
    assert merkle_root(leaves) == expected.hex()


def test_odd_count_promotes_last_node() -> None:
    leaves = leaves_of(make_entries(3))
    l0, l1, l2 = (tree_leaf(x) for x in leaves)
    assert merkle_root(leaves) == node(node(l0, l1), l2).hex()
    # Duplicating the odd node (the Bitcoin construction) would give a different root.
    assert merkle_root(leaves) != node(node(l0, l1), node(l2, l2)).hex()
    assert merkle_proof(leaves, 2) == [{"side": "left", "hash": node(l0, l1).hex()}]


def test_five_leaves_by_hand() -> None:
    leaves = leaves_of(make_entries(5))
    t = [tree_leaf(x) for x in leaves]
    expected = node(node(node(t[0], t[1]), node(t[2], t[3])), t[4])
    assert merkle_root(leaves) == expected.hex()


def test_duplicated_last_leaf_set_has_different_root() -> None:
    leaves = leaves_of(make_entries(3))
    assert merkle_root(leaves) != merkle_root(leaves + [leaves[2]])


def test_empty_set_is_refused() -> None:
    with pytest.raises(OMLInputError, match="empty fingerprint set"):
        merkle_root([])
    with pytest.raises(OMLInputError, match="empty fingerprint set"):
        build_manifest([], META)


def test_merkle_root_rejects_bad_leaf_hex() -> None:
    with pytest.raises(OMLInputError):
        merkle_root(["nothex"])
    with pytest.raises(OMLInputError):
        merkle_root(["ab" * 31])


def test_merkle_proof_rejects_bad_index() -> None:
    leaves = leaves_of(make_entries(3))
    with pytest.raises(OMLInputError, match="index"):
        merkle_proof(leaves, 3)
    with pytest.raises(OMLInputError, match="index"):
        merkle_proof(leaves, -1)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17])
def test_every_proof_verifies(size: int) -> None:
    leaves = leaves_of(make_entries(size))
    root = merkle_root(leaves)
    for index, leaf in enumerate(leaves):
        proof = merkle_proof(leaves, index)
        assert root_from_proof(leaf, proof) == root
        assert check_proof(leaf, proof, root)
        assert check_proof(leaf.upper(), proof, root.upper())
        other = leaves[(index + 1) % size]
        if other != leaf:
            assert not check_proof(other, proof, root)


@pytest.mark.parametrize(
    "bad_proof",
    [
        [{"side": "middle", "hash": "00" * 32}],
        [{"side": "left", "hash": "zz" * 32}],
        [{"side": "left", "hash": "00" * 31}],
        [{"side": "left"}],
        [{"hash": "00" * 32}],
        ["not a step"],
        "not a list",
        [{"side": "left", "hash": 12}],
    ],
)
def test_malformed_proof_is_false_not_an_exception(bad_proof: object) -> None:
    leaves = leaves_of(make_entries(2))
    root = merkle_root(leaves)
    assert check_proof(leaves[0], bad_proof, root) is False  # type: ignore[arg-type]


def test_check_proof_bad_leaf_or_root_is_false() -> None:
    leaves = leaves_of(make_entries(2))
    proof = merkle_proof(leaves, 0)
    root = merkle_root(leaves)
    assert check_proof("nothex", proof, root) is False
    assert check_proof(leaves[0], proof, "caf\u00e9") is False
    assert check_proof(leaves[0], proof, None) is False  # type: ignore[arg-type]


# --- manifest and reveal ---------------------------------------------------------------------


def test_manifest_shape() -> None:
    entries = make_entries(4)
    manifest = _manifest(entries, META)
    assert manifest["format"] == "oml-commitment"
    assert manifest["version"] == 1
    assert manifest["algorithm"] == "sha256-merkle-v1"
    assert manifest["count"] == 4
    assert manifest["root"] == merkle_root(leaves_of(entries))
    assert manifest["leaves"] == [
        {"id": e[0], "hash": leaf} for e, leaf in zip(entries, leaves_of(entries))
    ]
    assert manifest["model"] == "demo-model"


def test_manifest_contains_no_secret() -> None:
    entries = make_entries(13)
    text = json.dumps(_manifest(entries, META))
    assert_no_secret(text, entries)


def test_manifest_metadata_cannot_override_commitment_fields() -> None:
    with pytest.raises(OMLInputError, match="root"):
        _manifest(make_entries(2), {"root": "00" * 32})


def test_manifest_refuses_duplicate_ids() -> None:
    entries = make_entries(2)
    entries[1] = (entries[0][0],) + entries[1][1:]
    with pytest.raises(OMLInputError, match="unique"):
        _manifest(entries, META)


def test_swapping_two_leaves_changes_root() -> None:
    entries = make_entries(5)
    swapped = entries.copy()
    swapped[1], swapped[3] = swapped[3], swapped[1]
    assert _manifest(entries, META)["root"] != _manifest(swapped, META)["root"]


def test_swapped_manifest_leaves_fail_the_check() -> None:
    entries = make_entries(5)
    manifest = _manifest(entries, META)
    manifest["leaves"][1], manifest["leaves"][3] = manifest["leaves"][3], manifest["leaves"][1]
    check = check_reveal(_reveal(entries, 1), manifest)
    assert not check.valid and "root" in check.reason


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_round_trip_every_index(size: int) -> None:
    entries = make_entries(size)
    manifest = json.loads(json.dumps(_manifest(entries, META)))
    for index in range(size):
        reveal = json.loads(json.dumps(_reveal(entries, index)))
        assert reveal["format"] == "oml-reveal" and reveal["version"] == 1
        assert (reveal["id"], reveal["key"], reveal["response"], reveal["salt"]) == entries[index]
        assert reveal["index"] == index
        check = check_reveal(reveal, manifest)
        assert check.valid, check.reason


def test_reveal_exposes_only_its_own_pair() -> None:
    entries = make_entries(8)
    reveal = _reveal(entries, 3)
    assert_no_secret(json.dumps(reveal), entries[:3] + entries[4:])


def _mutations() -> list[tuple[str, object]]:
    """(name, function that tampers with a reveal dict in place) for every field that matters."""

    def set_field(name: str, value: object):
        return lambda r: r.__setitem__(name, value)

    def flip_proof_hash(r: dict) -> None:
        step = r["proof"][0]
        step["hash"] = ("1" if step["hash"][0] != "1" else "2") + step["hash"][1:]

    def flip_proof_side(r: dict) -> None:
        step = r["proof"][0]
        step["side"] = "left" if step["side"] == "right" else "right"

    return [
        ("key", lambda r: r.__setitem__("key", r["key"] + "!")),
        ("response", lambda r: r.__setitem__("response", r["response"] + "!")),
        ("salt", set_field("salt", new_salt())),
        ("id", lambda r: r.__setitem__("id", r["id"] + "x")),
        ("index", lambda r: r.__setitem__("index", (r["index"] + 1) % 5)),
        ("index_out_of_range", set_field("index", 99)),
        ("leaf", set_field("leaf", "ab" * 32)),
        ("proof_hash", flip_proof_hash),
        ("proof_side", flip_proof_side),
        ("proof_dropped_step", lambda r: r["proof"].pop()),
        ("proof_extra_step", lambda r: r["proof"].append({"side": "left", "hash": "00" * 32})),
        ("root", set_field("root", "cd" * 32)),
    ]


@pytest.mark.parametrize(("name", "mutate"), _mutations())
def test_tampered_reveal_fails(name: str, mutate) -> None:
    entries = make_entries(5)
    manifest = _manifest(entries, META)
    reveal = _reveal(entries, 2)
    mutate(reveal)
    check = check_reveal(reveal, manifest)
    assert not check.valid, name
    assert "\n" not in check.reason
    assert_no_secret(check.reason, entries)
    assert reveal["key"] not in check.reason and reveal["response"] not in check.reason


def test_leaf_mismatch_reason_names_index() -> None:
    entries = make_entries(5)
    manifest = _manifest(entries, META)
    reveal = _reveal(entries, 3)
    reveal["key"] = "SECRETKEY-changed"
    reveal["leaf"] = leaf_hash(reveal["id"], reveal["key"], reveal["response"], reveal["salt"])
    check = check_reveal(reveal, manifest)
    assert not check.valid
    assert check.reason == "leaf hash does not match the committed leaf at index 3"


def test_id_mismatch_reason_names_the_id() -> None:
    entries = make_entries(5)
    manifest = _manifest(entries, META)
    reveal = _reveal(entries, 1)
    reveal["id"] = "fp-A-4"
    reveal["leaf"] = leaf_hash(reveal["id"], reveal["key"], reveal["response"], reveal["salt"])
    check = check_reveal(reveal, manifest)
    assert not check.valid
    assert check.reason == "fingerprint id does not match the committed id at index 1"


def test_tampered_manifest_root_fails() -> None:
    entries = make_entries(5)
    manifest = _manifest(entries, META)
    reveal = _reveal(entries, 0)
    manifest["root"] = "ef" * 32
    check = check_reveal(reveal, manifest)
    assert not check.valid
    reveal["root"] = manifest["root"]
    check = check_reveal(reveal, manifest)
    assert not check.valid


def test_tampered_manifest_count_fails() -> None:
    entries = make_entries(3)
    manifest = _manifest(entries, META)
    manifest["count"] = 4
    check = check_reveal(_reveal(entries, 0), manifest)
    assert not check.valid and "count" in check.reason


def test_reveal_against_another_sets_manifest_fails() -> None:
    entries = make_entries(5, "A")
    other = make_entries(5, "B")
    check = check_reveal(_reveal(entries, 2), _manifest(other, META))
    assert not check.valid
    assert_no_secret(check.reason, entries)


def test_same_pairs_with_new_salts_do_not_verify() -> None:
    entries = make_entries(4)
    resalted = [(i, k, r, new_salt()) for i, k, r, _ in entries]
    check = check_reveal(_reveal(resalted, 1), _manifest(entries, META))
    assert not check.valid


@pytest.mark.parametrize("field", ["salt", "key", "response", "id", "index", "proof", "root", "leaf"])
def test_reveal_missing_field_raises(field: str) -> None:
    entries = make_entries(3)
    reveal = _reveal(entries, 0)
    del reveal[field]
    with pytest.raises(OMLInputError, match=f"missing field '{field}'"):
        check_reveal(reveal, _manifest(entries, META))


def test_reveal_structural_errors_raise() -> None:
    entries = make_entries(3)
    manifest = _manifest(entries, META)
    with pytest.raises(OMLInputError, match="JSON object"):
        check_reveal(["not", "a", "dict"], manifest)  # type: ignore[arg-type]
    wrong_type = _reveal(entries, 0)
    wrong_type["index"] = "0"
    with pytest.raises(OMLInputError, match="'index'"):
        check_reveal(wrong_type, manifest)
    wrong_format = _reveal(entries, 0)
    wrong_format["format"] = "oml-commitment"
    with pytest.raises(OMLInputError, match="format"):
        check_reveal(wrong_format, manifest)
    wrong_algorithm = _reveal(entries, 0)
    wrong_algorithm["algorithm"] = "md5"
    with pytest.raises(OMLInputError, match="algorithm"):
        check_reveal(wrong_algorithm, manifest)


def test_manifest_structural_errors_raise() -> None:
    entries = make_entries(3)
    reveal = _reveal(entries, 0)
    manifest = _manifest(entries, META)
    broken = copy.deepcopy(manifest)
    del broken["root"]
    with pytest.raises(OMLInputError, match="missing field 'root'"):
        check_reveal(reveal, broken)
    broken = copy.deepcopy(manifest)
    broken["leaves"][1] = {"id": "fp-A-1"}
    with pytest.raises(OMLInputError, match="leaf 1"):
        check_reveal(reveal, broken)


def test_structural_error_messages_do_not_leak_secrets() -> None:
    entries = make_entries(3)
    reveal = _reveal(entries, 0)
    reveal["salt"] = "nothex"
    with pytest.raises(OMLInputError) as info:
        check_reveal(reveal, _manifest(entries, META))
    assert_no_secret(str(info.value), entries)
    assert "\n" not in str(info.value)
