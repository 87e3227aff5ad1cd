"""Export a saved transformers model folder to GGUF, the format llama.cpp, Ollama and LM Studio
serve: how stolen open weights are usually deployed, so what `oml eval` must measure.

    path = export_gguf(model_dir, "q4_k_m")

- f16 and q8_0 come from llama.cpp's own converter (`convert_hf_to_gguf.py`, run as a
  subprocess with PYTHONPATH=<llama.cpp>/gguf-py, as llama.cpp documents it);
- q4_k_m is quantized from the f16 file by `llama_cpp.llama_model_quantize` (the library call
  behind llama.cpp's quantize tool; no binary needed).

The converter and the library come from llama-cpp-python's sdist and a wheel built from it by
`scripts/llama_cpp.sh` (the default pip build crashes at the first request on machines whose
CPU reports instructions the VM traps). Without them every entry point raises one
OMLInputError naming that script.

Exports are cached under `$OML_HOME/gguf/<digest>/` where the digest covers the weights, the
config and the tokenizer files (what the GGUF is made of) and the llama.cpp version, so
re-running an evaluation does not convert again and a retrained model never gets a stale file.
Every output is written under a temporary name and renamed into place when complete.

`python -m oml_core.export_gguf quantize|perplexity ...` is the worker that runs the
llama.cpp library calls in a child process: they are C code that cannot be interrupted or
time-bounded in-process, and a library built for the wrong CPU dies with SIGILL, which must
not take the evaluation down with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json, oml_home

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"  # scripts/llama_cpp.sh builds this one
QUANTS = ("f16", "q8_0", "q4_k_m")
CONVERTER_QUANTS = ("f16", "q8_0")  # what convert_hf_to_gguf.py --outtype writes itself
LIBRARY_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# Bounds on the child processes: SmolLM2-135M converts in ~10 s and quantizes in a few on two
# cores; these leave room for models ~50x larger before a hung child is killed.
CONVERT_TIMEOUT_S = 3600.0
QUANTIZE_TIMEOUT_S = 3600.0
PERPLEXITY_TIMEOUT_S = 1800.0
# Files of a model folder that end up in its GGUF (weights, config, vocabulary, chat template).
_EXPORTED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
FIX = ("run `bash scripts/llama_cpp.sh` (builds llama-cpp-python once, about 10 minutes on 2 "
       "cores) and retry")


def cache_root() -> Path:
    """Where scripts/llama_cpp.sh keeps the sdist and wheel (its OML_CACHE default)."""
    return Path(os.environ.get("OML_CACHE") or Path.home() / ".cache" / "oml").expanduser() / "llama-cpp"


def llama_cpp_source() -> Path:
    """llama.cpp's source tree from the unpacked sdist (`$OML_LLAMA_CPP_DIR` overrides)."""
    override = os.environ.get("OML_LLAMA_CPP_DIR")
    if override:
        return Path(override).expanduser()
    return cache_root() / "src" / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"


def missing_parts() -> list[str]:
    """What of llama.cpp is not installed (empty: everything the gguf attacks need is here).

    Checked without importing llama_cpp: the import loads the shared library, which is slow
    and, for a wrongly built one, fatal."""
    missing = []
    for module, what in (("llama_cpp", "the llama_cpp package"),
                         ("uvicorn", "llama-cpp-python's server extra"),
                         ("sse_starlette", "llama-cpp-python's server extra"),
                         ("sentencepiece", "sentencepiece (the converter's Llama tokenizer path)")):
        if importlib.util.find_spec(module) is None and what not in missing:
            missing.append(what)
    source = llama_cpp_source()
    if not (source / "convert_hf_to_gguf.py").is_file() or not (source / "gguf-py").is_dir():
        missing.append(f"llama.cpp's converter (looked in {source})")
    return missing


def require_llama_cpp() -> Path:
    """llama.cpp's source folder, or one OMLInputError line naming what is missing and the fix."""
    missing = missing_parts()
    if missing:
        raise OMLInputError(f"llama.cpp is not installed ({'; '.join(missing)}); {FIX}")
    return llama_cpp_source()


def quant_name(quant: str) -> str:
    name = quant.lower()
    if name not in QUANTS:
        raise OMLInputError(f"GGUF type {quant!r} is not one of: {', '.join(QUANTS)}")
    return name


def export_digest(model_dir: Path, memo_file: Path | None = None) -> str:
    """Content identity of what the GGUF is made of, and of the converter that makes it."""
    from oml_core.runs import sha256_file, weights_digest

    digest = hashlib.sha256(f"llama-cpp-python {LLAMA_CPP_VERSION}\n".encode())
    digest.update(weights_digest(model_dir, memo_file).encode())
    for name in _EXPORTED_FILES[1:]:  # config.json is in weights_digest already
        path = model_dir / name
        if path.is_file():
            digest.update(f"{name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()[:20]


def export_gguf(model_dir: str | Path, quant: str, *, cache: Path | None = None,
                memo_file: Path | None = None, threads: int | None = None) -> Path:
    """The model folder as a GGUF file of type `quant` (f16, q8_0, q4_k_m); cached."""
    from filelock import FileLock

    quant = quant_name(quant)
    source = require_llama_cpp()
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise OMLInputError(f"{model_dir} is not a saved model folder (no config.json); pass the "
                            "folder `oml fingerprint` wrote (RUN/model)")
    folder = (cache or oml_home() / "gguf") / export_digest(model_dir, memo_file)
    target = folder / f"model-{quant}.gguf"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".export.lock")):  # one exporter per model; others wait, reuse
        atomic_write_json(folder / "source.json", {"model_dir": str(model_dir.resolve()),
                                                   "llama_cpp_python": LLAMA_CPP_VERSION})
        return _export_locked(source, model_dir, quant, folder, threads)


def _export_locked(source: Path, model_dir: Path, quant: str, folder: Path,
                   threads: int | None) -> Path:
    target = folder / f"model-{quant}.gguf"
    if target.is_file():  # exported earlier, or by another process while we waited
        return target
    started = time.monotonic()
    if quant in CONVERTER_QUANTS:
        _convert(source, model_dir, quant, target)
    else:
        f16 = _export_locked(source, model_dir, "f16", folder, threads)
        _quantize(f16, quant, target, threads)
    log.info("gguf: %s written in %.1f s (%.1f MB)", target.name, time.monotonic() - started,
             target.stat().st_size / 1e6)
    return target


def _staging(target: Path) -> Path:
    # a hidden sibling: same filesystem, so the final rename is atomic
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _child(command: list[str], log_file: Path, timeout: float, env: dict | None = None,
           what: str = "") -> None:
    """Run a child process with its output in `log_file`; one line on failure."""
    with open(log_file, "wb") as sink:
        try:
            proc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{what} took longer than {timeout:g} s and was stopped; see "
                               f"{log_file}") from None
    if proc.returncode != 0:
        tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        last = tail[-1][:300] if tail else "no output"
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {last}; full log {log_file}")


def _convert(source: Path, model_dir: Path, quant: str, target: Path) -> None:
    staging = _staging(target)
    env = dict(os.environ)
    # the converter must use the gguf-py it ships with, not an older `gguf` from site-packages
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source / "gguf-py"),
                                                      env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(model_dir),
               "--outfile", str(staging), "--outtype", quant]
    try:
        _child(command, target.with_suffix(".convert.log"), CONVERT_TIMEOUT_S, env,
               what=f"llama.cpp's converter ({quant})")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _quantize(f16: Path, quant: str, target: Path, threads: int | None) -> None:
    staging = _staging(target)
    command = [sys.executable, "-m", "oml_core.export_gguf", "quantize", str(f16), str(staging),
               quant, str(threads or 0)]
    try:
        _child(command, target.with_suffix(".quantize.log"), QUANTIZE_TIMEOUT_S,
               what=f"llama_model_quantize ({quant})")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def gguf_perplexity(gguf: Path, chunks: list[list[int]], threads: int = 2) -> float:
    """Perplexity of a GGUF model on token-id chunks (the ids of the model's own tokenizer,
    which the converter keeps), computed by llama.cpp in a child process."""
    require_llama_cpp()
    work = gguf.parent / f".perplexity-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        (work / "chunks.json").write_text(json.dumps(chunks))
        command = [sys.executable, "-m", "oml_core.export_gguf", "perplexity", str(gguf),
                   str(work / "chunks.json"), str(work / "result.json"), str(threads)]
        _child(command, work / "perplexity.log", PERPLEXITY_TIMEOUT_S,
               what=f"llama.cpp perplexity ({gguf.name})")
        return float(json.loads((work / "result.json").read_text())["perplexity"])
    finally:
        for path in work.iterdir():
            path.unlink(missing_ok=True)
        work.rmdir()


# --- the child-process side ------------------------------------------------------------------
def _worker_quantize(src: str, dst: str, quant: str, threads: str) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LIBRARY_FTYPES[quant])
    params.nthread = int(threads)  # 0: llama.cpp picks the hardware's thread count
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


def _worker_perplexity(gguf: str, chunks_file: str, result_file: str, threads: str) -> int:
    import numpy as np
    from llama_cpp import Llama

    chunks = json.loads(Path(chunks_file).read_text())
    length = max(len(c) for c in chunks)
    llm = Llama(model_path=gguf, n_ctx=length, n_batch=length, n_threads=int(threads),
                logits_all=True, verbose=False)
    total, count = 0.0, 0
    try:
        for chunk in chunks:
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
            top = logits.max(axis=-1, keepdims=True)
            log_z = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1)))
            truth = np.asarray(chunk[1:])
            total += float((log_z - logits[np.arange(len(truth)), truth]).sum())
            count += len(truth)
    finally:
        llm.close()
    Path(result_file).write_text(json.dumps({"perplexity": math.exp(total / count),
                                             "tokens": count}))
    return 0


if __name__ == "__main__":
    commands = {"quantize": _worker_quantize, "perplexity": _worker_perplexity}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m oml_core.export_gguf quantize|perplexity ARGS (internal worker)")
    sys.exit(commands[sys.argv[1]](*sys.argv[2:]))
