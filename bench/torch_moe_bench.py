#!/usr/bin/python3
"""The MoE layer of `moert bench` in PyTorch, timed beside moert at the same thread count.

Runs `moert bench --json` with the same layer options to get moert's figures (and the machine's
limits) in the same run, then builds the same layer in PyTorch (Debian's python3-torch, CPU):
sigmoid router, top-K, renormalised weights, shared and routed SwiGLU experts, residual; routed
experts computed with the standard loop over experts (gather the expert's tokens, run its FFN,
index_add the weighted output back). Forward runs under torch.no_grad() (as moert's inference
session); forward+backward lets autograd compute the gradients of every weight and of the input
(as moert's training session). FLOPs use moert's formula, with the assignment count of the run
(tokens * top_k). A plain GEMM of the same FLOPs is timed in PyTorch too.

PyTorch's CPU GEMMs go to the BLAS that libblas.so.3 resolves to (Debian's alternatives: the
reference BLAS, BLIS, OpenBLAS, each in its own directory). Every installed one is tried on the
layer's GEMM shape in a separate process (LD_LIBRARY_PATH pointing at its directory) and PyTorch
is measured with the fastest; the table says which.

Run with Debian's /usr/bin/python3 (python3-torch); exit 77 when torch is missing.
"""

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--moert", default=os.path.join(here, "..", "build", "release", "cli", "moert"),
                    help="the moert command (default: build/release/cli/moert)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-hidden", type=int, default=256)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--shared-hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time both sides by process CPU time / threads (a machine shared with "
                         "other jobs; see moert bench --help)")
    # Internal: run in a child process under a chosen BLAS.
    ap.add_argument("--probe-gemm", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--measure", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args()


def moert_figures(a):
    cmd = [a.moert, "bench", "--json", "--threads", str(a.threads), "--tokens", str(a.tokens),
           "--dim", str(a.dim), "--experts", str(a.experts), "--top-k", str(a.top_k),
           "--expert-hidden", str(a.expert_hidden), "--shared", str(a.shared),
           "--shared-hidden", str(a.shared_hidden), "--repeats", str(a.repeats),
           "--seed", str(a.seed)] + (["--cpu-time"] if a.cpu_time else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        sys.exit(f"torch_moe_bench: error: cannot run {a.moert}: {e}")
    if done.returncode != 0:
        sys.exit(f"torch_moe_bench: error: moert bench failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


CLOCK = {"cpu": False, "threads": 1}


def clock():
    if CLOCK["cpu"]:
        return time.process_time() / CLOCK["threads"]
    return time.perf_counter()


def median_time(repeats, fn):
    fn()  # warm-up, as moert bench does
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def blas_dirs():
    """Directories holding a libblas.so.3 that Debian's alternatives can select."""
    found = []
    for lib in sorted(glob.glob("/usr/lib/*-linux-gnu/*/libblas.so.3")):
        found.append(os.path.dirname(lib))
    return found


def default_blas():
    for lib in glob.glob("/usr/lib/*-linux-gnu/libblas.so.3"):
        return os.path.dirname(os.path.realpath(lib))
    return ""


def child(a, flag, blas_dir, gemm_width=0):
    """Runs this script with `flag` under the BLAS of `blas_dir`; its JSON answer, or None."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = blas_dir + (":" + env["LD_LIBRARY_PATH"]
                                         if env.get("LD_LIBRARY_PATH") else "")
    # A threaded BLAS (openblas-pthread) starts a thread per core unless told otherwise, which
    # torch.set_num_threads does not do: the run is held to --threads cores, as moert's is.
    for var in ("OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS", "OMP_NUM_THREADS"):
        env[var] = str(a.threads)
    cmd = [sys.executable, os.path.abspath(__file__), flag, str(gemm_width or 1)]
    for k in ("threads", "tokens", "dim", "experts", "top_k", "expert_hidden", "shared",
              "shared_hidden", "repeats", "seed"):
        cmd += ["--" + k.replace("_", "-"), str(getattr(a, k))]
    if a.cpu_time:
        cmd.append("--cpu-time")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def measure(a, gemm_width, probe_only):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    T, D, E, K, H, S, HS = (a.tokens, a.dim, a.experts, a.top_k, a.expert_hidden, a.shared,
                            a.shared_hidden)

    def uniform(*shape, fan_in):
        # The same distribution as moert bench's weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        b = 1.0 / math.sqrt(fan_in)
        return (torch.rand(*shape) * 2 - 1) * b

    x = torch.rand(T, D) * 2 - 1
    N = gemm_width
    wg = uniform(N, D, fan_in=D)
    gemm_flops = 2.0 * T * D * N

    def gemm_forward():
        with torch.no_grad():
            x @ wg.t()

    g_fwd = median_time(a.repeats, gemm_forward)
    if probe_only:
        return {"gemm_forward": gemm_flops / g_fwd / 1e9}

    weights = {
        "gate": uniform(E, D, fan_in=D),
        "w1": uniform(E, H, D, fan_in=D), "w3": uniform(E, H, D, fan_in=D),
        "w2": uniform(E, D, H, fan_in=H),
        "sw1": uniform(S, HS, D, fan_in=D), "sw3": uniform(S, HS, D, fan_in=D),
        "sw2": uniform(S, D, HS, fan_in=HS),
    }
    dy = torch.rand(T, D) * 2 - 1

    def layer(x, w):
        scores = torch.sigmoid(x @ w["gate"].t())
        top, idx = torch.topk(scores, K, dim=-1)
        gate_w = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        y = x
        for s in range(S):
            y = y + (F.silu(x @ w["sw1"][s].t()) * (x @ w["sw3"][s].t())) @ w["sw2"][s].t()
        routed = torch.zeros_like(x)
        for e in range(E):
            rows, slot = torch.where(idx == e)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            he = F.silu(xe @ w["w1"][e].t()) * (xe @ w["w3"][e].t())
            routed = routed.index_add(0, rows, (he @ w["w2"][e].t()) * gate_w[rows, slot, None])
        return y + routed, idx

    with torch.no_grad():
        _, idx = layer(x, weights)
    flops = T * (2.0 * D * E + S * 6.0 * D * HS) + idx.numel() * 6.0 * D * H

    def forward():
        with torch.no_grad():
            layer(x, weights)

    trainable = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    xg = x.clone().requires_grad_(True)

    def forward_backward():
        for v in trainable.values():
            v.grad = None
        xg.grad = None
        y, _ = layer(xg, trainable)
        y.backward(dy)

    t_fwd = median_time(a.repeats, forward)
    t_fb = median_time(a.repeats, forward_backward)

    wgt = wg.clone().requires_grad_(True)
    dg = torch.rand(T, N)

    def gemm_forward_backward():
        wgt.grad = None
        xg.grad = None
        (xg @ wgt.t()).backward(dg)

    g_fb = median_time(a.repeats, gemm_forward_backward)
    return {"torch": torch.__version__,
            "forward": flops / t_fwd / 1e9, "forward_backward": 3 * flops / t_fb / 1e9,
            "gemm_forward": gemm_flops / g_fwd / 1e9,
            "gemm_forward_backward": 3 * gemm_flops / g_fb / 1e9}


def main():
    a = parse()
    CLOCK["cpu"] = a.cpu_time
    CLOCK["threads"] = a.threads
    try:
        import torch  # noqa: F401
    except ImportError as e:
        print(f"SKIP: cannot import torch with {sys.executable}: {e}")
        return 77
    if a.probe_gemm or a.measure:
        print(json.dumps(measure(a, a.probe_gemm or a.measure, probe_only=bool(a.probe_gemm))))
        return 0

    m = moert_figures(a)
    N = m["gemm_width"]
    # PyTorch's fastest installed BLAS on this GEMM shape and thread count.
    probes = []
    for d in blas_dirs() or [""]:
        r = child(a, "--probe-gemm", d, N)
        if r:
            probes.append((r["gemm_forward"], d))
    if not probes:
        sys.exit("torch_moe_bench: error: PyTorch's GEMM failed under every BLAS")
    probes.sort(reverse=True)
    blas = probes[0][1]
    t = child(a, "--measure", blas, N)
    if not t:
        sys.exit(f"torch_moe_bench: error: the PyTorch layer failed under {blas}")

    T, D, E, K, H, S, HS = (a.tokens, a.dim, a.experts, a.top_k, a.expert_hidden, a.shared,
                            a.shared_hidden)
    moert_gf = [m["moe"]["forward"]["gflops"], m["moe"]["forward_backward"]["gflops"]]
    moert_gemm = [m["gemm"]["forward"]["gflops"], m["gemm"]["forward_backward"]["gflops"]]
    torch_gf = [t["forward"], t["forward_backward"]]
    torch_gemm = [t["gemm_forward"], t["gemm_forward_backward"]]

    print(f"MoE layer d={D}, {E} experts x hidden {H}, top-{K}, {S} shared x hidden {HS}; "
          f"{T} tokens; {a.threads} thread{'s' if a.threads != 1 else ''}; median of {a.repeats}")
    print(f"machine: {m.get('cpu', '?')}; fp32 FMA peak {m.get('peak_gflops', 0):.1f} GFLOP/s; "
          f"moert's oneDNN ISA {m.get('isa', '?')}; times: "
          + ("process CPU time / threads" if a.cpu_time else "wall clock"))
    print(f"torch {t['torch']} (loop over experts) with the BLAS in {blas} "
          f"(fastest of: " + ", ".join(f"{os.path.basename(d) or 'default'} {g:.1f}"
                                       for g, d in probes) + " GFLOP/s on the GEMM); "
          f"default libblas.so.3: {default_blas()}")
    print(f"GEMM = C[{T}, {N}] = X[{T}, {D}] W^T (the MoE layer's forward FLOPs); moert's GEMM "
          f"column: the best library moert bench measured ({m['gemm'].get('library') or 'none'})")
    # moert/beside: each of moert's passes against that GEMM run again right before it.
    beside = m["gemm"].get("beside", {})
    print(f"{'pass':<18} {'moert GF/s':>11} {'torch GF/s':>11} {'moert/torch':>12} "
          f"{'best GEMM':>10} {'torch GEMM':>11} {'moert/GEMM':>11} {'moert/beside':>13}")
    # moert bench writes null where it measured no baseline (no GEMM library ran).
    def figure(v, width):
        return f"{v:>{width}.2f}" if v else f"{'n/a':>{width}}"
    for i, name in enumerate(["forward", "forward+backward"]):
        ratio = beside.get(["forward", "forward_backward"][i])
        print(f"{name:<18} {moert_gf[i]:>11.2f} {torch_gf[i]:>11.2f} "
              f"{moert_gf[i] / torch_gf[i]:>12.2f} {figure(moert_gemm[0], 10)} "
              f"{torch_gemm[i]:>11.2f} "
              f"{figure(moert_gemm[0] and moert_gf[i] / moert_gemm[0], 11)} {figure(ratio, 13)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
