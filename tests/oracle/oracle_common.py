"""What the two PyTorch oracles share: tests/oracle/torch_oracle.py (forward) and
tests/oracle_train/torch_grad_oracle.py (training).

  - random models written as FlatBuffers JSON and converted with flatc (ModelBuilder, WeightStore);
  - the float64 reference's pieces, from docs/design.md section 1: SwiGLU, routing (selection, gate
    weights, Expert Choice capacity), the MoE output, the other layers; differentiable, so that
    the training oracle takes its gradients with autograd;
  - libmoert.so through ctypes (Lib: the C ABI's signatures, statuses, sessions, forward, counts);
  - the command line and the loop over the models.

Importing it exits with 77 (skip) when numpy or torch is missing, so each oracle imports it first.
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
# A routing decision whose deciding gap (between the last chosen and the first rejected biased
# score, group score or, for Expert Choice, token score) is below this is a near-tie: the float64
# reference and the fp32 library may legitimately decide it differently. Scores live in [0, 1]
# (plus a bias below 1 in magnitude), and the fp32 library's scores differ from the float64 ones
# by ~1e-6 at most for these sizes (the outputs agree to ~5e-7 relative), so 2e-5 leaves a 10x
# margin. A model whose reference meets a near-tie is reported as a failure of the test's own
# set-up (choose another seed or size), never hidden by a looser tolerance. Gaps of exactly 0 are
# structural ties built on purpose (identical router rows or identical token rows), which both
# sides must break towards the lower index (see Gaps).
TIE_TOL = 2e-5

# capi/include/moert/moert.h
MOERT_ERR_INVALID_ARGUMENT = 1
MOERT_ERR_INVALID_STATE = 6
MOERT_ERR_NUMERIC = 7
MOERT_INPUT_TOKENS = 1
MOERT_INPUT_HIDDEN = 2
MOERT_MODE_TRAINING = 1
MOERT_COUNTS_LAST = 0
MOERT_COUNTS_STEP = 1
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
    """Tensors either inline ("data": byte list) or in one external file at 64-byte offsets; with
    avoid_128, no external offset is a multiple of 128 (only 64 is promised)."""

    def __init__(self, file_name, avoid_128):
        self.file_name = file_name
        self.avoid_128 = avoid_128
        self.blob = bytearray()

    def add(self, values, where="ext", dtype="F32"):
        """(the tensor's JSON, its values as the library reads them: float32, rounded for BF16)."""
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
        t = {"dtype": dtype, "shape": [int(d) for d in values.shape]}
        if where == "ext":
            self.blob += bytes((-len(self.blob)) % 64)
            if self.avoid_128 and len(self.blob) % 128 == 0:
                self.blob += bytes(64)
            t["external"] = {"offset": len(self.blob), "size": len(raw)}
            self.blob += raw
        elif where == "inline":
            t["data"] = list(raw)
        else:
            raise ValueError(where)
        return t, used


class ModelBuilder:
    """A random model: its FlatBuffers JSON and the reference's description of it.

    layers: one dict per layer with its kind, name and settings; tensors: "<layer name>.<field>"
    -> float32 array, every stored tensor as the library reads it. Each tensor's placement
    (where: "ext" or "inline", per tensor or per layer) and dtype can be chosen; the random draws
    do not depend on them, so a seed gives the same values whatever the storage.
    """

    def __init__(self, name, seed, input_dim=None, avoid_128=True):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.store = WeightStore(name + ".weights", avoid_128)
        self.input_dim = input_dim
        self.layers_json = []
        self.layers = []  # reference description, one dict per layer
        self.tensors = {}
        self.width = input_dim

    def _normal(self, shape, std):
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def _name(self, kind):
        return f"{kind.lower()}{len(self.layers)}"

    def _tensor(self, layer, field, values, where, dtype="F32"):
        t, self.tensors[f"{layer}.{field}"] = self.store.add(values, where, dtype)
        return t

    def _push(self, kind, name, body, ref):
        self.layers_json.append({"name": name, "kind_type": kind, "kind": body})
        ref["kind"] = kind
        ref["name"] = name
        self.layers.append(ref)

    def embedding(self, vocab, dim, context, where="ext", dtype="F32"):
        n = self._name("Embedding")
        t = self._tensor(n, "weight", self._normal((vocab, dim), 1.0), where, dtype)
        self._push("Embedding", n, {"vocab_size": vocab, "dim": dim, "context": context,
                                    "weight": t}, {"vocab": vocab, "context": context})
        self.width = dim * context

    def rmsnorm(self, eps=1e-5, where="inline", dtype="F32"):
        d, n = self.width, self._name("RMSNorm")
        t = self._tensor(n, "weight", 1.0 + self._normal((d,), 0.2), where, dtype)
        self._push("RMSNorm", n, {"dim": d, "eps": f32(eps), "weight": t}, {"eps": f32(eps)})

    def dense(self, hidden, residual, where=("ext", "ext", "ext"), dtype="F32"):
        d, n = self.width, self._name("DenseFFN")
        body = {"dim": d, "hidden": hidden, "residual": residual}
        body["w1"] = self._tensor(n, "w1", self._normal((hidden, d), d ** -0.5), where[0], dtype)
        body["w3"] = self._tensor(n, "w3", self._normal((hidden, d), d ** -0.5), where[1], dtype)
        body["w2"] = self._tensor(n, "w2", self._normal((d, hidden), hidden ** -0.5), where[2],
                                  dtype)
        self._push("DenseFFN", n, body, {"residual": residual})

    def moe(self, E, K, H, score, G, TG, normalize, scaling, policy, residual, shared=0,
            shared_hidden=0, bias_scale=0.0, bias_offset=0.0, aux_alpha=None,
            capacity_factor=None, gate_std=None, where="ext", inline=(), dtype="F32",
            gate_dtype="F32", tied_experts=(), expect_bias_effect=False,
            expect_group_effect=False):
        """inline: the tensors (by field name) stored inline whatever `where` says. ref["bias"]
        is the gate bias (float32, zeros without one); the gate bias is always F32."""
        d, n = self.width, self._name("MoE")
        assert G == 1 or (E % G == 0 and E // G >= 2), "group size 1 has no top-2 group score"
        gate = self._normal((E, d), (gate_std if gate_std is not None else 1.5) * d ** -0.5)
        bias = None
        if bias_scale:
            bias = (bias_offset + self.rng.uniform(-bias_scale, bias_scale, E)).astype(np.float32)
        for a, b in tied_experts:  # identical router row and bias: an exact tie on every token
            gate[b] = gate[a]
            if bias is not None:
                bias[b] = bias[a]

        def put(field, values, dt=dtype):
            return self._tensor(n, field, values, "inline" if field in inline else where, dt)

        body = {
            "dim": d, "num_experts": E, "top_k": K, "expert_hidden": H, "score_function": score,
            "num_groups": G, "topk_groups": TG, "normalize_weights": normalize,
            "routed_scaling_factor": f32(scaling), "num_shared_experts": shared,
            "shared_hidden": shared_hidden, "residual": residual,
            "balancing": {"policy": policy},
        }
        if capacity_factor is not None:
            body["balancing"]["capacity_factor"] = f32(capacity_factor)
        if aux_alpha is not None:
            body["balancing"]["aux_alpha"] = f32(aux_alpha)
        ref = {"E": E, "K": K, "score": score, "G": G, "TG": TG, "normalize": normalize,
               "scaling": f32(scaling), "policy": policy, "residual": residual, "S": shared,
               "cf": f32(capacity_factor) if capacity_factor is not None else 1.0,
               "alpha": f32(aux_alpha) if aux_alpha is not None else 0.0,
               "bias": bias if bias is not None else np.zeros(E, dtype=np.float32),
               "expect_bias_effect": expect_bias_effect,
               "expect_group_effect": expect_group_effect}
        body["gate"] = put("gate", gate, gate_dtype)
        if bias is not None:
            body["gate_bias"] = put("gate_bias", bias, "F32")
        body["w1"] = put("w1", self._normal((E, H, d), d ** -0.5))
        body["w3"] = put("w3", self._normal((E, H, d), d ** -0.5))
        body["w2"] = put("w2", self._normal((E, d, H), H ** -0.5))
        if shared:
            S, HS = shared, shared_hidden
            body["shared_w1"] = put("shared_w1", self._normal((S, HS, d), d ** -0.5))
            body["shared_w3"] = put("shared_w3", self._normal((S, HS, d), d ** -0.5))
            body["shared_w2"] = put("shared_w2", self._normal((S, d, HS), HS ** -0.5))
        self._push("MoE", n, body, ref)

    def head(self, vocab, bias, where="ext", dtype="F32"):
        """The bias, if any, is inline."""
        d, n = self.width, self._name("OutputHead")
        body = {"dim": d, "vocab_size": vocab}
        body["weight"] = self._tensor(n, "weight", self._normal((vocab, d), d ** -0.5), where,
                                      dtype)
        if bias:
            body["bias"] = self._tensor(n, "bias", self._normal((vocab,), 0.5), "inline", dtype)
        self._push("OutputHead", n, body, {"has_bias": bias})
        self.width = vocab

    @property
    def token_input(self):
        return self.layers[0]["kind"] == "Embedding"

    @property
    def ends_in_head(self):
        return self.layers[-1]["kind"] == "OutputHead"

    def moe_layers(self):
        return [i for i, L in enumerate(self.layers) if L["kind"] == "MoE"]

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
# W below maps "<layer name>.<field>" to float64 tensors (leaves requiring gradients, or not).


def swiglu(x, w1, w3, w2):
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def descending_order(v):
    """Indices sorting the last dimension by decreasing value, the lower index first among equals."""
    return torch.sort(-v, dim=-1, stable=True).indices


class Gaps:
    """Deciding gaps of routing decisions: near-ties (gap < TIE_TOL) are set-up errors. Exact ties
    (gap 0) are counted; with allow_exact_ties they are structural ties built on purpose, otherwise
    near-ties like any other small gap."""

    def __init__(self, allow_exact_ties=True):
        self.allow_exact_ties = allow_exact_ties
        self.min_gap = math.inf
        self.exact_ties = 0
        self.near_ties = 0

    def add(self, gap):
        gap = gap.reshape(-1)
        self.exact_ties += int((gap == 0).sum())
        if self.allow_exact_ties:
            gap = gap[gap > 0]
        if gap.numel():
            self.min_gap = min(self.min_gap, float(gap.min()))
        self.near_ties += int((gap < TIE_TOL).sum())


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


def ec_capacity(L, rows):
    """Expert Choice: the tokens each expert takes. The same double arithmetic as the definition:
    cf (an fp32 field) * rows * top_k / E."""
    return min(rows, math.ceil(L["cf"] * rows * L["K"] / L["E"]))


def route(L, logits, gaps, diag):
    """Routing of MoE layer L from its router logits [rows, E]: (scores, chosen [rows, E] bool,
    gate weights [rows, E], 0 where not chosen). The selection uses the detached scores: it is not
    differentiable, and the gate bias gets no gradient. Deciding gaps go to `gaps`; `diag` gets
    the capacity (Expert Choice), or how many rows the bias and the group limit change (token
    choice: the test's own power)."""
    rows, E = logits.shape
    K = L["K"]
    scores = torch.sigmoid(logits) if L["score"] == "Sigmoid" else torch.softmax(logits, dim=-1)
    sd = scores.detach()
    chosen = torch.zeros(rows, E, dtype=torch.bool)
    if L["policy"] == "ExpertChoice":
        cap = ec_capacity(L, rows)
        for e in range(E):
            order = descending_order(sd[:, e])
            chosen[order[:cap], e] = True
            if cap < rows:
                gaps.add(sd[order[cap - 1], e] - sd[order[cap], e])
        diag["capacity"] = cap
        return scores, chosen, scores * chosen.to(F64) * L["scaling"]  # no renormalisation
    biased = sd + torch.from_numpy(L["bias"].astype(np.float64)).unsqueeze(0)
    sel = select_topk(biased, L["G"], L["TG"], K, gaps)
    w = scores.gather(1, sel)  # the unbiased scores
    if L["normalize"]:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * L["scaling"]
    chosen.scatter_(1, sel, True)
    picked = as_sets(sel)
    diag["bias_changed"] = sum(
        a != b for a, b in zip(picked, as_sets(select_topk(sd, L["G"], L["TG"], K))))
    diag["group_changed"] = sum(
        a != b for a, b in zip(picked, as_sets(select_topk(biased, 1, 1, K))))
    return scores, chosen, torch.zeros(rows, E, dtype=F64).scatter(1, sel, w)


def moe_output(L, W, x, chosen, gate_w):
    """h = [x +] sum_shared FFN_s(x) + sum_selected w_i FFN_i(x)."""
    n = L["name"]
    out = x if L["residual"] else torch.zeros_like(x)
    for s in range(L["S"]):
        out = out + swiglu(x, W[n + ".shared_w1"][s], W[n + ".shared_w3"][s],
                           W[n + ".shared_w2"][s])
    for e in range(L["E"]):
        idx = chosen[:, e].nonzero().squeeze(1)
        if idx.numel():
            y = gate_w[idx, e:e + 1] * swiglu(x[idx], W[n + ".w1"][e], W[n + ".w3"][e],
                                              W[n + ".w2"][e])
            out = torch.index_add(out, 0, idx, y)
    return out


def embed(L, W, tokens):
    """The embedding layer on int32 tokens [rows, context]: rows of context * dim."""
    return W[L["name"] + ".weight"][torch.from_numpy(tokens.astype(np.int64))].reshape(
        tokens.shape[0], -1)


def ref_layer(L, W, x):
    """An RMSNorm, DenseFFN or OutputHead layer."""
    k, n = L["kind"], L["name"]
    if k == "RMSNorm":
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + L["eps"]) * W[n + ".weight"]
    if k == "DenseFFN":
        y = swiglu(x, W[n + ".w1"], W[n + ".w3"], W[n + ".w2"])
        return x + y if L["residual"] else y
    if k == "OutputHead":
        x = x @ W[n + ".weight"].T
        return x + W[n + ".bias"] if L["has_bias"] else x
    raise AssertionError(k)


# ---- the library through ctypes ---------------------------------------------------------------


class Lib:
    def __init__(self, path):
        lib = ctypes.CDLL(path)
        P, U32, U64, I32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32
        PP = ctypes.POINTER(ctypes.c_void_p)
        FP = ctypes.POINTER(ctypes.c_float)
        DP = ctypes.POINTER(ctypes.c_double)
        CP = ctypes.c_char_p
        sig = {
            "moert_abi_version": (U32, []),
            "moert_status_code": (I32, [P]),
            "moert_status_message": (CP, [P]),
            "moert_status_free": (None, [P]),
            "moert_model_load_file": (P, [CP, PP]),
            "moert_model_free": (None, [P]),
            "moert_model_io": (P, [P, ctypes.POINTER(I32), ctypes.POINTER(U32),
                                   ctypes.POINTER(U32)]),
            "moert_session_options_create": (P, [PP]),
            "moert_session_options_free": (None, [P]),
            "moert_session_options_set_threads": (P, [P, U32]),
            "moert_session_options_set_mode": (P, [P, I32]),
            "moert_session_options_set_config": (P, [P, CP, CP]),
            "moert_session_create": (P, [P, P, PP]),
            "moert_session_free": (None, [P]),
            "moert_session_forward_tokens": (P, [P, ctypes.POINTER(I32), U64, U64, FP, U64]),
            "moert_session_forward_hidden": (P, [P, FP, U64, U64, FP, U64]),
            "moert_session_expert_counts": (P, [P, U32, I32, ctypes.POINTER(ctypes.c_int64),
                                                U64]),
            "moert_session_max_vio": (P, [P, U32, I32, DP]),
            "moert_session_backward_loss": (P, [P, ctypes.POINTER(I32), U64, DP]),
            "moert_session_backward": (P, [P, FP, U64, FP, U64, DP]),
            "moert_session_zero_grad": (P, [P]),
            "moert_session_step": (P, [P, DP, DP]),
            "moert_session_step_count": (P, [P, ctypes.POINTER(U64)]),
            "moert_session_num_parameters": (P, [P, ctypes.POINTER(U32)]),
            "moert_session_parameter_info": (P, [P, U32, ctypes.POINTER(CP),
                                                 ctypes.POINTER(U64)]),
            "moert_session_get_parameter": (P, [P, CP, FP, U64]),
            "moert_session_get_gradient": (P, [P, CP, FP, U64]),
            "moert_session_get_expert_bias": (P, [P, U32, FP, U64]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        self.lib = lib

    def abi_ok(self):
        """moert_abi_version() is 1; a FAIL line otherwise."""
        if self.lib.moert_abi_version() != 1:
            print(f"FAIL: moert_abi_version() is {self.lib.moert_abi_version()}, expected 1")
            return False
        return True

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

    def session(self, model, threads, mode=None, config=None):
        """A session with `threads` threads; mode and config settings only where given."""
        o = ctypes.c_void_p()
        self.ok(self.lib.moert_session_options_create(ctypes.byref(o)), "options_create")
        try:
            self.ok(self.lib.moert_session_options_set_threads(o, threads), "set_threads")
            if mode is not None:
                self.ok(self.lib.moert_session_options_set_mode(o, mode), "set_mode")
            for k, v in (config or {}).items():
                self.ok(self.lib.moert_session_options_set_config(o, k.encode(), v.encode()),
                        f"set_config {k}={v}")
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

    def counts(self, sess, layer, E, scope=MOERT_COUNTS_LAST):
        c = np.zeros(E, dtype=np.int64)
        self.ok(self.lib.moert_session_expert_counts(
            sess, layer, scope, c.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), E),
            f"expert_counts layer {layer}")
        return c

    def max_vio(self, sess, layer):
        v = ctypes.c_double(-1.0)
        self.ok(self.lib.moert_session_max_vio(sess, layer, MOERT_COUNTS_LAST, ctypes.byref(v)),
                f"max_vio {layer}")
        return v.value


# ---- the command line and the models ----------------------------------------------------------


def parse_args(doc):
    """--lib, --flatc, --schema and --workdir (created); torch on one thread."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--lib", required=True, help="path of libmoert.so")
    ap.add_argument("--flatc", required=True, help="path of flatc")
    ap.add_argument("--schema", required=True, help="path of schemas/moert.fbs")
    ap.add_argument("--workdir", required=True, help="where models are written")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(1)
    return args


def run_models(factories, check, verdict, named=False):
    """check(factory) -> (lines, failures) for each model factory, one broken model not hiding
    the others; prints the lines (after the factory's name when named), every failure and the
    verdict line "<verdict>: ...". Returns the exit code."""
    all_failures = []
    for factory in factories:
        try:
            lines, failures = check(factory)
        except Exception as exc:  # one broken model must not hide the others
            traceback.print_exc()
            lines, failures = [], [f"{factory.__name__}: {type(exc).__name__}: {exc}"]
        if named:
            print(factory.__name__)
        for line in lines:
            print(line)
        all_failures += failures
    for f in all_failures:
        print("FAIL:", f)
    print(f"{verdict}:", "FAILED" if all_failures else "all models agree")
    return 1 if all_failures else 0
