r"""
The tiled fast paths of selective attention (the 'tiled' path of selective_gpt.selective_attention); everything here
is checked against selective_gpt.selective_attention_reference by test_selective.py.

  tiled_selective_attention(q, k, v)   selective attention that never keeps H x T x T logits:
      CUDA (triton 3.9 or newer): a Triton kernel, forward and backward (docs/KERNEL.md). No T x T tensor at all.
      CPU: query chunks: per chunk one scaled_dot_product_attention call with the float mask -F (forward), and a
           backward that walks the chunks last to first, recomputing each chunk's probabilities and adding the
           gradient through F. No T x T tensor either way.

Both tile the queries the same way (docs/SPEC.md §7, docs/KERNEL.md): for query tile I,
F[i, j] = C_I[j] + sum_{k in I, k < i} S[k, j], where the carry C_I[j] = sum_{k < i0} S[k, j] holds the column
sums of S over all earlier tiles, so F never needs to exist beyond one tile:

          keys j ->
        +--------------------+
        |\                   |   rows above tile I: summed into the carry C_I (one number per key column)
        | \                  |
        |--\-----------------|
     I  |   \  S tile        |   F on the tile = C_I + exclusive running sum of S down the tile's rows
        |----\---------------|
        |     \              |
        +--------------------+
"""

import collections
import math
import re
from typing import Sequence  # torch 2.4's custom_op takes typing's Sequence[int], not list[int]

import torch
from torch.nn import functional as nnf

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it CUDA uses the 'mask' path
    triton = None

TRITON_OLDEST = (3, 9)  # the oldest Triton all of the kernel's tests pass on (triton_unusable)


def triton_unusable(module):
    """module: the imported triton, or None where it is not installed. Returns why the Triton kernel cannot use it, or
    None where it can. The kernel's tests fail on older ones: in the CPU interpreter 3.0 and 3.1 compute wrong outputs,
    3.2 and 3.3 cannot import this file without a GPU; 3.4 computes right there, but it, 3.6 and 3.8 compile some launch
    candidates for sm_90 to more shared memory than TRITON_CONFIGS declares (3.8: 96 KB against 80), and the declared
    figure decides what a GPU may launch. So an older Triton is left unused, as if it were not installed: 'auto' takes
    the mask path."""
    if module is None:
        return "triton is not installed (pip install triton)"
    version = tuple(int(part) for part in re.findall(r"\d+", module.__version__)[:2])
    if len(version) < 2:
        return f"cannot read triton's version {module.__version__!r} (pip install -U triton)"
    if version < TRITON_OLDEST:
        return (f"triton {module.__version__} is older than {'.'.join(map(str, TRITON_OLDEST))}, the oldest the "
                f"Triton kernel is tested on (pip install -U triton)")
    return None


WHY_NO_TRITON = triton_unusable(triton)  # None: the Triton kernel is available
if WHY_NO_TRITON:
    triton = None


def why_not_tiled(q, dropout_p=0.0):
    """Whether tiled_selective_attention runs these inputs: None if it does, else why not (the one place that says;
    on CUDA it asks triton_refuses for the Triton kernel's own limits)."""
    if dropout_p > 0:
        return "it has no dropout"
    if q.device.type == "cuda":
        if triton is None:
            return WHY_NO_TRITON
        return triton_refuses(q.size(-1), q.dtype, shared_memory_limit(q.device))
    return None if q.device.type == "cpu" else f"it has no kernel for {q.device.type}"


TRITON_MAX_HEAD_DIM = 128  # beyond it the tiles of q, k, v and dO outgrow an H100's 227 KB of shared memory


def triton_refuses(head_dim, dtype, shared_limit=None):
    """Why the Triton kernel cannot take this head dim and dtype (on a GPU whose blocks may use shared_limit bytes
    of shared memory), or None."""
    if dtype == torch.float64:
        return "it has no float64 kernel"
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"the Triton kernel takes head_dim <= {TRITON_MAX_HEAD_DIM}, got {head_dim}"
    cfg = triton_config(head_dim, dtype)
    need = max(min(c.shared_kb for c in cfg.fwd), min(c.shared_kb for c in cfg.bwd)) * 1024  # the smallest that run
    if shared_limit is not None and need > shared_limit:
        return (f"the Triton kernel needs {need // 1024} KB of shared memory per block for {dtype} and head_dim "
                f"{head_dim}; this GPU allows {shared_limit // 1024} KB")
    return None


def shared_memory_limit(device):
    """The shared memory one block may use on this CUDA device, in bytes (None where torch does not say)."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def tiled_selective_attention(q, k, v):
    """Selective attention (SPEC §1) of q, k, v: (B, H, T, head_dim) without H x T x T logits; returns y like q."""
    if q.device.type == "cuda":
        return triton_selective_attention(q, k, v)
    return chunked_selective_attention(q, k, v)


# ----------------------------------------------------------------------------------------------------------------
# CPU: query chunks, forward and backward.
#
# Forward: for each chunk of C query rows, -F on the chunk (C x keys, from the carry) is the float mask of one
# scaled_dot_product_attention call over the chunk's queries and the keys up to its last row: no T x T tensor, and
# PyTorch's fused CPU kernel does the softmax. The stock SDPA backward cannot return the gradient of a float mask on
# the CPU (asked for one, PyTorch falls back to its math kernel and keeps all H x T x T probabilities), so the
# backward walks the chunks from last to first; for each it recomputes the (H, C, keys) probabilities with batched
# matmuls and softmax, takes dq, dk, dv as FlashAttention does, and the gradient through F (docs/KERNEL.md):
#   dF = -sum_h dZ_h,  dS[k, j] = sum_{i > k} dF[i, j]  (a running column sum R over later chunks + the running
#   sum inside the chunk, running_sum),  dA_0 += dS where S > 0,  into head 0's q and k.
# Precision: S, F, the carries, the logits and the softmax are float32 (float64 stays float64); under bf16/fp16 the
# other four matmuls of the backward (dv, dP, dq, dk) take bf16/fp16 operands, as FlashAttention's do, and their
# sums over the chunks are float32.

def chunk_rows(T, H):
    """Rows per query chunk: 256 while the backward's (H, 256, T) float32 block fits in 2 MiB, else 128 (fewer rows
    make more, smaller matmuls; the measurements behind both numbers: docs/PERFORMANCE.md)."""
    return 256 if H * 256 * T * 4 <= 2 ** 21 else 128


def selection(q0, k0, r0, r1, scale):
    """S on the chunk of query rows r0:r1 against keys 0:r1 of one sequence, float32 (c, r1)."""
    S = torch.mm(q0[r0:r1], k0[:r1].t()).mul_(scale).clamp_(min=0)  # §1.1 relu of head 0's logits
    S[:, r0:].tril_(-1)  # strictly below the diagonal: never the future (§1.1), never itself (§1.2)
    S[:, 0] = 0  # §1.2 never BOS
    return S


def minus_F(S, carry, r1):
    """-F on a chunk of c query rows ending at r1, (c, r1), from its S and the carry: carry[j] = sum of S[k, j] over
    the rows before the chunk (§1.3 split at the chunk). The causal mask is the caller's to add."""
    return running_sum(S).add_(carry[:r1]).neg_()  # -(carry + sum_{k < i} S[k])


def running_sum(X, reverse=False, block=16):
    """The exclusive running sum of X (c, n) down its rows, or up them (reverse): out[i] = the sum of X[k] over k < i
    (k > i). As triangular matmuls in blocks of `block` rows: inside each block a (block x block) one, across blocks
    the blocks' sums; one (c x c) triangular matmul would do c / block times the multiplications (timings:
    docs/PERFORMANCE.md)."""
    c, n = X.shape
    b = block if c % block == 0 else c  # rows not a multiple of block (a ragged last chunk): one block
    m = c // b
    triangle = torch.ones(b, b, dtype=X.dtype)
    out = torch.matmul((triangle.triu_(1) if reverse else triangle.tril_(-1)), X.view(m, b, n))  # inside blocks
    if m > 1:
        blocks = torch.ones(m, m, dtype=X.dtype)
        out += torch.mm(blocks.triu_(1) if reverse else blocks.tril_(-1), X.view(m, b, n).sum(1)).unsqueeze(1)
    return out.view(c, n)


def carries_of(q0, k0, C, scale):
    """The carry of every chunk of C rows, (chunks, T): the same sums in the same order as the forward's walk, so
    the backward sees F bit for bit as the forward did."""
    T = q0.size(0)
    carries = torch.zeros(-(-T // C), T, dtype=q0.dtype)
    for n, r0 in enumerate(range(0, T - C, C)):
        torch.add(carries[n], nnf.pad(selection(q0, k0, r0, r0 + C, scale).sum(0), (0, T - r0 - C)),
                  out=carries[n + 1])
    return carries


def chunked_selective_attention(q, k, v, rows=None):
    """The CPU path as a differentiable function; rows: query rows per chunk (default: chunk_rows)."""
    return chunked_forward(q, k, v, rows or chunk_rows(q.size(2), q.size(1)))


# torch.library custom ops: torch.compile sees each as one opaque op (no graph break), autograd pairs them.
@torch.library.custom_op("selective_gpt::chunked_forward", mutates_args=())
def chunked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    return forward_chunks(q, k, v, rows)


@torch.autocast("cpu", enabled=False)  # the dtypes here are chosen, not autocast
def forward_chunks(q, k, v, C):
    """chunked_forward's work as a plain function (a test watches every tensor it makes): per chunk of C query
    rows, -F (C x keys) and one SDPA call for every head."""
    B, H, T, d = q.shape
    scale = 1.0 / math.sqrt(d)
    f32 = torch.promote_types(q.dtype, torch.float32)  # S, F and the carry: float32 at least
    y = torch.empty(B, H, T, d, dtype=q.dtype)
    for b in range(B):
        q0, k0 = q[b, 0].to(f32), k[b, 0].to(f32)
        carry = torch.zeros(T, dtype=f32)  # column sums of S over the rows above the chunk
        for r0 in range(0, T, C):
            r1 = min(T, r0 + C)
            S = selection(q0, k0, r0, r1, scale)
            neg_F = minus_F(S, carry, r1)
            neg_F[:, r0:].masked_fill_(torch.ones(r1 - r0, r1 - r0, dtype=torch.bool).triu_(1), float("-inf"))
            if r1 < T:
                carry[:r1] += S.sum(0)
            # every head in one call; 4-d inputs: with 3-d ones PyTorch takes its math kernel, not the fused one
            y[b:b + 1, :, r0:r1] = nnf.scaled_dot_product_attention(q[b:b + 1, :, r0:r1], k[b:b + 1, :, :r1],
                                                                    v[b:b + 1, :, :r1], attn_mask=neg_F)
    return y


@chunked_forward.register_fake
def _(q, k, v, rows):
    return q.new_empty(q.shape)


@torch.library.custom_op("selective_gpt::chunked_backward", mutates_args=())
def chunked_backward(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_chunks(dy, q, k, v, rows)


@torch.autocast("cpu", enabled=False)  # the dtypes here are chosen, not autocast
def backward_chunks(dy, q, k, v, C):
    """chunked_backward's work as a plain function: the chunks of C query rows, last to first."""
    B, H, T, d = q.shape
    scale = 1.0 / math.sqrt(d)
    f32 = torch.promote_types(q.dtype, torch.float32)  # S, F, the logits, the softmax, every sum
    low = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else f32  # the operands of dv, dP, dq, dk
    dq, dk, dv = (torch.empty(B, H, T, d, dtype=t.dtype) for t in (q, k, v))
    dk_b, dv_b = torch.zeros(H, T, d, dtype=f32), torch.zeros(H, T, d, dtype=f32)  # one sequence's sums, float32
    logits = torch.empty(H * C * T, dtype=f32)  # chunk buffers, reused: no large allocation per chunk
    probs = torch.empty(H * C * T, dtype=f32)
    low_buf = torch.empty(H * C * T, dtype=low) if low != f32 else None  # P, then dP, then dZ in bf16/fp16
    partial = torch.empty(H * T * d, dtype=low)
    future = torch.ones(C, C, dtype=torch.bool).triu_(1)  # future[i, j] = key j comes after query i
    for b in range(B):
        k32 = k[b].to(f32)  # the logits and S: float32
        q0 = q[b, 0].to(f32)
        kl, vl, dyl = (t[b].to(low) for t in (k, v, dy))
        carries = carries_of(q0, k32[0], C, scale)
        R = torch.zeros(T, dtype=f32)  # R[j] = sum of dF[i, j] over the rows of the chunks already walked
        dk_b.zero_()
        dv_b.zero_()
        for n in reversed(range(carries.size(0))):
            r0 = n * C
            r1 = min(T, r0 + C)
            c = r1 - r0
            S = selection(q0, k32[0], r0, r1, scale)
            A = logits[:H * c * r1].view(H, c, r1)
            P = probs[:H * c * r1].view(H, c, r1)
            q_rows = q[b, :, r0:r1]
            neg_F = minus_F(S, carries[n], r1)
            neg_F[:, r0:].masked_fill_(future[:c, :c], float("-inf"))  # causal, once for every head
            torch.baddbmm(neg_F, q_rows.to(f32), k32[:, :r1].transpose(1, 2), alpha=scale, out=A)  # A_h - F
            torch.ops.aten._softmax.out(A, -1, False, out=P)
            part = partial[:H * r1 * d].view(H, r1, d)
            dv_b[:, :r1] += torch.bmm(as_low(P, low_buf).transpose(1, 2), dyl[:, r0:r1], out=part)
            if low_buf is None:
                torch.bmm(dyl[:, r0:r1], vl[:, :r1].transpose(1, 2), out=A)  # dP
            else:
                A.copy_(torch.bmm(dyl[:, r0:r1], vl[:, :r1].transpose(1, 2), out=low_buf[:H * c * r1].view(H, c, r1)))
            torch.ops.aten._softmax_backward_data.out(A, P, -1, f32, grad_input=A)  # dZ = P (dP - D)
            dZ = as_low(A, low_buf)
            dk_b[:, :r1].add_(torch.bmm(dZ.transpose(1, 2), q_rows.to(low), out=part), alpha=scale)
            dq_rows = torch.bmm(dZ, kl[:, :r1], out=partial[:H * c * d].view(H, c, d)).to(f32).mul_(scale)
            minus_dF = A.sum(0)  # dF = -sum_h dZ_h, rows r0:r1
            minus_dS = running_sum(minus_dF, reverse=True).add_(R[:r1])  # -(sum over rows i > k)
            R[:r1] += minus_dF.sum(0)
            minus_dS.mul_(S > 0)  # relu' and the constraints: S > 0 only where S may select
            dq_rows[0].addmm_(minus_dS, k32[0, :r1], alpha=-scale)
            dk_b[0, :r1].addmm_(minus_dS.t(), q0[r0:r1], alpha=-scale)
            dq[b, :, r0:r1] = dq_rows  # these rows are complete: every key they see was in this chunk's walk
        dk[b], dv[b] = dk_b, dv_b
    return dq, dk, dv


def as_low(x, low_buf):
    """x (float32) in the backward's matmul dtype: itself, or rounded into low_buf."""
    return x if low_buf is None else low_buf[:x.numel()].view(x.shape).copy_(x)


@chunked_backward.register_fake
def _(dy, q, k, v, rows):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _chunked_setup(ctx, inputs, output):
    q, k, v, rows = inputs
    ctx.save_for_backward(q, k, v)
    ctx.rows = rows


def _chunked_backward_rule(ctx, dy):
    return *chunked_backward(dy.contiguous(), *ctx.saved_tensors, ctx.rows), None


chunked_forward.register_autograd(_chunked_backward_rule, setup_context=_chunked_setup)


# ----------------------------------------------------------------------------------------------------------------
# CUDA: the Triton kernel (docs/KERNEL.md). Two kernels forward (a torch cumsum of the carries between them), two
# backward:
#   _colsum_kernel   per (query tile, sequence): head 0's S, summed down each tile's rows (the carries' parts)
#   _fwd_kernel      per (query tile, sequence, group of G heads): S and F once per tile for the whole group, then
#                    FlashAttention's online softmax of Z = A_h - F for each head of the group
#   _delta_kernel    per (query tile, sequence and head): FlashAttention-2's D = rowsum(dO * O), in float32
#   _bwd_kernel      per (key tile, sequence, group of G heads): FlashAttention-2's backward, query tiles walked
#                    last to first, plus the gradient through F from the group's dZ summed over its heads
# Units: logits, S, F and the carries are kept in base 2 (times log2 e) so that the softmax runs on exp2; the
# ReLU and its gradient do not care (log2 e > 0). Offsets from the batch and head indices are int64: a tensor of
# 2^31 elements or more (B T H d, or the carries' B T^2 / BM) would wrap them in int32.

LOG2E = 1.4426950408889634
DELTA_ROWS = 64  # rows per program of _delta_kernel (a 64 x 128 float32 tile: 64 registers a thread at 4 warps)

if triton is not None:

    @triton.jit
    def _load_k0(K, b, sk_b, sk_t, offs_n, offs_d, T, D):
        """Head 0's keys of one tile, with key 0 (BOS) and keys past T read as zeros: a zero key gives a zero
        logit, which the ReLU turns into S = 0, so no tile needs a mask for §1.2's "never BOS"."""
        mask = (offs_n[:, None] > 0) & (offs_n[:, None] < T) & (offs_d[None, :] < D)
        return tl.load(K + b * sk_b + offs_n[:, None] * sk_t + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _selection_tile(q0, k0, offs_m, offs_n, scale2, ON_DIAGONAL: tl.constexpr):
        """S (base 2) on one tile, SPEC §1.1-1.2: relu of head 0's logits, strictly below the diagonal (a mask only
        on tiles that cross it), never column 0 (k0 has it zeroed, _load_k0). For float32 inputs the dot is
        'tf32x3' (three TF32 products, about float32's accuracy, on the tensor cores), never plain TF32: the sign of
        head 0's logits decides S and the ReLU's gradient, and TF32's 10-bit mantissa flips it near 0."""
        S = tl.maximum(tl.dot(q0, tl.trans(k0), input_precision="tf32x3") * scale2, 0.0)
        if ON_DIAGONAL:
            S = tl.where(offs_m[:, None] > offs_n[None, :], S, 0.0)
        return S

    @triton.jit
    def _colsum_kernel(Q, K, COLSUM, sq_b, sq_t, sk_b, sk_t, c_b, c_m, T, D, scale2,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """COLSUM[b, I, j] = sum of S[k, j] over the rows k of query tile I (head 0 only)."""
        pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        q0 = tl.load(Q + b * sq_b + offs_m[:, None] * sq_t + offs_d[None, :],
                     mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)
        for start_n in range(0, tl.minimum((pid_m + 1) * BM, T), BN):
            offs_n = start_n + tl.arange(0, BN)
            S = _selection_tile(q0, _load_k0(K, b, sk_b, sk_t, offs_n, offs_d, T, D), offs_m, offs_n, scale2, True)
            tl.store(COLSUM + b * c_b + pid_m * c_m + offs_n, tl.sum(S, axis=0), mask=offs_n < T)

    @triton.jit
    def _fwd_tile(acc, m_i, l_i, q, q0, K, V, carry_row, b, offs_m, offs_g, offs_d, start_n, sk_b, sk_h, sk_t,
                  sv_b, sv_h, sv_t, T, D, scale2, BN: tl.constexpr, DOT: tl.constexpr, ON_DIAGONAL: tl.constexpr):
        """One key tile of the forward for the group. Off the diagonal every key precedes every row: no causal
        mask and no bounds on keys (they all lie below T)."""
        offs_n = start_n + tl.arange(0, BN)
        col_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
        S = _selection_tile(q0, _load_k0(K, b, sk_b, sk_t, offs_n, offs_d, T, D), offs_m, offs_n, scale2,
                            ON_DIAGONAL)
        F = tl.load(carry_row + offs_n, mask=offs_n < T, other=0.0)[None, :] + tl.cumsum(S, axis=0) - S  # §1.3
        k = tl.load(K + b * sk_b + offs_g[:, None, None] * sk_h + offs_n[None, :, None] * sk_t
                    + offs_d[None, None, :], mask=col_mask[None], other=0.0)
        v = tl.load(V + b * sv_b + offs_g[:, None, None] * sv_h + offs_n[None, :, None] * sv_t
                    + offs_d[None, None, :], mask=col_mask[None], other=0.0)
        z = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=DOT) * scale2 - F[None]  # §1.4
        if ON_DIAGONAL:  # causal; keys past T lie past every row < T
            z = tl.where((offs_m[:, None] >= offs_n[None, :])[None], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=2))
        p = tl.exp2(z - m_new[:, :, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, CARRY, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                    so_b, so_h, so_t, c_b, c_m, T, H, D, scale2,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, G: tl.constexpr, DOT: tl.constexpr):
        """FlashAttention's forward with Z = A_h - F for the G heads h0 .. h0+G-1 of one sequence; F on each tile =
        carry + running sum of S down the tile's rows, computed once for the group (docs/KERNEL.md §1)."""
        pid_m, b, h0 = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64) * G
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        offs_g = h0 + tl.arange(0, G)
        row_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        q0 = tl.load(Q + b * sq_b + offs_m[:, None] * sq_t + offs_d[None, :], mask=row_mask, other=0.0)
        q = tl.load(Q + b * sq_b + offs_g[:, None, None] * sq_h + offs_m[None, :, None] * sq_t
                    + offs_d[None, None, :], mask=row_mask[None], other=0.0)  # (G, BM, BD)
        carry_row = CARRY + b * c_b + pid_m * c_m
        m_i = tl.full([G, BM], float("-inf"), tl.float32)
        l_i = tl.zeros([G, BM], tl.float32)
        acc = tl.zeros([G, BM, BD], tl.float32)
        below = (pid_m * BM) // BN * BN  # key tiles before this one lie wholly below the diagonal
        for start_n in range(0, below, BN):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q0, K, V, carry_row, b, offs_m, offs_g, offs_d, start_n,
                                      sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, T, D, scale2, BN, DOT, False)
        for start_n in range(below, tl.minimum((pid_m + 1) * BM, T), BN):  # the tiles the diagonal crosses
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q0, K, V, carry_row, b, offs_m, offs_g, offs_d, start_n,
                                      sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, T, D, scale2, BN, DOT, True)
        acc = acc / l_i[:, :, None]
        tl.store(O + b * so_b + offs_g[:, None, None] * so_h + offs_m[None, :, None] * so_t + offs_d[None, None, :],
                 acc.to(O.dtype.element_ty), mask=row_mask[None])
        tl.store(LSE + (b * H + offs_g[:, None]) * T + offs_m[None, :], m_i + tl.log2(l_i),
                 mask=(offs_m < T)[None, :])

    @triton.jit
    def _delta_kernel(O, DO, DELTA, so_b, so_h, so_t, sdo_b, sdo_h, sdo_t, T, H, D,
                      BM: tl.constexpr, BD: tl.constexpr):
        """DELTA[b, h, i] = sum over d of dO * O for each row (FlashAttention-2's D_h), in float32 from the inputs'
        dtype: in PyTorch, (do.float() * o.float()).sum(-1) would hold three float32 copies of a (B, H, T, D)
        tensor at once, the backward's largest allocation (6x q's size in bf16)."""
        # one program per (row block, sequence, head): B and H on the grid's 2nd and 3rd axes, each of which CUDA
        # caps at 65,535 (B * H on one axis would fail at B = 8,192 with 16 heads)
        pid_m, b, h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=mask, other=0.0)
        tl.store(DELTA + (b * H + h) * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1),
                 mask=offs_m < T)

    @triton.jit
    def _bwd_tile(dk, dv, dk0, R, k, v, k0, Q, DO, LSE, DELTA, CARRY, DQ, b, pid_m, offs_n, offs_g, offs_d, h0,
                  sq_b, sq_h, sq_t, sdo_b, sdo_h, sdo_t, c_b, c_m, T, H, D, scale2, scale,
                  BM: tl.constexpr, DOT: tl.constexpr, ON_DIAGONAL: tl.constexpr):
        """One query tile of the backward for the group's key tile, computed transposed (keys down, queries across,
        as FlashAttention-2's dk/dv pass does): P^T and dZ^T feed dv and dk without a transpose, only dq and head 0's
        dq take one. Rows past T read q = dO = 0 and an infinite log-sum-exp, so their P, dZ and S are 0 without a
        mask; off the diagonal no causal mask either."""
        offs_m = pid_m * BM + tl.arange(0, BM)
        row_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        rows = offs_m[None, :, None]  # (1, BM, 1): the tile's rows, for every head of the group
        q = tl.load(Q + b * sq_b + offs_g[:, None, None] * sq_h + rows * sq_t + offs_d[None, None, :],
                    mask=row_mask[None], other=0.0)
        do = tl.load(DO + b * sdo_b + offs_g[:, None, None] * sdo_h + rows * sdo_t + offs_d[None, None, :],
                     mask=row_mask[None], other=0.0)
        q0 = tl.load(Q + b * sq_b + offs_m[:, None] * sq_t + offs_d[None, :], mask=row_mask, other=0.0)
        lse = tl.load(LSE + (b * H + offs_g[:, None]) * T + offs_m[None, :], mask=(offs_m < T)[None, :],
                      other=float("inf"))
        delta = tl.load(DELTA + (b * H + offs_g[:, None]) * T + offs_m[None, :], mask=(offs_m < T)[None, :],
                        other=0.0)
        St = tl.maximum(tl.dot(k0, tl.trans(q0), input_precision="tf32x3") * scale2, 0.0)  # S^T (BN, BM), §1.1
        if ON_DIAGONAL:  # §1.2 as in _selection_tile, transposed
            St = tl.where(offs_m[None, :] > offs_n[:, None], St, 0.0)
        carry = tl.load(CARRY + b * c_b + pid_m * c_m + offs_n, mask=offs_n < T, other=0.0)
        Ft = carry[:, None] + tl.cumsum(St, axis=1) - St  # F^T: the running sum runs across
        zt = tl.dot(k, tl.permute(q, (0, 2, 1)), input_precision=DOT) * scale2 - Ft[None]  # (G, BN, BM)
        pt = tl.exp2(zt - lse[:, None, :])
        if ON_DIAGONAL:
            pt = tl.where((offs_m[None, :] >= offs_n[:, None])[None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT)
        dpt = tl.dot(v, tl.permute(do, (0, 2, 1)), input_precision=DOT)
        dzt = pt * (dpt - delta[:, None, :])  # dZ_h^T = P_h^T (dP_h^T - D_h)
        dk += tl.dot(dzt.to(q.dtype), q, input_precision=DOT)
        dq = tl.dot(tl.permute(dzt, (0, 2, 1)).to(k.dtype), k, input_precision=DOT) * scale
        dFt = -tl.sum(dzt, axis=0)  # this group's share of dF, transposed
        # dS[k, j] = sum_{i > k} dF[i, j]. For bf16/fp16 inputs, in the tile: dF^T times strictly upper-triangular
        # ones on the tensor cores (a tl.cumsum scan across lanes and warps takes 320 of a warp's 1,936 instructions
        # per trip: docs/PERFORMANCE.md), dF rounded to the inputs' dtype first, as FlashAttention rounds dS.
        # float32 inputs keep the exact scan (their matmul would be tf32x3: dearer). S and F, which the softmax
        # sees, keep float32 running sums either way.
        if q.dtype == tl.float32:
            dSt = R[:, None] + tl.cumsum(dFt, axis=1, reverse=True) - dFt
        else:
            later = tl.arange(0, BM)[:, None] > tl.arange(0, BM)[None, :]
            dSt = R[:, None] + tl.dot(dFt.to(q.dtype), later.to(q.dtype))
        R += tl.sum(dFt, axis=1)
        dA0t = tl.where(St > 0, dSt, 0.0) * scale  # relu' and the constraints (S = 0 wherever it may not select)
        dq0 = tl.dot(tl.trans(dA0t).to(k0.dtype), k0, input_precision=DOT)
        is_head0 = (offs_g == 0)[:, None, None]
        tl.atomic_add(DQ + (b * H + offs_g[:, None, None]) * T * D + rows * D + offs_d[None, None, :],
                      dq + tl.where(is_head0, dq0[None], 0.0), mask=row_mask[None], sem="relaxed")
        if h0 > 0:  # head 0 belongs to group 0; every other group adds its share of dq0 separately
            tl.atomic_add(DQ + b * H * T * D + offs_m[:, None] * D + offs_d[None, :], dq0, mask=row_mask,
                          sem="relaxed")
        dk0 += tl.dot(dA0t.to(q0.dtype), q0, input_precision=DOT)
        return dk, dv, dk0, R

    @triton.jit
    def _bwd_kernel(Q, K, V, DO, LSE, DELTA, CARRY, DQ, DK, DV, DK0, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
                    sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t, sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
                    c_b, c_m, T, H, D, scale2, scale,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, G: tl.constexpr, DOT: tl.constexpr):
        """FlashAttention-2's backward for key tile J of G heads, walking the query tiles from last to first, plus
        the group's share of the gradient through F (docs/KERNEL.md §2): dF = -sum over the group of dZ_h,
        dS = R + reverse exclusive sum of dF down the tile (a matmul for bf16/fp16, a scan for float32; R: column
        sums of dF over the later tiles), dA_0 = dS where S > 0, into head 0's dq (DQ, float32) and dk (DK0,
        float32). DQ rows get a share from every key tile and DK0 from every group: both are added with relaxed
        atomics (only the sum matters)."""
        pid_n, b, h0 = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64) * G
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        offs_g = h0 + tl.arange(0, G)
        col_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
        keys = offs_n[None, :, None]  # (1, BN, 1): the tile's keys, for every head of the group
        k = tl.load(K + b * sk_b + offs_g[:, None, None] * sk_h + keys * sk_t + offs_d[None, None, :],
                    mask=col_mask[None], other=0.0)
        v = tl.load(V + b * sv_b + offs_g[:, None, None] * sv_h + keys * sv_t + offs_d[None, None, :],
                    mask=col_mask[None], other=0.0)
        k0 = _load_k0(K, b, sk_b, sk_t, offs_n, offs_d, T, D)
        dk = tl.zeros([G, BN, BD], tl.float32)
        dv = tl.zeros([G, BN, BD], tl.float32)
        dk0 = tl.zeros([BN, BD], tl.float32)
        R = tl.zeros([BN], tl.float32)
        n_m = tl.cdiv(T, BM)
        first_m = (pid_n * BN) // BM  # query tiles above it see none of these keys
        beyond = tl.minimum(tl.cdiv((pid_n + 1) * BN, BM), n_m)  # query tiles from here on lie wholly below it
        for i in range(0, n_m - beyond):
            dk, dv, dk0, R = _bwd_tile(dk, dv, dk0, R, k, v, k0, Q, DO, LSE, DELTA, CARRY, DQ, b, n_m - 1 - i,
                                       offs_n, offs_g, offs_d, h0, sq_b, sq_h, sq_t, sdo_b, sdo_h, sdo_t, c_b, c_m,
                                       T, H, D, scale2, scale, BM, DOT, False)
        for i in range(0, beyond - first_m):  # the tiles the diagonal crosses
            dk, dv, dk0, R = _bwd_tile(dk, dv, dk0, R, k, v, k0, Q, DO, LSE, DELTA, CARRY, DQ, b, beyond - 1 - i,
                                       offs_n, offs_g, offs_d, h0, sq_b, sq_h, sq_t, sdo_b, sdo_h, sdo_t, c_b, c_m,
                                       T, H, D, scale2, scale, BM, DOT, True)
        tl.store(DK + b * sdk_b + offs_g[:, None, None] * sdk_h + keys * sdk_t + offs_d[None, None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=col_mask[None])
        tl.store(DV + b * sdv_b + offs_g[:, None, None] * sdv_h + keys * sdv_t + offs_d[None, None, :],
                 dv.to(DV.dtype.element_ty), mask=col_mask[None])
        tl.atomic_add(DK0 + b * T * D + offs_n[:, None] * D + offs_d[None, :], dk0, mask=col_mask, sem="relaxed")


# Launch configurations per (dtype, padded head dim BD): the query tile rows BM (the carries are per query tile, so
# every pass shares it), then for each pass its candidates: keys per tile BN, heads per program G, warps, pipeline
# stages and the shared memory the candidate compiled to on sm_90 (KB). On a GPU the autotuner (_tuned) times the
# candidates that fit the GPU's shared memory, once per (T, H, D, dtype), and keeps the fastest. The first candidate
# that fits is used where nothing is timed (explicit tiles, Triton's CPU interpreter): for bf16/fp16 the fewest
# instructions per head and 64 x 64 tile (bench.py compile's proxy) among the candidates that spill under 2 KB
# (2,048 bytes; the compile test checks the order).
# `python bench.py compile` compiles every candidate for sm_90 (H100/H200) without a GPU and reports shared memory,
# registers, spills and instructions; test_selective.py asserts that each compiles, fits the 227 KB an H100 block may
# use, and compiles to no more shared memory than declared here (checked before a launch against the GPU's limit:
# 'auto' falls back to 'mask' where no candidate fits). Why several: the proxy cannot weigh spills (local memory)
# against instructions, nor mma.sync (3-d dots, G > 1) against Hopper's wgmma; timing can (docs/PERFORMANCE.md).
TritonPass = collections.namedtuple("TritonPass", "BN G warps stages shared_kb")
TritonConfig = collections.namedtuple("TritonConfig", "BM fwd bwd")
_HALF = {  # bf16 and fp16 compile alike. BD: BM, forward candidates, backward candidates (BN, G, warps, stages, KB)
    32: (64, [(32, 4, 4, 1, 30), (64, 4, 8, 3, 129), (64, 4, 8, 1, 68), (64, 2, 8, 2, 53)],
         [(128, 2, 8, 1, 100), (64, 2, 8, 1, 64), (64, 4, 8, 1, 112), (64, 1, 8, 1, 48)]),
    64: (64, [(32, 4, 4, 3, 125), (64, 4, 8, 2, 153), (64, 4, 8, 1, 104), (64, 2, 8, 1, 56), (64, 1, 4, 2, 65)],
         [(32, 4, 8, 2, 147), (64, 2, 8, 1, 104), (64, 4, 8, 1, 184), (32, 2, 8, 2, 98), (64, 1, 8, 1, 72)]),
    128: (64, [(32, 2, 4, 2, 105), (64, 2, 8, 2, 161), (64, 2, 4, 1, 96), (64, 1, 8, 1, 56)],
          [(32, 2, 8, 2, 162), (64, 1, 8, 1, 120), (64, 2, 8, 1, 184), (32, 1, 8, 1, 80)]),
}
_FLOAT32 = {  # float32 is for checking, not for speed: 8 warps, then 4 warps or less shared memory
    32: (64, [(64, 1, 8, 1, 64), (64, 1, 4, 2, 89)], [(64, 1, 8, 1, 112), (64, 1, 4, 1, 112)]),
    64: (64, [(64, 1, 8, 1, 96), (32, 1, 4, 2, 105)], [(64, 1, 8, 1, 192), (32, 1, 8, 1, 104)]),
    128: (64, [(32, 1, 8, 1, 160), (32, 1, 4, 1, 160)], [(32, 1, 8, 1, 208), (32, 1, 8, 2, 177)]),
}
TRITON_CONFIGS = {
    (dtype, BD): TritonConfig(BM, [TritonPass(*c) for c in fwd], [TritonPass(*c) for c in bwd])
    for dtypes, table in (((torch.bfloat16, torch.float16), _HALF), ((torch.float32,), _FLOAT32))
    for dtype in dtypes for BD, (BM, fwd, bwd) in table.items()
}


def padded_head_dim(D):
    """D rounded up to a power of two, at least 16 (tl.arange; the K of a tl.dot)."""
    BD = 16
    while BD < D:  # a loop, not int.bit_length: torch 2.4's dynamo traces this (torch.compile) and not that
        BD *= 2
    return BD


def triton_config(D, dtype):
    """The TritonConfig for head dim D and dtype."""
    return TRITON_CONFIGS[dtype, max(32, padded_head_dim(D))]


def check_blocks(BM, BN):
    """Tile sizes every GPU compile accepts: powers of two (tl.arange) and >= 16 (the K of a bf16/fp16 tl.dot);
    Triton's CPU interpreter would run others, a GPU would not."""
    for name, size in (("BM", BM), ("BN", BN)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"Triton tile size {name} = {size}: it must be a power of two and at least 16")


def heads_per_program(H, G):
    """The largest power of two <= G that divides H (a program takes G heads of one sequence; tl.arange needs a
    power of two)."""
    power = 1
    while power * 2 <= G:
        power *= 2
    while H % power:
        power //= 2
    return power


def dot_precision(dtype):
    """Input precision of the attention's own float32 dots: TF32 when PyTorch's float32 matmuls may use it
    (torch.set_float32_matmul_precision('high' or 'medium')), else 'tf32x3' (about float32's accuracy; 'ieee'
    would leave the tensor cores, and compiles to code that spills kilobytes). The selection dot is always tf32x3
    (_selection_tile). bf16/fp16 dots are exact products either way."""
    return "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "tf32x3"


def unit_stride(x):
    """x with its last dim contiguous (the kernels take the other strides as they are: no copy for q, k, v that
    are transposed views of one projection)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def launchable(candidates, H, shared_limit=None):
    """The candidates (TritonPass) a launch may use: within the GPU's shared memory (shared_limit bytes, None: any),
    with G lowered to divide H (heads_per_program), each once."""
    out = []
    for c in candidates:
        c = c._replace(G=heads_per_program(H, c.G))
        if (shared_limit is None or c.shared_kb * 1024 <= shared_limit) and c[:4] not in [o[:4] for o in out]:
            out.append(c)
    return out


def triton_selective_attention(q, k, v, blocks=None, heads=None, autotune=None):
    """The Triton kernel as a differentiable function. blocks: (BM, BN) tile sizes, heads: (forward, backward)
    heads per program: given either, that configuration (with TRITON_CONFIGS' first candidates that fit the GPU for
    the rest), else autotune (default: on CUDA) picks per pass among the candidates, or the first candidates that
    fit are used. Tensors may live on the CPU under TRITON_INTERPRET=1 (the tests)."""
    H, D = q.size(1), q.size(-1)
    limit = shared_memory_limit(q.device) if q.is_cuda else None
    refusal = triton_refuses(D, q.dtype, limit)
    if refusal:
        raise ValueError(f"triton_selective_attention: {refusal}; attention='mask' runs any head dim and dtype")
    cfg = triton_config(D, q.dtype)
    if blocks is None and heads is None and (q.is_cuda if autotune is None else autotune):
        return triton_forward(q, k, v, cfg.BM, [], [])[0]
    if blocks:
        check_blocks(*blocks)
    BM, BN = blocks or (cfg.BM, None)
    fwd, bwd = launchable(cfg.fwd, H, limit)[0], launchable(cfg.bwd, H, limit)[0]
    G_fwd, G_bwd = heads or (fwd.G, bwd.G)
    return triton_forward(q, k, v, BM, [BN or fwd.BN, heads_per_program(H, G_fwd), fwd.warps, fwd.stages],
                          [BN or bwd.BN, heads_per_program(H, G_bwd), bwd.warps, bwd.stages])[0]


def launch(kernel, tuned, grid, chosen, *args, **constexprs):
    """Launch kernel over grid(BN, G) with the chosen [BN, G, warps, stages], or, with none chosen, through its
    autotuner (which picks BN, G, warps and stages)."""
    if chosen:
        BN, G, warps, stages = chosen
        kernel[grid(BN, G)](*args, BN=BN, G=G, num_warps=warps, num_stages=stages, **constexprs)
    else:
        tuned[lambda meta: grid(meta["BN"], meta["G"])](*args, **constexprs)


@torch.library.custom_op("selective_gpt::triton_forward", mutates_args=())
def triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, BM: int, fwd: Sequence[int], bwd: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns o, the base-2 log-sum-exp of each row (for the backward), and the per-tile carries of S's column
    sums (base 2). fwd, bwd: each pass's [BN, G, warps, stages], or [] to autotune it."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    B, H, T, D = q.shape
    first = triton_config(D, q.dtype).fwd[0]
    BD = padded_head_dim(D)
    scale2 = LOG2E / math.sqrt(D)
    n_m = triton.cdiv(T, BM)
    colsum = torch.zeros(B, n_m, T, device=q.device, dtype=torch.float32)
    _colsum_kernel[(n_m, B)](q, k, colsum, q.stride(0), q.stride(2), k.stride(0), k.stride(2), colsum.stride(0),
                             colsum.stride(1), T, D, scale2, BM=BM, BN=first.BN, BD=BD, num_warps=first.warps)
    carry = nnf.pad(torch.cumsum(colsum[:, :-1], dim=1), (0, 0, 1, 0))  # exclusive prefix over query tiles
    o = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    launch(_fwd_kernel, _fwd_tuned, lambda BN, G: (n_m, B, H // G), fwd,
           q, k, v, o, lse, carry, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
           carry.stride(0), carry.stride(1), T, H, D, scale2, BM=BM, BD=BD, DOT=dot_precision(q.dtype))
    return o, lse, carry


@triton_forward.register_fake
def _(q, k, v, BM, fwd, bwd):
    B, H, T, D = q.shape
    f32 = torch.float32
    return q.new_empty(q.shape), q.new_empty(B, H, T, dtype=f32), q.new_empty(B, -(-T // BM), T, dtype=f32)


@torch.library.custom_op("selective_gpt::triton_backward", mutates_args=())
def triton_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, carry: torch.Tensor, BM: int, bwd: Sequence[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, do = unit_stride(q), unit_stride(k), unit_stride(v), unit_stride(do)
    B, H, T, D = q.shape
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # D_h = rowsum(dO_h * O_h)
    _delta_kernel[(triton.cdiv(T, DELTA_ROWS), B, H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], T, H, D,
                                                        BM=DELTA_ROWS, BD=padded_head_dim(D), num_warps=4)
    dq = torch.zeros(B, H, T, D, device=q.device, dtype=torch.float32)  # float32: added to atomically
    dk, dv = torch.empty(B, H, T, D, device=q.device, dtype=k.dtype), torch.empty(B, H, T, D, device=q.device,
                                                                                   dtype=v.dtype)
    dk0 = torch.zeros(B, T, D, device=q.device, dtype=torch.float32)  # every group's share of the F gradient
    launch(_bwd_kernel, _bwd_tuned, lambda BN, G: (triton.cdiv(T, BN), B, H // G), bwd,
           q, k, v, do, lse, delta, carry, dq, dk, dv, dk0, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
           *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], carry.stride(0), carry.stride(1), T, H, D,
           LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), BM=BM, BD=padded_head_dim(D), DOT=dot_precision(q.dtype))
    dk[:, 0] = (dk[:, 0].float() + dk0).to(dk.dtype)  # the selection gradient, into head 0's keys
    return dq.to(q.dtype), dk, dv


@triton_backward.register_fake
def _(do, q, k, v, o, lse, carry, BM, bwd):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _triton_setup(ctx, inputs, output):
    q, k, v, BM, fwd, bwd = inputs
    o, lse, carry = output
    # lse and the carries are for the backward, not for a loss: no gradient flows into them, and autograd is told
    # not to allocate zero gradients for them either (the carries' would be B x T/BM x T floats: q's size at T 16384)
    ctx.mark_non_differentiable(lse, carry)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o, lse, carry)
    ctx.config = (BM, bwd)


def _triton_backward_rule(ctx, do, *_):
    return *triton_backward(do, *ctx.saved_tensors, *ctx.config), None, None, None


triton_forward.register_autograd(_triton_backward_rule, setup_context=_triton_setup)


def tuning_candidates(which):
    """The autotuner's pruning for pass `which` ('fwd' or 'bwd'): the launchable candidates for the launch's dtype,
    head dim, head count and GPU."""
    def prune(configs, named_args, **constexprs):
        q = named_args["Q"]
        limit = shared_memory_limit(q.device) if q.is_cuda else None
        return [triton.Config({"BN": c.BN, "G": c.G}, num_warps=c.warps, num_stages=c.stages)
                for c in launchable(getattr(triton_config(named_args["D"], q.dtype), which), named_args["H"], limit)]
    return prune


def every_candidate(which):
    """Every candidate of the table for pass `which`, as triton.Configs: the autotuner's own list, which only has to
    hold more than one (or it would not tune); tuning_candidates picks what it times."""
    candidates = sorted({c[:4] for cfg in TRITON_CONFIGS.values() for c in getattr(cfg, which)})
    return [triton.Config({"BN": BN, "G": G}, num_warps=warps, num_stages=stages)
            for BN, G, warps, stages in candidates]


if triton is not None:  # tuned once per (T, H, D) and dtype; dq and dk0 are added to atomically: zeroed per trial
    _fwd_tuned = triton.autotune(every_candidate("fwd"), key=["T", "H", "D"],
                                 prune_configs_by={"early_config_prune": tuning_candidates("fwd")})(_fwd_kernel)
    _bwd_tuned = triton.autotune(every_candidate("bwd"), key=["T", "H", "D"],
                                 prune_configs_by={"early_config_prune": tuning_candidates("bwd")},
                                 reset_to_zero=["DQ", "DK0"])(_bwd_kernel)
