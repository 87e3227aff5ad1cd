"""Public commitment to the secret (key, response) pairs, and single-pair reveals (docs/design.md#commitment).

A claim made only after a dispute starts is weak; publishing a commitment at release shows
the fingerprints existed earlier. The manifest holds a salted SHA-256 per pair and a Merkle
root over the set, and nothing secret. Revealing one pair later, with its salt and Merkle
path, proves it was in the committed set while the other pairs stay hidden.

Hashing choices (all fixed by the "sha256-merkle-v1" algorithm name):
- leaf: SHA-256(b"oml-leaf-v1\\x00" + salt + len-prefixed id, key, response); length prefixes
  keep ("ab", "c") and ("a", "bc") apart, and the random salt stops guessing short responses.
- tree: leaves enter as SHA-256(0x00 + leaf), nodes are SHA-256(0x01 + left + right), so a
  node can never pass for a leaf. An odd node at the end of a level is promoted unchanged;
  duplicating it instead would let two different sets share a root (CVE-2012-2459).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from oml_core.errors import OMLInputError

ALGORITHM = "sha256-merkle-v1"
MANIFEST_FORMAT = "oml-commitment"
REVEAL_FORMAT = "oml-reveal"
VERSION = 1
SALT_BYTES = 16

_LEAF_DOMAIN = b"oml-leaf-v1\x00"
_TREE_LEAF_PREFIX = b"\x00"
_TREE_NODE_PREFIX = b"\x01"
_DIGEST_BYTES = 32
_MANIFEST_RESERVED = ("format", "version", "algorithm", "count", "root", "leaves")

Entry = tuple[str, str, str, str]
"""(fingerprint id, key, response, salt hex) for one committed pair."""


class LeafHash(BaseModel):
    id: str
    hash: str


class ProofStep(BaseModel):
    side: str
    hash: str


class Manifest(BaseModel):
    """The public commitment (`oml commit`): salted per-pair hashes and their Merkle root.
    Metadata the caller adds (created, strategy, tokenizer, ...) rides along as extra fields,
    so the written file keeps every key it had."""

    model_config = ConfigDict(extra="allow")

    format: str
    version: int
    algorithm: str
    count: int
    root: str = Field(description="Merkle root: publish this to commit to the set")
    leaves: list[LeafHash]

    def meta(self, name: str) -> Any:
        """A metadata field, None when absent."""
        return (self.model_extra or {}).get(name)


class Reveal(BaseModel):
    """One disclosed pair with its salt and Merkle path: the one result that carries a key
    and its response, made only on an explicit request (`oml reveal`)."""

    format: str
    version: int
    algorithm: str
    id: str
    key: str
    response: str
    salt: str
    index: int
    leaf: str
    proof: list[ProofStep]
    root: str


class CommitmentResult(BaseModel):
    """A set's commitment as `show_commitment` returns it: the leaves may be cut."""

    fingerprints: str
    format: str
    version: int
    algorithm: str
    count: int
    root: str = Field(description="Merkle root: publish this to commit to the set")
    strategy: str | None = None
    tokenizer: str | None = None
    leaves: list[LeafHash] = Field(description="salted per-pair hashes (public), maybe cut")
    leaves_truncated: bool
    written_to: str | None = Field(None, description="where the full manifest was written")

    @classmethod
    def of(cls, manifest: Manifest, fingerprints: str, max_leaves: int,
           written_to: str | None) -> CommitmentResult:
        return cls(fingerprints=fingerprints, format=manifest.format, version=manifest.version,
                   algorithm=manifest.algorithm, count=manifest.count, root=manifest.root,
                   strategy=manifest.meta("strategy"), tokenizer=manifest.meta("tokenizer"),
                   leaves=manifest.leaves[:max_leaves],
                   leaves_truncated=len(manifest.leaves) > max_leaves, written_to=written_to)


class RevealResult(Reveal):
    """The one deliberate exception: this result carries a key and its response."""

    written_to: str | None = None


def new_salt() -> str:
    """A fresh random salt (16 bytes, hex); without it a short response could be guessed from its hash."""
    return secrets.token_bytes(SALT_BYTES).hex()


def _salt_bytes(salt_hex: str) -> bytes:
    """Decode a salt, refusing short or non-hex ones that would weaken the hiding."""
    try:
        salt = bytes.fromhex(salt_hex)
    except (TypeError, ValueError):
        raise OMLInputError("salt is not valid hex; generate salts with new_salt()") from None
    if len(salt) < SALT_BYTES:
        raise OMLInputError(
            f"salt is {len(salt)} bytes, at least {SALT_BYTES} are needed; "
            "generate salts with new_salt()"
        )
    return salt


def _length_prefixed(text: str) -> bytes:
    """8-byte big-endian length then UTF-8 bytes, so field boundaries are unambiguous."""
    data = text.encode("utf-8")
    return len(data).to_bytes(8, "big") + data


def leaf_hash(fingerprint_id: str, key: str, response: str, salt_hex: str) -> str:
    """Hex SHA-256 binding one (id, key, response) pair under its salt."""
    for name, value in (("id", fingerprint_id), ("key", key), ("response", response)):
        if not isinstance(value, str):
            raise OMLInputError(f"fingerprint {name} must be text, got {type(value).__name__}")
    digest = hashlib.sha256(_LEAF_DOMAIN + _salt_bytes(salt_hex))
    for field in (fingerprint_id, key, response):
        digest.update(_length_prefixed(field))
    return digest.hexdigest()


def _digest(hex_text: str, what: str) -> bytes:
    """Decode a 32-byte hex digest or raise ValueError naming what was malformed."""
    if not isinstance(hex_text, str):
        raise ValueError(f"{what} must be a hex string")
    raw = bytes.fromhex(hex_text)
    if len(raw) != _DIGEST_BYTES:
        raise ValueError(f"{what} must be {_DIGEST_BYTES} bytes of hex")
    return raw


def _tree_leaf(leaf: bytes) -> bytes:
    """A leaf as it enters the tree, domain-separated from internal nodes."""
    return hashlib.sha256(_TREE_LEAF_PREFIX + leaf).digest()


def _tree_node(left: bytes, right: bytes) -> bytes:
    """An internal node over two children."""
    return hashlib.sha256(_TREE_NODE_PREFIX + left + right).digest()


def _next_level(level: list[bytes]) -> list[bytes]:
    """Pair up a level; an odd last node is promoted unchanged, never duplicated."""
    paired = [_tree_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        paired.append(level[-1])
    return paired


def _tree_leaves(leaves_hex: Sequence[str]) -> list[bytes]:
    """Decode leaf hashes into tree leaves, refusing an empty set."""
    if len(leaves_hex) == 0:
        raise OMLInputError("cannot commit to an empty fingerprint set; generate fingerprints first")
    try:
        return [_tree_leaf(_digest(h, f"leaf {i}")) for i, h in enumerate(leaves_hex)]
    except ValueError as exc:
        raise OMLInputError(f"{exc}; recompute leaves with leaf_hash()") from None


def merkle_root(leaves_hex: Sequence[str]) -> str:
    """Hex Merkle root over the leaf hashes, in set order."""
    level = _tree_leaves(leaves_hex)
    while len(level) > 1:
        level = _next_level(level)
    return level[0].hex()


def merkle_proof(leaves_hex: Sequence[str], index: int) -> list[dict]:
    """Sibling hashes from bottom to top proving leaf `index` is under the root.

    Each step says on which side the sibling sits. Levels where the node is promoted
    unchanged contribute no step.
    """
    level = _tree_leaves(leaves_hex)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(level):
        raise OMLInputError(f"index {index!r} is outside the set of {len(level)} leaves")
    proof: list[dict] = []
    while len(level) > 1:
        if not (index == len(level) - 1 and len(level) % 2):
            sibling = index ^ 1
            side = "left" if sibling < index else "right"
            proof.append({"side": side, "hash": level[sibling].hex()})
        level = _next_level(level)
        index //= 2
    return proof


def root_from_proof(leaf_hex: str, proof: list[dict]) -> str:
    """Hex root reached by folding `proof` into `leaf_hex`; ValueError if the proof is malformed."""
    node = _tree_leaf(_digest(leaf_hex, "leaf"))
    if not isinstance(proof, list):
        raise ValueError("proof must be a list of steps")
    for step in proof:
        if not isinstance(step, dict):
            raise ValueError("each proof step must be an object")
        sibling = _digest(step.get("hash"), "proof hash")
        side = step.get("side")
        if side == "left":
            node = _tree_node(sibling, node)
        elif side == "right":
            node = _tree_node(node, sibling)
        else:
            raise ValueError("proof side must be 'left' or 'right'")
    return node.hex()


def check_proof(leaf_hex: str, proof: list[dict], root_hex: str) -> bool:
    """True iff the proof leads from the leaf to the root; a malformed proof is simply False."""
    try:
        computed = root_from_proof(leaf_hex, proof)
        return hmac.compare_digest(computed, root_hex.lower())
    except (AttributeError, TypeError, ValueError):
        return False


def _expected_sides(index: int, count: int) -> list[str]:
    """The side sequence a genuine proof for `index` in a set of `count` leaves must have."""
    sides: list[str] = []
    while count > 1:
        if not (index == count - 1 and count % 2):
            sides.append("left" if index % 2 else "right")
        index //= 2
        count = (count + 1) // 2
    return sides


def _validate_entries(entries: Sequence[Entry]) -> list[str]:
    """Check entry shape and id uniqueness, returning the leaf hashes in order."""
    if len(entries) == 0:
        raise OMLInputError("cannot commit to an empty fingerprint set; generate fingerprints first")
    seen: set[str] = set()
    leaves: list[str] = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, (tuple, list)) or len(entry) != 4:
            raise OMLInputError(
                f"entry {position} must be (id, key, response, salt); rebuild it from the fingerprints"
            )
        fingerprint_id = entry[0]
        if fingerprint_id in seen:
            raise OMLInputError(
                f"fingerprint id {fingerprint_id!r} appears twice; give every fingerprint a unique id"
            )
        seen.add(fingerprint_id)
        leaves.append(leaf_hash(*entry))
    return leaves


def build_manifest(entries: Sequence[Entry], metadata: dict) -> Manifest:
    """The public commitment: per-pair leaf hashes and their Merkle root, no secrets.

    `metadata` (model name, date, ...) is merged in but may not override commitment fields.
    """
    clash = sorted(set(metadata) & set(_MANIFEST_RESERVED))
    if clash:
        raise OMLInputError(
            f"metadata field {clash[0]!r} is reserved for the commitment; rename it"
        )
    leaves = _validate_entries(entries)
    return Manifest(
        format=MANIFEST_FORMAT, version=VERSION, algorithm=ALGORITHM, count=len(leaves),
        root=merkle_root(leaves),
        leaves=[LeafHash(id=entry[0], hash=leaf) for entry, leaf in zip(entries, leaves)],
        **metadata)


def build_reveal(entries: Sequence[Entry], index: int) -> Reveal:
    """Disclose one pair with its salt and Merkle path; the other pairs stay hidden."""
    leaves = _validate_entries(entries)
    proof = merkle_proof(leaves, index)
    fingerprint_id, key, response, salt = entries[index]
    return Reveal(format=REVEAL_FORMAT, version=VERSION, algorithm=ALGORITHM, id=fingerprint_id,
                  key=key, response=response, salt=salt, index=index, leaf=leaves[index],
                  proof=[ProofStep(**step) for step in proof], root=merkle_root(leaves))


_REVEAL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "algorithm": str, "id": str, "key": str, "response": str,
    "salt": str, "index": int, "leaf": str, "proof": list, "root": str,
}
_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "algorithm": str, "count": int, "root": str, "leaves": list,
}


def _require_fields(doc: Any, fields: dict, what: str, fix: str) -> None:
    """Raise OMLInputError for a document that is structurally unusable (missing or mistyped field)."""
    if not isinstance(doc, dict):
        raise OMLInputError(f"{what} must be a JSON object; {fix}")
    for name, kind in fields.items():
        if name not in doc:
            raise OMLInputError(f"{what} is missing field {name!r}; {fix}")
        value = doc[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise OMLInputError(f"{what} field {name!r} has the wrong type; {fix}")


def _require_format(doc: dict, expected: str, what: str, fix: str) -> None:
    """Refuse documents of another kind or a version/algorithm this code cannot check."""
    if doc["format"] != expected:
        raise OMLInputError(f"{what} has format {doc['format']!r}, expected {expected!r}; {fix}")
    if doc["version"] != VERSION or doc["algorithm"] != ALGORITHM:
        raise OMLInputError(
            f"{what} uses version {doc['version']!r} / algorithm {doc['algorithm']!r}, "
            f"only version {VERSION} / {ALGORITHM!r} is supported; {fix}"
        )


def _validate_reveal(reveal: Any) -> None:
    """Structural checks on a reveal file."""
    fix = "produce it with `oml reveal`"
    _require_fields(reveal, _REVEAL_FIELDS, "reveal file", fix)
    _require_format(reveal, REVEAL_FORMAT, "reveal file", fix)


def _validate_manifest(manifest: Any) -> None:
    """Structural checks on a commitment manifest."""
    fix = "produce it with `oml commit`"
    _require_fields(manifest, _MANIFEST_FIELDS, "commitment manifest", fix)
    _require_format(manifest, MANIFEST_FORMAT, "commitment manifest", fix)
    for i, item in enumerate(manifest["leaves"]):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(
            item.get("hash"), str
        ):
            raise OMLInputError(f"commitment manifest leaf {i} needs text 'id' and 'hash'; {fix}")


def _same_hex(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests, case-insensitive."""
    try:
        return hmac.compare_digest(a.lower(), b.lower())
    except TypeError:  # non-ASCII text cannot be a digest
        return False


def _manifest_is_consistent(manifest: dict) -> tuple[bool, str]:
    """The manifest's count and root must agree with its own leaf list."""
    leaves = [item["hash"] for item in manifest["leaves"]]
    if manifest["count"] != len(leaves):
        return False, f"manifest count {manifest['count']} does not match its {len(leaves)} leaves"
    try:
        root = merkle_root(leaves)
    except OMLInputError:
        return False, "manifest leaves are empty or not valid SHA-256 hex digests"
    if not _same_hex(root, manifest["root"]):
        return False, "manifest root does not match the Merkle root of its listed leaves"
    return True, "manifest is consistent"


class RevealCheck(BaseModel):
    """`oml check-reveal`'s answer: whether a revealed pair belongs to the committed set."""

    valid: bool
    reason: str = Field(description="why, in one line; never quotes the key or response")


def check_reveal(reveal: Reveal | dict, manifest: Manifest | dict) -> RevealCheck:
    """Check that a revealed pair belongs to the committed set.

    Each is a model or the JSON document read from its file (checked field by field here, so
    a damaged file gets a message naming the field). Structurally invalid input raises
    OMLInputError; a well-formed reveal that does not match is valid=False with the reason.
    Reasons never quote the key or response.
    """
    valid, reason = _reveal_belongs(reveal, manifest)
    return RevealCheck(valid=valid, reason=reason)


def _reveal_belongs(reveal: Reveal | dict, manifest: Manifest | dict) -> tuple[bool, str]:
    if isinstance(reveal, BaseModel):
        reveal = reveal.model_dump(mode="json")
    if isinstance(manifest, BaseModel):
        manifest = manifest.model_dump(mode="json")
    _validate_reveal(reveal)
    _validate_manifest(manifest)
    consistent, why = _manifest_is_consistent(manifest)
    if not consistent:
        return False, why
    index, committed = reveal["index"], manifest["leaves"]
    if not 0 <= index < len(committed):
        return False, f"index {index} is outside the committed set of {len(committed)} leaves"
    leaf = leaf_hash(reveal["id"], reveal["key"], reveal["response"], reveal["salt"])
    if not _same_hex(leaf, reveal["leaf"]):
        return False, "reveal's leaf hash does not match its id, key, response and salt"
    if reveal["id"] != committed[index]["id"]:
        return False, f"fingerprint id does not match the committed id at index {index}"
    if not _same_hex(leaf, committed[index]["hash"]):
        return False, f"leaf hash does not match the committed leaf at index {index}"
    if not _same_hex(reveal["root"], manifest["root"]):
        return False, "reveal's root differs from the manifest's root"
    sides = [step.get("side") if isinstance(step, dict) else None for step in reveal["proof"]]
    if sides != _expected_sides(index, len(committed)):
        return False, f"Merkle proof has the wrong shape for index {index}"
    if not check_proof(leaf, reveal["proof"], manifest["root"]):
        return False, "Merkle proof does not lead to the committed root"
    return True, f"pair {index} belongs to the committed set with root {manifest['root']}"
