"""Chunked vocabulary losses against full-logits references: values, gradients, memory, GEMM counts.

Tiny float32 problems (N = 2 x 12 tokens, V = 41) with chunks that divide N (4), do not (5) and
exceed it (64), a mask that drops about a third of the tokens, and an explicit normalizer.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from posttrain.losses import (
    chunked_cross_entropy,
    chunked_kl_to_reference,
    chunked_sampled_distillation,
    chunked_topk_kl,
    distill_metrics,
    sample_teacher_targets,
    sequence_logprobs,
    teacher_targets,
    topk_teacher_targets,
    weighted_logprobs,
)
from posttrain.pg import leave_one_out_baseline, reinforce_loss

C, V, LEAD = 8, 41, (2, 12)
CHUNKS = (4, 5, 64)
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def one_thread():
    """On a busy 2-core box every OpenMP fork/join (torch.log_softmax makes one at any size) can
    wait milliseconds for a descheduled thread; these tensors are tiny, so one thread is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*LEAD, C, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, C, generator=g, dtype=dtype).requires_grad_()
    mask = torch.rand(LEAD, generator=g) > 0.3
    return h, w, mask, g


def with_grads(loss, h, w):
    return (loss, *torch.autograd.grad(loss, (h, w)))


def assert_same(got, want, **tol):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **(tol or TOL))


def norm_of(mask, normalizer):
    return mask.sum() if normalizer is None else normalizer


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("normalizer", [None, 10.0])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_cross_entropy_matches_full_logits(chunk, normalizer, fused):
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    got = with_grads(chunked_cross_entropy(h, w, t, mask, chunk, normalizer, fused=fused), h, w)
    naive = F.cross_entropy((h @ w.T)[mask], t[mask], reduction="sum") / norm_of(mask, normalizer)
    assert_same(got, with_grads(naive, h, w))


def test_cross_entropy_logprobs_and_default_mask():
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    _, lp = chunked_cross_entropy(h, w, t, mask, 5, return_logprobs=True)
    want = (h @ w.T).log_softmax(-1).gather(-1, t[..., None]).squeeze(-1)
    assert lp.shape == LEAD and not lp.requires_grad
    torch.testing.assert_close(lp, torch.where(mask, want, 0).detach(), **TOL)
    full = F.cross_entropy((h @ w.T).reshape(-1, V), t.reshape(-1))  # mask=None: every token, mean
    torch.testing.assert_close(chunked_cross_entropy(h, w, t, None, 5), full, **TOL)


def test_fused_backward_hands_over_its_held_gradients():
    """The fused loss computes its gradients in forward; backward must return those buffers (scaled
    in place) and drop them, not copy them: a copy would keep a second (V, C) head gradient alive."""
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    loss = chunked_cross_entropy(h, w, t, mask, 5, fused=True)
    node = loss.grad_fn
    while type(node).__name__ != "_ChunkedHeadBackward":
        node = node.next_functions[0][0]
    held = node.grad_w.data_ptr()
    (2.0 * loss).backward(retain_graph=True)
    assert w.grad.data_ptr() == held and node.grad_w is None and node.grad_h is None
    want = with_grads(2.0 * chunked_cross_entropy(h, w, t, mask, 5, fused=False), h, w)
    assert_same((w.grad,), (want[2],))
    w.grad = None
    loss.backward()  # a second backward through the same graph recomputes the chunks
    assert_same((w.grad,), (want[2] / 2,))


def sampled_reference(h, w, ids, probs, mask, normalizer):
    q = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
    per_token = -(q * (h @ w.T).log_softmax(-1).gather(-1, ids)).sum(-1)
    return per_token[mask].sum() / norm_of(mask, normalizer)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_sampled_distillation_matches_formula(chunk, fused):
    h, w, mask, g = problem()
    ids = torch.randint(0, V, (*LEAD, 6), generator=g)  # 6 of 41 ids with replacement: repeats occur
    probs = torch.rand(*LEAD, 6, generator=g)
    probs[0, 1] = 0  # all-zero token (fp16 underflow): contributes 0, no NaN
    assert any(len(set(r.tolist())) < 6 for r in ids.reshape(-1, 6)), "want repeated ids in the test data"
    for normalizer in (None, 7.0):
        got = chunked_sampled_distillation(h, w, ids.int(), probs.half(), mask, chunk, normalizer, fused=fused)
        want = sampled_reference(h, w, ids, probs.half().float(), mask, normalizer)
        assert_same(with_grads(got, h, w), with_grads(want, h, w))


def test_sampled_distillation_with_all_ids_is_full_cross_entropy():
    h, w, mask, g = problem()
    teacher_logits = 2 * torch.randn(*LEAD, V, generator=g)
    ids, probs = sample_teacher_targets(teacher_logits.reshape(-1, V), k=V, generator=g)
    assert (ids.sort(-1).values == torch.arange(V)).all()
    ids, probs = ids.reshape(*LEAD, V), probs.reshape(*LEAD, V)
    got = with_grads(chunked_sampled_distillation(h, w, ids, probs, mask, 5), h, w)
    target = torch.zeros(*LEAD, V).scatter_(-1, ids.long(), probs.float())
    exact_fp16 = F.cross_entropy((h @ w.T)[mask], (target / target.sum(-1, keepdim=True))[mask])
    assert_same(got, with_grads(exact_fp16, h, w))  # the same target, as stored in fp16
    full = F.cross_entropy((h @ w.T)[mask], teacher_logits.softmax(-1)[mask])
    assert_same(got, with_grads(full, h, w), rtol=2e-3, atol=2e-4)  # the teacher before fp16 rounding


def test_sample_teacher_targets_draw_without_replacement_in_proportion():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 30, generator=g)
    ids, probs = sample_teacher_targets(logits, k=12, temperature=0.7, generator=g)
    assert ids.dtype == torch.int32 and probs.dtype == torch.float16 and ids.shape == (7, 12)
    assert all(len(set(r.tolist())) == 12 for r in ids)
    want = (logits / 0.7).softmax(-1).gather(-1, ids.long())
    torch.testing.assert_close(probs.float(), want, rtol=1e-3, atol=1e-7)
    again = sample_teacher_targets(logits, k=12, temperature=0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[0], sample_teacher_targets(logits, 12, 0.7, torch.Generator().manual_seed(5))[0])
    # frequencies: k=1 draws id i with p_i; k=2 includes i with p_i + sum_j p_j p_i / (1 - p_j)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 40_000
    one, _ = sample_teacher_targets(p.log().expand(n, 4), k=1, generator=g)
    torch.testing.assert_close(torch.bincount(one[:, 0], minlength=4) / n, p, rtol=0, atol=0.01)
    two, _ = sample_teacher_targets(p.log().expand(n, 4), k=2, generator=g)
    inclusion = p + (p[None, :] * p[:, None] / (1 - p[:, None])).sum(0) - p * p / (1 - p)
    torch.testing.assert_close(torch.bincount(two.reshape(-1), minlength=4) / n, inclusion, rtol=0, atol=0.01)


def topk_reference(h, w, ids, teacher_logprobs, mask, normalizer):
    log_t = teacher_logprobs.log_softmax(-1)
    per_token = (torch.xlogy(log_t.exp(), log_t.exp()) - log_t.exp() * (h @ w.T).log_softmax(-1).gather(-1, ids))
    return per_token.sum(-1)[mask].sum() / norm_of(mask, normalizer)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_topk_kl_matches_formula(chunk, fused):
    h, w, mask, g = problem()
    ids = torch.stack([torch.randperm(V, generator=g)[:5] for _ in range(24)]).reshape(*LEAD, 5)
    lt = torch.randn(*LEAD, 5, generator=g) - 3.0  # any offset: the loss renormalises over the k
    lt[0, 0, 4] = float("-inf")  # a zero-probability id: 0 log 0 = 0
    for normalizer in (None, 7.0):
        got = with_grads(chunked_topk_kl(h, w, ids, lt, mask, chunk, normalizer, fused=fused), h, w)
        assert_same(got, with_grads(topk_reference(h, w, ids, lt, mask, normalizer), h, w))
        assert got[0] > 0


def test_topk_kl_with_all_ids_is_full_kl():
    h, w, mask, g = problem()
    teacher_logits = 2 * torch.randn(*LEAD, V, generator=g)
    ids, lp = topk_teacher_targets(teacher_logits.reshape(-1, V), k=V)
    got = chunked_topk_kl(h, w, ids.reshape(*LEAD, V), lp.reshape(*LEAD, V), mask, 5)
    full = F.kl_div((h @ w.T).log_softmax(-1)[mask], teacher_logits.log_softmax(-1)[mask], log_target=True,
                    reduction="batchmean")  # KL(teacher || student), summed over V, mean over tokens
    assert_same(with_grads(got, h, w), with_grads(full, h, w))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_kl_to_reference_matches_full_logits(chunk, direction, fused):
    h, w, mask, g = problem()
    ref_h = torch.randn(*LEAD, 6, generator=g, requires_grad=True)  # a reference of another width
    ref_w = torch.randn(V, 6, generator=g, requires_grad=True)
    for normalizer in (None, 7.0):
        got = chunked_kl_to_reference(h, w, ref_h, ref_w, mask, direction, chunk, normalizer, fused=fused)
        ls, lr = (h @ w.T).log_softmax(-1), (ref_h @ ref_w.T).log_softmax(-1).detach()
        # F.kl_div(input, target) = KL(target || input)
        per_token = F.kl_div(lr, ls, log_target=True, reduction="none") if direction == "reverse" \
            else F.kl_div(ls, lr, log_target=True, reduction="none")
        want = per_token.sum(-1)[mask].sum() / norm_of(mask, normalizer)
        # the reverse-KL gradient s * (log s - log r - KL) cancels: both float32 paths sit ~1e-6
        # from the float64 value, so they may differ by a few 1e-6
        assert_same(with_grads(got, h, w), with_grads(want, h, w), **(TOL if direction == "forward" else
                                                                       {"rtol": 1e-5, "atol": 4e-6}))
    chunked_kl_to_reference(h, w, ref_h, ref_w, mask, direction, chunk, fused=fused).backward()
    assert ref_h.grad is None and ref_w.grad is None  # the reference is frozen


def test_distill_metrics():
    h, w, mask, g = problem()
    th, tw = torch.randn(*LEAD, 6, generator=g), torch.randn(V, 6, generator=g)
    m = distill_metrics(h, w, th, tw, mask, chunk_tokens=5)
    ls, lt = (h @ w.T).log_softmax(-1)[mask], (th @ tw.T).log_softmax(-1)[mask]
    torch.testing.assert_close(m.kl, F.kl_div(ls, lt, log_target=True, reduction="batchmean").detach(), **TOL)
    torch.testing.assert_close(m.top1, (ls.argmax(-1) == lt.argmax(-1)).float().mean())
    assert m.tokens == int(mask.sum()) and 0 < m.top1 < 1
    same = distill_metrics(h, w, h, w, mask, chunk_tokens=5)
    assert abs(same.kl) < 1e-6 and same.top1 == 1


@pytest.mark.parametrize("chunk", CHUNKS)
def test_sequence_logprobs_values_and_gradients(chunk):
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    weights = torch.randn(LEAD, generator=g)  # arbitrary downstream use of per-token outputs
    lp = sequence_logprobs(h, w, t, mask, chunk)
    want = torch.where(mask, (h @ w.T).log_softmax(-1).gather(-1, t[..., None]).squeeze(-1), 0)
    assert_same(with_grads((lp * weights).sum(), h, w), with_grads((want * weights).sum(), h, w))
    torch.testing.assert_close(lp, want, **TOL)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_weighted_logprobs_are_the_weighted_sum_of_sequence_logprobs(chunk):
    """The fused form of (weights * sequence_logprobs).sum() the RL step uses: same value and
    gradients, the per-token log-probs beside it, zero weights (rows whose coefficient is 0) included."""
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    weights = torch.randn(LEAD, generator=g)
    weights[0, :4] = 0.0
    total, lp = weighted_logprobs(h, w, t, weights, mask, chunk)
    want = sequence_logprobs(h, w, t, mask, chunk)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, want.detach(), **TOL)
    assert_same(with_grads(total, h, w), with_grads((want * weights).sum(), h, w))
    with torch.no_grad():
        torch.testing.assert_close(weighted_logprobs(h, w, t, weights, mask, chunk)[0], total.detach(), **TOL)


@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck_float64(fused):
    """Both Function modes (fused, recompute) and every kernel, on float64, chunks not dividing N."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    t = torch.randint(0, 5, (7,), generator=g)
    ids, probs = torch.randint(0, 5, (7, 4), generator=g), torch.rand(7, 4, generator=g, dtype=torch.float64)
    ref_h = torch.randn(7, 2, generator=g, dtype=torch.float64)
    ref_w = torch.randn(5, 2, generator=g, dtype=torch.float64)
    top_ids = torch.tensor([[0, 3]]).expand(7, 2)
    fns = [lambda h, w: chunked_cross_entropy(h, w, t, mask, 2, fused=fused),
           lambda h, w: chunked_sampled_distillation(h, w, ids, probs, mask, 3, fused=fused),
           lambda h, w: chunked_topk_kl(h, w, top_ids, probs[:, :2].log(), mask, 3, fused=fused),
           lambda h, w: chunked_kl_to_reference(h, w, ref_h, ref_w, mask, "reverse", 2, fused=fused),
           lambda h, w: chunked_kl_to_reference(h, w, ref_h, ref_w, mask, "forward", 4, fused=fused),
           lambda h, w: sequence_logprobs(h, w, t, mask, 3),
           lambda h, w: weighted_logprobs(h, w, t, probs[:, 0] - 0.5, mask, 2)[0]]
    # fused: a repeated backward recomputes instead of handing over the held gradients, so the
    # two agree to float64 rounding, not bit for bit
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (h, w), nondet_tol=1e-12 if fused else 0.0)


def test_teacher_targets_are_chunked_topk_and_samples():
    h, w, _, g = problem()
    th, tw = h.detach().reshape(-1, C), w.detach()
    ids, lp = teacher_targets(th, tw, k=7, method="topk", chunk_tokens=5)
    assert_same((ids, lp), topk_teacher_targets(th @ tw.T, 7))
    ids, probs = teacher_targets(th, tw, k=7, chunk_tokens=5, generator=g)
    assert ids.shape == (24, 7) and all(len(set(r.tolist())) == 7 for r in ids)
    torch.testing.assert_close(probs.float(), (th @ tw.T).softmax(-1).gather(-1, ids.long()), rtol=1e-3, atol=1e-7)


class MaxTensor(TorchDispatchMode):
    """Records the largest tensor any op creates, and counts matrix multiplies."""

    def __init__(self):
        super().__init__()
        self.numel, self.gemms = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.gemms += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        self.numel = max([self.numel] + [x.numel() for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)])
        return out


def probe(fn, *tensors):
    mode = MaxTensor()
    with mode:
        fn().backward() if tensors else fn()
    return mode


def test_no_tensor_larger_than_a_chunk_of_logits():
    n, v, chunk = 64, 1000, 8
    h, w = torch.randn(n, 4, requires_grad=True), torch.randn(v, 4, requires_grad=True)
    t, ref_h = torch.randint(0, v, (n,)), torch.randn(n, 4)
    assert probe(lambda: F.cross_entropy(h @ w.T, t), h).numel == n * v  # the probe sees N x V
    for fn in [lambda: chunked_cross_entropy(h, w, t, None, chunk),
               lambda: chunked_cross_entropy(h, w, t, None, chunk, fused=False),
               lambda: chunked_kl_to_reference(h, w, ref_h, w.detach(), None, "reverse", chunk),
               lambda: sequence_logprobs(h, w, t, None, chunk).sum()]:
        assert probe(fn, h).numel == chunk * v


def test_gemm_counts_match_the_documented_cost():
    h, w = torch.randn(24, 4, requires_grad=True), torch.randn(50, 4, requires_grad=True)
    t, chunks = torch.randint(0, 50, (24,)), 3
    assert probe(lambda: chunked_cross_entropy(h, w, t, None, 8), h).gemms == 3 * chunks  # fused
    assert probe(lambda: chunked_cross_entropy(h, w, t, None, 8, fused=False), h).gemms == 4 * chunks
    with torch.no_grad():  # forward only: no gradient work even when fused
        assert probe(lambda: chunked_cross_entropy(h, w, t, None, 8)).gemms == chunks
    weights = torch.rand(24)
    assert probe(lambda: weighted_logprobs(h, w, t, weights, None, 8)[0], h).gemms == 3 * chunks
    assert probe(lambda: sequence_logprobs(h, w, t, None, 8).mul(weights).sum(), h).gemms == 4 * chunks


def test_peak_memory_is_a_chunk_not_n_by_v():
    """fwd+bwd of 4096 tokens x 16384 vocab: naive float32 logits alone are 256 MiB; a chunk is 8 MiB."""
    script = textwrap.dedent("""
        import re, torch
        from posttrain.losses import chunked_cross_entropy
        vm = lambda key: int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) / 1024
        torch.manual_seed(0)
        h = torch.randn(4096, 32, requires_grad=True); w = torch.randn(16384, 32, requires_grad=True)
        t = torch.randint(0, 16384, (4096,))
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        rss0 = vm("VmRSS")
        chunked_cross_entropy(h, w, t, None, 128).backward()
        print(vm("VmHWM") - rss0)
    """)
    # Not ru_maxrss: Linux carries it across fork+exec, so it can report the parent's (pytest's) RSS.
    # A fixed mmap threshold makes glibc unmap every freed chunk buffer, so RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr
    growth_mib = float(out.stdout)  # measured here: about 30 MiB (2 chunk buffers + runtime)
    assert growth_mib < 64, f"peak RSS grew {growth_mib:.0f} MiB; N x V logits alone would be 256 MiB"


def test_normalizer_lets_ranks_sum_to_the_whole():
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    whole = with_grads(chunked_cross_entropy(h, w, t, mask, 5), h, w)
    n = mask.sum()  # the global count each "rank" divides by
    parts = [chunked_cross_entropy(h[i], w, t[i], mask[i], 5, normalizer=n) for i in range(2)]
    assert_same(with_grads(sum(parts), h, w), whole)


def test_empty_mask_gives_zero_loss_and_gradients():
    h, w, _, _ = problem()
    loss, gh, gw = with_grads(chunked_cross_entropy(h, w, torch.zeros(LEAD, dtype=torch.long),
                                                    torch.zeros(LEAD, dtype=torch.bool)), h, w)
    assert loss == 0 and not gh.any() and not gw.any()


def test_bfloat16_inputs_on_cpu():
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    want = with_grads(chunked_cross_entropy(h, w, t, mask, 5), h, w)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    got = with_grads(chunked_cross_entropy(hb, wb, t, mask, 5), hb, wb)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    assert_same([x.float() for x in got], want, rtol=0.05, atol=0.02)


def test_autocast_does_not_lower_the_head_precision():
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    want = with_grads(chunked_cross_entropy(h, w, t, mask, 5), h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = with_grads(chunked_cross_entropy(h, w, t, mask, 5), h, w)
    assert_same(got, want)


def test_bad_inputs_name_the_rule():
    h, w, mask, g = problem()
    t = torch.randint(0, V, LEAD, generator=g)
    with pytest.raises(ValueError, match=r"weight must be \(V, C\)"):
        chunked_cross_entropy(h, w[:, :3], t, mask)
    with pytest.raises(ValueError, match="leading shape"):
        chunked_cross_entropy(h, w, t, mask[:, :5])
    with pytest.raises(ValueError, match="direction must be"):
        chunked_kl_to_reference(h, w, h, w, mask, "backward")
    with pytest.raises(ValueError, match="temperature"):
        sample_teacher_targets(torch.zeros(2, 5), k=2, temperature=0)


def test_leave_one_out_baseline_exact():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    assert torch.equal(leave_one_out_baseline(r), torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_baseline(torch.ones(3, 1))


def test_reinforce_loss_value_and_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0], [0.5, 2.0]], requires_grad=True)
    loss = reinforce_loss(logp, adv)
    assert loss.item() == pytest.approx(-(-1 + 2 - 1.5 - 8) / 4)
    loss.backward()
    assert torch.equal(logp.grad, -adv.detach() / 4) and adv.grad is None  # advantages are constants
    assert reinforce_loss(logp, adv, normalizer=2.0).item() == pytest.approx(2 * loss.item())
