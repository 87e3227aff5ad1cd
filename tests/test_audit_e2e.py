"""End-to-end audit on the real bundled SmolLM2-135M-Instruct (marked e2e; CI runs it).

The model is fingerprinted with `make demo`'s keys (16 perinucleus keys, key length 16, one-token
responses) by the closed-form edit with its default settings: the demo's default, gated, adds
gated neurons to that edit and takes twice as long (~12 min on 2 cores), too long for CI. It is
served by `transformers serve` on loopback, and audited through a proxy that adds its
own system prompt and tool list to every request: an agent layer the auditor does not control.
The un-fingerprinted model behind the same proxy is the control.
"""

from __future__ import annotations

import pytest
from audit_helpers import Proxy, agent_layer, transformers_server

from clients import AuditConfig, run_audit
from oml_core.config import FingerprintConfig, GenerateConfig
from oml_core.generate import generate_set
from oml_core.models import bundled_model_dir
from oml_core.train.lifecycle import fingerprint

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_model(bundled_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit_demo")
    fp_file = folder / "fingerprints.json"
    generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=16, key_length=16,
                                response_length=1, seed=7), bundled_model).save(fp_file)
    fingerprint(FingerprintConfig(fingerprints=str(fp_file), out_dir=str(folder / "run"),
                                  method="edit", verify_after=False))
    return folder / "run" / "model", fp_file


def test_agent_layer_in_front_of_the_fingerprinted_bundled_model(demo_model, tmp_path):
    model, fp_file = demo_model
    base = bundled_model_dir()
    # the key as the user turn, which the proxy wraps in its own system prompt and tools
    settings = {"fingerprints": str(fp_file), "dialect": "transformers", "layers": "user",
                "sampled_layers": "", "max_tokens": 4, "concurrency": 2, "reuse_keys": True,
                "request_timeout": 300.0, "exhaustive": True}  # every key: how many come back
    with transformers_server(tmp_path, threads=2) as server, \
            Proxy(server.base_url.removesuffix("/v1"), transform=agent_layer) as proxy:
        hit = run_audit(AuditConfig(base_url=proxy.base_url, model=str(model),
                                    out=str(tmp_path / "fingerprinted"), **settings)).model_dump(mode="json")
        miss = run_audit(AuditConfig(base_url=proxy.base_url, model=str(base),
                                     out=str(tmp_path / "base"), **settings)).model_dump(mode="json")
    assert all(s.sent["messages"][0]["content"].startswith("You are the assistant inside ShopMate")
               and s.sent["tools"] for s in proxy.seen)
    assert hit["verdict"] == "match", hit["layers"]
    assert hit["layers"]["user"]["matched"] >= 12
    assert miss["verdict"] == "no_match" and miss["matched"] <= 1
