"""Local verification: run fingerprint keys through a model, batched, under several wrappers."""

from oml_core.verify.result import VerifyReport, VerifyResult
from oml_core.verify.verifier import check_keys, verify

__all__ = ["VerifyReport", "VerifyResult", "check_keys", "verify"]
