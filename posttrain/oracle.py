"""Plain full-forward decoding: slow, obviously correct, the oracle for the fast sampler.

Every step runs the whole sequence through the model again, with no cache. Tests compare the
KV-cached sampler against it token for token; train.py uses it for a short smoke evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import Gemma3


@torch.no_grad()
def greedy_generate(
    model: Gemma3, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
) -> list[int]:
    """Greedy continuation of one prompt (token ids); stops after emitting a stop id."""
    if not ids:
        raise ValueError("greedy_generate needs a non-empty prompt (start it with <bos>, id 2)")
    device = model.embed_tokens.weight.device
    seq = torch.tensor([list(ids)], device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model.hidden_states(seq)[:, -1]  # (1, C): only the last position needs logits
        token = int(model.logits(hidden).argmax(-1))
        out.append(token)
        if token in stop_ids:
            break
        seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)
    return out
