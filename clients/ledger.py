"""The key ledger: which fingerprint keys each endpoint has already seen.

Every probe shows its key to the suspect, who can then learn to suppress that key. So each
audit spends at most --max-keys keys, and a ledger per endpoint (under
`$OML_HOME/ledgers/`) records the keys spent there, so later audits of the same endpoint pick
fresh keys unless --reuse-keys is given. Keys are recorded as HMAC-SHA-256 digests under a
secret per-installation salt (the ledger holds no secret, and without the salt its digests
cannot be checked against guessed keys) together with the fingerprint id and the audit that
spent them. Keys are reserved when an audit is planned, before the first request, so a crash
can never leave a key spent but unrecorded.

The salt is 32 random bytes in `<ledgers>/salt` (mode 0600), made on first use; it is written
to a private temporary file and hard-linked into place, so two audits starting at once agree
on one salt. Each ledger records `salt_id` (a digest of the salt), so a ledger copied from
another installation without its salt is refused instead of calling every spent key fresh.

Ledgers written before the salt (version 1: SHA-256 under a fixed public prefix) keep
working: their digests still count as spent, and each is rewritten under the secret salt the
first time an audit that holds its key reads the ledger (keys of other sets stay in the old
form until then, the only way without the keys themselves).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock

from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json, oml_home
from oml_core.fingerprints import Fingerprint

log = logging.getLogger(__name__)

_PUBLIC_SALT_V1 = "oml-key-ledger-v1:"  # version 1 ledgers; read and migrated, never written
LEDGER_VERSION = 2
SALT_FILE = "salt"
_SALT_BYTES = 32


def endpoint_identity(base_url: str) -> str:
    """The endpoint as the suspect sees it: scheme, host, port and path (no credentials, query)."""
    parts = urlsplit(base_url.strip())
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"


def legacy_key_digest(key: str) -> str:
    """A key's digest in a version 1 ledger (a public salt: anyone could test guesses)."""
    return hashlib.sha256((_PUBLIC_SALT_V1 + key).encode("utf-8")).hexdigest()


def installation_salt(folder: Path) -> bytes:
    """This installation's secret ledger salt, made on first use (see the module docstring)."""
    path = folder / SALT_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{SALT_FILE}.", suffix=".tmp", dir=folder)  # 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(_SALT_BYTES) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)  # atomic, and never replaces a salt another audit just made
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    elif path.stat().st_mode & 0o077:
        log.warning("ledger salt %s can be read by other users; chmod 600 it", path)
    try:
        salt = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        salt = b""
    if len(salt) != _SALT_BYTES:
        raise OMLInputError(f"ledger salt {path} is damaged; restore it from a backup (without it "
                            "no ledger here can be read: moving it and the ledgers away makes "
                            "every key count as fresh)")
    return salt


class KeyLedger:
    def __init__(self, base_url: str, root: Path | None = None):
        self.endpoint = endpoint_identity(base_url)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.endpoint.split("://", 1)[-1]).strip("-")[:60]
        digest = hashlib.sha256(self.endpoint.encode()).hexdigest()[:12]
        self.root = root or oml_home() / "ledgers"
        self.path = self.root / f"{slug}-{digest}.json"
        self._lock = FileLock(str(self.path) + ".lock")
        self._salt: bytes | None = None

    @property
    def salt(self) -> bytes:
        if self._salt is None:
            self._salt = installation_salt(self.root)
        return self._salt

    def key_digest(self, key: str) -> str:
        return hmac.new(self.salt, key.encode("utf-8"), hashlib.sha256).hexdigest()

    def salt_id(self) -> str:
        return hmac.new(self.salt, b"oml ledger salt id", hashlib.sha256).hexdigest()[:16]

    def _read(self) -> dict:
        if not self.path.exists():
            return {"endpoint": self.endpoint, "version": LEDGER_VERSION, "salt_id": self.salt_id(),
                    "keys": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.setdefault("keys", {}), dict):
            raise OMLInputError(f"key ledger {self.path} is not a valid ledger; restore it from a "
                                "backup or move it away (then every key counts as fresh)")
        if data.get("salt_id", self.salt_id()) != self.salt_id():
            raise OMLInputError(f"key ledger {self.path} was written under another installation's "
                                f"salt; copy that installation's {self.root / SALT_FILE} here, or "
                                "move the ledger away (then every key counts as fresh)")
        return data

    def _migrate(self, data: dict, fingerprints: list[Fingerprint]) -> bool:
        """Rewrite version 1 digests of these keys under the secret salt; True if any was."""
        keys = data["keys"]
        moved = False
        for fp in fingerprints:
            entry = keys.pop(legacy_key_digest(fp.key), None)
            if entry is not None:
                keys.setdefault(self.key_digest(fp.key), entry)
                moved = True
        data["version"], data["salt_id"] = LEDGER_VERSION, self.salt_id()
        return moved

    def spent(self) -> dict[str, dict]:
        """digest -> {fingerprint_id, audits, first_spent}."""
        with self._lock:
            return self._read()["keys"]

    def select(self, fingerprints: list[Fingerprint], max_keys: int, reuse: bool
               ) -> tuple[list[Fingerprint], int]:
        """The first `max_keys` keys not yet spent here (any, with `reuse`), and how many spent
        ones were passed over. Old-format digests of these keys are migrated on the way."""
        with self._lock:
            data = self._read()
            if self._migrate(data, fingerprints):
                atomic_write_json(self.path, data)
        spent = data["keys"]
        chosen, skipped = [], 0
        for fp in fingerprints:
            if len(chosen) == max_keys:
                break
            if not reuse and self.key_digest(fp.key) in spent:
                skipped += 1
                continue
            chosen.append(fp)
        if not chosen:
            raise OMLInputError(
                f"all {len(fingerprints)} keys of this set were already spent on "
                f"{self.endpoint} (ledger {self.path}); use a new fingerprint set or pass "
                "--reuse-keys (the endpoint has seen those keys)")
        return chosen, skipped

    def reserve(self, fingerprints: list[Fingerprint], audit_id: str) -> None:
        """Record the keys as spent by `audit_id` (idempotent)."""
        now = datetime.now(UTC).isoformat()
        with self._lock:
            data = self._read()
            self._migrate(data, fingerprints)
            for fp in fingerprints:
                entry = data["keys"].setdefault(self.key_digest(fp.key), {
                    "fingerprint_id": fp.id, "first_spent": now, "audits": []})
                if audit_id not in entry["audits"]:
                    entry["audits"].append(audit_id)
            atomic_write_json(self.path, data)
