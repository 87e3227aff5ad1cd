"""What every benchmark and experiment script shares: the machine a number came from, result
files written whole or not at all, a markdown table, a timer, `transformers serve` on
loopback, and a tiny model for smoke runs.

The scripts run as files (`.venv/bin/python benchmarks/verify_throughput.py`), so each puts
the repository root on sys.path and imports `benchmarks.harness`; experiments/ imports it the
same way, so there is one copy of each of these.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from oml_core.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions, CPU, device and commit: what a reader needs to compare two result files."""
    import torch
    import transformers

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "platform": platform.platform(), "device": device, "device_name": name,
            "git_commit": _git_commit(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(path: str | os.PathLike, result: dict, *, device: str | None = None) -> Path:
    """`result` plus an `environment` block, written atomically (temporary file, then
    os.replace): an interrupted run never leaves half a file where the last good one was."""
    written = atomic_write_json(path, {**result, "environment": environment(device)})
    print(f"wrote {written}", file=sys.stderr)
    return written


def append_run(path: str | os.PathLike, run: dict, **fields: Any) -> dict:
    """Add `run` to the file's {"runs": [...]} (created if missing), set `fields` at the top,
    write it back atomically; for scripts whose runs accumulate across invocations."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data = {**data, **fields, "runs": [*data.get("runs", []), run]}
    write_result(path, data)
    return data


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (what docs/performance.md pastes), one row per sequence."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(table(headers, rows), flush=True)


class Timer:
    """Wall seconds of a `with timer() as t:` block, in `t.seconds` (0 while it runs)."""

    seconds: float = 0.0


@contextmanager
def timer(sync=None) -> Iterator[Timer]:
    """Time a block; `sync` (e.g. torch.cuda.synchronize) runs before both clock reads, so
    queued GPU work is counted where it was asked for."""
    clock = Timer()
    if sync:
        sync()
    started = time.perf_counter()
    try:
        yield clock
    finally:
        if sync:
            sync()
        clock.seconds = time.perf_counter() - started


def timed(fn, sync=None) -> tuple[Any, float]:
    """(fn(), seconds it took)."""
    with timer(sync) as clock:
        result = fn()
    return result, clock.seconds


def serve(log: str | os.PathLike, model: str | None = None, *, threads: int | None = None,
          continuous_batching: bool = False, timeout: float = 300.0):
    """`transformers serve` on a free loopback port, its output in `log`; (process, base URL)
    once /health answers. With no `model`, a request's `model` field names any local folder.
    Stop it with stop_server."""
    import httpx

    from oml_core.localhost import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [str(Path(sys.executable).parent / "transformers"), "serve", *([model] if model else []),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    if continuous_batching:
        command.append("--continuous-batching")
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"transformers serve did not come up in {timeout:.0f} s; see {log}")
        time.sleep(0.25)
    raise RuntimeError(f"transformers serve exited; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own), SIGKILL what is left."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def tiny_model(folder: str | os.PathLike, chat_template: str | None = CHATML,
               seed: int = 0) -> Path:
    """A random-init 2-layer Llama with a byte-level BPE tokenizer trained on the project's
    word list and (by default) a ChatML template, for smoke runs and tests (tests/conftest.py
    builds its models with it): every code path in seconds, no download or conversion, numbers
    meaningless. A folder that already holds a model is returned as it is."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from oml_core.generate.words import word_list

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    words = list(word_list())
    corpus = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    corpus += [w.capitalize() + " is a word." for w in words]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
