"""
What the scripts share: their argument parser, atomic file writes, the device and dtype a model runs in, train.py's
checkpoints, and the data every script reads (GPT-2's tokenizer, C4 token shards, batches, the assign task).
prepare_data.py writes the token shards; everything that reads them is here.
"""

import argparse
import contextlib
import glob
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from selective_gpt import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------------------------
# Flags

class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: --help keeps the docstring's layout and shows every default; a bad flag ends in one
    short paragraph (the message, and where the flags are listed) instead of the whole usage. Flags are taken only
    whole: argparse's abbreviations would read train.py --lr 1000 as --lr_decay_iters 1000, silently."""

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    def __init__(self, **kwargs):
        super().__init__(formatter_class=self.Formatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        # a value a `checked` type refused: "argument --lr: 0.0 must be ..." reads "--lr 0.0 must be ..."
        message = re.sub(r"^argument (-\S+): (\S+ must )", r"\1 \2", message)
        self.exit(2, f"{self.prog}: error: {message}\n(python {self.prog} --help lists every flag and its default)\n")


def checked(convert, holds, what):
    """An argparse type: the value converted (int, float), then refused with `what` unless holds(value)."""
    def parse(text):
        value = convert(text)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"{value} {what}")
        return value
    parse.__name__ = convert.__name__  # argparse names the type in "invalid float value: 'x'"
    return parse


def at_least(low):
    return checked(int, lambda v: v >= low, f"must be at least {low}")


positive = checked(float, lambda v: 0 < v < math.inf, "must be a positive number")
non_negative = checked(float, lambda v: 0 <= v < math.inf, "must be >= 0")
fraction = checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")
random_seed = checked(int, lambda v: 0 <= v < 2 ** 63, "must be in 0 .. 2**63 - 1 (torch.manual_seed's range)")


def std_or_width(text):
    """--init_std: a positive number, or the word width (None: GPTConfig's width rule, SPEC §10)."""
    try:
        return None if text == "width" else positive(text)
    except ValueError:  # not a number at all
        raise argparse.ArgumentTypeError(f"{text} must be a positive number, or width") from None


def as_flag(key, value):
    """A setting as its flag spells it: init_std None is --init_std width (std_or_width backwards)."""
    return "width" if key == "init_std" and value is None else value


def given_flags(parser, argv=None):
    """{flag: value} of the flags on the command line, defaults left out: argparse fills in a default only where
    the namespace it parses into has no value yet."""
    unset = object()
    parsed = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))))
    return {k: v for k, v in parsed.items() if v is not unset}


def add_device_flags(parser):
    """--device and --dtype, for train.py and sample.py (checked by pick_device and autocast_dtype)."""
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="autocast dtype (None: bfloat16 on a GPU or a CPU that has it natively, else float32)")


# ----------------------------------------------------------------------------------------------------------------
# Files: written whole or not at all

def write_atomic(path, write):
    """A file appears whole or not at all: write(tmp) fills a temporary file beside path, which is then renamed
    (a write that fails removes it)."""
    tmp = path + ".tmp"
    try:
        write(tmp)
    except BaseException:
        with contextlib.suppress(OSError):  # (the write's own error is the one to report)
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1)))


def write_jsonl(path, records):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of a JSON-lines log. A process killed while appending leaves a torn last line: it is dropped."""
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is a damaged line, not an error reading the file
        lines = [line for line in f if line.strip()]
    records = []
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:  # not JSON, or not UTF-8
            if n < len(lines) - 1:
                raise ValueError(f"{path}: line {n + 1} is not JSON (only a last line may be torn)") from None
    return records


def make_dir(path, flag):
    """os.makedirs for the directory a flag names, then a trial write in it: one clear line where it cannot be made
    or written in (under a file, read-only, a place like /proc or /sys) instead of a traceback; the scripts call it
    before they write anything."""
    script = os.path.basename(sys.argv[0])
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{script}: error: {flag} {path}: cannot create this directory ({e.strerror}); give another "
                         f"{flag}")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SystemExit(f"{script}: error: {flag} {path}: cannot write in this directory ({e.strerror}); give "
                         f"another {flag}")


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Device, dtype, checkpoints

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
        bf16 = cpu_has_native_bf16() if device_type == "cpu" else \
            device_type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bfloat16" if bf16 else "float32"
    if device_type == "cpu" and name == "float16":
        raise ValueError("--dtype float16 is not supported on the CPU; use --dtype bfloat16 or float32")
    if device_type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--dtype bfloat16: this GPU has none; use --dtype float16 or float32")
    if device_type == "mps" and name == "bfloat16":
        raise ValueError("--dtype bfloat16 is not supported on MPS; use --dtype float16 or float32")
    return name


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: without either, bfloat16 is emulated, and a matmul takes about 100x float32's time (docs/
    PERFORMANCE.md, CPU dtype)."""
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def autocast(device_type, dtype_name):
    """The context the model runs in: autocast to dtype_name, or nothing for float32."""
    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype_name))


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


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


# ----------------------------------------------------------------------------------------------------------------
# Text: GPT-2's BPE, and token shards in llm.c's .bin layout (a header of 256 int32: magic, version, token count;
# then uint16 tokens)

BOS = 50256  # GPT-2's <|endoftext|>: the BOS of every C4 window (SPEC §2) and the separator of documents
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256


def gpt2_encoder():
    """tiktoken's GPT-2 BPE; offline it needs the encoder files in TIKTOKEN_CACHE_DIR (README, Data)."""
    import tiktoken  # here, so that --help works without it
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError and friends: tiktoken downloads the files on first use
        raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'python'}: GPT-2's BPE files could not be loaded or "
                         f"downloaded ({type(e).__name__}). On a machine without internet, set TIKTOKEN_CACHE_DIR to "
                         f"a folder that holds them (copied from a machine where tiktoken.get_encoding('gpt2') ran)."
                         ) from None


def write_bin(path, tokens):
    """A token shard, written to a temporary file and renamed, so a .bin on disk is always complete."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(
        header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()))


def read_bin(path):
    """Tokens of a .bin as a read-only memmap; a clear error if the file is not one of ours or is cut short."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC or header[1] != VERSION:
        raise ValueError(f"{path} is not a token file of prepare_data.py (bad header); delete it and prepare again")
    n = int(header[2])
    if os.path.getsize(path) != HEADER_INTS * 4 + 2 * n:
        raise ValueError(f"{path} should hold {n} tokens but its size disagrees; delete it and prepare again")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,))


def split_of(path):
    return "validation" if "validation" in os.path.basename(path) else "train"


def load_shards(data_dir, split, block_size=1):
    """The token shards of a split, checked to hold at least one window of block_size tokens."""
    paths = [p for p in sorted(glob.glob(os.path.join(data_dir, "*.bin"))) if split_of(p) == split]
    if not paths:
        raise FileNotFoundError(f"no {split} shards (*.bin) in {data_dir}: point --data_dir at them, or make them with"
                                f"  python prepare_data.py  (downloads C4; --local PATH for files you have)")
    shards = [read_bin(p) for p in paths]
    longest = max(len(s) for s in shards)
    if longest < block_size:
        raise ValueError(f"the {split} split in {data_dir} has at most {longest} tokens in a shard, fewer than the "
                         f"block size {block_size}: point --data_dir at longer shards, or prepare more data (or train "
                         f"with a smaller --block_size)")
    return shards


# ----------------------------------------------------------------------------------------------------------------
# Batches. Each is drawn from a generator seeded by where it is used (batch_generator), never by what ran before:
# a resumed run sees the batches of an uninterrupted one.

def batch_generator(seed, split, step, micro):
    """The generator for one batch: a function of where the batch is used (split 'train' or 'val', iteration
    step, or -1 for the fixed evaluation batches, micro-step), never of what ran before."""
    words = [seed, ("train", "val").index(split), step + 1, micro]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1))


def c4_batch(shards, batch_size, block_size, generator):
    """Random windows of the token stream with BOS put at position 0 (SPEC §2): x = [BOS, t_o .. t_{o+T-2}],
    y = [t_o .. t_{o+T-1}]. A shard is picked with probability proportional to its windows."""
    windows = torch.tensor([max(len(s) - block_size + 1, 0) for s in shards], dtype=torch.float64)
    if windows.sum() == 0:
        raise ValueError(f"every shard is shorter than block_size ({block_size}) tokens")
    which = torch.multinomial(windows, batch_size, replacement=True, generator=generator)
    starts = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * windows[which]).long()
    y = torch.stack([torch.from_numpy(shards[w][o:o + block_size].astype(np.int64))
                     for w, o in zip(which.tolist(), starts.tolist())])
    x = torch.cat([torch.full((batch_size, 1), BOS), y[:, :-1]], dim=1)
    return x, y


# The variable-assignment task (--dataset assign): a stream of assignments "a=3" that set and reset 8 variables,
# and queries "a?" whose answer, the next token, is the variable's latest value. Only answers are scored. Each new
# assignment makes the earlier ones of its variable useless: the situation selective attention is built for.

ASSIGN_VARS, ASSIGN_VALUES, QUERY_SHARE = "abcdefgh", "0123456789", 0.3
ASSIGN_TOKENS = (["^"] + [f"{v}={x}" for v in ASSIGN_VARS for x in ASSIGN_VALUES]  # BOS, assignments,
                 + [f"{v}?" for v in ASSIGN_VARS] + list(ASSIGN_VALUES))  # queries, answers
QUERY0, ANSWER0 = 1 + len(ASSIGN_VARS) * len(ASSIGN_VALUES), 1 + len(ASSIGN_VARS) * (len(ASSIGN_VALUES) + 1)


def assign_batch(batch_size, block_size, generator):
    """x, y: (B, block_size); a sequence reads '^ a=3 b=1 a? 3 a=7 ...'. y is the answer after each query, else -1."""
    B, V = batch_size, len(ASSIGN_VARS)
    var = torch.randint(V, (B, block_size), generator=generator)
    val = torch.randint(len(ASSIGN_VALUES), (B, block_size), generator=generator)
    ask = torch.rand(B, block_size, generator=generator) < QUERY_SHARE
    seq = torch.zeros(B, block_size + 1, dtype=torch.long)  # position 0: BOS
    scored = torch.zeros(B, block_size + 1, dtype=torch.bool)
    latest = torch.full((B, V), -1)  # each variable's current value, -1 before its first assignment
    pending = torch.full((B,), -1)  # the answer the next token must give, -1 if none
    rows = torch.arange(B)
    for t in range(1, block_size + 1):
        v, known = var[:, t - 1], latest[rows, var[:, t - 1]]
        answer = pending >= 0
        query = ~answer & ask[:, t - 1] & (known >= 0)  # only variables with a value are asked for
        assign = ~answer & ~query
        seq[:, t] = torch.where(answer, ANSWER0 + pending,
                                torch.where(query, QUERY0 + v, 1 + v * len(ASSIGN_VALUES) + val[:, t - 1]))
        scored[:, t] = answer
        latest[rows, v] = torch.where(assign, val[:, t - 1], known)
        pending = torch.where(query, known, -1)
    return seq[:, :-1], seq[:, 1:].masked_fill(~scored[:, 1:], -1)


def answers_right(logits, y):
    """(right, scored): how many scored targets (y != -1) the logits' argmax gets, and how many there are."""
    scored = y != -1
    return (logits.argmax(-1)[scored] == y[scored]).sum().item(), scored.sum().item()


def assign_encode(text):
    """'a=3 b=1 a?' -> token ids (tokens separated by white space)."""
    unknown = [w for w in text.split() if w not in ASSIGN_TOKENS]
    if unknown:
        raise ValueError(f"the assign task has no token {unknown[0]!r}: its tokens are 'a=3' (assign), 'a?' (query),"
                         f" '3' (answer), variables {ASSIGN_VARS}, values {ASSIGN_VALUES}")
    return [ASSIGN_TOKENS.index(w) for w in text.split()]


def assign_decode(tokens):
    return " ".join(ASSIGN_TOKENS[t] for t in tokens)


def get_batch(run, split, step, micro, shards=None):
    """Batch `micro` of iteration `step` (-1: the fixed evaluation batches) of split 'train' or 'val' for a run's
    settings (dataset, data_seed, batch_size, block_size: train.py's flags); shards: {'train', 'validation'}."""
    g = batch_generator(run["data_seed"], split, step, micro)
    if run["dataset"] == "assign":
        return assign_batch(run["batch_size"], run["block_size"], g)
    return c4_batch(shards["validation" if split == "val" else "train"], run["batch_size"], run["block_size"], g)
