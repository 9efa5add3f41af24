"""A GPT-2 style decoder with Selective Attention (Leviathan, Kalman & Matias, ICLR 2025, arXiv 2410.02703); § cites
docs/SPEC.md, the exact definition implemented here. Top to bottom: the config; the mechanism (`selective_mask`);
the three ways to compute it; the transformer (nanoGPT's layout and names: selection adds no parameters); decoding
with a KV buffer that context pruning empties.
"""

import inspect
import math
import warnings
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as nnf

import kernels  # the tiled fast paths: a Triton kernel on CUDA, query chunks on the CPU

ATTENTION_PATHS = ("reference", "mask", "tiled")  # how selective attention is computed (§7); "auto" picks one


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
    attention: str = "auto"  # selective attention's implementation (§7): reference, mask, tiled; auto: tiled, else mask
    mask_bos: bool = False  # ablation (§9): BOS (key column 0) may be masked, against §1.2
    mask_self: bool = False  # ablation (§9): a token's vote on its own key counts (S keeps its diagonal)
    init_std: float | None = None  # the weights' std at init (§10); None: the width rule 1 / sqrt(3 n_embd)

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
        if self.init_std is not None and not 0 < self.init_std < math.inf:
            raise ValueError(f"init_std must be a positive number or None (the width rule), got {self.init_std}")
        if self.attention not in ("auto",) + ATTENTION_PATHS:
            raise ValueError(f"attention must be auto, {', '.join(ATTENTION_PATHS)}; got {self.attention!r}")
        ablated = any(self.rule.values())
        if (ablated or self.memory_loss_weight > 0) and not self.selective:
            raise ValueError("the memory loss (memory_loss_weight > 0) and the ablations mask_bos and mask_self "
                             "change selective attention: set selective=True (--selective)")
        if ablated and self.attention == "tiled":
            raise ValueError("the ablations mask_bos and mask_self run on the mask or reference path only (the tiled "
                             "kernels implement §1 exactly): use attention 'auto', 'mask' or 'reference'")
        if self.selective and self.dropout > 0 and self.attention in ("tiled", "reference"):
            raise ValueError(f"attention {self.attention!r} has no dropout: use attention 'auto' or 'mask'")
        if self.memory_loss_weight > 0 and self.attention not in ("auto", "mask"):
            raise ValueError("the memory loss needs every layer's F, which the mask path makes once: use attention "
                             "'auto' or 'mask'")

    @property
    def rule(self):
        """The selection rule's switches, the ablations of §9 (all off: §1 exactly), as selective_mask, the paths and
        KVBuffer take them (as keyword arguments). A new switch goes here, into selective_mask (the parallel passes)
        and KVBuffer.update_running_mask (decoding), and as a keyword into the paths that pass it on to them;
        test_selective.py's test_ablated_model_* checks that they agree."""
        return {"mask_bos": self.mask_bos, "mask_self": self.mask_self}


# ----------------------------------------------------------------------------------------------------------------
# Selective attention (§1). This is the block to read.

def selective_mask(logits, mask_bos=False, mask_self=False):
    """F from head 0's attention logits, exactly §1.

    logits: (..., T, T), already scaled by 1/sqrt(head_dim) and causally masked (-inf above the diagonal).
    Returns F, same shape, in float32 (float64 stays float64, for gradient checks). F[i, j] is how much query i
    ignores key j, the votes of the queries before it; every head subtracts it from query i's logits.
    mask_bos, mask_self: the ablations of §9 (each drops one half of §1.2); off, this is §1 exactly.
    """
    T = logits.size(-1)
    # §1.1 S = relu(A_0): token k selects earlier token j by S[k, j] > 0. relu(-inf) = 0: the future selects nothing.
    # S and F stay float32 under autocast: F sums up to T terms (§1.5).
    S = torch.relu(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    # §1.2 never mask BOS (key column 0), a token never masks itself (the diagonal): keep S strictly below the
    # diagonal and right of column 0.
    may_vote = torch.ones(T, T, dtype=torch.bool, device=logits.device).tril(0 if mask_self else -1)
    if not mask_bos:
        may_vote[:, 0] = False
    S = S.masked_fill(~may_vote, 0.0)
    # §1.3 F[i, j] = sum_{k < i} S[k, j], the exclusive sum down the queries: shift S down one row, then cumsum.
    # (Not cumsum(S) - S: that can round F[i+1, j] below F[i, j]. Sums of non-negatives never decrease.)
    return torch.cumsum(nnf.pad(S[..., :-1, :], (0, 0, 1, 0)), dim=-2)


def selective_attention_reference(q, k, v, mask_bos=False, mask_self=False):
    """The paper's sketch, materialised: all H x T x T logits. Slow and plain; tests check every path against it.
    q, k, v: (B, H, T, head_dim) -> (y like q, F (B, T, T)); mask_bos, mask_self: the ablations of §9."""
    T = q.size(-2)
    logits = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # A_h for every head h
    logits = logits.masked_fill(future_mask(T, q.device), float("-inf"))  # causal
    F = selective_mask(logits[:, 0], mask_bos, mask_self)  # §1.1-1.3: head 0 selects, for every head
    logits = logits - F[:, None]  # §1.4 the same F subtracted from every head's logits (head 0's too)
    att = torch.softmax(logits, dim=-1)
    return att.to(v.dtype) @ v, F


def memory_loss(Fs, tau):
    """§5, a term that rewards masking: M_i = (i + 1) - sum_{j <= i} min(F[i, j], tau) / tau, the keys query i still
    needs; L_mem = (1 / (L * T)) * sum_l max_i M_i, averaged over the batch. Fs: one (B, T, T) F per layer."""
    T = Fs[0].size(-1)
    keys_seen = torch.arange(1, T + 1, device=Fs[0].device, dtype=Fs[0].dtype)
    per_layer = [(keys_seen - F.clamp(max=tau).sum(dim=-1) / tau).max(dim=-1).values for F in Fs]  # (B,) each
    return torch.stack(per_layer).sum(dim=0).mean() / (len(Fs) * T)


# ----------------------------------------------------------------------------------------------------------------
# How selective attention is computed (§7): three paths, equal up to rounding (tested against the reference).

def head0_logits(q, k):
    """Head 0's scaled logits q_0 k_0^T / sqrt(head_dim), (B, T_q, T_k); the one expression of the mask path and
    decoding, so that decoding and the parallel pass round alike (§1.5; the tiled paths: float32)."""
    return (q[:, 0] @ k[:, 0].transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))


def future_mask(T, device):
    """(T, T) bool, True above the diagonal: the keys a causal query must not see."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


def attention_path(attention, q, dropout_p=0.0, ablated=False):
    """The path GPTConfig.attention names; 'auto': 'tiled' where it runs, without dropout or ablation; else 'mask'."""
    if attention == "auto":
        return "tiled" if kernels.why_not_tiled(q, dropout_p) is None and not ablated else "mask"
    if attention == "tiled" and ablated:
        raise ValueError("attention='tiled' implements §1 exactly, not the ablations of §9: use 'mask'")
    if attention == "tiled" and kernels.why_not_tiled(q, dropout_p):
        raise ValueError(f"attention='tiled' cannot run here ({kernels.why_not_tiled(q, dropout_p)}): use 'mask'")
    if attention == "reference" and dropout_p > 0:
        raise ValueError("attention='reference' has no dropout: use 'mask'")
    return attention


def selective_attention(q, k, v, dropout_p=0.0, attention="auto", **rule):
    """Selective attention of q, k, v: (B, H, T, head_dim) by the path `attention` names; returns y like q: 'tiled'
    (kernels.tiled_selective_attention, no T x T tensor), 'mask' (selective_attention_sdpa) or 'reference'.
    rule: GPTConfig.rule's switches, the ablations of §9 ('mask' and 'reference' only)."""
    path = attention_path(attention, q, dropout_p, ablated=any(rule.values()))
    if path == "tiled":
        return kernels.tiled_selective_attention(q, k, v)
    if path == "mask":
        return selective_attention_sdpa(q, k, v, dropout_p, **rule)[0]
    return selective_attention_reference(q, k, v, **rule)[0]


def selective_attention_sdpa(q, k, v, dropout_p=0.0, budget=None, mask_bos=False, mask_self=False):
    """The 'mask' path: F from head 0 only (B x T x T), then one scaled_dot_product_attention call with the float
    mask (causal - F) for every head; budget: also prune the context (§4.1); mask_bos, mask_self: §9. Returns
    (y, F, visible), visible: (T, T) or (B, T, T) bool, the keys each query saw."""
    causal = future_mask(q.size(-2), q.device)
    F = selective_mask(head0_logits(q, k).masked_fill(causal, float("-inf")), mask_bos, mask_self)
    visible = ~causal if budget is None else pruned_visibility(F, budget)
    # causal (and pruned) minus F, float32; under autocast SDPA takes it in the autocast dtype, as q and k (§1.5)
    bias = (-F).masked_fill(~visible, float("-inf"))
    y = nnf.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None], dropout_p=dropout_p)  # over the heads
    return y, F, visible


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


Attended = namedtuple("Attended", "q k v F visible")  # what a layer's parallel pass saw (F, visible: None if standard)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q | k | v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.selective = config.selective
        self.attention = config.attention
        self.rule = config.rule  # the ablations of §9, off: §1

    def forward(self, x, budget=None, keep=False, buffer=None, t=0):
        """x: (B, T, C) -> (y, Attended or None). budget: prune a query's keys to this many (§4.1); keep: return what
        the pass saw (q, k, v, F, visible): for the memory loss, --explain, decoding's buffers. Both take the mask
        path, which makes F once. With a KVBuffer, x is one new token at position t: a decoding step (§3)."""
        B, T, C = x.size()
        q, k, v = [a.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for a in self.c_attn(x).split(C, dim=2)]
        p = self.attn_dropout_p if self.training else 0.0
        F = visible = None
        if buffer is not None:  # decoding: O(buffer) work, never the whole context again
            buffer.add(k, v, t)
            y = buffer.attend(q, t)
        elif not self.selective:
            y = nnf.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif budget is not None or keep:
            y, F, visible = selective_attention_sdpa(q, k, v, p, budget, **self.rule)
        else:
            y = selective_attention(q, k, v, p, self.attention, **self.rule)
        y = self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        return y, (Attended(q, k, v, F, visible) if keep else None)


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

    def forward(self, x, budget=None, keep=False, buffer=None, t=0):
        a, attended = self.attn(self.ln_1(x), budget, keep, buffer, t)
        x = x + a
        return x + self.mlp(self.ln_2(x)), attended


class GPT(nn.Module):
    """nanoGPT's GPT, standard or selective. Train a selective one with gradient-norm clipping (1.0) or AdamW beta2
    <= 0.99 (train.py: both), else early gradient spikes can stall the selection (§8; measured with init_std 0.02):
    configure_optimizers warns."""

    def __init__(self, config):
        super().__init__()
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
        std = config.init_std or 1 / math.sqrt(3 * config.n_embd)  # §10; nanoGPT's is 0.02
        for module in self.modules():  # weights normal, biases zero
            if isinstance(module, (nn.Linear, nn.Embedding)):
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * config.n_layer))
        self.loss_terms = {}  # the last forward's loss parts, for logging: {'ce': ..., 'mem': ...}
        self.decode_stats = {}  # the last generate's cached keys: 'peak', 'final' per layer, 'context'; 'bytes_per_key'

    def run_blocks(self, idx, start=0, budgets=None, keep=False, buffers=None, then=None):
        """The one walk through the blocks, in parallel or (buffers) a decoding step: tokens idx (B, T) at positions
        start.. -> the final hidden states (after ln_f) and each layer's Attended (keep=True) or None; or, with
        then, then(layer, Attended) as each layer finishes, so that its Attended (F: B x T x T) can go at once."""
        L, T = self.config.n_layer, idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {start + T}, block_size is {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        attended = []
        for layer, (block, budget, buffer) in enumerate(zip(self.transformer.h, self.layer_budgets(budgets),
                                                            buffers or [None] * L)):
            x, seen = block(x, budget, keep, buffer, start)
            attended.append(seen if then is None else then(layer, seen))
            del seen  # not kept past its layer: with `then`, what the layer saw goes before the next layer runs
        return self.transformer.ln_f(x), attended

    def forward(self, idx, targets=None, budgets=None):
        """idx: (B, T) token ids, BOS first (§2). With targets: logits at every position and the loss;
        without: the last position's logits only. budgets: context pruning simulated in parallel (§4.1)."""
        with_memory_loss = targets is not None and self.config.memory_loss_weight > 0  # §5 needs every layer's F
        x, attended = self.run_blocks(idx, budgets=budgets, keep=with_memory_loss)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position's logits
        logits = self.lm_head(x)
        loss = nnf.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        self.loss_terms = {"ce": loss.detach()}
        if with_memory_loss:
            mem = memory_loss([a.F for a in attended], self.config.memory_tau)
            loss = loss + self.config.memory_loss_weight * mem
            self.loss_terms["mem"] = mem.detach()
        return logits, loss

    def get_num_params(self, non_embedding=True):
        """Parameters; the position embeddings are not counted with non_embedding (token ones are, tied to lm_head)."""
        return sum(p.numel() for p in self.parameters()) - non_embedding * self.transformer.wpe.weight.numel()

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, grad_clip=None):
        """AdamW, weight decay on matrices and embeddings only (nanoGPT). grad_clip: the loop's clipping norm (0:
        none); a selective model warns when neither it nor beta2 <= 0.99 guards against early gradient spikes (§8)."""
        if self.config.selective and betas[1] > 0.99 and not grad_clip:
            warnings.warn(f"selective attention with AdamW beta2 = {betas[1]} and no gradient clipping can train "
                          f"poorly: clip the gradient norm (1.0) or use beta2 = 0.95 (docs/SPEC.md §8)", stacklevel=2)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, T=None):
        """Training FLOPs (forward + backward) per token at context T: 6 per parameter, attention over the causal half
        (T/2 keys per query), and selection's extra work: head 0's second QK^T and the cumsum over T x T."""
        cfg = self.config
        L, H, head_dim, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, T or cfg.block_size
        flops = 6 * self.get_num_params() + L * 6 * H * head_dim * T  # 2 matmuls x 2 FLOPs x T/2 keys x 3 (fwd+bwd)
        if cfg.selective:
            flops += L * (3 * head_dim * T + T)  # head 0's QK^T (fwd + bwd), and the cumsum of F and its gradient
        return flops

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops, T=None):
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops`, the device's peak in the dtype used."""
        return self.flops_per_token(T) * (T or self.config.block_size) * fwdbwd_per_iter / dt / peak_flops

    def layer_budgets(self, budgets):
        """budgets (None, an int, or one int per layer) -> one per layer (None: no pruning), checked (§4)."""
        L = self.config.n_layer
        if budgets is None:
            return [None] * L
        if not self.config.selective:
            raise ValueError("budgets (context pruning) need a selective model: a standard one has no F to prune by")
        budgets = [budgets] * L if isinstance(budgets, int) else list(budgets)
        if len(budgets) != L:
            raise ValueError(f"got {len(budgets)} budgets for {L} layers: give one int, or one per layer")
        if any(not isinstance(b, int) or b < 2 for b in budgets):
            raise ValueError(f"every budget must be an int >= 2 (BOS and the current token), got {budgets}")
        return budgets

    @torch.no_grad()
    def selective_masks(self, idx, budgets=None):
        """What each layer forgets on idx (B, T), BOS first: per layer (F, visible), F (B, T, T) float32 (§1.3),
        visible (B, T, T) bool: the keys in the buffer when each query attends (§4.1 with budgets; else the past)."""
        if not self.config.selective:
            raise ValueError("a standard model has no F: its selective masks need a selective model")
        _, attended = self.run_blocks(idx, budgets=budgets, keep=True)
        return [(a.F.float(), a.visible.expand_as(a.F)) for a in attended]

    # Generation with a KV buffer per layer (§3) and context pruning (§4) ---------------------------------------

    @torch.no_grad()
    def prefill(self, idx, budgets=None):
        """A prompt idx (B, T), BOS first, in one parallel pass -> (logits (B, V) for the next token, state =
        {'t': the next position, 'layers': one KVBuffer per layer (§3), of at most budgets keys (§4)})."""
        # a layer without a budget keeps every key: block_size of them at most, as generate re-encodes there
        capacities = [min(b or self.config.block_size, self.config.block_size) for b in self.layer_budgets(budgets)]
        # each layer's buffer is built as soon as the layer has run: one layer's F (B x T x T) alive at a time
        x, layers = self.run_blocks(idx, budgets=budgets, keep=True, then=lambda layer, seen: KVBuffer.after_prompt(
            *seen, capacities[layer], self.config.rule))
        return self.lm_head(x[:, -1]), {"t": idx.size(1), "layers": layers}

    @torch.no_grad()
    def decode(self, idx_next, state):
        """Feed the next token idx_next (B, 1) through the KV buffers: one token of work. Returns logits (B, V)."""
        x, _ = self.run_blocks(idx_next, start=state["t"], buffers=state["layers"])
        state["t"] += 1
        return self.lm_head(x[:, -1])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, budgets=None):
        """Continue idx (B, T), BOS first, by max_new_tokens tokens; top_k=1 or temperature=0 is greedy. With budgets
        (an int, or one per layer) each layer's buffer keeps at most that many keys (§4). At block_size the context
        is re-encoded from BOS + the latest block_size // 2 - 1 tokens (learned positions cannot extrapolate).
        Afterwards self.decode_stats holds the peak and final number of cached keys per layer, the peak an unpruned
        buffer would hold ('context': the longest context a query saw), and the bytes one cached key takes per
        sequence."""
        block_size = self.config.block_size
        window = max(1, block_size // 2 - 1)
        peak, longest = [0] * self.config.n_layer, 0
        state = None
        for _ in range(max_new_tokens):
            if state is None or state["t"] == block_size:  # (re-)encode the context in one parallel pass
                context = idx if idx.size(1) <= block_size else torch.cat([idx[:, :1], idx[:, -window:]], dim=1)
                logits, state = self.prefill(context, budgets)
            else:
                logits = self.decode(idx[:, -1:], state)
            peak, longest = [max(p, buffer.n) for p, buffer in zip(peak, state["layers"])], max(longest, state["t"])
            if temperature == 0 or top_k == 1:  # greedy (argmax: tied logits, frequent in bf16, do not draw)
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        self.decode_stats = {"peak": peak, "final": [b.n for b in state["layers"]] if state else [0] * len(peak),
                             "context": longest, "bytes_per_key": state["layers"][0].bytes_per_key() if state else 0}
        return idx


class KVBuffer:
    """One layer's decoding state (§3, §4): keys and values in `capacity` fixed slots, their positions, and for a
    selective layer the running mask f (f_j = F[t, j] for the next query t); rule: the §9 switches (mask_bos,
    mask_self) its update follows.
    A new key takes a free slot, or the slot of the key it evicts: a step costs O(capacity), never O(context)."""

    def __init__(self, k, v, positions, f, capacity, rule):
        free = capacity - k.size(2)  # slots padded with zeros (position 0): never read, as reads take the first
        # n slots and only a full buffer evicts
        self.k, self.v = nnf.pad(k, (0, 0, 0, free)), nnf.pad(v, (0, 0, 0, free))  # (B, H, capacity, head_dim)
        self.pos = nnf.pad(positions, (0, free))
        self.f = None if f is None else nnf.pad(f, (0, free))
        self.n = k.size(2)  # slots in use
        self.rule = rule

    @classmethod
    def after_prompt(cls, q, k, v, F, visible, capacity, rule):
        """The buffer after the parallel pass over a prompt (B, H, T, head_dim): the keys the last query saw, with
        f_j = F[T-1, j] updated by the last query (§3.3). F, visible: None for a standard layer."""
        B, H, T, head_dim = k.shape
        seen = torch.ones(B, T, dtype=torch.bool, device=k.device) if visible is None else \
            visible[..., -1, :].expand(B, T)
        pos = torch.arange(T, device=k.device).expand(B, T)[seen].view(B, -1)  # ascending, same count per row
        take = pos[:, None, :, None].expand(B, H, pos.size(1), head_dim)
        kept_k, kept_v = k.gather(2, take), v.gather(2, take)
        f = None
        if F is not None:
            logits0 = head0_logits(q[:, :, -1:], kept_k).squeeze(1)
            f = cls.update_running_mask(F[:, -1].gather(1, pos), logits0, pos, T - 1, **rule)
        return cls(kept_k, kept_v, pos, f, capacity, rule)

    @staticmethod
    def update_running_mask(f, logits0, pos, t, mask_bos=False, mask_self=False):
        """§3.3: after query t, f_j += relu(A_0[t, j]) for every cached key j except BOS (position 0) and t (each
        included under its ablation, §9)."""
        votes = torch.relu(logits0.to(f.dtype))
        if not mask_bos:
            votes = votes.masked_fill(pos == 0, 0.0)
        if not mask_self:
            votes = votes.masked_fill(pos == t, 0.0)
        return f + votes

    def add(self, k, v, t):
        """§3.1 and §4: token t's key and value (B, H, 1, head_dim) join, with f = 0; in a full buffer they replace
        the key with the largest f, never BOS, ties to the oldest."""
        B = k.size(0)
        if self.n < self.k.size(2):  # room: the next slot
            slot = torch.full((B,), self.n, dtype=torch.long, device=k.device)
            self.n += 1
        else:
            f = self.f.masked_fill(self.pos == 0, float("-inf"))
            largest = f == f.max(dim=1, keepdim=True).values
            slot = self.pos.masked_fill(~largest, torch.iinfo(torch.long).max).argmin(dim=1)
        rows = torch.arange(B, device=k.device)
        self.k[rows, :, slot], self.v[rows, :, slot], self.pos[rows, slot] = k[:, :, 0], v[:, :, 0], t
        if self.f is not None:
            self.f[rows, slot] = 0.0

    def attend(self, q, t):
        """§3.2, then §3.3: every head attends over the buffer with logits q . k / sqrt(head_dim) - f_j; then the
        running masks take query t's votes."""
        keys, values = self.k[:, :, :self.n], self.v[:, :, :self.n]
        if self.f is None:
            return nnf.scaled_dot_product_attention(q, keys, values)
        f = self.f[:, :self.n]
        y = nnf.scaled_dot_product_attention(q, keys, values, attn_mask=-f[:, None, None, :])
        logits0 = head0_logits(q, keys).squeeze(1)
        self.f[:, :self.n] = self.update_running_mask(f, logits0, self.pos[:, :self.n], t, **self.rule)
        return y

    def bytes_per_key(self):
        """The memory one cached key takes per sequence: its k and v in every head (in the dtype they were computed
        in, bf16 under autocast), its position, and f."""
        return (2 * self.k[0, :, 0].numel() * self.k.element_size() + self.pos.element_size()
                + (0 if self.f is None else self.f.element_size()))


def pruned_visibility(F, budget):
    """§4.1, decoding's pruning in one parallel pass: visible[b, t, j] = key j is in a buffer of <= budget keys when
    query t attends. Walks t = 0..T-1: token t joins; at budget + 1 keys, the key with the largest F[t, j] leaves,
    never BOS (j = 0) nor t itself, ties to the oldest; an evicted key never returns."""
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
