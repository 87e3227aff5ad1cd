"""What `generate` returns: where the set went and its public facts, never a key or response."""

from __future__ import annotations

from pydantic import BaseModel, Field


class GenerateResult(BaseModel):
    path: str = Field(description="the fingerprint set file (secret: keep it; never paste it)")
    count: int = Field(description="number of fingerprints in the set")
    strategy: str | None
    commitment_root: str = Field(description="Merkle root of the public commitment to the set")
    mean_response_prob: float | None = Field(
        description="mean base-model chance of each response (perinucleus), used as null rate")
    model: str = Field(description="model whose tokenizer the lengths are counted in")
    seconds: float
