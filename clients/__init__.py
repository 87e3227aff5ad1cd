"""Endpoint auditing: probe a suspect API with fingerprint keys and weigh what comes back.

    from clients import AuditConfig, run_audit
    report = run_audit(AuditConfig(base_url=..., model=..., fingerprints=...))
    report.verdict, report.p_value, report.layers["user"].matched  # an AuditReport

Interfaces (the `oml audit` command, the MCP audit tool) call `run_audit`; the engine
(oml_core) never imports this package.
"""

from clients.config import AuditConfig


def run_audit(cfg: AuditConfig, on_progress=None):
    """Run or resume an audit and return its `clients.audit_result.AuditReport`; see
    clients.audit.run_audit."""
    from clients.audit import run_audit as _run

    return _run(cfg, on_progress)


__all__ = ["AuditConfig", "run_audit"]
