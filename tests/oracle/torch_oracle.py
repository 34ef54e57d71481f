#!/usr/bin/python3
"""Independent PyTorch oracle for moert's fp32 CPU forward pass.

Builds small random models in Python, writes them as FlatBuffers JSON (converted with flatc), runs
them through libmoert.so via ctypes, and compares against a float64 PyTorch forward written from
DESIGN.md section 1:

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

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import traceback

try:
    import numpy as np
    import torch
except ImportError as exc:  # pragma: no cover - depends on the machine
    print(f"SKIP: cannot import numpy/torch with {sys.executable}: {exc}")
    sys.exit(77)

F64 = torch.float64
REL_TOL = 1e-5
# A routing decision whose deciding gap (between the last chosen and the first rejected biased
# score, group score or, for Expert Choice, token score) is below this is a near-tie: the float64
# reference and the fp32 library may legitimately decide it differently. Scores live in [0, 1]
# (plus a bias below 1 in magnitude), and the fp32 library's scores differ from the float64 ones
# by ~1e-6 at most for these sizes (the outputs agree to ~5e-7 relative), so 2e-5 leaves a 10x
# margin. A model whose reference meets a near-tie is reported as a failure of the test's own
# set-up (choose another seed or size), never hidden by a looser tolerance; with the seeds below
# the smallest deciding gap is ~1e-4. Gaps of exactly 0 are structural ties built on purpose
# (identical router rows or identical token rows), which both sides must break towards the lower
# index; both BLAS builds tried (OpenBLAS, BLIS) give bitwise-equal dot products for them.
TIE_TOL = 2e-5

MOERT_ERR_INVALID_ARGUMENT = 1
MOERT_COUNTS_LAST = 0
MOERT_ERR_NUMERIC = 7
MOERT_INPUT_TOKENS = 1
MOERT_INPUT_HIDDEN = 2
MOERT_ALL_LAYERS = 0xFFFFFFFF


class OracleFailure(Exception):
    pass


def f32(v):
    """The double that a float32 field written as `v` holds."""
    return float(np.float32(v))


# ---- bf16 -------------------------------------------------------------------------------------


def f32_to_bf16_bits(a):
    """Round-to-nearest-even fp32 -> bf16 bit patterns (finite inputs)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- weights and JSON -------------------------------------------------------------------------


class WeightStore:
    """Tensors either inline ("data": byte list) or in one external file at 64-byte offsets."""

    def __init__(self, file_name):
        self.file_name = file_name
        self.blob = bytearray()

    def add(self, values, where="ext", dtype="F32", shape=True):
        values = np.ascontiguousarray(values, dtype=np.float32)
        if dtype == "BF16":
            bits = f32_to_bf16_bits(values)
            raw = bits.astype("<u2").tobytes()
            used = bf16_bits_to_f32(bits).reshape(values.shape)
        elif dtype == "F32":
            raw = values.astype("<f4").tobytes()
            used = values
        else:
            raise ValueError(dtype)
        t = {"dtype": dtype}
        if shape:
            t["shape"] = [int(d) for d in values.shape]
        if where == "ext":
            self.blob += bytes((-len(self.blob)) % 64)
            if len(self.blob) % 128 == 0:
                self.blob += bytes(64)  # offsets not all multiples of 128: only 64 is promised
            t["external"] = {"offset": len(self.blob), "size": len(raw)}
            self.blob += raw
        elif where == "inline":
            t["data"] = list(raw)
        else:
            raise ValueError(where)
        return t, torch.from_numpy(used.astype(np.float64))


class ModelBuilder:
    def __init__(self, name, seed, input_dim=None):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.store = WeightStore(name + ".weights")
        self.input_dim = input_dim
        self.layers_json = []
        self.layers = []  # reference description, one dict per layer
        self.width = input_dim

    def _normal(self, shape, std):
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def _push(self, kind, body, ref):
        name = f"{kind.lower()}{len(self.layers)}"
        self.layers_json.append({"name": name, "kind_type": kind, "kind": body})
        ref["kind"] = kind
        self.layers.append(ref)

    def embedding(self, vocab, dim, context, where="ext", dtype="F32"):
        t, w = self.store.add(self._normal((vocab, dim), 1.0), where, dtype)
        self._push("Embedding", {"vocab_size": vocab, "dim": dim, "context": context, "weight": t},
                   {"vocab": vocab, "context": context, "weight": w})
        self.width = dim * context

    def rmsnorm(self, eps=1e-5, where="inline", dtype="F32"):
        d = self.width
        t, w = self.store.add(1.0 + self._normal((d,), 0.2), where, dtype)
        self._push("RMSNorm", {"dim": d, "eps": f32(eps), "weight": t}, {"eps": f32(eps), "weight": w})

    def dense(self, hidden, residual, where=("ext", "ext", "ext"), dtype="F32"):
        d = self.width
        t1, w1 = self.store.add(self._normal((hidden, d), d ** -0.5), where[0], dtype)
        t3, w3 = self.store.add(self._normal((hidden, d), d ** -0.5), where[1], dtype)
        t2, w2 = self.store.add(self._normal((d, hidden), hidden ** -0.5), where[2], dtype)
        self._push("DenseFFN", {"dim": d, "hidden": hidden, "residual": residual,
                                "w1": t1, "w3": t3, "w2": t2},
                   {"residual": residual, "w1": w1, "w3": w3, "w2": w2})

    def moe(self, E, K, H, score, G, TG, normalize, scaling, policy, residual, shared=0,
            shared_hidden=0, bias_scale=0.0, bias_offset=0.0, capacity_factor=None, gate_std=None,
            where="ext", inline=(), dtype="F32", gate_dtype="F32", tied_experts=(),
            expect_bias_effect=False, expect_group_effect=False):
        d = self.width
        assert G == 1 or (E % G == 0 and E // G >= 2), "group size 1 has no top-2 group score"
        gate = self._normal((E, d), (gate_std if gate_std is not None else 1.5) * d ** -0.5)
        bias = None
        if bias_scale:
            bias = (bias_offset + self.rng.uniform(-bias_scale, bias_scale, E)).astype(np.float32)
        for a, b in tied_experts:  # identical router row and bias: an exact tie on every token
            gate[b] = gate[a]
            if bias is not None:
                bias[b] = bias[a]

        def w(key):
            return "inline" if key in inline else where

        body = {
            "dim": d, "num_experts": E, "top_k": K, "expert_hidden": H, "score_function": score,
            "num_groups": G, "topk_groups": TG, "normalize_weights": normalize,
            "routed_scaling_factor": f32(scaling), "num_shared_experts": shared,
            "shared_hidden": shared_hidden, "residual": residual,
            "balancing": {"policy": policy},
        }
        if capacity_factor is not None:
            body["balancing"]["capacity_factor"] = f32(capacity_factor)
        ref = {"E": E, "K": K, "score": score, "G": G, "TG": TG, "normalize": normalize,
               "scaling": f32(scaling), "policy": policy, "residual": residual,
               "cf": f32(capacity_factor) if capacity_factor is not None else 1.0,
               "expect_bias_effect": expect_bias_effect,
               "expect_group_effect": expect_group_effect}
        body["gate"], ref["gate"] = self.store.add(gate, w("gate"), gate_dtype)
        if bias is not None:
            body["gate_bias"], ref["bias"] = self.store.add(bias, w("gate_bias"), "F32")
        else:
            ref["bias"] = torch.zeros(E, dtype=F64)
        body["w1"], ref["w1"] = self.store.add(self._normal((E, H, d), d ** -0.5), w("w1"), dtype)
        body["w3"], ref["w3"] = self.store.add(self._normal((E, H, d), d ** -0.5), w("w3"), dtype)
        body["w2"], ref["w2"] = self.store.add(self._normal((E, d, H), H ** -0.5), w("w2"), dtype)
        ref["shared"] = []
        if shared:
            S, HS = shared, shared_hidden
            body["shared_w1"], s1 = self.store.add(self._normal((S, HS, d), d ** -0.5),
                                                   w("shared_w1"), dtype)
            body["shared_w3"], s3 = self.store.add(self._normal((S, HS, d), d ** -0.5),
                                                   w("shared_w3"), dtype)
            body["shared_w2"], s2 = self.store.add(self._normal((S, d, HS), HS ** -0.5),
                                                   w("shared_w2"), dtype)
            ref["shared"] = [(s1[i], s3[i], s2[i]) for i in range(S)]
        self._push("MoE", body, ref)

    def head(self, vocab, bias, where="ext", dtype="F32"):
        d = self.width
        body = {"dim": d, "vocab_size": vocab}
        ref = {}
        body["weight"], ref["weight"] = self.store.add(self._normal((vocab, d), d ** -0.5), where,
                                                       dtype)
        ref["bias"] = None
        if bias:
            body["bias"], ref["bias"] = self.store.add(self._normal((vocab,), 0.5), "inline", dtype)
        self._push("OutputHead", body, ref)
        self.width = vocab

    @property
    def token_input(self):
        return self.layers[0]["kind"] == "Embedding"

    def write(self, workdir, flatc, schema):
        doc = {"schema_major": 1, "schema_minor": 0, "name": self.name, "layers": self.layers_json}
        if self.input_dim is not None:
            doc["input_dim"] = self.input_dim
        if self.store.blob:
            doc["external_data"] = self.store.file_name
            with open(os.path.join(workdir, self.store.file_name), "wb") as f:
                f.write(bytes(self.store.blob))
        json_path = os.path.join(workdir, self.name + ".json")
        with open(json_path, "w") as f:
            json.dump(doc, f)
        convert_json(flatc, schema, json_path, workdir)
        path = os.path.join(workdir, self.name + ".moert")
        if not os.path.isfile(path):
            raise OracleFailure(f"flatc did not write {path}")
        return path


def convert_json(flatc, schema, json_path, workdir):
    """flatc -b schema model.json, writing <name>.moert (the schema's file_extension)."""
    cmd = [flatc, "-b", "-o", workdir, schema, json_path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise OracleFailure(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")


# ---- the float64 reference --------------------------------------------------------------------


def swiglu(x, w1, w3, w2):
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def router_logits(x, gate):
    """x . gate^T, computed once per distinct (row, router row) pair so that identical rows give
    bitwise-identical logits: structural ties stay exact ties in the reference."""
    xu, xi = torch.unique(x, dim=0, return_inverse=True)
    gu, gi = torch.unique(gate, dim=0, return_inverse=True)
    return (xu @ gu.T)[xi][:, gi]


def descending_order(v):
    """Indices sorting the last dimension by decreasing value, the lower index first among equals."""
    return torch.sort(-v, dim=-1, stable=True).indices


class Gaps:
    """Deciding gaps of routing decisions: exact ties are counted, near-ties are set-up errors."""

    def __init__(self):
        self.min_gap = math.inf
        self.exact_ties = 0
        self.near_ties = 0

    def add(self, gap):
        gap = gap.reshape(-1)
        self.exact_ties += int((gap == 0).sum())
        pos = gap[gap > 0]
        if pos.numel():
            self.min_gap = min(self.min_gap, float(pos.min()))
        self.near_ties += int(((gap > 0) & (gap < TIE_TOL)).sum())


def select_topk(biased, G, TG, K, gaps=None):
    rows, E = biased.shape
    masked = biased
    if G > 1:
        gsize = E // G
        grouped = biased.reshape(rows, G, gsize)
        group_score = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(-1)
        gorder = descending_order(group_score)
        keep = torch.zeros(rows, G, dtype=torch.bool)
        keep.scatter_(1, gorder[:, :TG], True)
        if gaps is not None and TG < G:
            ranked = group_score.gather(1, gorder)
            gaps.add(ranked[:, TG - 1] - ranked[:, TG])
        masked = biased.masked_fill(~keep.repeat_interleave(gsize, dim=1), -math.inf)
    order = descending_order(masked)
    if gaps is not None and K < E:
        ranked = masked.gather(1, order)
        gaps.add(ranked[:, K - 1] - ranked[:, K])  # inf when the next one is masked
    return order[:, :K]


def as_sets(sel):
    return [frozenset(r) for r in sel.tolist()]


def ref_moe(L, x, gaps, diag):
    rows = x.shape[0]
    E, K = L["E"], L["K"]
    logits = router_logits(x, L["gate"])
    scores = torch.sigmoid(logits) if L["score"] == "Sigmoid" else torch.softmax(logits, dim=-1)
    gate_w = torch.zeros(rows, E, dtype=F64)
    chosen = torch.zeros(rows, E, dtype=torch.bool)
    if L["policy"] == "ExpertChoice":
        # Same double arithmetic as the definition: cf (an fp32 field) * rows * top_k / E.
        cap = min(rows, math.ceil(L["cf"] * rows * K / E))
        for e in range(E):
            col = scores[:, e]
            order = descending_order(col)
            take = order[:cap]
            chosen[take, e] = True
            gate_w[take, e] = col[take] * L["scaling"]
            if cap < rows:
                gaps.add(col[order[cap - 1]] - col[order[cap]])
        diag["capacity"] = cap
    else:
        biased = scores + L["bias"].unsqueeze(0)
        sel = select_topk(biased, L["G"], L["TG"], K, gaps)
        w = scores.gather(1, sel)
        if L["normalize"]:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * L["scaling"]
        gate_w.scatter_(1, sel, w)
        chosen.scatter_(1, sel, True)
        picked = as_sets(sel)
        # How much the bias and the group limit actually steer this data (the test's own power).
        diag["bias_changed"] = sum(
            a != b for a, b in zip(picked, as_sets(select_topk(scores, L["G"], L["TG"], K))))
        diag["group_changed"] = sum(
            a != b for a, b in zip(picked, as_sets(select_topk(biased, 1, 1, K))))
    out = x.clone() if L["residual"] else torch.zeros_like(x)
    for s1, s3, s2 in L["shared"]:
        out = out + swiglu(x, s1, s3, s2)
    for e in range(E):
        m = chosen[:, e]
        if m.any():
            out[m] += gate_w[m, e:e + 1] * swiglu(x[m], L["w1"][e], L["w3"][e], L["w2"][e])
    counts = chosen.sum(0).to(torch.int64).numpy()
    return out, counts


def reference_forward(model, inp):
    """inp: int32 tokens [rows, context] or float32 hidden states [rows, input_dim]."""
    gaps = Gaps()
    moe = {}  # layer index -> (counts, diagnostics)
    layers = model.layers
    if model.token_input:
        L = layers[0]
        x = L["weight"][torch.from_numpy(inp.astype(np.int64))].reshape(inp.shape[0], -1)
        start = 1
    else:
        x = torch.from_numpy(inp.astype(np.float64))
        start = 0
    for i in range(start, len(layers)):
        L = layers[i]
        k = L["kind"]
        if k == "RMSNorm":
            x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + L["eps"]) * L["weight"]
        elif k == "DenseFFN":
            y = swiglu(x, L["w1"], L["w3"], L["w2"])
            x = x + y if L["residual"] else y
        elif k == "MoE":
            diag = {}
            x, counts = ref_moe(L, x, gaps, diag)
            moe[i] = (counts, diag)
        elif k == "OutputHead":
            x = x @ L["weight"].T
            if L["bias"] is not None:
                x = x + L["bias"]
        else:
            raise AssertionError(k)
    return x, moe, gaps


def max_vio(counts):
    mean = float(np.sum(counts)) / len(counts)
    return 0.0 if mean == 0 else (float(np.max(counts)) - mean) / mean


# ---- the library through ctypes ---------------------------------------------------------------


class Lib:
    def __init__(self, path):
        lib = ctypes.CDLL(path)
        P, U32, U64, I32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32
        PP = ctypes.POINTER(ctypes.c_void_p)
        FP = ctypes.POINTER(ctypes.c_float)
        sig = {
            "moert_abi_version": (U32, []),
            "moert_status_code": (I32, [P]),
            "moert_status_message": (ctypes.c_char_p, [P]),
            "moert_status_free": (None, [P]),
            "moert_model_load_file": (P, [ctypes.c_char_p, PP]),
            "moert_model_free": (None, [P]),
            "moert_model_io": (P, [P, ctypes.POINTER(I32), ctypes.POINTER(U32),
                                   ctypes.POINTER(U32)]),
            "moert_session_options_create": (P, [PP]),
            "moert_session_options_free": (None, [P]),
            "moert_session_options_set_threads": (P, [P, U32]),
            "moert_session_create": (P, [P, P, PP]),
            "moert_session_free": (None, [P]),
            "moert_session_forward_tokens": (P, [P, ctypes.POINTER(I32), U64, U64, FP, U64]),
            "moert_session_forward_hidden": (P, [P, FP, U64, U64, FP, U64]),
            "moert_session_expert_counts": (P, [P, U32, I32, ctypes.POINTER(ctypes.c_int64), U64]),
            "moert_session_max_vio": (P, [P, U32, I32, ctypes.POINTER(ctypes.c_double)]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        self.lib = lib

    def take(self, st):
        """(code, message) of a status, freeing it; (0, '') for NULL."""
        if not st:
            return 0, ""
        code = self.lib.moert_status_code(st)
        msg = self.lib.moert_status_message(st).decode("utf-8", "replace")
        self.lib.moert_status_free(st)
        return code, msg

    def ok(self, st, what):
        code, msg = self.take(st)
        if code != 0 or msg:
            raise OracleFailure(f"{what}: status code {code}: {msg}")

    def expect(self, st, want, what):
        code, msg = self.take(st)
        if code != want:
            raise OracleFailure(f"{what}: expected status code {want}, got {code} ({msg!r})")
        if not msg:
            raise OracleFailure(f"{what}: error status without a message")
        return msg

    def load(self, path):
        m = ctypes.c_void_p()
        self.ok(self.lib.moert_model_load_file(path.encode(), ctypes.byref(m)), f"load {path}")
        return m

    def session(self, model, threads):
        o = ctypes.c_void_p()
        self.ok(self.lib.moert_session_options_create(ctypes.byref(o)), "options_create")
        try:
            self.ok(self.lib.moert_session_options_set_threads(o, threads), "set_threads")
            s = ctypes.c_void_p()
            self.ok(self.lib.moert_session_create(model, o, ctypes.byref(s)), "session_create")
        finally:
            self.lib.moert_session_options_free(o)
        return s

    def forward_raw(self, sess, token_input, inp, rows, out):
        fp = ctypes.POINTER(ctypes.c_float)
        if token_input:
            return self.lib.moert_session_forward_tokens(
                sess, inp.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), inp.size, rows,
                out.ctypes.data_as(fp), out.size)
        return self.lib.moert_session_forward_hidden(sess, inp.ctypes.data_as(fp), inp.size, rows,
                                                     out.ctypes.data_as(fp), out.size)

    def forward(self, sess, token_input, inp, out_width):
        rows = inp.shape[0]
        out = np.full((rows, out_width), np.nan, dtype=np.float32)
        self.ok(self.forward_raw(sess, token_input, inp, rows, out), f"forward rows={rows}")
        return out

    def counts(self, sess, layer, E):
        c = np.zeros(E, dtype=np.int64)
        self.ok(self.lib.moert_session_expert_counts(
            sess, layer, MOERT_COUNTS_LAST, c.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), E),
            f"expert_counts layer {layer}")
        return c

    def max_vio(self, sess, layer):
        v = ctypes.c_double(-1.0)
        self.ok(self.lib.moert_session_max_vio(sess, layer, MOERT_COUNTS_LAST, ctypes.byref(v)), f"max_vio {layer}")
        return v.value


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
          policy="AuxLoss", residual=True, shared=1, shared_hidden=6, where="inline")
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
    E, K = L["E"], L["K"]
    cap = min(rows, math.ceil(L["cf"] * rows * K / E))
    for e in range(E):
        logits = router_logits(torch.from_numpy(x.astype(np.float64)), L["gate"])
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
        moe_layers = [i for i, L in enumerate(model.layers) if L["kind"] == "MoE"]
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", required=True, help="path of libmoert.so")
    ap.add_argument("--flatc", required=True, help="path of flatc")
    ap.add_argument("--schema", required=True, help="path of schemas/moert.fbs")
    ap.add_argument("--workdir", required=True, help="where models are written")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(1)

    lib = Lib(args.lib)
    if lib.lib.moert_abi_version() != 1:
        print(f"FAIL: moert_abi_version() is {lib.lib.moert_abi_version()}, expected 1")
        return 1
    # The NULL status is success: code 0, empty message; freeing NULL is allowed.
    if lib.take(None) != (0, "") or lib.lib.moert_status_code(None) != 0:
        print("FAIL: the NULL status is not MOERT_OK")
        return 1
    lib.lib.moert_status_free(None)

    rng = np.random.default_rng(20240601)
    all_failures = []
    for factory in MODELS:
        try:
            lines, failures = run_model(lib, factory, args, rng)
        except Exception as exc:  # one broken model must not hide the others
            traceback.print_exc()
            lines, failures = [], [f"{factory.__name__}: {type(exc).__name__}: {exc}"]
        for line in lines:
            print(line)
        all_failures += failures
    for f in all_failures:
        print("FAIL:", f)
    print("oracle:", "FAILED" if all_failures else "all models agree")
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
