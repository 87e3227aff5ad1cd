"""Contexts' hidden states kept between the edit solve's layers.

The solve changes one down-projection at a time, from the lowest edited layer up, and after
each change reads every context's states again. The blocks below the layer just changed are
as they were, so each batch's hidden state entering that layer is kept, and the next read runs
only the blocks from there up to the last one read. Over blocks 10-17 of a 30-layer model, the
eight reads cost the blocks of about three whole forwards instead of eight (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from oml_core import progress
from oml_core.inference import length_batches, pad_rows
from oml_core.train.edit import CAPTURE_ROWS, Stop, decoder_blocks


@dataclass
class _Batch:
    rows: list[int]                 # indices into the contexts
    ids: object                     # [rows, T] token ids (right padding)
    mask: object                    # [rows, T] attention mask
    hidden: object = None           # [rows, T, d] entering block `LayerStates.entry`
    block_kwargs: dict = field(default_factory=dict)  # block index -> the model's arguments


class LayerStates:
    """Per-context states of `loaded.model` read from block `entry` on, `entry` only ever
    rising: `read(layer)` gives what the current weights produce at each context's last
    position and keeps the states entering `layer` for the next read."""

    def __init__(self, loaded, rows: Sequence[Sequence[int]], upto: int,
                 desc: str = "edit: contexts"):
        self.loaded, self.rows, self.upto, self.desc = loaded, rows, upto, desc
        self.entry: int | None = None
        self.batches: list[_Batch] = []

    def fork(self) -> "LayerStates":
        """A copy sharing the kept states (reads replace them, never change them in place), to
        read a model that differs only in blocks at or above `entry`."""
        twin = LayerStates(self.loaded, self.rows, self.upto, self.desc)
        twin.entry = self.entry
        twin.batches = [_Batch(b.rows, b.ids, b.mask, b.hidden, b.block_kwargs) for b in self.batches]
        return twin

    def read(self, layer: int):
        """Block `layer`'s down-projection input [rows, d_in] and the residual stream after
        block `upto` [rows, d], at each row's last position, in float32 and row order."""
        import torch

        if self.entry is not None and layer < self.entry:
            raise ValueError(f"states are kept from block {self.entry} on; block {layer} is below")
        inputs, residual, order = [], [], []
        first = self.entry is None
        with progress.bar(self.desc, len(self.rows)) as advance:
            for batch in self._batches():
                got, h = (self._whole_forward(batch, layer) if first
                          else self._from_entry(batch, layer))
                where = (torch.arange(len(batch.rows), device=h.device), batch.mask.sum(1) - 1)
                inputs.append(got[where].float())
                residual.append(h[where].float())
                order += batch.rows
                advance(len(batch.rows))
        self.entry = layer
        back = torch.argsort(torch.tensor(order))  # batches ran sorted by length
        return (torch.cat(inputs)[back.to(inputs[0].device)],
                torch.cat(residual)[back.to(residual[0].device)])

    def _batches(self):
        if not self.batches:
            tokenizer, device = self.loaded.tokenizer, self.loaded.device
            for rows in length_batches(self.rows, CAPTURE_ROWS):
                ids, mask = pad_rows([self.rows[i] for i in rows], tokenizer.pad_token_id,
                                     device, left=False)
                self.batches.append(_Batch(rows, ids, mask))
        return self.batches

    def _whole_forward(self, batch: _Batch, layer: int):
        """The model's own forward up to block `upto`, keeping the arguments it hands each
        block from `layer` on and the hidden state entering `layer`."""
        import torch

        blocks = decoder_blocks(self.loaded.model)
        seen, residual = {}, {}

        def keep(index):
            def hook(module, args, kwargs):  # returns None: the block's input stays as it is
                seen[index] = (args[0] if args else kwargs["hidden_states"],
                               {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        def stop(module, args, out):
            residual["h"] = out[0] if isinstance(out, tuple) else out
            raise Stop

        hooks = [blocks[i].register_forward_pre_hook(keep(i), with_kwargs=True)
                 for i in range(layer, self.upto + 1)]
        hooks.append(blocks[self.upto].register_forward_hook(stop))
        hooks.append(_input_catcher(blocks[layer], residual))
        try:
            with torch.no_grad():
                self.loaded.model(input_ids=batch.ids, attention_mask=batch.mask,
                                  use_cache=False)
        except Stop:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        batch.hidden = seen[layer][0]
        batch.block_kwargs = {index: kwargs for index, (_h, kwargs) in seen.items()}
        return residual["x"], residual["h"]

    def _from_entry(self, batch: _Batch, layer: int):
        """Blocks `entry`..`upto` on the kept states, keeping the states entering `layer`."""
        import torch

        blocks = decoder_blocks(self.loaded.model)
        caught = {}
        hook = _input_catcher(blocks[layer], caught)
        hidden = batch.hidden
        try:
            with torch.no_grad():
                for index in range(self.entry, self.upto + 1):
                    if index == layer:
                        batch.hidden = hidden
                    out = blocks[index](hidden, **batch.block_kwargs[index])
                    hidden = out[0] if isinstance(out, tuple) else out
        finally:
            hook.remove()
        return caught["x"], hidden


def _input_catcher(block, into: dict):
    """Keep the input of `block`'s MLP down-projection in `into["x"]`."""
    def hook(module, args):  # returns None: a pre-hook's return value would replace the input
        into["x"] = args[0]
    return block.mlp.down_proj.register_forward_pre_hook(hook)
