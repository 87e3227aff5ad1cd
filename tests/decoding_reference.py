"""The unbatched reference our decoding loop is checked against: `transformers`' own
`generate`, one prompt per call, greedy."""

from __future__ import annotations


def hf_greedy(loaded, prompts, max_new_tokens: int, stop_at_eos: bool = True) -> list[list[int]]:
    import torch

    from oml_core.inference import cut_after_eos, eos_set

    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    out = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], device=loaded.device)
        with torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=pad_id, eos_token_id=eos)
        out.append(cut_after_eos(new[0, ids.shape[1]:].tolist(), eos_set(model, stop_at_eos)))
    return out
