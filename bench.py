"""
Speed and memory benchmarks. Every ratio is measured side by side in one run, alternating the contenders, so that
machine noise hits both alike: quote the ratios, not the times.

    python bench.py                  # training step, selective / standard, block 256, 512, 1024, fp32 and bf16;
                                     # decoding at contexts 1024, 4096, 8192, batch 1 and 8, budgets none, 256, 64
    python bench.py steps --blocks 1024 --repeats 7   # the training steps alone (or: decode, the decoding alone)
    python bench.py kernels          # attention alone, forward + backward, T = 512 .. 8192 (memory to 16384):
                                     # standard flash SDPA, selective through an SDPA float mask ('mask'), the
                                     # tiled kernels.py path
    python bench.py compile          # the Triton kernels compiled for sm_90 (H100/H200) here, without a GPU: shared
                                     # memory, registers, spills and SASS instructions per loop trip and per 64 x 64
                                     # tile, for every autotuning candidate, the column-sum pre-pass and D's kernel
    python bench.py gpu              # the GPU check (CUDA): the Triton kernel against the reference in fp32, bf16,
                                     # fp16; time and memory against flash causal SDPA at T = 1k, 4k, 16k (autotuned,
                                     # the picks checked and printed); a 12-layer, 768-wide training step at block
                                     # 1024, selective / standard
    python bench.py --json out.json  # also save the numbers

Peak memory: on CUDA torch.cuda.max_memory_allocated; on the CPU (Linux) how far the process's peak resident set
rises during the measured work, each case in a fresh subprocess.
"""

import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import math
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from torch.nn import functional as nnf

from common import ArgumentParser, cpu_has_native_bf16, make_dir, write_json
from selective_gpt import GPT, GPTConfig, attention_path, selective_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL = dict(n_layer=4, n_head=8, n_embd=256, vocab_size=50304, bias=False)  # the small model of the experiments


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def memory_status(field):
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def timed(fn, device, calls=1):
    """Seconds per call of fn, over `calls` calls in a row."""
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t) / calls


def side_by_side(fns, device, repeats, calibrate=True):
    """Seconds per call of each fn in every alternation, after one warm-up each: {name: [seconds, ...]}. The order
    reverses every other alternation, so that no fn always follows the same one (what it freed, what it cached).
    calibrate: on a GPU a sample repeats each fn until the fastest takes 20 ms, as one call of a short kernel would
    time its launches (the CPU's cases take longer than that: one call); False for fns that must run once a sample."""
    for fn in fns.values():
        fn()
    calibrated = calibrate and device == "cuda"
    calls = max(1, math.ceil(0.02 / min(timed(fn, device) for fn in fns.values()))) if calibrated else 1
    times = {name: [] for name in fns}
    order = list(fns.items())
    for i in range(repeats):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            times[name].append(timed(fn, device, calls))
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
                              **case.get("model", MODEL))).to(device)
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
    dtype = DTYPES[case["dtype"]]
    shape = (case["B"], case["H"], case["T"], case["D"])
    q, k, v, dy = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

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


def bench_steps(device, repeats, results, blocks=(256, 512, 1024)):
    print(f"\nTraining step (forward + backward), model {MODEL}, batch 8. Ratios to standard, median of {repeats} "
          f"alternations [min-max]: selective (default path), and selective through the SDPA float mask ('mask'):")
    print(f"{'block':>6} {'dtype':>5} | {'standard s':>10} {'selective x [spread]':>21} {'mask x [spread]':>21} | "
          f"{'std MiB':>8} {'sel mem x':>9} {'mask mem x':>10}")
    for T in blocks:
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
    model = GPT(GPTConfig(block_size=8192 + 2 * repeats * segment, selective=True, **MODEL)).to(device).eval()
    g = torch.Generator().manual_seed(0)
    for context in (1024, 4096, 8192):
        for batch in (1, 8):
            prompt = torch.randint(0, 50257, (batch, context), generator=g).to(device)
            budgets = {"none": None, "256": 256, "64": 64}
            states = {name: model.prefill(prompt, b)[1] for name, b in budgets.items()}
            nxt = prompt[:, -1:]

            def decode(name):
                return lambda: [model.decode(nxt, states[name]) for _ in range(segment)]
            # one segment a call: the model's block_size leaves room for repeats segments, not more
            times = side_by_side({name: decode(name) for name in budgets}, device, repeats, calibrate=False)
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
    """The most keys a layer holds now, and the bytes of every layer's keys, values, positions and masks in use (an
    unpruned buffer's slots beyond its keys are allocated but not counted)."""
    keys = max(buffer.n for buffer in state["layers"])
    size = sum(t[..., :buffer.n, :].numel() * t.element_size() if t.dim() == 4 else
               t[:, :buffer.n].numel() * t.element_size()
               for buffer in state["layers"] for t in (buffer.k, buffer.v, buffer.f, buffer.pos) if t is not None)
    return keys, size


def bench_kernels(device, dtype, repeats, results, Ts=(512, 1024, 2048, 4096, 8192, 16384), timed_up_to=8192):
    B, H, D = 4, 8, 64
    paths = ["standard", "mask", "tiled"]
    print(f"\nAttention forward + backward, B={B} H={H} d={D} {dtype} on {device}; ratios to standard causal SDPA, "
          f"median of {repeats} alternations (T > 2048: 3) [min-max]; T = 16384: memory only:")
    print(f"{'T':>5} | {'standard ms':>11} {'mask x':>8} {'tiled x [spread]':>21} | {'std MiB':>8} {'mask mem x':>10} "
          f"{'tiled mem x':>11}")
    memory = (torch.cuda.get_device_properties(0).total_memory if device == "cuda"
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for T in Ts:
        cases = {p: {"kind": "attention", "path": p, "B": B, "H": H, "T": T, "D": D, "dtype": dtype} for p in paths}
        # the float-mask path keeps H x T x T float32 tensors in its backward: skip it where they would not fit
        if 4 * B * H * T * T * 4 > 0.25 * memory:
            del cases["mask"]
        mem = {p: peak_memory(c, device) for p, c in cases.items()}
        row = {"bench": "attention", "T": T, "B": B, "H": H, "D": D, "dtype": dtype, "device": device,
               "peak_bytes": mem}
        if T <= timed_up_to:
            times = side_by_side({p: make_case(c, device) for p, c in cases.items()}, device,
                                 repeats if T <= 2048 or device == "cuda" else 3)
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


def bench_gpu(repeats, results):
    """The GPU check, one script (a few minutes on an H100): the Triton kernel against the reference on CUDA, then
    its time and memory against flash attention, then a GPT-2-small-sized training step."""
    import kernels
    if not torch.cuda.is_available():
        raise SystemExit("bench.py gpu: needs a CUDA GPU, and torch sees none")
    if kernels.triton is None:
        raise SystemExit(f"bench.py gpu: {kernels.WHY_NO_TRITON}")
    failures = check_triton("cuda", results)
    bench_kernels("cuda", "bf16", repeats, results, Ts=(1024, 4096, 16384), timed_up_to=16384)  # autotunes
    model = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, bias=False)
    heads = torch.empty(1, model["n_head"], 1, model["n_embd"] // model["n_head"], device="cuda", dtype=torch.bfloat16)
    path = attention_path("auto", heads)
    print(f"\nTraining step, bf16 autocast, {model}, block 1024, batch 8, median of {repeats} alternations [min-max]:")
    step = {"kind": "step", "T": 1024, "B": 8, "dtype": "bf16", "model": model}
    cases = {"standard": dict(step, selective=False), "selective": dict(step, selective=True),
             "mask": dict(step, selective=True, path="mask")}
    times = side_by_side({k: make_case(c, "cuda") for k, c in cases.items()}, "cuda", repeats)
    mem = {k: peak_memory(c, "cuda") for k, c in cases.items()}
    sel, mask = ratios(times, "selective", "standard"), ratios(times, "mask", "standard")
    print(f"  standard {statistics.median(times['standard']) * 1000:.1f} ms; selective ({path}) x {spread(sel)}, "
          f"memory x {ratio(mem['selective'], mem['standard'])}; mask path x {spread(mask)}, memory x "
          f"{ratio(mem['mask'], mem['standard'])}")
    results.append({"bench": "gpu_step", "path": path, "seconds": times, "peak_bytes": mem,
                    "time_ratio": statistics.median(sel), "time_ratio_spread": [min(sel), max(sel)]})
    # what the timing ran: the autotuner's picks for these keys (T, H, D, dtype; not B), against the reference (T
    # 16384's reference would hold H x T x T float64 logits and their gradients: left to the fixed candidates' checks)
    failures += check_triton("cuda", results, autotune=True, dtypes=(("bf16", 5e-2),),
                             shapes=((1, 8, 1024, 64), (1, 8, 4096, 64), (1, 12, 1024, 64)))
    print("\nThe autotuner's picks (key: T, H, D, dtypes):")
    for which in ("fwd", "bwd"):
        for key, config in getattr(kernels, f"_{which}_tuned").cache.items():
            print(f"  {which} {key}: {config}")
            results.append({"bench": "autotuned", "pass": which, "key": str(key), "config": str(config)})
    failures += check_large_offsets(results)  # last: it fills about 40 GiB
    if failures:
        raise SystemExit(f"bench.py gpu: {failures} correctness checks over their tolerance (above)")


def check_triton(device, results, autotune=False, dtypes=(("fp32", 1e-3), ("bf16", 5e-2), ("fp16", 2e-2)),
                 shapes=((1, 1, 1, 32), (2, 1, 100, 64), (2, 4, 257, 128), (1, 8, 1000, 64), (2, 6, 333, 32))):
    """The Triton kernel against the float64 reference (T not a multiple of the tile, T = 1, H = 1, D 32 to 128),
    with each pass's first candidate or (autotune) the autotuner's pick; returns how many cases miss their
    tolerance."""
    import kernels
    from selective_gpt import selective_attention_reference
    print(f"\nTriton kernel ({'autotuned' if autotune else 'first candidates'}) vs the float64 reference on "
          f"{device}: the largest error of y, dq, dk, dv relative to the largest value of each")
    failures = 0
    for dtype, tol in dtypes:
        for B, H, T, D in shapes:
            g = torch.Generator().manual_seed(T)
            q, k, v, dy = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(4))
            want = gradients(lambda *a: selective_attention_reference(*a)[0], q.double(), k.double(), v.double(),
                             dy.double())
            got = gradients(lambda *a: kernels.triton_selective_attention(*a, autotune=autotune),
                            *(t.to(DTYPES[dtype]) for t in (q, k, v, dy)))
            errors = [((a.double() - w).abs().max() / w.abs().max().clamp(min=1e-3)).item() for a, w in zip(got, want)]
            ok = max(errors) <= tol
            failures += not ok
            print(f"  {dtype} B={B} H={H} T={T:>4} D={D:>3}: " + " ".join(f"{e:.1e}" for e in errors)
                  + f"  {'ok' if ok else f'OVER {tol:g}'}")
            results.append({"bench": "triton_check", "dtype": dtype, "shape": [B, H, T, D], "errors": errors,
                            "ok": ok, "autotuned": autotune})
    return failures


def check_large_offsets(results):
    """q, k, v of 2^31 elements (bf16, 4 GiB each; about 40 GiB in all with the gradients): the last sequence's
    output and gradients must match those of the same sequence run alone, which an int32 offset that wrapped would
    break."""
    import kernels
    B, H, T, D = 8193, 16, 256, 64
    print(f"\nLarge offsets: B={B} H={H} T={T} D={D} bf16 ({B * H * T * D / 2**31:.2f} x 2^31 elements per tensor)")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dy = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    untuned = functools.partial(kernels.triton_selective_attention, autotune=False)  # int64 offsets: any config
    big = gradients(untuned, q, k, v, dy)
    alone = gradients(untuned, *(t[-1:].clone() for t in (q, k, v, dy)))
    # close, not equal: dq and dk gather atomic adds in whatever order the programs run
    same = all(torch.allclose(a[-1:].float(), b.float(), rtol=1e-2, atol=1e-2) for a, b in zip(big, alone))
    print(f"  last sequence == the same sequence alone (y, dq, dk, dv): {'ok' if same else 'DIFFERENT'}")
    results.append({"bench": "triton_large_offsets", "ok": same})
    return not same


def gradients(fn, q, k, v, dy):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    y = fn(q, k, v)
    y.backward(dy)
    return [y.detach(), q.grad, k.grad, v.grad]


SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one H100/H200 block may use


def compile_kernels(results):
    """Compile every launch configuration of kernels.TRITON_CONFIGS (each pass's every candidate: what the
    autotuner may pick) for sm_90 without a GPU (Triton targets a GPU it does not see), read its resources from
    ptxas -v and count the SASS instructions of its main loop (one trip: one key tile forward, one query tile
    backward, for G heads)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.py compile: TRITON_INTERPRET=1 is set, which replaces the kernels by the CPU "
                         "interpreter; unset it (TRITON_INTERPRET= python bench.py compile)")
    import kernels
    if kernels.triton is None:
        raise SystemExit(f"bench.py compile: {kernels.WHY_NO_TRITON}")
    print(f"\nTriton kernels compiled for sm_90 (triton {kernels.triton.__version__}); shared memory limit "
          f"{SM90_SHARED_LIMIT // 1024} KB; '#' = the pass's candidate (0: the first, used untimed), G = heads per "
          "program; 'loop' = SASS instructions one warp runs per trip of the main loop (one tile off the diagonal); "
          "'/tile' = loop x warps / G x 4096 / (BM BN), the instructions a 64 x 64 tile costs per head (the speed "
          "proxy); 'mma' = tensor-core instructions per warp and trip")
    print(f"{'dtype':>8} {'BD':>4} {'kernel':>7} {'#':>2} {'BM':>4} {'BN':>4} {'G':>2} {'warps':>5} {'stages':>6} | "
          f"{'shared KB':>9} {'regs':>4} {'spill B':>7} {'loop':>5} {'/tile':>6} {'mma':>4}")
    rows = []
    for (dtype, BD), cfg in kernels.TRITON_CONFIGS.items():
        first = cfg.fwd[0]  # the column-sum pre-pass launches with the forward's first candidate's BN and warps
        passes = [("colsum", 0, kernels.TritonPass(first.BN, 1, first.warps, 1, None)),
                  ("delta", 0, kernels.TritonPass("-", 1, 4, 1, None))]  # no key tiles; rows: DELTA_ROWS
        passes += [(name, n, c) for name in ("fwd", "bwd") for n, c in enumerate(getattr(cfg, name))]
        for name, n, c in passes:
            BM = kernels.DELTA_ROWS if name == "delta" else cfg.BM
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), BD=BD, kernel=name, candidate=n, BM=BM,
                             BN=c.BN, G=c.G, warps=c.warps, stages=c.stages, declared_kb=c.shared_kb))
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:  # each compile uses one core
        rows = list(pool.map(compile_row, rows))
    for row in rows:
        results.append(row)
        head = (f"{row['dtype']:>8} {row['BD']:>4} {row['kernel']:>7} {row['candidate']:>2} {row['BM']:>4} "
                f"{row['BN']:>4} {row['G']:>2} {row['warps']:>5} {row['stages']:>6} | ")
        if "error" in row:
            print(head + f"FAILED: {row['error']}")
            continue
        print(head + f"{row['shared'] / 1024:>9.1f} {row['registers']:>4} {row['spill_bytes']:>7} "
              f"{row['loop_instructions']:>5} {tile_cost(row):>6.0f} {row['loop_mma']:>4}"
              f"{'' if row['shared'] <= SM90_SHARED_LIMIT else '  OVER THE SHARED MEMORY LIMIT'}"
              f"{'  OVER ITS DECLARED KB' if row['shared'] > 1024 * (row['declared_kb'] or 1e9) else ''}")


def tile_cost(row):
    """The compiled-code speed proxy: SASS instructions per head and 64 x 64 tile (one trip covers BM x BN)."""
    if not row["loop_instructions"]:
        return 0  # a kernel without a loop over tiles (_delta_kernel)
    return row["loop_instructions"] * row["warps"] / row["G"] * 4096 / (row["BM"] * row["BN"])


def compile_row(row):
    """row with its compiled resources, or the error that stopped its compile (a result: the check fails on it)."""
    import kernels
    try:
        return row | compiled_resources(kernels, row["kernel"], getattr(torch, row["dtype"]), row["BM"], row["BN"],
                                        row["BD"], row["G"], row["warps"], row["stages"])
    except Exception as e:
        return row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def compiled_resources(kernels, name, dtype, BM, BN, BD, G, warps, stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    elem = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    fn = {"colsum": kernels._colsum_kernel, "fwd": kernels._fwd_kernel, "bwd": kernels._bwd_kernel,
          "delta": kernels._delta_kernel}[name]
    float32_args = {"LSE", "CARRY", "COLSUM", "DELTA", "DQ", "DK0"}
    signature, constexprs = {}, dict(BM=BM, BN=BN, BD=BD, G=G, DOT=kernels.dot_precision(dtype))
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.startswith("scale"):
            signature[arg] = "fp32"
        else:
            pointer = arg.isupper() and arg not in ("T", "H", "D")  # tensors are named in capitals, sizes T H D
            signature[arg] = ("*fp32" if arg in float32_args else elem) if pointer else "i32"
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    # what a launch at T = 4096, d = 64 specializes on: pointers and every int but H divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
             if signature[arg] not in ("constexpr", "fp32") and arg != "H"}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    tools = triton.knobs.nvidia
    ptxas = getattr(tools, "ptxas_blackwell", tools.ptxas).path  # the PTX is newer than the plain ptxas reads
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        verbose = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx, "-o", cubin], capture_output=True, text=True,
                                 check=True).stderr
        sass = subprocess.run([tools.cuobjdump.path, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    loop = main_loop(sass)
    return dict(shared=compiled.metadata.shared, registers=int(re.search(r"Used (\d+) registers", verbose)[1]),
                spill_bytes=int(spills[1]) + int(spills[2]), loop_instructions=len(loop),
                loop_mma=sum(("MMA" in op) for op in loop))


def main_loop(sass):
    """The opcodes of the first loop in a cuobjdump -sass listing (from a backward branch's target to the branch):
    in the forward and backward kernels, the tiles off the diagonal, where nearly all the work is."""
    code = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)",
                                                       sass)]
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/[^;\n]*BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", sass):
        branch, target = int(m[1], 16), int(m[2], 16)
        if target < branch:
            return [op for address, op in code if target <= address <= branch]
    return []


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1 (the median of the alternations is the figure)")
    return value


def block_sizes(text):
    try:
        blocks = [int(b) for b in text.split(",")]
    except ValueError:
        blocks = []
    if not blocks or min(blocks) < 2:
        raise argparse.ArgumentTypeError(f"{text}: block sizes of at least 2, separated by commas (e.g. 512,1024)")
    return blocks


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "_memory":  # peak_memory's subprocess
        return measure_memory_here(json.loads(argv[1]))
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("what", nargs="?", choices=["speed", "steps", "decode", "kernels", "compile", "gpu"],
                        default="speed", help="speed: training step and decoding (steps, decode: one of them); "
                        "kernels: the attention op; compile: the Triton kernels for sm_90, no GPU needed; gpu (CUDA): "
                        "the Triton kernel against the reference, against flash attention and a training step")
    parser.add_argument("--blocks", type=block_sizes, default=[256, 512, 1024],
                        help="speed, steps: the training steps' block sizes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where speed and kernels run")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed alternations per case (the median counts)")
    parser.add_argument("--json", default=None, help="also write the results to this new file")
    args = parser.parse_args(argv)
    if any(a.split("=")[0] == "--blocks" for a in argv) and args.what not in ("speed", "steps"):
        parser.error(f"--blocks sets the training steps' block sizes: give it with speed or steps, not {args.what}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA GPU; use --device cpu")
    if args.json and os.path.exists(args.json):  # checked now, not after a run of many minutes
        parser.error(f"--json {args.json}: the file exists; name a new one (bench.py does not overwrite results)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: its directory does not exist")
    if args.json:
        make_dir(os.path.dirname(os.path.abspath(args.json)), "--json")  # can it be written in?
    started = time.time()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"bench.py {args.what} on {args.device} ({device_name}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, tiled path: {'Triton' if args.device == 'cuda' else 'CPU query chunks'}")
    if args.device == "cpu" and args.what in ("speed", "steps", "kernels") and not cpu_has_native_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX): its bf16 rows time an emulation, about 100x "
              "slower than float32 (docs/PERFORMANCE.md, CPU dtype)")
    results = []
    if args.what == "compile":
        compile_kernels(results)
    elif args.what == "gpu":
        bench_gpu(args.repeats, results)
    elif args.what in ("speed", "steps", "decode"):
        if args.what != "decode":
            bench_steps(args.device, args.repeats, results, args.blocks)
        if args.what != "steps":
            bench_decoding(args.device, args.repeats, results)
    else:
        for dtype in (["bf16"] if args.device == "cuda" else ["fp32", "bf16"]):
            bench_kernels(args.device, dtype, args.repeats, results)
    print(f"\n{time.time() - started:.0f} s")
    if args.json:  # written whole or not at all
        write_json(args.json, {"what": args.what, "device": args.device, "device_name": device_name,
                               "torch": torch.__version__, "results": results})


if __name__ == "__main__":
    main()
