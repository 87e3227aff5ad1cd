"""Attacks by a hostile MCP client or hostile workspace contents, each one reproduced.

Every test plants what an attacker could (a symlink out of the workspace, a forged or
malformed state file, a model name that is also a folder next to the server, an odd
argument) in a fresh OML_HOME, then checks the server refuses it in one clear line or leaves
it alone, never follows it out, never signals a process it cannot prove is its own worker,
and keeps serving. Only the tiny in-test models are used; no real job is started.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from mcp.shared.exceptions import MCPError
from mcp_helpers import (
    FAST_JOB,
    assert_no_secrets,
    call_tool,
    read_resource,
    result_text,
    secrets_of,
)

from oml_core.errors import OMLInputError
from oml_mcp.jobs import JobStore, process_start_ticks
from oml_mcp.paths import Workspace
from oml_mcp.server import build_server

SECRETS: list[str] = []  # keys and responses of the set made here
SET_SIZE = 4


# --- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir) -> Path:
    """A root folder holding one fingerprint set (set.json) made on the tiny model, once."""
    root = tmp_path_factory.mktemp("hardening_root").resolve()
    home = tmp_path_factory.mktemp("hardening_setup_home").resolve()
    app = build_server(Workspace(home, (root, Path(tiny_model_dir).resolve())))
    data = ok(app, "generate_fingerprints", {
        "model": str(tiny_model_dir), "strategy": "random_word", "num_fingerprints": SET_SIZE,
        "key_length": 8, "response_length": 6, "out": str(root / "set.json")})
    SECRETS.extend(secrets_of(data["path"]))
    assert min(len(s) for s in SECRETS) >= 10  # long enough that the secret checks mean something
    return root


@pytest.fixture
def ws(tmp_path, shared, tiny_model_dir) -> Workspace:
    """A fresh OML_HOME per test, plus the shared root and the tiny model's folder."""
    home = tmp_path / "home"
    home.mkdir()
    return Workspace(home.resolve(), (shared, Path(tiny_model_dir).resolve()))


@pytest.fixture
def app(ws):
    return build_server(ws)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every allowed one: what a planted link points at."""
    path = tmp_path / "outside"
    path.mkdir()
    return path.resolve()


@pytest.fixture
def no_job_starts(monkeypatch):
    """Stop start_fingerprinting just before it would spawn a worker, with a known message."""
    def refuse(self, *args, **kwargs):
        raise OMLInputError("reached the start of the job")
    monkeypatch.setattr(JobStore, "start", refuse)


def ok(app, tool: str, args: dict | None = None) -> dict:
    result = call_tool(app, tool, args)
    assert not result.is_error, result_text(result)
    assert_no_secrets(result_text(result), SECRETS)
    return result.structured_content


def err(app, tool: str, args: dict | None, *needles: str, one_line: bool = True) -> str:
    """An is_error result naming the problem (one line of ours, not "internal error"), no
    secrets in it, and a server that still answers."""
    result = call_tool(app, tool, args)
    text = result_text(result)
    assert result.is_error, text
    assert "internal error" not in text, text
    if one_line:
        assert "\n" not in text.strip(), text
    for needle in needles:
        assert needle in text, text
    assert_no_secrets(text, SECRETS)
    assert not call_tool(app, "list_jobs", {"limit": 1}).is_error
    return text


def job_record(job_id: str, **fields) -> dict:
    """A job.json as the server writes it, for a job whose worker is long gone."""
    return {"job_id": job_id, "kind": "fingerprint", "created": "2020-01-01T00:00:00+00:00",
            "created_ts": time.time() - 3600, "args": {}, "run_dir": None, "command": [],
            "pid": None, "pid_start": None, "server_pid": 0, **fields}


def plant_job(ws: Workspace, job_id: str, **fields) -> Path:
    folder = ws.home / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps(job_record(job_id, **fields)))
    return folder


def copy_model(source, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# --- 8: model names -----------------------------------------------------------------------------

def test_a_hub_shaped_model_name_never_loads_a_folder_next_to_the_server(
        app, ws, shared, tiny_model_dir, tmp_path, monkeypatch, no_job_starts):
    # `outside/model` is no folder in OML_HOME and no model in the hub cache, but the server's
    # working folder has one: it must not be loaded from there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    copy_model(tiny_model_dir, tmp_path / "server-cwd" / "outside" / "model")
    monkeypatch.chdir(tmp_path / "server-cwd")
    fingerprints = str(shared / "set.json")
    err(app, "verify_model", {"model": "outside/model", "fingerprints": fingerprints},
        "'outside/model'", "Hugging Face cache", "inside the workspace")
    err(app, "verify_model", {"model": str(tiny_model_dir), "fingerprints": fingerprints,
                              "null_model": ["outside/model"]}, "null_model", "Hugging Face cache")
    err(app, "generate_fingerprints", {"model": "outside/model", "num_fingerprints": 2,
                                       "key_length": 4}, "Hugging Face cache")
    err(app, "generate_fingerprints", {"model": str(tiny_model_dir), "num_fingerprints": 2,
                                       "key_length": 4, "key_model": "outside/model"}, "key_model")
    with pytest.raises(OMLInputError, match="Hugging Face cache"):
        ws.model_location("outside/model")
    # nor through a finished run's run.json, which an evaluation without `model` would load
    run = ws.home / "runs" / "planted"
    copy_model(tiny_model_dir, run / "model")
    shutil.copy(fingerprints, run / "fingerprints.json")
    (run / "COMPLETE").write_text("")
    elsewhere = str(tmp_path / "server-cwd" / "outside" / "model")
    for base, needle in (("outside/model", "Hugging Face cache"),
                         (elsewhere, "outside the workspace")):
        (run / "run.json").write_text(json.dumps({"base_model": base}))
        err(app, "start_evaluation", {"run": "runs/planted", "parts": "utility"},
            "the run's base_model", needle)


def test_a_hub_id_loads_its_snapshot_from_the_hub_cache_only(
        app, ws, shared, tiny_model_dir, tiny_base_model_dir, tmp_path, monkeypatch, no_job_starts):
    cache = tmp_path / "hub-cache"
    commit = "a" * 40
    snapshot = copy_model(tiny_model_dir, cache / "models--acme--tiny" / "snapshots" / commit)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    # a decoy with other weights where a relative path would land
    copy_model(tiny_base_model_dir, tmp_path / "server-cwd" / "acme" / "tiny")
    monkeypatch.chdir(tmp_path / "server-cwd")

    assert ws.model_location("acme/tiny") == str(snapshot)
    assert ws.model_location(str(snapshot)) == str(snapshot)  # as a run records its base
    assert ws.model_location(None) is None and ws.model_location("bundled") is None
    verified = ok(app, "verify_model", {"model": "acme/tiny",
                                        "fingerprints": str(shared / "set.json")})
    assert verified["model"] == str(snapshot)
    err(app, "start_fingerprinting", {"model": "acme/tiny",
                                      "fingerprints": str(shared / "set.json"), **FAST_JOB},
        "reached the start")
    # cached without a config.json (an earlier partial download) is no loadable model
    (snapshot / "config.json").unlink()
    with pytest.raises(OMLInputError, match="Hugging Face cache"):
        ws.model_location("acme/tiny")


# --- 9: symlinks under the workspace ----------------------------------------------------------

def test_a_job_log_linked_outside_is_not_read(app, ws, outside):
    (outside / "passwd").write_text("root:x:0:0:OUTSIDE-LINE:/root:/bin/sh\n")
    folder = plant_job(ws, "fingerprint-linked-log")
    (folder / "worker.log").symlink_to(outside / "passwd")
    with pytest.raises(MCPError, match="symlink"):
        read_resource(app, "oml://jobs/fingerprint-linked-log/log")
    for tool in ("job_status", "job_result"):
        answer = ok(app, tool, {"job_id": "fingerprint-linked-log"})
        assert answer["state"] == "failed" and "OUTSIDE-LINE" not in json.dumps(answer)
    assert (outside / "passwd").read_text().startswith("root:")


def test_a_job_folder_linked_outside_is_refused_and_never_written(app, ws, outside):
    target = outside / "job"
    target.mkdir()
    (target / "job.json").write_text(json.dumps(job_record("evil")))
    (ws.home / "jobs").mkdir()
    (ws.home / "jobs" / "evil").symlink_to(target)
    for tool in ("job_status", "job_result", "cancel_job"):
        err(app, tool, {"job_id": "evil"}, "evil", "symlink")
    with pytest.raises(MCPError, match="symlink"):
        read_resource(app, "oml://jobs/evil/log")
    listed = ok(app, "list_jobs")
    assert listed["jobs"] == [] and any("evil" in p for p in listed["problems"])
    assert [p.name for p in target.iterdir()] == ["job.json"]  # no result.json written out there


def test_a_jobs_folder_linked_outside_is_refused(app, ws, outside, shared, tiny_model_dir):
    (outside / "jobs").mkdir()
    (outside / "jobs" / "j1").mkdir()
    (outside / "jobs" / "j1" / "job.json").write_text(json.dumps(job_record("j1")))
    (ws.home / "jobs").symlink_to(outside / "jobs")
    err(app, "job_status", {"job_id": "j1"}, "symlink")
    listed = ok(app, "list_jobs")
    assert listed["jobs"] == [] and "symlink" in listed["problems"][0]
    err(app, "start_fingerprinting", {"model": str(tiny_model_dir),
                                      "fingerprints": str(shared / "set.json"), **FAST_JOB},
        "symlink")
    assert sorted(p.name for p in (outside / "jobs").iterdir()) == ["j1"]
    assert [p.name for p in (outside / "jobs" / "j1").iterdir()] == ["job.json"]


def test_runs_sets_and_job_records_pointing_outside_are_not_read(app, ws, outside, shared):
    run = outside / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "OUTSIDE", "step": 3,
                                                 "updated": time.time() + 60}))
    (run / "run.json").write_text(json.dumps({"base_model": "OUTSIDE-MODEL"}))
    (ws.home / "runs").mkdir()
    (ws.home / "runs" / "linked").symlink_to(run)
    plant_job(ws, "fingerprint-outside-run", run_dir=str(run))
    # a run folder inside whose status file links outside
    inside = ws.home / "runs" / "inside"
    inside.mkdir()
    (inside / "run.json").write_text("{}")
    (inside / "status.json").symlink_to(run / "status.json")
    shutil.copy(shared / "set.json", outside / "set.json")
    (ws.home / "fingerprints").mkdir()
    (ws.home / "fingerprints" / "linked.json").symlink_to(outside / "set.json")

    runs = ok(app, "list_runs")
    assert "OUTSIDE" not in json.dumps(runs)
    assert [r["name"] for r in runs["runs"]] == ["inside"]
    assert any("linked" in p for p in runs["problems"])
    with pytest.raises(MCPError):
        read_resource(app, "oml://runs/linked/summary")
    assert "OUTSIDE" not in read_resource(app, "oml://runs/inside/summary")
    status = ok(app, "job_status", {"job_id": "fingerprint-outside-run"})
    assert status["phase"] is None and status["step"] is None
    sets = {Path(s["path"]).name: s for s in ok(app, "list_fingerprint_sets")["sets"]}
    assert sets["linked.json"]["count"] is None and "symlink" in sets["linked.json"]["problem"]


def test_server_folders_linked_outside_are_never_written(app, ws, outside, shared, tiny_model_dir):
    for name in ("fingerprints", "reports", "runs"):
        (outside / name).mkdir()
        (ws.home / name).symlink_to(outside / name)
    model, fingerprints = str(tiny_model_dir), str(shared / "set.json")
    err(app, "generate_fingerprints", {"model": model, "num_fingerprints": 2, "key_length": 4},
        "symlink")
    err(app, "verify_model", {"model": model, "fingerprints": fingerprints}, "symlink")
    err(app, "start_fingerprinting", {"model": model, "fingerprints": fingerprints, **FAST_JOB},
        "symlink")
    with pytest.raises(MCPError):
        read_resource(app, "oml://runs/anything/summary")
    assert not any(any((outside / name).iterdir()) for name in ("fingerprints", "reports", "runs"))


# --- 10: the server's own state ---------------------------------------------------------------

def test_tool_outputs_cannot_land_in_the_servers_own_folders(app, ws, shared, tiny_model_dir):
    fingerprints = str(shared / "set.json")
    err(app, "generate_fingerprints", {"model": str(tiny_model_dir), "num_fingerprints": 2,
                                       "key_length": 4, "out": "jobs/zz/job.json"},
        "jobs", "reserved")
    err(app, "show_commitment", {"fingerprints": fingerprints, "out": "jobs/zz/job.json"},
        "reserved")
    for out in ("models/SmolLM2-135M-Instruct/config.json", "JOBS/zz/job.json"):
        err(app, "show_commitment", {"fingerprints": fingerprints, "out": out}, "reserved")
    err(app, "reveal_fingerprint", {"fingerprints": fingerprints, "fingerprint_id": "fp-00000",
                                    "confirm_reveal": True, "out": "jobs/reveal.json"}, "reserved")
    err(app, "start_fingerprinting", {"model": str(tiny_model_dir), "fingerprints": fingerprints,
                                      "out_dir": "jobs", **FAST_JOB}, "reserved")
    # and through a link that stays inside the workspace
    (ws.home / "jobs").mkdir()
    (ws.home / "alias").symlink_to(ws.home / "jobs")
    err(app, "show_commitment", {"fingerprints": fingerprints, "out": "alias/zz/job.json"},
        "reserved")
    assert list((ws.home / "jobs").iterdir()) == []
    assert ok(app, "list_jobs")["jobs"] == []


def test_malformed_job_records_are_reported_not_a_crash(app, ws, shared, tiny_model_dir,
                                                         no_job_starts):
    bad = {"set-as-record": (shared / "set.json").read_text(), "a-list": "[1, 2]",
           "not-json": "{", "empty": "",
           "wrong-types": json.dumps({"job_id": "wrong-types", "kind": 5, "pid": "x",
                                      "created_ts": "soon", "run_dir": ["a"]}),
           "other-id": json.dumps(job_record("someone-else"))}
    for job_id, text in bad.items():
        (ws.home / "jobs" / job_id).mkdir(parents=True)
        (ws.home / "jobs" / job_id / "job.json").write_text(text)
    malformed_result = plant_job(ws, "bad-result")
    (malformed_result / "result.json").write_text(json.dumps({"state": 7, "output": "x"}))
    plant_job(ws, "fine")
    run_status = plant_job(ws, "bad-run-status", run_dir=str(ws.home / "runs" / "r"))
    (ws.home / "runs" / "r").mkdir(parents=True)
    (ws.home / "runs" / "r" / "status.json").write_text(json.dumps(
        {"state": ["x"], "step": "three", "loss": {}, "updated": time.time() + 60}))
    (ws.home / "runs" / "r" / "run.json").write_text(json.dumps({"config": "x", "run_key": 7}))
    (ws.home / "runs" / "r" / "metrics.json").write_text(json.dumps(
        {"verification": [1], "utility": "x", "num_fingerprints": "n"}))

    listed = ok(app, "list_jobs")
    assert {j["job_id"] for j in listed["jobs"]} == {"bad-result", "fine", "bad-run-status"}
    assert listed["total"] == 3 and len(listed["problems"]) == len(bad)
    assert all("job.json" in p for p in listed["problems"])
    assert ok(app, "list_runs")["runs"][0]["name"] == "r"
    for job_id in bad:
        err(app, "job_status", {"job_id": job_id}, job_id, "job.json")
    assert ok(app, "job_result", {"job_id": "bad-result"})["state"] == "failed"
    assert ok(app, "job_status", {"job_id": run_status.name})["step"] is None
    # starting a job reads every record first (which folders are busy)
    err(app, "start_fingerprinting", {"model": str(tiny_model_dir),
                                      "fingerprints": str(shared / "set.json"), **FAST_JOB},
        "reached the start")


# --- 11: cancel signals only the job's own worker -----------------------------------------------

@pytest.fixture
def bystander():
    """A process of the same user in its own session: what a forged pid points at."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_cancel_never_signals_a_process_it_cannot_prove_is_the_jobs_worker(app, ws, bystander):
    ticks = process_start_ticks(bystander.pid)
    plant_job(ws, "fingerprint-null-start", pid=bystander.pid, pid_start=None)
    plant_job(ws, "fingerprint-right-start", pid=bystander.pid, pid_start=ticks)
    for job_id in ("fingerprint-null-start", "fingerprint-right-start"):
        cancelled = ok(app, "cancel_job", {"job_id": job_id, "grace_seconds": 0})
        assert not cancelled["was_running"] and cancelled["signal"] is None, cancelled
        assert bystander.poll() is None, f"{job_id}: a process that is not the worker was signalled"
        assert ok(app, "job_status", {"job_id": job_id})["state"] == "failed"
    # pid 0 or true would signal the server's own process group (killpg(0, ...))
    for job_id, pid in (("fingerprint-pid-zero", 0), ("fingerprint-pid-true", True)):
        plant_job(ws, job_id, pid=pid)
        err(app, "cancel_job", {"job_id": job_id}, job_id, "job.json", "pid")


def test_cancel_signals_a_worker_proven_by_start_time_and_command_line(app, ws):
    folder = ws.home / "jobs" / "fingerprint-proven"
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                               "-m", "oml_mcp.worker", "--job-dir", str(folder), "--"],
                              start_new_session=True)
    try:
        ticks = process_start_ticks(worker.pid)
        plant_job(ws, folder.name, pid=worker.pid, pid_start=ticks)
        assert ok(app, "job_status", {"job_id": folder.name})["state"] == "starting"
        cancelled = ok(app, "cancel_job", {"job_id": folder.name, "grace_seconds": 5})
        assert cancelled["was_running"] and cancelled["signal"] == "SIGTERM", cancelled
        assert worker.wait(timeout=10) is not None and cancelled["state"] == "cancelled"
    finally:
        worker.kill()
        worker.wait()


# --- 12: strict booleans ----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["yes", "on", "1", "true", 1, 1.0])
def test_a_reveal_takes_json_true_only(app, shared, value):
    result = call_tool(app, "reveal_fingerprint", {"fingerprints": str(shared / "set.json"),
                                                   "fingerprint_id": "fp-00000",
                                                   "confirm_reveal": value})
    text = result_text(result)
    assert result.is_error and "confirm_reveal" in text, text
    assert_no_secrets(text, SECRETS)


def test_setting_flags_take_json_booleans_only(app, shared, tiny_model_dir, no_job_starts):
    base = {"model": str(tiny_model_dir), "fingerprints": str(shared / "set.json"), **FAST_JOB}
    for flag, value in (("verify_after", "no"), ("augment", 0), ("eos", "yes")):
        err(app, "start_fingerprinting", {**base, flag: value}, flag, one_line=False)
    err(app, "start_fingerprinting", {**base, "verify_after": False, "augment": True},
        "reached the start")


# --- 13: one-line errors for odd names --------------------------------------------------------

@pytest.mark.parametrize("tool, args", [
    ("generate_fingerprints", {"out": "x" * 5000}),
    ("generate_fingerprints", {"out": "abc/" * 1200 + "x.json"}),
    ("show_commitment", {"fingerprints": "x" * 5000}),
    ("show_commitment", {"fingerprints": "{set}", "out": "y" * 300 + ".json"}),
    ("list_fingerprint_sets", {"folder": "d" * 5000}),
    ("start_fingerprinting", {"fingerprints": "{set}", "out_dir": "r" * 5000}),
    ("verify_model", {"fingerprints": "{set}", "model": "m" * 5000}),
], ids=["out-name", "out-path", "input", "component", "folder", "out_dir", "model"])
def test_over_long_paths_are_one_line_errors(app, shared, tiny_model_dir, tool, args):
    args = {k: v.replace("{set}", str(shared / "set.json")) for k, v in args.items()}
    if tool in ("generate_fingerprints", "start_fingerprinting"):
        args.setdefault("model", str(tiny_model_dir))
    text = err(app, tool, args, "too long")
    assert len(text) < 1000, text  # the message quotes only the start of the value


@pytest.mark.parametrize("name", ["a\nb.json", "tab\there.json", "esc\x1b[31m.json",
                                  "del\x7f.json", "c1\x85.json", "line\u2028break.json"])
def test_file_names_with_control_characters_are_refused(app, ws, shared, tiny_model_dir, name):
    fingerprints = str(shared / "set.json")
    err(app, "show_commitment", {"fingerprints": fingerprints, "out": name}, "control character")
    err(app, "generate_fingerprints", {"model": str(tiny_model_dir), "num_fingerprints": 2,
                                       "key_length": 4, "out": name}, "control character")
    err(app, "show_commitment", {"fingerprints": fingerprints.replace("set.json", name)},
        "control character")
    assert not any(ws.home.iterdir())


def test_odd_entries_in_the_sets_folder_are_reported(app, ws, shared):
    sets = ws.home / "fingerprints"
    sets.mkdir()
    shutil.copy(shared / "set.json", sets / "real.json")
    (sets / "gone.json").symlink_to(ws.home / "nowhere.json")
    (sets / "bad\nname.json").write_text("{}")
    (sets / "folder.json").mkdir()
    listed = {Path(s["path"]).name: s for s in ok(app, "list_fingerprint_sets")["sets"]}
    assert listed["real.json"]["count"] == SET_SIZE
    assert "does not exist" in listed["gone.json"]["problem"]
    assert "control character" in listed["bad\nname.json"]["problem"]
    assert "folder" in listed["folder.json"]["problem"]
