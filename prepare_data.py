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

import glob
import gzip
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
import zlib

import numpy as np

from common import (BOS, ArgumentParser, checked, given_flags, gpt2_encoder, make_dir, read_bin, split_of, write_bin,
                    write_json)

C4_REVISION = "1ddc917116b730e1859edef32896ec5c16be51d0"  # a fixed commit of allenai/c4, so the data never moves
C4_SHARDS = {"train": 1024, "validation": 8}
SETTINGS_FILE = "prepare.json"  # in data_dir: how its shards were made, so a re-run never mixes two settings


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
        for number, line in enumerate(f, 1):
            if line.strip():
                document = json.loads(line)
                if not isinstance(document, dict) or not isinstance(document.get("text"), str):
                    raise ValueError(f"line {number} is not a JSON object with a string field 'text'")
                yield document["text"]


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
    except (EOFError, OSError, zlib.error, ValueError) as e:  # ValueError: JSON, UTF-8, or read_documents' own
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
        try:
            with open(path) as f:
                saved = json.load(f)
        except ValueError:  # not JSON, not UTF-8
            saved = "damaged"
    if shards and not args.overwrite and not isinstance(saved, (dict, type(None))):
        parser.error(f"--data_dir {args.data_dir}: its {SETTINGS_FILE} is damaged, so what made its shards is unknown. "
                     f"Use another --data_dir, or --overwrite to delete its .bin files and prepare anew")
    if shards and saved != settings and not args.overwrite:
        was = "settings it does not record (no prepare.json)" if saved is None else \
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


def get_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", default="data/c4", help="where the .bin files go")
    p.add_argument("--train_shards", type=checked(int, lambda v: 0 <= v <= C4_SHARDS["train"], "must be 0..1024"),
                   default=1, help="C4 train shards to fetch (of 1024)")
    p.add_argument("--val_shards", type=checked(int, lambda v: 0 <= v <= C4_SHARDS["validation"], "must be 0..8"),
                   default=1, help="C4 validation shards to fetch (of 8)")
    p.add_argument("--base_url", default=None,
                   help="directory URL holding the C4 'en' files (http://, https:// or file://); default: the "
                        "Hugging Face hub ($HF_ENDPOINT if set) at a pinned revision")
    p.add_argument("--revision", default=C4_REVISION, help="allenai/c4 commit to download from the hub")
    p.add_argument("--local", default=None, help="tokenize these local files (a directory or a glob) instead")
    p.add_argument("--val_fraction", type=checked(float, lambda v: 0 < v < 1, "must be between 0 and 1 (the share "
                                                  "of tokens held out)"), default=0.01,
                   help="--local without a validation file: the share of tokens held out for validation")
    p.add_argument("--keep_downloads", action="store_true", help="keep the .json.gz files after tokenizing")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the .bin files of data_dir first (when it was prepared with other settings)")
    return p


DOWNLOAD_FLAGS = ("train_shards", "val_shards", "base_url", "revision", "keep_downloads")


def check_flags(parser, args, given, inputs):
    """A flag this run would not use is refused, not ignored. given: the flags on the command line."""
    if args.local:
        unused = [f"--{k}" for k in DOWNLOAD_FLAGS if k in given]
        if unused:
            parser.error(f"{', '.join(unused)}: for downloads, not --local (which tokenizes the files it names): "
                         f"drop {'it' if len(unused) == 1 else 'them'}")
        if "val_fraction" in given and any(split_of(path) == "validation" for path, _ in inputs):
            parser.error(f"--val_fraction: {args.local} has a validation file, so nothing is held out: drop it")
    elif "val_fraction" in given:
        parser.error("--val_fraction is for --local files without a validation file: C4 has validation shards")
    if "revision" in given and args.base_url:
        parser.error("--revision picks the hub's commit, --base_url a server with its own files: give one of them")


def inputs_of(args):
    """(source, remote) for each input file: local paths, or the C4 shards' URLs."""
    if args.local:
        return [(path, False) for path in local_inputs(args.local)]
    base = (args.base_url or default_base_url(args.revision)).rstrip("/") + "/"
    names = [c4_name("train", i) for i in range(args.train_shards)]
    names += [c4_name("validation", i) for i in range(args.val_shards)]
    return [(base + name, True) for name in names]


def prepare(args, settings, encoder, source, remote, hold_out):
    """One input file -> its .bin (fetched first if remote); hold_out: also carve the validation tokens off its end."""
    dest = os.path.join(args.data_dir, bin_name(source))
    if os.path.exists(dest):
        print(f"  {os.path.basename(dest)}: done already, skipped")
        return
    path = os.path.join(args.data_dir, os.path.basename(source)) if remote else source
    if remote and not os.path.exists(path):
        download(source, path, os.environ.get("HF_TOKEN"))
    tokens = tokenize_file(path, encoder, downloaded=remote)
    record_settings(args.data_dir, settings)
    if hold_out:
        cut = len(tokens) - max(1, int(len(tokens) * args.val_fraction))
        if cut < 1:
            sys.exit(f"prepare_data: {source} is too small to hold out validation tokens; add a validation file")
        write_bin(dest[:-4] + ".validation.bin", tokens[cut:])  # first: the train .bin marks the pair done
        print(f"  no validation file given: the last {len(tokens) - cut} tokens go to validation")
        tokens = tokens[:cut]
    write_bin(dest, tokens)
    if remote and not args.keep_downloads:
        os.remove(path)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir} is a file: give a directory")
    inputs = inputs_of(args)
    check_flags(parser, args, given_flags(parser, argv), inputs)
    settings = {"encoding": "gpt2", "bos": BOS}
    settings |= {"local": os.path.abspath(args.local), "val_fraction": args.val_fraction} if args.local else \
        {"c4_revision": args.revision}  # any mirror (--base_url, HF_ENDPOINT) serves the same files
    check_settings(parser, args, settings)
    encoder = gpt2_encoder()
    # local data without a validation file: the tail of the last file is held out for validation
    carve = args.local and not any(split_of(path) == "validation" for path, _ in inputs)
    for n, (source, remote) in enumerate(inputs):
        prepare(args, settings, encoder, source, remote, hold_out=carve and n == len(inputs) - 1)
    for split in ("train", "validation"):
        shards = [s for s in sorted(glob.glob(os.path.join(args.data_dir, "*.bin"))) if split_of(s) == split]
        counts = [(len(t), int(np.count_nonzero(t == BOS))) for t in map(read_bin, shards)]
        print(f"{split}: {len(shards)} shard(s), {sum(d for _, d in counts)} documents, "
              f"{sum(n for n, _ in counts) / 1e6:.2f}M tokens in {args.data_dir}")


if __name__ == "__main__":
    main()
