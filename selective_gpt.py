"""
A GPT-2 style decoder with Selective Attention, all of the model in this one file.

Selective Attention Improves Transformer, Leviathan, Kalman & Matias, ICLR 2025 (arXiv 2410.02703).
The mechanism is `selective_mask` below (docs/SPEC.md §1); `selective_attention_reference` is the paper's sketch
written out line by line, and `selective_attention` is what the model runs. Section numbers (§) refer to
docs/SPEC.md, the exact definition this code implements. The layout and parameter names follow nanoGPT's model.py,
so a standard checkpoint loads into a selective model: selective attention adds no parameters.
"""

import contextlib
import inspect
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as nnf

import kernels  # the fast paths: a fused Triton kernel on CUDA, a query-chunked backward on the CPU


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2
    selective: bool = False  # False: a standard transformer
    memory_loss_weight: float = 0.0  # epsilon of the memory loss (§5); 0 = off
    memory_tau: float = 1.0  # tau of the memory loss (§5)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2 (BOS and one token), got {self.block_size}")
        if not (0 <= self.memory_loss_weight < math.inf and 0 < self.memory_tau < math.inf):
            raise ValueError(f"memory_loss_weight must be >= 0 and memory_tau > 0, got {self.memory_loss_weight} and "
                             f"{self.memory_tau}")
        if self.memory_loss_weight > 0 and not self.selective:
            raise ValueError("the memory loss (memory_loss_weight > 0) needs a selective model (selective=True)")


# ----------------------------------------------------------------------------------------------------------------
# Selective attention (§1). This is the block to read.

def selective_mask(logits):
    """F from head 0's attention logits, exactly §1.

    logits: (..., T, T), already scaled by 1/sqrt(d_head) and causally masked (-inf above the diagonal).
    Returns F, same shape, in float32 (float64 stays float64, for gradient checks). F[i, j] is how much every
    later query i has learned to ignore key j; the model subtracts it from every head's logits.
    """
    T = logits.size(-1)
    # §1.1 S = relu(A_0): token k selects earlier token j by S[k, j] > 0. relu(-inf) = 0: the future selects nothing.
    # S and F stay float32 under autocast: F sums up to T terms (§1, numerics).
    S = torch.relu(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    # §1.2 never mask BOS (key column 0), a token never masks itself (the diagonal): keep S strictly below the
    # diagonal and right of column 0.
    may_select = torch.ones(T, T, dtype=torch.bool, device=logits.device).tril(-1)
    may_select[:, 0] = False
    S = S.masked_fill(~may_select, 0.0)
    # §1.3 F[i, j] = sum_{k < i} S[k, j], the exclusive sum down the queries: shift S down one row, then cumsum.
    # (Not cumsum(S) - S: that can round F[i+1, j] below F[i, j]. Sums of non-negatives never decrease.)
    return torch.cumsum(nnf.pad(S[..., :-1, :], (0, 0, 1, 0)), dim=-2)


def selective_attention_reference(q, k, v):
    """The paper's sketch, materialised: all H x T x T logits. Slow and plain; tests check every path against it.

    q, k, v: (B, H, T, d_head). Returns (y, F) with y: (B, H, T, d_head) and F: (B, T, T).
    """
    T = q.size(-2)
    logits = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # A_h for every head h
    logits = logits.masked_fill(future_mask(T, q.device), float("-inf"))  # causal
    F = selective_mask(logits[:, 0])  # §1.1-1.3: head 0 selects, for every head
    logits = logits - F[:, None]  # §1.4 the same F subtracted from every head's logits (head 0's too)
    att = torch.softmax(logits, dim=-1)
    return att.to(v.dtype) @ v, F


def selective_attention(q, k, v, dropout_p=0.0, impl=None):
    """Selective attention as the model runs it; q, k, v: (B, H, T, d_head). Returns (y, F).

    impl picks the implementation (default: $SELECTIVE_ATTENTION, else the fastest that applies):
      'fused'     - kernels.fused_selective_attention (Triton on CUDA, query chunks on the CPU): no H x T x T
                    tensor in the forward or the backward; F is None.
      'sdpa'      - sdpa_selective_attention: F from head 0, then one scaled_dot_product_attention call.
      'reference' - selective_attention_reference: all H x T x T logits.
    """
    impl = impl or os.environ.get("SELECTIVE_ATTENTION") or ("fused" if kernels.fused_applies(q, dropout_p) else "sdpa")
    if impl == "fused":
        return kernels.fused_selective_attention(q, k, v), None
    if impl == "sdpa":
        y, F, _ = sdpa_selective_attention(q, k, v, dropout_p)
        return y, F
    if impl == "reference":
        if dropout_p > 0:
            raise ValueError("the reference implementation has no dropout; use impl='sdpa'")
        return selective_attention_reference(q, k, v)
    raise ValueError(f"unknown selective attention implementation {impl!r}: use fused, sdpa or reference")


def sdpa_selective_attention(q, k, v, dropout_p=0.0, budget=None):
    """F from head 0 only (B x T x T), then one scaled_dot_product_attention call with the float mask
    (causal - F) broadcast over the heads: no H x T x T logits. budget: also prune the context (§4).
    Returns (y, F, visible); visible: (T, T) or (B, T, T) bool, the keys each query saw."""
    F = causal_selective_mask(q, k)
    visible = ~future_mask(q.size(-2), q.device) if budget is None else pruned_visibility(F, budget)
    bias = (-F).masked_fill(~visible, float("-inf"))  # causal (and pruned) minus F, float32
    y = kernels.masked_attention(q, k, v, bias[:, None], dropout_p)  # bias broadcast over the heads
    return y, F, visible


def causal_selective_mask(q, k):
    """F (B, T, T) of q, k: (B, H, T, d_head): selective_mask of head 0's causally masked logits."""
    return selective_mask(head0_logits(q, k).masked_fill(future_mask(q.size(-2), q.device), float("-inf")))


def head0_logits(q, k):
    """Head 0's scaled logits q_0 k_0^T / sqrt(d_head), (B, T_q, T_k); the one expression every path uses, so
    that decoding and the parallel pass round alike."""
    return (q[:, 0] @ k[:, 0].transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))


def future_mask(T, device):
    """(T, T) bool, True above the diagonal: the keys a causal query must not see."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


# ----------------------------------------------------------------------------------------------------------------
# Context pruning (§3, §4): the decoding buffers, and their simulation in one parallel pass.

def pruned_visibility(F, budget):
    """§4 in parallel: live[b, t, j] = key j is in the buffer when query t attends, if the buffer holds <= budget.

    Walks t = 0..T-1: token t joins; if that makes budget + 1 keys, the key with the largest F[t, j] leaves,
    never BOS (j = 0) and never t itself; ties go to the oldest key; an evicted key never returns.
    """
    B, T, _ = F.shape
    scores = F.detach().cpu().numpy().copy()  # the walk is sequential: numpy keeps each small step cheap
    scores[:, :, 0] = -np.inf  # never BOS
    live = np.zeros((B, T), dtype=bool)
    visible = np.zeros((B, T, T), dtype=bool)
    rows = np.arange(B)
    for t in range(T):
        live[:, t] = True
        if t >= budget:  # min(t, budget) keys were live, t joined: one too many
            f = np.where(live, scores[:, t], -np.inf)
            f[:, t] = -np.inf  # never the current token
            live[rows, f.argmax(axis=1)] = False  # argmax returns the first maximum: the oldest key
        visible[:, t] = live
    return torch.from_numpy(visible).to(F.device)


def update_running_mask(f, logits0, pos, newest):
    """§3.3: after query t, f_j += relu(A_0[t, j]) for every cached key j except BOS (pos 0) and t itself.

    f, logits0, pos, newest: (B, n) running masks, head 0's logits of query t, positions, and which entry is t.
    """
    return f + torch.relu(logits0.to(f.dtype)).masked_fill((pos == 0) | newest, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# The transformer, nanoGPT's layout.

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return nnf.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q | k | v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.selective = config.selective

    def qkv(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, hs)

    def forward(self, x, budget=None, need_F=False, cache_capacity=None):
        """x: (B, T, C). budget: simulate context pruning (§4). need_F: return F (for the memory loss, §5).
        cache_capacity: also return this layer's decoding buffers (the prefill of generate).
        Returns (y, F, cache); F and cache may be None."""
        B, T, C = x.size()
        q, k, v = self.qkv(x)
        dropout_p = self.attn_dropout if self.training else 0.0
        F = visible = None
        if not self.selective:
            y = kernels.causal_attention(q, k, v, dropout_p)
        elif budget is None and cache_capacity is None:
            y, F = selective_attention(q, k, v, dropout_p)
            if need_F and F is None:  # the fused kernel keeps no F; the memory loss needs it (§5)
                F = causal_selective_mask(q, k)
        else:  # pruning or decoding buffers: the path that materialises F and the visible keys
            y, F, visible = sdpa_selective_attention(q, k, v, dropout_p, budget)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        cache = self.prefill_cache(q, k, v, F, visible, cache_capacity) if cache_capacity else None
        return y, F, cache

    def prefill_cache(self, q, k, v, F, visible, capacity):
        """The decoding buffers after the parallel pass over a prompt: the keys live after the last query,
        with their running masks f_j = F[T, j] (§3), in a buffer of `capacity` slots."""
        B, H, T, hs = k.shape
        everything = torch.ones(B, T, dtype=torch.bool, device=k.device)
        keep = everything if visible is None else visible[..., -1, :].expand(B, T)  # the keys the last query saw
        pos = torch.arange(T, device=k.device).expand(B, T)[keep].view(B, -1)  # ascending, same count per row
        n = pos.size(1)
        take = pos[:, None, :, None].expand(B, H, n, hs)
        cache = {"k": k.new_zeros(B, H, capacity, hs), "v": v.new_zeros(B, H, capacity, hs),
                 "pos": pos.new_zeros(B, capacity), "n": n}
        cache["k"][:, :, :n] = k.gather(2, take)
        cache["v"][:, :, :n] = v.gather(2, take)
        cache["pos"][:, :n] = pos
        if self.selective:
            f = F[:, -1].gather(1, pos)  # F[T-1, j]: the running mask before the last query's update
            logits0 = head0_logits(q[:, :, -1:], cache["k"][:, :, :n]).squeeze(1)
            cache["f"] = F.new_zeros(B, capacity)
            cache["f"][:, :n] = update_running_mask(f, logits0, pos, pos == T - 1)
        return cache

    def decode_step(self, x, cache, t):
        """One new token x: (B, 1, C) at position t, with a KV cache (§3) and, when the buffer is full, eviction (§4).
        Work is O(buffer), never the whole context again. `cache` is updated in place."""
        q, k, v = self.qkv(x)  # (B, H, 1, hs)
        B = x.size(0)
        n, capacity = cache["n"], cache["k"].size(2)
        if n < capacity:  # room: token t takes the next slot
            slot = torch.full((B,), n, dtype=torch.long, device=x.device)
            cache["n"] = n = n + 1
        else:  # full: t replaces the key with the largest f, never BOS; ties go to the oldest (smallest position)
            f = cache["f"].masked_fill(cache["pos"] == 0, float("-inf"))
            largest = f == f.max(dim=1, keepdim=True).values
            slot = cache["pos"].masked_fill(~largest, torch.iinfo(torch.long).max).argmin(dim=1)
        rows = torch.arange(B, device=x.device)
        cache["k"][rows, :, slot] = k[:, :, 0]
        cache["v"][rows, :, slot] = v[:, :, 0]
        cache["pos"][rows, slot] = t
        keys, values, pos = cache["k"][:, :, :n], cache["v"][:, :, :n], cache["pos"][:, :n]
        if not self.selective:
            y = nnf.scaled_dot_product_attention(q, keys, values)
        else:
            cache["f"][rows, slot] = 0.0  # §3.1 a new key starts unmasked
            f = cache["f"][:, :n]
            y = nnf.scaled_dot_product_attention(q, keys, values, attn_mask=-f[:, None, None, :])  # §3.2
            logits0 = head0_logits(q, keys).squeeze(1)
            cache["f"][:, :n] = update_running_mask(f, logits0, pos, pos == t)  # §3.3
        y = y.transpose(1, 2).reshape(B, 1, self.n_embd)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, **attn_args):
        a, F, cache = self.attn(self.ln_1(x), **attn_args)
        x = x + a
        return x + self.mlp(self.ln_2(x)), F, cache

    def decode_step(self, x, cache, t):
        x = x + self.attn.decode_step(self.ln_1(x), cache, t)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.loss_terms = {}  # the last forward's loss parts, for logging: {'ce': ..., 'mem': ...}
        self.decode_stats = {}  # the last generate's cached keys per layer: {'peak': [...], 'final': [...]}

    def get_num_params(self, non_embedding=True):
        """Parameters; the position embeddings are not counted with non_embedding (token ones are, tied to lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def layer_budgets(self, budgets):
        """budgets (an int, or one int per layer) -> a list with one int per layer, checked (§4)."""
        L = self.config.n_layer
        if not self.config.selective:
            raise ValueError("budgets (context pruning) need a selective model: a standard one has no F to prune by")
        budgets = [budgets] * L if isinstance(budgets, int) else list(budgets)
        if len(budgets) != L:
            raise ValueError(f"got {len(budgets)} budgets for {L} layers: give one int, or one per layer")
        if any(not isinstance(b, int) or b < 2 for b in budgets):
            raise ValueError(f"every budget must be an int >= 2 (BOS and the current token), got {budgets}")
        return budgets

    def _embed(self, idx, start=0):
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {start + T}, block_size is {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def forward(self, idx, targets=None, budgets=None):
        """idx: (B, T) token ids, BOS first (§2). With targets: logits at every position and the loss;
        without: the last position's logits only. budgets: context pruning simulated in parallel (§4)."""
        budgets = self.layer_budgets(budgets) if budgets is not None else [None] * self.config.n_layer
        mem_loss = targets is not None and self.config.memory_loss_weight > 0
        x = self._embed(idx)
        Fs = []
        for block, budget in zip(self.transformer.h, budgets):
            x, F, _ = block(x, budget=budget, need_F=mem_loss)
            Fs.append(F)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position's logits
        logits = self.lm_head(x)
        ce = nnf.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        loss = ce
        self.loss_terms = {"ce": ce.detach()}
        if mem_loss:
            mem = memory_loss(Fs, self.config.memory_tau)
            loss = ce + self.config.memory_loss_weight * mem
            self.loss_terms["mem"] = mem.detach()
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices and embeddings only (nanoGPT)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, T=None):
        """Training FLOPs (forward + backward) per token at context T: 6 per parameter per token, plus attention
        counted over the causal half (about T/2 keys per query), plus selective attention's extra work: head 0's
        logits (a second QK^T of one head) and the cumsum over T x T (forward and backward)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, T or cfg.block_size
        flops = 6 * self.get_num_params() + L * 6 * H * Q * T  # 2 matmuls x 2 FLOPs x T/2 keys x 3 (fwd + bwd)
        if cfg.selective:
            flops += L * (3 * Q * T + T)  # head 0's QK^T (fwd + bwd), and the cumsum of F and its gradient
        return flops

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops, T=None):
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (the device's peak in the dtype used;
        on a CPU that is not an A100's 312e12: train.py measures it)."""
        T = T or self.config.block_size
        return self.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def selection_masks(self, idx, budgets=None):
        """What each layer forgets on idx (B, T), BOS first: one parallel pass, returning per layer (F, visible):
        F (B, T, T) float32 (§1.3), and visible (B, T, T) bool, the keys in the buffer when each query attends
        (§4 with budgets; without, every earlier key)."""
        if not self.config.selective:
            raise ValueError("a standard model has no F: selection masks need a selective model")
        budgets = self.layer_budgets(budgets) if budgets is not None else [None] * self.config.n_layer
        x, out = self._embed(idx), []
        for block, budget in zip(self.transformer.h, budgets):
            x, F, _ = block(x, budget=budget, need_F=True)
            visible = (~future_mask(idx.size(1), idx.device)).expand_as(F) if budget is None else \
                pruned_visibility(F, budget)
            out.append((F.float(), visible))
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Generation with a KV cache (§3) and context pruning (§4).

    @torch.no_grad()
    def prefill(self, idx, budgets=None):
        """Encode a prompt idx (B, T), BOS first, in one parallel pass and set up the KV caches (§3) for decoding.
        budgets: buffer sizes (§4), an int or one per layer, or None. Returns (logits (B, V) for the next token,
        state); state = {'t': the next position, 'layers': one cache per layer}."""
        budgets = self.layer_budgets(budgets) if budgets is not None else [None] * self.config.n_layer
        x, layers = self._embed(idx), []
        for block, budget in zip(self.transformer.h, budgets):
            x, _, cache = block(x, budget=budget, cache_capacity=min(budget or self.config.block_size,
                                                                     self.config.block_size))
            layers.append(cache)
        return self.lm_head(self.transformer.ln_f(x[:, -1])), {"t": idx.size(1), "layers": layers}

    @torch.no_grad()
    def decode(self, idx_next, state):
        """Feed the next token idx_next (B, 1) through the KV caches: one token of work. Returns logits (B, V)."""
        x = self._embed(idx_next, start=state["t"])
        for block, cache in zip(self.transformer.h, state["layers"]):
            x = block.decode_step(x, cache, state["t"])
        state["t"] += 1
        return self.lm_head(self.transformer.ln_f(x[:, -1]))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, budgets=None):
        """Continue idx (B, T), BOS first, by max_new_tokens sampled tokens; top_k=1 or temperature=0 is greedy.

        A KV cache makes each new token one token of work. With budgets (an int, or one per layer), each layer's
        buffer holds at most that many keys and evicts by §4. Learned positions cannot extrapolate, so when the
        sequence reaches block_size, the context is re-encoded from BOS + the latest block_size // 2 - 1 tokens
        (one parallel pass every block_size // 2 tokens) and generation carries on from there.
        Afterwards self.decode_stats holds the peak and final number of cached keys per layer.
        """
        block_size = self.config.block_size
        window = max(1, block_size // 2 - 1)
        peak = [0] * self.config.n_layer
        state = None
        for _ in range(max_new_tokens):
            if state is None or state["t"] == block_size:  # (re-)encode the context in one parallel pass
                context = idx if idx.size(1) <= block_size else torch.cat([idx[:, :1], idx[:, -window:]], dim=1)
                logits, state = self.prefill(context, budgets)
            else:
                logits = self.decode(idx[:, -1:], state)
            peak = [max(p, cache["n"]) for p, cache in zip(peak, state["layers"])]
            if temperature == 0:  # greedy, like top_k=1
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        self.decode_stats = {"peak": peak, "final": [c["n"] for c in state["layers"]] if state else [0] * len(peak)}
        return idx


def memory_loss(Fs, tau):
    """§5: M_i = (i + 1) - sum_{j <= i} min(F[i, j], tau) / tau, the soft count of keys query i still needs;
    L_mem = (1 / (L * T)) * sum_l max_i M_i, averaged over the batch. Fs: one (B, T, T) F per layer."""
    T = Fs[0].size(-1)
    keys_seen = torch.arange(1, T + 1, device=Fs[0].device, dtype=Fs[0].dtype)
    per_layer = [(keys_seen - F.clamp(max=tau).sum(dim=-1) / tau).max(dim=-1).values for F in Fs]  # (B,) each
    return torch.stack(per_layer).sum(dim=0).mean() / (len(Fs) * T)


# ----------------------------------------------------------------------------------------------------------------
# Running a model: the device, the autocast dtype and train.py's checkpoints (shared by train.py and sample.py).

def pick_device(name):
    """'auto' -> the best device here; any other name is checked against the devices this machine has."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    here = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] + \
        (["mps"] if torch.backends.mps.is_available() else [])
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps") or (
            device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()) or (
            device.type == "mps" and "mps" not in here):
        raise ValueError(f"--device {name}: no such device here; this machine has: {', '.join(here)} (or auto)")
    return name


def autocast_dtype(device_type, name):
    """The autocast dtype's name, checked against what the device can do (None: the best one there)."""
    if name is None:
        bf16 = device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_bf16_supported())
        name = "bfloat16" if bf16 else "float32"
    if device_type == "cpu" and name == "float16":
        raise ValueError("--dtype float16 is not supported on the CPU; use --dtype bfloat16 or float32")
    if device_type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--dtype bfloat16: this GPU has none; use --dtype float16 or float32")
    if device_type == "mps" and name == "bfloat16":
        raise ValueError("--dtype bfloat16 is not supported on MPS; use --dtype float16 or float32")
    return name


def autocast(device_type, dtype_name):
    """The context the model runs in: autocast to dtype_name, or nothing for float32."""
    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype_name))


def strip_compile_prefix(state_dict):
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}


class CheckpointError(Exception):
    """A checkpoint that is missing or does not load; the message names the file and what to do."""


CHECKPOINT_KEYS = {"model", "optimizer", "args", "model_args", "iter_num", "best_val_loss", "rng"}


def load_checkpoint(path, device="cpu"):
    """A checkpoint of train.py, loaded with weights_only and checked whole (the weights fit its model)."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one with train.py --out_dir {os.path.dirname(path)}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
        if missing:
            raise KeyError(f"it lacks {', '.join(sorted(missing))}")
        GPT(GPTConfig(**ckpt["model_args"])).load_state_dict(strip_compile_prefix(ckpt["model"]))
    except Exception as e:  # torch.load raises many types on a damaged file (zip, pickle, EOF, key errors)
        best = os.path.join(os.path.dirname(path), "ckpt_best.pt")
        fallback = ""
        if os.path.basename(path) != "ckpt_best.pt" and os.path.exists(best):
            try:
                fallback = f" {best} loads (iteration {load_checkpoint(best)['iter_num']}): use it instead" \
                           f" (sample.py --ckpt ckpt_best.pt; to train on from it, copy it over {path} and --resume)."
            except CheckpointError:
                fallback = f" {best} is damaged too."
        raise CheckpointError(f"{path} is damaged or not a train.py checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}).{fallback}") from None
    return ckpt
