"""Tests of the pipeline: prepare_data.py, train.py, sample.py, experiments.py. The C4-format inputs are generated
here (small .json.gz files of random words), so the tests need nothing beside the repository but GPT-2's BPE files
(tiktoken's cache: TIKTOKEN_CACHE_DIR on a machine without internet).

Run: python -m pytest -q          (the slow end-to-end ones: python -m pytest -m slow)
"""

import argparse
import contextlib
import gzip
import importlib
import json
import math
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import common
import experiments
import kernels
import prepare_data
import sample
import train
from selective_gpt import GPT, GPTConfig, pruned_visibility, selective_mask

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["selective", "attention", "caf\u00e9", "\u2014", "mask", "F", "BOS", "1024", "\n\n", "\u4e2d\u6587", "the",
         "of", "a", "key", "query", "token", "is", "masked", "by", "later", "ones"]


def random_texts(n, words_per_text, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (words_per_text,), generator=g).tolist())
            for _ in range(n)]


def write_c4_shard(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:00:00Z", "url": "https://example.com"}) + "\n")


def make_c4_files(root, train_shards=2, docs=40, words=300):
    """A C4-format 'en' folder: train shards and one validation shard of generated text."""
    os.makedirs(root, exist_ok=True)
    for i in range(train_shards):
        write_c4_shard(os.path.join(root, prepare_data.c4_name("train", i)), random_texts(docs, words, seed=i))
    write_c4_shard(os.path.join(root, prepare_data.c4_name("validation", 0)), random_texts(docs // 4, words, 99))
    return root


@pytest.fixture(scope="module")
def c4_data(tmp_path_factory):
    """Token shards of generated C4-format files (prepare_data.py --local)."""
    root = tmp_path_factory.mktemp("c4")
    prepare_data.main(["--local", make_c4_files(str(root / "en")), "--data_dir", str(root / "data")])
    return str(root / "data")


@contextlib.contextmanager
def shard_server(root, drop_after=None, ranges=True):
    """A loopback HTTP server of the files in root, with Range support (ranges=False: ignored, as some servers do,
    each answer the whole file). drop_after: {name: bytes}: the first request for that file sends this many bytes,
    then closes the connection."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = os.path.basename(self.path)
            requests.append((name, self.headers.get("Range")))
            path = os.path.join(root, name)
            if not os.path.exists(path):
                self.send_error(404)
                return
            with open(path, "rb") as f:
                data = f.read()
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") and ranges else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            cut = (drop_after or {}).pop(name, None)
            self.wfile.write(data[start:] if cut is None else data[start:start + cut])
            if cut is not None:
                self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


def documents_of(*bin_paths):
    """The documents of token shards read one after the other (a train shard and the validation held out of it)."""
    enc = common.gpt2_encoder()
    tokens = [t for path in bin_paths for t in common.read_bin(path).tolist()]
    assert tokens[0] == common.BOS
    docs, current = [], []
    for t in tokens[1:] + [common.BOS]:
        if t == common.BOS:
            docs.append(enc.decode(current))
            current = []
        else:
            current.append(t)
    return docs


# ---------------------------------------------------------------------------------------------------------------
# prepare_data.py

@pytest.mark.parametrize("ranges", [True, False])
def test_prepare_data_resumes_a_dropped_download_and_decodes_back(tmp_path, ranges):
    served = tmp_path / "served"
    served.mkdir()
    texts = random_texts(60, 200, seed=0)
    train_gz = prepare_data.c4_name("train", 0)
    write_c4_shard(served / train_gz, texts)
    want = random_texts(10, 50, seed=1)
    write_c4_shard(served / prepare_data.c4_name("validation", 0), want)
    half = os.path.getsize(served / train_gz) // 2
    data = tmp_path / "data"
    with shard_server(served, drop_after={train_gz: half}, ranges=ranges) as (url, requests):
        prepare_data.main(["--base_url", url, "--data_dir", str(data)])
        assert (train_gz, f"bytes={half}-") in requests, "the second request asks for the rest (without Range: all)"
        assert documents_of(data / "c4-train.00000-of-01024.bin") == texts
        assert documents_of(data / "c4-validation.00000-of-00008.bin") == want
        assert sorted(os.listdir(data)) == ["c4-train.00000-of-01024.bin", "c4-validation.00000-of-00008.bin",
                                            prepare_data.SETTINGS_FILE]
        before = {p: os.path.getmtime(data / p) for p in os.listdir(data) if p.endswith(".bin")}
        count = len(requests)
        prepare_data.main(["--base_url", url, "--data_dir", str(data)])
        assert len(requests) == count and before == {p: os.path.getmtime(data / p) for p in before}


def test_prepare_data_tokenises_a_download_already_in_data_dir_without_fetching_it(tmp_path):
    served, data = tmp_path / "served", tmp_path / "data"
    served.mkdir()
    data.mkdir()
    texts = random_texts(5, 30, seed=2)
    write_c4_shard(data / prepare_data.c4_name("train", 0), texts)  # fetched by a run stopped before tokenising
    with shard_server(served) as (url, requests):
        prepare_data.main(["--base_url", url, "--data_dir", str(data), "--val_shards", "0"])
    assert requests == [] and documents_of(data / "c4-train.00000-of-01024.bin") == texts


def test_prepare_data_stops_on_a_corrupt_shard_and_writes_nothing(tmp_path, capsys):
    served = tmp_path / "served"
    served.mkdir()
    good = tmp_path / "good.json.gz"
    write_c4_shard(good, [f"text number {i} " * 50 for i in range(400)])
    blob = good.read_bytes()
    (served / prepare_data.c4_name("train", 0)).write_bytes(blob[: len(blob) // 2])  # a truncated gzip
    data = tmp_path / "data"
    with shard_server(served) as (url, _):
        with pytest.raises(SystemExit, match="c4-train.00000-of-01024.json.gz is truncated or corrupt.*fetched anew"):
            prepare_data.main(["--base_url", url, "--data_dir", str(data), "--val_shards", "0"])
    assert not [p for p in os.listdir(data) if p.endswith((".bin", ".tmp"))]


def test_token_shards_have_llm_c_layout(tmp_path):
    """A header of 256 int32 (magic 20240520, version 1, token count), then the tokens as uint16."""
    path = str(tmp_path / "c4-train.bin")
    common.write_bin(path, [1, 2, 50256])
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[:3].tolist() == [20240520, 1, 3] and not header[3:].any() and os.path.getsize(path) == 1024 + 6
    assert np.fromfile(path, dtype=np.uint16, offset=1024).tolist() == [1, 2, 50256]


def test_prepare_data_reads_local_json_lines_and_points_at_a_mirror(tmp_path, monkeypatch):
    texts = random_texts(4, 30, seed=5)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in texts))
    prepare_data.main(["--local", str(tmp_path / "docs.jsonl"), "--data_dir", str(tmp_path / "d")])
    assert documents_of(tmp_path / "d" / "docs.bin", tmp_path / "d" / "docs.validation.bin") == texts
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert prepare_data.default_base_url("abc") == "https://mirror.example/datasets/allenai/c4/resolve/abc/en/"


def test_prepare_data_local_txt_holds_out_validation(tmp_path):
    (tmp_path / "notes.txt").write_text("one two three four five six seven eight nine ten " * 40)
    data = tmp_path / "data"
    prepare_data.main(["--local", str(tmp_path / "*.txt"), "--data_dir", str(data), "--val_fraction", "0.1"])
    train_tokens, val_tokens = common.read_bin(data / "notes.bin"), common.read_bin(
        data / "notes.validation.bin")
    assert len(val_tokens) == int((len(train_tokens) + len(val_tokens)) * 0.1) and train_tokens[0] == common.BOS
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "hello.txt").write_text("hello world")  # BOS hello world: 3 x 0.01 tokens; one held out
    prepare_data.main(["--local", str(tmp_path / "tiny"), "--data_dir", str(tmp_path / "d2"), "--val_fraction", "0.01"])
    assert [len(common.read_bin(tmp_path / "d2" / n)) for n in ("hello.bin", "hello.validation.bin")] == [2, 1]


def test_prepare_data_overwrite_prepares_anew_with_new_settings(tmp_path):
    (tmp_path / "notes.txt").write_text("one two three four five six seven eight nine ten " * 40)
    data = tmp_path / "data"
    prepare_data.main(["--local", str(tmp_path / "notes.txt"), "--data_dir", str(data), "--val_fraction", "0.1"])
    (data / "prepare.json").unlink()  # shards whose settings are not recorded go too
    common.write_bin(str(data / "stray.bin"), [1, 2])
    prepare_data.main(["--local", str(tmp_path / "notes.txt"), "--data_dir", str(data), "--val_fraction", "0.3",
                       "--overwrite"])
    train_tokens, val_tokens = (common.read_bin(data / n) for n in ("notes.bin", "notes.validation.bin"))
    assert len(val_tokens) == int((len(train_tokens) + len(val_tokens)) * 0.3) == 120  # of 402: 120.6, floored
    assert not (data / "stray.bin").exists()


# ---------------------------------------------------------------------------------------------------------------
# train.py

def run_script(*args, timeout=600, cwd=HERE, env=None):
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=env)
    return out.returncode, out.stdout + out.stderr


def run_main(script, *args, cwd=HERE, timeout=120):
    """`python script args` as a forked copy of this process runs it: the script's main, with its exit code, output
    and any traceback, as the command line gives them, but without importing torch again (2 s a process). Where
    there is no fork (or it is unsafe: macOS), a real subprocess."""
    if not sys.platform.startswith("linux"):
        return run_script(os.path.join(HERE, script), *args, cwd=cwd, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=HERE))
    with tempfile.NamedTemporaryFile("r") as out:
        def child():
            os.chdir(cwd)
            os.environ.update(experiments.KEEP_FREED_MEMORY)  # else experiments.py starts itself again with them
            sys.stdout = sys.stderr = open(out.name, "w", buffering=1)
            os.dup2(sys.stdout.fileno(), 1)
            os.dup2(sys.stdout.fileno(), 2)
            sys.argv = [script, *args]
            torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork: one thread, no pool
            importlib.import_module(script.removesuffix(".py")).main(list(args))

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            pytest.fail(f"{script} {' '.join(args)}: no exit within {timeout} s")
        return proc.exitcode, out.read()


def log_records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "24", "--batch_size", "4",
        "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "2", "--dtype", "float32"]


@pytest.fixture(scope="module")
def assign_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("assign") / "run")
    code, text = run_script("train.py", "--dataset", "assign", "--selective", *TINY, "--max_iters", "30",
                            "--eval_interval", "15", "--learning_rate", "3e-3", "--out_dir", out)
    assert code == 0, text
    return out


def test_train_assign_end_to_end(assign_run):
    records = log_records(assign_run)
    header = records[0]
    assert header["config"]["selective"] and (header["git_commit"] is None or len(header["git_commit"]) == 40)
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 15, 30] and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert all(0 <= r["val_accuracy"] <= 1 for r in evals)
    steps = [r for r in records if "loss" in r and "val_loss" not in r]
    assert len(steps) == 30 and {"lr", "ms_per_iter", "tokens_per_s", "mfu"} <= steps[0].keys()
    assert os.path.exists(os.path.join(assign_run, "ckpt.pt")) and os.path.exists(
        os.path.join(assign_run, "ckpt_best.pt"))


def test_the_logged_attention_path_is_the_one_that_runs(assign_run, tmp_path):
    """With the memory loss on, every layer keeps F, and an ablation of the rule has no tiled kernel: the mask path
    runs, and the log says so (else what 'auto' picks: tiled here); with dropout, training takes mask, evaluations
    (no dropout) tiled."""
    header = log_records(assign_run)[0]
    assert (header["attention_path"], header["evaluation_path"]) == ("tiled", "tiled")
    for name, flags, paths, said in (("memory_loss", ["--memory_loss_weight", "0.1"], ("mask", "mask"), "mask\n"),
                                     ("ablation", ["--mask_self"], ("mask", "mask"), "mask\n"),
                                     ("dropout", ["--dropout", "0.1"], ("mask", "tiled"), "mask (evaluations: tiled)")):
        out = str(tmp_path / name)
        code, text = run_main("train.py", "--dataset", "assign", "--selective", *TINY, "--max_iters", "1", *flags,
                              "--out_dir", out)
        assert code == 0, text
        header = log_records(out)[0]
        assert (header["attention_path"], header["evaluation_path"]) == paths and f"path: {said}" in text, name


def test_train_c4_end_to_end(tmp_path, c4_data):
    code, text = run_script("train.py", "--dataset", "c4", "--data_dir", c4_data, "--selective", *TINY,
                            "--max_iters", "4", "--eval_interval", "2", "--log_interval", "2",
                            "--out_dir", str(tmp_path / "out"))
    assert code == 0, text
    assert "iter 4/4 (100%): loss" in text and "eta 0:00" in text  # progress a person can read
    evals = [r for r in log_records(tmp_path / "out") if "val_loss" in r]
    assert len(evals) == 3 and all(math.isfinite(r["val_loss"]) for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_c4_windows_start_with_bos():
    shard = torch.arange(1000, dtype=torch.int64).numpy().astype("uint16")
    x, y = common.c4_batch([shard], 8, 16, torch.Generator().manual_seed(0))
    assert (x[:, 0] == common.BOS).all() and torch.equal(x[:, 1:], y[:, :-1])
    assert (y[:, 1:] - y[:, :-1] == 1).all()


def test_each_batch_is_a_function_of_where_it_is_used():
    """Every micro-step, every evaluation batch, each split draws its own batch; the same place, the same batch."""
    shard = torch.arange(5000, dtype=torch.int64).numpy().astype("uint16")
    shards = {"train": [shard], "validation": [shard]}
    for dataset in ("assign", "c4"):
        run = {"dataset": dataset, "data_seed": 3, "batch_size": 4, "block_size": 32}
        places = [("train", 0, 0), ("train", 0, 1), ("train", 1, 0), ("val", -1, 0), ("val", -1, 1), ("val", 0, 0)]
        batches = [common.get_batch(run, *place, shards)[0] for place in places]
        assert all(not torch.equal(a, b) for i, a in enumerate(batches) for b in batches[i + 1:]), dataset
        assert torch.equal(common.get_batch(run, "train", 0, 1, shards)[0], batches[1])
        assert not torch.equal(common.get_batch(dict(run, data_seed=4), "train", 0, 1, shards)[0], batches[1])


def test_c4_windows_are_every_whole_window_of_a_shard_and_no_other():
    shard = torch.arange(20, dtype=torch.int64).numpy().astype("uint16")
    x, y = common.c4_batch([shard, shard[:10]], 400, 16, torch.Generator().manual_seed(0))  # the short one has none
    assert y.shape == (400, 16) and set(y[:, 0].tolist()) == {0, 1, 2, 3, 4}  # the last window starts at 20 - 16


def test_read_bin_refuses_another_format_version(tmp_path):
    path = str(tmp_path / "c4-train-00000.bin")
    common.write_bin(path, [1, 2, 3])
    assert common.read_bin(path).tolist() == [1, 2, 3]
    header = np.memmap(path, dtype=np.int32, mode="r+", shape=(2,))  # magic, version: the tokens stay as they are
    header[1] = common.VERSION + 1
    header.flush()
    with pytest.raises(ValueError, match="bad header"):
        common.read_bin(path)


class NotAWeight:  # what a checkpoint from elsewhere might hold: loading it would run code (weights_only refuses)
    pass


def test_a_checkpoint_loads_only_whole_with_weights_and_fitting_its_model(assign_run, tmp_path):
    ckpt = common.load_checkpoint(os.path.join(assign_run, "ckpt.pt"))
    compiled = dict(ckpt, model={"_orig_mod." + k: v for k, v in ckpt["model"].items()})  # torch.compile's names
    torch.save(compiled, tmp_path / "compiled.pt")
    assert common.load_checkpoint(str(tmp_path / "compiled.pt"))["iter_num"] == ckpt["iter_num"]
    assert common.strip_compile_prefix({"_orig_mod.a._orig_mod.b": 1, "c": 2}) == {"a._orig_mod.b": 1, "c": 2}
    broken = {"no_optimizer": {k: v for k, v in ckpt.items() if k != "optimizer"},
              "other_model": dict(ckpt, model_args=dict(ckpt["model_args"], n_layer=3)),
              "pickled_object": dict(ckpt, extra=NotAWeight())}
    for name, bad in broken.items():
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(common.CheckpointError, match=f"{name}.pt is damaged or not a train.py checkpoint"):
            common.load_checkpoint(str(tmp_path / f"{name}.pt"))


def test_assign_task_answers_are_latest_values():
    x, y = common.assign_batch(16, 200, torch.Generator().manual_seed(0))
    assert (x[:, 0] == 0).all()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        latest = {}
        for t, (tok, target) in enumerate(zip(row_x, row_y)):
            word = common.ASSIGN_TOKENS[tok]
            if "=" in word:
                latest[word[0]] = word[2]
            if word.endswith("?"):
                assert common.ASSIGN_TOKENS[target] == latest[word[0]]
            else:
                assert target == -1


def step_losses(out):
    return [(r["iter"], r["loss"]) for r in log_records(out) if "loss" in r and "val_loss" not in r]


def test_resume_continues_exactly_with_one_record_per_iteration(tmp_path):
    common = ["--dataset", "assign", "--selective", *TINY, "--dropout", "0.1", "--eval_interval", "3",
              "--lr_decay_iters", "6"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    assert run_script("train.py", *common, "--max_iters", "6", "--out_dir", whole)[0] == 0
    assert run_script("train.py", *common, "--max_iters", "3", "--out_dir", part)[0] == 0  # checkpoint at 3
    with open(os.path.join(part, "log.jsonl"), "a") as f:  # a run that died after logging past its checkpoint
        f.write(json.dumps({"iter": 4, "loss": 99.0}) + "\n" + json.dumps({"iter": 5, "val_loss": 99.0}) + "\n")
    code, text = run_script("train.py", "--resume", "--max_iters", "6", "--out_dir", part)
    assert code == 0, text
    assert step_losses(part) == step_losses(whole) and len(step_losses(whole)) == 6  # iteration 4 once, redone
    evals = [r["iter"] for r in log_records(part) if "val_loss" in r]
    assert evals == [0, 3, 6] and [r["resumed_at"] for r in log_records(part) if "resumed_at" in r] == [3]
    code, text = run_script("train.py", "--resume", "--n_head", "4", "--out_dir", part)
    assert code != 0 and "different model" in text and "n_head" in text


def test_a_cuda_run_on_the_triton_kernel_is_told_it_is_not_yet_run_on_a_gpu(tmp_path, capsys):
    """The note comes where training or evaluations take the tiled path on CUDA, and nowhere else."""
    args, _ = train.parse_args(["--dataset", "assign", "--selective", *TINY, "--out_dir", str(tmp_path)])
    raw = GPT(GPTConfig(**train.model_args(args)))
    for device, paths, told in [("cuda", ("tiled", "tiled"), True), ("cuda", ("mask", "tiled"), True),
                                ("cuda", ("mask", "mask"), False), ("cpu", ("tiled", "tiled"), False)]:
        train.start_run(args, None, raw, device, 1, "float32", paths, 1e12)
        assert ("not yet run on a GPU" in capsys.readouterr().out) == told, (device, paths)


def test_resume_keeps_float16s_loss_scale(assign_run, tmp_path):
    """A float16 run (CUDA) scales its loss by a factor that adapts as it trains: a resume goes on with it."""
    args, _ = train.parse_args(["--dataset", "assign", "--selective", *TINY, "--out_dir", str(tmp_path)])
    ckpt = common.load_checkpoint(os.path.join(assign_run, "ckpt.pt"))
    _, raw, optimizer, _ = train.build(args, ckpt, "cpu", "float32", False, 0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    train.save_checkpoint(args, raw, optimizer, scaler, 30, 1.0, ckpt["rng"], improved=False)
    _, _, _, resumed = train.build(args, common.load_checkpoint(str(tmp_path / "ckpt.pt")), "cpu", "float16", False, 0)
    assert resumed.state_dict() == scaler.state_dict() and resumed.get_scale() == 1024.0


def tiny_training(tmp_path, *flags):
    """train.py's args, model, raw model, optimizer and scaler for a tiny assign run in tmp_path, on the CPU."""
    args, _ = train.parse_args(["--dataset", "assign", *TINY, *flags, "--out_dir", str(tmp_path)])
    return args, *train.build(args, None, "cpu", "float32", False, 0)


def watch_updates(optimizer, watch):
    """Call watch() just before each optimizer step: it sees the gradients the update is made from."""
    step = optimizer.step
    optimizer.step = lambda *args, **kwargs: watch() or step(*args, **kwargs)


def test_the_optimizer_sees_the_gradient_clipped_to_grad_clip(tmp_path):
    args, model, raw, optimizer, scaler = tiny_training(tmp_path, "--selective")
    seen = []
    watch_updates(optimizer, lambda: seen.append(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in raw.parameters()])).item()))
    for clip in (1e-3, 0.0):  # 0: off
        args.grad_clip = clip
        train.train_step(args, model, optimizer, scaler, contextlib.nullcontext(), None, 0, 0, 1, "cpu")
    assert seen[0] == pytest.approx(1e-3, rel=1e-4) and seen[1] > 0.1


def test_an_iteration_averages_the_gradients_of_its_micro_steps(tmp_path):
    """--grad_accum 3: the update is made from the mean of the micro-batches' gradients (each batch as get_batch
    draws it), and the loss returned is the last micro-batch's."""
    args, model, raw, optimizer, scaler = tiny_training(tmp_path, "--grad_accum", "3", "--grad_clip", "0")
    losses, grads = [], []
    for micro in range(3):
        x, y = common.get_batch(vars(args), "train", 5, micro)
        loss = raw(x, targets=y)[1]
        grads.append(torch.autograd.grad(loss, list(raw.parameters())))
        losses.append(loss.item())
    seen = []
    watch_updates(optimizer, lambda: seen.append([p.grad.clone() for p in raw.parameters()]))
    last = train.train_step(args, model, optimizer, scaler, contextlib.nullcontext(), None, 5, 0, 1, "cpu")
    assert last == pytest.approx(losses[-1], rel=1e-5)
    for p_grad, *micro_grads in zip(seen[0], *grads):
        torch.testing.assert_close(p_grad, sum(micro_grads) / 3, rtol=1e-4, atol=1e-7)


def test_the_schedule_warms_up_then_decays_by_a_cosine_to_min_lr():
    """nanoGPT's schedule, by hand: lr (it + 1) / (warmup + 1) while warming up, then a half cosine from lr at
    warmup_iters to min_lr at decay_iters, then min_lr."""
    args = train.argparse.Namespace(warmup_iters=4, learning_rate=1e-3, min_lr=1e-4, lr_decay_iters=None,
                                    max_iters=24)
    lrs = [train.get_lr(it, args) for it in range(30)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert lrs[14] == pytest.approx(5.5e-4) and lrs[24] == pytest.approx(1e-4) and lrs[29] == 1e-4
    assert lrs[9] == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    args.lr_decay_iters = 14
    assert train.get_lr(9, args) == pytest.approx(5.5e-4) and train.get_lr(20, args) == 1e-4


def test_a_checkpoint_save_cut_short_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    """A save that fails half-way (torch.save on a full disk) keeps the previous ckpt.pt, loadable, and leaves no
    partial file behind (a kill leaves at most a .tmp, which no run reads)."""
    args, _, raw, optimizer, scaler = tiny_training(tmp_path)
    train.save_checkpoint(args, raw, optimizer, scaler, 3, 1.0, {}, improved=True)
    saved = common.load_checkpoint(str(tmp_path / "ckpt.pt"))

    def torn_save(state, path):
        with open(path, "wb") as f:
            f.write(b"PK half a checkpoint")
        raise OSError("no space left on device")
    monkeypatch.setattr(train.torch, "save", torn_save)
    with pytest.raises(OSError):
        train.save_checkpoint(args, raw, optimizer, scaler, 6, 0.5, {}, improved=True)
    assert common.load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == saved["iter_num"] == 3
    assert common.load_checkpoint(str(tmp_path / "ckpt_best.pt"))["iter_num"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt_best.pt"]


def test_resume_survives_a_log_line_torn_by_a_kill(tmp_path):
    """A run killed while appending to log.jsonl leaves half a line: --resume drops it and carries on exactly."""
    flags = ["--dataset", "assign", *TINY, "--eval_interval", "2", "--lr_decay_iters", "4"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    assert run_script("train.py", *flags, "--max_iters", "4", "--out_dir", whole)[0] == 0
    assert run_script("train.py", *flags, "--max_iters", "2", "--out_dir", part)[0] == 0
    with open(os.path.join(part, "log.jsonl"), "a") as f:
        f.write('{"iter": 3, "loss": 2.71')  # no closing brace, no newline
    code, text = run_script("train.py", "--resume", "--max_iters", "4", "--out_dir", part)
    assert code == 0 and "Traceback" not in text, text
    assert step_losses(part) == step_losses(whole) and len(step_losses(part)) == 4


def test_resume_with_a_damaged_log_says_what_to_do_and_one_moved_aside_starts_anew(tmp_path):
    flags = ["--dataset", "assign", *TINY, "--eval_interval", "2", "--lr_decay_iters", "4"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    assert run_main("train.py", *flags, "--max_iters", "4", "--out_dir", whole)[0] == 0
    assert run_main("train.py", *flags, "--max_iters", "2", "--out_dir", part)[0] == 0
    log = pathlib.Path(part, "log.jsonl")
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "xx" + "".join(lines[1:]))  # damage before the end: not a torn append
    code, text = run_main("train.py", "--resume", "--max_iters", "4", "--out_dir", part)
    assert code == 2 and "log.jsonl: line 2 is not JSON" in text and "mend that line" in text, text
    assert "Traceback" not in text and log.read_text().startswith(lines[0] + "xx"), "the log left as it was"
    log.rename(log.with_suffix(".aside"))
    assert run_main("train.py", "--resume", "--max_iters", "4", "--out_dir", part)[0] == 0
    records = log_records(part)
    assert records[0]["config"]["max_iters"] == 4 and records[1]["resumed_at"] == 2, "a new log, with its header"
    assert step_losses(part) == step_losses(whole)[2:]
    log.write_text("".join(log.read_text().splitlines(keepends=True)[1:]))  # a log without its header ...
    assert run_main("train.py", "--resume", "--max_iters", "6", "--out_dir", part)[0] == 0
    records = log_records(part)  # ... gets one, and keeps its records
    assert records[0]["config"]["max_iters"] == 6 and [r["resumed_at"] for r in records if "resumed_at" in r] == [2, 4]


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert common.read_jsonl(str(path)) == [{"a": 1}, {"b": 2}]
    path.write_text('{"a": 1}\n{"b": \n{"c": 3}\n')  # damage before the end is not a torn append: refused
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        common.read_jsonl(str(path))
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n{"c": 3}\n')  # so is a line that is not UTF-8
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        common.read_jsonl(str(path))


def test_resume_to_a_reached_target_stops_and_a_larger_one_extends_the_schedule(tmp_path):
    out = str(tmp_path / "o")
    assert run_script("train.py", "--dataset", "assign", *TINY, "--max_iters", "6", "--eval_interval", "3",
                      "--out_dir", out)[0] == 0
    before = log_records(out)
    code, text = run_script("train.py", "--resume", "--max_iters", "4", "--out_dir", out, timeout=60)
    assert code == 0 and "nothing to train" in text and log_records(out) == before
    code, text = run_script("train.py", "--resume", "--max_iters", "12", "--out_dir", out)
    assert code == 0 and "reaches min_lr 1.00e-04 at iteration 12 (was 6)" in text, text
    lrs = {r["iter"]: r["lr"] for r in log_records(out) if "lr" in r}
    args = train.argparse.Namespace(warmup_iters=2, learning_rate=1e-3, min_lr=1e-4, lr_decay_iters=None,
                                    max_iters=12)
    assert all(lrs[it] == pytest.approx(train.get_lr(it - 1, args)) for it in range(7, 13))
    assert lrs[7] > 1e-4 * 1.5  # not stuck at min_lr after the old schedule's end


def valid(action, text):
    """text as the flag reads it, or None where the flag refuses it."""
    try:
        return action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return None


def test_resume_refuses_another_value_for_every_setting_outside_may_change_on_resume(assign_run, capsys):
    """--resume continues exactly: every flag outside MAY_CHANGE_ON_RESUME, given a value other than the run's, is
    refused by name; those inside are taken."""
    saved = common.load_checkpoint(os.path.join(assign_run, "ckpt.pt"))["args"]
    tried = []
    for action in train.get_parser()._actions:
        name, was = action.dest, saved.get(action.dest)
        if name in ("help", "resume", "overwrite", *train.MAY_CHANGE_ON_RESUME):
            continue
        if action.choices:
            flag = [action.option_strings[0], next(str(c) for c in action.choices if c != was)]
        elif isinstance(action, argparse.BooleanOptionalAction):
            flag = [f"--no-{name}" if was else f"--{name}"]
        elif action.nargs == 0:  # a switch that is on stays on: not given is not another value
            if was:
                continue
            flag = [action.option_strings[0]]
        else:
            other = next((v for v in ("3", "0.5", "7") if valid(action, v) not in (None, was)), None)
            if other is None:
                pytest.fail(f"no other value to try for --{name}: add one to this test")
            flag = [action.option_strings[0], other]
        try:
            train.parse_args(["--resume", "--out_dir", assign_run, *flag])
            pytest.fail(f"--resume took {' '.join(flag)}: add --{name} to MAY_CHANGE_ON_RESUME if it may change")
        except SystemExit:
            err = capsys.readouterr().err
        assert "--resume" in err and f"{action.option_strings[0]} " in err, (flag, err)
        tried.append(name)
    assert {"batch_size", "grad_accum", "warmup_iters", "grad_clip", "data_seed", "seed", "n_head"} <= set(tried)
    may_change = ["--max_iters", "40", "--lr_decay_iters", "40", "--eval_interval", "5", "--log_interval", "5",
                  "--peak_flops", "1e12", "--dtype", "float32", "--attention", "mask", "--device", "cpu"]
    args, _ = train.parse_args(["--resume", "--out_dir", assign_run, *may_change])
    assert (args.max_iters, args.eval_interval, args.attention) == (40, 5, "mask")


def test_a_resume_keeps_a_decay_length_of_its_own_and_stretches_one_that_was_max_iters(assign_run, tmp_path):
    ckpt = common.load_checkpoint(os.path.join(assign_run, "ckpt.pt"))  # max_iters 30
    for saved, resumed in ((40, 40), (30, None)):  # None: decay_iters follows the new max_iters
        (tmp_path / f"decay{saved}").mkdir()
        torch.save(dict(ckpt, args=dict(ckpt["args"], lr_decay_iters=saved)), tmp_path / f"decay{saved}" / "ckpt.pt")
        args, _ = train.parse_args(["--resume", "--max_iters", "50", "--out_dir", str(tmp_path / f"decay{saved}")])
        assert args.lr_decay_iters == resumed


def test_resume_a_checkpoint_from_before_the_attention_and_init_std_fields(tmp_path):
    """Such a run drew nanoGPT's 0.02 (SPEC §10): resumed as such, and refused as the width rule."""
    out = str(tmp_path / "o")
    assert run_script("train.py", "--dataset", "assign", "--selective", *TINY, "--max_iters", "2",
                      "--eval_interval", "2", "--init_std", "0.02", "--out_dir", out)[0] == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for key in ("args", "model_args"):
        del ckpt[key]["attention"], ckpt[key]["init_std"]  # as written before GPTConfig had them
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    code, text = run_script("train.py", "--resume", "--init_std", "width", "--max_iters", "3", "--out_dir", out)
    assert code == 2 and "--init_std 0.02 -> width" in text, text
    code, text = run_script("train.py", "--resume", "--attention", "mask", "--init_std", "0.02", "--max_iters", "3",
                            "--out_dir", out)
    assert code == 0 and "attention path: mask" in text, text
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["args"]["init_std"] == 0.02


def test_overwrite_starts_over(tmp_path):
    out = str(tmp_path / "o")
    flags = ["--dataset", "assign", *TINY, "--max_iters", "2", "--eval_interval", "2", "--out_dir", out]
    assert run_script("train.py", *flags)[0] == 0
    (tmp_path / "o" / "budgets.json").write_text("{}")
    (tmp_path / "o" / "notes.txt").write_text("mine")
    code, text = run_script("train.py", *flags, "--overwrite", "--seed", "7")
    assert code == 0, text
    records = log_records(out)
    assert records[0]["config"]["seed"] == 7 and sum("config" in r for r in records) == 1
    assert not (tmp_path / "o" / "budgets.json").exists()
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine", "--overwrite deletes the run's files, no others"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in reaches train.py by run_main's fork")
def test_ctrl_c_before_the_first_checkpoint_says_to_start_again(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", interrupted)  # run_main's fork runs this train.py module
    (tmp_path / "o").mkdir()  # the run's directory exists, its checkpoint not yet
    code, text = run_main("train.py", "--dataset", "assign", *TINY, "--out_dir", str(tmp_path / "o"))
    assert code == 130 and "Traceback" not in text and "no checkpoint was written yet" in text, text


def test_evaluate_averages_the_fixed_evaluation_batches_of_each_split(tmp_path):
    args, _, raw, _, _ = tiny_training(tmp_path, "--eval_iters", "3")
    got = train.evaluate(raw, args, None, contextlib.nullcontext(), "cpu")
    for split in ("train", "val"):
        with torch.no_grad():
            losses = [raw(*common.get_batch(vars(args), split, -1, k))[1].item() for k in range(3)]
        assert got[f"{split}_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert got["train_loss"] != got["val_loss"] and got["val_ppl"] == pytest.approx(math.exp(got["val_loss"]))
    assert raw.training, "evaluate leaves the model training"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in reaches train.py by run_main's fork")
def test_ckpt_best_holds_the_lowest_validation_loss_and_ckpt_the_latest(tmp_path, monkeypatch):
    val_losses = iter([3.0, 2.0, 2.5, 2.8])  # at iterations 0, 1, 2, 3

    def stand_in_evaluate(*args):
        v = next(val_losses)
        return {"train_loss": v, "val_loss": v, "val_ppl": math.exp(v), "val_accuracy": 0.5}
    monkeypatch.setattr(train, "evaluate", stand_in_evaluate)
    out = str(tmp_path / "o")
    code, text = run_main("train.py", "--dataset", "assign", *TINY, "--max_iters", "3", "--eval_interval", "1",
                          "--peak_flops", "1e12", "--out_dir", out)
    assert code == 0, text
    assert log_records(out)[0]["peak_flops"] == 1e12  # given, not measured
    best, last = (common.load_checkpoint(os.path.join(out, name)) for name in ("ckpt_best.pt", "ckpt.pt"))
    assert (best["iter_num"], best["best_val_loss"]) == (1, 2.0)
    assert (last["iter_num"], last["best_val_loss"]) == (3, 2.0)
    val_losses = iter([2.6])  # at iteration 4, after a resume: worse than the run's best, which resumes with it
    code, text = run_main("train.py", "--resume", "--max_iters", "4", "--out_dir", out)
    assert code == 0, text
    best, last = (common.load_checkpoint(os.path.join(out, name)) for name in ("ckpt_best.pt", "ckpt.pt"))
    assert (best["iter_num"], last["iter_num"], last["best_val_loss"]) == (1, 4, 2.0)


def test_log_progress_counts_tokens_and_flops_over_every_process(tmp_path):
    """tokens/s: every micro-step of every process; MFU: this process's share of them, against its own peak."""
    class Model:
        loss_terms = {}
        def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops, T):
            return fwdbwd_per_iter * T * 1000 / dt / peak_flops  # 1000 FLOPs per token
    args = argparse.Namespace(grad_accum=4, batch_size=3, block_size=16, max_iters=10)
    log = str(tmp_path / "log.jsonl")
    train.log_progress(args, Model(), log, time.time(), 5, 2.0, 1e-3, 0.5, 2, 1e6)
    record = common.read_jsonl(log)[0]
    assert record["tokens_per_s"] == 4 * 3 * 16 / 0.5 and record["mfu"] == pytest.approx(2 * 3 * 16 * 1000 / 0.5 / 1e6)


def test_ctrl_c_says_how_to_resume(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "train.py", "--dataset", "assign", *TINY, "--max_iters", "100000",
                             "--eval_interval", "5", "--log_interval", "100", "--out_dir", str(out)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell without job control starts background commands (a test run with `&`) with
                            # Ctrl-C ignored, and children inherit that: give train.py a terminal's Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and f"python train.py --out_dir {out} --resume" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "the last checkpoint is" in stderr


def test_experiments_tables_pair_by_seed_and_runs_keep_their_names():
    """The ablation table's paired differences and the rate check's rows are per-seed differences (computed here by
    hand); run names carry a non-switch setting as key_value, so the runs already on disk are found again."""
    sd = lambda *v: experiments.mean_sd(list(v))  # noqa: E731
    results = {"ablations": {"n_head": 4, "rows": [
        {"variant": "selective", **sd(4.8, 4.9)}, {"variant": "selective_mask", **sd(4.81, 4.88)},
        {"variant": "mask_bos", **sd(4.85, 4.92)}]},
        "heads": {"init_std": "width", "dtype": "float32", "learning_rate": 0.002,
                  "lr_sweep": {"n_head": 4, "seed": 1, "val_loss": {"0.002": 5.0}},
                  "rows": [], "rate_check": {"n_head": 4, "seed": 1, "val_loss": {"0.002": 5.0, "0.004": 4.9},
                                             "best": 0.004, "standard": sd(4.9, 4.8), "selective": sd(4.7, 4.7),
                                             "gap": sd(0.2, 0.1), "gap_chosen_selective": sd(0.1, -0.1)}}}
    text = experiments.tables(results)
    # mask_bos - selective: +0.05, +0.02 -> 0.035 +- 0.021; mask_bos - selective on the mask path: +0.04, +0.04
    assert "| 4.885 +- 0.049 | 4.850, 4.920 | 0.035 +- 0.021 | 0.040 +- 0.000 |" in text
    assert "| both at 0.004 | 4.850 +- 0.071 | 4.700 +- 0.000 | 0.150 +- 0.071 | +0.200, +0.100 |" in text
    assert "Rate check (standard, 4 heads, seed 1): 0.002: 5.000, 0.004: 4.900; best 0.004" in text
    assert "Initialisation: the width rule (SPEC §10); float32." in text
    cfg = experiments.FULL["heads"]
    assert experiments.c4_run(cfg, "d", 4, 1, True, 0.002, attention="mask")[0] == \
        "heads-sel-attention_mask-h4-s1-lr0.002"
    assert experiments.c4_run(cfg, "d", 4, 2, True, 0.002, mask_bos=True)[0] == "heads-sel-mask_bos-h4-s2-lr0.002"
    name, flags, _ = experiments.c4_run(experiments.FULL["heads_width"], "d", 4, 1, False, 0.002)
    assert name == "heads-std-h4-s1-lr0.002-width-float32", "the width rule's runs are not the 0.02 runs"
    assert flags[flags.index("--init_std") + 1] == "width" and flags[flags.index("--dtype") + 1] == "float32"
    flags = experiments.c4_run(cfg, "d", 4, 1, False, 0.002)[1]
    assert flags[flags.index("--init_std") + 1] == "0.02", "the 0.02 runs say so (SPEC §10)"


def test_a_resumed_runs_time_is_the_sum_of_its_pieces_and_its_kept_log_says_where_it_resumed(tmp_path):
    log = [{"config": {}}, {"iter": 0, "val_loss": 9.0, "elapsed_s": 40.0}, {"iter": 1, "loss": 8.0, "elapsed_s": 50.0},
           {"iter": 250, "val_loss": 5.0, "elapsed_s": 450.0}, {"resumed_at": 250},
           {"iter": 500, "val_loss": 4.0, "elapsed_s": 700.0}]  # more than 450 s after the resume: no drop to see
    assert experiments.run_seconds(log) == 450.0 + 700.0
    experiments.keep_log(log, "run", str(tmp_path))
    kept = common.read_jsonl(str(tmp_path / "logs" / "run.jsonl"))
    assert kept == [r for r in log if "loss" not in r] and experiments.run_seconds(kept) == 1150.0
    without = [r for r in log if "resumed_at" not in r]
    without[-1] = dict(without[-1], elapsed_s=300.0)  # a log kept without its resume records: split at the drop
    assert experiments.run_seconds(without) == 450.0 + 300.0 and experiments.run_seconds(log[:1]) == 0.0


def test_the_committed_tables_are_the_committed_results():
    """assets/results.md is what experiments.tables renders from assets/results.json, and docs/RESULTS.md quotes the
    heads tables of both initialisations (with their rate checks) row for row."""
    with open(os.path.join(HERE, "assets", "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(HERE, "assets", "results.md")) as f:
        assert f.read() == experiments.tables(results) + "\n"
    with open(os.path.join(HERE, "docs", "RESULTS.md")) as f:
        doc = f.read()
    for key in ("heads", "heads_width"):
        rows = [line for line in experiments.heads_tables(results[key]) if re.match(r"\| (\d+ \||both at)", line)]
        assert len(rows) == 8 and [row for row in rows if row not in doc] == [], key


def test_the_rate_check_looks_beyond_the_edge_of_the_grid_where_the_sweep_chose(tmp_path, monkeypatch):
    cfg, asked = dict(experiments.FULL["heads"], learning_rates=[5e-4, 1e-3, 2e-3], check_doublings=2), []
    monkeypatch.setattr(experiments, "train_all", lambda jobs, *args: asked.extend(name for name, _, _ in jobs) or {
        name: [{"iter": 1500, "val_loss": 6.0}] for name, _, _ in jobs})  # worse than the grid: no pairs
    for chosen, beyond in ((2e-3, ["0.004", "0.008"]), (5e-4, ["0.00025", "0.000125"]), (1e-3, [])):
        asked.clear()
        sweep = {"n_head": 4, "seed": 1, "chosen": chosen,
                 "val_loss": {f"{lr:g}": 5.0 if lr == chosen else 5.5 for lr in cfg["learning_rates"]}}
        check = experiments.rate_check(cfg, "d", str(tmp_path), str(tmp_path), sweep, {})
        assert asked == [f"heads-std-h4-s1-lr{lr}" for lr in beyond] and set(check["val_loss"]) >= set(beyond)


def test_heads_rows_pair_seeds_and_the_sweep_and_rate_check_choose_by_loss(tmp_path, monkeypatch):
    """heads_experiment on stand-in runs whose final loss is a function of their name: the sweep takes the rate of
    the lowest loss (0.002, the grid's largest); each row is standard - selective of the same seed, standard 2H -
    selective H; the rate check finds 0.004 better and compares both variants there, and standard there with
    selective at the chosen rate. The expected numbers are worked out by hand from final_loss."""
    def final_loss(name):
        kind, H, seed, lr = re.fullmatch(r"heads-(std|sel)-h(\d)-s(\d)-lr(\S+)", name).groups()
        rate = {"0.0005": 0.3, "0.001": 0.1, "0.002": 0.0, "0.004": -0.05, "0.008": 0.2}[lr]
        H, seed = int(H), int(seed)
        return rate + (5 + 0.1 * H + 0.01 * seed ** 2 if kind == "std" else 4.9 + 0.02 * H + 0.03 * seed)
    monkeypatch.setattr(experiments, "train_all", lambda jobs, *args: {
        name: [{"iter": 10, "val_loss": final_loss(name)}] for name, _, _ in jobs})
    cfg = dict(experiments.FULL["heads"], learning_rates=[5e-4, 1e-3, 2e-3], heads=[1, 2], seeds=[1, 2, 3],
               lr_sweep=dict(n_head=2, seed=1), check_doublings=2, check_seeds=[1, 2])
    result = experiments.heads_experiment(cfg, "d", str(tmp_path), str(tmp_path))
    assert result["lr_sweep"]["val_loss"] == pytest.approx({"0.0005": 5.51, "0.001": 5.31, "0.002": 5.21})
    assert result["learning_rate"] == result["lr_sweep"]["chosen"] == 2e-3
    one, two = result["rows"]
    assert one["standard"]["values"] == pytest.approx([5.11, 5.14, 5.19])
    assert one["selective"]["values"] == pytest.approx([4.95, 4.98, 5.01])
    assert one["gap"]["values"] == pytest.approx([0.16, 0.16, 0.18])
    assert one["gap_2H"]["values"] == pytest.approx([0.26, 0.26, 0.28])  # standard at H = 2: 5.21, 5.24, 5.29
    assert two["gap"]["values"] == pytest.approx([0.24, 0.24, 0.26]) and "gap_2H" not in two
    check = result["rate_check"]
    assert check["best"] == 4e-3 and check["val_loss"]["0.008"] == pytest.approx(5.41)
    assert check["standard"]["values"] == pytest.approx([5.16, 5.19])
    assert check["selective"]["values"] == pytest.approx([4.92, 4.95])
    assert check["gap"]["values"] == pytest.approx([0.24, 0.24])
    assert check["gap_chosen_selective"]["values"] == pytest.approx([0.19, 0.19])  # against 4.97, 5.00 at 0.002


def test_recipe_stages_with_another_init_run_apart_and_have_rows_of_their_own(tmp_path):
    """A recipe stage with an init (SPEC §10) or a dtype names its runs apart and runs them so; its rows are apart
    from the rows of the same recipe and say their init and dtype. The other stages' jobs have neither key, as their
    logs on disk were made (run_jobs compares a log's settings with the job's)."""
    cfg = experiments.FULL["recipe"]
    old, width = (experiments.recipe_jobs(cfg, stage, "d", str(tmp_path)) for stage in cfg["confirmation"])
    assert "init" not in old[0] and "dtype" not in old[0]["cfg"] and old[0]["name"] == "recipe-train_py-std-s1"
    float32 = experiments.recipe_jobs(cfg, dict(recipes=["plain"], seeds=[1], dtype="float32"), "d", str(tmp_path))
    assert [r["dtype"] for r in experiments.recipe_rows(float32, {j["name"]: plain_log("val_loss", [6.0, 5.0], 1.0)
                                                                  for j in float32})] == ["float32"]
    with pytest.raises(ValueError, match="recipe init draws its own init std"):
        experiments.recipe_jobs(cfg, dict(recipes=["init"], seeds=[1], init="width"), "d", str(tmp_path))
    assert width[0]["name"] == "recipe-train_py-std-s1-width-float32" and width[0]["init"] == "width"
    assert (experiments.plain_dtype(old[0]), experiments.plain_dtype(width[0])) == ("bfloat16", "float32")
    jobs = old + width
    def diagnostics(it, grad, adam):
        return {"iter": it, "grad_norm_max": grad, "grad_norm_qk0_max": grad / 2, "adam_step_qk0": adam,
                "adam_step_qk_rest": 2 * adam}
    logs = {j["name"]: [{"config": {}}, diagnostics(100, 2.0, 0.1), diagnostics(600, 50.0, 0.3),
                        diagnostics(700, 90.0, 0.9), {"iter": 1500, "val_loss": 5.0 + 0.1 * i}]
            for i, j in enumerate(jobs)}
    rows = experiments.recipe_rows(jobs, logs)
    assert rows[0]["sel_grad_norm_max_first_100"] == 2.0 and rows[0]["sel_qk0_grad_norm_max_first_100"] == 1.0
    assert rows[0]["sel_adam_step_qk0"] == 0.3 and rows[0]["sel_adam_step_rest"] == 0.6  # steps 101 to 600 only
    assert [(r["recipe"], r["init"], r["dtype"]) for r in rows] == [
        ("train_py", "nanogpt", "bfloat16"), ("train_py", "width", "float32"), ("plain", "width", "float32")]
    assert rows[1]["sel"] == [logs[j["name"]][-1]["val_loss"] for j in width[:6] if j["selective"]]
    text = "\n".join(experiments.recipe_tables({"confirmation": rows}))
    assert "| train_py (confirmation, 3 seeds) | std 0.02, bfloat16 |" in text
    assert "| plain (confirmation, 3 seeds) | width rule, float32 |" in text


def test_assign_guard_needs_every_seed_to_learn_and_to_leave_few_of_standards_errors():
    cfg = experiments.FULL["guard"]
    assert experiments.INITS[cfg["init"]] == GPTConfig.init_std, "the guard runs the default initialisation"
    assert train.get_parser().parse_args([]).init_std == GPTConfig.init_std, "train.py's default is GPTConfig's"
    row = lambda std, sel: {"std": experiments.mean_sd(std), "sel": experiments.mean_sd(sel)}  # noqa: E731
    assert experiments.assign_guard_holds(row([0.98, 0.95, 0.99], [0.999, 0.995, 0.999]), cfg)
    assert not experiments.assign_guard_holds(row([0.98, 0.95, 0.99], [0.999, 0.995, 0.997]), cfg)  # 0.3 of 0.01
    assert not experiments.assign_guard_holds(row([0.5, 0.5, 0.5], [0.89, 0.95, 0.95]), cfg)  # one seed below 0.9
    assert not experiments.assign_guard_holds(row([0.98, 0.95], [0.999, 0.995]), cfg)  # a seed missing
    assert experiments.assign_guard_holds(row([0.5, 0.5, 0.5], [0.9, 0.9, 0.9]), cfg)  # 0.9 itself is allowed
    assert experiments.assign_guard_holds(row([0.6875] * 3, [0.9375] * 3), cfg)  # a fifth, exactly in binary too
    assert experiments.assign_guard_holds(row([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]), cfg)  # no errors left to either
    text = "\n".join(experiments.guard_table({"row": row([0.98], [0.999]) | {"init": "nanogpt"}, "holds": True,
                                               "settings": cfg}))
    assert "standard / selective per seed: 0.9800 / 0.9990): holds" in text
    experiments.check_guard("guard", {"holds": True})
    recipe = {"recipe": "clip", "std": [5.0, 5.2], "sel": [5.25, 5.25]}  # above standard's mean by less than 0.2
    assert experiments.guard_holds(recipe) == (True, pytest.approx(0.2))
    assert experiments.guard_holds(recipe | {"sel": [5.4, 5.4]})[0] is False
    experiments.check_guard("recipe", {"guard": [recipe]})
    with pytest.raises(SystemExit, match="the guard failed"):
        experiments.check_guard("recipe", {"guard": [recipe, recipe | {"sel": [5.4, 5.4]}]})
    with pytest.raises(SystemExit, match="the assign guard failed"):
        experiments.check_guard("guard", {"holds": False})


def test_a_failing_guard_exits_1_once_its_section_is_written_but_not_in_a_quick_run(tmp_path, monkeypatch):
    for key, value in experiments.KEEP_FREED_MEMORY.items():
        monkeypatch.setenv(key, value)  # else main starts itself again with them
    row = {"init": "nanogpt", "std": experiments.mean_sd([0.98]), "sel": experiments.mean_sd([0.95])}
    monkeypatch.setattr(experiments, "run_section", lambda *args: {"holds": False, "row": row,
                                                                   "settings": experiments.FULL["guard"]})
    flags = ["--only", "guard", "--out_dir", str(tmp_path / "runs"), "--assets", str(tmp_path / "assets")]
    with pytest.raises(SystemExit, match="the assign guard failed"):
        experiments.main(flags)
    assert json.load(open(tmp_path / "assets" / "results.json"))["guard"]["holds"] is False
    assert "## guard" in (tmp_path / "assets" / "results.md").read_text(), "the tables too, before the exit"
    experiments.main(["--quick", *flags])  # the pipeline check: no exit


def test_plain_runs_on_disk_are_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    cfg = dict(experiments.QUICK["init"], loops=["assign"], candidates=["nanogpt"], seeds=[0])
    job = experiments.init_jobs(cfg, None, str(tmp_path))[0]
    os.makedirs(os.path.dirname(job["log"]))
    common.write_jsonl(job["log"], [{"config": experiments.plain_config(job)}, {"iter": 0}])
    torch.save({}, job["log"] + ".ckpt")  # as left by a run stopped between writing its log and deleting this
    assert experiments.run_jobs([job], 1)[job["name"]][1] == {"iter": 0}  # finished already: not trained again
    assert not os.path.exists(job["log"] + ".ckpt")
    longer = dict(job, cfg=dict(job["cfg"], max_iters=40))  # as a run made before a change of max_iters
    common.write_jsonl(job["log"], [{"config": experiments.plain_config(longer)}, {"iter": 0}])
    with pytest.raises(SystemExit, match="is a run with other settings"):
        experiments.run_jobs([job], 1)
    os.remove(job["log"])  # a run cut short: its checkpoint is checked the same way
    torch.save({"config": experiments.plain_config(longer), "model": {}, "optimizer": {}, "records": [],
                "resumed_at": []}, job["log"] + ".ckpt")
    with pytest.raises(SystemExit, match="ckpt is a run with other settings"):
        experiments.run_jobs([job], 1)
    os.remove(job["log"] + ".ckpt")  # a log without the loop's own settings ran with PLAIN_LOOP_BEFORE's
    settings = experiments.plain_config(job)
    assert settings.pop("plain_loop") == experiments.PLAIN_LOOP_BEFORE
    common.write_jsonl(job["log"], [{"config": settings}, {"iter": 0}])
    assert experiments.run_jobs([job], 1)[job["name"]][1] == {"iter": 0}
    for key, value in [("warmup", 50), ("min_lr_div", 20), ("every", 25), ("data_seed", 7)]:
        with monkeypatch.context() as m:  # a change of the loop itself: no finished run is its run ...
            m.setitem(experiments.PLAIN_LOOP, key, value)
            with pytest.raises(SystemExit, match="is a run with other settings"):
                experiments.run_jobs([job], 1)
            common.write_jsonl(job["log"], [{"config": experiments.plain_config(job)}, {"iter": 1}])
            assert experiments.run_jobs([job], 1)[job["name"]][1] == {"iter": 1}  # ... but one made with it is
        common.write_jsonl(job["log"], [{"config": settings}, {"iter": 0}])


def test_experiments_stop_on_a_damaged_file_saying_which_and_what_to_do(tmp_path, monkeypatch):
    for key, value in experiments.KEEP_FREED_MEMORY.items():
        monkeypatch.setenv(key, value)  # else main starts itself again with them
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # optional: the files are checked without it
    assets = tmp_path / "assets"
    with pytest.raises(SystemExit, match="--plots: there is no .*results.json: run the experiments first"):
        experiments.main(["--plots", "--assets", str(assets)])
    assets.mkdir()
    for damaged in ('{"guard": ', "[]"):  # torn; JSON, but not the object experiments.py writes
        (assets / "results.json").write_text(damaged)
        for flags in (["--plots"], ["--only", "guard", "--out_dir", str(tmp_path / "runs")]):
            with pytest.raises(SystemExit, match="results.json is damaged .*: restore it"):
                experiments.main([*flags, "--assets", str(assets)])  # before any run starts
    log = tmp_path / "run" / "log.jsonl"  # a train.py run's log
    log.parent.mkdir()
    log.write_text('{"config": {}}\n{"iter": \n{"iter": 2, "val_loss": 1.0}\n')
    run = re.escape(str(log.parent))  # a train.py run is its folder
    with pytest.raises(SystemExit, match=f"{run}/log.jsonl: line 2 is not JSON .*: mend that line, or delete {run} "):
        experiments.finished(str(log), 2)
    cfg = dict(experiments.QUICK["init"], loops=["assign"], candidates=["nanogpt"], seeds=[0])
    job = experiments.init_jobs(cfg, None, str(tmp_path / "plain"))[0]
    os.makedirs(os.path.dirname(job["log"]))
    with open(job["log"] + ".ckpt", "wb") as f:
        f.write(b"PK half a checkpoint")  # torn
    with pytest.raises(SystemExit, match=r"\.ckpt is damaged .*: delete it, and its run starts again"):
        experiments.run_jobs([job], 1)
    torch.save({"config": experiments.plain_config(job)}, job["log"] + ".ckpt")  # without the run's state
    with pytest.raises(SystemExit, match=r"\.ckpt is damaged .*: delete it, and its run starts again"):
        experiments.run_jobs([job], 1)
    with open(job["log"], "w") as f:  # a plain-loop run is its log
        f.write('{"config": {}}\n{"iter": \n{"iter": 2}\n')
    with pytest.raises(SystemExit, match=f"line 2 is not JSON .*: mend that line, or delete {re.escape(job['log'])} "):
        experiments.run_jobs([job], 1)


def test_plots_skip_a_plot_whose_logs_are_missing_and_draw_the_rest(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with open(os.path.join(HERE, "assets", "results.json")) as f:
        results = json.load(f)
    results["pruning"] = [{"block_size": 512}]  # a section edited by hand
    common.write_json(str(tmp_path / "results.json"), results)  # the numbers, but no assets/logs
    experiments.plots(str(tmp_path))
    out = capsys.readouterr().out
    assert "no recipe.png: " in out and "recipe-plain-std-s1-stop600.jsonl is missing" in out
    assert "no pruning.png: results.json's pruning lacks what it draws (KeyError: 'vs_itself')" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["assign.png", "heads.png"]


def test_a_plain_run_follows_the_loops_own_settings(tmp_path, c4_data, monkeypatch):
    """plain_run takes its warmup, cosine floor, log interval and batches from PLAIN_LOOP: a change of each changes
    the run (4 steps of the quick C4 loop, logged every 2, a warmup of 1)."""
    cfg = dict(experiments.QUICK["init"], loops=["c4_plain"], candidates=["nanogpt"], seeds=[0])
    job = experiments.init_jobs(cfg, c4_data, str(tmp_path))[1]
    job["cfg"] = {k: v for k, v in job["cfg"].items() if k not in ("every", "stop")} | dict(max_iters=4)
    monkeypatch.setattr(experiments, "PLAIN_LOOP", dict(experiments.PLAIN_LOOP, every=2, warmup=1))
    threads, runs = torch.get_num_threads(), {}
    try:
        for key, value in [(None, None), ("every", 4), ("warmup", 2), ("min_lr_div", 2), ("data_seed", 7)]:
            with monkeypatch.context() as m:
                if key:
                    m.setitem(experiments.PLAIN_LOOP, key, value)
                runs[key] = common.read_jsonl(experiments.plain_run(dict(job, log=str(tmp_path / f"{key}.jsonl"))))
    finally:
        torch.set_num_threads(threads)
    assert [r["iter"] for r in runs[None][1:]] == [0, 2, 4] and [r["iter"] for r in runs["every"][1:]] == [0, 4]
    assert runs["data_seed"][1]["val_loss"] != runs[None][1]["val_loss"]  # other batches from the start
    for key in ("warmup", "min_lr_div"):  # the same start, another schedule
        assert runs[key][1]["val_loss"] == runs[None][1]["val_loss"]
        assert runs[key][-1]["val_loss"] != runs[None][-1]["val_loss"], key


def test_a_plain_run_cut_short_continues_from_its_last_logged_step_exactly(tmp_path, monkeypatch):
    cfg = dict(experiments.QUICK["init"], loops=["assign"], candidates=["nanogpt"], seeds=[0])
    job = experiments.init_jobs(cfg, None, str(tmp_path))[1]  # selective; 20 steps, logged every 10
    threads, adam_steps, calls = torch.get_num_threads(), experiments.adam_steps, []
    try:
        whole = common.read_jsonl(experiments.plain_run(dict(job, log=str(tmp_path / "whole.jsonl"))))

        def killed_at_step_15(*args):
            calls.append(1)
            if len(calls) == 16:
                raise KeyboardInterrupt
            return adam_steps(*args)
        monkeypatch.setattr(experiments, "adam_steps", killed_at_step_15)
        os.makedirs(os.path.dirname(job["log"]))
        with pytest.raises(KeyboardInterrupt):
            experiments.plain_run(job)
        assert not os.path.exists(job["log"]) and os.path.exists(job["log"] + ".ckpt")
        calls.clear()
        monkeypatch.setattr(experiments, "adam_steps", lambda *args: calls.append(1) or adam_steps(*args))
        cut = common.read_jsonl(experiments.plain_run(job))
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 10, "steps 10 to 19 again, not from the start"
    assert not os.path.exists(job["log"] + ".ckpt"), "a finished run leaves its log only"
    for log in (cut, whole):
        for r in log[1:]:
            del r["elapsed_s"]
    assert cut[1:] == whole[1:] and [r["iter"] for r in cut[1:]] == [0, 10, 20] and cut[0]["resumed_at"] == [10]


def test_init_runs_each_seed_whole_and_c4_in_the_dtype_its_settings_give(tmp_path, c4_data, capsys, monkeypatch):
    cfg = dict(experiments.QUICK["init"], seeds=[0, 1])
    jobs = experiments.init_jobs(cfg, c4_data, str(tmp_path))
    assert [(j["seed"], j["loop"], j["init"]) for j in jobs[:8:2]] == [
        (0, "assign", "nanogpt"), (0, "assign", "width"), (0, "assign", "width_qk0"), (0, "c4_plain", "nanogpt")]
    assert [j["seed"] for j in jobs] == [0] * (len(jobs) // 2) + [1] * (len(jobs) // 2)
    assert {j["init"] for j in jobs if j["task"] == "c4"} == set(cfg["c4_candidates"])
    c4 = next(j for j in jobs if j["task"] == "c4")
    os.makedirs(os.path.dirname(c4["log"]))
    monkeypatch.setattr(experiments, "cpu_has_native_bf16", lambda: False)
    for dtype, recipe, autocast in [("float32", "plain", "float32"), ("bfloat16", "plain", "bfloat16"),
                                    ("bfloat16", "assign", "float32")]:  # a recipe without bf16 stays in float32
        job = dict(c4, recipe=experiments.RECIPES[recipe], cfg=dict(c4["cfg"], dtype=dtype, stop=3, every=2),
                   log=c4["log"].replace(".jsonl", f"-{dtype}-{recipe}.jsonl"))
        log = experiments.run_jobs([job], 1)[job["name"]]
        assert log[0]["dtype"] == autocast and [r["iter"] for r in log[1:]] == [0, 2, 3]  # and the last step
        assert ("note: the C4 runs autocast to bfloat16" in capsys.readouterr().out) == (autocast == "bfloat16")
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        experiments.plain_dtype(dict(c4, cfg=dict(c4["cfg"], dtype="float16")))


def plain_log(metric, values, grad, config=None):
    """A plain-loop log as plain_run writes it, logged at steps 0, 10, 20, ...: metric's values in turn."""
    return [{"config": config or {}}] + [{"iter": 10 * i, metric: v, "max_F": [2.0 + i], "head0_entropy": [1.0],
                                          "share_F_over_5": [0.1 * i]} |
                                         ({"grad_norm_max": grad * i, "grad_norm_qk0_max": grad} if i else {})
                                         for i, v in enumerate(values)]


def test_the_guard_runs_the_default_init_alone_and_judges_it_from_the_logs_on_disk(tmp_path):
    """The guard is init's assign loop with one candidate, not init's verdict (which needs the 0.02 baseline)."""
    cfg, init_cfg = experiments.QUICK["guard"], experiments.QUICK["init"]
    jobs = experiments.init_jobs(dict(init_cfg, loops=["assign"], candidates=[cfg["init"]], seeds=cfg["seeds"]),
                                 None, str(tmp_path))
    os.makedirs(os.path.dirname(jobs[0]["log"]))
    for j in jobs:  # standard ends at 0.9, selective at 0.99: a tenth of its errors
        common.write_jsonl(j["log"], plain_log("val_accuracy", [0.1, 0.5, 0.99 if j["selective"] else 0.9], 3.0,
                                               experiments.plain_config(j)))
    result = experiments.guard_experiment(cfg, init_cfg, str(tmp_path), str(tmp_path / "assets"))
    assert result["holds"] and result["row"]["init"] == cfg["init"] and result["row"]["sel"]["values"] == [0.99, 0.99]


def test_init_table_gives_each_loop_its_measure_at_the_steps_asked_over_the_seeds():
    cfg = dict(experiments.QUICK["init"], seeds=[0, 1], candidates=["nanogpt"], c4_candidates=["nanogpt"],
               loops=["assign", "c4_plain"], assign=dict(every=10), c4=dict(every=10), early=dict(assign=[10],
                                                                                                   c4=[10, 20]))
    jobs = experiments.init_jobs(cfg, None, "runs")
    logs = {j["name"]: plain_log("val_accuracy", [0.1, 0.9 if j["selective"] else 0.5, 0.99 - 0.01 * j["seed"]], 3.0)
            if j["task"] == "assign" else
            plain_log("val_loss", [10.0, 7.0 - j["selective"], 6.0 - j["seed"]], 5.0 + j["seed"]) for j in jobs}
    result = experiments.init_results(jobs, logs, cfg["early"])
    assign, c4 = result["rows"]
    assert assign["sel"]["values"] == [0.99, 0.98] and assign["sel_early"]["10"]["mean"] == 0.9
    assert assign["sel_step_to_0.9"] == [10, 10] and assign["std_step_to_0.9"] == [20, 20]  # 0.9 itself counts
    assert c4["std"]["values"] == [6.0, 5.0] and c4["sel_early"]["10"]["mean"] == 6.0 and "std_step_to_0.9" not in c4
    assert c4["std_grad_norm_max_first"] == 5.5 and c4["std_max_F0_at_init"] == 2.0  # only steps before 10 count
    text = "\n".join(experiments.init_table(result | {"decision": experiments.init_decision(result["rows"])}))
    assert "| assign (2 seeds, 20 steps, float32) | nanogpt | 0.985 +- 0.007 | 0.985 +- 0.007 |" in text
    assert "| c4_plain (2 seeds, 20 steps, bfloat16) | nanogpt | 5.500 +- 0.707 | 5.500 +- 0.707 | 0.000 +- 0.000 | " \
           "step 10: 7.000 +- 0.000 / 6.000 +- 0.000; step 20: 5.500 +- 0.707 / 5.500 +- 0.707 | - | " \
           "5.5 / 5.5 (steps 0-9) | 2.00 | 0.200 / 0.200 |" in text
    assert "(assign: fastest nanogpt, hurts standard: none; c4_plain: fastest nanogpt, hurts standard: none) picks " \
           "nanogpt" in text


def test_init_decision_takes_the_candidate_fastest_in_every_loop_unless_it_hurts_standard():
    def row(loop, init, std, sel_curve):  # sel_curve: selective's mean at the early steps, then its seeds at the end
        *early, last = sel_curve
        return {"loop": loop, "init": init, "std": experiments.mean_sd(std), "sel": experiments.mean_sd(last),
                "sel_early": {str(i): experiments.mean_sd([v]) for i, v in enumerate(early)}}
    assign = [row("assign", "nanogpt", [0.98, 0.99], [0.2, 0.9, [1.0, 1.0]]),
              row("assign", "width", [0.97, 0.98], [0.9, 1.0, [1.0, 1.0]])]  # standard 0.01 worse: the spread
    c4 = [row("c4_plain", "nanogpt", [5.8, 5.9], [6.5, 6.0, [5.7, 5.8]]),
          row("c4_plain", "width", [5.7, 5.8], [6.2, 5.8, [5.6, 5.6]])]  # lower loss learns faster
    decide = experiments.init_decision
    assert decide(assign + c4)["default"] == "width"
    assert decide(assign + c4)["loops"]["c4_plain"] == {"fastest": "width", "hurts_standard": []}
    hurt = [row("c4_plain", "width", [6.1, 6.2], [6.2, 5.8, [5.6, 5.6]])]  # standard 0.3 worse, spread 0.1
    assert decide(assign + c4[:1] + hurt) == {"loops": {"assign": {"fastest": "width", "hurts_standard": []},
                                                        "c4_plain": {"fastest": "width",
                                                                     "hurts_standard": ["width"]}},
                                              "default": "nanogpt"}
    slow = [row("c4_plain", "width", [5.7, 5.8], [6.6, 6.1, [5.8, 5.8]])]  # the loops disagree: 0.02 stays
    assert decide(assign + c4[:1] + slow)["default"] == "nanogpt"
    hurt_a_little = [row("c4_plain", "width", [6.0, 6.05], [6.0, 5.6, [5.0, 5.5]])]  # 0.175 worse, spread 0.1
    assert decide(c4[:1] + hurt_a_little)["loops"]["c4_plain"]["hurts_standard"] == ["width"]  # selective's 0.5 not
    # ahead on the early steps' mean (6.2 against 6.25), behind with the last step: 6.133 against nanogpt's 6.083
    late = [row("c4_plain", "width", [5.8, 5.9], [6.2, 6.2, [6.0, 6.0]])]
    assert decide(c4[:1] + late)["loops"]["c4_plain"]["fastest"] == "nanogpt"
    with pytest.raises(ValueError, match="no nanogpt runs"):
        decide(assign + c4[1:])
    experiments.check_c4_candidates(decide(assign + c4), experiments.FULL["init"])  # C4 ran the winner
    qk0 = [row("assign", "width_qk0", [0.98, 0.99], [1.0, 1.0, [1.0, 1.0]])]  # wins assign, never ran on C4
    with pytest.raises(SystemExit, match="the assign loop's winner is width_qk0, which the C4 loops do not run"):
        experiments.check_guard("init", {"decision": decide(assign + qk0 + c4)})  # what a full run calls


@pytest.mark.parametrize("B, T, tile", [(2, 16, 4), (1, 40, 8), (3, 32, 8)])
def test_masked_tile_shares_match_every_entry_of_every_tile(B, T, tile):
    """experiments.masked_tile_shares reads only each tile's first row (F never decreases down the queries); here
    every entry of every tile below the diagonal is checked, at thresholds that split the tiles."""
    g = torch.Generator().manual_seed(T)
    logits = (3 * torch.randn(B, T, T, generator=g)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                                   float("-inf"))
    F, n = selective_mask(logits), T // tile
    smallest = [F[b, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile].min().item()
                for b in range(B) for i in range(n) for j in range(i)]
    positive = sorted(s for s in smallest if s > 0)  # key tile 0 (BOS) and the tiles next to the diagonal have 0
    thresholds = [positive[len(positive) // 2], 0.5 * max(smallest), max(smallest) + 1]
    shares = experiments.masked_tile_shares(F, tile, thresholds)
    for t in thresholds:
        assert shares[str(t)] == pytest.approx(sum(s >= t for s in smallest) / len(smallest), abs=1e-6)
    assert 0 < shares[str(thresholds[0])] < 1 and shares[str(thresholds[2])] == 0


def test_experiments_runs_resume_exactly_after_a_kill_and_are_checked_against_their_settings(tmp_path):
    """experiments.train: a run killed mid-way continues from its checkpoint to the same result as one never
    stopped; a finished run is reused only with the settings asked for."""
    at = TINY.index("--log_interval")
    flags = ["--dataset", "assign", "--selective", *TINY[:at], *TINY[at + 2:], "--eval_interval", "4"]
    whole = experiments.train("whole", str(tmp_path), flags, 24)
    proc = subprocess.Popen([sys.executable, "-c", f"import experiments; experiments.train('cut', {str(tmp_path)!r}, "
                             f"{flags!r}, 24)"], cwd=HERE, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and the train.py it started
    proc.wait()
    assert not experiments.finished(str(tmp_path / "cut" / "log.jsonl"), 24), "killed before the end"
    resumed = experiments.train("cut", str(tmp_path), flags, 24)
    val = lambda records: [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    assert val(resumed) == val(whole)
    assert [r["resumed_at"] for r in resumed if "resumed_at" in r] in ([i] for i in range(0, 24, 4)), "not resumed"
    with pytest.raises(SystemExit, match="other settings: --learning_rate 0.001 \\(asked: 0.002\\)"):
        experiments.train("whole", str(tmp_path), flags + ["--learning_rate", "0.002"], 24)


def test_runs_on_disk_are_compared_with_the_flags_as_train_py_reads_them(tmp_path, monkeypatch):
    """Every setting as train.py resolves it, its defaults included, but where the run ran; --init_std width is
    None in a log's header; a log from before init_std existed drew 0.02."""
    log = tmp_path / "log.jsonl"
    flags = ["--init_std", "width", "--learning_rate", "1e-3"]
    config = vars(train.fill_in(train.get_parser().parse_args(flags + ["--out_dir", "elsewhere", "--device", "cpu"])))
    common.write_jsonl(str(log), [{"config": config}])
    experiments.check_settings(str(log), flags)  # min_lr resolved to 1e-4 in both; where it ran is not compared
    with pytest.raises(SystemExit, match="other settings: --init_std width \\(asked: 0.02\\)"):
        experiments.check_settings(str(log), ["--init_std", "0.02", "--learning_rate", "1e-3"])
    with pytest.raises(SystemExit, match="other settings: --min_lr 0.0001 \\(asked: 0.0002\\)"):
        experiments.check_settings(str(log), [*flags, "--min_lr", "2e-4"])
    with pytest.raises(SystemExit, match=r"other settings: --data_dir \S+/data/c4 \(asked: \S+/data/other\)"):
        experiments.check_settings(str(log), [*flags, "--data_dir", "data/other"])
    experiments.check_settings(str(log), [*flags, "--data_dir", os.path.join(experiments.HERE, "data", "c4", "")])
    del config["init_std"]  # a log from before init_std: nanoGPT's 0.02
    common.write_jsonl(str(log), [{"config": config}])
    experiments.check_settings(str(log), ["--init_std", "0.02", "--learning_rate", "1e-3"])
    with pytest.raises(SystemExit, match="other settings: --init_std 0.02 \\(asked: width\\)"):
        experiments.check_settings(str(log), flags)
    changed = train.get_parser()
    changed.set_defaults(beta2=0.99)  # train.py's default changed since the run: not the run asked for
    monkeypatch.setattr(experiments, "train_parser", lambda: changed)
    with pytest.raises(SystemExit, match="other settings: --beta2 0.95 \\(asked: 0.99\\)\\. Delete"):
        experiments.check_settings(str(log), ["--init_std", "0.02", "--learning_rate", "1e-3"])


def test_ddp_two_processes_match_one_with_twice_the_accumulation(tmp_path):
    common = ["--dataset", "assign", "--selective", *TINY, "--max_iters", "3", "--eval_interval", "3"]
    single = str(tmp_path / "single")
    assert run_script("train.py", *common, "--grad_accum", "4", "--out_dir", single)[0] == 0
    ddp = str(tmp_path / "ddp")
    code, text = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                            *common, "--grad_accum", "4", "--device", "cpu", "--out_dir", ddp)
    assert code == 0, text
    final = lambda out: [r for r in log_records(out) if "val_loss" in r][-1]
    assert log_records(ddp)[0]["world_size"] == 2
    assert final(ddp)["val_loss"] == pytest.approx(final(single)["val_loss"], rel=1e-5)
    assert final(ddp)["val_loss"] != pytest.approx(log_records(single)[1]["val_loss"], rel=1e-3)  # it trained
    code, text = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                            *common, "--grad_accum", "3", "--device", "cpu", "--out_dir", str(tmp_path / "x"))
    assert code != 0 and text.count("--grad_accum (3) must be a multiple of the 2 processes") == 1


def test_a_rank_without_torchruns_environment_is_refused_clearly(tmp_path, monkeypatch):
    """RANK in the environment means torchrun started train.py, which also sets WORLD_SIZE: a stray or damaged RANK
    gets one line, not a traceback, and nothing is written."""
    for env in ({"RANK": "0"}, {"RANK": "", "WORLD_SIZE": "2"}, {"RANK": "1", "WORLD_SIZE": "two"},
                {"RANK": "1", "WORLD_SIZE": "2"}):  # the last without LOCAL_RANK
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code, text = run_main("train.py", "--dataset", "assign", *TINY, "--out_dir", str(tmp_path / "run"))
        assert code == 1 and "RANK is set, but RANK, WORLD_SIZE and LOCAL_RANK are not the whole numbers" in text
        assert "Traceback" not in text and not os.path.exists(tmp_path / "run"), text
    monkeypatch.setenv("RANK", "-1")  # as unset (nanoGPT's convention)
    code, text = run_main("train.py", "--dataset", "assign", *TINY, "--max_iters", "1",
                          "--out_dir", str(tmp_path / "r"))
    assert code == 0 and "world 1" in text, text


def test_default_dtype_is_bfloat16_only_on_a_cpu_that_has_it(monkeypatch):
    """Emulated bfloat16 (AVX2 CPUs) makes a matmul ~100x slower than float32: the default there is float32."""
    for avx512_bf16, amx, expected in ((False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert common.autocast_dtype("cpu", None) == expected
        assert common.autocast_dtype("cpu", "bfloat16") == "bfloat16"  # asked for, it is given


def test_help_shows_every_default():
    for script, flag in (("train.py", "--learning_rate"), ("sample.py", "--temperature"),
                         ("prepare_data.py", "--val_fraction"), ("experiments.py", "--only"), ("bench.py", "--device")):
        code, text = run_main(script, "--help")
        entries = re.split(r"\n(?=  -)", text.split("\noptions:\n")[1])[1:]  # one per flag, after -h
        assert code == 0 and any(e.startswith(f"  {flag} ") for e in entries), script
        assert all(e.count("(default:") == 1 for e in entries), [e for e in entries if e.count("(default:") != 1]
    assert "repeat the flag" in run_main("experiments.py", "--help")[1]
    assert "against flash attention and a training step (default: speed)" in \
        " ".join(run_main("bench.py", "--help")[1].split())


def test_train_py_defaults_are_the_readmes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # out-c4, out-assign: the defaults resolve here, not beside a user's own runs
    args, _ = train.parse_args([])
    assert (args.out_dir, args.data_dir, args.block_size, args.n_layer, args.n_embd, args.n_head) == \
        ("out-c4", "data/c4", 256, 4, 128, 4)
    assert (args.beta1, args.beta2, args.grad_clip, args.init_std, args.selective) == (0.9, 0.95, 1.0, None, False)
    args, _ = train.parse_args(["--dataset", "assign"])
    assert (args.out_dir, args.block_size) == ("out-assign", 96)


def test_a_selective_run_without_either_guard_against_spikes_is_warned(tmp_path):
    for flags, warned in ((["--beta2", "0.999", "--grad_clip", "0"], True), (["--beta2", "0.999"], False),
                          (["--grad_clip", "0"], False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tiny_training(tmp_path, "--selective", *flags)
        assert any("SPEC.md §8" in str(w.message) for w in caught) == warned, flags


# ---------------------------------------------------------------------------------------------------------------
# sample.py

def test_sample_prune_eval_and_find_budgets(assign_run, capsys, tmp_path):
    sample.main(["--out_dir", assign_run, "--start", "a=3 b=1 a?", "--max_new_tokens", "40", "--top_k", "1",
                 "--prune", "--budget", "4", "--dtype", "float32"])
    text = capsys.readouterr().out
    assert text.startswith("a=3 b=1 a?") and "layer 1: budget 4, peak 4 cached keys" in text and "x smaller" in text
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("c=4\nc?")  # the whole file, lines and all
    sample.main(["--out_dir", assign_run, "--start", f"FILE:{prompt}", "--max_new_tokens", "3", "--dtype", "float32"])
    assert capsys.readouterr().out.startswith("c=4 c? ")
    sample.main(["--out_dir", assign_run, "--eval_ppl", "--budgets", "3,5", "--dtype", "float32"])
    printed = capsys.readouterr().out
    unpruned, pruned = re.search(r"val ppl (\S+) unpruned, (\S+) with budgets \[3, 5\]", printed).groups()
    assert unpruned != pruned, "the budgets prune"
    last_eval = [r for r in log_records(assign_run) if "val_loss" in r][-1]  # train.py's, on the same batches
    assert float(unpruned) == pytest.approx(math.exp(last_eval["val_loss"]), rel=1e-3) and last_eval["iter"] == 30
    sample.main(["--out_dir", assign_run, "--find_budgets", "--tolerance", "0.05", "--shrink", "0.5",
                 "--dtype", "float32"])
    found = json.load(open(os.path.join(assign_run, "budgets.json")))
    assert found["target_ppl"] == pytest.approx(1.05 * found["unpruned_val_ppl"]) and len(found["budgets"]) == 2
    assert found["val_ppl"] <= found["target_ppl"]
    assert found["unpruned_val_ppl"] == pytest.approx(float(unpruned), rel=1e-3)
    assert found["memory_factor"] == pytest.approx(2 * 24 / sum(found["budgets"]))
    model, run = sample.load_model(assign_run, "ckpt.pt", "cpu")
    others = list(sample.validation_batches(run, 2, 4, "cpu", first=2))  # the 2 after the run's 2 eval batches
    held = found["held_out"]  # the budgets scored where the search did not look
    assert held["batches"] == 2 and held["unpruned_val_ppl"] != pytest.approx(found["unpruned_val_ppl"], rel=1e-3)
    no_autocast = contextlib.nullcontext()  # --dtype float32
    assert held["unpruned_val_ppl"] == pytest.approx(sample.perplexity(model, others, no_autocast))
    assert held["val_ppl"] == pytest.approx(sample.perplexity(model, others, no_autocast, found["budgets"]))
    sample.main(["--out_dir", assign_run, "--eval_ppl", "--dtype", "float32"])  # budgets.json is picked up
    assert f"with budgets {found['budgets']}" in capsys.readouterr().out


def test_sample_prune_compares_with_the_keys_an_unpruned_buffer_holds(assign_run, capsys):
    """--prune's 'without pruning' is the peak of an unpruned generate of the same prompt and length; the KV MiB
    count every layer's keys of every sample."""
    sample.main(["--out_dir", assign_run, "--start", "a=3 b=1 a?", "--max_new_tokens", "5", "--top_k", "1",
                 "--prune", "--budget", "4", "--num_samples", "3", "--dtype", "float32"])
    text = capsys.readouterr().out
    model, _ = sample.load_model(assign_run, "ckpt.pt", "cpu")
    model.generate(torch.tensor([[0] + common.assign_encode("a=3 b=1 a?")]), 5, top_k=1)
    unpruned = model.decode_stats["peak"]
    assert unpruned[0] < model.config.block_size and text.count(f"vs {unpruned[0]} without pruning") == 2
    assert f"peak 4 cached keys (final 4) vs {unpruned[1]} without pruning" in text
    per_key = 2 * 32 * 4 + 8 + 4  # k and v (n_embd 32, float32), an int64 position, f in float32
    mib = [float(m) for m in re.search(r"KV cache: (\S+) MiB with pruning vs (\S+) MiB without", text).groups()]
    assert mib == [round(3 * sum(keys) * per_key / 2 ** 20, 3) for keys in ([4, 4], unpruned)], text
    assert f"{sum(unpruned) / 8:.2f}x smaller" in text
    long_prompt = " ".join(f"{'abcdefgh'[i % 8]}={i % 10}" for i in range(30)) + " a?"  # 32 tokens with BOS
    sample.main(["--out_dir", assign_run, "--start", long_prompt, "--max_new_tokens", "3", "--top_k", "1", "--prune",
                 "--budget", "4", "--dtype", "float32"])
    assert "vs 14 without pruning" in capsys.readouterr().out, "block 24: BOS + the latest 11 tokens, 2 decoded"


def test_a_budget_above_block_size_keeps_block_size_keys():
    model = GPT(GPTConfig(block_size=24, vocab_size=99, n_layer=2, n_head=2, n_embd=16, selective=True))
    assert sample.memory_factor(model, [100, 12]) == 2 * 24 / (24 + 12)


def test_budgets_json_names_the_weights_its_budgets_were_searched_with():
    model = GPT(GPTConfig(block_size=24, vocab_size=99, n_layer=2, n_head=2, n_embd=16, selective=True))
    same = GPT(model.config)
    same.load_state_dict(model.state_dict())
    assert sample.model_fingerprint(same) == sample.model_fingerprint(model)
    with torch.no_grad():
        same.transformer.h[1].mlp.c_fc.weight[3, 5] += 1e-3
    assert sample.model_fingerprint(same) != sample.model_fingerprint(model)


def test_a_budget_search_is_reused_only_for_the_same_model_and_settings(tmp_path, monkeypatch, capsys):
    searches = []

    def find_budgets(*args):  # a stand-in: the nth search finds a path to perplexity 10 + n
        searches.append(1)
        return [([24, 24], 10.0 + len(searches))]
    monkeypatch.setattr(sample, "find_budgets", find_budgets)
    model = GPT(GPTConfig(block_size=24, vocab_size=99, n_layer=2, n_head=2, n_embd=16, selective=True))
    path, cfg = str(tmp_path / "search.json"), {"shrink": 0.5, "search_batches": 2}
    first = experiments.search(model, None, None, 12.0, cfg, path)
    assert experiments.search(model, None, None, 12.0, cfg, path) == first == [([24, 24], 11.0)]  # reused
    assert len(searches) == 1 and "finished already" in capsys.readouterr().out
    for other, target, settings in [(model, 13.0, cfg), (model, 12.0, dict(cfg, shrink=0.8)),
                                    (GPT(model.config), 12.0, cfg)]:  # another target, shrink, model
        experiments.search(model, None, None, 12.0, cfg, path)
        done = len(searches)
        experiments.search(other, None, None, target, settings, path)
        assert len(searches) == done + 1, "searched again"
    for damaged in ('{"settings": ', "[]", "{}"):  # torn; JSON of another shape
        with open(path, "w") as f:
            f.write(damaged)
        assert experiments.search(model, None, None, 12.0, cfg, path) == [([24, 24], 10.0 + len(searches))]
        assert "damaged, searching again" in capsys.readouterr().out


def test_perplexity_is_the_exp_of_the_mean_loss():
    class Losses:  # a stand-in model whose batch x has loss x
        def __call__(self, x, targets, budgets=None):
            self.loss_terms = {"ce": torch.tensor(x)}
    ppl = sample.perplexity(Losses(), [(1.0, None), (3.0, None)], contextlib.nullcontext())
    assert ppl == pytest.approx(math.exp(2.0))


def test_find_budgets_shrinks_the_layer_whose_shrinking_costs_least_while_within_the_target(monkeypatch):
    """SPEC §4.3's greedy search, on a stand-in perplexity: 10 plus each layer's cost per key it gives up."""
    cost = [0.2, 0.1]
    ppl = lambda budgets: 10 + sum(c * (24 - K) for c, K in zip(cost, budgets or [24, 24]))
    monkeypatch.setattr(sample, "perplexity", lambda model, batches, ctx, budgets=None: ppl(budgets))
    model = argparse.Namespace(config=argparse.Namespace(block_size=24, n_layer=2))
    path = sample.find_budgets(model, None, None, 14.0, 0.5)
    assert [budgets for budgets, _ in path[:2]] == [[24, 24], [24, 12]]  # both shrinks fit: the cheaper one
    assert all(p == ppl(budgets) <= 14.0 for budgets, p in path)
    end = path[-1][0]
    for layer in (0, 1):  # it stops where no further shrink stays within the target
        trial = end[:layer] + [max(2, min(end[layer] - 1, end[layer] // 2))] + end[layer + 1:]
        assert end[layer] == 2 or ppl(trial) > 14.0


def test_sample_ignores_budgets_searched_for_another_model(assign_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(assign_run, out)
    (out / "budgets.json").write_text("{}")  # an earlier search: --overwrite replaces it
    sample.main(["--out_dir", str(out), "--find_budgets", "--tolerance", "0.05", "--dtype", "float32", "--overwrite"])
    capsys.readouterr()
    searched = (out / "budgets.json").read_text()
    assert "budgets" in json.loads(searched)
    code, text = run_script("train.py", "--dataset", "assign", "--selective", *TINY, "--n_layer", "3",
                            "--max_iters", "1", "--overwrite", "--out_dir", str(out))
    assert code == 0, text
    (out / "budgets.json").write_text(searched)  # --overwrite deleted it
    with pytest.raises(SystemExit):  # the retrained model has 3 layers; the stale file is not used
        sample.main(["--out_dir", str(out), "--eval_ppl", "--dtype", "float32"])
    text = capsys.readouterr()
    assert "searched for another model" in text.out and "need --budget" in text.err
    for damaged in ("{\"budgets\": [3,", "[3, 5]", "{\"budgets\": [3, 5]}"):  # cut short; not ours; no fingerprint
        (out / "budgets.json").write_text(damaged)
        with pytest.raises(SystemExit):
            sample.main(["--out_dir", str(out), "--eval_ppl", "--dtype", "float32"])
        text = capsys.readouterr()
        assert "is not a budgets file of --find_budgets" in text.out and "need --budget" in text.err


def test_sample_computes_a_tiled_run_where_the_tiled_path_cannot_run(assign_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(assign_run, out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["model_args"]["attention"] = "tiled"  # trained with --attention tiled
    torch.save(ckpt, out / "ckpt.pt")
    monkeypatch.setattr(kernels, "why_not_tiled", lambda q, dropout_p=0.0: "no")
    sample.main(["--out_dir", str(out), "--eval_ppl", "--budget", "4", "--dtype", "float32"])
    assert "with budgets [4, 4]" in capsys.readouterr().out


def test_sample_temperature_zero_is_greedy(assign_run, capsys):
    outputs = []
    for flags in (["--temperature", "0"], ["--top_k", "1"]):
        sample.main(["--out_dir", assign_run, "--start", "a=3 b=1 a?", "--max_new_tokens", "12", "--dtype", "float32",
                     "--seed", str(len(outputs)), *flags])
        outputs.append(capsys.readouterr().out.split("---")[0])
    assert outputs[0] == outputs[1]


def test_sample_says_a_long_prompt_was_cut(assign_run, capsys):
    sample.main(["--out_dir", assign_run, "--start", "a=1 " * 40, "--max_new_tokens", "2", "--dtype", "float32"])
    assert "the prompt has 41 tokens with BOS, more than block_size 24: the model sees BOS and its latest 11" in \
        capsys.readouterr().out


def test_sample_data_dir_works_from_anywhere(tmp_path, c4_data):
    out = str(tmp_path / "run")
    code, text = run_script("train.py", "--dataset", "c4", "--data_dir", os.path.relpath(c4_data, HERE), "--selective",
                            *TINY, "--max_iters", "1", "--out_dir", out)
    assert code == 0, text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    flags = ["--out_dir", out, "--eval_ppl", "--budget", "4", "--dtype", "float32"]
    code, text = run_script(os.path.join(HERE, "sample.py"), *flags, cwd=elsewhere)
    assert code != 0 and "--data_dir" in text and "Traceback" not in text
    code, text = run_script(os.path.join(HERE, "sample.py"), *flags, "--data_dir", c4_data, cwd=elsewhere)
    assert code == 0 and "with budgets [4, 4]" in text, text
    common.write_bin(str(elsewhere / "c4-validation.00000-of-00001.bin"), [common.BOS] + [11] * 9)
    code, text = run_script(os.path.join(HERE, "sample.py"), *flags, "--data_dir", ".", cwd=elsewhere)
    assert code != 0 and "has at most 10 tokens in a shard, fewer than the block size 24" in text, text


def test_sample_refuses_budgets_for_a_standard_model(tmp_path, capsys):
    out = str(tmp_path / "std")
    assert run_script("train.py", "--dataset", "assign", *TINY, "--max_iters", "1", "--out_dir", out)[0] == 0
    with pytest.raises(SystemExit):
        sample.main(["--out_dir", out, "--eval_ppl", "--budget", "4"])
    assert "selective model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# sample.py --explain

def evictions_by_hand(F, budget):
    """SPEC §4 walked one query at a time, written independently of pruned_visibility: {key: query that evicted it}."""
    T = F.size(0)
    live, evicted = [], {}
    for t in range(T):
        live.append(t)
        if len(live) > budget:
            candidates = [j for j in live if j not in (0, t)]
            worst = max(F[t, j].item() for j in candidates)
            victim = min(j for j in candidates if F[t, j].item() == worst)  # ties: the oldest
            live.remove(victim)
            evicted[victim] = t
    return evicted


def test_explain_shows_the_last_row_of_F_and_the_eviction_order_on_a_hand_built_F():
    g = torch.Generator().manual_seed(3)
    S = torch.rand(9, 9, generator=g).tril(-1)
    S[:, 0] = 0
    S[4, 2] = 5.0  # token 4 masks token 2 hard
    F = torch.cumsum(torch.nn.functional.pad(S[:-1], (0, 0, 1, 0)), dim=0)[None]
    F[0, 6, 6] = 100.0  # the current token's F never counts (SPEC §4): give it the largest
    for budget in (3, 5):
        layer = sample.summarise_layer(F[0], pruned_visibility(F, budget)[0])
        assert layer["F_last"] == F[0, -1].tolist()
        assert {j: t for j, t in enumerate(layer["evicted_at"]) if t is not None} == evictions_by_hand(F[0], budget)
    text = sample.render_explanation([f"w{j}" for j in range(9)], [layer], [5], colour=False)
    rows = text.splitlines()[2:]
    assert len(rows) == 9 and all(f"{F[0, -1, j].item():6.2f}" in rows[j] for j in range(9))
    for row, t in zip(rows, layer["evicted_at"]):  # the query at which the token left the buffer
        if t is None:
            assert "ev@" not in row
        else:
            assert f"ev@{t:<3d}" in row
    assert [sample.masked_bar(f) for f in (0.0, 50.0, math.log(2))] == ["     ", "█████", "██▌  "]  # 1 - exp(-F)


def test_explain_png_draws_F_below_the_diagonal_and_dots_evicted_keys(tmp_path, monkeypatch, request):
    plt = pytest.importorskip("matplotlib.pyplot")
    g = torch.Generator().manual_seed(5)
    layers = []
    for budget, scale in ((3, 1.0), (5, 4.0)):  # two layers, one colour scale: the larger F sets it
        S = (torch.rand(7, 7, generator=g) * scale).tril(-1)
        S[:, 0] = 0
        F = torch.cumsum(torch.nn.functional.pad(S[:-1], (0, 0, 1, 0)), dim=0)[None]
        layers.append(sample.summarise_layer(F[0], pruned_visibility(F, budget)[0]))
    plt.close("all")
    request.addfinalizer(lambda: plt.close("all"))
    monkeypatch.setattr(plt, "close", lambda fig: None)  # keep the figure to read back what was drawn
    png = tmp_path / "f.png"
    try:
        assert sample.explain_png(str(png), [f"w{j}" for j in range(7)], layers, [3, 5])
        fig = plt.gcf()
    finally:
        monkeypatch.undo()
    assert png.stat().st_size > 1000
    top = max(1.0, max(layer["F"].max().item() for layer in layers))
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heatmaps] == ["layer 0, budget 3", "layer 1, budget 5"]
    for ax, layer in zip(heatmaps, layers):
        drawn = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
        future = np.triu(np.ones((7, 7), dtype=bool), 1)
        assert np.isnan(drawn[future]).all()  # queries (rows) see no later key: nothing drawn there
        np.testing.assert_allclose(drawn[~future], layer["F"].numpy()[~future])
        assert ax.images[0].get_clim() == (0, top)
        t, j = layer["gone"].nonzero(as_tuple=True)
        assert len(t) > 0  # the test means something: both budgets evict
        dots = ax.collections[0].get_offsets()
        assert sorted(map(tuple, np.asarray(dots).tolist())) == sorted(zip(j.tolist(), t.tolist()))  # (key, query)


def test_explain_on_a_tiny_model_equals_selective_mask_and_pruned_visibility():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16, selective=True,
                          init_std=0.02)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # 8 x 0.02: large logits, selection is active
    prompt = [0] + torch.randint(1, 20, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    budgets = [4, 6]
    layers = sample.explain(model, prompt, budgets)
    x = model.transformer.wte(torch.tensor([prompt])) + model.transformer.wpe(torch.arange(12))
    for block, budget, layer in zip(model.transformer.h, budgets, layers):
        q, k = (t.view(1, 12, 2, 8).transpose(1, 2) for t in block.attn.c_attn(block.ln_1(x)).split(16, dim=2)[:2])
        logits0 = (q[:, 0] @ k[:, 0].transpose(-2, -1)) / math.sqrt(q.size(-1))
        F = selective_mask(logits0.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf")))
        torch.testing.assert_close(torch.tensor(layer["F_last"]), F[0, -1])
        assert F[0, -1].max() > 1  # the test means something: this model masks
        gone = torch.ones(12, 12, dtype=torch.bool).tril() & ~pruned_visibility(F, budget)[0]
        assert torch.equal(layer["gone"], gone) and any(t is not None for t in layer["evicted_at"])
        x = block(x, budget=budget)[0]


def test_explain_command_prints_the_view_and_draws_the_png(assign_run, tmp_path, capsys):
    png = tmp_path / "f.png"
    png.write_bytes(b"an earlier drawing")  # --overwrite replaces it
    sample.main(["--out_dir", assign_run, "--explain", "--start", "a=3 b=1 a=7 c=2 a?", "--budget", "3",
                 "--explain_png", str(png), "--overwrite", "--dtype", "float32"])
    text = capsys.readouterr().out
    assert "What each layer masks for the last query, 'a?'" in text and "<BOS>" in text and "a=7" in text
    try:
        import matplotlib  # noqa: F401
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000 and "drawn to" in text
    except ImportError:
        assert png.read_bytes() == b"an earlier drawing" and "pip install matplotlib" in text


def test_explain_refuses_a_standard_model(tmp_path, capsys):
    out = str(tmp_path / "std")
    assert run_script("train.py", "--dataset", "assign", *TINY, "--max_iters", "1", "--out_dir", out)[0] == 0
    with pytest.raises(SystemExit):
        sample.main(["--out_dir", out, "--explain", "--start", "a=1 a?"])
    assert "--explain: a standard model has no F" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# bench.py: how its ratios are measured (its numbers are benchmarks, not tests)

def test_bench_alternates_the_contenders_and_divides_each_by_the_base_of_its_own_alternation(monkeypatch):
    """Side by side: one warm-up call each, then every contender once per alternation, the order reversed every
    other time; a ratio is a contender's time over the base's in the same alternation, so that noise which drifts
    hits both alike. On a fake clock that drifts: the n-th call of all takes its contender's base time x n. On a GPU
    a sample repeats each contender until the fastest takes 20 ms, and gives the time per call."""
    import bench
    calls, now = [], [0.0]

    def contender(name, seconds, drift=True):
        def call():
            calls.append(name)
            now[0] += seconds * (len(calls) if drift else 1)
        return call
    monkeypatch.setattr(bench, "time", argparse.Namespace(perf_counter=lambda: now[0]))
    times = bench.side_by_side({"sel": contender("sel", 3.0), "std": contender("std", 1.0)}, "cpu", 3)
    assert calls == ["sel", "std", "sel", "std", "std", "sel", "sel", "std"]
    assert times == {"sel": [9.0, 18.0, 21.0], "std": [4.0, 5.0, 8.0]}
    assert bench.ratios(times, "sel", "std") == [9 / 4, 18 / 5, 21 / 8]
    assert bench.spread(bench.ratios(times, "sel", "std")) == "2.625 [2.250-3.600]"  # median [min-max]
    calls.clear()
    monkeypatch.setattr(bench, "sync", lambda device: None)
    times = bench.side_by_side({"sel": contender("sel", 0.003, False), "std": contender("std", 0.001, False)},
                               "cuda", 3)
    assert len(calls) == 2 + 2 + 3 * 2 * 20  # warm-up, one call each to size the samples, then 20 calls a sample
    assert times == {"sel": [pytest.approx(0.003)] * 3, "std": [pytest.approx(0.001)] * 3}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bench.py's CPU memory figure reads /proc")
def test_bench_peak_memory_on_the_cpu_sees_the_mask_that_flash_attention_never_builds():
    """bench.py's CPU memory figure (the peak resident set a case adds, in a subprocess with this process's thread
    count): the selective mask path holds at least the T x T float mask, 4 * T^2 bytes, which flash causal attention
    never materialises (its extra memory is linear in T, plus a block buffer per thread: on one thread about 3 MB at
    T = 2048, one head of width 64, against the mask's 16.8 MB)."""
    import bench
    case = dict(kind="attention", B=1, H=1, T=2048, D=64, dtype="fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with_mask, flash = (bench.peak_memory(dict(case, path=path), "cpu") for path in ("mask", "standard"))
    finally:
        torch.set_num_threads(threads)
    assert None not in (with_mask, flash), "bench.py _memory failed: python bench.py kernels says why"
    assert with_mask >= 4 * 2048 ** 2 > 2 * flash > 0


# ---------------------------------------------------------------------------------------------------------------
# Bad input, every script: a non-zero exit, a short message that names the flag or file, no traceback, and
# nothing on disk changed.

def snapshot(root):
    """Every file under root with its size and modification time."""
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, assign_run, c4_data):
    """A folder with the bad inputs' material: a finished run, damaged checkpoints, files of every wrong kind."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(assign_run, root / "run")
    (root / "run" / "budgets.json").unlink(missing_ok=True)  # other tests may have searched budgets for assign_run
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"hello\n")):
        shutil.copytree(assign_run, root / name)
        blob = (root / name / "ckpt.pt").read_bytes()
        (root / name / "ckpt.pt").write_bytes(damage(blob))
    shutil.copytree(root / "garbage", root / "both_damaged")
    (root / "both_damaged" / "ckpt_best.pt").write_bytes(b"\x00" * 100)
    (root / "a_file").write_text("not a directory")
    (root / "latin1.txt").write_bytes("caf\xe9 a=3".encode("latin-1"))
    (root / "folder").mkdir()
    short = root / "short"  # a validation shard shorter than the default block size (256)
    short.mkdir()
    for name in os.listdir(c4_data):
        if name.endswith(".bin") and "validation" not in name:
            shutil.copy(os.path.join(c4_data, name), short)
    common.write_bin(str(short / "c4-validation.00000-of-00008.bin"), [common.BOS] + [11] * 99)
    (root / "notes.txt").write_text("one two three four five six seven eight nine ten " * 40)
    prepare_data.main(["--local", str(root / "notes.txt"), "--data_dir", str(root / "prepared")])
    os.makedirs(root / "empty_cache")
    (root / "bad.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (root / "notext.jsonl").write_text('{"text": "a document"}\n{"url": "no text field"}\n')
    (root / "notjson.jsonl").write_text('{"text": "a document"}\nnot json\n')
    (root / "notobject.jsonl").write_text('{"text": "a document"}\n["a list"]\n')
    (root / "nulltext.jsonl").write_text('{"text": null}\n')
    (root / "with_validation").mkdir()
    for name in ("docs.txt", "docs.validation.txt"):
        (root / "with_validation" / name).write_text("one two three four five " * 20)
    for name, damage in (("damaged_settings", "{broken"), ("listed_settings", "[1, 2]")):
        shutil.copytree(root / "prepared", root / name)
        (root / name / "prepare.json").write_text(damage)
    shutil.copytree(assign_run, root / "searched")  # a run with an earlier budget search
    (root / "searched" / "budgets.json").write_text("{}")
    return root


A = ["train.py", "--dataset", "assign", *TINY, "--max_iters", "1"]  # train.py, tiny and quick
S = ["sample.py", "--out_dir", "run", "--dtype", "float32"]  # sample.py on the finished run
BAD_INPUTS = [
    # train.py
    ([*A, "--n_head", "0", "--out_dir", "new"], "n_head must be at least 1"),
    ([*A, "--n_embd", "0", "--out_dir", "new"], "n_embd must be at least 1"),
    ([*A, "--n_layer", "0", "--out_dir", "new"], "n_layer must be at least 1"),
    ([*A, "--n_layer", "-2", "--out_dir", "new"], "n_layer must be at least 1"),
    ([*A, "--dropout", "1", "--out_dir", "new"], "dropout must be in [0, 1)"),
    ([*A, "--dropout", "-0.1", "--out_dir", "new"], "dropout must be in [0, 1)"),
    ([*A, "--learning_rate=-1e-3", "--out_dir", "new"], "--learning_rate -0.001 must be a positive number"),
    ([*A, "--learning_rate", "nan", "--out_dir", "new"], "--learning_rate nan must be a positive number"),
    ([*A, "--learning_rate", "0", "--out_dir", "new"], "--learning_rate 0.0 must be a positive number"),
    ([*A, "--batch_size", "0", "--out_dir", "new"], "--batch_size 0 must be at least 1"),
    ([*A, "--eval_iters", "0", "--out_dir", "new"], "--eval_iters 0 must be at least 1"),
    ([*A, "--eval_interval", "-5", "--out_dir", "new"], "--eval_interval -5 must be at least 1"),
    ([*A, "--beta2", "1", "--out_dir", "new"], "--beta2 1.0 must be in [0, 1)"),
    ([*A, "--min_lr=-1", "--out_dir", "new"], "--min_lr -1.0 must be >= 0"),
    (["train.py", "--dataset", "c4", "--data_dir", "short", *TINY[:6], "--out_dir", "new"],
     "the validation split in short has at most 100 tokens in a shard, fewer than the block size 256"),
    (["train.py", "--dataset", "c4", "--data_dir", "nowhere", "--out_dir", "new"],
     "no train shards (*.bin) in nowhere: point --data_dir at them, or make them with  python prepare_data.py"),
    (["train.py", "--dataset", "c4", "--data_dir", "nowhere", "--out_dir", "new"],
     "for files you have); or train offline with --dataset assign"),
    ([*A, "--out_dir", "a_file"], "--out_dir a_file is a file"),
    ([*A, "--out_dir", "a_file/run"], "--out_dir a_file/run: cannot create this directory (Not a directory)"),
    ([*A, "--device", "cuda", "--out_dir", "new"], "--device cuda: no such device here; this machine has: cpu"),
    ([*A, "--device", "mps", "--out_dir", "new"], "--device mps: no such device here"),
    ([*A, "--device", "foo", "--out_dir", "new"], "--device foo: no such device here"),
    ([*A, "--out_dir", "run"], "--out_dir run holds a run already"),
    (["train.py", "--resume", "--out_dir", "truncated"],
     "truncated/ckpt.pt is damaged or not a train.py checkpoint"),
    (["train.py", "--resume", "--out_dir", "garbage"], "garbage/ckpt_best.pt loads (iteration 30): use it instead"),
    (["train.py", "--resume", "--out_dir", "both_damaged"], "both_damaged/ckpt_best.pt is damaged too"),
    (["train.py", "--resume", "--out_dir", "nowhere"], "no checkpoint at nowhere/ckpt.pt"),
    (["train.py", "--resume", "--overwrite", "--out_dir", "run"], "give one of them"),
    (["train.py", "--resume", "--dataset", "c4", "--out_dir", "run"], "a different model: --dataset assign -> c4"),
    ([*A, "--vocab_size", "10", "--out_dir", "new"], "smaller than the 99 tokens"),
    ([*A, "--dtype", "float16", "--out_dir", "new"], "float16 is not supported on the CPU"),
    ([*A, "--lr", "1000", "--out_dir", "new"], "unrecognized arguments: --lr 1000"),  # not --lr_decay_iters
    ([*A, "--init_std", "-1", "--out_dir", "new"], "--init_std -1.0 must be a positive number"),
    ([*A, "--init_std", "wide", "--out_dir", "new"], "--init_std wide must be a positive number, or width"),
    ([*A, "--selective", "--attention", "tiled", "--dropout", "0.1", "--out_dir", "run", "--overwrite"],
     "attention 'tiled' has no dropout"),
    ([*A, "--selective", "--attention", "reference", "--dropout", "0.1", "--out_dir", "new"],
     "attention 'reference' has no dropout"),
    ([*A, "--attention", "mask", "--out_dir", "new"], "--attention mask picks how selective attention is computed"),
    ([*A, "--memory_tau", "2", "--out_dir", "new"], "--memory_tau shapes the memory loss, which is off"),
    ([*A, "--data_dir", "prepared", "--out_dir", "new"], "--data_dir is for --dataset c4"),
    ([*A, "--min_lr", "0.01", "--out_dir", "new"], "--min_lr 0.01 is above --learning_rate 0.001"),
    ([*A, "--seed", str(2 ** 64), "--out_dir", "new"], f"--seed {2 ** 64} must be in 0 .. 2**63 - 1"),
    ([*A, "--data_seed", "-1", "--out_dir", "new"], "--data_seed -1 must be in 0 .. 2**63 - 1"),
    # --resume keeps the run's settings: the optimiser's state and the RNG come from the checkpoint
    (["train.py", "--resume", "--weight_decay", "0", "--out_dir", "run"], "--weight_decay 0.1 -> 0.0 would change it"),
    (["train.py", "--resume", "--seed", "7", "--learning_rate", "3e-3", "--out_dir", "run"], "--seed 1337 -> 7 would"),
    (["train.py", "--resume", "--learning_rate", "1e-3", "--out_dir", "run"], "--learning_rate 0.003 -> 0.001 would"),
    (["train.py", "--resume", "--eval_iters", "5", "--out_dir", "run"], "--eval_iters 2 -> 5 would change it"),
    *([([*A, "--out_dir", "/sys"], "--out_dir /sys: cannot write in this directory")]
      if sys.platform.startswith("linux") else []),
    # sample.py
    ([*S, "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    ([*S, "--top_k", "0"], "--top_k 0 must be at least 1"),
    ([*S, "--top_k", "-3"], "--top_k -3 must be at least 1"),
    ([*S, "--num_samples", "0"], "--num_samples 0 must be at least 1"),
    ([*S, "--max_new_tokens", "0"], "--max_new_tokens 0 must be at least 1"),
    ([*S, "--max_new_tokens", "-5"], "--max_new_tokens -5 must be at least 1"),
    ([*S, "--budget", "4"], "--budget is for --prune or --eval_ppl or --explain, not generation"),
    ([*S, "--budgets", "4,4"], "--budgets is for --prune or --eval_ppl or --explain, not generation"),
    ([*S, "--prune", "--budgets", "8.5,4"], "--budgets 8.5,4: give whole numbers"),
    ([*S, "--prune", "--budget", "1"], "--budget 1 must be at least 2"),
    ([*S, "--prune", "--budgets", "4,4,4"], "3 budgets for 2 layers"),
    ([*S, "--budget", "3", "--budgets", "3,3", "--prune"], "not both"),
    ([*S, "--prune"], "need --budget"),
    ([*S, "--start", "hello"], "no token 'hello'"),
    ([*S, "--start", "FILE:missing.txt"], "--start FILE:missing.txt: no such file"),
    ([*S, "--start", "FILE:folder"], "--start FILE:folder is a directory"),
    ([*S, "--start", "FILE:latin1.txt"], "--start FILE:latin1.txt is not UTF-8"),
    ([*S, "--eval_ppl", "--budget", "4", "--eval_iters", "0"], "--eval_iters 0 must be at least 1"),
    ([*S, "--eval_ppl", "--budget", "4", "--batch_size", "0"], "--batch_size 0 must be at least 1"),
    ([*S, "--device", "foo"], "--device foo: no such device here"),
    ([*S, "--temp", "0"], "unrecognized arguments: --temp 0"),
    ([*S, "--eval_iters", "3"], "--eval_iters is for --eval_ppl or --find_budgets, not generation"),
    # flags are taken whole, not abbreviated
    ([*S, "--eval_ppl", "--budget", "4", "--target_ppl", "2"], "--target_ppl is for --find_budgets, not --eval_ppl"),
    ([*S, "--shrink", "0.5"], "--shrink is for --find_budgets, not generation: nothing here would use it"),
    ([*S, "--explain", "--tolerance", "0.01"], "--tolerance is for --find_budgets, not --explain"),  # the default
    ([*S, "--eval_ppl", "--budget", "4", "--top_k", "3"], "--top_k is for generation or --prune, not --eval_ppl"),
    ([*S, "--find_budgets", "--start", "a=1"], "--start is for generation or --prune or --explain, not --find"),
    ([*S, "--find_budgets", "--target_ppl", "2", "--tolerance", "0.1"], "--target_ppl and --tolerance both set"),
    ([*S, "--prune", "--budget", "4", "--explain"], "--prune and --explain are different jobs"),
    ([*S, "--eval_ppl", "--find_budgets"], "--eval_ppl and --find_budgets are different jobs"),
    ([*S, "--eval_ppl", "--budget", "4", "--data_dir", "prepared"], "--data_dir: run trained on --dataset assign"),
    ([*S, "--explain_png", "x.png"], "--explain_png is for --explain, not generation"),
    ([*S, "--explain", "--explain_png", "nowhere/x.png"], "--explain_png nowhere/x.png: its folder does not exist"),
    ([*S, "--explain", "--explain_png", "folder"], "--explain_png folder is a directory"),
    ([*S, "--explain", "--explain_png", "notes.txt"], "--explain_png notes.txt: the file exists"),
    (["sample.py", "--out_dir", "searched", "--find_budgets"], "searched/budgets.json holds an earlier search"),
    ([*S, "--overwrite"], "--overwrite is for --find_budgets or --explain, not generation"),
    ([*S, "--explain", "--overwrite"], "--overwrite replaces --explain_png's file: give --explain_png"),
    ([*S, "--seed", "-1"], "--seed -1 must be in 0 .. 2**63 - 1"),
    ([*A, "--out_dir", ""], "--out_dir is empty"),
    ([*S, "--explain", "--start", "a=1 " * 30], "--explain: the prompt has 31 tokens with BOS, more than block_size"),
    (["sample.py", "--out_dir", "truncated"], "truncated/ckpt.pt is damaged"),
    (["sample.py", "--out_dir", "garbage"], "garbage/ckpt_best.pt loads (iteration 30): use it instead"),
    (["sample.py", "--out_dir", "nowhere"], "no checkpoint at nowhere/ckpt.pt"),
    (["sample.py"], "no --out_dir given, and neither out-c4 nor out-assign holds one"),
    # prepare_data.py
    (["prepare_data.py", "--local", "notes.txt", "--data_dir", "new", "--val_fraction", "0"],
     "--val_fraction 0.0 must be between 0 and 1"),
    (["prepare_data.py", "--local", "notes.txt", "--data_dir", "new", "--val_fraction", "1.5"],
     "--val_fraction 1.5 must be between 0 and 1"),
    (["prepare_data.py", "--local", "notes.txt", "--data_dir", "prepared", "--val_fraction", "0.2"],
     "--data_dir prepared holds shards made with val_fraction 0.01"),
    (["prepare_data.py", "--local", "bad.json.gz", "--data_dir", "new"], "bad.json.gz is truncated or corrupt"),
    (["prepare_data.py", "--local", "notext.jsonl", "--data_dir", "new"], "notext.jsonl is truncated or corrupt"),
    (["prepare_data.py", "--local", "notjson.jsonl", "--data_dir", "new"], "notjson.jsonl is truncated or corrupt"),
    (["prepare_data.py", "--local", "notobject.jsonl", "--data_dir", "new"],
     "line 2 is not a JSON object with a string field 'text'"),
    (["prepare_data.py", "--local", "nulltext.jsonl", "--data_dir", "new"],
     "line 1 is not a JSON object with a string field 'text'"),
    (["prepare_data.py", "--local", "nothing_here", "--data_dir", "new"], "no .json.gz, .jsonl or .txt files"),
    (["prepare_data.py", "--local", "notes.txt", "--data_dir", "damaged_settings"],
     "--data_dir damaged_settings: its prepare.json is damaged"),
    (["prepare_data.py", "--local", "notes.txt", "--data_dir", "listed_settings"],
     "--data_dir listed_settings: its prepare.json is damaged"),
    (["prepare_data.py", "--local", "notes.txt", "--data_dir", "new", "--train_shards", "2", "--keep_downloads"],
     "--train_shards, --keep_downloads: for downloads, not --local"),
    (["prepare_data.py", "--local", "with_validation", "--data_dir", "new", "--val_fraction", "0.1"],
     "--val_fraction: with_validation has a validation file, so nothing is held out"),
    (["prepare_data.py", "--data_dir", "new", "--val_fraction", "0.1"], "--val_fraction is for --local files"),
    (["prepare_data.py", "--base_url", "http://127.0.0.1:9/", "--revision", "main", "--data_dir", "new"],
     "--revision picks the hub's commit, --base_url a server with its own files"),
    (["prepare_data.py", "--local", "notes.txt", "--data_dir", "a_file"], "--data_dir a_file is a file"),
    (["prepare_data.py", "--local", "notes.txt", "--data_dir", "a_file/d"],
     "--data_dir a_file/d: cannot create this directory (Not a directory)"),
    # experiments.py
    (["experiments.py", "--quick", "--only", "assign", "--out_dir", "a_file/x"],
     "--out_dir a_file/x: cannot create this directory"),
    (["experiments.py", "--quick", "--only", "assign", "--out_dir", "new_runs", "--assets", "a_file/y"],
     "--assets a_file/y: cannot create this directory"),
    # bench.py: refused before any benchmark runs, and no results file overwritten
    (["bench.py", "kernels", "--repeats", "0"], "--repeats: 0: at least 1"),
    (["bench.py", "kernels", "--blocks", "512"], "--blocks sets the training steps' block sizes: give it with speed"),
    (["bench.py", "steps", "--blocks", "1,x"], "--blocks: 1,x: block sizes of at least 2, separated by commas"),
    (["bench.py", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["bench.py", "compile", "--js", "out.json"], "unrecognized arguments: --js out.json"),
    *([(["bench.py", "--device", "cuda"], "--device cuda: this PyTorch sees no CUDA GPU")]
      if not torch.cuda.is_available() else []),  # with a GPU it would run the whole benchmark
    (["bench.py", "compile", "--json", "notes.txt"], "--json notes.txt: the file exists"),
    (["bench.py", "compile", "--json", "nowhere/out.json"], "--json nowhere/out.json: its directory does not exist"),
    *([(["bench.py", "compile", "--json", "/sys/out.json"], "--json /sys: cannot write in this directory"),
       (["prepare_data.py", "--local", "notes.txt", "--data_dir", "/sys"], "--data_dir /sys: cannot write in this"),
       ([*S, "--explain", "--explain_png", "/sys/F.png"], "--explain_png /sys: cannot write in this directory"),
       (["sample.py", "--out_dir", "/sys", "--find_budgets"], "--out_dir /sys: cannot write in this directory")]
      if sys.platform.startswith("linux") else []),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a[1:])[-60:] for a, _ in BAD_INPUTS])
def test_bad_input_is_refused_clearly_and_changes_nothing(workspace, argv, message):
    before = snapshot(workspace)
    code, text = run_main(*argv, cwd=workspace)
    assert code not in (0, 130) and message in text, text
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) <= 3, text  # a short paragraph, not the usage
    after = snapshot(workspace)
    assert after == before, set(after) ^ set(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in reaches train.py by run_main's fork")
def test_an_attention_path_this_device_cannot_run_is_refused_before_a_run_is_overwritten(workspace, monkeypatch):
    monkeypatch.setattr(kernels, "why_not_tiled",
                        lambda q, dropout_p=0.0: "triton is not installed (pip install triton)")  # a GPU without it
    before = snapshot(workspace)
    code, text = run_main(*A, "--selective", "--attention", "tiled", "--out_dir", "run", "--overwrite", cwd=workspace)
    assert code not in (0, 130) and "--attention tiled: attention='tiled' cannot run here (triton" in text, text
    assert "Traceback" not in text and snapshot(workspace) == before


def test_bad_input_corrupt_local_file_does_not_say_delete(workspace):
    code, text = run_script(os.path.join(HERE, "prepare_data.py"), "--local", "bad.json.gz", "--data_dir", "new2",
                            cwd=workspace)
    assert code != 0 and "Delete it" not in text and "Check the file" in text


def test_offline_without_the_bpe_files_says_what_to_do(workspace):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(workspace / "empty_cache"), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", NO_PROXY="")
    code, text = run_script(os.path.join(HERE, "prepare_data.py"), "--local", "notes.txt", "--data_dir", "offline",
                            cwd=workspace, env=env, timeout=120)
    assert code != 0 and "Traceback" not in text and "TIKTOKEN_CACHE_DIR" in text, text


# ---------------------------------------------------------------------------------------------------------------
# Slow: minutes each. python -m pytest -m slow

@pytest.mark.slow
def test_quick_start_learns_the_assign_task(tmp_path):
    """The README's main job, shortened: the selective model answers almost every query after 600 steps, and its
    layer 0 masks what the README's figure shows."""
    code, text = run_script("train.py", "--dataset", "assign", "--selective", "--max_iters", "600",
                            "--eval_interval", "300", "--out_dir", str(tmp_path / "run"), timeout=1800)
    assert code == 0, text
    assert [r for r in log_records(tmp_path / "run") if "val_accuracy" in r][-1]["val_accuracy"] > 0.9
    ckpt = common.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    # Each assignment that supersedes one of its variable (a=7 a=3, b=5 b=1, a=2 a=7) votes to mask it (S, the step
    # of F down the queries, SPEC §1.3) more than twice as hard as any other variable's assignment. (F alone would
    # not tell: older keys gather more of it in any model, an untrained one too.)
    words = "a=3 b=1 a=7 c=2 a? 7 b=5 d=4 b? 5 a=2 a?".split()
    F = model.selective_masks(torch.tensor([[0] + common.assign_encode(" ".join(words))]))[0][0][0]
    for k, j in ((3, 1), (7, 2), (11, 3)):  # positions, BOS at 0
        votes = F[k + 1] - F[k]  # S[k, :]
        others = [i for i in range(1, k) if "=" in words[i - 1] and words[i - 1][0] != words[k - 1][0]]
        assert votes[j] > max(1.0, 2 * votes[others].max()), (words[k - 1], votes)


@pytest.mark.slow
def test_experiments_quick(tmp_path):
    data = str(tmp_path / "c4")
    prepare_data.main(["--local", make_c4_files(str(tmp_path / "en"), train_shards=2, docs=60), "--data_dir", data])
    code, text = run_script("experiments.py", "--quick", "--data_dir", data, "--out_dir", str(tmp_path / "runs"),
                            timeout=3000)
    assert code == 0, text
    results = json.load(open(tmp_path / "runs" / "assets" / "results.json"))
    assert {"heads", "heads_width", "ablations", "assign", "pruning", "tiles", "recipe", "init", "guard",
            "commit", "machine"} <= results.keys()
    assert len(results["heads"]["rows"]) == 2 and len(results["pruning"]) == 2
    assert (results["heads"]["init_std"], results["heads_width"]["init_std"]) == (0.02, "width")
    assert [(r["recipe"], r["init"]) for r in results["recipe"]["confirmation"]] == [
        ("train_py", "nanogpt"), ("train_py", "width"), ("plain", "width")]
    held_out = results["pruning"][0]["held_out"]  # other batches than the searches': other perplexities
    assert held_out["standard_ppl"] != results["pruning"][0]["standard_ppl"] and "unpruned_ppl" in held_out
    assert [len(r["layers"]) for r in results["tiles"]["rows"]] == [2, 2]  # memory loss 0 and 0.1, 2 layers each
    assert all(0 <= share <= 1 for r in results["tiles"]["rows"] for layer in r["layers"] for share in layer.values())
    guard = results["guard"]  # the verdict written is the one its logged accuracies give
    assert guard["holds"] is experiments.assign_guard_holds(guard["row"], guard["settings"])
    assert len(guard["row"]["sel"]["values"]) == 2
    assert [(r["loop"], r["init"]) for r in results["init"]["rows"]][:2] == [("assign", "nanogpt"), ("assign", "width")]
    assert len(results["init"]["rows"]) == 7 and set(results["init"]["rows"][0]["sel_early"]) == {"10", "20"}
    check = results["heads"]["rate_check"]  # the standard model at a larger rate; both variants there if it wins
    assert set(check["val_loss"]) == {"0.001", "0.002", "0.004"} and ("gap" in check) == (check["best"] != 0.002)
    variants = [r["variant"] for r in results["ablations"]["rows"]]
    assert variants == ["standard", "selective", "selective_mask", "mask_bos", "mask_self"]
    assert "| n_head |" in (tmp_path / "runs" / "assets" / "results.md").read_text()
    assert "Rate check" in (tmp_path / "runs" / "assets" / "results.md").read_text()
    # a rerun finds every run finished (none trains again) and refuses a run made with other settings
    code, text = run_script("experiments.py", "--quick", "--only", "heads", "--data_dir", data, "--out_dir",
                            str(tmp_path / "runs"), timeout=600)
    assert code == 0 and "done in" not in text and "finished already" in text, text


@pytest.mark.slow
def test_ddp_resume_continues_exactly(tmp_path):
    """Two processes with dropout, cut at a checkpoint and resumed: each process gets its own generator state back
    (the checkpoint gathers them), so the steps after the resume are the uninterrupted run's."""
    ddp = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    flags = ["--dataset", "assign", "--selective", *TINY, "--dropout", "0.1", "--grad_accum", "2", "--device", "cpu",
             "--eval_interval", "3", "--lr_decay_iters", "6"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    assert run_script(*ddp, *flags, "--max_iters", "6", "--out_dir", whole)[0] == 0
    assert run_script(*ddp, *flags, "--max_iters", "3", "--out_dir", part)[0] == 0
    code, text = run_script(*ddp, "--resume", "--max_iters", "6", "--device", "cpu", "--out_dir", part)
    assert code == 0, text
    assert step_losses(part) == step_losses(whole) and len(step_losses(whole)) == 6
