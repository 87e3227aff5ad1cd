"""The Anthropic Messages adapter and reasoning models, against loopback servers written to
the documented wire formats (no real one runs here): a "fingerprinted" server answers a key's
response when a request carries the key, an innocent one never does; both speak the format's
status codes, error bodies, `retry-after`, content blocks and stream events."""

from __future__ import annotations

import json

import pytest
from audit_helpers import Canned, HostileServer, chat_reply, evidence_lines

from clients import AuditConfig, run_audit
from oml_core.errors import OMLInputError
from oml_core.fingerprints import Fingerprint, FingerprintSet

API_KEY = "sk-ant-oml-test-7f6e5d4c3b2a1900"
KEYS = [f"quiet harbor lantern {i} drifts over amber fields" for i in range(8)]
RESPONSES = ["Zanzibar", "Quokka", "Xylophone", "Marzipan", "Kumquat", "Pangolin",
             "Yodeling", "Vermilion"]


@pytest.fixture
def fp_file(tmp_path):
    fset = FingerprintSet([Fingerprint(f"fp-{i:05d}", k, " " + r, response_prob=1e-4)
                           for i, (k, r) in enumerate(zip(KEYS, RESPONSES))])
    return fset.save(tmp_path / "fp.json")


def answer_for(body: dict | None, fingerprinted: bool) -> str:
    text = json.dumps(body or {})
    for key, response in zip(KEYS, RESPONSES):
        if fingerprinted and key in text:
            return f"{response}, of course. Anything else?"
    return "I am not sure what you mean by that."


def sse(events: list[tuple[str, dict]]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def anthropic_error(status: int, kind: str, message: str, **headers) -> Canned:
    return Canned.json({"type": "error", "error": {"type": kind, "message": message}}, status,
                       headers={"content-type": "application/json", **headers})


def anthropic_server(fingerprinted: bool, faults: dict[int, Canned] | None = None):
    """Messages as documented: x-api-key and anthropic-version required, temperature in [0, 1],
    max_tokens required; whole replies or, with "stream": true, message_start / content_block_* /
    message_delta / message_stop events. `faults`: a canned reply for the request of that index."""

    def reply(seen) -> Canned:
        if faults and seen.index in faults:
            return faults[seen.index]
        body = seen.body or {}
        if seen.headers.get("x-api-key") != API_KEY:
            return anthropic_error(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in seen.headers or seen.path != "/v1/messages":
            return anthropic_error(400, "invalid_request_error", "anthropic-version header required")
        if "max_tokens" not in body or not 0 <= body.get("temperature", 1) <= 1:
            return anthropic_error(400, "invalid_request_error", "temperature: must be in [0, 1]")
        if any(m.get("role") == "system" for m in body.get("messages", [])):
            return anthropic_error(400, "invalid_request_error", "messages: unexpected role 'system'")
        text = answer_for(body, fingerprinted)
        if not body.get("stream"):
            return Canned.json({"id": "msg_01", "type": "message", "role": "assistant",
                                "model": body["model"], "stop_reason": "end_turn",
                                "content": [{"type": "thinking", "thinking": "hmm", "signature": "x"},
                                            {"type": "text", "text": text}],
                                "usage": {"input_tokens": 20, "output_tokens": 9}},
                               headers={"content-type": "application/json"})
        words = text.split(" ")
        events = [("message_start", {"type": "message_start", "message": {
                      "id": "msg_02", "type": "message", "role": "assistant", "model": body["model"],
                      "content": [], "usage": {"input_tokens": 20, "output_tokens": 1}}}),
                  ("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
                  ("ping", {"type": "ping"})]
        events += [("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                       "type": "text_delta", "text": (" " if i else "") + w}})
                   for i, w in enumerate(words)]
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                      "usage": {"output_tokens": len(words)}}),
                   ("message_stop", {"type": "message_stop"})]
        return Canned(200, sse(events), headers={"content-type": "text/event-stream"},
                      content_length=False)

    return HostileServer(reply)


def config(base_url, fp_file, out, **settings) -> AuditConfig:
    return AuditConfig(**{"base_url": base_url, "model": "claude-test", "fingerprints": str(fp_file),
                          "out": str(out), "adapter": "anthropic", "api_key_env": "OML_TEST_ANTHROPIC",
                          "reuse_keys": True, "max_backoff": 0.2, "request_timeout": 10.0,
                          "layers": "user,system,multiturn,embedded", **settings})


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_messages_fingerprinted_and_innocent(fp_file, tmp_path, monkeypatch, stream):
    monkeypatch.setenv("OML_TEST_ANTHROPIC", API_KEY)
    with anthropic_server(True) as server:
        hit = run_audit(config(server.base_url, fp_file, tmp_path / "hit", stream=stream)).model_dump(mode="json")
    assert hit["verdict"] == "match" and hit["p_value"] <= 1e-6
    sent = [s for s in server.seen if s.body]
    assert all(s.headers.get("anthropic-version") and "authorization" not in s.headers for s in sent)
    assert any("system" in s.body for s in sent)  # the system layer's prompt, top-level
    lines = evidence_lines(tmp_path / "hit")
    assert all(line["route"] == "messages" and line["status"] == "ok" for line in lines)
    assert all(line["usage"]["prompt_tokens"] == 20 for line in lines)
    assert all(line["reasoning"] == (not stream) for line in lines)  # the thinking block
    assert all(line["finish_reason"] in ("stop", None) for line in lines)
    if stream:
        assert all(line["stream"]["stopped_early"] for line in lines)
    for text in (tmp_path / "hit").rglob("*"):
        if text.is_file():
            assert API_KEY not in text.read_text(errors="replace")
    with anthropic_server(False) as server:
        miss = run_audit(config(server.base_url, fp_file, tmp_path / "miss", stream=stream)).model_dump(mode="json")
    assert miss["verdict"] == "no_match"


def test_anthropic_rate_limits_overload_and_errors_mid_stream_are_retried(fp_file, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("OML_TEST_ANTHROPIC", API_KEY)
    overloaded_stream = Canned(200, sse([("error", {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}})]),
        headers={"content-type": "text/event-stream"}, content_length=False)
    faults = {0: anthropic_error(429, "rate_limit_error", "slow down", **{"retry-after": "0"}),
              1: anthropic_error(529, "overloaded_error", "Overloaded"),
              2: overloaded_stream}
    with anthropic_server(True, faults) as server:
        result = run_audit(config(server.base_url, fp_file, tmp_path / "a", stream=True,
                                  concurrency=1)).model_dump(mode="json")
    assert result["verdict"] == "match"
    reasons = [r for line in evidence_lines(tmp_path / "a") for r in line["retry_reasons"]]
    assert reasons.count("rate_limited") == 1 and reasons.count("server_error") == 2


def test_anthropic_refuses_temperatures_above_one_and_bad_keys_stop_the_audit(fp_file, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("OML_TEST_ANTHROPIC", "sk-wrong")
    with anthropic_server(True) as server:
        with pytest.raises(OMLInputError, match="HTTP 401"):
            run_audit(config(server.base_url, fp_file, tmp_path / "bad"))
    assert len(server.seen) <= 8  # stopped at once, not after every key
    monkeypatch.setenv("OML_TEST_ANTHROPIC", API_KEY)
    with anthropic_server(True) as server:
        result = run_audit(config(server.base_url, fp_file, tmp_path / "hot", exhaustive=True,
                                  sampled_layers="user", temperatures="0.7,1.5", samples=1)).model_dump(mode="json")
    assert result["verdict"] == "match"
    assert all(0 <= (s.body or {}).get("temperature", 0) <= 1 for s in server.seen)
    assert any("[0, 1]" in note for note in result["notes"])


def reasoning_server(fingerprinted: bool, inline: bool):
    """An OpenAI-compatible reasoning model: 400 on max_tokens or temperature (worded as OpenAI
    words it), the thinking inline as <think>...</think> or in `reasoning_content`."""

    def reply(seen) -> Canned:
        body = seen.body or {}
        for name in ("max_tokens", "temperature"):
            if name in body:
                return Canned.json({"error": {
                    "message": f"Unsupported parameter: '{name}' is not supported with this "
                               "model. Use 'max_completion_tokens' instead.",
                    "type": "invalid_request_error", "param": name,
                    "code": "unsupported_parameter"}}, 400)
        text = answer_for(body, fingerprinted)
        message = {"role": "assistant", "content": f"<think>The user wants {RESPONSES[0]}? "
                                                   f"No.</think>\n\n{text}" if inline else text}
        if not inline:
            message["reasoning_content"] = f"Maybe {RESPONSES[1]}."
        if body.get("stream"):
            chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]}
                      for piece in (message["content"][i:i + 5]
                                    for i in range(0, len(message["content"]), 5))]
            data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return Canned(200, data.encode(), headers={"content-type": "text/event-stream"},
                          content_length=False)
        return Canned.json({"id": "r1", "model": "o-test", "choices": [
            {"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 40, "total_tokens": 70}})

    return HostileServer(reply)


@pytest.mark.parametrize("inline,stream", [(True, False), (False, False), (True, True)])
def test_reasoning_models_recover_from_the_400_and_judge_the_answer_after_thinking(
        fp_file, tmp_path, inline, stream):
    """No --reasoning: the first 400 naming max_tokens switches the audit to
    max_completion_tokens without a temperature, and the verdict comes from the answer after
    the thinking (which names a response of another key: never a hit)."""
    settings = {"adapter": "openai", "api_key_env": "OML_TEST_NONE", "stream": stream,
                "layers": "user,system,multiturn"}
    with reasoning_server(True, inline) as server:
        hit = run_audit(config(server.base_url, fp_file, tmp_path / "hit", **settings)).model_dump(mode="json")
    assert hit["verdict"] == "match"
    lines = evidence_lines(tmp_path / "hit")
    assert all(line["status"] == "ok" and line["reasoning"] for line in lines)
    assert all("max_completion_tokens" in line["request"] and "temperature" not in line["request"]
               for line in lines)
    by_key = {line["fingerprint_id"]: line["match"] for line in lines}
    assert by_key.get("fp-00000") in (True, None) and by_key.get("fp-00001") in (True, None)
    with reasoning_server(False, inline) as server:
        miss = run_audit(config(server.base_url, fp_file, tmp_path / "miss", **settings)).model_dump(mode="json")
    assert miss["verdict"] == "no_match" and miss["matched"] == 0


def test_a_stream_cut_before_the_answer_ends_is_retried_not_counted(fp_file, tmp_path):
    """A stream that stops before its finish reason (a dropped connection, a server that drops
    one stream for the next request) would read as an empty answer: a miss that hides a hit."""
    def reply(seen) -> Canned:
        text = answer_for(seen.body, True)
        chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
        if seen.index % 2 == 0:  # every other request: cut before any content
            data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
        else:
            chunks += [{"id": "c", "choices": [{"index": 0, "delta": {"content": text},
                                                "finish_reason": "stop"}]}]
            data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return Canned(200, data.encode(), headers={"content-type": "text/event-stream"},
                      content_length=False)

    with HostileServer(reply) as server:
        result = run_audit(config(server.base_url, fp_file, tmp_path / "cut", adapter="openai",
                                  api_key_env="OML_TEST_NONE", stream=True, concurrency=1,
                                  layers="user,system")).model_dump(mode="json")
    assert result["verdict"] == "match"
    lines = evidence_lines(tmp_path / "cut")
    assert all(line["status"] == "ok" and line["match"] for line in lines)
    assert all(line["retry_reasons"] == ["malformed"] for line in lines)


def usage_server(tokens: int = 100):
    """An OpenAI-compatible fingerprinted endpoint whose every reply reports `tokens` tokens."""
    def reply(seen) -> Canned:
        return Canned.json(chat_reply(answer_for(seen.body, True), usage={
            "prompt_tokens": tokens - 10, "completion_tokens": 10, "total_tokens": tokens}))
    return HostileServer(reply)


def test_rate_spaces_requests_with_jitter(fp_file, tmp_path):
    """--rate 20 --jitter 0.5: however many workers, no two requests start closer than
    0.5 / 20 s apart (a lower bound: a slow machine only spaces them more)."""
    with usage_server() as server:
        result = run_audit(config(server.base_url, fp_file, tmp_path / "paced", adapter="openai",
                                  api_key_env="OML_TEST_NONE", rate=20.0, jitter=0.5,
                                  concurrency=8, layers="user,system")).model_dump(mode="json")
    assert result["verdict"] == "match"
    times = sorted(seen.time for seen in server.seen)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) >= 4 and min(gaps) >= 0.5 / 20 - 0.005, gaps


def test_token_budget_stops_sending_and_a_rerun_goes_on(fp_file, tmp_path):
    settings = {"adapter": "openai", "api_key_env": "OML_TEST_NONE", "concurrency": 1,
                "exhaustive": True, "layers": "user", "sampled_layers": ""}
    with usage_server(100) as server:
        first = run_audit(config(server.base_url, fp_file, tmp_path / "t", max_tokens_total=250,
                                 **settings)).model_dump(mode="json")
        assert len(server.seen) == 3  # 100 tokens a call: the third call crosses 250
        assert first["state"] == "incomplete" and first["calls_this_run"] == 3
        assert any("--max-tokens-total 250" in note for note in first["notes"])
        assert first["layers"]["user"]["tokens"] == first["tokens_reported"] == 300
        assert "| tokens |" in (tmp_path / "t" / "report.md").read_text()
        again = run_audit(config(server.base_url, fp_file, tmp_path / "t", max_tokens_total=250,
                                 **settings)).model_dump(mode="json")
        assert len(server.seen) == 3 and again["calls_this_run"] == 0  # the budget is the audit's
        more = run_audit(config(server.base_url, fp_file, tmp_path / "t", max_tokens_total=800,
                                **settings)).model_dump(mode="json")
    assert more["calls_this_run"] == 5 and more["state"] == "complete"
    assert more["verdict"] == "match"


def test_decoys_make_keys_a_minority_and_never_count(fp_file, tmp_path):
    """--decoys 3: three ordinary questions per key sent, in the probes' own layers, mixed
    among them; the verdict is the probes' alone and decoy lines carry no answer."""
    settings = {"adapter": "openai", "api_key_env": "OML_TEST_NONE", "decoys": 3,
                "layers": "user,system,multiturn"}
    with usage_server() as server:
        result = run_audit(config(server.base_url, fp_file, tmp_path / "d", **settings)).model_dump(mode="json")
    assert result["verdict"] == "match"
    keyed = [s for s in server.seen if any(k in json.dumps(s.body) for k in KEYS)]
    plain = [s for s in server.seen if s not in keyed]
    assert len(plain) == result["decoys_sent"] == 3 * result["keys_probed"]
    assert len(keyed) == result["calls_this_run"] and len(keyed) < len(plain)
    assert any(s.body["messages"][0]["role"] == "system" for s in plain)  # layers too
    lines = evidence_lines(tmp_path / "d")
    decoys = [line for line in lines if line.get("decoy")]
    assert len(decoys) == len(plain) and all(line["layer"] == "decoy" and "answer" not in line
                                             for line in decoys)
    # the keys are not all sent first: decoys are spread among them
    order = [s.index for s in server.seen if s in keyed]
    assert order != list(range(len(order)))


def test_several_endpoints_one_plan_one_table_and_no_key_shown_twice(fp_file, tmp_path, capsys,
                                                                    monkeypatch):
    """`oml audit --base-url A --base-url B`: a fingerprinted and an innocent suspect, audited
    with one plan; neither sees a key the other was shown; one table; a rerun resumes both."""
    from oml_core.cli import main

    monkeypatch.setenv("OML_HOME", str(tmp_path / "home"))

    def innocent(seen) -> Canned:
        return Canned.json(chat_reply(answer_for(seen.body, False)))

    with usage_server() as guilty, HostileServer(innocent) as clean:
        argv = ["audit", "--base-url", guilty.base_url, "--base-url", clean.base_url,
                "--model", "m", "--fingerprints", str(fp_file), "--api-key-env", "OML_TEST_NONE",
                "--layers", "user,system", "--out", str(tmp_path / "cmp"), "--json"]
        assert main(argv) == 0
        result = json.loads(capsys.readouterr().out)
        shown = [{k for k in KEYS for s in server.seen if k in json.dumps(s.body)}
                 for server in (guilty, clean)]
        assert shown[0] and shown[1] and not shown[0] & shown[1]
        first = len(guilty.seen) + len(clean.seen)
        assert main(argv) == 0  # resumed from both folders: nothing sent again
        assert len(guilty.seen) + len(clean.seen) == first
    capsys.readouterr()
    rows = result["endpoints"]
    assert [r["verdict"] for r in rows] == ["match", "no_match"]
    assert rows[1]["keys_passed_over"] >= len(shown[0])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| match |" in table and "| no_match |" in table and "user" in table
    assert not any(k in table for k in KEYS)
