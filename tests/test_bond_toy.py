"""J-BOND and WARP on a toy task with a known reward and a tiny Gemma 3 (1 layer, vocabulary 12).

The "prompt" is <bos>; a completion is one token a; the reward is r(a) = a / 11, so every action has
its own reward and the Best-of-N distribution of the anchor is known exactly:
    BoN_N(a) = F(a)^N - F(a-1)^N,   F the anchor's CDF in reward order.
With the anchor fixed at the initial policy (eta = 0), J-BOND's fixed point is BoN_N: the policy's
reward quantile under the initial policy, E_pi[F(a)], must approach BoN_N's for N = 2 and 4. With
the EMA anchor moving (eta > 0) the reward keeps rising past Best-of-2.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.bond import best_anchor, jbond_loss, quantile_reward, wins
from posttrain.merge import ema_
from posttrain.model import GemmaConfig, build_model

V = 12
CFG = GemmaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                  head_dim=16, query_pre_attn_scalar=16, sliding_window=4)
PROMPTS = 8  # prompts per step (all the same <bos>); policy samples S per prompt, anchor samples K


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logprobs(model) -> torch.Tensor:
    """(V,) log pi(a | <bos>), with grad."""
    h = model.hidden_states(torch.tensor([[2]]))[0, -1]
    return (model.embed_tokens.weight @ h).log_softmax(-1)


def reward(a: torch.Tensor) -> torch.Tensor:
    return a.float() / (V - 1)


def bon(p: torch.Tensor, n: int) -> torch.Tensor:
    cdf = p.cumsum(0)  # actions are already in reward order
    return cdf ** n - torch.cat([cdf.new_zeros(1), cdf[:-1]]) ** n


def quantile_under(p0: torch.Tensor, p: torch.Tensor) -> float:
    """E_{a ~ p}[F0(a)]: the reward quantile of p's samples under the initial policy p0."""
    return float((p * p0.cumsum(0)).sum())


def train_jbond(n: int, *, steps: int, eta: float, k: int, rule: str, seed: int = 0, lr: float = 3e-2):
    torch.manual_seed(seed)
    policy = build_model(CFG, seed=seed)
    anchor = build_model(CFG)
    anchor.load_state_dict(policy.state_dict())
    anchor.requires_grad_(False)
    p0 = logprobs(policy).exp().detach()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    S = 4
    for _ in range(steps):
        lp = logprobs(policy)
        with torch.no_grad():
            alp = logprobs(anchor)
        y = torch.multinomial(lp.detach().exp(), PROMPTS * S, replacement=True).view(PROMPTS, S)
        ya = torch.multinomial(alp.exp(), PROMPTS * k, replacement=True).view(PROMPTS, k)
        won = wins(reward(y), reward(ya))
        q = quantile_reward(won, k, rule)
        best = ya.gather(1, best_anchor(reward(ya), n)[:, None]).squeeze(1)
        loss, _ = jbond_loss(lp[y], alp[y], lp[best], q, n=n, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if eta:
            ema_(dict(anchor.named_parameters()), {k_: v.detach() for k_, v in policy.named_parameters()}, eta)
    return p0, logprobs(policy).exp().detach()


@pytest.mark.parametrize("n", [2, 4])
def test_jbond_with_a_fixed_anchor_reaches_best_of_n(n):
    p0, p = train_jbond(n, steps=300, eta=0.0, k=16, rule="log")
    target = bon(p0, n)
    start, got, want = quantile_under(p0, p0), quantile_under(p0, p), quantile_under(p0, target)
    assert want - start > 0.1  # the task leaves room to improve
    assert abs(got - want) < 0.25 * (want - start), (start, got, want)
    tv = 0.5 * float((p - target).abs().sum())
    assert tv < 0.15, (p, target)


def test_jbond_with_the_paper_rule_and_a_moving_anchor_keeps_raising_the_reward():
    """The paper's setting: 2 anchor samples, the -log 16 rule, N = 2, EMA anchor: iterated BoN."""
    p0, p = train_jbond(2, steps=300, eta=0.05, k=2, rule="jbond")
    r = reward(torch.arange(V))
    assert float((p * r).sum()) > float((bon(p0, 2) * r).sum()) + 0.05
    assert quantile_under(p0, p) > quantile_under(p0, bon(p0, 2))


def test_wins_quantile_and_tie_breaks():
    pol = torch.tensor([[1.0, 0.0, 1.0]])
    anc = torch.tensor([[1.0, 0.0]])
    assert wins(pol, anc).tolist() == [[1.5, 0.5, 1.5]]  # ties count half
    tb_p, tb_a = torch.tensor([[0.9, 0.1, 0.1]]), torch.tensor([[0.5, 0.5]])
    assert wins(pol, anc, tb_p, tb_a).tolist() == [[2.0, 0.0, 1.0]]  # a reward tie goes to the secondary score
    won = torch.tensor([0.0, 0.5, 1.0, 2.0])
    assert torch.allclose(quantile_reward(won, 2, "jbond"), torch.tensor([-2.7725887, 0.0, 0.0, 0.0]))
    assert torch.allclose(quantile_reward(won, 2, "log"), torch.log(torch.tensor([0.25, 0.25, 0.5, 1.0])))
    assert best_anchor(torch.tensor([[1.0, 1.0, 0.0]]), 3).tolist() == [0]
    assert best_anchor(torch.tensor([[1.0, 1.0, 0.0]]), 3, torch.tensor([[0.1, 0.7, 0.9]])).tolist() == [1]
    assert best_anchor(torch.tensor([[0.0, 1.0, 5.0]]), 2).tolist() == [1]  # only the first n count


# ----------------------------------------------------------------------------- WARP

def test_warp_raises_the_reward_in_each_iteration_and_reports_kl():
    from posttrain.warp import eta_sweep, warp, warp_loss

    torch.manual_seed(0)
    policy = build_model(CFG, seed=1)
    anchor = build_model(CFG, seed=1)
    anchor.requires_grad_(False)
    r = reward(torch.arange(V))

    def load(model, state):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])

    def state_of(model):
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    def run_rl(init, run, iteration):
        load(policy, init)
        load(anchor, init)
        opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(100 * iteration + run)  # each run its own seed
        for _ in range(40):
            lp = logprobs(policy)
            with torch.no_grad():
                alp = logprobs(anchor)
            y = torch.multinomial(lp.detach().exp(), PROMPTS * 4, replacement=True, generator=g).view(PROMPTS, 4)
            loss, _ = warp_loss(lp[y], alp[y], reward(y), beta=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema_(dict(anchor.named_parameters()), state_of(policy), 0.01)
        return state_of(policy)

    def evaluate(state, init):
        load(policy, state)
        p = logprobs(policy).exp().detach()
        load(policy, init)
        p_init = logprobs(policy).exp().detach()
        return {"reward": float((p * r).sum()), "kl_to_init": float((p * (p.log() - p_init.log())).sum())}

    init = state_of(policy)
    result = warp(init, run_rl, evaluate, runs=2, iterations=3, liti_eta=0.3)
    rows = {(row["iteration"], row["stage"]): row for row in result.history}
    assert len(result.history) == 3 * 5
    for it in (1, 2, 3):
        assert rows[(it, "liti")]["reward"] > rows[(it, "init")]["reward"] + 0.01, it
        assert rows[(it, "liti")]["kl_to_init"] > 0 and rows[(it, "run_0")]["kl_to_init"] > 0
        assert rows[(it, "run_0")]["reward"] > rows[(it, "init")]["reward"]
        # LITI trades reward for KL: between init and the merge on both
        assert rows[(it, "liti")]["kl_to_init"] < rows[(it, "slerp")]["kl_to_init"]
    front = eta_sweep(result.last_init, result.last_merged, [0.0, 0.3, 1.0], evaluate)
    assert front[0]["kl_to_init"] == pytest.approx(0.0, abs=1e-6)
    assert front[0]["reward"] < front[1]["reward"] < front[2]["reward"]
