"""
Train a standard or selective GPT (selective_gpt.py): nanoGPT's train.py, driven by flags.

    python train.py --dataset assign --selective             # offline quick start: a synthetic task, minutes on a CPU
    python prepare_data.py && python train.py --selective --n_head 8              # C4
    torchrun --standalone --nproc_per_node=4 train.py --selective --grad_accum 4   # data parallel (DDP)
    python train.py --resume                                  # carry on from out_dir/ckpt.pt, exactly

Every training and evaluation window starts with BOS (SPEC §2). Each batch comes from a generator seeded by (seed,
split, iteration, micro-step): a resumed run sees the batches of an uninterrupted one, and N DDP processes with
--grad_accum G (micro-steps over all processes) see what one process with --grad_accum G sees.
"""

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import pathlib
import sys
import time
from datetime import timedelta

import torch

from common import (ASSIGN_TOKENS, BOS, ArgumentParser, CheckpointError, add_device_flags, answers_right, as_flag,
                    at_least, autocast, autocast_dtype, fraction, get_batch, git_commit, given_flags, load_checkpoint,
                    load_shards, make_dir, measure_peak_flops, non_negative, pick_device, positive, append_jsonl,
                    random_seed, read_jsonl, std_or_width, strip_compile_prefix, synchronize, write_atomic,
                    write_jsonl)
from selective_gpt import ATTENTION_PATHS, GPT, GPTConfig, attention_path

# ----------------------------------------------------------------------------------------------------------------
# Flags. A value is checked by its type as it is read (common.checked); parse_args checks the rest.

def add_model_flags(p):
    a = p.add_argument_group("model (GPTConfig)").add_argument
    a("--n_layer", type=int, default=4, help="transformer blocks")
    a("--n_head", type=int, default=4, help="attention heads; head 0 also selects (SPEC §1)")
    a("--n_embd", type=int, default=128, help="width")
    a("--block_size", type=int, default=None, help="context length (None: 256 for c4, 96 for assign)")
    a("--dropout", type=float, default=0.0, help="dropout (the tiled and reference paths have none: auto takes mask)")
    a("--bias", action=argparse.BooleanOptionalAction, default=False, help="biases in Linears and LayerNorms")
    a("--selective", action="store_true", help="selective attention (off: a standard transformer)")
    a("--memory_loss_weight", type=float, default=0.0, help="epsilon of the memory loss (SPEC §5)")
    a("--memory_tau", type=float, default=1.0, help="tau of the memory loss (SPEC §5)")
    a("--attention", choices=("auto",) + ATTENTION_PATHS, default="auto",
      help="the path, SPEC §7. auto: tiled where it runs (this device has its kernel; no dropout, ablation or memory "
           "loss), else mask. On CUDA tiled is a Triton kernel not yet run on a GPU: check it with python bench.py gpu")
    a("--mask_bos", action="store_true", help="ablation (docs/SPEC.md §9): BOS may be masked")
    a("--mask_self", action="store_true", help="ablation (docs/SPEC.md §9): a token's vote on its own key counts")
    a("--vocab_size", type=int, default=None, help="None: 50304 for c4 (GPT-2's 50257 padded), the task's for assign")
    a("--init_std", type=std_or_width, default="width", help="SPEC §10: width (1/sqrt(3 n_embd)) or a std, e.g. 0.02")


def get_parser():
    p = ArgumentParser(description=__doc__)
    add_model_flags(p)
    d = p.add_argument_group("data").add_argument
    d("--dataset", choices=["c4", "assign"], default="c4", help="C4 shards, or the synthetic assign task")
    d("--data_dir", default="data/c4", help="token shards from prepare_data.py (--dataset c4)")
    d("--batch_size", type=at_least(1), default=16, help="sequences per micro-step (per process)")
    d("--grad_accum", type=at_least(1), default=1, help="micro-steps per iteration, over all processes")
    o = p.add_argument_group("optimisation").add_argument
    o("--learning_rate", type=positive, default=1e-3, help="peak learning rate")
    o("--min_lr", type=non_negative, default=None, help="final learning rate (None: learning_rate / 10)")
    o("--warmup_iters", type=at_least(0), default=100, help="linear warmup iterations")
    o("--lr_decay_iters", type=at_least(1), default=None, help="cosine decay length (None: max_iters, resumed too)")
    o("--max_iters", type=at_least(1), default=2000, help="iterations to train")
    o("--weight_decay", type=non_negative, default=0.1, help="AdamW weight decay on matrices and embeddings")
    o("--beta1", type=fraction, default=0.9, help="AdamW beta1")
    o("--beta2", type=fraction, default=0.95, help="AdamW beta2 (selective attention: <= 0.99, or clip; SPEC §8)")
    o("--grad_clip", type=non_negative, default=1.0, help="clip the gradient norm at this (0: off)")
    r = p.add_argument_group("running")
    add_device_flags(r)
    r = r.add_argument
    r("--out_dir", default=None, help="checkpoints and the JSON-lines log (None: out-<dataset>)")
    r("--eval_interval", type=at_least(1), default=200, help="iterations between evaluations and checkpoints")
    r("--eval_iters", type=at_least(1), default=20, help="batches per evaluation")
    r("--log_interval", type=at_least(1), default=10, help="iterations between progress lines")
    r("--compile", action="store_true", help="torch.compile the model")
    r("--seed", type=random_seed, default=1337, help="initialisation, dropout and (by default) data order")
    r("--data_seed", type=random_seed, default=None, help="data order only (None: --seed): another init, same data")
    r("--resume", action="store_true", help="continue from out_dir/ckpt.pt with its settings (these may change: "
      "--max_iters, --lr_decay_iters, --data_dir, --eval_interval, --log_interval, --peak_flops; and --attention, "
      "--device, --dtype, --compile, which change the rounding)")
    r("--overwrite", action="store_true", help="start over in an out_dir that holds a run (deletes its files)")
    r("--peak_flops", type=positive, default=None, help="the device's peak FLOP/s for MFU (None: measured at start)")
    return p


MODEL_FIELDS = [f.name for f in dataclasses.fields(GPTConfig)]  # each has a flag of its name in get_parser
# a checkpoint or log without a field (assets/logs keeps such) meant the field's default; without init_std, 0.02 (§10)
FIELDS_BEFORE = {f.name: f.default for f in dataclasses.fields(GPTConfig)} | {"init_std": 0.02}
RUN_FILES = ("ckpt.pt", "ckpt_best.pt", "log.jsonl", "budgets.json")  # what --overwrite deletes
# --resume continues a run exactly: it keeps every setting but these (how far it trains, which path computes the same
# model, where it runs, how often it reports); any other flag given must repeat the run's own value
MAY_CHANGE_ON_RESUME = ("max_iters", "lr_decay_iters", "attention", "data_dir", "device", "dtype", "compile",
                        "eval_interval", "log_interval", "peak_flops", "out_dir")


def parse_args(argv=None):
    """The flags, checked; on --resume the run's own settings fill in every flag not given. Returns (args, ckpt)."""
    parser = get_parser()
    defaults, given = vars(parser.parse_args([])), given_flags(parser, argv)
    out_dir = given["out_dir"] if "out_dir" in given else f"out-{given.get('dataset', defaults['dataset'])}"
    if "out_dir" in given and not out_dir.strip():
        parser.error("--out_dir is empty: give a directory for the run")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        parser.error(f"--out_dir {out_dir} is a file, not a directory: give another --out_dir")
    ckpt = None
    if given.get("resume"):
        ckpt, defaults = resumed_settings(parser, given, defaults, out_dir)
    elif any(os.path.exists(os.path.join(out_dir, f)) for f in RUN_FILES) and not given.get("overwrite"):
        parser.error(f"--out_dir {out_dir} holds a run already (its ckpt.pt or log.jsonl). Continue it with "
                     f"--resume, start over with --overwrite (deletes it), or give another --out_dir")
    args = fill_in(argparse.Namespace(**{**defaults, **given, "out_dir": out_dir}))
    if "data_dir" in given and args.dataset == "assign":
        parser.error("--data_dir is for --dataset c4: the assign task makes its own data, so drop it")
    if "attention" in given and not args.selective:
        parser.error(f"--attention {args.attention} picks how selective attention is computed: add --selective, "
                     f"or drop it (a standard model has one way)")
    if "memory_tau" in given and args.memory_loss_weight == 0:
        parser.error("--memory_tau shapes the memory loss, which is off: add --memory_loss_weight, or drop it")
    if ("min_lr" in given or "learning_rate" in given) and args.min_lr > args.learning_rate:
        parser.error(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}: the schedule decays from "
                     f"the peak down to min_lr, so give a smaller --min_lr")
    tokens = len(ASSIGN_TOKENS) if args.dataset == "assign" else BOS + 1
    if args.vocab_size < tokens:
        parser.error(f"--vocab_size {args.vocab_size} is smaller than the {tokens} tokens of --dataset {args.dataset}")
    try:
        GPTConfig(**model_args(args))
        autocast_dtype(pick_device(args.device).split(":")[0], args.dtype)
    except ValueError as e:
        parser.error(str(e))
    return args, ckpt


def fill_in(args):
    """The defaults that depend on other flags (None in --help), as the run uses them."""
    assign = args.dataset == "assign"
    args.block_size = (96 if assign else 256) if args.block_size is None else args.block_size
    args.vocab_size = (len(ASSIGN_TOKENS) if assign else 50304) if args.vocab_size is None else args.vocab_size
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    args.min_lr = args.learning_rate / 10 if args.min_lr is None else args.min_lr
    return args


def resumed_settings(parser, given, defaults, out_dir):
    """--resume: the checkpoint, and the run's settings as the new defaults. Only MAY_CHANGE_ON_RESUME's flags may
    change; a new --max_iters stretches a schedule following it."""
    if given.get("overwrite"):
        parser.error("--resume continues the run in out_dir, --overwrite deletes it: give one of them")
    try:
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    except CheckpointError as e:
        parser.error(f"--resume: {e}")
    log = os.path.join(out_dir, "log.jsonl")
    try:  # here, where every process of a torchrun run stops on it, not later in the master's start_log
        if os.path.exists(log):
            read_jsonl(log)
    except ValueError as e:
        parser.error(f"--resume: {e}: mend that line, or move {log} aside to start a new log at iteration "
                     f"{ckpt['iter_num']}")
    saved = FIELDS_BEFORE | {k: v for k, v in ckpt["args"].items() if k not in ("resume", "overwrite")}
    changed = [f"--{k} {as_flag(k, saved[k])} -> {as_flag(k, given[k])}" for k in MODEL_FIELDS + ["dataset"]
               if k in given and k != "attention" and given[k] != saved[k]]
    if changed:
        parser.error(f"--resume: {out_dir}/ckpt.pt is a checkpoint of a different model: {', '.join(changed)}. "
                     f"Drop those flags, or use another --out_dir")
    # the optimiser's state, the RNG and the batches come from the run: another value would be ignored or break
    # the exact continuation (a setting the checkpoint lacks means its default, so is compared with that)
    was = {**defaults, **saved}
    changed = [f"--{k} {was[k]} -> {given[k]}" for k in given
               if given[k] != was[k] and k not in MODEL_FIELDS + ["dataset", "resume", *MAY_CHANGE_ON_RESUME]]
    if changed:
        parser.error(f"--resume continues the run in {out_dir} exactly, with its own settings: {', '.join(changed)} "
                     f"would change it. Drop those flags, or start a new run with another --out_dir")
    if "max_iters" in given and "lr_decay_iters" not in given and saved.get("lr_decay_iters") == saved["max_iters"]:
        saved["lr_decay_iters"] = None  # a decay saved equal to max_iters follows the new max_iters
    return ckpt, {**defaults, **saved}


def model_args(args):  # the GPTConfig of a run
    return {k: getattr(args, k) for k in MODEL_FIELDS}


# ----------------------------------------------------------------------------------------------------------------
# The schedule, the device, evaluation

def decay_iters(args):
    """The cosine's length: --lr_decay_iters, or max_iters (which --resume may extend)."""
    return args.lr_decay_iters or args.max_iters


def get_lr(it, args):
    """Linear warmup, then cosine decay to min_lr at decay_iters (nanoGPT)."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if it > decay_iters(args):
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, decay_iters(args) - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)


def setup_device(args, ddp, rank):
    """The device of this process (torchrun: one GPU each, or gloo on CPUs), seeded."""
    device = pick_device(args.device)
    if ddp:
        use_cuda = device.startswith("cuda")
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed + rank)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


@torch.no_grad()
def evaluate(model, args, shards, ctx, device):
    """Mean cross-entropy (and answer accuracy for assign) on fixed batches of each split."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        ce, correct, answers = [], 0, 0
        for k in range(args.eval_iters):
            x, y = (t.to(device) for t in get_batch(vars(args), split, -1, k, shards))  # -1: the evaluation batches
            with ctx:
                logits, _ = model(x, targets=y)
            ce.append(model.loss_terms["ce"].item())
            right, scored = answers_right(logits, y)
            correct, answers = correct + right, answers + scored
        out[f"{split}_loss"] = sum(ce) / len(ce)
        if args.dataset == "assign":
            out[f"{split}_accuracy"] = correct / max(answers, 1)
    out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run: its files (a JSON-lines log, checkpoints; written whole: a temporary file, then renamed), the loop

def start_log(args, ckpt, path, header):
    """A new run's log starts with its header; a resumed run's keeps the records up to the checkpoint's iteration (a
    torn last line too is dropped) and says where it resumed: one record per iteration, whatever happened."""
    if ckpt is None:
        return write_jsonl(path, [header])
    kept = [r for r in (read_jsonl(path) if os.path.exists(path) else []) if r.get("iter", -1) <= ckpt["iter_num"]]
    if not kept or "config" not in kept[0]:  # a log moved aside, or one without its header: the header first
        kept.insert(0, header)
    write_jsonl(path, kept + [{"resumed_at": ckpt["iter_num"], "max_iters": args.max_iters,
                               "lr_decay_iters": decay_iters(args), "git_commit": header["git_commit"]}])


def rng_states(device_type, world):
    """Every process's RNG state (dropout), so that --resume continues exactly."""
    states = {"cpu": [torch.get_rng_state()], "cuda": [torch.cuda.get_rng_state()] if device_type == "cuda" else []}
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, states)
        states = {k: [s for g in gathered for s in g[k]] for k in states}
    return states


def save_checkpoint(args, model, optimizer, scaler, it, best_val_loss, rng, improved):
    state = dict(model=strip_compile_prefix(model.state_dict()), optimizer=optimizer.state_dict(), args=vars(args),
                 model_args=model_args(args), iter_num=it, best_val_loss=best_val_loss, rng=rng,
                 scaler=scaler.state_dict())  # float16's loss scale ({} for other dtypes)
    for name in ("ckpt.pt",) + (("ckpt_best.pt",) if improved else ()):
        write_atomic(os.path.join(args.out_dir, name), lambda tmp: torch.save(state, tmp))


def say_resume(args, ckpt):
    """What a resume will do, in one line."""
    at, saved = ckpt["iter_num"], ckpt["args"]
    line = f"resuming {args.out_dir}/ckpt.pt at iteration {at}, training to {args.max_iters}"
    was = argparse.Namespace(**dict(saved, lr_decay_iters=saved.get("lr_decay_iters") or saved["max_iters"]))
    if decay_iters(args) != was.lr_decay_iters:
        line += (f"; the cosine schedule now reaches min_lr {args.min_lr:.2e} at iteration {decay_iters(args)} "
                 f"(was {was.lr_decay_iters}): learning rate {get_lr(at, args):.2e} at iteration {at} "
                 f"(the old schedule's {get_lr(at, was):.2e})")
    return line


def build(args, ckpt, device, dtype, ddp, rank):
    """(model to train (compiled, DDP), raw model, optimiser, float16's gradient scaler): new, or as the checkpoint
    left them."""
    raw = GPT(GPTConfig(**model_args(args))).to(device)
    optimizer = raw.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
                                         device.split(":")[0], args.grad_clip)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")  # loss scaling for float16
    if ckpt is not None:
        raw.load_state_dict(strip_compile_prefix(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"][rank % len(ckpt["rng"]["cpu"])])
        if device.startswith("cuda") and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank % len(ckpt["rng"]["cuda"])])
    model = raw
    if args.compile:
        if rank == 0:
            print("compiling the model (torch.compile): about 30-60 s on a CPU before the first iteration")
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[int(os.environ["LOCAL_RANK"])]
                                                          if device.startswith("cuda") else None)
    return model, raw, optimizer, scaler


def run_attention_paths(args, device, dtype):
    """The paths the run's selective attention takes in training and in evaluations, which have no dropout (None:
    standard attention); refused, in every process and before anything is written, where this device has no kernel
    for them."""
    if not args.selective:
        return None, None
    if args.memory_loss_weight > 0:
        return "mask", "mask"  # the memory loss keeps every layer's F, in evaluations too: the mask path (SPEC §7)
    q = torch.empty(1, args.n_head, 1, args.n_embd // args.n_head, device=device, dtype=getattr(torch, dtype))
    ablated = any(GPTConfig(**model_args(args)).rule.values())
    try:
        return tuple(attention_path(args.attention, q, p, ablated) for p in (args.dropout, 0.0))
    except ValueError as e:
        raise SystemExit(f"train.py: error: --attention {args.attention}: {e}")


def start_run(args, ckpt, raw, device, world, dtype, paths, peak_flops):
    """The run directory (--overwrite clears an old run; parse_args checked the rest), its log, the first lines."""
    make_dir(args.out_dir, "--out_dir")
    for name in RUN_FILES if args.overwrite else ():
        pathlib.Path(args.out_dir, name).unlink(missing_ok=True)
    tokens_per_iter = args.grad_accum * args.batch_size * args.block_size
    start_log(args, ckpt, os.path.join(args.out_dir, "log.jsonl"), {
        "config": vars(args), "model": model_args(args), "git_commit": git_commit(), "device": device,
        "dtype": dtype, "world_size": world, "tokens_per_iter": tokens_per_iter, "n_params": raw.get_num_params(),
        "torch": torch.__version__, "peak_flops": peak_flops, "attention_path": paths[0], "evaluation_path": paths[1]})
    print(f"{'selective' if args.selective else 'standard'} GPT, {raw.get_num_params() / 1e6:.2f}M parameters, "
          f"{args.dataset}, {device} {dtype}, {tokens_per_iter} tokens/iter, world {world}, out_dir {args.out_dir}"
          + (f", attention path: {paths[0]}" if paths[0] else "")
          + (f" (evaluations: {paths[1]})" if paths[1] != paths[0] else ""))
    # the Triton kernel is tested only in Triton's CPU interpreter so far (docs/PERFORMANCE.md, On a GPU)
    if device.startswith("cuda") and "tiled" in paths:
        print("note: the tiled path on CUDA is a Triton kernel tested in Triton's CPU interpreter but not yet run on a "
              "GPU: python bench.py gpu checks it; --attention mask avoids it")
    if ckpt is not None:
        print(say_resume(args, ckpt))


def train_step(args, model, optimizer, scaler, ctx, shards, it, rank, world, device):
    """One iteration: micro-steps (DDP syncs gradients on the last), clipping, the update. Returns the last loss."""
    micro_steps = args.grad_accum // world
    for micro in range(micro_steps):
        x, y = get_batch(vars(args), "train", it, rank * micro_steps + micro, shards)
        sync = world == 1 or micro == micro_steps - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), ctx:
            _, loss = model(x.to(device), targets=y.to(device))
            loss = loss / micro_steps
        scaler.scale(loss).backward()
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item() * micro_steps


def train(args, ckpt, ddp, rank, world):
    device = setup_device(args, ddp, rank)
    dtype = autocast_dtype(device.split(":")[0], args.dtype)
    ctx = autocast(device.split(":")[0], dtype)
    paths = run_attention_paths(args, device, dtype)
    shards = None
    if args.dataset == "c4":
        try:
            shards = {s: load_shards(args.data_dir, s, args.block_size) for s in ("train", "validation")}
        except FileNotFoundError as e:
            raise SystemExit(f"train.py: {e}; or train offline with --dataset assign")
        except ValueError as e:
            raise SystemExit(f"train.py: {e}")
    model, raw, optimizer, scaler = build(args, ckpt, device, dtype, ddp, rank)
    peak_flops = args.peak_flops or measure_peak_flops(device, getattr(torch, dtype))
    log, master, started = os.path.join(args.out_dir, "log.jsonl"), rank == 0, time.time()
    if master:
        start_run(args, ckpt, raw, device, world, dtype, paths, peak_flops)
    it, best_val_loss = (0, float("inf")) if ckpt is None else (ckpt["iter_num"], ckpt["best_val_loss"])
    t0, timed = time.time(), 0  # the clock of the progress lines: training iterations since t0, evaluations left out
    while True:
        if (it % args.eval_interval == 0 or it == args.max_iters) and not (ckpt and it == ckpt["iter_num"]):
            metrics = evaluate(raw, args, shards, ctx, device)
            improved, best_val_loss = metrics["val_loss"] < best_val_loss, min(best_val_loss, metrics["val_loss"])
            rng = rng_states(device.split(":")[0], world)  # under DDP every process takes part in the gather
            if master:
                print(f"eval {it}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, val "
                      f"ppl {metrics['val_ppl']:.2f}" + (f", val accuracy {metrics['val_accuracy']:.3f}"
                                                         if args.dataset == "assign" else ""))
                append_jsonl(log, dict(iter=it, **metrics, elapsed_s=round(time.time() - started, 2)))
                save_checkpoint(args, raw, optimizer, scaler, it, best_val_loss, rng, improved)
            t0, timed = time.time(), 0
        if it >= args.max_iters:
            break
        lr = get_lr(it, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(args, model, optimizer, scaler, ctx, shards, it, rank, world, device)
        it, timed = it + 1, timed + 1
        if (it % args.log_interval == 0 or it == args.max_iters) and master:
            synchronize(device)
            dt = (time.time() - t0) / timed
            log_progress(args, raw, log, started, it, loss, lr, dt, world, peak_flops)
            t0, timed = time.time(), 0
    if ddp:  # leave together, and release DDP's pending gloo work while the interpreter is still whole
        torch.distributed.barrier()
        del model
        gc.collect()  # DDP's reducer sits in reference cycles: free it now, not during interpreter shutdown
        torch.distributed.destroy_process_group()


def log_progress(args, raw, log, started, it, loss, lr, dt, world, peak_flops):
    """The progress line a person reads, and the same numbers in the log."""
    tokens_per_iter = args.grad_accum * args.batch_size * args.block_size
    mfu = raw.estimate_mfu(args.batch_size * args.grad_accum // world, dt, peak_flops, args.block_size)
    terms = {k: v.item() for k, v in raw.loss_terms.items()}
    print(f"iter {it}/{args.max_iters} ({100 * it // args.max_iters}%): loss {loss:.4f}, lr {lr:.2e}, "
          f"{dt * 1000:.1f} ms/iter, {tokens_per_iter / dt:,.0f} tokens/s, mfu {mfu * 100:.2f}%, "
          f"elapsed {timedelta(seconds=int(time.time() - started))}, "
          f"eta {timedelta(seconds=int(dt * (args.max_iters - it)))}")
    append_jsonl(log, dict(iter=it, loss=loss, lr=lr, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_iter / dt,
                           mfu=mfu, **terms, elapsed_s=round(time.time() - started, 2)))


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up in a log file as they happen
    ddp = os.environ.get("RANK", "-1") != "-1"  # launched by torchrun, which also sets WORLD_SIZE and LOCAL_RANK
    try:
        rank, world, _ = [int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] if ddp else (0, 1, 0)
    except (KeyError, ValueError):
        raise SystemExit("train.py: RANK is set, but RANK, WORLD_SIZE and LOCAL_RANK are not the whole numbers "
                         "torchrun sets: launch data-parallel runs with torchrun, or unset RANK") from None
    args, ckpt = parse_args(argv)
    if ddp and args.grad_accum % world:
        raise SystemExit(f"train.py: --grad_accum ({args.grad_accum}) must be a multiple of the {world} processes"
                         f" torchrun started (--nproc_per_node): e.g. --grad_accum {world}" if rank == 0 else 2)
    if ckpt is not None and ckpt["iter_num"] >= args.max_iters:
        if rank == 0:
            print(f"{args.out_dir}/ckpt.pt is at iteration {ckpt['iter_num']}, which reaches --max_iters "
                  f"{args.max_iters}: nothing to train. Give a larger --max_iters to train on.")
        return
    try:
        train(args, ckpt, ddp, rank, world)
    except KeyboardInterrupt:
        path = os.path.join(args.out_dir, "ckpt.pt")
        if rank == 0:
            print("\ninterrupted; " + (f"the last checkpoint is {path} (iteration {load_checkpoint(path)['iter_num']})."
                  f" Continue with: python train.py --out_dir {args.out_dir} --resume" if os.path.exists(path) else
                  "no checkpoint was written yet: start again with --overwrite"), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # now: the files are whole, and tearing torch down takes a second, far longer under load


if __name__ == "__main__":
    main()
