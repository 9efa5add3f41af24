"""
Train a standard or selective GPT (selective_gpt.py): nanoGPT's train.py, driven by flags.

    python train.py --dataset assign --selective             # offline quick start: a synthetic task, minutes on a CPU
    python prepare_data.py && python train.py --selective --n_head 8              # C4
    torchrun --standalone --nproc_per_node=4 train.py --selective ...              # data parallel (DDP)
    python train.py --resume                                  # carry on from out_dir/ckpt.pt, exactly

Data: every training and evaluation window starts with a BOS token (SPEC §2). Batches are drawn from a
generator seeded by (seed, split, iteration, micro-step), so the data order is a function of the iteration: a
resumed run sees the same batches as an uninterrupted one, and N DDP processes see what one process with N times
the gradient accumulation sees.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import torch

from prepare_data import (ASSIGN_TOKENS, BOS, ArgumentParser, add_device_flags, answers_right, assign_batch,
                          batch_generator, c4_batch, load_shards, make_dir, write_atomic)
from selective_gpt import (GPT, CheckpointError, GPTConfig, attention_path, autocast, autocast_dtype, load_checkpoint,
                           pick_device, strip_compile_prefix)

# ----------------------------------------------------------------------------------------------------------------
# Arguments

def get_parser():
    p = ArgumentParser(description=__doc__)
    a = p.add_argument_group("model (GPTConfig)")
    a.add_argument("--n_layer", type=int, default=4)
    a.add_argument("--n_head", type=int, default=4)
    a.add_argument("--n_embd", type=int, default=128)
    a.add_argument("--block_size", type=int, default=None, help="context length (None: 256 for c4, 96 for assign)")
    a.add_argument("--dropout", type=float, default=0.0)
    a.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False, help="biases in Linears/LNs")
    a.add_argument("--selective", action="store_true", help="selective attention (default: a standard transformer)")
    a.add_argument("--memory_loss_weight", type=float, default=0.0, help="epsilon of the memory loss (SPEC §5)")
    a.add_argument("--memory_tau", type=float, default=1.0, help="tau of the memory loss (SPEC §5)")
    a.add_argument("--attention", choices=["auto", "reference", "mask", "tiled"], default="auto",
                   help="how selective attention is computed (docs/SPEC.md §7): auto picks tiled where it applies")
    a.add_argument("--mask_bos", action="store_true", help="ablation (docs/SPEC.md §9): BOS may be masked")
    a.add_argument("--mask_self", action="store_true", help="ablation (docs/SPEC.md §9): a token's vote on its own "
                                                             "key counts")
    a.add_argument("--vocab_size", type=int, default=None,
                   help="None: 50304 for c4 (GPT-2's 50257 padded to a multiple of 64), the task's for assign")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=["c4", "assign"], default="c4")
    d.add_argument("--data_dir", default="data/c4", help="token shards from prepare_data.py (--dataset c4)")
    d.add_argument("--batch_size", type=int, default=16, help="sequences per micro-step (per process)")
    d.add_argument("--grad_accum", type=int, default=1, help="micro-steps per iteration, over all processes")
    o = p.add_argument_group("optimisation")
    o.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--min_lr", type=float, default=None, help="final learning rate (None: learning_rate / 10)")
    o.add_argument("--warmup_iters", type=int, default=100, help="linear warmup iterations")
    o.add_argument("--lr_decay_iters", type=int, default=None,
                   help="cosine decay length (None: max_iters, also when --resume extends max_iters)")
    o.add_argument("--max_iters", type=int, default=2000)
    o.add_argument("--weight_decay", type=float, default=0.1)
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.95)
    o.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm at this (0: off)")
    r = p.add_argument_group("running")
    r.add_argument("--out_dir", default=None, help="checkpoints and the JSON-lines log (None: out-<dataset>)")
    r.add_argument("--eval_interval", type=int, default=200)
    r.add_argument("--eval_iters", type=int, default=20, help="batches per evaluation")
    r.add_argument("--log_interval", type=int, default=10)
    add_device_flags(r)
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--seed", type=int, default=1337, help="initialisation, dropout and (by default) data order")
    r.add_argument("--data_seed", type=int, default=None, help="data order only (None: --seed), to compare "
                   "initialisations on the same batches")
    r.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt with its settings")
    r.add_argument("--overwrite", action="store_true",
                   help="start over in an out_dir that holds a run (its checkpoints, log and budgets are deleted)")
    r.add_argument("--peak_flops", type=float, default=None,
                   help="the device's peak FLOP/s for MFU (None: measured with a large matmul at start)")
    return p


MODEL_FIELDS = [f.name for f in dataclasses.fields(GPTConfig)]
RUN_FILES = ("ckpt.pt", "ckpt_best.pt", "log.jsonl", "budgets.json")  # what --overwrite deletes
# flag: (holds, what to say): the checks every value must pass (the model's own are GPTConfig's)
VALUE_CHECKS = {
    "learning_rate": (lambda v: 0 < v < math.inf, "must be a positive number"),
    "min_lr": (lambda v: 0 <= v < math.inf, "must be >= 0"),
    "warmup_iters": (lambda v: v >= 0, "must be >= 0"),
    "lr_decay_iters": (lambda v: v >= 1, "must be at least 1"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "must be >= 0"),
    "beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "grad_clip": (lambda v: 0 <= v < math.inf, "must be >= 0 (0: no clipping)"),
    "peak_flops": (lambda v: 0 < v < math.inf, "must be a positive number"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "data_seed": (lambda v: v >= 0, "must be >= 0"),
    **{name: (lambda v: v >= 1, "must be at least 1")
       for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval")},
}


def given_flags(parser, argv):
    """The destinations of the flags on the command line."""
    return {a.dest for a in parser._actions for s in a.option_strings
            if any(x == s or x.startswith(s + "=") for x in argv)}


def resolve_args(argv=None):
    """Parse and check flags; on --resume, every flag not given comes from the checkpoint, and model flags may not
    change. Returns (args, checkpoint or None)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, sys.argv[1:] if argv is None else argv)
    if args.out_dir is None:
        args.out_dir = f"out-{args.dataset}"
    if not args.out_dir.strip():
        parser.error("--out_dir is empty: give a directory for the run")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"--out_dir {args.out_dir} is a file, not a directory: give another --out_dir")
    ckpt = None
    if args.resume:
        if args.overwrite:
            parser.error("--resume continues the run in out_dir, --overwrite deletes it: give one of them")
        try:
            ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
        except CheckpointError as e:
            parser.error(f"--resume: {e}")
        saved = ckpt["args"]
        # --attention only picks how the same model is computed: it may change; checkpoints from before the field
        # existed hold none (GPTConfig's default)
        defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
        changed = [f"--{k} {saved.get(k, defaults.get(k))} -> {getattr(args, k)}"
                   for k in MODEL_FIELDS + ["dataset"]
                   if k in given and k != "attention" and getattr(args, k) != saved.get(k, defaults.get(k))]
        if changed:
            parser.error(f"--resume: {args.out_dir}/ckpt.pt is a checkpoint of a different model: {', '.join(changed)}."
                         f" Drop those flags, or use another --out_dir")
        for k, v in saved.items():
            if k not in given and k not in ("resume", "overwrite"):
                setattr(args, k, v)
        if "max_iters" in given and "lr_decay_iters" not in given and saved.get("lr_decay_iters") == saved["max_iters"]:
            args.lr_decay_iters = None  # the schedule followed max_iters (checkpoints of earlier versions say so)
    elif any(os.path.exists(os.path.join(args.out_dir, f)) for f in RUN_FILES) and not args.overwrite:
        parser.error(f"--out_dir {args.out_dir} holds a run already (its ckpt.pt or log.jsonl). Continue it with "
                     f"--resume, start over with --overwrite (deletes it), or give another --out_dir")
    if args.block_size is None:
        args.block_size = 96 if args.dataset == "assign" else 256
    tokens = len(ASSIGN_TOKENS) if args.dataset == "assign" else BOS + 1
    if args.vocab_size is None:
        args.vocab_size = tokens if args.dataset == "assign" else 50304
    if args.vocab_size < tokens:
        parser.error(f"--vocab_size {args.vocab_size} is smaller than the {tokens} tokens of --dataset {args.dataset}")
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    args.min_lr = args.learning_rate / 10 if args.min_lr is None else args.min_lr
    for name, (holds, what) in VALUE_CHECKS.items():
        value = getattr(args, name)
        if value is not None and not holds(value):
            parser.error(f"--{name} {value} {what}")
    try:
        GPTConfig(**model_args(args))
    except ValueError as e:
        parser.error(str(e))
    try:
        autocast_dtype(pick_device(args.device).split(":")[0], args.dtype)
    except ValueError as e:
        parser.error(str(e))
    return args, ckpt


def model_args(args):
    return {k: getattr(args, k) for k in MODEL_FIELDS}


def measure_peak_flops(device, dtype):
    """The FLOP/s of a large matmul in the training dtype: the practical peak MFU is measured against."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype)  # leaves the RNG alone
    best = float("inf")
    for _ in range(4):
        synchronize(device)
        t = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


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


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Files: written atomically (a temporary name, then renamed), checkpoints read with weights_only and checked.

def write_log(path, records):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def append_log(path, record, started):
    """One JSON line in the run's log, stamped with the seconds since this process started."""
    with open(path, "a") as f:
        f.write(json.dumps(dict(record, elapsed_s=round(time.time() - started, 2))) + "\n")


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Training

def get_batch(args, shards, split, step, micro, device):
    """Batch `micro` of iteration `step` of split 'train' or 'val' (step -1: the fixed evaluation batches)."""
    g = batch_generator(args.data_seed, split, step, micro)
    if args.dataset == "assign":
        x, y = assign_batch(args.batch_size, args.block_size, g)
    else:
        x, y = c4_batch(shards["validation" if split == "val" else "train"], args.batch_size, args.block_size, g)
    return x.to(device), y.to(device)


def load_c4(args):
    """The train and validation shards, each split checked to hold at least one window of block_size tokens."""
    try:
        shards = {s: load_shards(args.data_dir, s) for s in ("train", "validation")}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"train.py: {e}")
    for split, parts in shards.items():
        longest = max(len(s) for s in parts)
        if longest < args.block_size:
            raise SystemExit(f"train.py: the {split} split in {args.data_dir} has at most {longest} tokens in a shard, "
                             f"fewer than --block_size {args.block_size}: prepare more data or lower --block_size")
    return shards


@torch.no_grad()
def evaluate(model, args, shards, ctx, device):
    """Mean cross-entropy (and answer accuracy for assign) on fixed batches of each split."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        ce, correct, answers = [], 0, 0
        for k in range(args.eval_iters):
            x, y = get_batch(args, shards, split, -1, k, device)  # step -1: the same evaluation batches every time
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


def rng_states(device_type, world):
    """Every process's RNG state (dropout), so that --resume continues exactly."""
    states = {"cpu": [torch.get_rng_state()], "cuda": [torch.cuda.get_rng_state()] if device_type == "cuda" else []}
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, states)
        states = {k: [s for g in gathered for s in g[k]] for k in states}
    return states


def clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def start_log(args, ckpt, log_path, header):
    """A new run's log starts with its header. A resumed run's log keeps the records up to the checkpoint's
    iteration (later ones were redone), then says where it resumed: one record per iteration, whatever happened."""
    if ckpt is None:
        write_log(log_path, [header])
        return
    records = read_log(log_path) if os.path.exists(log_path) else []
    kept = [r for r in records if r.get("iter", -1) <= ckpt["iter_num"]]
    write_log(log_path, kept + [{"resumed_at": ckpt["iter_num"], "max_iters": args.max_iters,
                                          "lr_decay_iters": decay_iters(args), "git_commit": header["git_commit"]}])


def say_resume(args, ckpt):
    """What a resume will do, in one line; None when there is nothing to train."""
    at, saved = ckpt["iter_num"], ckpt["args"]
    if at >= args.max_iters:
        return None
    line = f"resuming {args.out_dir}/ckpt.pt at iteration {at}, training to {args.max_iters}"
    was = argparse.Namespace(**dict(saved, lr_decay_iters=saved.get("lr_decay_iters") or saved["max_iters"]))
    if decay_iters(args) != was.lr_decay_iters:
        line += (f"; the cosine schedule now reaches min_lr {args.min_lr:.2e} at iteration {decay_iters(args)} "
                 f"(was {was.lr_decay_iters}): learning rate {get_lr(at, args):.2e} at iteration {at} "
                 f"(the old schedule's {get_lr(at, was):.2e})")
    return line


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up in a log file as they happen
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    args, ckpt = resolve_args(argv)
    if ddp and args.grad_accum % world:
        raise SystemExit(f"train.py: --grad_accum ({args.grad_accum}) must be a multiple of the {world} processes"
                         f" torchrun started (--nproc_per_node): e.g. --grad_accum {world}" if rank == 0 else 2)
    if ckpt is not None and say_resume(args, ckpt) is None:
        if rank == 0:
            print(f"{args.out_dir}/ckpt.pt is at iteration {ckpt['iter_num']}, which reaches --max_iters "
                  f"{args.max_iters}: nothing to train. Give a larger --max_iters to train on.")
        return
    try:
        train(args, ckpt, ddp, rank, world)
    except KeyboardInterrupt:
        path = os.path.join(args.out_dir, "ckpt.pt")
        if rank == 0:
            saved = f"the last checkpoint is {path} (iteration {load_checkpoint(path)['iter_num']})" \
                if os.path.exists(path) else "no checkpoint was written yet"
            print(f"\ninterrupted; {saved}. Continue with: python train.py --out_dir {args.out_dir} --resume",
                  file=sys.stderr)
        sys.exit(130)


@dataclasses.dataclass
class Run:
    """What one training process holds: the model (raw_model without compile/DDP wrappers), its optimiser and
    precision, the data, where the run is, and the clocks."""
    args: argparse.Namespace
    device: str
    rank: int
    world: int
    model: torch.nn.Module
    raw_model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ctx: contextlib.AbstractContextManager
    shards: dict
    peak_flops: float
    iter_num: int = 0
    best_val_loss: float = float("inf")
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def master(self):
        return self.rank == 0

    def path(self, name):
        return os.path.join(self.args.out_dir, name)


def setup_device(args, ddp, rank):
    """The device of this process (torchrun: one GPU each, or gloo on CPUs), seeded."""
    device = pick_device(args.device)
    if ddp:
        from torch.distributed import init_process_group
        use_cuda = device.startswith("cuda")
        init_process_group(backend="nccl" if use_cuda else "gloo")
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed + rank)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def build_run(args, ckpt, ddp, rank, world):
    """Device, data, model, optimiser: new, or exactly as the checkpoint left them."""
    device = setup_device(args, ddp, rank)
    device_type = device.split(":")[0]
    dtype_name = autocast_dtype(device_type, args.dtype)
    shards = load_c4(args) if args.dataset == "c4" else None
    model = GPT(GPTConfig(**model_args(args))).to(device)
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
                                           device_type, args.grad_clip)
    run = Run(args, device, rank, world, model, model, optimizer,
              torch.amp.GradScaler(device_type, enabled=dtype_name == "float16"), autocast(device_type, dtype_name),
              shards, args.peak_flops or measure_peak_flops(device, getattr(torch, dtype_name)))
    if ckpt is not None:
        model.load_state_dict(strip_compile_prefix(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        run.iter_num, run.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["cpu"][rank % len(ckpt["rng"]["cpu"])])
        if device_type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank % len(ckpt["rng"]["cuda"])])
    if args.compile:
        if run.master:
            print("compiling the model (torch.compile): about 30-60 s on a CPU before the first iteration")
        run.model = torch.compile(run.model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        run.model = DistributedDataParallel(run.model, device_ids=[int(os.environ["LOCAL_RANK"])]
                                            if device_type == "cuda" else None)
    return run


def start_run(run, ckpt):
    """The run directory (--overwrite clears an old run; resolve_args checked the rest), its log, the first line."""
    args, raw = run.args, run.raw_model
    make_dir(args.out_dir, "--out_dir")
    if args.overwrite:
        for name in RUN_FILES:
            if os.path.exists(run.path(name)):
                os.remove(run.path(name))
    path = attention_path(args.attention, torch.empty(0, device=run.device), args.dropout,
                          ablated=args.mask_bos or args.mask_self) if args.selective else None
    tokens_per_iter = args.grad_accum * args.batch_size * args.block_size
    start_log(args, ckpt, run.path("log.jsonl"), {
        "config": vars(args), "model": model_args(args), "git_commit": git_commit(), "device": run.device,
        "dtype": autocast_dtype(run.device.split(":")[0], args.dtype), "world_size": run.world,
        "tokens_per_iter": tokens_per_iter, "n_params": raw.get_num_params(), "torch": torch.__version__,
        "peak_flops": run.peak_flops, "attention_path": path})
    print(f"{'selective' if args.selective else 'standard'} GPT, {raw.get_num_params() / 1e6:.2f}M parameters, "
          f"{args.dataset}, {run.device} {autocast_dtype(run.device.split(':')[0], args.dtype)}, {tokens_per_iter} "
          f"tokens/iter, world {run.world}, out_dir {args.out_dir}" + (f", attention path: {path}" if path else ""))
    if ckpt is not None:
        print(say_resume(args, ckpt))


def evaluate_and_save(run):
    """Evaluate, log, and write ckpt.pt (and ckpt_best.pt when the validation loss improved)."""
    metrics = evaluate(run.raw_model, run.args, run.shards, run.ctx, run.device)
    improved = metrics["val_loss"] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, metrics["val_loss"])
    rng = rng_states(run.device.split(":")[0], run.world)  # under DDP every process takes part in the gather
    if not run.master:
        return
    acc = f", val accuracy {metrics['val_accuracy']:.3f}" if run.args.dataset == "assign" else ""
    print(f"eval {run.iter_num}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
          f"val ppl {metrics['val_ppl']:.2f}{acc}")
    append_log(run.path("log.jsonl"), dict(iter=run.iter_num, **metrics), run.started)
    state = {"model": strip_compile_prefix(run.raw_model.state_dict()), "optimizer": run.optimizer.state_dict(),
             "args": vars(run.args), "model_args": model_args(run.args), "iter_num": run.iter_num,
             "best_val_loss": run.best_val_loss, "rng": rng}
    write_atomic(run.path("ckpt.pt"), lambda tmp: torch.save(state, tmp))
    if improved:
        write_atomic(run.path("ckpt_best.pt"), lambda tmp: torch.save(state, tmp))


def train_step(run, lr):
    """One iteration: the micro-steps of this process (DDP syncs gradients on the last), clipping, the update.
    Returns the last micro-step's loss."""
    args, micro_steps = run.args, run.args.grad_accum // run.world
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    for micro in range(micro_steps):
        x, y = get_batch(args, run.shards, "train", run.iter_num, run.rank * micro_steps + micro, run.device)
        sync = run.world == 1 or micro == micro_steps - 1
        with (contextlib.nullcontext() if sync else run.model.no_sync()), run.ctx:
            _, loss = run.model(x, targets=y)
            loss = loss / micro_steps
        run.scaler.scale(loss).backward()
    if args.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    return loss.item() * micro_steps


def log_progress(run, loss, lr, dt, eta):
    """The progress line a person reads, and the same numbers in the log."""
    args = run.args
    tokens_per_iter = args.grad_accum * args.batch_size * args.block_size
    mfu = run.raw_model.estimate_mfu(args.batch_size * args.grad_accum // run.world, dt, run.peak_flops,
                                     args.block_size)
    terms = {k: v.item() for k, v in run.raw_model.loss_terms.items()}
    print(f"iter {run.iter_num}/{args.max_iters} ({100 * run.iter_num // args.max_iters}%): loss {loss:.4f}, "
          f"lr {lr:.2e}, {dt * 1000:.1f} ms/iter, {tokens_per_iter / dt:,.0f} tokens/s, mfu {mfu * 100:.2f}%, "
          f"elapsed {clock(time.time() - run.started)}, eta {clock(eta)}")
    append_log(run.path("log.jsonl"), dict(iter=run.iter_num, loss=loss, lr=lr, ms_per_iter=dt * 1000,
                                           tokens_per_s=tokens_per_iter / dt, mfu=mfu, **terms), run.started)


def train(args, ckpt, ddp, rank, world):
    run = build_run(args, ckpt, ddp, rank, world)
    if run.master:
        start_run(run, ckpt)
    run.model.train()
    train_seconds, first_iter = 0.0, run.iter_num  # training time alone (evaluations left out), for the eta
    t0, timed_iters = time.time(), 0
    while True:
        resumed_here = ckpt is not None and run.iter_num == ckpt["iter_num"]  # evaluated before the stop
        if (run.iter_num % args.eval_interval == 0 or run.iter_num == args.max_iters) and not resumed_here:
            train_seconds += time.time() - t0
            evaluate_and_save(run)
            t0, timed_iters = time.time(), 0
        if run.iter_num >= args.max_iters:
            break
        lr = get_lr(run.iter_num, args)
        loss = train_step(run, lr)
        timed_iters += 1
        if run.iter_num % args.log_interval == 0 or run.iter_num == args.max_iters:
            synchronize(run.device)
            dt = (time.time() - t0) / timed_iters
            train_seconds += time.time() - t0
            t0, timed_iters = time.time(), 0
            if run.master:
                log_progress(run, loss, lr, dt, train_seconds / (run.iter_num - first_iter) *
                             (args.max_iters - run.iter_num))
    if ddp:  # leave together, and release DDP's pending gloo work while the interpreter is still whole
        torch.distributed.barrier()
        del run.model
        gc.collect()  # DDP's reducer sits in reference cycles: free it now, not during interpreter shutdown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
