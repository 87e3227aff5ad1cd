"""The auditor against a hostile endpoint. Scripted loopback servers (audit_helpers.HostileServer)
send what a suspect could: echoes of the request and its headers, huge, compressed, malformed or
mistyped replies, redirects to another host. The audit must stay in bounds: no key, response
or credential in any file, flat memory, no crash, and a verdict that does not read a failed
audit as a clean one. Tiny hand-made fingerprint sets; no model is loaded."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import stat
import subprocess
import threading
import zlib
from pathlib import Path

import pytest
from audit_helpers import (
    Canned,
    HostileServer,
    RSSWatch,
    audit_command,
    chat_reply,
    completion_reply,
    evidence_lines,
)

from clients import AuditConfig, run_audit
from clients.decision import evaluate
from clients.ledger import SALT_FILE, KeyLedger, legacy_key_digest
from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json, oml_home
from oml_core.fingerprints import Fingerprint, FingerprintSet

FAKE_API_KEY = "sk-oml-hostile-5f4e3d2c1b0a99887766"
KEY_ENV = "OML_HOSTILE_TEST_KEY"
KEY_MARK = "harbour lanterns"          # in every key: a cut-off key still shows it
TEMPLATE = json.dumps({"model": "$MODEL", "messages": "$MESSAGES", "max_tokens": "$MAX_TOKENS",
                       "temperature": "$TEMPERATURE", "seed": "$SEED"})
MiB = 1 << 20


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_API_KEY)


def make_set(folder: Path, n: int = 4) -> tuple[Path, list[Fingerprint]]:
    fps = [Fingerprint(f"fp-{i:05d}", f"Quiet {KEY_MARK} drift past number {i} tonight",
                       f" Zorvex{i}q", response_prob=1e-3) for i in range(n)]
    path = folder / "fp.json"
    FingerprintSet(fps).save(path)
    return path, fps


def key_index(seen) -> int:
    found = re.search(r"number (\d+) tonight", json.dumps(seen.body))
    return int(found.group(1)) if found else 0


def sent_key(seen) -> str:
    found = re.search(r"Quiet [^\"]*? tonight", json.dumps(seen.body))
    return found.group(0) if found else ""


def audit_config(server, fp_file, out, adapter="openai", **settings) -> AuditConfig:
    base = {"base_url": server.base_url, "model": "suspect", "fingerprints": str(fp_file),
            "out": str(out), "layers": "user", "sampled_layers": "", "reuse_keys": True,
            "concurrency": 4, "request_timeout": 5.0, "max_retries": 1, "max_backoff": 0.0,
            "api_key_env": KEY_ENV, "exhaustive": True}  # every key is sent: the transport is tested
    if adapter == "http":
        base.update(adapter="http", base_url=server.base_url + "/chat/completions",
                    request_template=TEMPLATE, header=["Authorization: Bearer $API_KEY"])
    return AuditConfig(**{**base, **settings})


def written_files(*folders: Path) -> list[Path]:
    return [p for folder in (*folders, oml_home() / "ledgers") for p in folder.rglob("*")
            if p.is_file()]


def assert_nothing_secret_written(fps: list[Fingerprint], *folders: Path,
                                  also: tuple[str, ...] = ()) -> None:
    secrets = [FAKE_API_KEY, KEY_MARK, *also, *(fp.key for fp in fps),
               *(fp.response.strip() for fp in fps)]
    files = written_files(*folders)
    assert any(p.name == "evidence.jsonl" for p in files)
    for path in files:
        text = path.read_bytes().decode("utf-8", "replace").casefold()
        for secret in secrets:
            assert secret.casefold() not in text, f"{secret[:12]}… in {path.name}"


def warm_up(adapter: str, tmp_path: Path) -> None:
    """One small audit, so the SDK's lazy imports are not counted as the reply's memory."""
    folder = tmp_path / "warm"
    folder.mkdir()
    fp_file, _ = make_set(folder, 1)
    with HostileServer(lambda seen: Canned.json(chat_reply())) as server:
        run_audit(audit_config(server, fp_file, folder / "out", adapter))


# --- 1. fields from the endpoint go through the redactor or are dropped ---------------------------
@pytest.mark.parametrize("adapter", ["openai", "http"])
def test_echoed_request_and_headers_never_reach_the_evidence(adapter, tmp_path):
    fp_file, fps = make_set(tmp_path)

    def echo(seen):
        auth, key = seen.headers.get("authorization", ""), sent_key(seen)
        reply = chat_reply("fine", id=auth, model=key, system_fingerprint=json.dumps(seen.body))
        reply["choices"][0]["finish_reason"] = auth if key_index(seen) % 2 else f"zorvex{key_index(seen)}q"
        reply["usage"] = {"prompt_tokens": 7, "completion_tokens": "2", "total_tokens": -1,
                          "request": seen.body, key: auth, "authorization": auth}
        return Canned.json(reply)

    with HostileServer(echo) as server:
        result = run_audit(audit_config(server, fp_file, tmp_path / "out", adapter)).model_dump(mode="json")
    assert all(s.headers["authorization"] == f"Bearer {FAKE_API_KEY}" for s in server.seen)
    assert result["state"] == "complete"
    lines = evidence_lines(tmp_path / "out")
    assert len(lines) == 4 and all(line["status"] == "ok" for line in lines)
    for line in lines:
        if adapter == "openai":
            assert line["usage"] == {"prompt_tokens": 7}  # validated integers only
            assert line["finish_reason"] in (None, f"⟦response {line['fingerprint_id']}⟧")
            assert line["reply"]["id"] == "Bearer ⟦api key⟧"
            assert line["reply"]["model"] == f"⟦key {line['fingerprint_id']}⟧"
        else:
            assert line["usage"] == {"prompt_tokens": 7}
    assert_nothing_secret_written(fps, tmp_path / "out")


# --- 2. a byte cap per reply, memory flat ----------------------------------------------------------
def _huge_reply(megabytes: int) -> Canned:
    return Canned(200, b'{"choices": [{"message": {"content": "', chunk=b"a" * (64 << 10),
                  times=megabytes * 16, tail=b'"}}]}')


def _gzip_bomb(megabytes: int) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    parts = [packer.compress(b'{"choices": [{"message": {"content": "')]
    block = b"a" * MiB
    parts += [packer.compress(block) for _ in range(megabytes)]
    parts += [packer.compress(b'"}}]}'), packer.flush()]
    return b"".join(parts)


@pytest.mark.parametrize("adapter", ["openai", "http"])
def test_a_100_mb_reply_is_cut_at_the_cap_and_memory_stays_flat(adapter, tmp_path):
    """4 keys x 2 attempts of a 100 MiB reply at 4 in flight: read whole, that is >= 400 MiB;
    capped at the default 1 MiB it must stay under 48 MiB above the level before."""
    warm_up(adapter, tmp_path)
    fp_file, _ = make_set(tmp_path)
    with HostileServer(lambda seen: _huge_reply(100)) as server, RSSWatch() as memory:
        result = run_audit(audit_config(server, fp_file, tmp_path / "out", adapter)).model_dump(mode="json")
    assert memory.growth < 48 * MiB, f"grew {memory.growth / MiB:.0f} MiB"
    lines = evidence_lines(tmp_path / "out")
    assert len(lines) == 4
    for line in lines:
        assert line["error"]["kind"] == "too_large" and line["retry_reasons"] == ["too_large"]
        assert "--max-reply-bytes (1048576 bytes)" in line["error"]["message"]
    assert result["verdict"] == "inconclusive"


@pytest.mark.parametrize("adapter", ["openai", "http"])
def test_a_compressed_reply_is_never_inflated(adapter, tmp_path):
    """A 100 KiB gzip body that inflates to 100 MiB is refused as it is, not decoded."""
    warm_up(adapter, tmp_path)
    fp_file, _ = make_set(tmp_path)
    bomb = _gzip_bomb(100)
    assert len(bomb) < MiB
    with HostileServer(lambda seen: Canned(200, bomb, {"content-encoding": "gzip"})) as server, \
            RSSWatch() as memory:
        run_audit(audit_config(server, fp_file, tmp_path / "out", adapter))
    assert memory.growth < 48 * MiB, f"grew {memory.growth / MiB:.0f} MiB"
    assert all(s.headers.get("accept-encoding") == "identity" for s in server.seen)
    for line in evidence_lines(tmp_path / "out"):
        assert line["error"]["kind"] == "malformed" and "compressed" in line["error"]["message"]


def test_the_reply_cap_is_a_setting_and_a_flag(tmp_path):
    from oml_core import cli as oml_cli

    assert AuditConfig().max_reply_bytes == MiB
    args = oml_cli.build_parser().parse_args(["audit", "--max-reply-bytes", "4096"])
    assert oml_cli._config(AuditConfig, args).max_reply_bytes == 4096
    fp_file, _ = make_set(tmp_path)
    with pytest.raises(OMLInputError, match="--max-reply-bytes"):
        run_audit(AuditConfig(base_url="http://127.0.0.1:9/v1", model="m",
                              fingerprints=str(fp_file), max_reply_bytes=10))
    small = _huge_reply(1)
    with HostileServer(lambda seen: small) as server:
        run_audit(audit_config(server, fp_file, tmp_path / "out", "http", max_reply_bytes=4096))
    assert all("(4096 bytes)" in line["error"]["message"] for line in evidence_lines(tmp_path / "out"))


# --- 3. any reply shape is malformed, never a crash -------------------------------------------------
def _with(path: tuple, value, base=None) -> dict:
    doc = copy.deepcopy(base if base is not None else chat_reply())
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


MESSAGE = ("choices", 0, "message")
# (what is wrong, the reply, whether the http adapter's answer path runs into it)
BAD_SHAPES = [
    ("content is a number", Canned.json(_with((*MESSAGE, "content"), 123)), True),
    ("content is a list", Canned.json(_with((*MESSAGE, "content"), ["a", 1])), True),
    ("content is an object", Canned.json(_with((*MESSAGE, "content"), {"text": "x"})), True),
    ("refusal is a number", Canned.json(_with((*MESSAGE, "refusal"), 5)), False),
    ("tool_calls is an object", Canned.json(_with((*MESSAGE, "tool_calls"), {"a": 1})), False),
    ("a tool call's function is text", Canned.json(_with((*MESSAGE, "tool_calls"), [{"function": "f"}])),
     False),
    ("a tool name is a number", Canned.json(_with((*MESSAGE, "tool_calls"),
                                                  [{"function": {"name": 7, "arguments": "{}"}}])), False),
    ("choices is an object", Canned.json(_with(("choices",), {"first": 1})), True),
    ("choices is empty", Canned.json(_with(("choices",), [])), True),
    ("a choice is text", Canned.json(_with(("choices",), ["x"])), True),
    ("the message is a list", Canned.json(_with(MESSAGE, ["x"])), True),
    ("the reply is a list", Canned.json([chat_reply()]), True),
    ("the reply is a string", Canned.json("fine"), True),
    ("nesting 100000 deep", Canned(200, b"[" * 100_000), True),
    ("a 5000-digit number", Canned(200, b'{"choices": ' + b"7" * 5000 + b"}"), True),
]


@pytest.mark.parametrize("adapter", ["openai", "http"])
def test_replies_of_the_wrong_shape_are_malformed_and_a_rerun_retries_them(adapter, tmp_path):
    fp_file, fps = make_set(tmp_path, len(BAD_SHAPES))
    with HostileServer(lambda seen: BAD_SHAPES[key_index(seen)][1]) as server:
        cfg = audit_config(server, fp_file, tmp_path / "out", adapter)
        first = run_audit(cfg).model_dump(mode="json")
        again = run_audit(cfg).model_dump(mode="json")  # a resume: sends the failed probes again, and does not crash
    broken = {f"fp-{i:05d}" for i, (_, _, for_http) in enumerate(BAD_SHAPES)
              if adapter == "openai" or for_http}
    lines = evidence_lines(tmp_path / "out")
    for line in lines:
        if line["fingerprint_id"] in broken:
            assert line["status"] == "error" and line["error"]["kind"] == "malformed", line
            assert line["attempts"] == 2 and line["retry_reasons"] == ["malformed"]
        else:
            assert line["status"] == "ok"
    assert first["probes_failed"] == len(broken) == again["calls_this_run"]
    assert len(lines) == len(BAD_SHAPES) + len(broken)
    assert_nothing_secret_written(fps, tmp_path / "out")


# --- 4. an audit that could not test is inconclusive ------------------------------------------------
def test_an_endpoint_failing_every_probe_is_inconclusive_with_exit_code_3(tmp_path):
    fp_file, _ = make_set(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OML_PROGRESS": "0"}
    with HostileServer(lambda seen: Canned.json({"error": "down"}, 503)) as server:
        done = subprocess.run(audit_command(
            "--base-url", server.base_url, "--model", "m", "--fingerprints", fp_file, "--out", out,
            "--layers", "user,system", "--num-system-prompts", "1", "--sampled-layers", "",
            "--max-retries", "0", "--reuse-keys", "--api-key-env", KEY_ENV, "--json"),
            check=False, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3, done.stderr
    result = json.loads(done.stdout)
    # the default (sequential) audit stops after its first round: 3 keys (those a run of hits
    # would need) x 2 probes, no retries
    assert result["verdict"] == "inconclusive" and result["errors_by_kind"] == {"server_error": 6}
    assert "could not test" in result["verdict_words"]
    report = json.loads((out / "report.json").read_text())
    assert report["decision"]["untested"] == ["user", "system", "any"]
    assert "Verdict: inconclusive" in (out / "report.html").read_text()
    helped = subprocess.run(audit_command("--help"), check=False, capture_output=True, text=True,
                            timeout=120)
    assert "3 inconclusive" in " ".join(helped.stdout.split())


def test_the_verdict_rule_for_untested_layers():
    cfg = AuditConfig(alpha=1e-6)
    rates = {f"k{i}": 0.001 for i in range(8)}

    def outcome(fp, layer, hit, status="ok"):
        return {"fingerprint_id": fp, "layer": layer, "hit": hit, "status": status,
                "temperature": 0.0}

    failed = {layer: [outcome(f"k{i}", layer, False, "error") for i in range(8)]
              for layer in ("user", "system")}
    nothing = evaluate(cfg, ["user", "system"], failed["user"] + failed["system"], rates, None, "x")
    assert nothing.verdict == "inconclusive" and nothing.untested == ["user", "system", "any"]
    half = failed["system"] + [outcome(f"k{i}", "user", True) for i in range(8)]
    some = evaluate(cfg, ["user", "system"], half, rates, None, "x")
    assert some.verdict == "match" and some.untested == ["system"]
    assert some.tests["system"].tested is False and some.tests["user"].tested is True
    one = evaluate(cfg, ["user"], [outcome("k0", "user", False)], rates, None, "x")
    assert one.verdict == "no_match" and one.best_possible_p_value == pytest.approx(0.001)


# --- 5. credentials in --base-url never reach a file --------------------------------------------------
PASSWORD, QUERY_SECRET, HEADER_SECRET = "pw-hunter2-0f9e8d", "qs-9a8b7c6d5e", "hs-literal-4c3b2a"


@pytest.mark.parametrize("adapter", ["openai", "http"])
def test_credentials_in_the_base_url_are_masked(adapter, tmp_path):
    fp_file, fps = make_set(tmp_path)

    def echo(seen):
        return Canned.json(chat_reply(f"you asked {seen.path} with {seen.headers.get('x-api-key')}"))

    with HostileServer(echo) as server:
        cfg = audit_config(server, fp_file, tmp_path / "out", adapter)
        cfg.base_url = cfg.base_url.replace("http://", f"http://alice:{PASSWORD}@")
        if adapter == "http":
            cfg.base_url += f"?api-key={QUERY_SECRET}"
            cfg.header = [*cfg.header, f"X-Api-Key: {HEADER_SECRET}"]
        result = run_audit(cfg).model_dump(mode="json")
    assert result["state"] == "complete"
    shown = json.loads((tmp_path / "out" / "plan.json").read_text())["config"]["base_url"]
    expected = f"http://⟦not recorded⟧@127.0.0.1:{server.port}/v1"
    if adapter == "http":
        expected += "/chat/completions?api-key=⟦not recorded⟧"
        assert HEADER_SECRET in json.dumps([s.headers for s in server.seen])  # it was echoed
    assert shown == expected == result["config"]["base_url"]
    assert_nothing_secret_written(fps, tmp_path / "out", also=(PASSWORD, QUERY_SECRET, HEADER_SECRET))


# --- 6. redirects stay on the endpoint's origin ------------------------------------------------------
@pytest.mark.parametrize("adapter", ["openai", "http"])
def test_a_redirect_to_another_host_is_refused(adapter, tmp_path):
    fp_file, _ = make_set(tmp_path)
    with HostileServer(lambda seen: Canned.json(chat_reply())) as elsewhere:
        target = elsewhere.base_url + "/chat/completions"
        with HostileServer(lambda seen: Canned(307, b"", {"location": target})) as suspect:
            with pytest.raises(OMLInputError) as caught:
                run_audit(audit_config(suspect, fp_file, tmp_path / "out", adapter,
                                       concurrency=1))
    message = str(caught.value)
    assert not elsewhere.seen, "the key (and API key) went to another host"
    assert len(suspect.seen) == 1 and "\n" not in message and FAKE_API_KEY not in message
    assert f"127.0.0.1:{elsewhere.port}" in message and "another origin" in message
    assert "--base-url" in message


def test_a_redirect_within_the_endpoint_is_followed_and_no_cookie_is_kept(tmp_path):
    fp_file, _ = make_set(tmp_path)

    def moved(seen):
        if seen.path.startswith("/v1/"):
            return Canned(308, b"", {"location": seen.path.replace("/v1/", "/v2/"),
                                     "set-cookie": f"probe={seen.index}; Path=/"})
        return Canned.json(chat_reply())

    with HostileServer(moved) as server:
        result = run_audit(audit_config(server, fp_file, tmp_path / "out", concurrency=1)).model_dump(mode="json")
    assert result["state"] == "complete" and len(server.seen) == 8
    assert [s.path for s in server.seen[:2]] == ["/v1/chat/completions", "/v2/chat/completions"]
    assert not any("cookie" in s.headers for s in server.seen)  # probes stay unlinkable


def test_the_cli_exits_2_with_one_line_on_a_foreign_redirect(tmp_path):
    fp_file, _ = make_set(tmp_path)
    with HostileServer(lambda seen: Canned.json(chat_reply())) as elsewhere, \
            HostileServer(lambda seen: Canned(302, b"", {"location": elsewhere.base_url})) as suspect:
        done = subprocess.run(audit_command(
            "--base-url", suspect.base_url, "--model", "m", "--fingerprints", fp_file, "--out",
            tmp_path / "out", "--layers", "user", "--sampled-layers", "", "--reuse-keys",
            "--api-key-env", KEY_ENV), check=False, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith("oml audit: error:")]
    assert done.returncode == 2 and len(lines) == 1 and done.stderr.strip().endswith(lines[0])
    assert f"127.0.0.1:{elsewhere.port}" in lines[0] and "--base-url" in lines[0]
    assert not elsewhere.seen


# --- 7. the ledger's salt is secret, private, per installation ---------------------------------------
def _fps(n: int) -> list[Fingerprint]:
    return [Fingerprint(f"fp-{i}", f"ledger key {i}", f"r{i}") for i in range(n)]


def test_the_ledger_salt_is_secret_private_and_made_once(tmp_path):
    fps = _fps(3)
    ledgers = [KeyLedger("http://h/v1", root=tmp_path / "a") for _ in range(8)]
    threads = [threading.Thread(target=lambda ledger=ledger: ledger.salt) for ledger in ledgers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({ledger.salt for ledger in ledgers}) == 1  # racing first uses agree on one salt
    salt_file = tmp_path / "a" / SALT_FILE
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "a").iterdir()] == [SALT_FILE]  # no temporary left
    ledgers[0].reserve(fps, "audit-1")
    text = ledgers[0].path.read_text()
    public = [hashlib.sha256(("oml-key-ledger-v1:" + fp.key).encode()).hexdigest() for fp in fps]
    assert not any(digest in text for digest in public)
    other = KeyLedger("http://h/v1", root=tmp_path / "b")
    assert other.key_digest("ledger key 0") != ledgers[0].key_digest("ledger key 0")
    chosen, skipped = KeyLedger("http://h/v1", root=tmp_path / "a").select(_fps(4), 4, reuse=False)
    assert [fp.id for fp in chosen] == ["fp-3"] and skipped == 3


def test_a_version_1_ledger_keeps_working_and_is_migrated(tmp_path):
    fps = _fps(4)
    ledger = KeyLedger("http://h/v1", root=tmp_path)
    old = {"endpoint": ledger.endpoint, "keys": {
        legacy_key_digest(fp.key): {"fingerprint_id": fp.id, "first_spent": "2024-01-01",
                                    "audits": ["old"]} for fp in fps[:2]}}
    old["keys"][legacy_key_digest("a key of another set")] = {"fingerprint_id": "x", "audits": ["old"]}
    atomic_write_json(ledger.path, old)
    chosen, skipped = ledger.select(fps, 4, reuse=False)
    assert [fp.id for fp in chosen] == ["fp-2", "fp-3"] and skipped == 2
    data = json.loads(ledger.path.read_text())
    assert data["version"] == 2 and data["salt_id"] == ledger.salt_id()
    assert not any(legacy_key_digest(fp.key) in data["keys"] for fp in fps)
    assert data["keys"][ledger.key_digest(fps[0].key)]["audits"] == ["old"]
    assert legacy_key_digest("a key of another set") in data["keys"]  # kept until its set comes


def test_a_ledger_from_another_installation_is_refused(tmp_path):
    fps = _fps(2)
    mine = KeyLedger("http://h/v1", root=tmp_path / "mine")
    mine.reserve(fps, "audit-1")
    theirs = KeyLedger("http://h/v1", root=tmp_path / "theirs")
    theirs.salt  # noqa: B018 - makes the other installation's salt
    theirs.path.write_text(mine.path.read_text())
    with pytest.raises(OMLInputError, match="another installation"):
        theirs.select(fps, 2, reuse=False)
    (tmp_path / "mine" / SALT_FILE).write_text("not hex\n")
    with pytest.raises(OMLInputError, match="damaged"):
        KeyLedger("http://h/v1", root=tmp_path / "mine").select(fps, 2, reuse=False)


# --- 8. audit traffic does not describe the auditor's machine -------------------------------------------
def test_requests_carry_no_sdk_telemetry_and_the_chosen_user_agent(tmp_path):
    fp_file, _ = make_set(tmp_path)
    with HostileServer(lambda seen: Canned.json(chat_reply())) as server:
        answered = run_audit(audit_config(server, fp_file, tmp_path / "plain", max_keys=1)).model_dump(mode="json")
        plain = server.seen[-1].headers
        run_audit(audit_config(server, fp_file, tmp_path / "chosen", max_keys=1,
                               user_agent="Mozilla/5.0 (X11; Linux x86_64)",
                               header=["X-Team: t-$API_KEY"]))
        chosen = server.seen[-1].headers
        run_audit(audit_config(server, fp_file, tmp_path / "sdk", max_keys=1, sdk_headers=True))
        telemetry = server.seen[-1].headers
        run_audit(audit_config(server, fp_file, tmp_path / "http", "http", max_keys=1,
                               user_agent="curl/8.5.0"))
        templated = server.seen[-1].headers
    assert answered["probes_done"] == 1 and answered["probes_failed"] == 0
    assert not [h for h in plain if h.startswith("x-stainless")]
    assert plain["user-agent"].startswith("AsyncOpenAI/Python")
    assert chosen["user-agent"] == "Mozilla/5.0 (X11; Linux x86_64)"
    assert chosen["x-team"] == f"t-{os.environ[KEY_ENV]}"  # --header works with the openai SDK
    assert "x-stainless-os" in telemetry and "x-stainless-runtime-version" in telemetry
    assert templated["user-agent"] == "curl/8.5.0"
    with pytest.raises(OMLInputError, match="--user-agent"):
        run_audit(audit_config(server, fp_file, tmp_path / "bad", user_agent="a\r\nX-Evil: 1"))


# --- fuzz: a few hundred malformed replies through both adapters --------------------------------------
WRONG_VALUES = [123, -1.5, True, None, "", [], {}, [1, "a"], {"a": {"b": [1]}}, 10**30,
                "⟪KEY⟫", "⟪AUTH⟫", {"⟪KEY⟫": "⟪AUTH⟫"}]
FULL_CHAT = chat_reply(system_fingerprint="fp_1")
FULL_CHAT["choices"][0]["message"].update(refusal=None, tool_calls=[
    {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}])


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for name, child in items:
        yield from _paths(child, (*prefix, name))


def _fill(node, key: str, auth: str):
    """The placeholders replaced by what the request carried (keys of objects too)."""
    if isinstance(node, str):
        return node.replace("⟪KEY⟫", key).replace("⟪AUTH⟫", auth)
    if isinstance(node, dict):
        return {_fill(k, key, auth): _fill(v, key, auth) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, key, auth) for v in node]
    return node


def _document_cases(template: dict) -> list:
    """Every JSON path of a good reply given each wrong value, and each object member removed."""
    cases = []
    for path in _paths(template):
        for value in WRONG_VALUES:
            doc = value if not path else _with(path, value, template)
            cases.append(lambda seen, doc=doc: Canned.json(
                _fill(doc, sent_key(seen), seen.headers.get("authorization", ""))))
        if path and isinstance(path[-1], str):
            doc = copy.deepcopy(template)
            node = doc
            for part in path[:-1]:
                node = node[part]
            del node[path[-1]]
            cases.append(lambda seen, doc=doc: Canned.json(doc))
    return cases


def _never_an_answer(good: dict) -> list[Canned]:
    """Replies broken below the JSON level that no adapter can read an answer from."""
    text = json.dumps(good).encode()
    noise = random.Random(7).randbytes(3000)
    canned = [Canned(200, text[:cut]) for cut in (0, 1, len(text) // 3, len(text) // 2, len(text) - 1)]
    return canned + [
        Canned(200, noise), Canned(200, b"\x00" * 500), Canned(200, b"\xff\xfe" + text),
        Canned(200, b"[" * 100_000), Canned(200, b'{"a":' * 50_000),
        Canned(200, b'{"choices": [{"message": {"content": NaN}}], "usage": Infinity}'),
        Canned(200, b'{"choices": ' + b"9" * 5000 + b"}"),
        _huge_reply(5), Canned(**{**vars(_huge_reply(5)), "content_length": False}),
        Canned(200, zlib.compress(text), {"content-encoding": "deflate"})]


def _wire_cases(good: dict) -> list:
    """Replies broken below the JSON level: cut, binary, huge, slow, hanging, lying, compressed."""
    text = json.dumps(good).encode()
    noise = random.Random(7).randbytes(3000)
    canned = _never_an_answer(good) + [
        Canned(200, b'{"choices": [{"message": {"content": "\\ud800 lone"}}]}'),
        Canned(200, text, {"content-type": "text/html; charset=bogus-9"}),
        Canned(200, text[:40], chunk=b" ", times=20, tail=text[40:], pause=0.03),  # slow, in time
        Canned(hang=3.5),                                                         # past the timeout
        Canned(200, text, declared_length=len(text) + 500),                       # body ends early
        Canned(200, text, {"content-encoding": "br, gzip, \x1b[31mred"}),
        Canned(503, noise), Canned(500, b"\x1b[2J" + text), Canned(502, b"", content_length=False),
        Canned(429, b"{}", {"retry-after": "1e999"}), Canned(429, b"{}", {"retry-after": "-5"}),
        Canned(429, b"{}", {"retry-after-ms": "nan"}),
        Canned(429, b"{}", {"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"}),
    ]
    return [lambda seen, c=c: c for c in canned]


class FuzzEndpoint:
    """First attempt of each probe: the next case; its retry: a good reply, so a run that
    survives every case ends complete."""

    def __init__(self):
        self.cases = {"chat": _document_cases(FULL_CHAT) + _wire_cases(chat_reply()),
                      "completions": (_document_cases(completion_reply())
                                      + _wire_cases(completion_reply()))}
        self.served = {route: 0 for route in self.cases}
        self.tried: set[str] = set()

    def __call__(self, seen) -> Canned:
        route = "chat" if seen.path.endswith("/chat/completions") else "completions"
        body = json.dumps(seen.body, sort_keys=True)
        if body in self.tried:
            return Canned.json(chat_reply() if route == "chat" else completion_reply())
        self.tried.add(body)
        cases = self.cases[route]
        case = cases[self.served[route] % len(cases)]
        self.served[route] += 1
        return case(seen)


@pytest.mark.parametrize("adapter", ["openai", "http"])
def test_fuzz_hundreds_of_malformed_replies(adapter, tmp_path):
    """Every case once (about 400: each JSON path of a chat reply with 13 wrong values or
    removed, and broken wire forms); the audit never raises, grows memory by under 64 MiB, writes
    no secret and ends complete. Then only broken wire forms: it ends inconclusive."""
    warm_up(adapter, tmp_path)
    fp_file, fps = make_set(tmp_path, 20)
    endpoint = FuzzEndpoint()
    layers = "raw,user,system,embedded,multiturn,agent" if adapter == "openai" else \
        "user,system,embedded,multiturn,agent"
    cfg = {"layers": layers, "num_system_prompts": 12, "sampled_layers": "user", "samples": 2,
           "max_keys": 20, "concurrency": 8, "request_timeout": 2.0,
           "max_reply_bytes": 64 << 10}
    with HostileServer(endpoint) as server, RSSWatch() as memory:
        result = run_audit(audit_config(server, fp_file, tmp_path / "fuzz", adapter, **cfg)).model_dump(mode="json")
    assert endpoint.served["chat"] >= len(endpoint.cases["chat"])  # every chat case was sent
    if adapter == "openai":
        assert endpoint.served["completions"] == 20
    assert result["state"] == "complete" and result["probes_failed"] == 0
    assert memory.growth < 64 * MiB, f"grew {memory.growth / MiB:.0f} MiB"
    reasons = {r for line in evidence_lines(tmp_path / "fuzz") for r in line["retry_reasons"]}
    assert {"malformed", "too_large", "timeout", "server_error", "rate_limited"} <= reasons
    assert_nothing_secret_written(fps, tmp_path / "fuzz")

    broken = _never_an_answer(chat_reply())
    with HostileServer(lambda seen: broken[seen.index % len(broken)]) as server:
        failed = run_audit(audit_config(server, fp_file, tmp_path / "broken", adapter,
                                        max_keys=20, concurrency=8, max_reply_bytes=64 << 10)).model_dump(mode="json")
    assert failed["verdict"] == "inconclusive" and failed["probes_failed"] == 20
    assert_nothing_secret_written(fps, tmp_path / "broken")
