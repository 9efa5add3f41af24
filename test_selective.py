"""Property-based tests of selective attention against docs/SPEC.md (§ = its sections).

Run: python -m pytest -q          (the slow end-to-end ones: python -m pytest -m slow)
"""

import collections
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import types
import warnings
import weakref

import torch

if not torch.cuda.is_available():  # the Triton kernels run on the CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import kernels  # noqa: E402
import selective_gpt  # noqa: E402
from selective_gpt import (GPT, GPTConfig, CausalSelfAttention, attention_path, future_mask, head0_logits,  # noqa: E402
                           memory_loss, pruned_visibility, selective_attention, selective_attention_reference,
                           selective_mask)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def same_random_state():
    """Each test draws the same numbers (torch.randn_like and the like), whichever tests ran before it."""
    torch.manual_seed(0)


def tiny_model(selective=True, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(block_size=48, vocab_size=61, n_layer=3, n_head=4, n_embd=32, bias=True, selective=selective,
               init_std=0.02)
    cfg.update(overrides)
    model = GPT(GPTConfig(**cfg)).to(dtype).eval()
    with torch.no_grad():  # 8 x 0.02 on q, k, v: F and the attention patterns far from uniform, yet not saturated
        for name, p in model.named_parameters():
            if name.endswith("c_attn.weight"):
                p.mul_(8.0)
    return model


def random_qkv(B=2, H=3, T=20, D=16, dtype=torch.float32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype).mul_(1.5).requires_grad_(grad) for _ in range(3)]


def brute_force_F(logits, mask_bos=False, mask_self=False):
    """§1 with three loops, in float64: F[i, j] = sum_{k < i} S[k, j], S[k, j] = relu(A[k, j]) for 0 < j < k; the
    ablations of §9 allow j = 0 (mask_bos) and j = k (mask_self)."""
    T = logits.size(-1)
    A = logits.double().reshape(-1, T, T)
    F = torch.zeros_like(A)
    for n in range(A.size(0)):
        for i in range(T):
            for j in range(T):
                total = 0.0
                for k in range(i):
                    if (j > 0 or mask_bos) and (j < k or mask_self and j == k):
                        total += max(A[n, k, j].item(), 0.0)
                F[n, i, j] = total
    return F.reshape(logits.shape)


@st.composite
def causal_logits(draw, dtype=torch.float64):
    """Scaled, causally masked head-0 logits (..., T, T): random values, some -inf below the diagonal too."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    T = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*lead, T, T, generator=g, dtype=torch.float64) * scale
    A = A.masked_fill(torch.rand(A.shape, generator=g) < draw(st.sampled_from([0.0, 0.2])), float("-inf"))
    A = A.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return A.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# §1: F

@given(causal_logits())
def test_selective_mask_equals_brute_force(logits):
    torch.testing.assert_close(selective_mask(logits), brute_force_F(logits), rtol=1e-12, atol=1e-12)


@given(causal_logits(dtype=torch.float32), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_selective_mask_invariants(logits, dtype):
    F = selective_mask(logits.to(dtype))
    T = logits.size(-1)
    assert F.dtype == torch.float32 and F.shape == logits.shape
    assert torch.isfinite(F).all()
    assert (F >= 0).all()
    assert (F[..., :, 0] == 0).all(), "BOS (key 0) is never masked"
    assert (F.masked_select(~torch.ones(T, T, dtype=torch.bool).tril(-1)) == 0).all(), "zero on and above diagonal"
    assert (F[..., 1:, :] >= F[..., :-1, :]).all(), "F never decreases down a column"


def test_selective_mask_is_monotone_where_cumsum_minus_S_is_not():
    """cumsum(S) - S rounds F[4, 1] to 1 - 2^-24 < F[3, 1] = 1 here; the shifted cumsum must not."""
    A = torch.full((6, 6), -1.0).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    A[2, 1], A[4, 1] = 1.0, 3e-8
    F = selective_mask(A)
    assert F[3, 1] == 1.0 and F[4, 1] == 1.0 and F[5, 1] == torch.tensor(1.0) + torch.tensor(3e-8)
    assert (F[1:] >= F[:-1]).all()


def test_selective_mask_large_logits_under_autocast():
    """T = 1024, logits near the top of each half-precision range: F is float32 and finite (fp16 F would overflow)."""
    T = 1024
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    for dtype, big in ((torch.bfloat16, 1e30), (torch.float16, 6e4)):
        A = torch.full((T, T), big, dtype=dtype).masked_fill(causal, float("-inf"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F = selective_mask(A)
        assert F.dtype == torch.float32 and torch.isfinite(F).all()
        assert F[-1, 1] == pytest.approx(float(A[2, 1]) * (T - 3), rel=1e-3)  # rows 2..T-2 select key 1


def test_model_forward_under_bf16_autocast_at_1024_is_float32s_up_to_bf16_rounding():
    """Both paths under bf16 autocast give float32's logits and loss up to bf16's rounding (not just finite ones)."""
    model = tiny_model(dtype=torch.float32, block_size=1024, n_layer=1, vocab_size=50)
    idx = torch.randint(0, 50, (1, 1024), generator=torch.Generator().manual_seed(0))
    want_logits, want_loss = model(idx, targets=idx)
    for path in ("tiled", "mask"):
        for block in model.transformer.h:
            block.attn.attention = path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, targets=idx)
        torch.testing.assert_close(logits.float(), want_logits, rtol=0.02, atol=0.01, msg=path)
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-3), path


# ---------------------------------------------------------------------------------------------------------------
# The attention paths: reference, mask, tiled (CPU here), and their gradients

def grads_of(fn, q, k, v, dy):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y = fn(q, k, v)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in (q, k, v)]


def reference(q, k, v):
    return selective_attention_reference(q, k, v)[0]


@pytest.mark.parametrize("path", ["mask", "tiled"])
@pytest.mark.parametrize("T", [1, 2, 17, 64, 130, 300])
def test_paths_match_reference_fp32(path, T):
    q, k, v = random_qkv(T=T, seed=T)
    assert T < 300 or kernels.chunk_rows(T, q.size(1)) < T, "300: the CPU path's query chunks meet inside T"
    dy = torch.randn_like(q)
    want = grads_of(reference, q, k, v, dy)
    got = grads_of(lambda a, b, c: selective_attention(a, b, c, attention=path), q, k, v, dy)
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5, msg=f"{path} {name}")


@pytest.mark.parametrize("path", ["mask", "tiled"])
def test_paths_close_under_bf16_autocast(path):
    q, k, v = random_qkv(T=70, seed=3, grad=False)
    want = reference(q.double(), k.double(), v.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attention=path)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("rows", [1, 4, 7, 32])
def test_cpu_chunks_match_reference_float64(rows):
    """Several query chunks: the carries and the reverse running sums of the backward cross chunk borders."""
    q, k, v = random_qkv(T=29, dtype=torch.float64, seed=rows)
    dy = torch.randn_like(q)
    want = grads_of(reference, q, k, v, dy)
    got = grads_of(lambda a, b, c: kernels.chunked_selective_attention(a, b, c, rows), q, k, v, dy)
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


class TensorsMade(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operator's outputs: the largest tensor made, and the dtypes each operator ran in."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        self.ops.append((func.__name__.split(".")[0], [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_never_makes_a_T_by_T_tensor(dtype):
    """Issue: the forward built one B x T x T float mask. Now no tensor of either pass is as large as T x T, so the
    memory grows like flash attention's (bench.py kernels measures it)."""
    B, H, T, D = 2, 2, 1024, 16
    q, k, v = (t.to(dtype) for t in random_qkv(B=B, H=H, T=T, D=D, grad=False))
    C = kernels.chunk_rows(T, H)
    with TensorsMade() as forward:
        kernels.forward_chunks(q, k, v, C)
    with TensorsMade() as backward:
        kernels.backward_chunks(torch.randn_like(q), q, k, v, C)
    assert max(forward.largest, backward.largest) < T * T, (forward.largest, backward.largest)
    assert B * H * T * D <= max(forward.largest, backward.largest) <= max(B * H * T * D, H * C * T)


@given(st.integers(1, 2 ** 17), st.integers(1, 256))
def test_chunk_rows_is_256_while_the_backward_block_fits_in_2_MiB_else_128(T, H):
    """docs/PERFORMANCE.md, Query chunk rows; any T and H, those with H * T > 2^19 too (where a shift count once went
    negative)."""
    rows = kernels.chunk_rows(T, H)
    assert rows == 128 or rows == 256 and H * rows * T * 4 <= 2 * 2 ** 20
    assert rows == 256 or H * 256 * T * 4 > 2 * 2 ** 20
    assert [kernels.chunk_rows(T, H) for T, H in ((2048, 1), (2049, 1), (512, 4), (513, 4), (2 ** 17, 256))] == \
        [256, 128, 256, 128, 128]  # the edge: H * T = 2048


@given(st.integers(1, 300), st.integers(1, 40), st.sampled_from([1, 4, 16]), st.booleans(), st.integers(0, 99))
def test_running_sum_in_blocks_equals_a_plain_loop(c, n, block, reverse, seed):
    """The CPU path's in-chunk running sums (of S for F, of dF for dS) in blocks of rows: out[i] = sum of X[k] over
    k < i (reverse: k > i), for any chunk height, ragged or not, in float64 against a loop."""
    X = torch.randn(c, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want = torch.zeros_like(X)
    for i in range(c):
        want[i] = X[i + 1:].sum(0) if reverse else X[:i].sum(0)
    torch.testing.assert_close(kernels.running_sum(X, reverse, block), want, rtol=1e-12, atol=1e-12)


def test_cpu_forward_under_bf16_keeps_S_and_F_in_float32():
    """SPEC §1.5: on bf16 inputs the forward's matmuls (head 0's logits, F's running sums) run in float32; only the
    attention itself, one SDPA call per chunk and sequence, takes bf16."""
    q, k, v = (t.detach().bfloat16() for t in random_qkv(B=2, H=4, T=300, D=32, seed=11))
    with TensorsMade() as made:
        kernels.forward_chunks(q, k, v, 64)
    matmuls = [dtypes for op, dtypes in made.ops if op in ("mm", "addmm", "bmm", "baddbmm")]
    assert matmuls and all(t == torch.float32 for d in matmuls for t in d)
    sdpa = [dtypes for op, dtypes in made.ops if "scaled_dot_product" in op]
    assert len(sdpa) == 2 * 5 and all(t == torch.bfloat16 for d in sdpa for t in d)


def test_cpu_backward_under_bf16_runs_its_matmuls_in_bf16_and_stays_accurate():
    """Issue: the bf16 backward was a float32 one in disguise. Four of its five per-head matmuls take bf16 operands
    (the logits stay float32, SPEC §1.5); its gradients are as close to float64 as the 'mask' path's."""
    q, k, v = random_qkv(B=2, H=4, T=300, D=32, seed=11)
    q, k, v = (t.detach().bfloat16() for t in (q, k, v))
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    with TensorsMade() as made:
        kernels.backward_chunks(dy, q, k, v, 64)
    bmm = [dtypes for op, dtypes in made.ops if op in ("bmm", "baddbmm")]
    # 2 x 5 chunks, each: 4 bf16 per-head matmuls, the float32 logits, and two float32 running sums (of S and dF)
    assert sum(all(t == torch.bfloat16 for t in d) for d in bmm) == 4 * 10 and len(bmm) == (5 + 2) * 10
    assert kernels.chunk_rows(300, 4) < 300, "below, selective_attention's own chunks meet inside T too"
    want = grads_of(reference, q.double(), k.double(), v.double(), dy.double())
    for path in ("tiled", "mask"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = grads_of(lambda a, b, c: selective_attention(a, b, c, attention=path), q, k, v, dy)
        error = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
        if path == "tiled":
            tiled = error
    assert all(e < 0.02 for e in tiled), tiled
    assert all(t <= 1.5 * m + 1e-3 for t, m in zip(tiled, error)), (tiled, error)


def test_cpu_chunks_gradcheck_float64():
    q, k, v = random_qkv(B=1, H=2, T=11, D=4, dtype=torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda a, b, c: kernels.chunked_selective_attention(a, b, c, 4), (q, k, v))


@pytest.mark.parametrize("path", ["reference", "mask", "tiled"])
def test_gradcheck_selective_attention_layer(path):
    """Finite differences in float64 through a whole selective attention layer (projections included)."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(GPTConfig(n_embd=8, n_head=2, block_size=8, selective=True, attention=path,
                                          init_std=0.02)).double()
    with torch.no_grad():
        layer.c_attn.weight.mul_(10)  # 10 x 0.02: F non-trivial, the softmax not saturated
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,))
    assert (layer(x, keep=True)[1].F > 0).any(), "the check must run through a non-zero F"


def test_selection_gradient_reaches_head0_query_and_key():
    """No stop-gradient (§1): dropping the gradient through F changes head 0's dq and dk (and only head 0's)."""
    q, k, v = random_qkv(T=30, dtype=torch.float64, seed=5)
    dy = torch.randn_like(q)

    def detached_F(q, k, v):
        T = q.size(-2)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        F = selective_mask(logits[:, 0]).detach()
        return torch.softmax(logits - F[:, None], dim=-1) @ v

    full, cut = grads_of(reference, q, k, v, dy), grads_of(detached_F, q, k, v, dy)
    for i in (1, 2):  # dq, dk
        assert not torch.allclose(full[i][:, 0], cut[i][:, 0])
        torch.testing.assert_close(full[i][:, 1:], cut[i][:, 1:])


def test_compiled_selective_model_has_no_graph_breaks_and_matches_eager():
    """torch.compile(fullgraph=True) raises on any graph break; the tiled path is an opaque custom op to it."""
    torch._dynamo.reset()
    model = tiny_model(dtype=torch.float32, n_layer=2, block_size=40)
    idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(7))
    logits, loss = model(idx, targets=idx)
    loss.backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_logits, compiled_loss = torch.compile(model, fullgraph=True)(idx, targets=idx)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-4, atol=1e-4)
    for p, g in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)


def test_tiled_custom_ops_pass_opcheck():
    q, k, v = random_qkv(B=2, H=2, T=9, D=8)
    torch.library.opcheck(torch.ops.selective_gpt.chunked_forward.default, (q, k, v, 4))
    dy = torch.randn_like(q)
    torch.library.opcheck(torch.ops.selective_gpt.chunked_backward.default, (dy, *(t.detach() for t in (q, k, v)), 4))


@given(causal_logits(), st.booleans(), st.booleans())
def test_ablation_switches_change_F_exactly_as_defined(logits, mask_bos, mask_self):
    """§9: each switch drops one half of §1.2, against the brute force; off, it is §1's."""
    F = selective_mask(logits, mask_bos, mask_self)
    torch.testing.assert_close(F, brute_force_F(logits, mask_bos, mask_self), rtol=1e-12, atol=1e-12)


def test_ablation_switches_make_a_difference_where_the_rule_bites():
    """With positive logits on column 0 and the diagonal, each switch changes F where, and only where, it says."""
    T = 6
    A = torch.ones(T, T, dtype=torch.float64).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    base = selective_mask(A)
    bos, own = selective_mask(A, mask_bos=True) - base, selective_mask(A, mask_self=True) - base
    rows = torch.arange(T, dtype=torch.float64)
    torch.testing.assert_close(bos[:, 0], (rows - 1).clamp(min=0))  # queries 1..i-1 voted on BOS (0 did not: §1.2)
    assert torch.equal(bos[:, 1:], torch.zeros(T, T - 1, dtype=torch.float64))
    own_votes = torch.ones(T, T, dtype=torch.float64).tril(-1)  # query i > j counts key j's vote on itself...
    own_votes[:, 0] = 0  # ...except BOS's, still protected
    torch.testing.assert_close(own, own_votes)
    both = selective_mask(A, mask_bos=True, mask_self=True) - base
    assert both[T - 1, 0] == T - 1  # every earlier query, BOS's own vote included


@pytest.mark.parametrize("rule", [dict(mask_bos=True), dict(mask_self=True), dict(mask_bos=True, mask_self=True)])
def test_ablated_model_runs_on_mask_and_reference_only_and_decodes_like_its_parallel_pass(rule):
    """Each switch of the selection rule (GPTConfig.rule; a new one joins the list above): the mask path equals the
    reference, auto takes the mask path, and decoding, pruned or not, equals the parallel pass."""
    reference = tiny_model(attention="reference", **rule)
    masked = tiny_model(attention="mask", **rule)
    auto = tiny_model(**rule)
    idx = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(4))
    ref_logits, _ = reference(idx, targets=idx)
    torch.testing.assert_close(masked(idx, targets=idx)[0], ref_logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(auto(idx, targets=idx)[0], masked(idx, targets=idx)[0]), "auto picks mask for an ablation"
    assert not torch.allclose(ref_logits, tiny_model(attention="reference")(idx, targets=idx)[0]), "it changes F"
    pruned, _ = masked(idx, targets=idx, budgets=[3, 5, 4])
    for prompt in (1, 12):  # decoding from BOS, and after a prompt's parallel pass (KVBuffer.after_prompt)
        torch.testing.assert_close(decode_logits(masked, idx, prompt=prompt), ref_logits[:, prompt - 1:],
                                   rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(decode_logits(masked, idx, [3, 5, 4], prompt=prompt), pruned[:, prompt - 1:],
                                   rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="mask or reference path only"):
        GPTConfig(selective=True, attention="tiled", **rule)
    with pytest.raises(ValueError, match="set selective=True"):
        GPTConfig(**rule)
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="not the ablations"):
        attention_path("tiled", q, ablated=True)


def test_attention_paths_are_chosen_and_checked():
    q, k, v = random_qkv(T=5, grad=False)
    assert torch.equal(selective_attention(q, k, v, attention="reference"), selective_attention_reference(q, k, v)[0])
    assert attention_path("auto", q) == "tiled" and attention_path("auto", q, dropout_p=0.1) == "mask"
    with pytest.raises(ValueError, match="no dropout"):
        attention_path("tiled", q, dropout_p=0.1)
    with pytest.raises(ValueError, match="attention must be auto, reference, mask, tiled"):
        GPTConfig(attention="fused")
    with pytest.raises(ValueError, match="memory loss needs every layer's F"):
        GPTConfig(selective=True, memory_loss_weight=0.1, attention="tiled")
    assert kernels.why_not_tiled(q) is None and kernels.why_not_tiled(q, dropout_p=0.1) == "it has no dropout"


@pytest.mark.parametrize("config,path", [
    (dict(), "tiled"), (dict(attention="tiled"), "tiled"), (dict(attention="mask"), "mask"),
    (dict(attention="reference"), "reference"), (dict(dropout=0.1), "mask"), (dict(mask_self=True), "mask"),
    (dict(memory_loss_weight=0.1), "mask"), (dict(selective=False), None)])
def test_a_model_trains_on_the_path_its_config_names(config, path, monkeypatch):
    """Every path gives the same y, so no equivalence test can tell which one ran: count the calls of each path's
    function in a training step (forward and backward) of a 3-layer model; 'auto' takes tiled where it applies."""
    calls = []
    for module, name in ((kernels, "tiled_selective_attention"), (selective_gpt, "selective_attention_sdpa"),
                         (selective_gpt, "selective_attention_reference")):
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    model = tiny_model(**config).train()
    idx = torch.randint(1, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    model(idx, targets=idx)[1].backward()
    names = {"tiled": "tiled_selective_attention", "mask": "selective_attention_sdpa",
             "reference": "selective_attention_reference", None: None}
    assert calls == [names[path]] * 3 if path else calls == []


def test_forward_without_targets_gives_the_last_positions_logits():
    model = tiny_model()
    idx = torch.randint(1, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, 1, 61)
    torch.testing.assert_close(logits, model(idx, targets=idx)[0][:, -1:], rtol=1e-12, atol=1e-12)


def test_a_triton_older_than_the_oldest_tested_is_left_unused(monkeypatch):
    """kernels.triton_unusable: versions compare as numbers (3.10 is newer than 3.9); an older one is named, with
    what to do, and on CUDA 'auto' takes the mask path as if triton were not installed (a stand-in GPU here)."""
    unusable = lambda version: kernels.triton_unusable(types.SimpleNamespace(__version__=version))  # noqa: E731
    assert unusable("3.9.0") is None and unusable("3.10.1+git1234") is None and unusable("4.0") is None
    assert unusable("3.8.0") == ("triton 3.8.0 is older than 3.9, the oldest the Triton kernel is tested on (pip "
                                 "install -U triton)")
    assert "older than 3.9" in unusable("2.3.0") and "older than 3.9" in unusable("3.4.0")
    assert kernels.triton_unusable(None) == "triton is not installed (pip install triton)"
    assert unusable("main") == "cannot read triton's version 'main' (pip install -U triton)"
    shape = (1, 1, 4, 64)
    gpu_q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, size=lambda dim: shape[dim])
    monkeypatch.setattr(kernels, "triton", None)
    monkeypatch.setattr(kernels, "WHY_NO_TRITON", unusable("3.2.0"))
    assert kernels.why_not_tiled(gpu_q) == unusable("3.2.0") and attention_path("auto", gpu_q) == "mask"


def test_importing_kernels_beside_an_old_triton_leaves_it_unused(tmp_path):
    """A stand-in triton 3.8.0 on the path: kernels imports (builds no kernel, no autotuner) and says why not."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text('__version__ = "3.8.0"\n')
    (tmp_path / "triton" / "language.py").write_text("")
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import kernels; print(kernels.triton); print(kernels.WHY_NO_TRITON)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), here])))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ["None", "triton 3.8.0 is older than 3.9, the oldest the Triton kernel is "
                                       "tested on (pip install -U triton)"]


def test_auto_takes_the_mask_path_on_a_gpu_without_the_shared_memory_the_kernel_needs(monkeypatch):
    """On CUDA, 'auto' asks the Triton kernel's own limits with the GPU's shared memory per block (bf16, head dim
    64: 72 KB for the smallest backward candidate); a stand-in GPU here."""
    shape = (1, 1, 4, 64)
    gpu_q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, size=lambda dim: shape[dim])
    monkeypatch.setattr(kernels, "triton", kernels.triton or object())
    monkeypatch.setattr(kernels, "shared_memory_limit", lambda device: 71 * 1024)
    assert "needs 72 KB of shared memory" in kernels.why_not_tiled(gpu_q) and attention_path("auto", gpu_q) == "mask"
    monkeypatch.setattr(kernels, "shared_memory_limit", lambda device: 72 * 1024)
    assert kernels.why_not_tiled(gpu_q) is None and attention_path("auto", gpu_q) == "tiled"


# ---------------------------------------------------------------------------------------------------------------
# The model

@pytest.mark.parametrize("selective", [False, True])
def test_causality(selective):
    model = tiny_model(selective=selective)
    idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    base, _ = model(idx, targets=idx)
    for t in (0, 1, 17, 39):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 7) % 61
        logits, _ = model(changed, targets=changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(logits[:, t:], base[:, t:]), "the change must be visible from position t on"


def zero_head0_queries(model):
    """Zero head 0's query projection: A_0 = 0, so S = relu(A_0) = 0 and F = 0 (selection off)."""
    head_dim = model.config.n_embd // model.config.n_head
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:head_dim] = 0
            block.attn.c_attn.bias[:head_dim] = 0


@pytest.mark.parametrize("path", ["tiled", "mask", "reference"])
def test_selection_off_equals_standard(path):
    standard, selective = tiny_model(selective=False), tiny_model(selective=True, attention=path)
    selective.load_state_dict(standard.state_dict())
    idx = torch.randint(0, 61, (2, 33), generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(standard(idx, targets=idx)[0], selective(idx, targets=idx)[0])
    zero_head0_queries(standard)
    zero_head0_queries(selective)
    torch.testing.assert_close(selective(idx, targets=idx)[0], standard(idx, targets=idx)[0])


def reorder_heads(model, order):
    """Every layer's heads in `order` (head order[0] first): the rows of c_attn's q, k and v, the columns of c_proj."""
    with torch.no_grad():
        for block in model.transformer.h:
            d, C = block.attn.head_dim, block.attn.c_proj.weight.size(0)
            cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in order])
            rows = torch.cat([cols + part * C for part in range(3)])  # q | k | v
            block.attn.c_attn.weight.copy_(block.attn.c_attn.weight[rows].clone())
            block.attn.c_attn.bias.copy_(block.attn.c_attn.bias[rows].clone())
            block.attn.c_proj.weight.copy_(block.attn.c_proj.weight[:, cols].clone())


def test_which_head_selects_is_a_label_that_reordering_the_heads_moves():
    """SPEC §1.1: reordering heads leaves a standard model's output unchanged, and makes the head moved first the
    selecting one."""
    standard = tiny_model(selective=False)
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(4))
    x = standard.transformer.wte(idx) + standard.transformer.wpe(torch.arange(20))  # layer 0's input
    q, k = (t.view(2, 20, 4, 8).transpose(1, 2)
            for t in standard.transformer.h[0].attn.c_attn(standard.transformer.h[0].ln_1(x)).split(32, dim=2)[:2])
    before = standard(idx, targets=idx)[0]
    reorder_heads(standard, [2, 0, 3, 1])
    torch.testing.assert_close(standard(idx, targets=idx)[0], before)
    selective = tiny_model(selective=True)
    selective.load_state_dict(standard.state_dict())
    F = selective.selective_masks(idx)[0][0]
    expected = selective_mask(head0_logits(q[:, 2:], k[:, 2:]).masked_fill(future_mask(20, "cpu"), float("-inf")))
    torch.testing.assert_close(F, expected.float())  # layer 0's F is the former head 2's
    assert F.max() > 1  # the test means something: that head masks


def test_standard_state_dict_loads_into_selective():
    standard, selective = tiny_model(selective=False), tiny_model(selective=True, seed=1)
    assert standard.state_dict().keys() == selective.state_dict().keys()
    selective.load_state_dict(standard.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(standard.state_dict().values(), selective.state_dict().values()))
    names = set(standard.state_dict())
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
            "lm_head.weight"} <= names


def decode_logits(model, idx, budgets=None, record=None, prompt=1):
    """Teacher-forced incremental decoding: the first `prompt` tokens in one parallel pass (prefill), then one token
    at a time; logits from the prompt's last position on, and in record each step's buffered positions per layer."""
    logits, state = model.prefill(idx[:, :prompt], budgets)
    steps = [logits]
    for t in range(prompt, idx.size(1) + 1):
        if record is not None:
            record.append([buffer.pos[:, :buffer.n].clone() for buffer in state["layers"]])
        if t < idx.size(1):
            steps.append(model.decode(idx[:, t:t + 1], state))
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("selective", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_bytes_per_key_is_what_the_buffers_hold(selective, autocast):
    """sample.py --prune reports the KV memory from it: k and v in the dtype they were computed in (bf16 under
    autocast, with float32 weights), positions and f; bench.py's decoding table counts the same bytes per key."""
    import bench
    model = tiny_model(selective, dtype=torch.float32)
    idx = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(3))
    budgets = 6 if selective else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.generate(idx, 4, top_k=1, budgets=budgets)
        _, state = model.prefill(idx, budgets=budgets)
    for buffer in state["layers"]:
        held = sum(t.nbytes for t in (buffer.k, buffer.v, buffer.pos, buffer.f) if t is not None)
        assert buffer.k.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert buffer.bytes_per_key() * 3 * buffer.k.size(2) == held
        assert buffer.bytes_per_key() == model.decode_stats["bytes_per_key"]
    in_use = [buffer.n for buffer in state["layers"]]  # 6 pruned, all 9 unpruned (of 48 slots)
    assert bench.kv_stats(state) == (max(in_use), sum(in_use) * 3 * state["layers"][0].bytes_per_key())


@pytest.mark.parametrize("selective", [False, True])
def test_kv_cache_generate_equals_full_forward(selective):
    model = tiny_model(selective=selective)
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=40, top_k=1)
    logits, _ = model(out[:, :-1], targets=out[:, 1:])
    assert torch.equal(logits.argmax(-1)[:, 4:], out[:, 5:]), "greedy decoding == argmax of the full forward"
    torch.testing.assert_close(decode_logits(model, out[:, :-1]), logits, rtol=1e-9, atol=1e-9)


def test_sampling_draws_from_the_top_k_and_temperature_scales_the_logits():
    model = tiny_model()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=40, temperature=2.0, top_k=3)
    logits, _ = model(out[:, :-1], targets=out[:, 1:])
    assert (logits.topk(3, dim=-1).indices[:, 4:] == out[:, 5:, None]).any(-1).all(), "only the 3 likeliest"
    assert not torch.equal(logits.argmax(-1)[:, 4:], out[:, 5:]), "and not only the likeliest"
    cold = model.generate(prompt, max_new_tokens=40, temperature=1e-3)  # softmax(logits / 1e-3): one-hot
    assert torch.equal(cold, model.generate(prompt, max_new_tokens=40, top_k=1))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: all tokens tie, as bf16 logits can
    assert (model.generate(prompt, max_new_tokens=5, top_k=1)[:, 5:] == 0).all(), "top_k=1 is argmax: no draw"


def test_budgets_at_least_T_give_the_unpruned_logits():
    model = tiny_model(attention="mask")  # the same path with and without budgets: exact equality
    idx = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(4))
    unpruned, _ = model(idx, targets=idx)
    for budgets in (30, 100, [30, 31, 64]):
        assert torch.equal(model(idx, targets=idx, budgets=budgets)[0], unpruned)
    assert not torch.allclose(model(idx, targets=idx, budgets=29)[0], unpruned)


@pytest.mark.parametrize("budgets", [2, 3, [2, 5, 3], [7, 2, 4], [12, 12, 2]])
@pytest.mark.parametrize("prompt_len", [1, 9])  # 9: the prompt's pass already evicts (§4.1), as in sample.py --prune
def test_pruned_decoding_equals_pruned_parallel_forward(budgets, prompt_len):
    model = tiny_model()
    prompt = torch.randint(0, 61, (2, prompt_len), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, max_new_tokens=40, top_k=1, budgets=budgets)
    parallel, _ = model(out[:, :-1], targets=out[:, 1:], budgets=budgets)
    assert torch.equal(parallel.argmax(-1)[:, prompt_len - 1:], out[:, prompt_len:])
    record = []
    torch.testing.assert_close(decode_logits(model, out[:, :-1], budgets, record, prompt_len),
                               parallel[:, prompt_len - 1:], rtol=1e-9, atol=1e-9)
    unpruned, _ = model(out[:, :-1], targets=out[:, 1:])
    assert not torch.allclose(parallel, unpruned), "these budgets must actually prune"
    # the buffers: BOS never leaves, no buffer exceeds its budget, an evicted key never comes back
    limits = model.layer_budgets(budgets)
    for layer, limit in enumerate(limits):
        evicted = [set() for _ in range(out.size(0))]
        previous = [set([0]) for _ in range(out.size(0))]
        for positions in record:
            for b in range(out.size(0)):
                now = set(positions[layer][b].tolist())
                assert 0 in now and len(now) <= limit and not (now & evicted[b])
                evicted[b] |= previous[b] - now
                previous[b] = now
        assert any(evicted), f"layer {layer} with budget {limit} should have evicted something"


def test_pruned_visibility_rules():
    """§4 by hand: evict the largest F, never BOS or the current token, ties to the oldest, never return."""
    T = 6
    F = torch.zeros(1, T, T)
    F[0, 3, 1], F[0, 3, 2] = 5.0, 5.0  # a tie at t = 3: key 1 (older) goes
    F[0, 4, 2], F[0, 4, 3] = 1.0, 9.0  # t = 4: key 3 has the largest F
    F[0, 5, 2] = 2.0
    F[0, 5, 5] = 50.0  # the model's F is 0 on the diagonal; the rule must hold for any F: t = 5 never leaves
    F[0, :, 0] = 100.0  # BOS would win, but is never evicted
    visible = pruned_visibility(F, budget=3)
    live = [set(torch.nonzero(visible[0, t]).flatten().tolist()) for t in range(T)]
    assert live == [{0}, {0, 1}, {0, 1, 2}, {0, 2, 3}, {0, 2, 4}, {0, 4, 5}]
    big = pruned_visibility(torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0)) * 3, budget=5)
    assert big[:, :, 0].all() and (big.sum(-1) <= 5).all()
    assert not (big[:, 1:] & ~big[:, :-1]).tril(-1).any(), "an evicted key never comes back"


def test_budget_errors():
    with pytest.raises(ValueError, match="selective model"):
        tiny_model(selective=False).generate(torch.zeros(1, 1, dtype=torch.long), 2, budgets=4)
    model = tiny_model()
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=">= 2"):
        model(idx, budgets=1)
    with pytest.raises(ValueError, match="3 layers"):
        model(idx, budgets=[4, 4])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="BOS and one token"):
        GPTConfig(block_size=1)


def test_prefill_frees_each_layers_F_before_the_next_layer_runs(monkeypatch):
    """A long prompt's F is B x T x T per layer: prefill builds each layer's buffer as the layer finishes, so one
    layer's F at most is alive (weak references to the earlier layers' F are dead when a layer starts)."""
    model, refs, alive = tiny_model(), [], []
    after_prompt, attend = selective_gpt.KVBuffer.after_prompt, CausalSelfAttention.forward

    def watched_after_prompt(*args):
        refs.append(weakref.ref(args[3]))  # F
        return after_prompt(*args)

    def watched_attend(self, *args, **kwargs):
        alive.append([ref() is not None for ref in refs])
        return attend(self, *args, **kwargs)
    monkeypatch.setattr(selective_gpt.KVBuffer, "after_prompt", watched_after_prompt)
    monkeypatch.setattr(CausalSelfAttention, "forward", watched_attend)
    model.prefill(torch.randint(1, 61, (2, 20), generator=torch.Generator().manual_seed(0)))
    assert alive == [[], [False], [False, False]]


def test_generate_past_block_size_keeps_memory_bounded():
    model = tiny_model(block_size=16)
    prompt = torch.zeros(2, 1, dtype=torch.long)
    out = model.generate(prompt, max_new_tokens=50, top_k=1)
    assert out.shape == (2, 51) and model.decode_stats["context"] == max(model.decode_stats["peak"]) == 16
    model.generate(torch.zeros(2, 20, dtype=torch.long), max_new_tokens=3, top_k=1, budgets=[3, 5, 4])
    assert model.decode_stats["context"] == 8 + 2, "a prompt above block_size: BOS + the latest 7, then 2 decoded"
    for budgets in (None, [100, 100, 100]):  # a buffer holds block_size keys at most: generate re-encodes there
        _, state = model.prefill(out[:, :12], budgets=budgets)
        assert [buffer.k.size(2) for buffer in state["layers"]] == [16] * 3
    out = model.generate(prompt, max_new_tokens=50, top_k=1, budgets=[3, 5, 4])
    assert out.shape == (2, 51) and model.decode_stats["peak"] == [3, 5, 4]
    _, state = model.prefill(out[:, :12], budgets=[3, 5, 4])
    for t in range(12, 15):  # a pruned buffer is allocated at its budget: a step's work does not grow with t
        model.decode(out[:, t:t + 1], state)
    assert [tuple(buffer.k.shape) for buffer in state["layers"]] == [(2, 4, K, 8) for K in (3, 5, 4)]
    # once positions 0-15 are cached (17 tokens), the context is re-encoded as BOS + the latest block_size // 2 - 1
    # = 7 tokens, and decoding goes on from there: the next tokens are those a fresh prompt of those 8 gives
    prompt = torch.cat([prompt, torch.randint(1, 61, (2, 11), generator=torch.Generator().manual_seed(6))], dim=1)
    for budgets in (None, [3, 5, 4]):
        out = model.generate(prompt, max_new_tokens=40, top_k=1, budgets=budgets)
        fresh = model.generate(torch.cat([out[:, :1], out[:, 10:17]], dim=1), max_new_tokens=8, top_k=1,
                               budgets=budgets)
        assert torch.equal(fresh[:, 8:], out[:, 17:25])


# ---------------------------------------------------------------------------------------------------------------
# §5: the memory loss

def test_memory_loss_by_hand():
    tau = 2.0
    T = 3
    F1 = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 5.0, 0]])  # query 2 has all but BOS... masked key 1 fully
    F2 = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 1.0, 0]])  # key 1 half masked for query 2
    # M_i = (i + 1) - sum_j min(F[i, j], tau) / tau ; layer 1: M = [1, 2, 3 - 1] -> max 2 ; layer 2: M = [1, 2, 2.5]
    expected = (2.0 + 2.5) / (2 * T)
    got = memory_loss([F1[None], F2[None]], tau)
    assert got.item() == pytest.approx(expected)
    batch = memory_loss([torch.stack([F1, F2]), torch.stack([F2, F2])], tau)  # averaged over the batch
    assert batch.item() == pytest.approx(((2.0 + 2.5) + (2.5 + 2.5)) / 2 / (2 * T))


def test_memory_loss_gradient_only_where_F_below_tau():
    tau = 1.0
    F = torch.tensor([[[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0.3, 2.0, 0]]], requires_grad=True)
    memory_loss([F], tau).backward()
    # the max is at the last query (M_3 = 4 - 1.3 = 2.7); its entries below tau get gradient, F = 2 >= tau does not
    grad = F.grad[0]
    assert grad[3, 1] != 0 and grad[3, 0] != 0
    assert grad[3, 2] == 0
    assert (grad[:3] == 0).all()
    assert ((grad != 0) <= (F.detach()[0] < tau)).all()


def test_model_memory_loss_weight():
    eps = 0.1
    model = tiny_model(memory_loss_weight=eps, memory_tau=1.0)
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(6))
    _, loss = model(idx, targets=idx)
    terms = model.loss_terms
    assert loss.item() == pytest.approx(terms["ce"].item() + eps * terms["mem"].item(), rel=1e-12)
    assert 0 < terms["mem"].item() <= 1.0
    plain = tiny_model(attention="mask")  # the memory loss's path, so that the CE gradients are the same
    _, plain_loss = plain(idx, targets=idx)
    assert plain_loss.item() == pytest.approx(terms["ce"].item(), rel=1e-9) and "mem" not in plain.loss_terms
    # the memory loss trains what makes F: head 0's query and key rows in every layer; in the last layer nothing else
    loss.backward()
    plain_loss.backward()
    d, n = model.config.n_embd // model.config.n_head, model.config.n_embd
    for with_mem, without in zip(model.transformer.h, plain.transformer.h):
        extra = with_mem.attn.c_attn.weight.grad - without.attn.c_attn.weight.grad
        assert extra[:d].abs().sum() > 0 and extra[n:n + d].abs().sum() > 0
    assert (extra[d:n] == 0).all() and (extra[n + d:] == 0).all()
    with pytest.raises(ValueError, match="selective"):
        GPTConfig(memory_loss_weight=0.1)


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping

def test_flops_and_mfu():
    standard, selective = tiny_model(selective=False), tiny_model(selective=True)
    cfg = standard.config
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
    assert standard.flops_per_token() == 6 * standard.get_num_params() + 6 * L * H * Q * T
    assert selective.flops_per_token() - standard.flops_per_token() == L * (3 * Q * T + T)
    assert standard.estimate_mfu(2, 1.0, peak_flops=1e9) == pytest.approx(standard.flops_per_token() * T * 2 / 1e9)
    assert standard.get_num_params() == sum(p.numel() for p in standard.parameters()) - T * cfg.n_embd


def test_configure_optimizers_decays_matrices_only():
    model = tiny_model(dtype=torch.float32)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("selective", [False, True])
def test_dropout_acts_in_training_only(selective):
    """--dropout drops attention weights and activations while training; in eval the model is the same model with
    dropout 0 (the attention's dropout is passed by hand, so nn.Module.eval() does not switch it off by itself)."""
    model = tiny_model(selective, dropout=0.2, attention="auto")
    plain = tiny_model(selective, dropout=0.0, attention="auto")
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(idx, targets=idx)[0], plain(idx, targets=idx)[0], rtol=0, atol=0)
    model.train()
    first, second = model(idx, targets=idx)[0], model(idx, targets=idx)[0]
    assert (first - second).abs().max() > 1e-3
    model.transformer.drop.p = 0.0  # now only the dropout of the attention weights is left
    for block in model.transformer.h:
        block.attn.resid_dropout.p = block.mlp.dropout.p = 0.0
    assert (model(idx, targets=idx)[0] - model(idx, targets=idx)[0]).abs().max() > 1e-3


def test_init_std_002_is_nanogpts_init_and_the_default_none_is_the_width_rule(monkeypatch):
    """§10: init_std 0.02 draws nanoGPT's init, the same draws in the same order (what model.apply(_init_weights)
    visits, then the residual projections), so earlier runs reproduce; None, the default, scales every draw to
    1 / sqrt(3 n_embd) (the residual projections to that over sqrt(2 n_layer))."""
    cfg = dict(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=48, bias=True)
    draws, normal_ = [], torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda p, mean=0.0, std=1.0, generator=None: draws.append(
        (p, std)) or normal_(p, mean, std, generator))
    torch.manual_seed(7)
    model = GPT(GPTConfig(**cfg, init_std=0.02))
    visited = []
    model.apply(visited.append)  # nanoGPT's order: children before parents
    weights = [m.weight for m in visited if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    c_proj = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    expected = [(id(p), 0.02) for p in weights] + [(id(p), 0.02 / math.sqrt(2 * 3)) for p in c_proj]
    assert [(id(p), std) for p, std in draws[-len(expected):]] == expected  # before them: nn.Embedding's own
    assert all((m.bias == 0).all() for m in visited if isinstance(m, torch.nn.Linear) and m.bias is not None)
    torch.manual_seed(7)
    width = GPT(GPTConfig(**cfg))
    rule = 1 / math.sqrt(3 * 48)
    for (name, a), b in zip(width.named_parameters(), model.parameters()):
        scale = rule / 0.02 if a.dim() == 2 else 1.0  # the same draws, scaled; LayerNorm gains and biases as they were
        torch.testing.assert_close(a, b * scale, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="init_std"):
        GPTConfig(init_std=0.0)


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernel, through Triton's interpreter on the CPU. Marked `triton`: python -m pytest -m triton (.ci/run
# runs them after the default run); only a change to the kernel needs them.

def triton_missing(test):
    return pytest.mark.triton(pytest.mark.skipif(kernels.triton is None, reason=f"{kernels.WHY_NO_TRITON}: the "
                                                 "Triton kernel was NOT tested")(test))


@triton_missing
@pytest.mark.parametrize("T", [1, 2, 17, 64, 100])
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_triton_kernel_matches_reference(T, D, blocks):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device).detach().requires_grad_() for t in random_qkv(B=2, H=3, T=T, D=D, seed=T + D))
    dy = torch.randn_like(q)
    tiles = None if blocks == "default" else (16, 16)
    want = grads_of(reference, q.double(), k.double(), v.double(), dy.double())
    got = grads_of(lambda a, b, c: kernels.triton_selective_attention(a, b, c, tiles), q, k, v, dy)
    tol = 1e-4 if device == "cpu" else 2e-2  # tf32 matmuls on a GPU
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=f"{name}")


@triton_missing
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Triton's CPU interpreter cannot load bfloat16: checked on CUDA only"))])
def test_triton_kernel_half_precision(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device, dtype).detach().requires_grad_() for t in random_qkv(B=2, H=2, T=40, D=32, seed=9))
    dy = torch.randn_like(q)
    want = grads_of(reference, q.double(), k.double(), v.double(), dy.double())
    got = grads_of(lambda a, b, c: kernels.triton_selective_attention(a, b, c, (16, 16)), q, k, v, dy)
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=0.05, atol=0.05, msg=name)


@triton_missing
def test_triton_path_compiles_without_graph_breaks_and_matches_eager():
    """train.py --compile on a GPU runs the Triton kernel inside torch.compile(fullgraph=True): its custom ops
    (fake shapes, the autograd rule that saves lse and the carries without gradients) trace, and values and
    gradients equal eager's; opcheck holds each op's fake outputs to its real ones (T = 40: ragged query tiles)."""
    q, k, v = random_qkv(B=1, H=2, T=40, D=16, seed=6)
    config = [16, 1, 4, 1]  # BN, G, warps, stages
    torch.library.opcheck(kernels.triton_forward, (q, k, v, 16, config, config))
    o, lse, carry = (t.detach() for t in kernels.triton_forward(q, k, v, 16, config, config))
    torch.library.opcheck(kernels.triton_backward, (torch.randn_like(o), *(t.detach() for t in (q, k, v)), o, lse,
                                                   carry, 16, config))
    dy = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(7))
    run = lambda a, b, c: kernels.triton_selective_attention(a, b, c, (16, 16))  # noqa: E731
    want = grads_of(run, q, k, v, dy)
    got = grads_of(torch.compile(run, fullgraph=True), q, k, v, dy)
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=name)


@triton_missing
def test_triton_memory_is_what_the_readme_counts():
    """README "On a GPU", memory: beyond q, k, v and dO, forward + backward hold at most o, the log-sum-exp, the
    carries, D, dq in float32 and in the input dtype, dk, dv and head 0's float32 dk share at once (X = one (B, H, T,
    d) tensor: 6.25 X and the small rows at H = 8). Counted from PyTorch's CPU allocator events (the interpreter's
    own numpy buffers are not PyTorch's; frees of blocks allocated before the count are left out, never subtracted).
    D's float32 copies of dO and O (6 X at once) broke it, and so did autograd's zero gradients for lse and the
    carries."""
    from torch.profiler import ProfilerActivity, profile
    B, H, T, D = 1, 8, 256, 32
    q, k, v = (t.half().requires_grad_() for t in random_qkv(B=B, H=H, T=T, D=D, seed=3, grad=False))
    dy = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(4)).half()

    def forward_backward():
        kernels.triton_selective_attention(q, k, v).backward(dy)
        q.grad = k.grad = v.grad = None
    forward_backward()  # the interpreter's first launches set things up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    peak = max(itertools.accumulate(n for _, n in events))
    X, f32 = q.numel() * q.element_size(), 4
    rows = B * H * T * f32  # the log-sum-exp; D
    carries = B * -(-T // kernels.triton_config(D, q.dtype).BM) * T * f32
    counted = X + rows + carries + rows + 2 * X + 2 * X + B * T * D * f32 + X  # o .. dq32, dk, dv, dk0, dq
    assert counted - X / 8 <= peak <= counted, (peak / X, counted / X)


@triton_missing
@pytest.mark.parametrize("heads", [(1, 1), (2, 4), (4, 2)])
def test_triton_head_groups_and_strided_inputs(heads):
    """A program may take G heads of one sequence (forward and backward choose G apart): any G gives the
    reference's values and gradients, head 0's selection gradient included, and q, k, v may be the transposed views
    of one projection that the model passes (no copies), as may the output's gradient (the model's heads merge by a
    transpose, so it arrives as a transposed view)."""
    B, H, T, D = 2, 4, 70, 16
    torch.manual_seed(5)
    qkv = torch.randn(B, T, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    dy = torch.randn(B, T, H, D).transpose(1, 2)
    assert not q.is_contiguous() and not dy.is_contiguous()
    want = grads_of(reference, q.double(), k.double(), v.double(), dy.double())
    got = grads_of(lambda a, b, c: kernels.triton_selective_attention(a, b, c, (16, 16), heads), q, k, v, dy)
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


@triton_missing
def test_triton_grids_keep_batch_and_heads_on_their_own_axes(monkeypatch):
    """CUDA caps a grid's second and third axes at 65,535 (the interpreter does not): every launch of a forward and
    backward puts the batch and the heads (or head groups) on those axes apart, never their product on one, so
    B = 8,192 with 16 heads still launches."""
    grids, launch = [], kernels.launch

    class Recorded:  # kernel[grid](...), with the grid noted
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]
    for name in ("_colsum_kernel", "_delta_kernel"):
        monkeypatch.setattr(kernels, name, Recorded(getattr(kernels, name)))
    monkeypatch.setattr(kernels, "launch", lambda kernel, tuned, grid, chosen, *args, **kw: (
        grids.append(grid(*chosen[:2])), launch(kernel, tuned, grid, chosen, *args, **kw)))
    B, H, T, D = 3, 4, 40, 16
    q, k, v = random_qkv(B, H, T, D)
    kernels.triton_selective_attention(q, k, v, (16, 16), (1, 2)).sum().backward()
    assert len(grids) == 4  # the column sums, the forward; D, the backward
    assert all(grid[1] <= B and all(n <= H for n in grid[2:]) for grid in grids), grids


@triton_missing
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the autotuner in Triton's CPU interpreter")
@pytest.mark.parametrize("dtype, D, tol", [(torch.float32, 16, 1e-4), (torch.float16, 64, 5e-2),
                                           (torch.float32, 128, 1e-4)])
def test_triton_autotuner_tries_every_candidate_and_keeps_the_fastest(monkeypatch, dtype, D, tol):
    """On a GPU the autotuner times each pass's launchable candidates and keeps the fastest. Here, in the
    interpreter, a stand-in clock ranks them: every candidate runs once, the one ranked fastest is kept, and the
    gradients are still the reference's although every backward trial adds into dq and dk0 (zeroed before each:
    without reset_to_zero dq would come out several times too large). Every candidate of the float32 and fp16
    tables runs here (bf16 compiles as fp16 does; the interpreter cannot load it)."""
    B, H, T = 1, 6, 70  # H = 6: candidates with G = 4 run with G = 2
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in random_qkv(B=B, H=H, T=T, D=D, seed=3))
    dy = torch.randn_like(q)
    tried, kept = {}, {}
    for which in ("fwd", "bwd"):
        tuned = getattr(kernels, f"_{which}_tuned")
        candidates = [c[:4] for c in kernels.launchable(getattr(kernels.triton_config(D, q.dtype), which), H)]
        tried[which], kept[which] = [], candidates[-1]  # the stand-in clock ranks the last candidate fastest

        def trial(*args, config, which=which, run_once=tuned._bench, **meta):
            tried[which].append((config.kwargs["BN"], config.kwargs["G"], config.num_warps, config.num_stages))
            run_once(*args, config=config, **meta)
            return [1.0 if tried[which][-1] == kept[which] else 2.0] * 3

        monkeypatch.setattr(tuned, "cache", {})  # nothing tuned before
        monkeypatch.setattr(tuned, "_do_bench", lambda run, quantiles: run() or [0.0] * 3)  # run each trial once
        monkeypatch.setattr(tuned, "_bench", trial)
        assert len(candidates) > 1
        tried[which + " candidates"] = candidates
    want = grads_of(reference, q.double(), k.double(), v.double(), dy.double())
    got = grads_of(lambda a, b, c: kernels.triton_selective_attention(a, b, c, autotune=True), q, k, v, dy)
    for which in ("fwd", "bwd"):
        assert tried[which] == tried[which + " candidates"], which
        best = getattr(kernels, f"_{which}_tuned").best_config
        assert (best.kwargs["BN"], best.kwargs["G"], best.num_warps, best.num_stages) == kept[which]
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=name)


@triton_missing
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 and float32 in Triton's CPU interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_triton_every_launch_configuration_matches_the_reference(dtype, D):
    """Every candidate of TRITON_CONFIGS, forward and backward (the autotuner may keep any of them on a GPU), gives
    the reference's values and gradients; T = 200 leaves the last query and key tiles ragged, and the key tiles of
    128 span two query tiles of 64. (bf16 compiles as fp16 does; the interpreter cannot load it.)"""
    B, H, T = 1, 4, 200
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in random_qkv(B=B, H=H, T=T, D=D, seed=D))
    dy = torch.randn_like(q)
    want = grads_of(reference, q.double(), k.double(), v.double(), dy.double())
    cfg = kernels.triton_config(D, dtype)
    fwd, bwd = ([list(c[:4]) for c in kernels.launchable(getattr(cfg, which), H)] for which in ("fwd", "bwd"))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for i in range(max(len(fwd), len(bwd))):
        fwd_pass, bwd_pass = fwd[min(i, len(fwd) - 1)], bwd[min(i, len(bwd) - 1)]
        got = grads_of(lambda a, b, c: kernels.triton_forward(a, b, c, cfg.BM, fwd_pass, bwd_pass)[0], q, k, v, dy)
        for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol,
                                       msg=f"{name}, forward {fwd_pass}, backward {bwd_pass}")


@pytest.fixture
def tf32_dots(monkeypatch):
    """Triton's interpreter computes every float32 tl.dot exactly; a GPU rounds the inputs of a 'tf32' dot to
    TF32 (10 mantissa bits) and splits those of a 'tf32x3' dot into two TF32 halves. Emulate both."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    def tf32(x):
        u = x.astype(np.float32).view(np.uint32)
        return ((u + np.uint32(0x0FFF) + ((u >> 13) & 1)) & np.uint32(0xFFFFE000)).view(np.float32)

    exact = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or input_precision == ir.INPUT_PRECISION.IEEE:
            return exact(self, a, b, d, input_precision, max_num_imprecise_acc)
        a_hi, b_hi = tf32(a.data), tf32(b.data)
        out = np.matmul(a_hi, b_hi)
        if input_precision == ir.INPUT_PRECISION.TF32x3:
            out += np.matmul(a_hi, tf32(b.data - b_hi)) + np.matmul(tf32(a.data - a_hi), b_hi)
        return interpreter.TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


@triton_missing
@pytest.mark.skipif(torch.cuda.is_available(), reason="emulates a GPU's TF32 in Triton's CPU interpreter")
@pytest.mark.parametrize("precision, tol", [("high", 2e-2), ("highest", 1e-4)])
@pytest.mark.parametrize("T, D", [(100, 16), (64, 32)])
def test_triton_float32_under_tf32(tf32_dots, precision, tol, T, D):
    """float32 inputs on a GPU: with TF32 allowed ('high') the attention's dots may round to TF32, but the
    selection dot may not: a rounded head-0 logit flips sign near 0, and with it S and the ReLU's gradient (plain
    TF32 there put head 0's dq 43x and dk 22x outside this tolerance). At 'highest', every dot is tf32x3 and the
    kernel is as exact as in float32."""
    tf32_dots(precision)
    q, k, v = (t.detach().requires_grad_() for t in random_qkv(B=2, H=3, T=T, D=D, seed=T + D))
    dy = torch.randn_like(q)
    want = grads_of(reference, q.double(), k.double(), v.double(), dy.double())
    got = grads_of(kernels.triton_selective_attention, q, k, v, dy)
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        for h in range(3):  # head 0 apart: its dq and dk carry the selection gradient
            torch.testing.assert_close(g[:, h].double(), w[:, h], rtol=tol, atol=tol, msg=f"{name}, head {h}")


@pytest.mark.triton
@pytest.mark.skipif(kernels.triton is None, reason=f"{kernels.WHY_NO_TRITON}: the GPU compile was NOT checked")
def test_triton_kernels_compile_for_sm90():
    """Every launch configuration (each pass's every autotuning candidate) compiles for an H100/H200 (sm_90) here,
    without a GPU, and fits its shared memory; `python bench.py compile` prints the table (registers, spills,
    instructions per tile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"compile-{os.getpid()}.json")
    run = subprocess.run([sys.executable, "bench.py", "compile", "--json", out], env=env, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    print(run.stdout)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out) as f:
        rows = json.load(f)["results"]
    os.remove(out)
    assert {(r["dtype"], r["BD"]) for r in rows} == {(str(d).removeprefix("torch."), BD)
                                                      for d, BD in kernels.TRITON_CONFIGS}
    assert len(rows) == sum(2 + len(cfg.fwd) + len(cfg.bwd) for cfg in kernels.TRITON_CONFIGS.values())
    for r in rows:
        assert "error" not in r, r
        assert r["shared"] <= 227 * 1024, r
        if r["kernel"] in ("fwd", "bwd"):  # the figure checked before a launch covers what the kernel compiled to
            declared = getattr(kernels.TRITON_CONFIGS[getattr(torch, r["dtype"]), r["BD"]], r["kernel"])
            assert r["shared"] <= 1024 * declared[r["candidate"]].shared_kb == 1024 * r["declared_kb"], r
        if r["kernel"] != "delta":  # (a row sum: no dots)
            assert r["loop_mma"] > 0, r  # the dots run on the tensor cores
    # kernels.py's rule for the candidate used untimed (the first): for bf16/fp16, the fewest instructions per head
    # and tile (bench.py's proxy) among the candidates that spill under 2 KB
    import bench
    for (dtype, BD), cfg in kernels.TRITON_CONFIGS.items():
        for name in ("fwd", "bwd") if dtype != torch.float32 else ():
            same = [r for r in rows if (r["dtype"], r["BD"], r["kernel"]) == (str(dtype).removeprefix("torch."), BD,
                                                                             name)]
            cost = {r["candidate"]: bench.tile_cost(r) for r in same if r["spill_bytes"] < 2048}
            assert min(cost, key=cost.get) == 0, (dtype, BD, name, cost)


def test_triton_refuses_what_no_gpu_compiles():
    """Tile sizes below 16 or not powers of two run only in the interpreter; head dims over 128 outgrow shared
    memory, and so does any configuration on a GPU with less shared memory per block than it needs: all are refused
    with a message (on CUDA, 'auto' then picks the mask path)."""
    for BM, BN in ((8, 16), (16, 24), (48, 64)):
        with pytest.raises(ValueError, match="power of two and at least 16"):
            kernels.check_blocks(BM, BN)
        with pytest.raises(ValueError, match="power of two and at least 16"):
            kernels.triton_selective_attention(*random_qkv(B=1, H=1, T=4, D=16), (BM, BN))
    kernels.check_blocks(16, 128)
    for cfg in kernels.TRITON_CONFIGS.values():  # every candidate the autotuner may launch
        for c in cfg.fwd + cfg.bwd:
            kernels.check_blocks(cfg.BM, c.BN)
    assert kernels.triton_refuses(128, torch.bfloat16) is None
    assert "head_dim <= 128, got 256" in kernels.triton_refuses(256, torch.bfloat16)
    assert "float64" in kernels.triton_refuses(64, torch.float64)
    assert [kernels.heads_per_program(H, G) for H, G in ((3, 3), (12, 4), (6, 4), (8, 6))] == [1, 4, 2, 4]
    assert [kernels.padded_head_dim(D) for D in (1, 16, 17, 33, 64, 65, 128)] == [16, 16, 32, 64, 64, 128, 128]
    assert kernels.triton_refuses(64, torch.bfloat16, shared_limit=227 * 1024) is None
    # the smallest candidates of bf16 d 64 need 56 KB (forward) and 72 KB (backward): a GPU with 72 KB runs them
    assert kernels.triton_refuses(64, torch.bfloat16, shared_limit=72 * 1024) is None
    assert "needs 72 KB of shared memory" in kernels.triton_refuses(64, torch.bfloat16, shared_limit=71 * 1024)
    with pytest.raises(ValueError, match="head_dim <= 128, got 256.*attention='mask'"):  # called directly
        kernels.triton_selective_attention(*random_qkv(B=1, H=1, T=4, D=256))
    bwd = kernels.TRITON_CONFIGS[torch.bfloat16, 64].bwd
    assert kernels.launchable(bwd, H=8, shared_limit=110 * 1024) == [bwd[1], bwd[3], bwd[4]]
    # H = 6: G = 4 is lowered to 2, and the third candidate, then the same as the second, is dropped
    assert [c[:4] for c in kernels.launchable(bwd, H=6)] == [(32, 2, 8, 2), (64, 2, 8, 1), (64, 1, 8, 1)]
    assert [c[:4] for c in kernels.launchable(bwd, H=6, shared_limit=140 * 1024)] == [(64, 2, 8, 1), (32, 2, 8, 2),
                                                                                       (64, 1, 8, 1)]


def test_spec_sections_cited_in_the_code_exist():
    """Every §N / §N.M the code and docs cite is a section of docs/SPEC.md, or of docs/KERNEL.md where they say so."""
    here = os.path.dirname(os.path.abspath(__file__))
    sections, cited = {}, {"SPEC": set(), "KERNEL": set()}
    for doc in cited:
        with open(os.path.join(here, "docs", f"{doc}.md")) as f:
            sections[doc] = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", f.read(), flags=re.M))
    docs = [os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(here, "docs")))]
    for name in sorted(os.listdir(here)) + docs:
        if name.endswith((".py", ".md")):
            with open(os.path.join(here, name), encoding="utf-8") as f:
                for kernel, section in re.findall(r"(KERNEL\.md )?§ ?(\d+(?:\.\d+)?)", f.read()):
                    cited["KERNEL" if kernel else "SPEC"].add(section)
    assert {"1", "1.3", "4", "10"} <= cited["SPEC"] and {"1", "2"} <= cited["KERNEL"]
    for doc in cited:
        assert cited[doc] <= sections[doc], (doc, cited[doc] - sections[doc])


def markdown_outside_code(path):
    with open(path, encoding="utf-8") as f:
        return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", f.read(), flags=re.S))


def heading_anchors(path):
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation dropped, spaces to hyphens,
    -1, -2, ... after a repeated one."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    seen, anchors = collections.Counter(), set()
    for heading in re.findall(r"^#{1,6} (.*)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def test_every_link_in_the_readme_and_docs_leads_somewhere():
    """Each relative link of README.md and docs/*.md names a file of the repository and, with a #fragment into a
    markdown file, one of its headings."""
    here = os.path.dirname(os.path.abspath(__file__))
    pages = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(here, "docs")))
                             if n.endswith(".md")]
    broken, checked = [], 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", markdown_outside_code(os.path.join(here, page))):
            if re.match(r"[a-z]+:", target):  # https: and the like
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(here, os.path.dirname(page), path)) if path else \
                os.path.join(here, page)
            if not os.path.exists(full) or (anchor and full.endswith(".md") and anchor not in heading_anchors(full)):
                broken.append(f"{page}: {target}")
    assert checked > 50 and not broken, broken


def test_readme_shows_selective_mask_as_it_is():
    """The README's excerpt of the mechanism is selective_gpt.selective_mask's code, docstring left out."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = inspect.getsource(selective_mask)
    code = re.sub(r'    """.*?"""\n', "", code, count=1, flags=re.S)
    with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
        assert code.strip() in f.read()


def test_ci_runs_the_readmes_test_commands_as_written():
    """Every `python -m pytest` line of the README's command blocks is a command .ci/run runs, word for word."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
        blocks = "".join(re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S))
    with open(os.path.join(here, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.split(" || ")[0].strip() for line in f]
    readme = [line.strip() for line in blocks.splitlines() if line.startswith("python -m pytest")]
    assert readme and all(line in ci for line in readme), (readme, ci)


def test_selective_model_warns_about_an_unguarded_optimiser():
    """§8: beta2 > 0.99 without gradient clipping is named at training time; either guard silences it."""
    model = tiny_model(dtype=torch.float32)
    with pytest.warns(UserWarning, match="clip the gradient norm"):
        model.configure_optimizers(0.1, 1e-3, (0.9, 0.999), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.configure_optimizers(0.1, 1e-3, (0.9, 0.999), "cpu", grad_clip=1.0)
        model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
        tiny_model(selective=False, dtype=torch.float32).configure_optimizers(0.1, 1e-3, (0.9, 0.999), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Properties over random small models and inputs (hypothesis): shapes, weights large enough that selection is
# active, prompts, and per-layer budgets from 2 (BOS and the current token) to past T.

@st.composite
def small_models(draw):
    """A float64 selective model with head 0's logits scaled up (so that F is far from 0) and its vocabulary."""
    n_head = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    n_layer = draw(st.integers(1, 3))
    attention = draw(st.sampled_from(["tiled", "mask", "reference"]))
    return tiny_model(n_head=n_head, n_embd=n_head * head_dim, n_layer=n_layer, block_size=24, vocab_size=17,
                      seed=draw(st.integers(0, 2 ** 16)), attention=attention)


@st.composite
def prompts_and_budgets(draw, model):
    T = draw(st.integers(2, 24))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(1, 17, (2, T - 1), generator=g)], dim=1)
    budgets = draw(st.lists(st.integers(2, T + 3), min_size=model.config.n_layer, max_size=model.config.n_layer))
    return idx, budgets


@settings(max_examples=15)
@given(st.data())
def test_property_pruned_decoding_equals_the_pruned_parallel_pass_and_buffers_obey_section_4(data):
    model = data.draw(small_models())
    idx, budgets = data.draw(prompts_and_budgets(model))
    prompt = data.draw(st.integers(1, idx.size(1)))  # sample.py --prune prefills the whole prompt, pruned (§4.1)
    record = []
    parallel, _ = model(idx, targets=idx, budgets=budgets)
    torch.testing.assert_close(decode_logits(model, idx, budgets, record, prompt), parallel[:, prompt - 1:],
                               rtol=1e-9, atol=1e-9)
    for layer, budget in enumerate(budgets):
        gone = [set() for _ in range(idx.size(0))]
        before = [{0} for _ in range(idx.size(0))]
        for positions in record:
            for b, now in enumerate(set(p.tolist()) for p in positions[layer]):
                assert 0 in now and len(now) <= budget and not now & gone[b]  # BOS stays, bounded, no return
                gone[b] |= before[b] - now
                before[b] = now


@settings(max_examples=25)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 40), D=st.sampled_from([1, 4, 8]),
       scale=st.floats(0.5, 3.0), seed=st.integers(0, 2 ** 16), path=st.sampled_from(["mask", "tiled", "chunks"]),
       rows=st.integers(1, 40))
def test_property_every_attention_path_equals_the_reference(B, H, T, D, scale, seed, path, rows):
    """'chunks': the CPU tiled path with `rows` query rows per chunk (its own choice is one chunk at these T), so
    that the carries between chunks are drawn too."""
    q, k, v = (t.detach().mul(scale).requires_grad_() for t in random_qkv(B, H, T, D, torch.float64, seed))
    dy = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    want = grads_of(reference, q, k, v, dy)
    if path == "chunks":
        got = grads_of(lambda a, b, c: kernels.chunked_selective_attention(a, b, c, rows), q, k, v, dy)
    else:
        got = grads_of(lambda a, b, c: selective_attention(a, b, c, attention=path), q, k, v, dy)
    for name, w, g in zip(["y", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9, msg=f"{path} {name}")


@settings(max_examples=15)
@given(st.data())
def test_property_causality_under_random_edits(data):
    model = data.draw(small_models())
    idx, _ = data.draw(prompts_and_budgets(model))
    T = idx.size(1)
    t = data.draw(st.integers(1, T - 1))
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + data.draw(st.integers(1, 16))) % 17
    base, _ = model(idx, targets=idx)
    after, _ = model(changed, targets=changed)
    torch.testing.assert_close(after[:, :t], base[:, :t], rtol=1e-12, atol=1e-12)


@settings(max_examples=30)
@given(L=st.integers(1, 3), B=st.integers(1, 3), T=st.integers(1, 9), tau=st.floats(0.25, 3.0),
       seed=st.integers(0, 2 ** 16))
def test_property_memory_loss_is_its_definition_and_has_no_gradient_where_F_passes_tau(L, B, T, tau, seed):
    g = torch.Generator().manual_seed(seed)
    Fs = [(torch.rand(B, T, T, generator=g, dtype=torch.float64) * 2 * tau).tril(-1).requires_grad_() for _ in
          range(L)]
    by_definition = 0.0
    for b in range(B):
        for F in Fs:  # §5, with loops: max over queries of (i + 1) - sum_{j <= i} min(F[i, j], tau) / tau
            by_definition += max((i + 1) - sum(min(F[b, i, j].item(), tau) for j in range(i + 1)) / tau
                                 for i in range(T)) / (L * T) / B
    loss = memory_loss(Fs, tau)
    assert loss.item() == pytest.approx(by_definition, rel=1e-12, abs=1e-12)
    loss.backward()
    for F in Fs:
        assert (F.grad[F.detach() > tau] == 0).all()


@settings(max_examples=15)
@given(st.data())
def test_property_selection_off_equals_standard(data):
    selective = data.draw(small_models())
    config = dict(vars(selective.config), selective=False)
    standard = GPT(GPTConfig(**config)).to(torch.float64).eval()
    standard.load_state_dict(selective.state_dict())
    zero_head0_queries(standard)
    zero_head0_queries(selective)
    idx, _ = data.draw(prompts_and_budgets(selective))
    torch.testing.assert_close(selective(idx, targets=idx)[0], standard(idx, targets=idx)[0], rtol=1e-12, atol=1e-12)
