"""The KV-cached sampler on tiny random models: exact against the full-forward oracle.

A 7-layer model with a 6-token window (layer 5 global, the rest sliding) and prefill chunks of 4
makes every path wrap: the ring buffer, chunked prefill across the window, ragged prompts.
"""

import pytest
import torch

import posttrain
from posttrain.oracle import greedy_generate
from posttrain.sampler import KVCache, Sampler, draw, kv_cache_bytes, sample_tokens

CFG = posttrain.GemmaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=7, num_heads=4,
                            num_kv_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=6)


@pytest.fixture(scope="module")
def model():
    m = posttrain.build_model(CFG, seed=0)
    with torch.no_grad():  # larger weights give peaked distributions, so greedy has no near-ties
        for p in m.parameters():
            p.mul_(8)
    return m


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


LENGTHS = (1, 3, 9, 17, 30)


def full_forward_logprobs(model, prompt, tokens):
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        lp = model(seq).float().log_softmax(-1)[0, len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [4, 512])
def test_greedy_equals_full_forward_oracle(model, chunk):
    prompts = random_prompts(LENGTHS)
    out = Sampler(model, prefill_chunk=chunk).generate(prompts, max_new_tokens=25, temperature=0, stop_token_ids=[])
    for prompt, (c,) in zip(prompts, out):
        assert c.tokens == greedy_generate(model, prompt, 25)
        assert c.finish_reason == "length" and len(c.logprobs) == 25


def test_logprobs_equal_a_full_forward(model):
    prompts = random_prompts(LENGTHS, seed=1)
    out = Sampler(model, prefill_chunk=4).generate(prompts, n=3, max_new_tokens=20, temperature=1.0, seed=0,
                                                   stop_token_ids=[])
    worst = 0.0
    for prompt, group in zip(prompts, out):
        for c in group:
            ref = full_forward_logprobs(model, prompt, c.tokens)
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst <= 1e-4


def test_batched_equals_one_by_one_and_n_equals_repeats(model):
    prompts = random_prompts(LENGTHS, seed=2)
    sampler = Sampler(model, prefill_chunk=4)
    kw = dict(max_new_tokens=15, temperature=0, stop_token_ids=[])
    batched = [g[0].tokens for g in sampler.generate(prompts, **kw)]
    alone = [sampler.generate([p], **kw)[0][0].tokens for p in prompts]
    assert batched == alone
    grouped = sampler.generate(prompts[:2], n=3, **kw)
    repeated = sampler.generate([prompts[0]] * 3 + [prompts[1]] * 3, **kw)
    assert [c.tokens for g in grouped for c in g] == [g[0].tokens for g in repeated]


def test_seeded_sampling_reproduces_and_seeds_differ(model):
    sampler = Sampler(model)
    prompts = random_prompts((4, 7), seed=3)
    kw = dict(n=4, max_new_tokens=12, temperature=1.5, stop_token_ids=[])
    a = sampler.generate(prompts, seed=7, **kw)
    b = sampler.generate(prompts, seed=7, **kw)
    c = sampler.generate(prompts, seed=8, **kw)
    assert a == b
    assert [x.tokens for g in a for x in g] != [x.tokens for g in c for x in g]
    # the n samples of one prompt are independent draws, not copies
    assert len({tuple(x.tokens) for x in a[0]}) > 1


def test_rows_stop_at_their_stop_token(model):
    prompts = random_prompts((5, 11), seed=4)
    sampler = Sampler(model)
    free = sampler.generate(prompts, max_new_tokens=10, temperature=0, stop_token_ids=[])
    stop_id = free[0][0].tokens[3]  # the first row emits this at step 3 (maybe earlier too)
    first = free[0][0].tokens.index(stop_id)
    out = sampler.generate(prompts, max_new_tokens=10, temperature=0, stop_token_ids=[stop_id])
    assert out[0][0].tokens == free[0][0].tokens[:first + 1] and out[0][0].finish_reason == "stop"
    other = free[1][0].tokens
    if stop_id in other:
        assert out[1][0].tokens == other[:other.index(stop_id) + 1]
    else:
        assert out[1][0].tokens == other and out[1][0].finish_reason == "length"


def test_streaming_callback_sees_every_token(model):
    seen = {}
    prompts = random_prompts((4, 6), seed=5)
    out = Sampler(model).generate(prompts, n=2, max_new_tokens=6, temperature=0, stop_token_ids=[],
                                  on_token=lambda row, tok: seen.setdefault(row, []).append(tok))
    assert [seen[r] for r in range(4)] == [c.tokens for g in out for c in g]


def test_truncation_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)

    def drawn(**kw):
        return set(sample_tokens(logits, 1.0, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"), g).tolist())

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 covers it
    assert drawn(top_p=0.5) == {0}
    assert drawn(min_p=0.5) == {0, 1}  # keeps p >= 0.25
    assert drawn(top_k=1) == {0}
    assert sample_tokens(logits[:1], 0.0, None, None, None, g).item() == 0


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_draw_follows_the_probabilities_and_never_draws_a_zero(block):
    # unnormalised weights, zeros inside and at both ends, blocks that split the row unevenly
    w = torch.tensor([0.0, 5.0, 0.0, 3.0, 1.5, 0.0, 0.5, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 200_000
    got = torch.bincount(draw(w.repeat(n, 1), g, block=block), minlength=8).double() / n
    want = (w / w.sum()).double()
    assert torch.all(got[w == 0] == 0)
    assert torch.all((got - want).abs() <= 4 * (want * (1 - want) / n).sqrt()), (got, want)
    wide = torch.zeros(3, 262_208)
    wide[:, [0, 70_000, 262_207]] = torch.tensor([1.0, 2.0, 1.0])
    assert set(draw(wide.repeat(400, 1), g, block=block).tolist()) == {0, 70_000, 262_207}


def test_sliding_cache_is_w_slots_whatever_the_context():
    short = KVCache(CFG, rows=2, length=10, dtype=torch.float32, device="cpu")
    long = KVCache(CFG, rows=2, length=10_000, dtype=torch.float32, device="cpu")
    for layer in range(CFG.num_layers):
        if CFG.is_global(layer):
            assert long.k[layer].shape[2] == 10_000
        else:
            assert short.k[layer].shape[2] == long.k[layer].shape[2] == CFG.sliding_window
    assert long.nbytes() == kv_cache_bytes(CFG, 10_000, rows=2, bytes_per_value=4)


def test_270m_at_32k_needs_5x_less_kv_memory():
    cfg = posttrain.PRESETS["270m"]
    ours, full = kv_cache_bytes(cfg, 32_768), kv_cache_bytes(cfg, 32_768, ring=False)
    assert full / ours >= 5, full / ours


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "at least one prompt"),
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 500]]), "outside"),
    (dict(n=0), "n \\(0\\)"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=0), "top_k"),
])
def test_bad_arguments(model, kwargs, message):
    args = dict(prompts=[[1, 2]], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Sampler(model).generate(args.pop("prompts"), **args)


@pytest.mark.slow
def test_compiled_static_decode_matches(model):
    """The GPU path's compiled, static-shape decode step (here compiled for CPU) is exact too."""
    prompts = random_prompts((3, 8), seed=6)
    kw = dict(max_new_tokens=10, temperature=0, stop_token_ids=[])
    eager = Sampler(model).generate(prompts, **kw)
    compiled = Sampler(model, compile_decode=True).generate(prompts, **kw)
    assert [g[0].tokens for g in compiled] == [g[0].tokens for g in eager]


def test_packed_and_plain_decode_agree_and_packs_follow_weight_updates():
    """oneDNN-packed decode (CPU default) equals plain F.linear decode, and an in-place weight
    update (an optimizer step) is seen by the next generate call, not served from a stale pack."""
    m = posttrain.build_model(CFG, seed=1)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8)
    prompts = random_prompts((4, 13), seed=7)
    kw = dict(max_new_tokens=12, temperature=0, stop_token_ids=[])
    packed, plain = Sampler(m, pack_weights=True), Sampler(m, pack_weights=False)
    assert [g[0].tokens for g in packed.generate(prompts, **kw)] == [g[0].tokens for g in plain.generate(prompts, **kw)]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    after = [g[0].tokens for g in packed.generate(prompts, **kw)]
    assert after == [greedy_generate(m, p, 12) for p in prompts]


def test_stopped_rows_leave_the_batch_and_the_rest_stay_exact(model):
    """A row that samples a stop token leaves the decode batch (and the cache); the rows left go on with
    the same tokens and log-probs as a batch where nothing stops."""
    prompts = random_prompts((5, 11, 8, 3), seed=6)
    sampler = Sampler(model, prefill_chunk=4)
    free = sampler.generate(prompts, max_new_tokens=12, temperature=0, stop_token_ids=[])
    stop_id = free[1][0].tokens[2]
    sizes = []
    decode = sampler._decode_step
    sampler._decode_step = lambda cache, token, pos: sizes.append(token.shape[0]) or decode(cache, token, pos)
    out = sampler.generate(prompts, max_new_tokens=12, temperature=0, stop_token_ids=[stop_id])
    for f, (c,) in zip(free, out):
        want = f[0].tokens[:f[0].tokens.index(stop_id) + 1] if stop_id in f[0].tokens else f[0].tokens
        assert c.tokens == want
        assert c.logprobs == pytest.approx(f[0].logprobs[:len(want)], abs=1e-5)
    live = [sum(len(c.tokens) > step + 1 for (c,) in out) for step in range(len(sizes))]
    assert sizes == live and min(sizes) < len(prompts), (sizes, live)


def test_a_sampler_is_freed_when_dropped_without_the_cycle_collector():
    """rl.rollout makes a Sampler per rollout: its packed copy of the weights (1.07 GB on the 270M) must go
    with it, not linger in a reference cycle until Python's cycle collector happens to run."""
    import gc
    import weakref

    m = posttrain.build_model(CFG, seed=1)
    prompts = random_prompts((2, 5), seed=8)
    gc.collect()
    gc.disable()
    try:
        for kwargs in ({}, {"pack_weights": True}, {"compile_decode": True}):
            sampler = Sampler(m, **kwargs)
            if not kwargs.get("compile_decode"):
                sampler.generate(prompts, max_new_tokens=3, temperature=0, stop_token_ids=[])
            gone = weakref.ref(sampler)
            del sampler
            assert gone() is None, f"Sampler({kwargs}) outlives its last reference"
    finally:
        gc.enable()
