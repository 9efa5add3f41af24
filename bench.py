"""
Speed and memory benchmarks. Every ratio is measured side by side in one run, alternating the contenders, so that
machine noise hits both alike: quote the ratios, not the times.

    python bench.py                  # training step, selective / standard, block 256, 512, 1024, fp32 and bf16;
                                     # decoding at contexts 1024 and 4096, batch 1 and 8, budgets none, 256, 64
    python bench.py kernels          # attention alone, forward + backward, T = 512 .. 8192 (memory to 16384):
                                     # standard flash SDPA, selective through an SDPA float mask ('mask'), the
                                     # tiled kernels.py path
    python bench.py --json out.json  # also save the numbers

Peak memory: on CUDA torch.cuda.max_memory_allocated; on the CPU (Linux) how far the process's peak resident set
rises during the measured work, each case in a fresh subprocess.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from torch.nn import functional as nnf

from selective_gpt import GPT, GPTConfig, selective_attention

MODEL = dict(n_layer=4, n_head=8, n_embd=256, vocab_size=50304, bias=False)  # the small model of the experiments


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def memory_status(field):
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def side_by_side(fns, device, repeats):
    """Seconds of each fn in every alternation, after one warm-up each: {name: [seconds, ...]}."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def ratios(times, name, base):
    """name's time over base's in each alternation: the median and the spread (min, max) of these is the figure."""
    return [a / b for a, b in zip(times[name], times[base])]


def spread(values):
    return f"{statistics.median(values):5.3f} [{min(values):.3f}-{max(values):.3f}]"


def peak_memory(case, device):
    """Peak bytes the case's work needs beyond what exists before it starts."""
    if device == "cuda":
        fn = make_case(case, device)
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # a fixed mmap threshold: glibc then returns every freed block of 64 KiB or more at once, so the resident set
    # follows the live tensors (its default threshold adapts and keeps freed blocks, hiding reuse)
    out = subprocess.run([sys.executable, __file__, "_memory", json.dumps(case)], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
                                  MALLOC_MMAP_THRESHOLD_="65536"))
    if out.returncode != 0:
        return None  # out of memory, or the case cannot run: reported as such
    return int(out.stdout.split()[-1])


def measure_memory_here(case):
    """Subprocess side of peak_memory on the CPU: set up and run the work once (lazy imports and threads start), reset
    the peak resident set (Linux's clear_refs), run it again, report how far the peak rose above where it started."""
    fn = make_case(case, "cpu")
    fn()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = memory_status("VmRSS")
    fn()
    print(memory_status("VmHWM") - before)


def make_case(case, device):
    """A closure that runs one benchmark case once: a training step, or attention forward + backward."""
    if case["kind"] == "step":
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=case["T"], selective=case["selective"], attention=case.get("path", "auto"),
                              **MODEL)).to(device)
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, 50257, (case["B"], case["T"]), generator=g).to(device) for _ in range(2))
        ctx = torch.autocast(device, dtype=torch.bfloat16) if case["dtype"] == "bf16" else contextlib.nullcontext()

        def step():
            with ctx:
                _, loss = model(x, targets=y)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step
    g = torch.Generator().manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]
    shape = (case["B"], case["H"], case["T"], case["D"])
    q, k, v, dy = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(4))

    def attention():
        if case["path"] == "standard":
            y = nnf.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = selective_attention(q, k, v, attention=case["path"])
        y.backward(dy)
        q.grad = k.grad = v.grad = None
    return attention


def fmt_mem(b):
    return "  n/a " if b is None else f"{b / 2**20:7.1f}"


def ratio(a, b):
    return "  n/a" if a is None or b is None or b == 0 else f"{a / b:5.3f}"


def bench_steps(device, repeats, results):
    print(f"\nTraining step (forward + backward), model {MODEL}, batch 8. Ratios to standard, median of {repeats} "
          f"alternations [min-max]: selective (default path), and selective through the SDPA float mask ('mask'):")
    print(f"{'block':>6} {'dtype':>5} | {'standard s':>10} {'selective x [spread]':>21} {'mask x [spread]':>21} | "
          f"{'std MiB':>8} {'sel mem x':>9} {'mask mem x':>10}")
    for T in (256, 512, 1024):
        for dtype in ("fp32", "bf16"):
            step = {"kind": "step", "T": T, "B": 8, "dtype": dtype}
            cases = {"standard": dict(step, selective=False), "selective": dict(step, selective=True),
                     "mask": dict(step, selective=True, path="mask")}
            times = side_by_side({k: make_case(c, device) for k, c in cases.items()}, device, repeats)
            mem = {k: peak_memory(c, device) for k, c in cases.items()}
            sel, mask = ratios(times, "selective", "standard"), ratios(times, "mask", "standard")
            print(f"{T:>6} {dtype:>5} | {statistics.median(times['standard']):10.3f} {spread(sel):>21} "
                  f"{spread(mask):>21} | {fmt_mem(mem['standard']):>8} {ratio(mem['selective'], mem['standard']):>9} "
                  f"{ratio(mem['mask'], mem['standard']):>10}")
            results.append({"bench": "step", "block_size": T, "dtype": dtype, "seconds": times, "peak_bytes": mem,
                            "time_ratio": statistics.median(sel), "time_ratio_spread": [min(sel), max(sel)]})


def bench_decoding(device, repeats, results):
    """Tokens/s of decoding one token at a time after a prompt of `context` tokens, with each layer's buffer unpruned
    (every key) or pruned to a budget (§4); budgets alternate, segment by segment, each continuing its own state."""
    segment = 16
    print(f"\nDecoding (KV cache), selective model {MODEL}, fp32: after a prompt of `context` tokens, {repeats} "
          f"alternating segments of {segment} tokens per budget; tokens/s is their median:")
    print(f"{'context':>7} {'batch':>5} {'budget':>6} | {'tokens/s':>9} {'keys/layer':>10} {'KV MiB':>7} | "
          f"{'speed x [spread]':>21} {'KV x':>6}")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=4096 + 2 * repeats * segment, selective=True, **MODEL)).to(device).eval()
    g = torch.Generator().manual_seed(0)
    for context in (1024, 4096):
        for batch in (1, 8):
            prompt = torch.randint(0, 50257, (batch, context), generator=g).to(device)
            budgets = {"none": None, "256": 256, "64": 64}
            states = {name: model.prefill(prompt, b)[1] for name, b in budgets.items()}
            nxt = prompt[:, -1:]

            def decode(name):
                return lambda: [model.decode(nxt, states[name]) for _ in range(segment)]
            times = side_by_side({name: decode(name) for name in budgets}, device, repeats)
            base = {name: kv_stats(states[name]) for name in budgets}
            for name in budgets:
                speed = [segment / t for t in times[name]]
                gain = ratios({k: [1 / t for t in v] for k, v in times.items()}, name, "none")
                keys, kv_bytes = base[name]
                print(f"{context:>7} {batch:>5} {name:>6} | {statistics.median(speed):9.1f} {keys:>10} "
                      f"{kv_bytes / 2**20:7.1f} | {spread(gain):>21} {base['none'][1] / kv_bytes:6.1f}")
                results.append({"bench": "decode", "context": context, "batch": batch, "budget": budgets[name],
                                "tokens_per_s": statistics.median(speed), "speedup": statistics.median(gain),
                                "speedup_spread": [min(gain), max(gain)], "keys_per_layer": keys,
                                "kv_cache_bytes": kv_bytes})


def kv_stats(state):
    """The most keys a layer holds now, and the bytes of every layer's key, value (and mask) storage."""
    keys = max(buffer.n for buffer in state["layers"])
    size = sum(t.numel() * t.element_size() for buffer in state["layers"]
               for t in (buffer.k, buffer.v, buffer.f, buffer.pos) if t is not None)
    return keys, size


def bench_kernels(device, dtype, repeats, results):
    B, H, D = 4, 8, 64
    paths = ["standard", "mask", "tiled"]
    print(f"\nAttention forward + backward, B={B} H={H} d={D} {dtype} on {device}; ratios to standard causal SDPA, "
          f"median of {repeats} alternations (T > 2048: 3) [min-max]; T = 16384: memory only:")
    print(f"{'T':>5} | {'standard ms':>11} {'mask x':>8} {'tiled x [spread]':>21} | {'std MiB':>8} {'mask mem x':>10} "
          f"{'tiled mem x':>11}")
    for T in (512, 1024, 2048, 4096, 8192, 16384):
        cases = {p: {"kind": "attention", "path": p, "B": B, "H": H, "T": T, "D": D, "dtype": dtype} for p in paths}
        # the float-mask path keeps H x T x T float32 tensors in its backward: skip it where they would not fit
        if device == "cpu" and 4 * B * H * T * T * 4 > 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
            del cases["mask"]
        mem = {p: peak_memory(c, device) for p, c in cases.items()}
        row = {"bench": "attention", "T": T, "B": B, "H": H, "D": D, "dtype": dtype, "device": device,
               "peak_bytes": mem}
        if T <= 8192:
            times = side_by_side({p: make_case(c, device) for p, c in cases.items()}, device,
                                 repeats if T <= 2048 else 3)
            tiled = ratios(times, "tiled", "standard")
            mask = f"{statistics.median(ratios(times, 'mask', 'standard')):8.3f}" if "mask" in times else "     n/a"
            timing = f"{statistics.median(times['standard']) * 1000:11.1f} {mask} {spread(tiled):>21}"
            row |= {"seconds": times, "time_ratio": statistics.median(tiled), "time_ratio_spread": [min(tiled),
                                                                                                   max(tiled)]}
        else:
            timing = f"{'-':>11} {'-':>8} {'-':>21}"
        print(f"{T:>5} | {timing} | {fmt_mem(mem['standard']):>8} {ratio(mem.get('mask'), mem['standard']):>10} "
              f"{ratio(mem['tiled'], mem['standard']):>11}")
        results.append(row)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "_memory":
        return measure_memory_here(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    parser.add_argument("what", nargs="?", choices=["speed", "kernels"], default="speed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed alternations per case (the median counts)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    started = time.time()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"bench.py {args.what} on {args.device} ({device_name}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, tiled path: {'Triton' if args.device == 'cuda' else 'CPU query chunks'}")
    results = []
    if args.what == "speed":
        bench_steps(args.device, args.repeats, results)
        bench_decoding(args.device, args.repeats, results)
    else:
        for dtype in (["bf16"] if args.device == "cuda" else ["fp32", "bf16"]):
            bench_kernels(args.device, dtype, args.repeats, results)
    print(f"\n{time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": args.what, "device": args.device, "device_name": device_name,
                       "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
