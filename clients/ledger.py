"""The key ledger: which fingerprint keys each endpoint has already seen.

Every probe shows its key to the suspect, who can then learn to suppress that key. So each
audit spends at most --max-keys keys, and a ledger per endpoint (under
`$OML_HOME/ledgers/`) records the keys spent there, so later audits of the same endpoint pick
fresh keys unless --reuse-keys is given. Keys are recorded as salted SHA-256 digests (the
ledger holds no secret) together with the fingerprint id and the audit that spent them.
Keys are reserved when an audit is planned, before the first request, so a crash can never
leave a key spent but unrecorded.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock

from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json, oml_home
from oml_core.fingerprints import Fingerprint

_SALT = "oml-key-ledger-v1:"


def endpoint_identity(base_url: str) -> str:
    """The endpoint as the suspect sees it: scheme, host, port and path (no credentials, query)."""
    parts = urlsplit(base_url.strip())
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"


def key_digest(key: str) -> str:
    return hashlib.sha256((_SALT + key).encode("utf-8")).hexdigest()


class KeyLedger:
    def __init__(self, base_url: str, root: Path | None = None):
        self.endpoint = endpoint_identity(base_url)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.endpoint.split("://", 1)[-1]).strip("-")[:60]
        digest = hashlib.sha256(self.endpoint.encode()).hexdigest()[:12]
        self.path = (root or oml_home() / "ledgers") / f"{slug}-{digest}.json"
        self._lock = FileLock(str(self.path) + ".lock")

    def _read(self) -> dict:
        if not self.path.exists():
            return {"endpoint": self.endpoint, "keys": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError:
            raise OMLInputError(f"key ledger {self.path} is not valid JSON; restore it from a "
                                "backup or move it away (then every key counts as fresh)") from None
        data.setdefault("keys", {})
        return data

    def spent(self) -> dict[str, dict]:
        """digest -> {fingerprint_id, audits, first_spent}."""
        with self._lock:
            return self._read()["keys"]

    def select(self, fingerprints: list[Fingerprint], max_keys: int, reuse: bool
               ) -> tuple[list[Fingerprint], int]:
        """The first `max_keys` keys not yet spent here (any, with `reuse`), and how many spent
        ones were passed over."""
        spent = self.spent()
        chosen, skipped = [], 0
        for fp in fingerprints:
            if len(chosen) == max_keys:
                break
            if not reuse and key_digest(fp.key) in spent:
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
            for fp in fingerprints:
                entry = data["keys"].setdefault(key_digest(fp.key), {
                    "fingerprint_id": fp.id, "first_spent": now, "audits": []})
                if audit_id not in entry["audits"]:
                    entry["audits"].append(audit_id)
            atomic_write_json(self.path, data)
