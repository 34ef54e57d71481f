#!/usr/bin/env python3
"""The same DeepSeek-V3-shaped MoE layer as bench/cuda_moe_bench.cc, in PyTorch on the same GPU:
bf16 experts, fp32 router (sigmoid, 8 groups keeping 4 by top-2 sums, top-8, renormalised, x2.5),
one shared expert. Two implementations: an eager loop over experts, and torch._grouped_mm over
tokens sorted by expert where the installed PyTorch has it. Forward over 256 experts at 4096 and
16384 tokens; forward+backward over 64 experts at 1024 and 4096 tokens. Prints JSON.

    python3 bench/torch_cuda_moe_bench.py [--reps N] [--json FILE]

A measurement that raises (an operator missing or refusing its arguments in the installed
PyTorch, memory) is recorded with "ms": null and its error instead of ending the run, and the
JSON file is rewritten after every measurement, so that a run cut short by a time limit still
leaves what it measured. The exit status is 1 when anything failed.
"""
import argparse
import json
import math
import sys
import traceback

import torch

D, H, K, GROUPS, KEEP = 7168, 2048, 8, 8, 4


def route(x, gate, bias):
    scores = torch.sigmoid(x.float() @ gate.t())
    biased = scores + bias
    E = gate.shape[0]
    g = biased.view(-1, GROUPS, E // GROUPS).topk(2, dim=-1).values.sum(-1)
    keep = g.topk(KEEP, dim=-1).indices
    mask = torch.ones_like(g, dtype=torch.bool).scatter_(1, keep, False)
    biased = biased.masked_fill(mask.repeat_interleave(E // GROUPS, dim=1), float("-inf"))
    idx = biased.topk(K, dim=-1).indices
    w = scores.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5
    return idx, w


def swiglu(x, w1, w3, w2):
    return (torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def moe_eager(x, p):
    idx, w = route(x, p["gate"], p["bias"])
    xb = x.to(torch.bfloat16)
    out = x + swiglu(xb, p["sw1"], p["sw3"], p["sw2"]).float()
    for e in range(p["w1"].shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = swiglu(xb[tok], p["w1"][e], p["w3"][e], p["w2"][e]).float()
        out = out.index_add(0, tok, y * w[tok, slot].unsqueeze(1))
    return out


def moe_grouped(x, p):
    idx, w = route(x, p["gate"], p["bias"])
    xb = x.to(torch.bfloat16)
    out = x + swiglu(xb, p["sw1"], p["sw3"], p["sw2"]).float()
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    tok = order // K
    E = p["w1"].shape[0]
    # torch._grouped_mm, 2D x 3D: rows of mat_a [sum M_e, in] grouped by expert, mat_b [E, in, out],
    # offs the int32 running end of each group's rows.
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    xs = xb[tok]
    h = torch.nn.functional.silu(torch._grouped_mm(xs, p["w1"].transpose(1, 2), offs=offs)) * \
        torch._grouped_mm(xs, p["w3"].transpose(1, 2), offs=offs)
    y = torch._grouped_mm(h, p["w2"].transpose(1, 2), offs=offs).float()
    return out.index_add(0, tok, y * w.flatten()[order].unsqueeze(1))


def rel_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def params(E, train):
    g = torch.Generator(device="cuda").manual_seed(42)

    def randn(*shape, scale, dtype=torch.bfloat16):
        t = torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(train)

    s_in, s_h = 1 / math.sqrt(D), 1 / math.sqrt(H)
    return {
        "gate": randn(E, D, scale=s_in, dtype=torch.float32),
        "bias": (torch.randn(E, generator=g, device="cuda") * 0.01),
        "w1": randn(E, H, D, scale=s_in), "w3": randn(E, H, D, scale=s_in),
        "w2": randn(E, D, H, scale=s_h),
        "sw1": randn(H, D, scale=s_in), "sw3": randn(H, D, scale=s_in), "sw2": randn(D, H, scale=s_h),
    }


def time_ms(fn, reps):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"torch {torch.__version__}: no CUDA device visible to PyTorch", file=sys.stderr)
        return 1
    impls = {"eager": moe_eager}
    if hasattr(torch, "_grouped_mm"):
        impls["grouped_mm"] = moe_grouped
    else:
        print(f"torch {torch.__version__} has no torch._grouped_mm: eager only", file=sys.stderr)
    results = []
    failed = False

    def record(r):
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
        if args.json:
            with open(args.json, "w") as f:
                f.write(json.dumps(results, indent=1))

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on "
          f"{torch.cuda.get_device_name(0)}", file=sys.stderr, flush=True)
    for train, E, sizes in ((False, 256, (4096, 16384)), (True, 64, (1024, 4096))):
        pass_name = "forward+backward" if train else "forward"
        try:
            p = params(E, train)
        except Exception as e:  # out of memory, say: the other pass may still fit
            traceback.print_exc()
            for T in sizes:
                for name in impls:
                    record({"impl": name, "pass": pass_name, "tokens": T, "experts": E,
                            "ms": None, "error": f"parameters: {type(e).__name__}: {e}"})
            failed = True
            torch.cuda.empty_cache()
            continue
        for T in sizes:
            gx = torch.Generator(device="cuda").manual_seed(T)
            x = torch.randn(T, D, device="cuda", generator=gx).requires_grad_(train)
            dy = torch.randn(T, D, device="cuda", generator=gx) * 1e-3
            reference = None
            for name, f in impls.items():
                r = {"impl": name, "pass": pass_name, "tokens": T, "experts": E, "ms": None}
                try:
                    # The same forward as eager, so that a fast wrong answer is not reported as
                    # a speed-up.
                    with torch.no_grad():
                        y = f(x, p)
                    if name == "eager":
                        reference = y
                    elif reference is not None:
                        r["rel_vs_eager"] = rel_error(y, reference)
                    del y
                    if train:
                        def step():
                            for t in p.values():
                                t.grad = None
                            f(x, p).backward(dy)
                        r["ms"] = time_ms(step, args.reps)
                    else:
                        with torch.no_grad():
                            r["ms"] = time_ms(lambda: f(x, p), args.reps)
                except Exception as e:  # recorded as n/a; the other measurements go on
                    traceback.print_exc()
                    r["error"] = f"{type(e).__name__}: {e}"
                    failed = True
                    for t in p.values():
                        t.grad = None
                    torch.cuda.empty_cache()
                record(r)
            del reference
        del p
        torch.cuda.empty_cache()
    text = json.dumps(results, indent=1)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
