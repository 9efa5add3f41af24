"""
Sample from a trained model, prune its context (SPEC §4), and measure what pruning costs and saves.

    python sample.py --out_dir out-c4 --start "The meaning of life"   # generate (KV cache)
    python sample.py --prune --budget 64                               # every layer keeps at most 64 keys
    python sample.py --prune --budgets 96,64,32,32                     # one budget per layer
    python sample.py --eval_ppl --budgets 96,64,32,32                  # validation perplexity, pruned vs not
    python sample.py --find_budgets --tolerance 0.01                   # greedy per-layer budgets (SPEC §4.3)
    python sample.py --find_budgets --target_ppl 31.4 --overwrite      # ... to a perplexity, replacing the first
    python sample.py --explain --start "a=3 b=1 a=7 a?"                # what each layer masks (SPEC §1, §4)

Budgets found by --find_budgets (on the run's evaluation batches, then scored on as many others the search did not
use) are saved to out_dir/budgets.json (an earlier search is replaced only with --overwrite) and used by --prune /
--eval_ppl when no --budget(s) flag is given.
"""

import hashlib
import json
import math
import os
import sys
import time

import torch

from common import (BOS, ArgumentParser, CheckpointError, add_device_flags, assign_decode, assign_encode, at_least,
                    autocast, autocast_dtype, checked, get_batch, given_flags, gpt2_encoder, load_checkpoint,
                    load_shards, make_dir, non_negative, pick_device, random_seed, strip_compile_prefix,
                    write_atomic, write_json)
from selective_gpt import GPT, GPTConfig

DEFAULT_RUNS = ("out-c4", "out-assign")  # train.py's default out_dir per dataset


def get_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out_dir", default=None, help="the training run's directory (None: whichever of "
                   f"{' and '.join(DEFAULT_RUNS)} holds a checkpoint, if only one does)")
    p.add_argument("--ckpt", default="ckpt.pt", help="checkpoint file in out_dir (ckpt.pt or ckpt_best.pt)")
    p.add_argument("--start", default="", help="prompt text, or FILE:path to read it from a file (BOS is prepended)")
    p.add_argument("--num_samples", type=at_least(1), default=1, help="continuations of the prompt")
    p.add_argument("--max_new_tokens", type=at_least(1), default=200, help="tokens generated per sample")
    p.add_argument("--temperature", type=checked(float, lambda v: 0 <= v < math.inf, "must be >= 0 (0: greedy)"),
                   default=0.8, help="softmax temperature; 0: greedy (like --top_k 1)")
    p.add_argument("--top_k", type=at_least(1), default=200, help="sample from the k likeliest tokens (1: greedy)")
    p.add_argument("--seed", type=random_seed, default=1337, help="of the sampling")
    add_device_flags(p)
    p.add_argument("--prune", action="store_true", help="generate with pruned buffers and report the memory saved")
    p.add_argument("--budget", type=at_least(2), default=None, help="keys every layer may keep (BOS, current included)")
    p.add_argument("--budgets", default=None, help="keys per layer, comma separated: 96,64,32,32")
    p.add_argument("--eval_ppl", action="store_true", help="validation perplexity with and without the budgets")
    p.add_argument("--find_budgets", action="store_true", help="greedy search for per-layer budgets (SPEC §4)")
    p.add_argument("--target_ppl", type=checked(float, lambda v: 1 <= v < math.inf, "must be a perplexity (>= 1)"),
                   default=None, help="--find_budgets: the perplexity not to exceed")
    p.add_argument("--tolerance", type=non_negative, default=0.01,
                   help="--find_budgets without --target_ppl: allowed relative rise over the unpruned perplexity")
    p.add_argument("--shrink", type=checked(float, lambda v: 0 < v < 1, "must be in (0, 1)"), default=0.8,
                   help="--find_budgets: a layer's budget shrinks by this")
    p.add_argument("--eval_iters", type=at_least(1), default=None,
                   help="validation batches (None: the run's); --find_budgets scores its budgets on as many others too")
    p.add_argument("--batch_size", type=at_least(1), default=None, help="validation batch size (None: the run's)")
    p.add_argument("--explain", action="store_true", help="show what each layer masks for the last token of --start "
                   "(F of the last query, and with --budget(s) what each layer's buffer evicted, SPEC §4)")
    p.add_argument("--explain_png", default=None, metavar="PATH", help="with --explain: also draw F per layer (and "
                   "the evictions) to this PNG (needs matplotlib)")
    p.add_argument("--data_dir", default=None, help="--eval_ppl, --find_budgets with a c4 run: its token shards "
                   "(None: the run's --data_dir, relative to where it was trained)")
    p.add_argument("--overwrite", action="store_true", help="--find_budgets: replace out_dir/budgets.json; "
                   "--explain_png: replace the file")
    return p


def load_model(out_dir, ckpt_name, device):
    """The model of a train.py checkpoint, in eval mode, and the run's arguments."""
    try:
        ckpt = load_checkpoint(os.path.join(out_dir, ckpt_name), device)
    except CheckpointError as e:
        raise SystemExit(f"sample.py: {e}")
    # attention 'auto': how to compute attention is this device's choice, not the model's (the paths agree: tested)
    model = GPT(GPTConfig(**dict(ckpt["model_args"], attention="auto")))
    model.load_state_dict(strip_compile_prefix(ckpt["model"]))
    return model.to(device).eval(), dict(ckpt["args"], iter_num=ckpt["iter_num"])


def model_fingerprint(model):
    """A hash of the weights: budgets.json says which model its budgets were searched for."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def validation_batches(run, n, batch_size, device, data_dir=None, first=0):
    """The run's own fixed evaluation batches (train.py's), n of them from number `first` (0: the ones train.py
    evaluates on); data_dir overrides the run's."""
    shards = {"validation": load_shards(data_dir or run["data_dir"], "validation", run["block_size"])} \
        if run["dataset"] == "c4" else None
    for k in range(first, first + n):
        x, y = get_batch(dict(run, batch_size=batch_size), "val", -1, k, shards)
        yield x.to(device), y.to(device)


@torch.no_grad()
def perplexity(model, batches, ctx, budgets=None):
    losses = []
    for x, y in batches:
        with ctx:
            model(x, targets=y, budgets=budgets)
        losses.append(model.loss_terms["ce"].item())
    return math.exp(sum(losses) / len(losses))


def memory_factor(model, budgets):
    """SPEC §4: L * T keys for the standard model over sum_l K_l for the pruned one."""
    T = model.config.block_size
    return model.config.n_layer * T / sum(min(b, T) for b in budgets)


def find_budgets(model, batches, ctx, target_ppl, shrink):
    """Greedy (SPEC §4): from K_l = T, repeatedly shrink the budget of the layer whose shrinking costs the least
    perplexity, while the perplexity stays <= target_ppl. Returns the path: [(budgets, ppl), ...], unpruned first."""
    budgets = [model.config.block_size] * model.config.n_layer
    ppl = perplexity(model, batches, ctx)
    path = [(budgets, ppl)]
    while True:
        best = None
        for layer, K in enumerate(budgets):
            if K <= 2:
                continue
            trial = budgets[:layer] + [max(2, min(K - 1, int(K * shrink)))] + budgets[layer + 1:]
            trial_ppl = perplexity(model, batches, ctx, trial)
            if trial_ppl <= target_ppl and (best is None or trial_ppl < best[0]):
                best = (trial_ppl, trial)
        if best is None:
            return path
        ppl, budgets = best
        path.append((budgets, ppl))
        print(f"  budgets {budgets}: val ppl {ppl:.3f}, memory {memory_factor(model, budgets):.2f}x smaller")


JOBS = ("prune", "eval_ppl", "find_budgets", "explain")  # one per run; none of them: generation
GENERATION = ("generation", "prune")
USED_BY = {  # the flags that only some jobs use
    **dict.fromkeys(("num_samples", "max_new_tokens", "temperature", "top_k", "seed"), GENERATION),
    "start": GENERATION + ("explain",),
    **dict.fromkeys(("budget", "budgets"), ("prune", "eval_ppl", "explain")),
    **dict.fromkeys(("eval_iters", "batch_size", "data_dir"), ("eval_ppl", "find_budgets")),
    **dict.fromkeys(("target_ppl", "tolerance", "shrink"), ("find_budgets",)),
    "explain_png": ("explain",), "overwrite": ("find_budgets", "explain")}


def check_args(parser, args, given):
    """The checks that need several flags (each value's own: its type), before anything loads. given: the flags on
    the command line; one that this run's job would not use is refused, not ignored."""
    jobs = [name for name in JOBS if getattr(args, name)]
    if len(jobs) > 1:
        parser.error(f"{' and '.join('--' + j for j in jobs)} are different jobs: give one of them per run")
    job = jobs[0] if jobs else "generation"
    for flag, users in USED_BY.items():
        if flag in given and job not in users:
            named = " or ".join(u if u == "generation" else f"--{u}" for u in users)
            parser.error(f"--{flag} is for {named}, not {job if job == 'generation' else '--' + job}: nothing here "
                         f"would use it, so drop it")
    if args.budget is not None and args.budgets is not None:
        parser.error("give --budget (every layer) or --budgets (one per layer), not both")
    if args.target_ppl is not None and "tolerance" in given:
        parser.error("--target_ppl and --tolerance both set the perplexity --find_budgets may reach: give one")
    if args.explain_png is not None and os.path.isdir(args.explain_png):
        parser.error(f"--explain_png {args.explain_png} is a directory: give a file name in it, e.g. F.png")
    if args.explain_png is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.explain_png))):
        parser.error(f"--explain_png {args.explain_png}: its folder does not exist")
    if args.explain_png is not None:
        make_dir(os.path.dirname(os.path.abspath(args.explain_png)), "--explain_png")  # can it be written in?
    if args.overwrite and args.explain and args.explain_png is None:
        parser.error("--overwrite replaces --explain_png's file: give --explain_png, or drop --overwrite")
    if args.explain_png is not None and os.path.exists(args.explain_png) and not args.overwrite:
        parser.error(f"--explain_png {args.explain_png}: the file exists: give another name, or --overwrite to "
                     f"replace it")
    if args.budgets is not None:
        try:
            args.budgets = [int(b) for b in args.budgets.split(",")]
        except ValueError:
            parser.error(f"--budgets {args.budgets}: give whole numbers separated by commas, one per layer: 96,64,32")
    if args.out_dir is None:
        runs = [d for d in DEFAULT_RUNS if os.path.exists(os.path.join(d, args.ckpt))]
        if len(runs) != 1:
            found = f"both {runs[0]} and {runs[1]} hold one" if runs else \
                f"neither {DEFAULT_RUNS[0]} nor {DEFAULT_RUNS[1]} holds one"
            parser.error(f"no --out_dir given, and {found} ({args.ckpt}): name the run with --out_dir")
        args.out_dir = runs[0]
        print(f"sample.py: using the run in {args.out_dir}")
    if args.find_budgets and os.path.isdir(args.out_dir):
        make_dir(args.out_dir, "--out_dir")  # can budgets.json be written there?
    if args.find_budgets and os.path.exists(os.path.join(args.out_dir, "budgets.json")) and not args.overwrite:
        parser.error(f"--find_budgets: {args.out_dir}/budgets.json holds an earlier search: --overwrite replaces "
                     f"it (or copy it away first)")


def saved_budgets(model, out_dir):
    """The budgets of out_dir/budgets.json, if they were searched for this very model; else None, said why."""
    path = os.path.join(out_dir, "budgets.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        fingerprint, budgets = saved["model_fingerprint"], saved["budgets"]
    except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, or not a dict with both
        print(f"sample.py: ignoring {path}: it is not a budgets file of --find_budgets (damaged?). Run "
              f"--find_budgets again, or give --budget/--budgets.")
        return None
    if fingerprint != model_fingerprint(model):
        print(f"sample.py: ignoring {path}: it was searched for another model than this checkpoint's "
              f"(an earlier run in the same directory?). Run --find_budgets again, or give --budget/--budgets.")
        return None
    print(f"budgets from {path}: {budgets}")
    return budgets


def read_prompt(parser, start):
    """--start text, or the text of FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = start[5:]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        parser.error(f"--start FILE:{path}: no such file")
    except IsADirectoryError:
        parser.error(f"--start FILE:{path} is a directory: give a text file")
    except UnicodeDecodeError:
        parser.error(f"--start FILE:{path} is not UTF-8 text: convert it (e.g. iconv -t utf-8) or give the text")
    except OSError as e:
        parser.error(f"--start FILE:{path} cannot be read: {e.strerror}")


# ----------------------------------------------------------------------------------------------------------------
# --explain: what selective attention forgets, per layer, for one prompt

def explain(model, prompt, budgets=None):
    """Per layer, for the prompt's tokens: F (T, T) of the parallel pass (§1.3), F of the last query on each token,
    gone (T, T) bool: key j was out of the buffer when query t attended (§4, budgets), and evicted_at[j]: the query
    at which token j left the buffer (None: it stayed)."""
    idx = torch.tensor([prompt], device=next(model.parameters()).device)
    return [summarise_layer(F[0].cpu(), visible[0].cpu()) for F, visible in model.selective_masks(idx, budgets)]


def summarise_layer(F, visible):
    """explain's record of one layer from its F (T, T) and visible (T, T) (selective_gpt.GPT.selective_masks)."""
    gone = torch.ones_like(visible).tril() & ~visible
    evicted_at = [int(gone[:, j].nonzero()[0]) if gone[:, j].any() else None for j in range(F.size(0))]
    return {"F": F, "F_last": F[-1].tolist(), "gone": gone, "evicted_at": evicted_at}


BAR = " ▏▎▍▌▋▊▉█"  # eighths of a block: a bar in any terminal


def masked_bar(f, width=5):
    """How much of a key's weight F takes away against an unmasked key, 1 - exp(-F), as a bar of `width`
    characters."""
    eighths = round((1 - math.exp(-f)) * width * 8)
    return (BAR[-1] * (eighths // 8) + (BAR[eighths % 8] if eighths % 8 else "")).ljust(width)


def render_explanation(words, layers, budgets, colour):
    """The terminal view: a row per prompt token, a column per layer: F for the last query, a bar of the share of
    the token's attention weight it masks against an unmasked token (1 - exp(-F)), and 'evicted @t' where the
    layer's buffer dropped it."""
    last = len(words) - 1
    lines = [f"What each layer masks for the last query, {words[-1]!r} (position {last}): F, and the share of each "
             f"token's weight it takes away against an unmasked token's (1 - exp(-F), bar: 0 to 1)" +
             (f"; with budgets {budgets}, 'ev@t' marks a token the layer's buffer evicted at query t (SPEC §4)"
              if budgets else "")]
    width = 13 + (7 if budgets else 0)
    lines.append("  pos token        " + "".join(f"layer {n}".ljust(width) for n in range(len(layers))))
    for j, word in enumerate(words):
        cells = []
        for layer in layers:
            f = layer["F_last"][j]
            bar = masked_bar(f)
            if colour and f > 0:
                bar = f"\033[{31 if f >= 2.3 else 33}m{bar}\033[0m"  # red past 90% masked, yellow below
            at = layer["evicted_at"][j]
            cell = f"{f:6.2f} {bar} " + (f"ev@{at:<3d}" if at is not None else "       " if budgets else "")
            cells.append(cell)
        shown = word.replace("\n", "\\n")[:12]
        lines.append(f"{j:5d} {shown:<12} " + "".join(cells))
    return "\n".join(lines)


def explain_png(path, words, layers, budgets):
    """One heatmap of F per layer (queries x keys), evicted keys dotted; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    T, L = len(words), len(layers)
    top = max(1.0, max(layer["F"].max().item() for layer in layers))  # one colour scale for every layer
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 4.4), squeeze=False)
    for n, (ax, layer) in enumerate(zip(axes[0], layers)):
        F = layer["F"].clone()
        F[torch.ones(T, T, dtype=torch.bool).triu(1)] = float("nan")  # the future: no F
        image = ax.imshow(F.numpy(), cmap="magma_r", interpolation="nearest", vmin=0, vmax=top)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="F")
        t, j = layer["gone"].nonzero(as_tuple=True)
        if len(t):
            ax.scatter(j.numpy(), t.numpy(), s=4, c="tab:cyan", marker="s", linewidths=0, label="evicted")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_title(f"layer {n}" + (f", budget {budgets[n]}" if budgets else ""))
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if T <= 40:
            labels = [w.replace("\n", "\\n")[:10] for w in words]
            ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def budgets_of(parser, args, model):
    """The budgets --budget(s) give, or out_dir/budgets.json's for --prune and --eval_ppl; None for none."""
    try:
        if args.find_budgets:
            model.layer_budgets(2)  # a clear error for a standard model
        if args.budget is not None or args.budgets is not None:
            return model.layer_budgets(args.budget if args.budget is not None else args.budgets)
        budgets = saved_budgets(model, args.out_dir) if args.prune or args.eval_ppl else None
    except ValueError as e:
        parser.error(str(e))
    if (args.prune or args.eval_ppl) and budgets is None:
        parser.error("--prune and --eval_ppl need --budget N or --budgets a,b,c (or --find_budgets first)")
    return budgets


def search_budgets(args, model, run, batches, held_out, ctx):
    """--find_budgets: the greedy search (SPEC §4.3) on batches, its result saved to out_dir/budgets.json. The search
    picks the budgets that score best on its batches, so their perplexity there is optimistic: held_out, as many
    other batches drawn independently, scores them without that bias."""
    L, T = model.config.n_layer, model.config.block_size
    unpruned = perplexity(model, batches, ctx)
    target = args.target_ppl or unpruned * (1 + args.tolerance)
    print(f"unpruned val ppl {unpruned:.3f}; searching budgets for val ppl <= {target:.3f}")
    budgets, ppl = find_budgets(model, batches, ctx, target, args.shrink)[-1]
    if ppl > target:
        raise SystemExit(f"sample.py: even unpruned, val ppl {ppl:.3f} is above the target {target:.3f}")
    check = {"batches": len(held_out), "unpruned_val_ppl": perplexity(model, held_out, ctx),
             "val_ppl": perplexity(model, held_out, ctx, budgets)}
    result = {"budgets": budgets, "val_ppl": ppl, "unpruned_val_ppl": unpruned, "target_ppl": target,
              "held_out": check, "memory_factor": memory_factor(model, budgets), "block_size": T, "n_layer": L,
              "checkpoint": args.ckpt, "iter_num": run["iter_num"], "model_fingerprint": model_fingerprint(model)}
    write_json(os.path.join(args.out_dir, "budgets.json"), result)
    print(f"budgets {budgets}: val ppl {ppl:.3f} (unpruned {unpruned:.3f}), {L} x {T} keys -> {sum(budgets)}: "
          f"memory {result['memory_factor']:.2f}x smaller; saved to {args.out_dir}/budgets.json\n"
          f"on {len(held_out)} other validation batches (not searched on): val ppl {check['val_ppl']:.3f} "
          f"(unpruned {check['unpruned_val_ppl']:.3f}, {check['val_ppl'] / check['unpruned_val_ppl'] - 1:+.1%})")


def compare_perplexity(model, batches, ctx, budgets):
    """--eval_ppl: validation perplexity without and with the budgets (SPEC §4.1)."""
    unpruned, pruned = perplexity(model, batches, ctx), perplexity(model, batches, ctx, budgets)
    print(f"val ppl {unpruned:.3f} unpruned, {pruned:.3f} with budgets {budgets} "
          f"(memory {memory_factor(model, budgets):.2f}x smaller)")


def show_explanation(parser, args, model, prompt, decode, budgets):
    """--explain: what each layer masks for the prompt's last token, in the terminal (and --explain_png)."""
    if len(prompt) > model.config.block_size:
        parser.error(f"--explain: the prompt has {len(prompt)} tokens with BOS, more than block_size "
                     f"{model.config.block_size}: shorten --start")
    try:
        layers = explain(model, prompt, budgets)
    except ValueError as e:
        parser.error(f"--explain: {e}")
    words = ["<BOS>"] + [decode([token]) for token in prompt[1:]]
    print(render_explanation(words, layers, budgets, sys.stdout.isatty() and "NO_COLOR" not in os.environ))
    if args.explain_png is not None:
        if explain_png(args.explain_png, words, layers, budgets):
            print(f"F per layer drawn to {args.explain_png}")
        else:
            print("--explain_png: matplotlib is not installed (pip install matplotlib); the view above is all")


def report_memory(args, model, budgets):
    """--prune: each layer's peak and final cached keys, and the KV memory against an unpruned buffer."""
    L = model.config.n_layer
    unpruned = model.decode_stats["context"]  # an unpruned buffer keeps every position of the window, every layer
    bytes_per_key = model.decode_stats["bytes_per_key"]  # k and v, position, f
    for layer, (peak, final) in enumerate(zip(model.decode_stats["peak"], model.decode_stats["final"])):
        print(f"layer {layer}: budget {budgets[layer]}, peak {peak} cached keys (final {final}) vs {unpruned} "
              f"without pruning")
    pruned_total = sum(model.decode_stats["peak"])
    print(f"KV cache: {pruned_total * bytes_per_key * args.num_samples / 2**20:.3f} MiB with pruning vs "
          f"{L * unpruned * bytes_per_key * args.num_samples / 2**20:.3f} MiB without: "
          f"{L * unpruned / pruned_total:.2f}x smaller")


def perplexity_job(args, model, run, budgets, device, ctx):
    """--find_budgets or --eval_ppl, on the run's evaluation batches (--find_budgets: and as many others)."""
    n, batch_size = args.eval_iters or run["eval_iters"], args.batch_size or run["batch_size"]
    try:
        batches = list(validation_batches(run, n, batch_size, device, args.data_dir))
        held_out = list(validation_batches(run, n, batch_size, device, args.data_dir, first=n)) \
            if args.find_budgets else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: {e}")
    if args.find_budgets:
        return search_budgets(args, model, run, batches, held_out, ctx)
    return compare_perplexity(model, batches, ctx, budgets)


def generate_text(args, model, prompt, decode, budgets, device, ctx):
    """Continue the prompt --num_samples times (with --prune, in pruned buffers), print them, tokens/s, memory."""
    if len(prompt) > model.config.block_size:
        print(f"sample.py: the prompt has {len(prompt)} tokens with BOS, more than block_size "
              f"{model.config.block_size}: the model sees BOS and its latest {max(1, model.config.block_size // 2 - 1)}"
              f" tokens (learned positions stop at block_size)")
    x = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    started = time.time()
    with ctx:
        y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           budgets=budgets if args.prune else None)
    elapsed = time.time() - started
    for row in y.tolist():
        print(decode(row[1:]))
        print("---------------")
    print(f"{args.num_samples * args.max_new_tokens / elapsed:.1f} tokens/s")
    if args.prune:
        report_memory(args, model, budgets)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args, given_flags(parser, argv))
    try:
        device = pick_device(args.device)
        ctx = autocast(device.split(":")[0], autocast_dtype(device.split(":")[0], args.dtype))
    except ValueError as e:
        parser.error(str(e))
    torch.manual_seed(args.seed)
    model, run = load_model(args.out_dir, args.ckpt, device)
    if args.data_dir is not None and run["dataset"] != "c4":
        parser.error(f"--data_dir: {args.out_dir} trained on --dataset {run['dataset']}, which reads no data files")
    budgets = budgets_of(parser, args, model)
    if args.find_budgets or args.eval_ppl:
        return perplexity_job(args, model, run, budgets, device, ctx)
    if run["dataset"] == "assign":
        encode, decode, bos = assign_encode, assign_decode, 0
    else:
        enc = gpt2_encoder()
        encode, decode, bos = (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode, BOS
    try:
        prompt = [bos] + encode(read_prompt(parser, args.start))
    except ValueError as e:
        parser.error(str(e))
    if args.explain:
        with ctx:  # the dtype generation runs in, so that its evictions are the ones --prune makes
            return show_explanation(parser, args, model, prompt, decode, budgets)
    generate_text(args, model, prompt, decode, budgets, device, ctx)


if __name__ == "__main__":
    main()
