"""Train/sample agreement: the sampler's per-token log-probs equal the training forward's.

An RL step weighs each completion by log-probs from the training forward (rl.seq_logprobs); the
rollout drew it from the sampler. When the two compute different distributions, the step is
off-policy without knowing it. Both paths run here as the policy stage runs them: rl.rollout (the
sampler on the engine's weights, under the engine's autocast) and rl.token_logprobs (the engine's
WithHead forward and the chunked head), on a tiny model with ragged prompts, 3 samples each.
"""

import contextlib
import types

import pytest
import torch

import posttrain
from posttrain.config import Config
from posttrain.engine import WithHead
from posttrain.stages import rl

CFG = posttrain.GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=7, num_heads=4,
                            num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6)


def disagreement(dtype: torch.dtype, autocast: bool) -> torch.Tensor:
    """|sampler - training forward| per sampled token."""
    model = posttrain.build_model(CFG, seed=0)
    with torch.no_grad():  # larger weights: peaked distributions and large activations, where rounding shows
        for p in model.parameters():
            p.mul_(4)
    model = model.to(dtype)

    @contextlib.contextmanager
    def full_weights():
        yield model

    engine = types.SimpleNamespace(device=torch.device("cpu"), full_weights=full_weights,
                                   module=WithHead(model, torch.bfloat16 if autocast else None))
    g = torch.Generator().manual_seed(0)
    prompts = types.SimpleNamespace(ids=[torch.randint(3, 512, (k,), generator=g).tolist() for k in (1, 5, 11, 23)],
                                    has_images=False)
    tok = types.SimpleNamespace(stop_ids=(), ids_containing=lambda stop: ())
    cfg = Config.model_validate({"policy": {"max_new_tokens": 24, "stop": []}, "data": {"loss_chunk_tokens": 16},
                                 "distributed": {"autocast": "bf16" if autocast else "off"}})
    idx = list(range(len(prompts.ids)))
    out = rl.rollout(engine, prompts, idx, 3, cfg, tok, seed=0)
    ref = rl.token_logprobs(engine, prompts, idx, out, cfg, pad_id=0)
    diffs = [abs(a - b) for row, ref_row in zip(out.logprobs, ref) for s, r in zip(row, ref_row) for a, b in zip(s, r)]
    assert len(diffs) == 4 * 3 * 24
    return torch.tensor(diffs)


def test_float32_sampler_logprobs_are_the_training_forwards():
    d = disagreement(torch.float32, autocast=False)
    assert d.mean() <= 1e-5 and d.max() <= 1e-4


def test_bf16_autocast_rollout_runs_in_the_training_precision():
    """distributed.autocast=bf16: the rollout samples under the same autocast as the training forward
    (KV cache in bf16, the head in float32 as the chunked head computes it). Sampling in float32
    instead disagrees by 7.7e-3 nats on average here."""
    assert disagreement(torch.float32, autocast=True).mean() <= 5e-3


@pytest.mark.xfail(strict=True, reason="bf16 weights: the sampler's and the training forward's bf16 ops round in "
                   "different orders (cached vs full attention); 6.4e-3 nats on average here, above 5e-3")
def test_bf16_model_sampler_logprobs_are_the_training_forwards():
    assert disagreement(torch.bfloat16, autocast=False).mean() <= 5e-3
