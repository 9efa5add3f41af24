"""
Download C4 (allenai/c4, "en") shards and tokenize them with GPT-2's BPE into .bin files for train.py.

    python prepare_data.py                              # 1 train + 1 validation shard from the Hugging Face hub
    python prepare_data.py --train_shards 4             # more data
    python prepare_data.py --base_url http://127.0.0.1:8000/   # a mirror or local server with the same file names
    python prepare_data.py --local path/to/dir_or_glob  # tokenize local .json.gz / .jsonl (C4 format) or .txt files

Every document is preceded by <|endoftext|> (50256), the BOS of SPEC §2. Each input shard becomes one .bin in
--data_dir: llm.c's layout (a header of 256 int32: magic 20240520, version 1, token count; then uint16 tokens).
Downloads resume with HTTP Range after a dropped connection; every file is written to a temporary name and
renamed when complete, so an interrupted run leaves nothing half-written and a re-run skips finished shards.
"""

import argparse
import glob
import gzip
import http.client
import json
import os
import pathlib
import sys
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import torch

C4_REVISION = "1ddc917116b730e1859edef32896ec5c16be51d0"  # a fixed commit of allenai/c4, so the data never moves
C4_SHARDS = {"train": 1024, "validation": 8}
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
BOS = 50256  # GPT-2's <|endoftext|>: the BOS of every C4 window (SPEC §2) and the separator of documents
SETTINGS_FILE = "prepare.json"  # in data_dir: how its shards were made, so a re-run never mixes two settings


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: --help keeps the docstring's layout and shows every default; a bad flag ends in one
    short paragraph (the message, and where the flags are listed) instead of the whole usage. Flags are taken only
    whole: argparse's abbreviations would read train.py --lr 1000 as --lr_decay_iters 1000, silently."""

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    def __init__(self, **kwargs):
        super().__init__(formatter_class=self.Formatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(python {self.prog} --help lists every flag and its default)\n")


def add_device_flags(parser):
    """--device and --dtype, for train.py and sample.py (selective_gpt.pick_device and autocast_dtype check them)."""
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="autocast dtype (None: bfloat16 where supported, else float32)")


def write_atomic(path, write):
    """A file appears whole or not at all: write(tmp) fills a temporary file beside path, which is then renamed."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1)))


def make_dir(path, flag):
    """os.makedirs for the directory a flag names, ending in one clear line where it cannot be made (under a file,
    read-only, a place like /proc) instead of a traceback; the scripts call it before they write anything."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {flag} {path}: cannot create this directory "
                         f"({e.strerror}); give another {flag}")


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


def c4_name(split, index):
    return f"c4-{split}.{index:05d}-of-{C4_SHARDS[split]:05d}.json.gz"


def default_base_url(revision):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/allenai/c4/resolve/{revision}/en/"


# ----------------------------------------------------------------------------------------------------------------
# Download: resumable, retried with backoff, size-checked, renamed into place when complete.

def download(url, dest, token=None, retries=6, backoff=1.0):
    partial = dest + ".part"
    for attempt in range(retries + 1):
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        headers = {"User-Agent": "selective-gpt/prepare_data"}
        if have:
            headers["Range"] = f"bytes={have}-"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
                resumed = have > 0 and getattr(response, "status", None) == 206
                total = expected_size(response, have if resumed else 0)
                with open(partial, "ab" if resumed else "wb") as f:
                    received = have if resumed else 0
                    started = time.time()
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        received += len(chunk)
                        rate = received / max(time.time() - started, 1e-6) / 1e6
                        print(f"\r  {os.path.basename(dest)}: {received / 1e6:.1f}"
                              f"{f' / {total / 1e6:.1f}' if total else ''} MB ({rate:.1f} MB/s)", end="", flush=True)
            print()
            size = os.path.getsize(partial)
            if total is not None and size != total:
                raise ConnectionError(f"got {size} bytes of {total}")
            os.replace(partial, dest)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416:  # the partial file is not a prefix of this one: start again
                os.remove(partial)
            elif e.code in (401, 403):
                sys.exit(f"prepare_data: {url} refused access (HTTP {e.code}); set HF_TOKEN to a Hugging Face token")
            elif e.code == 404:
                sys.exit(f"prepare_data: {url} does not exist (HTTP 404); check --base_url and the shard counts")
            error = e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
            error = e  # a dropped connection (IncompleteRead), a timeout, a refused connection: retry
        if attempt < retries:
            wait = backoff * 2 ** attempt
            print(f"\n  {os.path.basename(dest)}: {error}; retrying in {wait:.0f}s (attempt {attempt + 2})")
            time.sleep(wait)
    sys.exit(f"prepare_data: could not download {url} after {retries + 1} attempts: {error}\n"
             f"  the partial download {partial} is kept: run again to resume it")


def expected_size(response, offset):
    """The whole file's size from Content-Range (a resumed download) or Content-Length, if the server says."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


# ----------------------------------------------------------------------------------------------------------------
# Tokenize: documents -> [BOS, tokens...] -> one .bin per input file.

def read_documents(path):
    """The documents of a C4-format .json.gz / .jsonl file (field "text", one JSON object a line), or a .txt file."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            yield f.read()
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def write_bin(path, tokens):
    """llm.c's .bin layout, written to a temporary file and renamed, so a .bin on disk is always complete."""
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


def tokenize_file(src, encoder, downloaded, batch=256):
    """The tokens of src, each document preceded by BOS. A truncated or corrupt input stops the run."""
    tokens, docs, started = [], 0, time.time()
    size = os.path.getsize(src)

    def flush(texts):
        for ids in encoder.encode_ordinary_batch(texts):
            tokens.append(BOS)
            tokens.extend(ids)

    try:
        texts = []
        for text in read_documents(src):
            texts.append(text)
            docs += 1
            if len(texts) == batch:
                flush(texts)
                texts = []
                rate = len(tokens) / max(time.time() - started, 1e-6)
                print(f"\r  {os.path.basename(src)} ({size / 1e6:.1f} MB): {docs} documents, "
                      f"{len(tokens) / 1e6:.2f}M tokens, {rate / 1e3:.0f}k tokens/s", end="", flush=True)
        flush(texts)
    except (EOFError, OSError, zlib.error, UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        print()
        advice = "Delete it and run again: it is fetched anew." if downloaded else \
            "Check the file (is it complete, gzip or JSON lines with a 'text' field, UTF-8?) or leave it out."
        sys.exit(f"prepare_data: {src} is truncated or corrupt ({type(e).__name__}: {e}); nothing was written. "
                 f"{advice}")
    print(f"\r  {os.path.basename(src)}: {docs} documents, {len(tokens)} tokens" + " " * 30)
    return np.asarray(tokens, dtype=np.uint16)


def bin_name(src):
    name = os.path.basename(src)
    for suffix in (".json.gz", ".jsonl.gz", ".jsonl", ".json", ".txt"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".bin"
    return name + ".bin"


def split_of(path):
    return "validation" if "validation" in os.path.basename(path) else "train"


def local_inputs(pattern):
    paths = sorted(glob.glob(os.path.join(pattern, "*")) if os.path.isdir(pattern) else glob.glob(pattern))
    paths = [p for p in paths if p.endswith((".json.gz", ".jsonl.gz", ".jsonl", ".json", ".txt"))]
    if not paths:
        sys.exit(f"prepare_data: no .json.gz, .jsonl or .txt files at {pattern}")
    return paths


def check_settings(parser, args, settings):
    """data_dir/prepare.json records the settings its shards were made with (record_settings): a re-run with others
    would mix two kinds of shard (or keep old ones silently), so it is refused unless --overwrite clears them."""
    path = os.path.join(args.data_dir, SETTINGS_FILE)
    shards = glob.glob(os.path.join(args.data_dir, "*.bin"))
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    if shards and saved != settings and not args.overwrite:
        was = "unrecorded settings (an older prepare_data.py)" if saved is None else \
            ", ".join(f"{k} {saved.get(k)!r}" for k in sorted(settings) if saved.get(k) != settings[k])
        parser.error(f"--data_dir {args.data_dir} holds shards made with {was}; these flags ask for other ones. "
                     f"Use another --data_dir, or --overwrite to delete its .bin files and prepare anew")
    if args.overwrite:
        for shard in shards:
            os.remove(shard)
    make_dir(args.data_dir, "--data_dir")


def record_settings(data_dir, settings):
    """Written before the first shard, so that a run that writes nothing leaves nothing."""
    write_json(os.path.join(data_dir, SETTINGS_FILE), settings)


# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Batches of C4 token shards, for train.py and sample.py

def load_shards(data_dir, split):
    paths = [p for p in sorted(glob.glob(os.path.join(data_dir, "*.bin"))) if split_of(p) == split]
    if not paths:
        raise FileNotFoundError(f"no {split} shards (*.bin) in {data_dir}: run  python prepare_data.py  (downloads "
                                f"C4; --local PATH for files you have), or train offline with --dataset assign")
    return [read_bin(p) for p in paths]


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


def batch_generator(seed, split, step, micro):
    """The generator for one batch: a function of where the batch is used (split 'train' or 'val', iteration
    step, or -1 for the fixed evaluation batches, micro-step), never of what ran before."""
    words = [seed, ("train", "val").index(split), step + 1, micro]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1))


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", default="data/c4", help="where the .bin files go")
    parser.add_argument("--train_shards", type=int, default=1, help="C4 train shards to fetch (of 1024)")
    parser.add_argument("--val_shards", type=int, default=1, help="C4 validation shards to fetch (of 8)")
    parser.add_argument("--base_url", default=None,
                        help="directory URL holding the C4 'en' files (http://, https:// or file://); default: the "
                             "Hugging Face hub ($HF_ENDPOINT if set) at a pinned revision")
    parser.add_argument("--revision", default=C4_REVISION, help="allenai/c4 commit to download from the hub")
    parser.add_argument("--local", default=None, help="tokenize these local files (a directory or a glob) instead")
    parser.add_argument("--val_fraction", type=float, default=0.01,
                        help="--local without a validation file: the share of tokens held out for validation")
    parser.add_argument("--keep_downloads", action="store_true", help="keep the .json.gz files after tokenizing")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the .bin files of data_dir first (when it was prepared with other settings)")
    args = parser.parse_args(argv)
    if not 0 <= args.train_shards <= C4_SHARDS["train"] or not 0 <= args.val_shards <= C4_SHARDS["validation"]:
        parser.error(f"--train_shards must be 0..{C4_SHARDS['train']} and --val_shards 0..{C4_SHARDS['validation']}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction {args.val_fraction} must be between 0 and 1 (the share of tokens held out)")
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir} is a file: give a directory")
    settings = {"encoding": "gpt2", "bos": BOS}
    settings |= {"local": os.path.abspath(args.local), "val_fraction": args.val_fraction} if args.local else \
        {"c4_revision": args.revision}  # any mirror (--base_url, HF_ENDPOINT) serves the same files
    check_settings(parser, args, settings)
    encoder = gpt2_encoder()

    if args.local:
        inputs = [(path, False) for path in local_inputs(args.local)]
    else:
        base = (args.base_url or default_base_url(args.revision)).rstrip("/") + "/"
        names = [c4_name("train", i) for i in range(args.train_shards)]
        names += [c4_name("validation", i) for i in range(args.val_shards)]
        inputs = [(base + name, True) for name in names]
    # local data without a validation file: the tail of the last file is held out for validation
    carve = args.local and not any(split_of(path) == "validation" for path, _ in inputs)
    for n, (source, remote) in enumerate(inputs):
        dest = os.path.join(args.data_dir, bin_name(source))
        if os.path.exists(dest):
            print(f"  {os.path.basename(dest)}: done already, skipped")
            continue
        path = os.path.join(args.data_dir, os.path.basename(source)) if remote else source
        if remote and not os.path.exists(path):
            download(source, path, os.environ.get("HF_TOKEN"))
        tokens = tokenize_file(path, encoder, downloaded=remote)
        if carve and n == len(inputs) - 1:
            cut = len(tokens) - max(1, int(len(tokens) * args.val_fraction))
            if cut < 1:
                sys.exit(f"prepare_data: {source} is too small to hold out validation tokens; add a validation file")
            record_settings(args.data_dir, settings)
            write_bin(dest[:-4] + ".validation.bin", tokens[cut:])  # first: the train .bin marks the pair done
            print(f"  no validation file given: the last {len(tokens) - cut} tokens go to validation")
            tokens = tokens[:cut]
        record_settings(args.data_dir, settings)
        write_bin(dest, tokens)
        if remote and not args.keep_downloads:
            os.remove(path)
    for split in ("train", "validation"):
        shards = [s for s in sorted(glob.glob(os.path.join(args.data_dir, "*.bin"))) if split_of(s) == split]
        counts = [(len(t), int(np.count_nonzero(t == BOS))) for t in map(read_bin, shards)]
        print(f"{split}: {len(shards)} shard(s), {sum(d for _, d in counts)} documents, "
              f"{sum(n for n, _ in counts) / 1e6:.2f}M tokens in {args.data_dir}")

if __name__ == "__main__":
    main()
