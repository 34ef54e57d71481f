#!/usr/bin/python3
"""Independent PyTorch oracle for moert's fp32 CPU forward pass.

Builds small random models in Python, writes them as FlatBuffers JSON (converted with flatc), runs
them through libmoert.so via ctypes, and compares against a float64 PyTorch forward written from
docs/design.md section 1:

  logits s = u . W_g^T; scores = sigmoid(s) or softmax(s); selection on biased scores score + b;
  group-limited routing: group score = sum of the group's top-2 biased scores, keep the best
  topk_groups groups, mask the others with -inf; top-K of the rest, ties towards the lower index;
  gate weights from the UNBIASED scores, optionally w / (sum w + 1e-20), times
  routed_scaling_factor; h = [u +] sum_shared FFN_s(u) + sum_selected w_i FFN_i(u) with SwiGLU
  experts W2 (silu(W1 x) * W3 x). Expert Choice: each expert takes its
  capacity = min(rows, ceil(cf * rows * top_k / E)) best tokens by score (ties: lower token index),
  weight = score * routed_scaling_factor. MaxVio = (max count - mean) / mean.

Checks, per model and per row count: ||out - ref|| / ||ref|| <= 1e-5, per-expert counts equal,
MaxVio equal, bitwise-identical outputs with 1 and 3 threads, and a few error paths of the C ABI.

Exit 0 when everything passes, 1 on any failure, 77 (skip) when torch or numpy is missing.
Run with Debian's /usr/bin/python3, which has python3-torch.
"""

import ctypes
import sys

from oracle_common import (  # first: exits 77 (skip) when numpy or torch is missing
    MOERT_ALL_LAYERS, MOERT_COUNTS_LAST, MOERT_ERR_INVALID_ARGUMENT, MOERT_ERR_NUMERIC,
    MOERT_INPUT_HIDDEN, MOERT_INPUT_TOKENS, TIE_TOL, Gaps, Lib, ModelBuilder, OracleFailure,
    descending_order, ec_capacity, embed, moe_output, parse_args, ref_layer, route, run_models)
import numpy as np
import torch

REL_TOL = 1e-5
# Routing near-ties: see TIE_TOL. With the seeds below the smallest deciding gap is ~1e-4. For the
# exact ties built on purpose, both BLAS builds tried (OpenBLAS, BLIS) give bitwise-equal dot
# products.


# ---- the float64 reference (the shared pieces are in oracle_common.py) -------------------------


def router_logits(x, gate):
    """x . gate^T, computed once per distinct (row, router row) pair so that identical rows give
    bitwise-identical logits: structural ties stay exact ties in the reference."""
    xu, xi = torch.unique(x, dim=0, return_inverse=True)
    gu, gi = torch.unique(gate, dim=0, return_inverse=True)
    return (xu @ gu.T)[xi][:, gi]


def float64_weights(model):
    return {k: torch.from_numpy(v.astype(np.float64)) for k, v in model.tensors.items()}


def ref_moe(L, W, x, gaps, diag):
    _, chosen, gate_w = route(L, router_logits(x, W[L["name"] + ".gate"]), gaps, diag)
    return moe_output(L, W, x, chosen, gate_w), chosen.sum(0).to(torch.int64).numpy()


def reference_forward(model, inp):
    """inp: int32 tokens [rows, context] or float32 hidden states [rows, input_dim]."""
    W = float64_weights(model)
    gaps = Gaps()
    moe = {}  # layer index -> (counts, diagnostics)
    layers = model.layers
    if model.token_input:
        x = embed(layers[0], W, inp)
        start = 1
    else:
        x = torch.from_numpy(inp.astype(np.float64))
        start = 0
    for i in range(start, len(layers)):
        L = layers[i]
        if L["kind"] == "MoE":
            diag = {}
            x, counts = ref_moe(L, W, x, gaps, diag)
            moe[i] = (counts, diag)
        else:
            x = ref_layer(L, W, x)
    return x, moe, gaps


def max_vio(counts):
    mean = float(np.sum(counts)) / len(counts)
    return 0.0 if mean == 0 else (float(np.max(counts)) - mean) / mean


# ---- the models -------------------------------------------------------------------------------


def model_tokens_sigmoid_groups():
    """Token input (context 4), RMSNorm, grouped sigmoid MoE with bias, normalisation, scaling
    2.5 and a shared expert; a dense FFN; a grouped softmax MoE without normalisation; head+bias."""
    b = ModelBuilder("tok_sigmoid_groups", seed=101)
    b.embedding(vocab=40, dim=8, context=4)
    b.rmsnorm()
    b.moe(E=8, K=2, H=16, score="Sigmoid", G=4, TG=2, normalize=True, scaling=2.5,
          policy="LossFreeBias", residual=True, shared=1, shared_hidden=12, bias_scale=0.25,
          inline=("gate_bias", "shared_w2"), expect_bias_effect=True, expect_group_effect=True)
    b.rmsnorm()
    b.dense(hidden=24, residual=True, where=("ext", "inline", "ext"))
    b.rmsnorm()
    b.moe(E=16, K=3, H=8, score="Softmax", G=4, TG=2, normalize=False, scaling=1.7,
          policy="LossFreeBias", residual=True, shared=2, shared_hidden=8, bias_scale=0.04,
          gate_std=2.5, inline=("gate",), expect_bias_effect=True, expect_group_effect=True)
    b.head(vocab=40, bias=True)
    return b, (9, 150)


def model_hidden_plain():
    """Hidden-state input; ungrouped softmax MoE (no norm, scaling 1, no residual, no shared);
    dense FFN without residual; sigmoid MoE with num_groups == topk_groups (no masking),
    normalisation and a shared expert; head without bias. Every tensor inline."""
    b = ModelBuilder("hidden_plain", seed=202, input_dim=24)
    b.moe(E=6, K=2, H=10, score="Softmax", G=1, TG=1, normalize=False, scaling=1.0,
          policy="None", residual=False, where="inline")
    b.dense(hidden=16, residual=False, where=("inline",) * 3)
    b.rmsnorm(eps=1e-6)
    b.moe(E=12, K=4, H=8, score="Sigmoid", G=3, TG=3, normalize=True, scaling=1.0,
          policy="AuxLoss", aux_alpha=0.01, residual=True, shared=1, shared_hidden=6,
          where="inline")
    b.head(vocab=20, bias=False, where="inline")
    return b, (64, 200)


def model_bf16():
    """BF16 weights (embedding, norms, experts, a router, head and its bias), context 2; a
    softmax MoE keeping 1 of 3 groups; a sigmoid MoE with 2 groups of 2, keeping 1, whose bias is
    mostly below -0.5 so that biased scores are negative: masking the other group with 0 instead
    of -inf would let its experts win."""
    b = ModelBuilder("bf16_tokens", seed=303)
    b.embedding(vocab=30, dim=16, context=2, dtype="BF16")
    b.rmsnorm(dtype="BF16")
    b.moe(E=12, K=2, H=16, score="Softmax", G=3, TG=1, normalize=True, scaling=1.5,
          policy="LossFreeBias", residual=True, shared=1, shared_hidden=16, bias_scale=0.03,
          gate_std=2.5, dtype="BF16", inline=("w2",), expect_bias_effect=True,
          expect_group_effect=True)
    b.dense(hidden=20, residual=False, dtype="BF16")
    b.rmsnorm()
    b.moe(E=4, K=1, H=12, score="Sigmoid", G=2, TG=1, normalize=False, scaling=0.8,
          policy="LossFreeBias", residual=True, bias_scale=0.2, bias_offset=-0.7, dtype="BF16",
          gate_dtype="BF16", expect_bias_effect=True, expect_group_effect=True)
    b.head(vocab=30, bias=True, dtype="BF16")
    return b, (33, 120)


def model_expert_choice():
    """Expert Choice: softmax with cf 1.25 and a shared expert; sigmoid with cf 0.5, no residual;
    softmax with cf 4 (capacity clipped to the row count, so every expert takes every token)."""
    b = ModelBuilder("expert_choice", seed=404, input_dim=16)
    b.rmsnorm()
    b.moe(E=8, K=2, H=12, score="Softmax", G=1, TG=1, normalize=False, scaling=1.3,
          policy="ExpertChoice", capacity_factor=1.25, residual=True, shared=1, shared_hidden=8)
    b.dense(hidden=16, residual=True)
    b.moe(E=4, K=1, H=8, score="Sigmoid", G=1, TG=1, normalize=False, scaling=1.0,
          policy="ExpertChoice", capacity_factor=0.5, residual=False, inline=("w3",))
    b.rmsnorm()
    b.moe(E=4, K=2, H=8, score="Softmax", G=1, TG=1, normalize=True, scaling=2.0,
          policy="ExpertChoice", capacity_factor=4.0, residual=True)
    b.head(vocab=24, bias=True)
    return b, (17, 100)


def model_expert_ties():
    """Token choice with experts 2 and 5 sharing their router row and bias: every token sees an
    exact tie between them, which must go to expert 2 when only one of them fits in the top-K."""
    b = ModelBuilder("expert_ties", seed=505, input_dim=16)
    b.moe(E=8, K=2, H=8, score="Sigmoid", G=1, TG=1, normalize=True, scaling=1.0,
          policy="LossFreeBias", residual=True, bias_scale=0.1, tied_experts=((2, 5),))
    b.head(vocab=12, bias=False)
    return b, (40, 130)


def token_ties_input(model, x, rows):
    """Makes exact token ties straddle Expert Choice capacity boundaries: for some experts, the
    first rejected token becomes a copy of the last accepted one; the lower index must win."""
    L = model.layers[0]
    gate = float64_weights(model)[L["name"] + ".gate"]
    cap = ec_capacity(L, rows)
    for e in range(L["E"]):
        logits = router_logits(torch.from_numpy(x.astype(np.float64)), gate)
        scores = torch.softmax(logits, dim=-1)[:, e]
        order = descending_order(scores)
        last_in, first_out = int(order[cap - 1]), int(order[cap])
        # Alternate which of the two keeps its own row: the tie then sits at the last accepted
        # or at the first rejected score. Either way the lower index of the pair must be taken.
        src, dst = (last_in, first_out) if e % 2 == 0 else (first_out, last_in)
        x[dst] = x[src]
    return x


def model_token_ties():
    """Expert Choice straight on the input rows, with duplicated rows tied at the capacity."""
    b = ModelBuilder("token_ties", seed=606, input_dim=16)
    b.moe(E=4, K=1, H=8, score="Softmax", G=1, TG=1, normalize=False, scaling=1.0,
          policy="ExpertChoice", capacity_factor=1.0, residual=False)
    b.head(vocab=12, bias=False)
    return b, (24, 90)


MODELS = [model_tokens_sigmoid_groups, model_hidden_plain, model_bf16, model_expert_choice,
          model_expert_ties, model_token_ties]
INPUT_HOOKS = {"token_ties": token_ties_input}
MIN_EXACT_TIES = {"expert_ties": 1, "token_ties": 1}


# ---- running and comparing --------------------------------------------------------------------


def make_input(model, rows, rng):
    if model.token_input:
        L = model.layers[0]
        return rng.integers(0, L["vocab"], size=(rows, L["context"]), dtype=np.int32)
    x = rng.standard_normal((rows, model.input_dim)).astype(np.float32)
    hook = INPUT_HOOKS.get(model.name)
    return hook(model, x, rows) if hook else x


def check_errors(lib, sess, model, inp, out_width, moe_layers, counts_before):
    """Error paths: each must return the documented code and leave output and state alone."""
    rows = inp.shape[0]
    # Wrong output length (one float short, and one too many): MOERT_ERR_INVALID_ARGUMENT.
    for delta in (-1, 1):
        out = np.full(rows * out_width + delta, 1234.5, dtype=np.float32)
        lib.expect(lib.forward_raw(sess, model.token_input, inp, rows, out),
                   MOERT_ERR_INVALID_ARGUMENT, f"forward with out_len {out.size}")
        if not np.all(out == 1234.5):
            raise OracleFailure("a failed forward wrote into the output buffer")
    # Wrong input length.
    out = np.zeros(rows * out_width, dtype=np.float32)
    lib.expect(lib.forward_raw(sess, model.token_input, inp[:-1], rows, out),
               MOERT_ERR_INVALID_ARGUMENT, "forward with a short input")
    # rows = 0.
    lib.expect(lib.forward_raw(sess, model.token_input, inp[:0], 0, out[:0]),
               MOERT_ERR_INVALID_ARGUMENT, "forward with rows = 0")
    fp = ctypes.POINTER(ctypes.c_float)
    if model.token_input:
        bad = inp.copy()
        bad[rows // 2, 0] = model.layers[0]["vocab"]
        lib.expect(lib.forward_raw(sess, True, bad, rows, out), MOERT_ERR_INVALID_ARGUMENT,
                   "forward with a token id outside the vocabulary")
        hid = np.zeros(rows * 4, dtype=np.float32)
        lib.expect(lib.lib.moert_session_forward_hidden(sess, hid.ctypes.data_as(fp), hid.size,
                                                        rows, out.ctypes.data_as(fp), out.size),
                   MOERT_ERR_INVALID_ARGUMENT, "forward_hidden on a token model")
    else:
        bad = inp.copy()
        bad[rows - 1, 0] = np.nan
        lib.expect(lib.forward_raw(sess, False, bad, rows, out), MOERT_ERR_NUMERIC,
                   "forward with a NaN input")
        toks = np.zeros(rows, dtype=np.int32)
        lib.expect(lib.lib.moert_session_forward_tokens(
            sess, toks.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), toks.size, rows,
            out.ctypes.data_as(fp), out.size),
            MOERT_ERR_INVALID_ARGUMENT, "forward_tokens on a hidden-state model")
    # Counts: wrong length, a layer that is not MoE, a layer that does not exist.
    first_moe = moe_layers[0]
    E = model.layers[first_moe]["E"]
    c = np.zeros(E + 1, dtype=np.int64)
    cp = c.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
    lib.expect(lib.lib.moert_session_expert_counts(sess, first_moe, MOERT_COUNTS_LAST, cp, E + 1),
               MOERT_ERR_INVALID_ARGUMENT, "expert_counts with a wrong length")
    non_moe = [i for i, L in enumerate(model.layers) if L["kind"] != "MoE"][0]
    lib.expect(lib.lib.moert_session_expert_counts(sess, non_moe, MOERT_COUNTS_LAST, cp, E),
               MOERT_ERR_INVALID_ARGUMENT, "expert_counts of a non-MoE layer")
    lib.expect(lib.lib.moert_session_expert_counts(sess, len(model.layers), MOERT_COUNTS_LAST, cp, E),
               MOERT_ERR_INVALID_ARGUMENT, "expert_counts of a layer that does not exist")
    # The failures above changed nothing.
    for i in moe_layers:
        if not np.array_equal(lib.counts(sess, i, model.layers[i]["E"]), counts_before[i]):
            raise OracleFailure(f"failed calls changed the expert counts of layer {i}")


def run_model(lib, factory, args, rng):
    model, row_counts = factory()
    path = model.write(args.workdir, args.flatc, args.schema)
    handle = lib.load(path)
    kind, in_w, out_w = ctypes.c_int32(), ctypes.c_uint32(), ctypes.c_uint32()
    lib.ok(lib.lib.moert_model_io(handle, ctypes.byref(kind), ctypes.byref(in_w),
                                  ctypes.byref(out_w)), "model_io")
    want_kind = MOERT_INPUT_TOKENS if model.token_input else MOERT_INPUT_HIDDEN
    want_in = model.layers[0]["context"] if model.token_input else model.input_dim
    if (kind.value, in_w.value, out_w.value) != (want_kind, want_in, model.width):
        raise OracleFailure(f"model_io gives {(kind.value, in_w.value, out_w.value)}, expected "
                            f"{(want_kind, want_in, model.width)}")
    sessions = {}
    try:
        for t in (1, 3):
            sessions[t] = lib.session(handle, t)
        # Sessions hold what they need: the model may go before they do.
        lib.lib.moert_model_free(handle)
        handle = None
        moe_layers = model.moe_layers()
        for i in moe_layers:
            E = model.layers[i]["E"]
            if lib.counts(sessions[1], i, E).any() or lib.max_vio(sessions[1], i) != 0.0:
                raise OracleFailure(f"layer {i}: counts or MaxVio not zero before any forward")

        lines, failures = [], []
        for rows in row_counts:
            inp = make_input(model, rows, rng)
            outs = {t: lib.forward(s, model.token_input, inp, model.width)
                    for t, s in sessions.items()}
            bitwise = outs[1].tobytes() == outs[3].tobytes()
            again = lib.forward(sessions[3], model.token_input, inp, model.width)
            bitwise = bitwise and again.tobytes() == outs[3].tobytes()
            ref, ref_moe_stats, gaps = reference_forward(model, inp)
            out = torch.from_numpy(outs[1].astype(np.float64))
            rel = float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))
            counts_ok, vio_ok, problems = True, True, []
            lib_counts, vios = {}, []
            for i in moe_layers:
                E = model.layers[i]["E"]
                c1, c3 = lib.counts(sessions[1], i, E), lib.counts(sessions[3], i, E)
                want, diag = ref_moe_stats[i]
                lib_counts[i] = c1
                if not (np.array_equal(c1, want) and np.array_equal(c3, want)):
                    counts_ok = False
                    problems.append(f"layer {i} counts {c1.tolist()} (3 threads "
                                    f"{c3.tolist()}), reference {want.tolist()}")
                v, vw = lib.max_vio(sessions[1], i), max_vio(want)
                vios.append(vw)
                if abs(v - vw) > 1e-12 * max(1.0, abs(vw)):
                    vio_ok = False
                    problems.append(f"layer {i} MaxVio {v!r}, reference {vw!r}")
                L = model.layers[i]
                if L["expect_bias_effect"] and not diag.get("bias_changed"):
                    problems.append(f"layer {i}: the bias changes no selection (weak test data)")
                if L["expect_group_effect"] and not diag.get("group_changed"):
                    problems.append(f"layer {i}: the group limit changes no selection (weak data)")
            all_v, all_w = lib.max_vio(sessions[1], MOERT_ALL_LAYERS), sum(vios) / len(vios)
            if abs(all_v - all_w) > 1e-12 * max(1.0, abs(all_w)):
                vio_ok = False
                problems.append(f"MaxVio over all layers {all_v!r}, reference {all_w!r}")
            if gaps.near_ties:
                problems.append(f"{gaps.near_ties} near-tie routing decision(s) in the reference "
                                f"(smallest gap {gaps.min_gap:.2e} < {TIE_TOL:g}): choose "
                                "another seed for this model")
            if gaps.exact_ties < MIN_EXACT_TIES.get(model.name, 0):
                problems.append("no exact tie reached a routing decision (weak test data)")
            if rel > REL_TOL or not np.isfinite(rel):
                problems.append(f"relative error {rel:.3e} > {REL_TOL:g}")
            if not bitwise:
                problems.append("outputs differ between 1 and 3 threads or between two calls")
            check_errors(lib, sessions[3], model, inp, model.width, moe_layers,
                         {i: lib.counts(sessions[3], i, model.layers[i]["E"])
                          for i in moe_layers})
            # The session goes on after the errors, with the same results.
            if lib.forward(sessions[3], model.token_input, inp, model.width).tobytes() != \
                    outs[3].tobytes():
                problems.append("forward after the error checks gives different results")
            steer = ",".join(
                f"{d.get('bias_changed', '-')}/{d.get('group_changed', '-')}"
                if "capacity" not in d else f"cap{d['capacity']}"
                for _, d in (ref_moe_stats[i] for i in moe_layers))
            lines.append(
                f"{model.name:20s} rows={rows:4d} rel_err={rel:.3e} "
                f"counts={'ok' if counts_ok else 'MISMATCH'} maxvio={'ok' if vio_ok else 'MISMATCH'} "
                f"threads_bitwise={'ok' if bitwise else 'DIFF'} min_gap={gaps.min_gap:.1e} "
                f"exact_ties={gaps.exact_ties} bias/group_changed={steer}")
            failures += [f"{model.name} rows={rows}: {p}" for p in problems]
        return lines, failures
    finally:
        for s in sessions.values():
            lib.lib.moert_session_free(s)
        if handle is not None:
            lib.lib.moert_model_free(handle)


def main():
    args = parse_args(__doc__)
    lib = Lib(args.lib)
    if not lib.abi_ok():
        return 1
    # The NULL status is success: code 0, empty message; freeing NULL is allowed.
    if lib.take(None) != (0, "") or lib.lib.moert_status_code(None) != 0:
        print("FAIL: the NULL status is not MOERT_OK")
        return 1
    lib.lib.moert_status_free(None)

    rng = np.random.default_rng(20240601)
    return run_models(MODELS, lambda factory: run_model(lib, factory, args, rng), "oracle")


if __name__ == "__main__":
    sys.exit(main())
