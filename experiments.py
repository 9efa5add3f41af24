"""
The paper's claims (SPEC §6), checked at the scale two CPU cores allow. One command reruns every section:

    python prepare_data.py --local PATH/TO/c4/en --data_dir data/c4_sample   # C4-format files you have (or real C4)
    python experiments.py                  # full run: days on 2 CPU cores (docs/RESULTS.md, Reproducing)
    python experiments.py --quick          # the same pipeline on tiny settings, minutes (a slow test runs it)
    python experiments.py --plots          # only redraw assets/*.png from assets/results.json

  heads    validation loss vs n_head in {1, 2, 4, 8}, selective and standard, 3 seeds, 3.1M tokens per run, same
           data order, one initialisation seed per pair; the learning rate is the standard model's best of three
           (one seed). Does selective attention beat standard, and does it with H heads reach standard with 2H?
           Rate check: if that rate is at the grid's edge, the standard model beyond it; if one is better, both
           variants there with 3 seeds. nanoGPT's initialisation (std 0.02), bf16
  heads_width  the same with the width rule's initialisation (SPEC §10), in float32
  ablations  the selection rule without BOS protection, and with self-masking (SPEC §9), H = 4, 2 seeds, trained
           like the heads runs, beside selective and standard, and selective on the mask path the ablations take
  assign   the variable-assignment task: answer accuracy vs steps, selective vs standard (same config and seed,
           nanoGPT's initialisation); then the selective model's accuracy vs the pruning budget
  pruning  selective models trained like the heads runs with memory loss weight 0 and 0.1 at block 512; the greedy
           per-layer budgets (sample.find_budgets) that keep pruned val ppl <= the standard model's and <= its own
           + 1%; L*T/sum(K); the no-context control (2 keys per layer). More blocks: add them to FULL["pruning"]
  tiles    the pruning section's block-512 selective model, trained in float32: per layer the share of 64 x 64
           tile pairs below the diagonal that are masked throughout (F >= 10, 20, 30): could kernels skip them?
  recipe   selective vs standard in a plain training loop (not train.py), block 128: one candidate cause of a bad
           result switched at a time (RECIPES, 600 steps), train.py's recipe over 3 seeds (with the width rule's
           initialisation: it and the plain recipe, float32), and a guard that fails (exit 1) if selective
           trains worse than standard under the plain recipe with gradient clipping
  init     the weights' std at initialisation (SPEC §10): nanoGPT's 0.02, the width rule 1/sqrt(3 n_embd), and the
           width rule on head 0's query and key rows only, in the assign task's plain loop (AdamW at PyTorch's
           defaults, no schedule); the candidates left in contention also in two C4 plain loops (the plain recipe,
           train.py's recipe; float32, 600 steps), standard and selective, 3 seeds
  guard    init's assign loop with the default initialisation, 3 seeds: exit 1 unless selective reaches 0.9 answer
           accuracy with at most a fifth of standard's errors in every seed (about an hour on 2 cores; no data)

Runs go to out/experiments[-quick]/<name>, two at a time with one thread each, and are skipped once finished (a
finished run with other settings than this file's and train.py's defaults is refused); a run cut short continues from
its last checkpoint (rerun to resume): a train.py run's, or a plain-loop run's (recipe, init, guard) at its last
logged step. A guard that fails exits 1 once its section is written; --quick checks the pipeline and exits 0 whatever
its guards say. The evaluation logs of the runs are copied to assets/logs/, the numbers to assets/results.json and
assets/results.md, plots to assets/*.png (matplotlib, optional).
"""

import concurrent.futures
import contextlib
import glob
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

import sample
from common import (ASSIGN_TOKENS, ArgumentParser, answers_right, as_flag, assign_batch, batch_generator, c4_batch,
                    cpu_has_native_bf16, git_commit, load_shards, make_dir, read_jsonl, write_atomic, write_json,
                    write_jsonl)
from selective_gpt import GPT, GPTConfig, future_mask, head0_logits, selective_mask
from train import FIELDS_BEFORE, fill_in, get_parser as train_parser

HERE = os.path.dirname(os.path.abspath(__file__))
# The C4 runs share one model and schedule: 4 layers, 128 wide, 1,500 steps of 2,048 tokens (3.1M tokens per run),
# bf16, nanoGPT's initialisation (std 0.02, SPEC §10), validation on a fixed 40 batches every 250 steps (the
# checkpoints a resumed run continues from).
C4_RUN = dict(n_layer=4, n_embd=128, max_iters=1500, eval_interval=250, eval_iters=40, warmup_iters=100,
              dtype="bfloat16", init_std=0.02)
FULL = {
    # the learning rate: the best of `learning_rates` for the standard model (`lr_sweep`), then used for every run
    "heads": dict(C4_RUN, block_size=128, batch_size=16, heads=[1, 2, 4, 8], seeds=[1, 2, 3],
                  learning_rates=[5e-4, 1e-3, 2e-3], lr_sweep=dict(n_head=4, seed=1), workers=2,
                  # if the sweep's best is at an edge of its grid, the standard model at check_doublings rates
                  # beyond it (2x, 4x; or 1/2x, 1/4x), then both variants with check_seeds at the best rate of all,
                  # if it is not the chosen one (`rate_check`)
                  check_doublings=2, check_seeds=[1, 2, 3]),
    "ablations": dict(rules=["mask_bos", "mask_self"], n_head=4, seeds=[1, 2]),  # trained like heads
    "assign": dict(n_layer=4, n_embd=128, n_head=4, block_size=96, batch_size=16, max_iters=1500, eval_interval=100,
                   eval_iters=20, learning_rate=1e-3, warmup_iters=100, init_std=0.02, dtype="bfloat16",
                   budgets=[2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96]),
    # per block size: the batch that keeps 2,048 tokens per step, and the memory loss weights of its selective models
    # (block 1024, batch 2, weight 0.1 is the paper's 25x case; not run here: docs/RESULTS.md, Context pruning)
    "pruning": dict(C4_RUN, n_head=4, runs=[dict(block_size=512, batch_size=4, weights=[0.0, 0.1])],
                    search_batches=10, shrink=0.7),
    # the block-512 selective model of the pruning runs (memory loss weights: add 0.1 for its other one), trained
    # the same way but in float32 (a CPU without AVX512-BF16 or AMX emulates bf16 ~100x slower: docs/PERFORMANCE.md)
    "tiles": dict(C4_RUN, n_head=4, block_size=512, batch_size=4, learning_rate=2e-3, dtype="float32",
                  weights=[0.0], tile=64, thresholds=[10, 20, 30], batches=10),
    "recipe": dict(train=dict(n_layer=4, block_size=128, batch_size=16, max_iters=1500, eval_iters=40), n_head=4,
                   workers=2,
                   # one candidate cause at a time: 600 steps of the 1500-step schedule, seed 1
                   diagnosis=dict(recipes=["plain", "clip", "beta2", "init", "untied", "lr1e-3"], seeds=[1], stop=600),
                   # the whole schedule, 3 seeds: train.py's recipe; then it and the plain recipe with the width
                   # rule (SPEC §10) in float32 (a CPU without AVX512-BF16 or AMX emulates bf16)
                   confirmation=[dict(recipes=["train_py"], seeds=[1, 2, 3]),
                                 dict(recipes=["train_py", "plain"], seeds=[1, 2, 3], init="width", dtype="float32")],
                   # the guard: the plain recipe with the clipping it needs, 2 seeds, 600 steps
                   guard=dict(recipes=["clip"], seeds=[1, 2], stop=600)),
    # SPEC §10; the assign loop at the sizes of a 10k-step key-value recall measurement with std 0.02 (2 layers, 128
    # wide, block 64, batch 32; docs/RESULTS.md, Initialisation), but 2,500 steps: on this task both variants have
    # flattened by then (the 10k-step runs of seed 0, same place)
    "init": dict(candidates=["nanogpt", "width", "width_qk0"], seeds=[0, 1, 2],
                 loops=["assign", "c4_plain", "c4_train_py"], n_head=4,
                 workers=2, assign=dict(n_layer=2, block_size=64, batch_size=32, max_iters=2500, eval_iters=20,
                                        every=250),
                 # the steps at which the table gives each task's accuracy (assign) or validation loss (C4)
                 early=dict(assign=[250, 500], c4=[200, 400]),
                 # C4: the 0.02 baseline and the assign loop's winner (SPEC §10; docs/RESULTS.md, Initialisation),
                 # in float32, as a CPU without AVX512-BF16 or AMX emulates bf16 (docs/PERFORMANCE.md, CPU dtype)
                 c4_candidates=["nanogpt", "width"],
                 c4=dict(n_layer=4, block_size=128, batch_size=16, max_iters=1500, eval_iters=40, stop=600,
                         every=100, dtype="float32")),
}
# the heads table again with the width rule (SPEC §10), in float32 (as tiles); run names end in -<tag>
WIDTH_RUN = dict(init_std="width", dtype="float32", tag="width-float32")
FULL["heads_width"] = dict(FULL["heads"], **WIDTH_RUN)
# the assign plain loop with the default initialisation (GPTConfig.init_std, SPEC §10): init's runs, shared with it
FULL["guard"] = dict(init="width", seeds=FULL["init"]["seeds"], min_accuracy=0.9, error_share=0.2)
QUICK_RUN = dict(n_layer=2, n_embd=32, max_iters=6, eval_interval=3, eval_iters=2, warmup_iters=2)
QUICK = {
    "heads": dict(FULL["heads"], **QUICK_RUN, block_size=32, batch_size=8, heads=[1, 2], seeds=[1, 2],
                  learning_rates=[1e-3, 2e-3], lr_sweep=dict(n_head=2, seed=1), check_doublings=1,
                  check_seeds=[1, 2]),
    "ablations": dict(FULL["ablations"], n_head=2),
    "assign": dict(FULL["assign"], n_layer=2, n_embd=32, block_size=24, batch_size=8, max_iters=20, eval_interval=10,
                   eval_iters=2, warmup_iters=5, budgets=[2, 4, 24]),
    "pruning": dict(FULL["pruning"], **QUICK_RUN, runs=[dict(block_size=32, batch_size=8, weights=[0.0, 0.1])],
                    search_batches=2, shrink=0.5),
    "tiles": dict(FULL["tiles"], **QUICK_RUN, block_size=32, batch_size=2, weights=[0.0, 0.1], tile=8, batches=2),
    "recipe": dict(FULL["recipe"], train=dict(n_layer=1, block_size=32, batch_size=2, max_iters=100, eval_iters=2),
                   diagnosis=dict(recipes=["plain", "clip"], seeds=[1], stop=50),
                   confirmation=[dict(recipes=["train_py"], seeds=[1, 2]),
                                 dict(recipes=["train_py", "plain"], seeds=[1, 2], init="width", dtype="float32")],
                   guard=dict(recipes=["clip"], seeds=[1, 2], stop=50)),
    "init": dict(FULL["init"], seeds=[0, 1], early=dict(assign=[10, 20], c4=[25]),
                 assign=dict(n_layer=1, block_size=16, batch_size=4, max_iters=20, eval_iters=2, every=10),
                 c4=dict(n_layer=1, block_size=32, batch_size=2, max_iters=100, eval_iters=2, stop=50, every=25,
                         dtype="float32")),
}
QUICK["heads_width"] = dict(QUICK["heads"], **WIDTH_RUN)
QUICK["guard"] = dict(FULL["guard"], seeds=QUICK["init"]["seeds"])
SECTIONS = ("heads", "heads_width", "ablations", "assign", "pruning", "tiles", "recipe", "init", "guard")
DATA_SEED = 1337  # every run sees the same batches in the same order
# glibc gives every freed block of over 32 MiB back to the OS, so a CPU training step page-faults its large
# activations (the logits alone are batch x T x 50304 floats) in again at every iteration. Keeping freed memory
# makes the runs and the budget searches here about 2x faster, standard and selective alike (docs/PERFORMANCE.md).
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def train(name, out_root, flags, max_iters, threads=None):
    """Run train.py into out_root/name unless it finished already (a run cut short continues from its last
    checkpoint); return its records. threads: torch's CPU threads for the run (None: torch's default)."""
    out = os.path.join(out_root, name)
    log = os.path.join(out, "log.jsonl")
    flags = [*flags, "--max_iters", str(max_iters), "--data_seed", str(DATA_SEED), "--log_interval", str(max_iters)]
    if finished(log, max_iters):
        print(f"  {name}: finished already", flush=True)
    else:
        resume = os.path.exists(os.path.join(out, "ckpt.pt")) and os.path.exists(log)
        if resume:
            check_settings(log, flags)
        elif os.path.exists(out):
            print(f"  {name}: {out} holds no run to continue (no ckpt.pt and log.jsonl): starting it again", flush=True)
            shutil.rmtree(out)
        cmd = [sys.executable, os.path.join(HERE, "train.py"), *flags, "--out_dir", out] + ["--resume"] * resume
        print(f"  {name}: {' '.join(cmd[2:])}", flush=True)
        if "bfloat16" in flags and not cpu_has_native_bf16():
            print("  note: bfloat16, which this CPU emulates (it has neither AVX512-BF16 nor AMX): each step takes "
                  "many times longer than on one that has them (docs/PERFORMANCE.md, CPU dtype)", flush=True)
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        started = time.time()
        result = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"experiments.py: {name} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
        print(f"  {name}: done in {time.time() - started:.0f} s", flush=True)
    check_settings(log, flags)
    return read_log(log)


def finished(log, max_iters):
    return os.path.exists(log) and any(r.get("iter") == max_iters and "val_loss" in r for r in read_log(log))


def read_log(path):
    """A run's log (common.read_jsonl); a damaged one stops the experiments with what to do."""
    try:
        return read_jsonl(path)
    except ValueError as e:  # a train.py run is its folder (train replaces it whole), a plain-loop run its log
        run = os.path.dirname(path) if os.path.basename(path) == "log.jsonl" else path
        raise SystemExit(f"experiments.py: {e}: mend that line, or delete {run} to train that run again from its "
                         f"first step") from None


# where and how a run ran, not what it computes: a log and the flags asked now may differ in these (the data it read,
# --data_dir, is compared: a run on other shards is not the run asked for)
NOT_COMPARED = ("out_dir", "device", "compile", "resume", "overwrite", "peak_flops")


def check_settings(log, flags):
    """A run found in out_dir must be the run asked for: every setting as train.py resolves the flags, its defaults
    included, as its log's header says (a changed setting here or default there must not reuse old runs). A model
    setting the log lacks had its value then (FIELDS_BEFORE); another is not compared."""
    config, asked = FIELDS_BEFORE | read_log(log)[0]["config"], vars(fill_in(train_parser().parse_args(flags)))
    for settings in (config, asked):  # the same shards by any path (train.py runs from HERE)
        settings["data_dir"] = os.path.realpath(os.path.join(HERE, settings["data_dir"]))
    differ = [f"--{key} {as_flag(key, config[key])} (asked: {as_flag(key, value)})" for key, value in asked.items()
              if key not in NOT_COMPARED and key in config and config[key] != value]
    if differ:
        raise SystemExit(f"experiments.py: {os.path.dirname(log)} is a run with other settings: {', '.join(differ)}."
                         f" Delete it, or give another --out_dir")


def train_all(jobs, out_root, workers=1):
    """Train jobs [(name, flags, max_iters)], `workers` at a time with an equal share of the CPU threads each
    (on 2 cores two 1-thread runs beat one 2-thread run); returns {name: records}."""
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(train, name, out_root, flags, max_iters, threads)
                   for name, flags, max_iters in jobs}
        try:
            return {name: future.result() for name, future in futures.items()}
        except RuntimeError as e:
            for future in futures.values():
                future.cancel()
            raise SystemExit(str(e))


TRAIN_FLAGS = ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "eval_interval", "eval_iters",
               "learning_rate", "warmup_iters", "dtype", "init_std")


def train_flags(cfg, **extra):
    """train.py flags from an experiment's settings, overridden and extended by extra (True: a switch, False: left
    out)."""
    flags = []
    for key, value in ({k: cfg[k] for k in TRAIN_FLAGS if k in cfg} | extra).items():
        if value is not False:
            flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return flags


def train_and_keep(name, cfg, out_root, assets, **extra):
    """train() a run with the experiment's flags and extra, and keep its log in assets; returns its records."""
    records = train(name, out_root, train_flags(cfg, **extra), cfg["max_iters"])
    keep_log(records, name, assets)
    return records


def evals(records):
    return [r for r in records if "val_loss" in r]


def keep_log(records, name, assets):
    """The header, evaluation and resume records of a run, for the repository: enough to redraw every plot and to
    sum its run time."""
    os.makedirs(os.path.join(assets, "logs"), exist_ok=True)
    with open(os.path.join(assets, "logs", name + ".jsonl"), "w") as f:
        for r in records:
            if "config" in r or "val_loss" in r or "resumed_at" in r:
                f.write(json.dumps(r) + "\n")


def run_seconds(records):
    """A run's training time from its log's elapsed_s, summed over the pieces of a resumed run."""
    total = last = 0.0
    for r in records:
        # a resume starts its clock again; a log kept without its resume records shows it as a drop
        if "resumed_at" in r or r.get("elapsed_s", last) < last:
            total, last = total + last, 0.0
        last = r.get("elapsed_s", last)
    return total + last


def mean_sd(values):
    return {"values": values, "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


# ----------------------------------------------------------------------------------------------------------------
# heads: does selective attention with H heads reach standard attention with 2H (SPEC §6)? Every run sees the same
# batches in the same order; the two variants of a pair share their initialisation seed.

def c4_run(cfg, data_dir, n_head, seed, selective, learning_rate, **extra):
    """(name, flags, max_iters) of one C4 run with the heads settings."""
    rules = "".join(f"-{key}" if value is True else f"-{key}_{value}" for key, value in extra.items() if value)
    name = f"heads-{'sel' if selective else 'std'}{rules}-h{n_head}-s{seed}-lr{learning_rate:g}" + \
        (f"-{cfg['tag']}" if "tag" in cfg else "")
    flags = train_flags(cfg, n_head=n_head, seed=seed, dataset="c4", data_dir=data_dir, selective=selective,
                        learning_rate=learning_rate, **extra)
    return name, flags, cfg["max_iters"]


def lr_sweep(cfg, data_dir, out_root, assets):
    """The standard model's learning rate: the best final validation loss of cfg['learning_rates'] (one seed), so
    the baseline is not handicapped; every heads, ablation and pruning run uses it."""
    sweep = cfg["lr_sweep"]
    jobs = [c4_run(cfg, data_dir, sweep["n_head"], sweep["seed"], False, lr) for lr in cfg["learning_rates"]]
    logs = train_all(jobs, out_root, cfg["workers"])
    for name, records in logs.items():
        keep_log(records, name, assets)
    losses = {lr: evals(logs[name])[-1]["val_loss"] for lr, (name, _, _) in zip(cfg["learning_rates"], jobs)}
    return {"n_head": sweep["n_head"], "seed": sweep["seed"], "val_loss": {f"{lr:g}": v for lr, v in losses.items()},
            "chosen": min(losses, key=losses.get), "run_seconds": sum(map(run_seconds, logs.values()))}


def heads_experiment(cfg, data_dir, out_root, assets):
    sweep = lr_sweep(cfg, data_dir, out_root, assets)
    lr = sweep["chosen"]
    # seed-major, so that a sweep cut short has whole seeds
    jobs = {(H, sel, seed): c4_run(cfg, data_dir, H, seed, sel, lr)
            for seed in cfg["seeds"] for H in cfg["heads"] for sel in (False, True)}
    logs = train_all(list(jobs.values()), out_root, cfg["workers"])
    for name, records in logs.items():
        keep_log(records, name, assets)
    loss = {key: evals(logs[job[0]])[-1]["val_loss"] for key, job in jobs.items()}
    rows = []
    for H in cfg["heads"]:
        std = [loss[(H, False, s)] for s in cfg["seeds"]]
        sel = [loss[(H, True, s)] for s in cfg["seeds"]]
        row = {"n_head": H, "standard": mean_sd(std), "selective": mean_sd(sel),
               "gap": mean_sd([a - b for a, b in zip(std, sel)])}  # standard - selective, same seed
        if 2 * H in cfg["heads"]:
            std2 = [loss[(2 * H, False, s)] for s in cfg["seeds"]]
            row["standard_2H"] = mean_sd(std2)
            row["gap_2H"] = mean_sd([a - b for a, b in zip(std2, sel)])  # standard 2H - selective H, same seed
        rows.append(row)
    tokens = cfg["max_iters"] * cfg["batch_size"] * cfg["block_size"]
    return {"init_std": cfg["init_std"], "dtype": cfg["dtype"], "lr_sweep": sweep, "learning_rate": lr, "rows": rows,
            "tokens_per_run": tokens, "run_seconds": sum(map(run_seconds, logs.values())),
            "rate_check": rate_check(cfg, data_dir, out_root, assets, sweep, loss)}


def rate_check(cfg, data_dir, out_root, assets, sweep, loss):
    """Is the baseline handicapped by the sweep's grid? If the chosen rate is the grid's largest (smallest), the
    standard model (the sweep's head count and seed) at cfg['check_doublings'] rates above (below) it, each twice
    (half) the last; if one of them beats the chosen rate, both variants at the best rate of all with each of
    cfg['check_seeds'], the same comparison as a heads row. loss: the heads runs' final validation losses, by (H,
    selective, seed)."""
    H, seed, chosen, grid = sweep["n_head"], sweep["seed"], sweep["chosen"], cfg["learning_rates"]
    step = 2.0 if chosen == max(grid) else 0.5 if chosen == min(grid) else None
    beyond = [chosen * step ** k for k in range(1, cfg["check_doublings"] + 1)] if step else []
    jobs = [c4_run(cfg, data_dir, H, seed, False, lr) for lr in beyond]
    logs = train_all(jobs, out_root, cfg["workers"])
    rates = {float(lr): v for lr, v in sweep["val_loss"].items()}
    rates |= {lr: evals(logs[name])[-1]["val_loss"] for lr, (name, _, _) in zip(beyond, jobs)}
    best = min(rates, key=rates.get)
    result = {"n_head": H, "seed": seed, "val_loss": {f"{lr:g}": v for lr, v in sorted(rates.items())},
              "best": best, "run_seconds": sum(map(run_seconds, logs.values()))}
    if best != chosen:
        seeds = cfg["check_seeds"]
        pairs = {(sel, s): c4_run(cfg, data_dir, H, s, sel, best) for s in seeds for sel in (False, True)}
        logs |= train_all(list(pairs.values()), out_root, cfg["workers"])
        at_best = {key: evals(logs[job[0]])[-1]["val_loss"] for key, job in pairs.items()}
        std = [at_best[(False, s)] for s in seeds]
        sel = [at_best[(True, s)] for s in seeds]
        result |= {"standard": mean_sd(std), "selective": mean_sd(sel),
                   "gap": mean_sd([a - b for a, b in zip(std, sel)]),  # standard - selective, same seed
                   # selective at the chosen rate (the heads table) against standard at its best
                   "gap_chosen_selective": mean_sd([a - loss[(H, True, s)] for a, s in zip(std, seeds)]),
                   "run_seconds": sum(map(run_seconds, logs.values()))}
    for name, records in logs.items():
        keep_log(records, name, assets)
    return result


# ----------------------------------------------------------------------------------------------------------------
# ablations: the selection rule without BOS protection and with self-masking (SPEC §9), trained like heads.

def ablations_experiment(cfg, heads_cfg, data_dir, out_root, assets):
    """§9: each ablation of the selection rule at n_head = cfg['n_head'], trained like the heads runs; beside it
    the heads runs of the same seeds (selective and standard)."""
    lr = lr_sweep(heads_cfg, data_dir, out_root, assets)["chosen"]
    H, seeds = cfg["n_head"], cfg["seeds"]
    variants = {"standard": dict(selective=False), "selective": dict(selective=True)}
    # the control: SPEC §1 on the path the ablations run on (mask), so a difference is the rule's, not rounding's
    variants["selective_mask"] = dict(selective=True, attention="mask")
    variants |= {rule: dict(selective=True, **{rule: True}) for rule in cfg["rules"]}
    jobs = {(v, s): c4_run(heads_cfg, data_dir, H, s, learning_rate=lr, **kw)
            for s in seeds for v, kw in variants.items()}
    logs = train_all(list(jobs.values()), out_root, heads_cfg["workers"])
    for name, records in logs.items():
        keep_log(records, name, assets)
    loss = {key: evals(logs[job[0]])[-1]["val_loss"] for key, job in jobs.items()}
    ablated = [job[0] for (v, _), job in jobs.items() if v in cfg["rules"] or v == "selective_mask"]
    return {"n_head": H, "learning_rate": lr, "run_seconds": sum(run_seconds(logs[name]) for name in ablated),
            "rows": [{"variant": v, **mean_sd([loss[(v, s)] for s in seeds])} for v in variants]}


# ----------------------------------------------------------------------------------------------------------------
# assign: the variable-assignment task (common.assign_batch), answer accuracy over training and per pruning budget.

def assign_experiment(cfg, out_root, assets):
    curves = {}
    for selective in (False, True):
        name = f"assign-{'sel' if selective else 'std'}"
        records = train_and_keep(name, cfg, out_root, assets, dataset="assign", seed=1, selective=selective)
        curves[name] = [(r["iter"], r["val_accuracy"]) for r in evals(records)]
    model, run = sample.load_model(os.path.join(out_root, "assign-sel"), "ckpt.pt", "cpu")
    batches = list(sample.validation_batches(run, cfg["eval_iters"], cfg["batch_size"], "cpu"))
    by_budget = [{"budget": b, "accuracy": accuracy(model, batches, b)} for b in cfg["budgets"]]
    unpruned = accuracy(model, batches, None)
    equal = [r["budget"] for r in by_budget if r["accuracy"] >= unpruned - 0.005]
    return {"curves": curves, "unpruned_accuracy": unpruned, "by_budget": by_budget,
            "smallest_budget_within_half_a_point": min(equal) if equal else None, "block_size": cfg["block_size"]}


@torch.no_grad()
def accuracy(model, batches, budget):
    right = [answers_right(model(x, targets=y, budgets=budget)[0], y) for x, y in batches]
    return sum(r for r, _ in right) / sum(n for _, n in right)


# ----------------------------------------------------------------------------------------------------------------
# pruning: how far the KV cache can shrink (SPEC §4): greedy per-layer budgets, checked on held-out batches.

def pruning_experiment(cfg, heads_cfg, data_dir, out_root, assets):
    """Per block size: a standard model, and selective ones per memory loss weight, trained like the heads runs (the
    heads sweep's learning rate, the same tokens per step and steps). Each selective model gets two greedy budget
    searches: down to the standard model's val ppl (the paper's criterion, SPEC §4), and down to its own unpruned
    val ppl + 1% (how far it can be pruned at all); and the no-context control. The searches pick budgets on their
    batches, so the found budgets are scored again on as many held-out batches."""
    lr = lr_sweep(heads_cfg, data_dir, out_root, assets)["chosen"]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    jobs = []
    for run in cfg["runs"]:
        T = run["block_size"]
        base = dict(dataset="c4", data_dir=data_dir, seed=1, block_size=T, batch_size=run["batch_size"],
                    learning_rate=lr)
        jobs.append((f"pruning-std-T{T}-lr{lr:g}", train_flags(cfg, **base), cfg["max_iters"]))
        jobs += [(f"pruning-sel-T{T}-eps{w}-lr{lr:g}", train_flags(cfg, selective=True, memory_loss_weight=w, **base),
                  cfg["max_iters"]) for w in run["weights"]]
    logs = train_all(jobs, out_root, heads_cfg["workers"])
    for name, records in logs.items():
        keep_log(records, name, assets)
    results = []
    for run in cfg["runs"]:
        T = run["block_size"]
        std_model, std_run = sample.load_model(os.path.join(out_root, f"pruning-std-T{T}-lr{lr:g}"), "ckpt.pt", "cpu")
        n = cfg["search_batches"]
        batches, held_out = (list(sample.validation_batches(std_run, n, run["batch_size"], "cpu", first=first))
                             for first in (0, n))
        standard_ppl = sample.perplexity(std_model, batches, ctx)
        standard_held_out = sample.perplexity(std_model, held_out, ctx)
        for weight in run["weights"]:
            name = f"pruning-sel-T{T}-eps{weight}-lr{lr:g}"
            model, _ = sample.load_model(os.path.join(out_root, name), "ckpt.pt", "cpu")
            row = {"block_size": T, "memory_loss_weight": weight, "standard_ppl": standard_ppl, "learning_rate": lr,
                   "run_seconds": run_seconds(logs[name]) + run_seconds(logs[f"pruning-std-T{T}-lr{lr:g}"])}
            for key, target in (("vs_standard", standard_ppl), ("vs_itself", None)):
                if target is None:
                    target = row["unpruned_ppl"] * 1.01
                path = search(model, batches, ctx, target, cfg, os.path.join(out_root, name, f"search-{key}.json"))
                row["unpruned_ppl"] = path[0][1]
                budgets, ppl = path[-1]
                reached = ppl <= target
                row[key] = {"target_ppl": target, "budgets": budgets if reached else None,
                            "pruned_ppl": ppl if reached else None,
                            "memory_factor": sample.memory_factor(model, budgets) if reached else None,
                            "path": [{"budgets": b, "ppl": p, "memory_factor": sample.memory_factor(model, b)}
                                     for b, p in path]}
            # the control: BOS and the current token only (budget 2, SPEC §4). How much of the perplexity needs
            # context at all sets how far any pruning can go at this scale.
            row["no_context_ppl"] = sample.perplexity(model, batches, ctx, [2] * model.config.n_layer)
            # the searches chose their budgets on `batches`: score them where they did not look
            found = {key: row[key]["budgets"] for key in ("vs_standard", "vs_itself") if row[key]["budgets"]}
            row["held_out"] = {"standard_ppl": standard_held_out,
                               "unpruned_ppl": sample.perplexity(model, held_out, ctx),
                               **{key: sample.perplexity(model, held_out, ctx, b) for key, b in found.items()}}
            results.append(row)
    return results


def search(model, batches, ctx, target, cfg, path_json):
    """sample.find_budgets, kept in path_json: a rerun reuses a finished search with the same settings."""
    settings = {"target_ppl": target, "shrink": cfg["shrink"], "search_batches": cfg["search_batches"],
                "model": sample.model_fingerprint(model)}  # a retrained model gets a new search
    try:
        with open(path_json) as f:
            saved = json.load(f)
        if saved["settings"] == settings:
            print(f"  {path_json}: finished already", flush=True)
            return [tuple(step) for step in saved["path"]]
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, not this shape: a search to do again
        print(f"  {path_json}: damaged, searching again", flush=True)
    print(f"  {path_json}: budget search for val ppl <= {target:.3f}", flush=True)
    path = sample.find_budgets(model, batches, ctx, target, cfg["shrink"])
    write_json(path_json, {"settings": settings, "path": path})
    return path


# ----------------------------------------------------------------------------------------------------------------
# tiles: may the kernels one day skip masked tiles in training? A (query tile, key tile) pair below the diagonal
# whose every entry has F >= 10 scales each of its softmax weights by exp(-F) <= 4.5e-5 (SPEC §1.4): skipping it
# changes little. F never decreases down the queries (§1.3), so a key tile masked for a query tile's first row stays
# masked for all its rows, and a kernel can decide from that row alone.

def masked_tile_shares(F, tile, thresholds):
    """{threshold: the share of (query tile, key tile) pairs strictly below the diagonal whose every entry has
    F >= threshold}; F (B, T, T) of one layer, T a multiple of tile. Each tile's smallest F is on its first row."""
    B, T, _ = F.shape
    if T % tile:
        raise ValueError(f"the tile ({tile}) must divide the block ({T})")
    n = T // tile
    smallest = F[:, ::tile, :].reshape(B, n, n, tile).amin(-1)  # (B, query tile, key tile)
    below = torch.ones(n, n, dtype=torch.bool).tril(-1)
    return {str(t): (smallest[:, below] >= t).float().mean().item() for t in thresholds}


def tiles_experiment(cfg, data_dir, out_root, assets):
    """Train the selective models (one at a time, one thread), then per model and layer the shares of masked
    tiles over cfg['batches'] validation batches (each batch has as many pairs, so the mean is the pooled share)."""
    T, rows = cfg["block_size"], []
    for weight in cfg["weights"]:
        name = f"tiles-sel-T{T}-eps{weight}-lr{cfg['learning_rate']:g}-{cfg['dtype']}"
        flags = train_flags(cfg, dataset="c4", data_dir=data_dir, seed=1, selective=True, memory_loss_weight=weight)
        keep_log(train(name, out_root, flags, cfg["max_iters"], threads=1), name, assets)
        model, run = sample.load_model(os.path.join(out_root, name), "ckpt.pt", "cpu")
        per_layer = [[] for _ in range(model.config.n_layer)]
        for x, _ in sample.validation_batches(run, cfg["batches"], cfg["batch_size"], "cpu"):
            for layer, (F, _) in enumerate(model.selective_masks(x)):
                per_layer[layer].append(masked_tile_shares(F, cfg["tile"], cfg["thresholds"]))
        rows.append({"memory_loss_weight": weight, "val_loss": evals(read_log(
            os.path.join(out_root, name, "log.jsonl")))[-1]["val_loss"], "layers": [
            {t: statistics.mean(s[t] for s in shares) for t in shares[0]} for shares in per_layer]})
    return {"tile": cfg["tile"], "block_size": T, "dtype": cfg["dtype"], "rows": rows}


def tiles_table(result):
    thresholds = list(result["rows"][0]["layers"][0])
    lines = ["| memory loss weight | val loss | layer | " + " | ".join(f"F >= {t}" for t in thresholds) + " |",
             "|---:|---:|---:|" + "---:|" * len(thresholds)]
    for r in result["rows"]:
        for layer, shares in enumerate(r["layers"]):
            lines.append(f"| {r['memory_loss_weight']} | {r['val_loss']:.3f} | {layer} | " +
                         " | ".join(f"{shares[t]:.3f}" for t in thresholds) + " |")
    return lines + ["", f"(block {result['block_size']}, {result['dtype']}: the share of {result['tile']} x "
                        f"{result['tile']} tile pairs below the diagonal whose every entry has F >= the threshold)", ""]


# ----------------------------------------------------------------------------------------------------------------
# The plain loop (plain_run, shared by the sections recipe, init and guard): deliberately not train.py, but what a
# user writes (AdamW, warmup + cosine, optionally no clipping). Every `every` steps (PLAIN_LOOP's unless the
# settings say) it logs the diagnostics that tell the causes of a bad result apart; `stop` ends a run early.
# recipe: selective vs standard under that loop, where selective can train worse than standard (SPEC §8), with each
# candidate cause switched one at a time.

# The plain recipe, then one change each; "train_py" is train.py's optimiser defaults. A recipe's init_std redraws
# every matrix but the residual projections at that std; 0.02 keeps what GPTConfig drew for the job's `init` (INITS)
RECIPES = {
    "plain": dict(lr=2e-3, beta2=0.999, clip=0.0, decay_all=True, init_std=0.02, n_embd=128, tied=True),
}
RECIPES |= {
    "clip": dict(RECIPES["plain"], clip=1.0),
    "beta2": dict(RECIPES["plain"], beta2=0.95),
    "train_py": dict(RECIPES["plain"], lr=1e-3, beta2=0.95, clip=1.0, decay_all=False),
    "init": dict(RECIPES["plain"], init_std=0.05),
    "untied": dict(RECIPES["plain"], tied=False),
    "lr1e-3": dict(RECIPES["plain"], lr=1e-3),
    # the assign task's plain loop: AdamW at PyTorch's defaults (betas 0.9, 0.999; decay 0.01), a constant rate
    "assign": dict(RECIPES["plain"], lr=1e-3, weight_decay=0.01, schedule=False, bf16=False),
}
INITS = {"nanogpt": 0.02, "width": None, "width_qk0": 0.02}  # GPTConfig.init_std of each candidate (SPEC §10)


def plain_model(job):
    """The plain loop's model and optimiser for a job's recipe (init std, tied head, decay on every parameter) and
    initialisation candidate (INITS, SPEC §10)."""
    r, cfg, C = job["recipe"], job["cfg"], job["recipe"]["n_embd"]
    torch.manual_seed(job["seed"])
    model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=job["n_head"], n_embd=C, block_size=cfg["block_size"],
                          vocab_size=len(ASSIGN_TOKENS) if job.get("task") == "assign" else 50304, bias=False,
                          selective=job["selective"], init_std=INITS[job.get("init", "nanogpt")]))
    if job.get("init") == "width_qk0":  # the width rule's std on head 0's query and key rows only: the selection
        head_dim = C // job["n_head"]
        with torch.no_grad():
            for block in model.transformer.h:
                for rows in (slice(0, head_dim), slice(C, C + head_dim)):
                    block.attn.c_attn.weight[rows].normal_(std=1 / math.sqrt(3 * C))
    if r["init_std"] != 0.02:
        for pn, p in model.named_parameters():
            if p.dim() == 2 and not pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, std=r["init_std"])
    if not r["tied"]:
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone().normal_(std=0.02))
    if r["decay_all"]:
        return model, torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, r["beta2"]),
                                        weight_decay=r.get("weight_decay", 0.1))
    return model, model.configure_optimizers(0.1, r["lr"], (0.9, r["beta2"]), "cpu")


@torch.no_grad()
def diagnostics(model, probe, val, ctx, selective):
    """Per layer on the probe batch: the largest F, the share of F > 5, head 0's attention entropy; the val loss,
    and the answer accuracy where only some targets are scored (assign)."""
    model.eval()
    T = probe.size(1)
    pos = torch.arange(T)
    x = model.transformer.drop(model.transformer.wte(probe) + model.transformer.wpe(pos))
    out = {"max_F": [], "share_F_over_5": [], "head0_entropy": []}
    causal = ~future_mask(T, x.device)
    for block in model.transformer.h:
        _, seen = block.attn(block.ln_1(x), keep=True)
        logits0 = head0_logits(seen.q.float(), seen.k.float()).masked_fill(~causal, float("-inf"))
        F = selective_mask(logits0)
        p = torch.softmax(logits0 - F if selective else logits0, -1)
        out["max_F"].append(F.max().item())
        out["share_F_over_5"].append(((F > 5) & causal).sum().item() / (causal.sum().item() * x.size(0)))
        out["head0_entropy"].append(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean().item())
        x = block(x)[0]
    losses, right, scored = [], 0, 0
    for xv, yv in val:
        with ctx:
            logits, loss = model(xv, targets=yv)
        losses.append(loss.item())
        right, scored = (a + b for a, b in zip((right, scored), answers_right(logits, yv)))
    out["val_loss"] = sum(losses) / len(losses)
    if scored < sum(y.numel() for _, y in val):
        out["val_accuracy"] = right / max(scored, 1)
    model.train()
    return out


# What every plain-loop run shares besides its recipe and settings: warmup steps, the cosine's floor (the peak rate /
# min_lr_div), steps between logged records (unless its settings give `every`), the batches' seed. Each run keeps
# them with its settings (plain_config), so a change here refuses every finished plain-loop run (also those that
# never used the value changed, such as warmup in a run without a schedule) rather than reusing one.
PLAIN_LOOP = dict(warmup=100, min_lr_div=10, every=50, data_seed=DATA_SEED)
PLAIN_LOOP_BEFORE = dict(warmup=100, min_lr_div=10, every=50, data_seed=1337)  # of a log or checkpoint without them


def plain_checkpoint(path):
    """The checkpoint a plain run cut short keeps beside its log; a damaged one stops the experiments, saying what
    to do."""
    try:
        ckpt = torch.load(path, weights_only=True, mmap=True)  # mapped, not read: run_jobs wants its config only
        missing = {"config", "model", "optimizer", "records", "resumed_at"} - set(ckpt)
        if missing:
            raise KeyError(f"it lacks {', '.join(sorted(missing))}")
    except Exception as e:  # torch.load raises many types on a damaged file (zip, pickle, EOF)
        raise SystemExit(f"experiments.py: {path} is damaged ({type(e).__name__}: {str(e)[:200]}): delete it, and "
                         f"its run starts again from its first step") from None
    return ckpt


def plain_run(job):
    """One plain-loop training run (a worker process, 1 thread); writes out/<name>.jsonl, returns its path. At every
    logged step it keeps a checkpoint beside the log, from which a run cut short continues exactly."""
    r, cfg, log_path, ckpt_path = job["recipe"], job["cfg"], job["log"], job["log"] + ".ckpt"
    if os.path.exists(log_path):
        return log_path
    torch.set_num_threads(1)
    T, B, steps, seed = cfg["block_size"], cfg["batch_size"], cfg["max_iters"], PLAIN_LOOP["data_seed"]
    # stop: train only to here (the schedule still spans max_iters), a cheap first look
    every, stop = cfg.get("every", PLAIN_LOOP["every"]), cfg.get("stop") or steps
    if job.get("task") == "assign":
        batch = lambda split, step, micro: assign_batch(B, T, batch_generator(seed, split, step, micro))  # noqa
    else:
        shards = {"train": load_shards(job["data_dir"], "train"), "val": load_shards(job["data_dir"], "validation")}
        batch = lambda split, step, micro: c4_batch(shards[split], B, T,  # noqa: E731
                                                    batch_generator(seed, split, step, micro))
    val = [batch("val", -1, i) for i in range(cfg["eval_iters"])]
    model, opt = plain_model(job)
    params, warmup, min_lr = list(model.parameters()), PLAIN_LOOP["warmup"], r["lr"] / PLAIN_LOOP["min_lr_div"]
    dtype = plain_dtype(job)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    head_dim, C = r["n_embd"] // job["n_head"], r["n_embd"]
    records, window, started, resumed_at = [], [], time.time(), []
    if os.path.exists(ckpt_path):  # (run_jobs checked its settings) the batches are the step's, no other randomness
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        records, started = ckpt["records"], started - ckpt["records"][-1]["elapsed_s"]
        resumed_at = ckpt["resumed_at"] + [records[-1]["iter"]]
    for it in range(records[-1]["iter"] if records else 0, steps + 1):
        if (it % every == 0 or it == stop) and not (records and records[-1]["iter"] == it):
            rec = {"iter": it, **diagnostics(model, val[0][0], val, ctx, job["selective"]),
                   "elapsed_s": round(time.time() - started, 1)}
            records.append(rec | {k: max(w[k] for w in window) if k.endswith("max") else
                                  sum(w[k] for w in window) / len(window) for k in (window[0] if window else {})})
            window = []
            state = {"config": plain_config(job), "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "records": records, "resumed_at": resumed_at}
            write_atomic(ckpt_path, lambda tmp: torch.save(state, tmp))
        if it == stop:
            break
        for g in opt.param_groups:  # warmup and cosine decay, or (schedule False) the rate throughout
            g["lr"] = r["lr"] if not r.get("schedule", True) else r["lr"] * (it + 1) / (warmup + 1) if it < warmup \
                else min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (steps - warmup))) * (r["lr"] - min_lr)
        x, y = batch("train", it, 0)
        with ctx:
            _, loss = model(x, targets=y)
        loss.backward()
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        qk0 = torch.linalg.vector_norm(torch.stack([
            torch.cat([b.attn.c_attn.weight.grad[:head_dim], b.attn.c_attn.weight.grad[C:C + head_dim]]).norm()
            for b in model.transformer.h])).item()
        if r["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, r["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append({"loss": loss.item(), "grad_norm": total, "grad_norm_max": total, "grad_norm_qk0": qk0,
                       "grad_norm_qk0_max": qk0, **adam_steps(model, opt, head_dim, C, r["beta2"])})
    write_jsonl(log_path, [{"git_commit": git_commit(), "config": plain_config(job), "dtype": dtype,
                            **({"resumed_at": resumed_at} if resumed_at else {})}] + records)
    os.remove(ckpt_path)
    return log_path


def plain_dtype(job):
    """A plain-loop run's dtype, bfloat16 (autocast) or float32: its recipe's choice, unless its settings say
    float32."""
    dtype = job["cfg"].get("dtype", "bfloat16")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"a plain run's dtype is bfloat16 or float32, not {dtype!r}")
    return "bfloat16" if job["recipe"].get("bf16", True) and dtype == "bfloat16" else "float32"


def plain_config(job):
    """A plain-loop run's settings, as its log's header keeps them (JSON's types)."""
    return json.loads(json.dumps({"name": job["name"], "recipe": job["recipe"], **job["cfg"], "plain_loop": PLAIN_LOOP,
                                  "seed": job["seed"], "n_head": job["n_head"], "selective": job["selective"],
                                  **{k: job[k] for k in ("task", "init") if k in job}}))


def adam_steps(model, opt, head_dim, C, beta2):
    """The size of Adam's last update relative to the learning rate, |m_hat| / (sqrt(v_hat) + eps), averaged over
    head 0's query and key rows (the selection's weights) and over the other heads' query and key rows."""
    head0, rest = [], []
    for block in model.transformer.h:
        state = opt.state[block.attn.c_attn.weight]
        step = float(state["step"])
        m_hat, v_hat = state["exp_avg"] / (1 - 0.9 ** step), state["exp_avg_sq"] / (1 - beta2 ** step)
        ratio = m_hat.abs() / (v_hat.sqrt() + 1e-8)
        head0 += [ratio[:head_dim], ratio[C:C + head_dim]]
        rest += [ratio[head_dim:C], ratio[C + head_dim:2 * C]]
    return {"adam_step_qk0": torch.cat(head0).mean().item(), "adam_step_qk_rest": torch.cat(rest).mean().item()}


def run_jobs(jobs, workers):
    """Run plain_run jobs, `workers` at a time (one thread each: on 2 cores two 1-thread runs beat one 2-thread)."""
    import multiprocessing
    todo = [j for j in jobs if not os.path.exists(j["log"])]
    for j in jobs:
        ckpt = j["log"] + ".ckpt"
        if j not in todo and os.path.exists(ckpt):  # left by a run stopped between writing its log and deleting it
            os.remove(ckpt)
        cut = os.path.exists(ckpt)
        print(f"  {j['name']}: {'finished already' if j not in todo else 'continues' if cut else 'to run'}", flush=True)
        settings = {"plain_loop": PLAIN_LOOP_BEFORE} | (read_log(j["log"])[0]["config"] if j not in todo else
                    plain_checkpoint(ckpt)["config"] if cut else plain_config(j))
        if settings != plain_config(j):  # a changed setting in this file
            raise SystemExit(f"experiments.py: {ckpt if cut else j['log']} is a run with other settings than "
                             f"{j['name']} has now: delete it, or give another --out_dir")
    if any(plain_dtype(j) == "bfloat16" for j in todo) and not cpu_has_native_bf16():
        print("  note: the C4 runs autocast to bfloat16, which this CPU emulates (it has neither AVX512-BF16 nor AMX):"
              " each step takes many times longer than on one that has them (docs/PERFORMANCE.md, CPU dtype)",
              flush=True)
    if todo:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for path in pool.imap_unordered(plain_run, todo):
                print(f"  done: {path}", flush=True)
    out = {}
    for j in jobs:
        out[j["name"]] = read_log(j["log"])
    return out


def recipe_jobs(cfg, stage, data_dir, out_root):
    """The runs of one stage: {recipes, seeds, stop (optional)}; each recipe x seed x {standard, selective}."""
    jobs = []
    for recipe in stage["recipes"]:
        for seed in stage["seeds"]:
            for selective in (False, True):
                name = f"recipe-{recipe}-{'sel' if selective else 'std'}-s{seed}"
                if stage.get("stop"):
                    name += f"-stop{stage['stop']}"
                job = dict(recipe_name=recipe, recipe=RECIPES[recipe], cfg=dict(cfg["train"], stop=stage.get("stop")),
                           seed=seed, n_head=cfg["n_head"], selective=selective, data_dir=data_dir)
                if "init" in stage:  # another initialisation than 0.02 (INITS): named apart
                    if RECIPES[recipe]["init_std"] != 0.02:
                        raise ValueError(f"recipe {recipe} draws its own init std: a stage cannot give it "
                                         f"{stage['init']}")
                    name, job["init"] = f"{name}-{stage['init']}", stage["init"]
                if "dtype" in stage:  # another dtype than the recipe's bf16: named apart
                    name, job["cfg"]["dtype"] = f"{name}-{stage['dtype']}", stage["dtype"]
                jobs.append(dict(job, name=name, log=os.path.join(out_root, "recipe", name + ".jsonl")))
    return jobs


def recipe_rows(jobs, logs):
    """Per recipe: each variant's final validation losses over the seeds, and what the diagnostics say about the
    first 100 steps (the largest gradient norms) and the steps after (Adam's update size on head 0's q/k rows)."""
    rows = []
    def kind(j):
        return j["recipe_name"], j.get("init", "nanogpt"), plain_dtype(j)
    for recipe, init, dtype in dict.fromkeys(map(kind, jobs)):
        group = [j for j in jobs if kind(j) == (recipe, init, dtype)]
        row = {"recipe": recipe, "settings": RECIPES[recipe], "init": init, "dtype": dtype}
        for variant in ("std", "sel"):
            mine = [logs[j["name"]] for j in group if j["selective"] == (variant == "sel")]
            row[variant] = [log[-1]["val_loss"] for log in mine]
            row[f"{variant}_step"] = mine[0][-1]["iter"]
            early = [r for log in mine for r in log[1:] if "grad_norm_max" in r and r["iter"] <= 100]
            row[f"{variant}_grad_norm_max_first_100"] = max(r["grad_norm_max"] for r in early)
            row[f"{variant}_qk0_grad_norm_max_first_100"] = max(r["grad_norm_qk0_max"] for r in early)
            later = [r for r in mine[0][1:] if "adam_step_qk0" in r and 100 < r["iter"] <= 600]
            row[f"{variant}_adam_step_qk0"] = statistics.mean(r["adam_step_qk0"] for r in later) if later else None
            row[f"{variant}_adam_step_rest"] = statistics.mean(r["adam_step_qk_rest"] for r in later) if later else None
        rows.append(row)
    return rows


def recipe_experiment(cfg, data_dir, out_root, assets):
    """The diagnosis and the confirmation (RECIPES; docs/RESULTS.md, The training recipe)."""
    os.makedirs(os.path.join(out_root, "recipe"), exist_ok=True)
    out = {}
    for key, stages in (("diagnosis", [cfg["diagnosis"]]), ("confirmation", cfg["confirmation"]),
                        ("guard", [cfg["guard"]])):
        jobs = [j for stage in stages for j in recipe_jobs(cfg, stage, data_dir, out_root)]
        logs = run_jobs(jobs, cfg["workers"])
        out[key] = recipe_rows(jobs, logs)
        for name, records in logs.items():
            keep_log(records, name, assets)
    return out


# ----------------------------------------------------------------------------------------------------------------
# init: the weights' std at initialisation (SPEC §10), seeds x loops x candidates x {standard, selective}, all in the
# plain loop: the assign task (AdamW at PyTorch's defaults, no schedule, no clipping; `candidates`), then C4 with the
# plain recipe and with train.py's recipe (`c4_candidates`). The logs keep the diagnostics (gradient norms, largest
# F, share of F > 5, head 0's entropy).

# loop: (task, RECIPES key); every loop is plain_run, c4_train_py too (train.py's optimiser settings, not train.py)
INIT_LOOPS = {"assign": ("assign", "assign"), "c4_plain": ("c4", "plain"), "c4_train_py": ("c4", "train_py")}


def init_jobs(cfg, data_dir, out_root):
    """Per seed, loop, candidate and variant, one plain_run job: seed-major, so a sweep cut short has whole seeds
    (and on a fresh start the cheap assign runs of later seeds wait behind the C4 runs of the first)."""
    jobs = []
    for seed in cfg["seeds"]:
        for loop in cfg["loops"]:
            task, recipe = INIT_LOOPS[loop]
            for init in cfg["candidates"] if task == "assign" else cfg["c4_candidates"]:
                for selective in (False, True):
                    name = f"init-{loop}-{init}-{'sel' if selective else 'std'}-s{seed}"
                    jobs.append(dict(name=name, loop=loop, task=task, init=init, recipe_name=recipe,
                                     recipe=RECIPES[recipe], cfg=cfg[task], seed=seed, n_head=cfg["n_head"],
                                     selective=selective, data_dir=data_dir,
                                     log=os.path.join(out_root, "init", name + ".jsonl")))
    return jobs


def init_experiment(cfg, data_dir, out_root, assets):
    """Every init job, then the table's numbers (init_results) and SPEC §10's verdict on them (init_decision)."""
    result = init_results(*init_runs(cfg, data_dir, out_root, assets), cfg["early"])
    return result | {"decision": init_decision(result["rows"])}


def check_c4_candidates(decision, cfg):
    """SPEC §10: the C4 loops run the baseline and the assign loop's winner; c4_candidates is set by hand (the C4
    runs start beside the assign runs), so the winner must be among them."""
    winner = decision["loops"]["assign"]["fastest"]
    if winner not in cfg["c4_candidates"]:
        raise SystemExit(f"experiments.py: init: the assign loop's winner is {winner}, which the C4 loops do not run "
                         f"(SPEC §10): add it to the init section's c4_candidates and run again")


def init_runs(cfg, data_dir, out_root, assets):
    """The init jobs (init_jobs), each trained unless it finished already; returns (jobs, their logs)."""
    os.makedirs(os.path.join(out_root, "init"), exist_ok=True)
    jobs = init_jobs(cfg, data_dir, out_root)
    logs = run_jobs(jobs, cfg["workers"])
    for name, records in logs.items():
        keep_log(records, name, assets)
    return jobs, logs


def init_results(jobs, logs, early):
    """Per loop and candidate, each variant over the seeds: the answer accuracy (assign) or validation loss (C4) at
    the last step and at the task's `early` steps, and on assign the first logged step at 0.9. And what the
    diagnostics say about the start: layer 0's largest F and head 0's entropy at step 0, the largest gradient norm
    (all weights, head 0's q/k) before the first logged step, and the share of F > 5 at the end (means over seeds)."""
    rows = []
    for loop, init in dict.fromkeys((j["loop"], j["init"]) for j in jobs):
        task, job = INIT_LOOPS[loop][0], next(j for j in jobs if j["loop"] == loop)
        metric = "val_accuracy" if task == "assign" else "val_loss"
        first_logged = job["cfg"].get("every", PLAIN_LOOP["every"])
        row = {"loop": loop, "init": init, "dtype": plain_dtype(job),
               "first_logged": first_logged}
        for variant in ("std", "sel"):
            mine = [logs[j["name"]] for j in jobs if (j["loop"], j["init"], j["selective"]) ==
                    (loop, init, variant == "sel")]
            by_step = [{r["iter"]: r for r in log[1:]} for log in mine]
            row[variant] = mean_sd([log[-1][metric] for log in mine])
            row["steps"] = mine[0][-1]["iter"]
            row[f"{variant}_early"] = {str(s): mean_sd([e[s][metric] for e in by_step]) for s in early[task]}
            if task == "assign":
                row[f"{variant}_step_to_0.9"] = [min((s for s, r in e.items() if r["val_accuracy"] >= 0.9),
                                                     default=None) for e in by_step]
            first = [[r for r in log[1:] if r["iter"] <= first_logged and "grad_norm_max" in r] for log in mine]
            row[f"{variant}_grad_norm_max_first"] = statistics.mean(max(r["grad_norm_max"] for r in f)
                                                                        for f in first)
            row[f"{variant}_qk0_grad_norm_max_first"] = statistics.mean(max(r["grad_norm_qk0_max"] for r in f)
                                                                            for f in first)
            row[f"{variant}_max_F0_at_init"] = statistics.mean(log[1]["max_F"][0] for log in mine)
            row[f"{variant}_entropy0_at_init"] = statistics.mean(log[1]["head0_entropy"][0] for log in mine)
            row[f"{variant}_share_F_over_5_at_end"] = statistics.mean(
                statistics.mean(log[-1]["share_F_over_5"]) for log in mine)
        rows.append(row)
    return {"rows": rows, "seeds": sorted({j["seed"] for j in jobs})}


def init_decision(rows, baseline="nanogpt"):
    """SPEC §10's rule on init_results' rows. Per loop: the candidates that leave the standard model worse than the
    baseline does by more than the seed spread (at the last step), and the candidate whose selective model learns
    fastest (its mean over the seeds, averaged over the early steps and the last). The default: the candidate that
    is fastest in every loop and hurts in none; else the baseline."""
    loops = {}
    for loop in dict.fromkeys(r["loop"] for r in rows):
        mine, better = {r["init"]: r for r in rows if r["loop"] == loop}, 1 if INIT_LOOPS[loop][0] == "assign" else -1
        if baseline not in mine:
            raise ValueError(f"init: the {loop} loop has no {baseline} runs to compare with (SPEC §10): add it")
        base = mine[baseline]["std"]
        spread = {i: max(max(v["values"]) - min(v["values"]) for v in (r["std"], base)) for i, r in mine.items()}
        learned = {i: better * statistics.mean([e["mean"] for e in r["sel_early"].values()] + [r["sel"]["mean"]])
                   for i, r in mine.items()}
        loops[loop] = {"fastest": max(learned, key=learned.get),
                       "hurts_standard": [i for i, r in mine.items() if better * (base["mean"] - r["std"]["mean"]) >
                                          spread[i]]}
    fastest = {verdict["fastest"] for verdict in loops.values()}
    passes = len(fastest) == 1 and not any(fastest & set(verdict["hurts_standard"]) for verdict in loops.values())
    return {"loops": loops, "default": fastest.pop() if passes else baseline}


def init_table(result):
    lines = ["| loop | init | standard | selective | selective - standard | early (std / sel) | first step at 0.9 "
             "(std / sel) | largest grad norm before the first log (std / sel) | layer 0's largest F at step 0 | "
             "share of F > 5 at the end (std / sel) |", "|:---|:---|" + "---:|" * 8]
    for r in result["rows"]:
        gap = mean_sd([b - a for a, b in zip(r["std"]["values"], r["sel"]["values"])])
        early = "; ".join(f"step {s}: {pm(r['std_early'][s])} / {pm(r['sel_early'][s])}" for s in r["std_early"])
        to_09 = (" / ".join(", ".join(str(s) if s is not None else "never" for s in r[f"{v}_step_to_0.9"])
                            for v in ("std", "sel")) if "std_step_to_0.9" in r else "-")
        lines.append(f"| {r['loop']} ({len(r['std']['values'])} seeds, {r['steps']} steps, {r['dtype']}) | "
                     f"{r['init']} | {pm(r['std'])} | {pm(r['sel'])} | {pm(gap)} | {early} | {to_09} | "
                     f"{r['std_grad_norm_max_first']:.1f} / {r['sel_grad_norm_max_first']:.1f} (steps 0-"
                     f"{r['first_logged'] - 1}) | "
                     f"{r['std_max_F0_at_init']:.2f} | "
                     f"{r['std_share_F_over_5_at_end']:.3f} / {r['sel_share_F_over_5_at_end']:.3f} |")
    d = result["decision"]
    verdicts = "; ".join(f"{loop}: fastest {v['fastest']}, hurts standard: {', '.join(v['hurts_standard']) or 'none'}"
                         for loop, v in d["loops"].items())
    return lines + ["", "(assign: answer accuracy; C4: validation loss; mean +- sd over the seeds; layer 0's F at "
                        "step 0 is the same for both variants, which share their initialisation)", "",
                    f"SPEC §10's rule on these runs ({verdicts}) picks {d['default']}", ""]


# guard: a check cheap enough to run after any change (under half an hour on 2 cores, float32, no data): init's
# assign plain loop with the default initialisation. In every seed selective must reach min_accuracy and leave at most
# error_share of the standard model's errors (1 - answer accuracy) after the last step; else exit 1.

def guard_experiment(cfg, init_cfg, out_root, assets):
    """init's assign-loop runs of cfg['init'] over cfg['seeds'] (run here if init has not), and the verdict."""
    runs = dict(init_cfg, loops=["assign"], candidates=[cfg["init"]], seeds=cfg["seeds"])
    row = init_results(*init_runs(runs, None, out_root, assets), init_cfg["early"])["rows"][0]
    return {"row": row, "holds": assign_guard_holds(row, cfg), "settings": cfg}


def assign_guard_holds(row, cfg):
    """Every seed ran, and in each selective's final answer accuracy >= min_accuracy and its errors <= error_share
    of standard's (so a standard model with no errors leaves selective none)."""
    stds, sels = row["std"]["values"], row["sel"]["values"]
    return len(stds) == len(sels) == len(cfg["seeds"]) > 0 and all(
        sel >= cfg["min_accuracy"] and 1 - sel <= cfg["error_share"] * (1 - std) for std, sel in zip(stds, sels))


def guard_table(result):
    r, cfg = result["row"], result["settings"]
    pairs = ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(r["std"]["values"], r["sel"]["values"]))
    return [f"Assign guard (init {r['init']}, answer accuracy standard / selective per seed: {pairs}): "
            f"{'holds' if result['holds'] else 'FAILS'} (selective >= {cfg['min_accuracy']} with at most "
            f"{cfg['error_share']:g} of standard's errors, every seed)", ""]


def guard_holds(row):
    """The guard (docs/RESULTS.md): selective's mean validation loss is not above standard's by more than the seed
    spread."""
    spread = max(max(row["std"]) - min(row["std"]), max(row["sel"]) - min(row["sel"]))
    return statistics.mean(row["sel"]) <= statistics.mean(row["std"]) + spread, spread


# ----------------------------------------------------------------------------------------------------------------
# The tables of assets/results.md, one maker per section (tiles, init and guard keep theirs beside their code).

def tables(results):
    """The results' tables, as markdown (assets/results.md)."""
    makers = {"heads": heads_tables, "heads_width": heads_tables, "ablations": ablations_table,
              "assign": assign_tables, "pruning": pruning_table, "tiles": tiles_table, "recipe": recipe_tables,
              "init": init_table, "guard": guard_table}
    return "\n".join(line for key, make in makers.items() if key in results
                     for line in [f"## {key}", "", *make(results[key])])


def heads_tables(h):
    sweep, init = h["lr_sweep"], "the width rule" if h["init_std"] == "width" else f"std {h['init_std']}"
    lines = [f"Initialisation: {init} (SPEC §10); {h['dtype']}.", "",
             f"Learning rate (standard, {sweep['n_head']} heads, seed {sweep['seed']}): " + ", ".join(
                 f"{lr}: {v:.3f}" for lr, v in sweep["val_loss"].items()) + f"; chosen {h['learning_rate']:g}", "",
             "| n_head | standard | selective | standard - selective (same seed) | per seed |",
             "|---:|---:|---:|---:|:---|"]
    for r in h["rows"]:
        lines.append(f"| {r['n_head']} | {pm(r['standard'])} | {pm(r['selective'])} | {pm(r['gap'])} | "
                     + ", ".join(f"{g:+.3f}" for g in r["gap"]["values"]) + " |")
    lines += ["", "| H | selective, H heads | standard, 2H heads | standard 2H - selective H (same seed) | "
              "selective H reaches standard 2H? |", "|---:|---:|---:|---:|:---|"]
    for r in h["rows"]:
        if "gap_2H" in r:
            lines.append(f"| {r['n_head']} | {pm(r['selective'])} | {pm(r['standard_2H'])} | {pm(r['gap_2H'])} | "
                         f"{reaches(r['gap_2H'])} |")
    lines.append("")
    check = h.get("rate_check")
    if check:
        lines += [f"Rate check (standard, {check['n_head']} heads, seed {check['seed']}): " + ", ".join(
            f"{lr}: {v:.3f}" for lr, v in check["val_loss"].items()) + f"; best {check['best']:g}", ""]
        if "gap" in check:
            lines += [f"| {check['n_head']} heads at {check['best']:g} | standard | selective | standard - "
                      "selective (same seed) | per seed |", "|:---|---:|---:|---:|:---|",
                      f"| both at {check['best']:g} | {pm(check['standard'])} | {pm(check['selective'])} | "
                      f"{pm(check['gap'])} | " + ", ".join(f"{g:+.3f}" for g in check["gap"]["values"]) + " |",
                      f"| selective at {h['learning_rate']:g} (above) | | | {pm(check['gap_chosen_selective'])} | "
                      + ", ".join(f"{g:+.3f}" for g in check["gap_chosen_selective"]["values"]) + " |", ""]
    return lines


def ablations_table(a):
    values = {r["variant"]: r["values"] for r in a["rows"]}

    def minus(r, base):  # paired over seeds: this variant - base, same seed
        return pm(mean_sd([v - w for v, w in zip(r["values"], values[base])])) if base in values else "-"
    lines = [f"| {a['n_head']} heads | validation loss ({len(values['selective'])} seeds) | per seed | minus "
             "selective (same seed) | minus selective on the mask path (same seed) |", "|:---|---:|:---|---:|---:|"]
    lines += [f"| {ABLATION_NAMES[r['variant']]} | {pm(r)} | " + ", ".join(f"{v:.3f}" for v in r["values"])
              + f" | {minus(r, 'selective')} | {minus(r, 'selective_mask')} |" for r in a["rows"]]
    return lines + [""]


def assign_tables(a):
    lines = ["| step | standard accuracy | selective accuracy |", "|---:|---:|---:|"]
    std, sel = dict(a["curves"]["assign-std"]), dict(a["curves"]["assign-sel"])
    for step in sorted(std):
        lines.append(f"| {step} | {std[step]:.3f} | {sel.get(step, float('nan')):.3f} |")
    lines += ["", f"| budget (of {a['block_size']}) | selective accuracy |", "|---:|---:|"]
    lines += [f"| {r['budget']} | {r['accuracy']:.3f} |" for r in a["by_budget"]]
    return lines + [f"| unpruned | {a['unpruned_accuracy']:.3f} |", ""]


def pruning_table(rows):
    lines = ["| block | memory loss weight | standard ppl | selective ppl | selective ppl, 2 keys per layer | "
             "budgets for ppl <= standard | memory factor | budgets for ppl <= own + 1% | memory factor |",
             "|---:|---:|---:|---:|---:|:---|---:|:---|---:|"]
    for r in rows:
        cells = []
        for key in ("vs_standard", "vs_itself"):
            found = r[key]["budgets"] is not None
            cells += [str(r[key]["budgets"]) if found else "not reached",
                      f"{r[key]['memory_factor']:.1f}x" if found else "-"]
        lines.append(f"| {r['block_size']} | {r['memory_loss_weight']} | {r['standard_ppl']:.2f} | "
                     f"{r['unpruned_ppl']:.2f} | {r['no_context_ppl']:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    held = [r for r in rows if "held_out" in r]  # the found budgets on other batches than the searches
    if held:
        lines += ["| held-out batches: block | memory loss weight | standard ppl | selective ppl | at the budgets for "
                  "ppl <= standard | at the budgets for ppl <= own + 1% |", "|---:|---:|---:|---:|---:|---:|"]
        for r in held:
            h = r["held_out"]
            lines.append(f"| {r['block_size']} | {r['memory_loss_weight']} | {h['standard_ppl']:.2f} | "
                         f"{h['unpruned_ppl']:.2f} | " + " | ".join(f"{h[key]:.2f}" if key in h else "-"
                                                                  for key in ("vs_standard", "vs_itself")) + " |")
        lines.append("")
    return lines


def pm(stats):
    """mean +- sd over seeds"""
    return f"{stats['mean']:.3f} +- {stats['sd']:.3f}"


def reaches(gap):
    """standard 2H - selective H over the seeds: yes when the mean is >= 0 (by how many sds it is clear)."""
    if gap["mean"] >= 0:
        return "yes" + (", by more than 2 sd" if gap["mean"] > 2 * gap["sd"] else ", within 2 sd")
    return "no" + (", by more than 2 sd" if -gap["mean"] > 2 * gap["sd"] else ", within 2 sd")


ABLATION_NAMES = {"standard": "standard", "selective": "selective (SPEC §1)",
                  "selective_mask": "selective (SPEC §1) on the mask path (`--attention mask`)",
                  "mask_bos": "selective, BOS may be masked (`--mask_bos`)",
                  "mask_self": "selective, self-masking allowed (`--mask_self`)"}
RECIPE_CHANGES = {"plain": "none: AdamW lr 2e-3, betas (0.9, 0.999), no clipping",
                  "clip": "gradient norm clipped at 1.0", "beta2": "beta2 0.95", "init": "init std 0.05 (not 0.02)",
                  "untied": "lm_head not tied to the embedding", "lr1e-3": "learning rate 1e-3",
                  "train_py": "train.py's: lr 1e-3, beta2 0.95, clipping 1.0, no decay on gains and biases"}


def recipe_tables(recipe):
    def cell(values):
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"

    def adam(row, v):
        return "-" if row[f"{v}_adam_step_qk0"] is None else \
            f"{row[f'{v}_adam_step_qk0']:.2f} / {row[f'{v}_adam_step_rest']:.2f}"

    lines = ["| recipe | init, dtype | change from plain | step | standard | selective | std - sel | largest gradient "
             "norm, steps 1-100 (std / sel) | head 0 q/k gradient norm, same (std / sel) | Adam step, head 0 q/k / "
             "other q/k, steps 100-600, first seed (std; sel) |", "|:---|:---|:---|---:|---:|---:|---:|---:|---:|:---|"]
    for stage in ("diagnosis", "confirmation", "guard"):
        for r in recipe.get(stage, []):
            gap = [a - b for a, b in zip(r["std"], r["sel"])]
            init = "width rule" if r["init"] == "width" else f"std {r['settings']['init_std']}"
            lines.append(f"| {r['recipe']} ({stage}, {len(r['std'])} seed{'s' * (len(r['std']) > 1)}) | "
                         f"{init}, {r['dtype']} | {RECIPE_CHANGES[r['recipe']]} | {r['std_step']} | "
                         f"{cell(r['std'])} | {cell(r['sel'])} | {cell(gap)} | "
                         f"{r['std_grad_norm_max_first_100']:.0f} / {r['sel_grad_norm_max_first_100']:.0f} | "
                         f"{r['std_qk0_grad_norm_max_first_100']:.1f} / {r['sel_qk0_grad_norm_max_first_100']:.1f} | "
                         f"{adam(r, 'std')}; {adam(r, 'sel')} |")
    for r in recipe.get("guard", []):
        holds, spread = guard_holds(r)
        lines.append(f"\nGuard ({r['recipe']}, {len(r['std'])} seeds): selective {statistics.mean(r['sel']):.3f}, "
                     f"standard {statistics.mean(r['std']):.3f}, seed spread {spread:.3f}: "
                     f"{'holds' if holds else 'FAILS: selective is worse than standard by more than the spread'}")
    return lines + [""]


def read_results(path):
    """assets/results.json; a damaged one stops the experiments with what to do."""
    try:
        with open(path) as f:
            results = json.load(f)
        if not isinstance(results, dict):
            raise ValueError(f"a JSON {type(results).__name__}, not an object")
        return results
    except ValueError as e:  # not JSON, not UTF-8, or not an object
        raise SystemExit(f"experiments.py: {path} is damaged ({e}): restore it (from git, if it is the "
                         f"repository's), or give another --assets") from None


def plots(assets):
    """Redraw the plots from assets/results.json."""
    path = os.path.join(assets, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"experiments.py: --plots: there is no {path}: run the experiments first, or give the "
                         f"--assets that holds their results")
    results = read_results(path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    for key, draw in (("heads", plot_heads), ("assign", plot_assign), ("pruning", plot_pruning),
                      ("recipe", plot_recipe)):
        if key in results:
            try:
                fig = draw(plt, results, assets)
            except FileNotFoundError as e:  # a log it draws from is not in assets/logs
                plt.close("all")
                print(f"no {key}.png: {e.filename} is missing (experiments.py --only {key} writes it)")
                continue
            except (KeyError, TypeError, IndexError) as e:  # a section not as experiments.py writes it (edited?)
                plt.close("all")
                print(f"no {key}.png: results.json's {key} lacks what it draws ({type(e).__name__}: {e}); "
                      f"experiments.py --only {key} writes it anew")
                continue
            fig.tight_layout()
            fig.savefig(os.path.join(assets, f"{key}.png"), dpi=110 if key == "recipe" else 120)
            plt.close(fig)
    print(f"plots written to {assets}")


def plot_heads(plt, results, assets):
    """Validation loss against heads, every seed; the heads_width section beside the heads section when it ran."""
    cfg = results["settings"]["heads"]
    fig, ax = plt.subplots(figsize=(5.5, 4.4 if "heads_width" in results else 3.8))
    for key, style, fill in (("heads", "o-", None), ("heads_width", "s--", "white")):
        if key not in results:
            continue
        h = results[key]
        init = "width rule" if h["init_std"] == "width" else f"std {h['init_std']}"
        for variant, color, shift in (("standard", "tab:blue", 0.97), ("selective", "tab:red", 1.03)):
            heads = [r["n_head"] for r in h["rows"]]
            label = variant if "heads_width" not in results else f"{variant}, {init}, {h['dtype']}"
            ax.errorbar([H * shift for H in heads], [r[variant]["mean"] for r in h["rows"]],
                        yerr=[r[variant]["sd"] for r in h["rows"]], fmt=style, color=color, mfc=fill or color,
                        capsize=3, label=label)
            for r in h["rows"]:  # every seed
                ax.plot([r["n_head"] * shift] * len(r[variant]["values"]), r[variant]["values"], "x", color=color,
                        alpha=0.5, ms=5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(heads, [str(H) for H in heads])
    ax.set_xlabel("heads")
    ax.set_ylabel("validation loss")
    ax.set_title(f"C4 sample, {cfg['n_layer']} layers x {cfg['n_embd']}, block {cfg['block_size']}, "
                 f"{h['tokens_per_run'] / 1e6:.1f}M tokens; x: seeds", fontsize=9)
    if "heads_width" in results:  # four lines: the legend below the axes
        ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    else:
        ax.legend()
    return fig


def plot_assign(plt, results, assets):
    a = results["assign"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, color in (("assign-std", "tab:blue"), ("assign-sel", "tab:red")):
        steps, acc = zip(*a["curves"][name])
        ax1.plot(steps, acc, "o-", ms=3, color=color, label="selective" if "sel" in name else "standard")
    ax1.set_xlabel("step")
    ax1.set_ylabel("answer accuracy")
    ax1.legend()
    ax2.plot([r["budget"] for r in a["by_budget"]], [r["accuracy"] for r in a["by_budget"]], "o-", color="tab:red")
    ax2.axhline(a["unpruned_accuracy"], ls="--", color="gray", label="unpruned")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel(f"budget: keys per layer (block {a['block_size']})")
    ax2.set_ylabel("answer accuracy")
    ax2.legend()
    return fig


def plot_pruning(plt, results, assets):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in results["pruning"]:
        path = r["vs_itself"]["path"]
        xs, ys = [p["memory_factor"] for p in path], [p["ppl"] for p in path]
        line, = ax.plot(xs, ys, ".-", label=f"T={r['block_size']}, eps={r['memory_loss_weight']}")
        further = r["vs_standard"]["path"]  # the search down to the standard model's perplexity, thin
        ax.plot([p["memory_factor"] for p in further], [p["ppl"] for p in further], "-", lw=0.8,
                color=line.get_color())
        # the no-context control: 2 keys per layer (BOS and the current token), memory factor T / 2
        ax.plot(r["block_size"] / 2, r["no_context_ppl"], "x", color=line.get_color())
    for T in sorted({r["block_size"] for r in results["pruning"]}):
        target = next(r["standard_ppl"] for r in results["pruning"] if r["block_size"] == T)
        ax.axhline(target, ls="--", lw=0.8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory factor L*T/sum(K)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("budget searches: to own ppl + 1% (dots), to standard's ppl (thin;\ndashed: standard's ppl); "
                 "x: 2 keys per layer", fontsize=8)
    ax.legend(fontsize=7)
    return fig


def plot_recipe(plt, results, assets):
    rows, stop = results["recipe"]["diagnosis"], results["settings"]["recipe"]["diagnosis"]["stop"]
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3.0), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], rows):
        for variant, color in (("std", "tab:blue"), ("sel", "tab:red")):
            path = os.path.join(assets, "logs", f"recipe-{r['recipe']}-{variant}-s1-stop{stop}.jsonl")
            with open(path) as f:
                points = [json.loads(line) for line in f][2:]  # from the first logged step: not the init's 10.8
            ax.plot([p["iter"] for p in points], [p["val_loss"] for p in points], color=color,
                    label="selective" if variant == "sel" else "standard")
        ax.set_title(r["recipe"], fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("validation loss")
    axes[0][0].legend(fontsize=7)
    return fig


def get_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the pipeline in minutes")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeat the flag for several; they run in the order given)")
    parser.add_argument("--data_dir", default="data/c4_sample", help="C4-format token shards (prepare_data.py)")
    parser.add_argument("--out_dir", default=None, help="runs (None: out/experiments, or out/experiments-quick)")
    parser.add_argument("--assets", default=None, help="logs, results and plots (None: assets, or the quick "
                                                        "run's out_dir/assets)")
    parser.add_argument("--plots", action="store_true", help="only redraw the plots from assets/results.json")
    return parser


def run_section(what, cfg, data_dir, out_root, assets):
    if what in ("heads", "heads_width"):
        return heads_experiment(cfg[what], data_dir, out_root, assets)
    if what == "ablations":
        return ablations_experiment(cfg["ablations"], cfg["heads"], data_dir, out_root, assets)
    if what == "recipe":
        return recipe_experiment(cfg["recipe"], data_dir, out_root, assets)
    if what == "init":
        return init_experiment(cfg["init"], data_dir, out_root, assets)
    if what == "guard":
        return guard_experiment(cfg["guard"], cfg["init"], out_root, assets)
    if what == "tiles":
        return tiles_experiment(cfg["tiles"], data_dir, out_root, assets)
    if what == "assign":
        return assign_experiment(cfg["assign"], out_root, assets)
    assert what == "pruning", what  # --only takes SECTIONS
    return pruning_experiment(cfg["pruning"], cfg["heads"], data_dir, out_root, assets)


def check_guard(what, result):
    """Exit 1 (after the section's results are written) if the section's guard fails, or the init section's C4
    loops did not run the assign loop's winner."""
    if what == "init":
        check_c4_candidates(result["decision"], FULL["init"])
    if what == "recipe" and not all(guard_holds(r)[0] for r in result["guard"]):
        raise SystemExit("experiments.py: the guard failed: selective attention trains worse than standard under "
                         "the plain recipe with clipping (docs/RESULTS.md, The training recipe)")
    if what == "guard" and not result["holds"]:
        raise SystemExit("experiments.py: the assign guard failed: selective attention does not learn the assign "
                         "task far better than standard in the plain loop (docs/RESULTS.md, Initialisation)")


def main(argv=None):
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        # glibc reads these at start: run again with them (they pass on to the train.py runs)
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **KEEP_FREED_MEMORY))
    args = get_parser().parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out_root = args.out_dir or os.path.join(HERE, "out", "experiments-quick" if args.quick else "experiments")
    assets = args.assets or (os.path.join(out_root, "assets") if args.quick else os.path.join(HERE, "assets"))
    if args.plots:
        return plots(assets)
    todo = args.only or ["guard", "assign", "heads", "heads_width", "ablations", "pruning", "tiles", "recipe", "init"]
    needs_c4 = {"heads", "heads_width", "ablations", "pruning", "tiles", "recipe", "init"} & set(todo)
    if needs_c4 and not glob.glob(os.path.join(args.data_dir, "*.bin")):
        raise SystemExit(f"experiments.py: no token shards in {args.data_dir}: run  python prepare_data.py --local "
                         f"PATH/TO/c4/en --data_dir {args.data_dir}  (C4-format files you have), or "
                         f"python prepare_data.py --data_dir {args.data_dir}  to download C4")
    make_dir(out_root, "--out_dir")
    make_dir(assets, "--assets")
    results_path = os.path.join(assets, "results.json")
    results = read_results(results_path) if os.path.exists(results_path) else {}
    for what in todo:
        print(f"{what}:", flush=True)
        results[what] = run_section(what, cfg, args.data_dir, out_root, assets)
        results.setdefault("settings", {})[what] = cfg[what]  # the settings of the code that ran it
        results["machine"] = f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, " \
                             f"torch {torch.__version__}"
        results["command"] = "python experiments.py" + (" --quick" if args.quick else "")
        results["commit"] = (git_commit() or "")[:7] or None
        write_json(results_path, results)
        markdown = tables(results) + "\n"  # written with each section, before its guard may exit
        write_atomic(os.path.join(assets, "results.md"), lambda tmp: pathlib.Path(tmp).write_text(markdown))
        if not args.quick:  # the quick settings check the pipeline: too small for a guard to mean anything
            check_guard(what, results[what])
    print(tables(results))
    plots(assets)


if __name__ == "__main__":
    main()
