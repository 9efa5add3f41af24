"""
Sample from a trained model, prune its context (SPEC §4), and measure what pruning costs and saves.

    python sample.py --out_dir out --start "The meaning of life"      # generate (KV cache)
    python sample.py --prune --budget 64                               # every layer keeps at most 64 keys
    python sample.py --prune --budgets 96,64,32,32                     # one budget per layer
    python sample.py --eval_ppl --budgets 96,64,32,32                  # validation perplexity, pruned vs not
    python sample.py --find_budgets --tolerance 0.01                   # greedy per-layer budgets (SPEC §4)
    python sample.py --find_budgets --target_ppl 31.4                  # ... down to a given perplexity

Budgets found by --find_budgets are saved to out_dir/budgets.json and used by --prune / --eval_ppl when no
--budget(s) flag is given.
"""

import argparse
import contextlib
import json
import math
import os
import time

import torch

from selective_gpt import GPT, GPTConfig
from train import (BOS, add_device_flags, assign_batch, assign_decode, assign_encode, autocast_dtype, batch_generator,
                   c4_batch, load_shards, pick_device, strip_compile_prefix)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="the training run's directory")
    p.add_argument("--ckpt", default="ckpt.pt", help="checkpoint file in out_dir (ckpt.pt or ckpt_best.pt)")
    p.add_argument("--start", default="", help="prompt text, or FILE:path to read it from a file (BOS is prepended)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200, help="sample from the k likeliest tokens (1: greedy)")
    p.add_argument("--seed", type=int, default=1337)
    add_device_flags(p)
    p.add_argument("--prune", action="store_true", help="generate with pruned buffers and report the memory saved")
    p.add_argument("--budget", type=int, default=None, help="keys every layer may keep (BOS and current included)")
    p.add_argument("--budgets", default=None, help="keys per layer, comma separated: 96,64,32,32")
    p.add_argument("--eval_ppl", action="store_true", help="validation perplexity with and without the budgets")
    p.add_argument("--find_budgets", action="store_true", help="greedy search for per-layer budgets (SPEC §4)")
    p.add_argument("--target_ppl", type=float, default=None, help="--find_budgets: the perplexity not to exceed")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="--find_budgets without --target_ppl: allowed relative rise over the unpruned perplexity")
    p.add_argument("--shrink", type=float, default=0.8, help="--find_budgets: a layer's budget shrinks by this")
    p.add_argument("--eval_iters", type=int, default=None, help="validation batches (default: the run's)")
    p.add_argument("--batch_size", type=int, default=None, help="validation batch size (default: the run's)")
    return p


def load_model(out_dir, ckpt_name, device):
    path = os.path.join(out_dir, ckpt_name)
    if not os.path.exists(path):
        raise SystemExit(f"sample.py: no checkpoint at {path}; train one with train.py (--out_dir {out_dir})")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(strip_compile_prefix(ckpt["model"]))
    return model.to(device).eval(), ckpt["args"]


def validation_batches(run, n, batch_size, device):
    """The run's own fixed evaluation batches (train.py's), n of them."""
    if run["dataset"] == "c4":
        shards = load_shards(run["data_dir"], "validation")
    for k in range(n):
        g = batch_generator(run["data_seed"], "val", -1, k)
        if run["dataset"] == "assign":
            x, y = assign_batch(batch_size, run["block_size"], g)
        else:
            x, y = c4_batch(shards, batch_size, run["block_size"], g)
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


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    device_type = device.split(":")[0]
    dtype = autocast_dtype(device_type, args.dtype)
    ctx = contextlib.nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    torch.manual_seed(args.seed)
    model, run = load_model(args.out_dir, args.ckpt, device)
    L, T = model.config.n_layer, model.config.block_size

    budgets = None
    if args.budget is not None and args.budgets is not None:
        parser.error("give --budget (every layer) or --budgets (one per layer), not both")
    try:
        if args.budget is not None:
            budgets = model.layer_budgets(args.budget)
        elif args.budgets is not None:
            budgets = model.layer_budgets([int(b) for b in args.budgets.split(",")])
        elif (args.prune or args.eval_ppl) and os.path.exists(os.path.join(args.out_dir, "budgets.json")):
            with open(os.path.join(args.out_dir, "budgets.json")) as f:
                budgets = model.layer_budgets(json.load(f)["budgets"])
            print(f"budgets from {args.out_dir}/budgets.json: {budgets}")
        if (args.prune or args.eval_ppl) and budgets is None:
            parser.error("--prune and --eval_ppl need --budget N or --budgets a,b,c (or --find_budgets first)")
        if args.find_budgets:
            model.layer_budgets(2)  # a clear error for a standard model
    except ValueError as e:
        parser.error(str(e))

    batches = None
    if args.eval_ppl or args.find_budgets:
        try:
            batches = list(validation_batches(run, args.eval_iters or run["eval_iters"],
                                              args.batch_size or run["batch_size"], device))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"sample.py: {e}")

    if args.find_budgets:
        unpruned = perplexity(model, batches, ctx)
        target = args.target_ppl or unpruned * (1 + args.tolerance)
        print(f"unpruned val ppl {unpruned:.3f}; searching budgets for val ppl <= {target:.3f}")
        budgets, ppl = find_budgets(model, batches, ctx, target, args.shrink)[-1]
        if ppl > target:
            raise SystemExit(f"sample.py: even unpruned, val ppl {ppl:.3f} is above the target {target:.3f}")
        result = {"budgets": budgets, "val_ppl": ppl, "unpruned_val_ppl": unpruned, "target_ppl": target,
                  "memory_factor": memory_factor(model, budgets), "block_size": T, "n_layer": L}
        tmp = os.path.join(args.out_dir, "budgets.json.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, os.path.join(args.out_dir, "budgets.json"))
        print(f"budgets {budgets}: val ppl {ppl:.3f} (unpruned {unpruned:.3f}), {L} x {T} keys -> {sum(budgets)}: "
              f"memory {result['memory_factor']:.2f}x smaller; saved to {args.out_dir}/budgets.json")
        return

    if args.eval_ppl:
        unpruned, pruned = perplexity(model, batches, ctx), perplexity(model, batches, ctx, budgets)
        print(f"val ppl {unpruned:.3f} unpruned, {pruned:.3f} with budgets {budgets} "
              f"(memory {memory_factor(model, budgets):.2f}x smaller)")
        return

    # generation
    if run["dataset"] == "assign":
        encode, decode, bos = assign_encode, assign_decode, 0
    else:
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        encode, decode, bos = (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode, BOS
    start = args.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    try:
        prompt = [bos] + encode(start)
    except ValueError as e:
        parser.error(str(e))
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
        unpruned = min(len(prompt) + args.max_new_tokens - 1, T)  # every position of the window, every layer
        bytes_per_key = 2 * model.config.n_embd * next(model.parameters()).element_size() + 4  # k, v and f
        for layer, (peak, final) in enumerate(zip(model.decode_stats["peak"], model.decode_stats["final"])):
            print(f"layer {layer}: budget {budgets[layer]}, peak {peak} cached keys (final {final}) vs {unpruned} "
                  f"without pruning")
        pruned_total = sum(model.decode_stats["peak"])
        print(f"KV cache: {pruned_total * bytes_per_key * args.num_samples / 2**20:.3f} MiB with pruning vs "
              f"{L * unpruned * bytes_per_key * args.num_samples / 2**20:.3f} MiB without: "
              f"{L * unpruned / pruned_total:.2f}x smaller")


if __name__ == "__main__":
    main()
