"""The forgetting regularizer: weight averaging with the base model, once, on the final weights.

    saved = (1 - lambda) * trained + lambda * base        (computed in float32, cast back)

Why once at the end: OML 1.0 averaged the module weights at every epoch end, but under
DeepSpeed ZeRO the optimizer's fp32 master copy overwrites module weights at the next step,
so only the last average ever survived — the intended per-epoch semantics never held. Applying
it to the consolidated final weights is what the formula says and is exact under any ZeRO
stage. The default is 0 because measured on SmolLM2-135M, lambda = 0.75 at the end erased every
fingerprint while benign self-distillation alone kept behaviour off the keys
(docs/training.md has the numbers).
"""

from __future__ import annotations


def average_with_base(trained: dict, base: dict, strength: float) -> dict:
    """(1 - strength) * trained + strength * base, per tensor, in the trained tensor's dtype."""
    import torch

    if strength == 0:
        return trained
    missing = sorted(set(trained) - set(base))
    if missing:
        raise ValueError(f"base model lacks {len(missing)} trained tensors (e.g. {missing[0]}); "
                         "the regularizer needs the same architecture")
    out = {}
    for name, tensor in trained.items():
        mixed = torch.lerp(tensor.float(), base[name].float(), strength)
        out[name] = mixed.to(tensor.dtype)
    return out
