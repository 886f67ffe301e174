"""The learned reward: a (WARM) reward model scores prompt + completion, batched.

    rm = rewards.get("reward_model", path="runs/demo/warm/reward_model")
    rm(["What is 2 + 3?"], ["2 + 3 = 5. Answer: 5"])        # -> [1.83]
    rm.last_metrics                                         # {"mean": ..., "std": ...}

The prompt is the user turn and the completion the model's turn of the chat template, the layout the
warm stage trained on; the score is the head on the last token (posttrain.reward_model). Scores are
raw (not squashed): a reward weight in the recipe scales them. Runs in the trainer's process on CPU
or its GPU; `batch_size` sequences per forward.
"""
from __future__ import annotations

import torch


class RewardModelReward:
    def __init__(self, path: str, batch_size: int = 8, dtype: str = "float32", device: str | None = None):
        from posttrain.reward_model import RewardModel
        from posttrain.tokenizer import load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = RewardModel.load(path, dtype=getattr(torch, dtype), device=self.device)
        self.tok = load_tokenizer(path)
        self.batch_size = batch_size
        self.last_metrics: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        from posttrain.reward_model import pad_right

        seqs = [self.tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}]).ids
                for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for s in range(0, len(seqs), self.batch_size):
            ids, lengths = pad_right(seqs[s:s + self.batch_size], self.tok.pad_id)
            scores += self.model(ids.to(self.device), lengths.to(self.device)).tolist()
        t = torch.tensor(scores) if scores else torch.zeros(1)
        self.last_metrics = {"mean": float(t.mean()), "std": float(t.std()) if len(scores) > 1 else 0.0}
        return scores
