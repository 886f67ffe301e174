"""A reward model: a Gemma 3 backbone and a scalar head on the last token, trained on preference pairs.

    rm = RewardModel(backbone)                       # head initialised to zero
    r = rm(ids, lengths)                             # (N,) one score per right-padded sequence
    loss = bradley_terry_loss(r_chosen, r_rejected, margin=0.0)
    rm.save(dir, tokenizer); rm = RewardModel.load(dir)

Pairs (`pair_examples`): rows `{"chosen": [messages], "rejected": [messages]}` (chat lists sharing
their prompt turns, Anthropic HH style after parsing), or `{"prompt", "chosen", "rejected"}` text.
Each side is tokenized with the chat template, the reply as the model's turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError
from .model import Gemma3

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class RewardModel(nn.Module):
    def __init__(self, backbone: Gemma3, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1, device=backbone.embed_tokens.weight.device,
                              dtype=backbone.embed_tokens.weight.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.set_dropout(dropout)

    def set_dropout(self, p: float) -> None:
        """Dropout on the pooled features, in training mode. Not inside the backbone: Gemma 3 was not
        trained with dropout, and 5% on its residual branches raises the Bradley-Terry loss of a probed
        270M from 0.30 to 6.6 (measured on arithmetic_pairs), which fine-tuning spends its steps undoing."""
        self.dropout = p

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden state of each sequence's last token: (N, C). Right padding only."""
        h = self.backbone.hidden_states(ids)
        return h[torch.arange(ids.shape[0], device=ids.device), lengths - 1]

    def score(self, features: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            features = F.dropout(features, self.dropout, True)
        return self.head(features).squeeze(-1).float()

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(ids, lengths))

    def save(self, path: str | Path, tokenizer=None, dedupe_within: str | Path | None = None) -> Path:
        """The backbone as an HF directory plus the head; dedupe_within: as checkpoint.save_pretrained."""
        from .checkpoint import save_pretrained

        path = Path(path)
        save_pretrained(self.backbone, tokenizer, path, dtype=self.backbone.embed_tokens.weight.dtype,
                        dedupe_within=dedupe_within)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, path / HEAD_FILE)
        (path / META_FILE).write_text(json.dumps({"pooling": "last_token", "head": HEAD_FILE}))
        return path

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "RewardModel":
        from .checkpoint import load_model

        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            raise UserError(f"{path} is not a reward model directory (no {HEAD_FILE}); fix: point at the "
                            "output of the warm stage, runs/<name>/warm/reward_model")
        rm = cls(load_model(path, dtype=dtype, device=device))
        rm.head.load_state_dict({k: v.to(dtype) for k, v in load_file(path / HEAD_FILE).items()})
        return rm.eval()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


class Pair(NamedTuple):
    chosen: list[int]
    rejected: list[int]


def _sides(row: dict, where: str) -> tuple[list[dict], list[dict]]:
    if isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        return row["chosen"], row["rejected"]
    if all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
        user = [{"role": "user", "content": row["prompt"]}]
        return (user + [{"role": "assistant", "content": row["chosen"]}],
                user + [{"role": "assistant", "content": row["rejected"]}])
    raise UserError(f"{where}: a preference pair needs 'chosen' and 'rejected' message lists, or 'prompt', "
                    f"'chosen' and 'rejected' strings; got keys {sorted(row)}")


def pair_examples(rows: Sequence[dict], tok, max_seq_len: int) -> list[Pair]:
    """Token ids of both sides of each pair; pairs with a side longer than max_seq_len are dropped."""
    out = []
    for i, row in enumerate(rows):
        where = getattr(rows, "where", None)
        chosen, rejected = _sides(row, where[i] if where else f"row {i + 1}")
        c = tok.apply_chat_template(chosen).ids
        r = tok.apply_chat_template(rejected).ids
        if max(len(c), len(r)) <= max_seq_len:
            out.append(Pair(list(c), list(r)))
    if not out:
        raise UserError(f"no preference pair fits data.max_seq_len={max_seq_len}; fix: raise it")
    return out


def pad_right(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) right-padded ids and the lengths (N,): the layout RewardModel.forward reads."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


def collate_pairs(pairs: Sequence[Pair], pad_id: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, T) right-padded ids, chosen rows first then rejected, and their lengths (2B,), on `device`."""
    ids, lengths = pad_right([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return ids.to(device), lengths.to(device)


__all__ = ["RewardModel", "bradley_terry_loss", "Pair", "pair_examples", "collate_pairs", "pad_right"]
