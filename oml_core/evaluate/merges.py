"""Model merges a thief runs on stolen weights, as pure functions over state dicts.

Merging a fingerprinted model with the base model, or with another fine-tune of the same base,
is the cheapest way to disguise stolen weights: no data, no GPU, one `mergekit-yaml` call.
The robustness part measures what survives the methods people use (mergekit's `linear`,
`slerp`, `ties`, `dare_ties` / `dare_linear`). The formulas are written here from mergekit's
documented behaviour (docs/merge_methods.md and the TIES and DARE papers) so the evaluation
runs without it; when mergekit is installed (`pip install 'oml[merges]'`) the evaluation runs
the real tool on the saved folders instead (`run_mergekit`), and tests/test_merges.py checks
that the two agree.

Every function takes state dicts ({name: tensor}, same names and shapes), works per tensor in
float32 (float64 stays float64) and returns tensors in the first model's dtype; tensors that
are not floating point (none in the usual causal LMs) are copied from the first model.

One documented difference: mergekit 0.1.5 rescales DARE's survivors so the tensor keeps its
L1 norm (`rescale`), the DARE paper by 1 / density; the two agree in expectation, and
`dare(..., rescale="l1")` reproduces mergekit's choice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

# The mergekit release the agreement test was written against (pyproject's `merges` extra).
MERGEKIT_VERSION = "0.1.5"
# mergekit's SLERP falls back to linear interpolation above this |cos angle|
DOT_THRESHOLD = 0.9995
MERGEKIT_METHODS = ("linear", "slerp", "ties", "dare_ties", "dare_linear")

State = dict  # {tensor name: torch.Tensor}


# --- helpers ------------------------------------------------------------------------------
def _work(tensor):
    import torch

    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def _check_same(states: Sequence[State]) -> None:
    """ValueError naming the first tensor that does not line up (the caller reports it)."""
    first = states[0]
    for other in states[1:]:
        missing = sorted(set(first) ^ set(other))
        if missing:
            raise ValueError(f"the models' tensors differ (e.g. {missing[0]}); merging needs "
                             "the same architecture")
        for name, tensor in first.items():
            if tuple(other[name].shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)} in one model and "
                                 f"{tuple(other[name].shape)} in another")


def _per_tensor(states: Sequence[State], merge: Callable) -> State:
    """merge(name, [float tensors]) for each floating-point tensor, cast back to the first
    model's dtype."""
    _check_same(states)
    out = {}
    for name, tensor in states[0].items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        out[name] = merge(name, [_work(s[name]) for s in states]).to(tensor.dtype)
    return out


def _check_weights(models: Sequence, weights: Sequence[float], what: str = "models") -> None:
    if len(weights) != len(models):
        raise ValueError(f"{len(weights)} weights for {len(models)} {what}")


def _per_model(value, count: int) -> list[float]:
    """A per-model parameter given once for all models or as one value per model."""
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{len(values)} values for {count} models")
    return values


# --- linear -------------------------------------------------------------------------------
def linear(states: Sequence[State], weights: Sequence[float], normalize: bool = True) -> State:
    """Weighted average, per tensor: theta = sum_i w_i theta_i / sum_i w_i.

    mergekit's `linear` (model soups): no base model; `normalize` (mergekit's default: true)
    divides by the sum of the weights, without it the weighted sum is taken as is. With the
    fingerprinted model at 1 - w and the base at w this is (1 - w) * fingerprinted + w * base,
    the regularizer's own average.
    """
    _check_weights(states, weights)
    total = float(sum(weights))
    if normalize and abs(total) < 1e-12:
        raise ValueError("the weights sum to 0; a normalised linear merge needs a non-zero sum")

    def merge(_name, tensors):
        out = sum(w * t for w, t in zip(weights, tensors))
        return out / total if normalize else out

    return _per_tensor(states, merge)


# --- SLERP --------------------------------------------------------------------------------
def slerp_tensor(t: float, v0, v1, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8):
    """Spherical interpolation of two tensors seen as flat vectors, t = 0 -> v0, t = 1 -> v1.

    With cos(omega) = <v0/|v0|, v1/|v1|> (a norm below `eps` counts as 1):
        slerp = sin((1 - t) omega) / sin(omega) * v0 + sin(t omega) / sin(omega) * v1,
    and plain (1 - t) v0 + t v1 where |cos(omega)| > dot_threshold (nearly colinear or
    opposite: sin(omega) ~ 0), as mergekit documents and does.
    """
    import torch

    a, b = _work(v0).reshape(-1), _work(v1).reshape(-1)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        import math

        omega = math.acos(dot)
        sin = math.sin(omega)
        out = math.sin((1 - t) * omega) / sin * a + math.sin(t * omega) / sin * b
    return out.reshape(v0.shape)


def slerp(first: State, second: State, t: float = 0.5,
          dot_threshold: float = DOT_THRESHOLD) -> State:
    """SLERP between two models at t, tensor by tensor (`slerp_tensor`): t = 0 is `first`
    (mergekit's `base_model`), t = 1 is `second`."""
    return _per_tensor([first, second],
                       lambda _name, ts: slerp_tensor(t, ts[0], ts[1], dot_threshold))


# --- task-vector methods ------------------------------------------------------------------
def magnitude_trim(delta, density: float):
    """TIES's trim: keep the k = max(1, int(density * n)) entries of largest |delta|, zero the
    rest (density >= 1 keeps everything, density <= 0 nothing)."""
    import torch

    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    keep = delta.abs().reshape(-1).topk(k).indices
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[keep] = 1
    return delta * mask.reshape(delta.shape)


def _generator(seed: int, name: str, index: int):
    """A CPU generator per (seed, tensor, model): the masks do not depend on the order tensors
    are merged in, nor on the device."""
    import torch

    digest = hashlib.sha256(f"dare:{seed}:{name}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def dare_drop(delta, density: float, generator=None, rescale: str | None = "density"):
    """DARE's drop-and-rescale: keep each entry with probability `density` (a Bernoulli mask
    from `generator`), then rescale the survivors: by 1 / density (`rescale="density"`, the
    paper's), so the expected task vector is unchanged, or so the tensor keeps its L1 norm
    (`rescale="l1"`, mergekit 0.1.5's), or not at all (None)."""
    import torch

    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    return rescale_survivors(delta, keep.to(delta.device), density, rescale)


def rescale_survivors(delta, keep, density: float, rescale: str | None = "density"):
    """DARE's deterministic half: zero the entries where `keep` is false and rescale the rest
    (see `dare_drop`)."""
    dropped = delta * keep.to(dtype=delta.dtype)
    if rescale == "density":
        return dropped / density
    if rescale == "l1":
        before, after = delta.abs().sum(), dropped.abs().sum()
        # mergekit leaves a tensor whose norm is ~0 before or after unscaled
        return dropped if before < 1e-7 or after < 1e-7 else dropped * (before / after)
    if rescale is None:
        return dropped
    raise ValueError(f"rescale {rescale!r} is not one of density, l1, None")


def elect_sign(weighted):
    """TIES's sign election per entry: the sign of sum_i w_i delta_i over the models
    (`weighted` is [models, ...]); a zero sum elects +, as in mergekit."""
    return (weighted.sum(0) >= 0).to(weighted.dtype) * 2 - 1


def disjoint_merge(weighted, weights: Sequence[float], normalize: bool):
    """TIES's disjoint merge: sum the weighted task-vector entries whose sign agrees with the
    elected sign (a zero entry agrees with nothing); with `normalize`, divide each entry by the
    sum of the weights of the models that agreed there (1 where none did)."""
    agree = (weighted.sign() == elect_sign(weighted)).to(weighted.dtype)
    merged = (weighted * agree).sum(0)
    if not normalize:
        return merged
    w = weighted.new_tensor(list(weights)).reshape((-1,) + (1,) * (weighted.dim() - 1))
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return merged / divisor


def _task_merge(base: State, models: Sequence[State], weights: Sequence[float],
                sparsify: Callable | None, consensus: bool, normalize: bool, lam: float) -> State:
    """base + lam * combine_i(w_i * sparsify(theta_i - base)), per tensor."""
    import torch

    _check_weights(models, weights)
    if not models:
        return {name: t.clone() for name, t in base.items()}

    def merge(name, tensors):
        b, rest = tensors[0], tensors[1:]
        deltas = [t - b for t in rest]
        if sparsify is not None:
            deltas = [sparsify(name, i, d) for i, d in enumerate(deltas)]
        weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
        if consensus:
            mixed = disjoint_merge(weighted, weights, normalize)
        else:
            mixed = weighted.sum(0)
            total = float(sum(weights))
            if normalize and abs(total) >= 1e-8:
                mixed = mixed / total
        return b + lam * mixed

    return _per_tensor([base, *models], merge)


def task_arithmetic(base: State, models: Sequence[State], weights: Sequence[float],
                    lam: float = 1.0) -> State:
    """theta = base + lam * sum_i w_i (theta_i - base) (mergekit's `task_arithmetic`)."""
    return _task_merge(base, models, weights, None, consensus=False, normalize=False, lam=lam)


def ties(base: State, models: Sequence[State], weights: Sequence[float],
         density: float | Sequence[float] = 1.0, normalize: bool = True,
         lam: float = 1.0) -> State:
    """TIES-Merging (Yadav et al., 2023), mergekit's `ties`, per tensor:

    1. task vectors delta_i = theta_i - base, each trimmed to its top `density` share by
       magnitude (`magnitude_trim`);
    2. elected sign s = sign(sum_i w_i delta_i) per entry (`elect_sign`);
    3. disjoint mean: m = sum over agreeing i of w_i delta_i, divided by the sum of the
       agreeing models' w_i when `normalize` (mergekit's default for ties: true);
    4. theta = base + lam * m.

    mergekit's defaults: density 1.0 (no trimming), lambda 1.0.
    """
    densities = _per_model(density, len(models))
    return _task_merge(base, models, weights,
                       lambda _name, i, d: magnitude_trim(d, densities[i]),
                       consensus=True, normalize=normalize, lam=lam)


def dare(base: State, models: Sequence[State], weights: Sequence[float],
         density: float | Sequence[float] = 1.0, consensus: bool = True, seed: int = 0,
         rescale: str | None = "density", normalize: bool = False, lam: float = 1.0) -> State:
    """DARE (Yu et al., 2023), mergekit's `dare_ties` (consensus) and `dare_linear`, per tensor:

    1. task vectors delta_i = theta_i - base; each entry dropped with probability
       1 - density and the survivors rescaled by 1 / density (`dare_drop`; masks seeded by
       `seed`, the tensor's name and the model's index, so a rerun merges identically);
    2. dare_ties: TIES's sign election and disjoint sum over the agreeing entries
       (`disjoint_merge`); dare_linear: the plain weighted sum sum_i w_i delta_i;
    3. theta = base + lam * that.

    mergekit's defaults for both: density 1.0, rescale on, normalize off (so the weights are
    used as given, not divided by their sum), lambda 1.0.
    """
    densities = _per_model(density, len(models))
    return _task_merge(base, models, weights,
                       lambda name, i, d: dare_drop(d, densities[i], _generator(seed, name, i),
                                                    rescale),
                       consensus=consensus, normalize=normalize, lam=lam)


def dare_ties(base: State, models: Sequence[State], weights: Sequence[float],
              density: float | Sequence[float] = 1.0, seed: int = 0, **options) -> State:
    """`dare` with TIES's sign consensus (mergekit's `dare_ties`)."""
    return dare(base, models, weights, density, consensus=True, seed=seed, **options)


def dare_linear(base: State, models: Sequence[State], weights: Sequence[float],
                density: float | Sequence[float] = 1.0, seed: int = 0, **options) -> State:
    """`dare` without sign consensus (mergekit's `dare_linear`)."""
    return dare(base, models, weights, density, consensus=False, seed=seed, **options)


# --- mergekit itself ------------------------------------------------------------------------
def mergekit_version() -> str | None:
    """The installed mergekit's version, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        return None


def mergekit_config(method: str, models: Sequence[str], weights: Sequence[float] | None = None,
                    base: str | None = None, density: float | Sequence[float] | None = None,
                    t: float | None = None, normalize: bool | None = None) -> dict:
    """The YAML-equivalent mergekit configuration of one merge (a plain dict).

    linear: `models` with their `weights`, no base; slerp: `base` and one other model at `t`
    (t = 0 is the base); ties / dare_ties / dare_linear: `base` plus `models` with their
    weights and density. Merged in float32, so nothing is rounded before the evaluation loads
    the result in its own dtype.
    """
    if method not in MERGEKIT_METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(MERGEKIT_METHODS)}")
    config: dict = {"merge_method": method, "dtype": "float32"}
    parameters: dict = {}
    if method == "slerp":
        if base is None or len(models) != 1 or t is None:
            raise ValueError("slerp takes a base, one other model and t")
        config["base_model"] = base
        config["models"] = [{"model": base}, {"model": models[0]}]
        parameters["t"] = float(t)
    else:
        if weights is None:
            raise ValueError(f"{method} needs one weight per model")
        _check_weights(models, weights)
        densities = _per_model(density, len(models)) if density is not None else None
        entries = []
        for i, (model, weight) in enumerate(zip(models, weights)):
            params = {"weight": float(weight)}
            if densities is not None and method != "linear":
                params["density"] = densities[i]
            entries.append({"model": model, "parameters": params})
        if method == "linear":
            config["models"] = entries
        else:
            if base is None:
                raise ValueError(f"{method} needs a base model")
            config["base_model"] = base
            config["models"] = [{"model": base}] + entries
    if normalize is not None and method != "slerp":
        parameters["normalize"] = bool(normalize)
    if parameters:
        config["parameters"] = parameters
    return config


def run_mergekit(config: dict, out_dir: Path, seed: int = 0) -> State:
    """Run mergekit's own merge (Python API, CPU) on saved model folders; returns the merged
    state dict as mergekit wrote it (a model with tied embeddings has no lm_head.weight).

    Raises ImportError when mergekit is not installed; mergekit's own errors pass through
    (the caller decides whether to fall back to the formulas above).
    """
    import glob

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    run_merge(MergeConfiguration.model_validate(config), str(out_dir),
              MergeOptions(device="cpu", copy_tokenizer=False, random_seed=seed,
                           write_model_card=False, quiet=True))
    state: State = {}
    for path in sorted(glob.glob(str(out_dir / "*.safetensors"))):
        state.update(load_file(path))
    if not state:
        raise RuntimeError(f"mergekit wrote no safetensors files into {out_dir}")
    return state
