#!/usr/bin/python3
"""Independent PyTorch oracle for moert's fp32 CPU training: forward, backward and one step.

Builds small random models in Python, writes them as FlatBuffers JSON (converted with flatc) with
an external fp32 data file, runs them through libmoert.so via ctypes in MOERT_MODE_TRAINING, and
compares with PyTorch autograd of a float64 model written from docs/design.md section 1:

  logits s = u . W_g^T (fp32 in the library); scores sigmoid(s) or softmax(s); selection on the
  biased scores score + b (group score = sum of the group's top-2 biased scores, best topk_groups
  groups kept, the rest -inf; then top-K); gate weights from the UNBIASED scores of the selected
  experts, w = c * s_k / (sum_selected s + 1e-20) with normalisation, else c * s_k, where c is
  routed_scaling_factor; Expert Choice: each expert takes its capacity = min(rows,
  ceil(cf * rows * K / E)) best tokens by score, weight c * s[t, e] (no renormalisation). The
  selection itself is not differentiable and the bias b gets no gradient.
  h = [u +] sum_shared FFN_s(u) + sum_selected w_i FFN_i(u), SwiGLU experts W2 (silu(W1 x) * W3 x).
  Auxiliary losses (docs/design.md section 1 item 7): AuxLoss, the Switch/GShard form over the
  batch alpha * E * sum_i (count_i / (K T)) * P_i; SequenceAuxLoss, DeepSeek-V3's sequence-wise
  form alpha * mean over sequences of sum_i f_i P_i with f_i = E / (K L) * (the sequence's tokens
  sent to i) and P_i = the sequence's mean of s'_i = s_i / sum_j s_j (L = "sequence_length" rows,
  the whole batch when 0). f carries no gradient.
  Token models (ending in an OutputHead): loss = mean softmax cross-entropy + aux losses.
  Hidden-state models: loss = sum(out * grad_out) + aux losses, with a random grad_out.

Per model, for AdamW (weight_decay 0.1) and SGD (momentum 0.9, weight_decay 0.1) sessions with 1
and 3 threads, the protocol is: micro-batch A (forward + backward) on a fresh session; zero_grad;
micro-batch B; zero_grad; A then B accumulated; step. Checks:
  - the parameter list is exactly the model's tensors (the gate bias is not one), values as stored;
  - loss (and the aux loss of hidden models) to 1e-5 relative; every parameter gradient and the
    input gradient to ||g - ref|| / ||ref|| <= 1e-4 per tensor (absolute 1e-10 where ref is 0);
  - per-expert counts equal, the step's counts those of the passes since the last zero_grad; the
    gate bias unchanged by backward; misuse (a second backward)
    refused with MOERT_ERR_INVALID_STATE and harmless;
  - zero_grad gives exact zeros; A+B accumulated = gA + gB to 1e-6 relative;
  - the step: new parameters within 1 fp32 ulp (and 1e-5 relative) of torch.optim.AdamW / SGD
    applied in float64 to the library's own gradients averaged over the 2 micro-batches, weight
    decay on tensors with >= 2 dimensions only; lr and gradient norm reported correctly; the
    loss-free bias moved by gamma * sign(mean - count) over the step's integer counts;
  - everything (gradients, losses, new parameters) bitwise identical with 1 and 3 threads.
Routing near-ties (deciding gap < 2e-5 in the float64 reference, exact ties included: these
models have none on purpose) are reported as a failure of the test's own set-up, never hidden.

Exit 0 when everything passes, 1 on any failure, 77 (skip) when torch or numpy is missing.
Run with Debian's /usr/bin/python3, which has python3-torch.
"""

import ctypes
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "oracle"))
from oracle_common import (  # noqa: E402 - first: exits 77 (skip) when numpy or torch is missing
    F64, MOERT_COUNTS_LAST, MOERT_COUNTS_STEP, MOERT_ERR_INVALID_STATE, MOERT_MODE_TRAINING,
    TIE_TOL, Gaps, Lib, ModelBuilder, embed, moe_output, parse_args, ref_layer, route, run_models)
import numpy as np  # noqa: E402
import torch  # noqa: E402

GRAD_REL_TOL = 1e-4   # fp32 accumulation against float64, per tensor
GRAD_ABS_TOL = 1e-10  # where the reference gradient is exactly zero (experts without tokens)
ZERO_REF = 1e-12      # a reference norm below this counts as zero
LOSS_REL_TOL = 1e-5
ACCUM_REL_TOL = 1e-6  # accumulated = sum of the single micro-batch gradients (both fp32)
OPT_REL_TOL = 1e-5
OPT_MAX_ULP = 1.0     # the library does the update in double and rounds once
AUX_POWER = 1e-2      # the aux loss's share of its gate gradient must be visible
DEFAULT_GAMMA = 0.001  # Balancing.bias_update_rate default in schemas/moert.fbs


# ---- weights and JSON (the builder itself is in oracle_common.py) ------------------------------


class TrainBuilder(ModelBuilder):
    """fp32 models with the gate biases, RMSNorm weights, the dense FFNs' w3, shared_w3 and the
    head's bias inline, every other tensor in the external file (at 64-byte offsets as they fall).
    sequence_length: rows per sequence for SequenceAuxLoss (0: the whole batch)."""

    def __init__(self, name, seed, input_dim=None, sequence_length=0):
        super().__init__(name, seed, input_dim, avoid_128=False)
        self.sequence_length = sequence_length

    def dense(self, hidden, residual):
        super().dense(hidden, residual, where=("ext", "inline", "ext"))

    def moe(self, *args, **kwargs):
        super().moe(*args, inline=("gate_bias", "shared_w3"), **kwargs)

    @property
    def params(self):
        """"<layer name>.<tensor>" -> float32 array: the trainable parameters, every stored
        tensor but the gate biases."""
        return {k: v for k, v in self.tensors.items() if not k.endswith(".gate_bias")}


# ---- the float64 reference with autograd (the shared pieces are in oracle_common.py) -----------


def ref_moe(L, P, x, seq_len, gaps, diag):
    rows = x.shape[0]
    E, K = L["E"], L["K"]
    scores, chosen, gate_w = route(L, x @ P[L["name"] + ".gate"].T, gaps, diag)
    out = moe_output(L, P, x, chosen, gate_w)
    aux = None
    alpha = L["alpha"]
    if L["policy"] in ("AuxLoss", "SequenceAuxLoss") and alpha > 0:
        sn = scores / scores.sum(-1, keepdim=True)
        cnt = chosen.to(F64)  # constant: f carries no gradient
        if L["policy"] == "AuxLoss" or seq_len == 0:
            # Switch/GShard over the whole batch: alpha * E * sum_i (count_i / (K T)) * P_i.
            aux = alpha * E * ((cnt.sum(0) / (K * rows)) * sn.mean(0)).sum()
        else:
            # DeepSeek-V3 sequence-wise: per sequence of seq_len rows, averaged over sequences.
            nq = rows // seq_len
            f = E / (K * seq_len) * cnt.reshape(nq, seq_len, E).sum(1)
            Pm = sn.reshape(nq, seq_len, E).mean(1)
            aux = alpha * (f * Pm).sum(-1).mean()
    counts = chosen.sum(0).to(torch.int64).numpy()
    return out, counts, aux


def reference(model, batch):
    """Float64 forward + autograd backward of one micro-batch."""
    P = {k: torch.from_numpy(v.astype(np.float64)).requires_grad_(True)
         for k, v in model.params.items()}
    inp = batch["inp"]
    gaps = Gaps(allow_exact_ties=False)  # no structural ties here: an exact tie is a near-tie
    moe = {}
    aux_terms = {}
    x_in = None
    if model.token_input:
        x = embed(model.layers[0], P, inp)
        start = 1
    else:
        x_in = torch.from_numpy(inp.astype(np.float64)).requires_grad_(True)
        x = x_in
        start = 0
    for i in range(start, len(model.layers)):
        L = model.layers[i]
        if L["kind"] == "MoE":
            diag = {}
            x, counts, aux = ref_moe(L, P, x, model.sequence_length, gaps, diag)
            moe[i] = (counts, diag)
            if aux is not None:
                aux_terms[i] = aux
        else:
            x = ref_layer(L, P, x)
    aux = sum(aux_terms.values()) if aux_terms else torch.zeros((), dtype=F64)
    if "targets" in batch:
        main = torch.nn.functional.cross_entropy(x, torch.from_numpy(
            batch["targets"].astype(np.int64)))
    else:
        main = (x * torch.from_numpy(batch["grad_out"].astype(np.float64))).sum()
    # The aux losses' share of their gate gradients: evidence that the test can see them.
    aux_power = {}
    for i, a in aux_terms.items():
        gate = P[model.layers[i]["name"] + ".gate"]
        ga, = torch.autograd.grad(a, gate, retain_graph=True)
        gm, = torch.autograd.grad(main, gate, retain_graph=True)
        aux_power[i] = float(ga.norm() / (ga + gm).norm())
    (main + aux).backward()
    return {
        "loss": float(main + aux) if "targets" in batch else None,
        "aux": float(aux),
        "grads": {k: v.grad.numpy() if v.grad is not None else np.zeros(v.shape)
                  for k, v in P.items()},
        "grad_in": x_in.grad.numpy() if x_in is not None else None,
        "moe": moe,
        "gaps": gaps,
        "aux_power": aux_power,
    }


# ---- the library through ctypes: the training calls -------------------------------------------


class TrainLib(Lib):
    def backward_loss_raw(self, sess, targets, loss):
        return self.lib.moert_session_backward_loss(
            sess, targets.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), targets.size,
            ctypes.byref(loss))

    def backward_raw(self, sess, grad_out, grad_in, aux):
        fp = ctypes.POINTER(ctypes.c_float)
        return self.lib.moert_session_backward(
            sess, grad_out.ctypes.data_as(fp), grad_out.size,
            grad_in.ctypes.data_as(fp) if grad_in is not None else None,
            grad_in.size if grad_in is not None else 0, ctypes.byref(aux))

    def parameters(self, sess):
        n = ctypes.c_uint32()
        self.ok(self.lib.moert_session_num_parameters(sess, ctypes.byref(n)), "num_parameters")
        out = []
        for i in range(n.value):
            name, numel = ctypes.c_char_p(), ctypes.c_uint64()
            self.ok(self.lib.moert_session_parameter_info(sess, i, ctypes.byref(name),
                                                          ctypes.byref(numel)),
                    f"parameter_info {i}")
            out.append((name.value.decode(), numel.value))
        return out

    def _floats(self, fn, sess, key, n, what):
        a = np.full(n, np.nan, dtype=np.float32)
        self.ok(fn(sess, key, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n), what)
        return a

    def parameter(self, sess, name, n):
        return self._floats(self.lib.moert_session_get_parameter, sess, name.encode(), n,
                            f"get_parameter {name}")

    def gradient(self, sess, name, n):
        return self._floats(self.lib.moert_session_get_gradient, sess, name.encode(), n,
                            f"get_gradient {name}")

    def bias(self, sess, layer, E):
        return self._floats(self.lib.moert_session_get_expert_bias, sess, layer, E,
                            f"get_expert_bias {layer}")


# ---- one session through the protocol ---------------------------------------------------------


def run_session(lib, handle, model, threads, config, batches):
    """A on a fresh session; zero_grad; B; zero_grad; A + B; step. Returns what the library said."""
    sess = lib.session(handle, threads, MOERT_MODE_TRAINING, config)
    r = {}
    try:
        params = lib.parameters(sess)
        r["param_list"] = params
        known = {n for n, _ in params}
        numel = {n: int(np.prod(v.shape)) for n, v in model.params.items()}
        names = [n for n in model.params if n in known]

        def grads():
            return {n: lib.gradient(sess, n, numel[n]) for n in names}

        def biases():
            return {i: lib.bias(sess, i, model.layers[i]["E"]) for i in model.moe_layers()}

        def counts(scope):
            return {i: lib.counts(sess, i, model.layers[i]["E"], scope)
                    for i in model.moe_layers()}

        def micro_batch(b):
            out = lib.forward(sess, model.token_input, b["inp"], model.width)
            val = ctypes.c_double(math.nan)
            grad_in = None
            if "targets" in b:
                lib.ok(lib.backward_loss_raw(sess, b["targets"], val), "backward_loss")
            else:
                if not model.token_input:
                    grad_in = np.full(b["inp"].shape, np.nan, dtype=np.float32)
                lib.ok(lib.backward_raw(sess, b["grad_out"], grad_in, val), "backward")
            return {"out": out, "value": val.value, "grad_in": grad_in, "counts":
                    counts(MOERT_COUNTS_LAST)}

        r["params0"] = {n: lib.parameter(sess, n, numel[n]) for n in names}
        r["bias0"] = biases()
        A, B = batches
        r["A"] = micro_batch(A)
        r["gA"] = grads()
        r["biasA"] = biases()
        # Misuse: a second backward for one forward is refused and changes nothing.
        val = ctypes.c_double()
        if "targets" in A:
            lib.expect(lib.backward_loss_raw(sess, A["targets"], val), MOERT_ERR_INVALID_STATE,
                       "a second backward_loss after one forward")
        else:
            lib.expect(lib.backward_raw(sess, A["grad_out"], None, val), MOERT_ERR_INVALID_STATE,
                       "a second backward after one forward")
        r["gA_after_misuse"] = grads()
        lib.ok(lib.lib.moert_session_zero_grad(sess), "zero_grad")
        r["B"] = micro_batch(B)
        r["gB"] = grads()
        lib.ok(lib.lib.moert_session_zero_grad(sess), "zero_grad")
        r["g0"] = grads()
        r["AB"] = [micro_batch(A), micro_batch(B)]
        r["gAB"] = grads()
        r["step_counts"] = counts(MOERT_COUNTS_STEP)
        lr, gnorm = ctypes.c_double(math.nan), ctypes.c_double(math.nan)
        lib.ok(lib.lib.moert_session_step(sess, ctypes.byref(lr), ctypes.byref(gnorm)), "step")
        r["lr"], r["grad_norm"] = lr.value, gnorm.value
        r["params1"] = {n: lib.parameter(sess, n, numel[n]) for n in names}
        r["bias1"] = biases()
        steps = ctypes.c_uint64()
        lib.ok(lib.lib.moert_session_step_count(sess, ctypes.byref(steps)), "step_count")
        r["steps"] = steps.value
        r["step_counts_after"] = counts(MOERT_COUNTS_STEP)
        return r
    finally:
        lib.lib.moert_session_free(sess)


# ---- comparisons ------------------------------------------------------------------------------


def rel_err(got, ref):
    """(error, absolute?) of a tensor: relative to ||ref||, absolute where ref is zero."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    d = float(np.linalg.norm(got - ref))
    rn = float(np.linalg.norm(ref))
    if rn < ZERO_REF:
        return d, True
    return d / rn, False


def compare_grads(got, ref, what, problems):
    """Worst relative error over the tensors; every tensor must pass."""
    worst, worst_name = 0.0, ""
    for n, g in got.items():
        e, absolute = rel_err(g, ref[n])
        if not np.all(np.isfinite(g)):
            problems.append(f"{what}: gradient of {n} is not finite")
            continue
        if absolute:
            if e > GRAD_ABS_TOL:
                problems.append(f"{what}: gradient of {n}: reference is 0, library norm {e:.3e}")
            continue
        if e > GRAD_REL_TOL:
            problems.append(f"{what}: gradient of {n}: relative error {e:.3e} > {GRAD_REL_TOL:g}")
        if e > worst:
            worst, worst_name = e, n
    return worst, worst_name


def optimizer_reference(model, params0, g_avg, kind, hp):
    """torch.optim applied in float64 to the library's own parameters and averaged gradients."""
    decay, no_decay = [], []
    order = list(params0)
    tensors = {}
    for n in order:
        p = torch.from_numpy(params0[n].astype(np.float64).reshape(model.params[n].shape))
        p.requires_grad_(True)
        p.grad = torch.from_numpy(g_avg[n].reshape(model.params[n].shape))
        tensors[n] = p
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": hp["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if kind == "adamw":
        opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8)
    else:
        opt = torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"])
    opt.step()
    return {n: tensors[n].detach().numpy().reshape(-1) for n in order}


def ulps(got, ref):
    """|got - ref| in units of the fp32 spacing at ref."""
    spacing = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - ref) / spacing


OPTIMIZERS = {
    # AdamW with its defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8) and decoupled decay 0.1.
    "adamw": ({"weight_decay": "0.1"}, {"lr": 1e-3, "weight_decay": 0.1}),
    # SGD with momentum and L2 decay; a larger lr so that the update is many ulps of a parameter.
    "sgd": ({"optimizer": "sgd", "momentum": "0.9", "weight_decay": "0.1", "lr": "0.1"},
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
}


def check_model(lib, factory, args):
    model, (rows_a, rows_b), data_seed = factory()
    path = model.write(args.workdir, args.flatc, args.schema)
    handle = lib.load(path)
    rng = np.random.default_rng(data_seed)

    def batch(rows):
        b = {}
        if model.token_input:
            # Distinct rows: two equal rows are an exact tie for Expert Choice, which the fp32
            # library may see as a near-tie either way once earlier layers have rounded them
            # differently. Tokens still repeat across rows and positions.
            L = model.layers[0]
            V, C = L["vocab"], L["context"]
            code = rng.choice(V ** C, size=rows, replace=False)
            b["inp"] = np.stack([(code // V ** c) % V for c in range(C)], 1).astype(np.int32)
        else:
            b["inp"] = rng.standard_normal((rows, model.input_dim)).astype(np.float32)
        if model.ends_in_head and model.token_input:
            b["targets"] = rng.integers(0, model.width, size=rows, dtype=np.int32)
        else:
            # The scale of a mean-over-rows loss, so that the aux losses are not drowned.
            b["grad_out"] = (rng.standard_normal((rows, model.width)) / rows).astype(np.float32)
        return b

    batches = [batch(rows_a), batch(rows_b)]
    refs = [reference(model, b) for b in batches]
    problems, lines = [], []
    seq_cfg = {"sequence_length": str(model.sequence_length)} if model.sequence_length else {}
    moe_layers = model.moe_layers()

    # Set-up checks: the reference's routing must be decisive and must exercise what it claims.
    for tag, ref in zip("AB", refs):
        g = ref["gaps"]
        if g.near_ties:
            problems.append(f"set-up: micro-batch {tag}: {g.near_ties} near-tie routing "
                            f"decision(s) in the reference (smallest gap {g.min_gap:.2e} < "
                            f"{TIE_TOL:g}): choose another seed for this model")
        for i in moe_layers:
            L, diag = model.layers[i], ref["moe"][i][1]
            if L["expect_bias_effect"] and not diag.get("bias_changed"):
                problems.append(f"set-up: layer {i}: the bias changes no selection ({tag})")
            if L["expect_group_effect"] and not diag.get("group_changed"):
                problems.append(f"set-up: layer {i}: the group limit changes no selection ({tag})")
        for i, p in ref["aux_power"].items():
            if p < AUX_POWER:
                problems.append(f"set-up: layer {i}: the aux loss is only {p:.1e} of its gate "
                                f"gradient ({tag}): raise alpha")

    lines.append("    set-up: min_gap=" + "/".join(f"{r['gaps'].min_gap:.1e}" for r in refs) +
                 " aux_share=" + ",".join(f"{p:.2f}" for r in refs
                                          for p in r["aux_power"].values()) +
                 " bias/group_changed=" + ",".join(
                     f"{d.get('bias_changed', '-')}/{d.get('group_changed', '-')}"
                     if "capacity" not in d else f"cap{d['capacity']}"
                     for r in refs for _, d in (r["moe"][i] for i in moe_layers)))
    try:
        results = {}
        for opt_name, (cfg, hp) in OPTIMIZERS.items():
            for threads in (1, 3):
                what = f"{opt_name}/threads={threads}"
                r = run_session(lib, handle, model, threads, {**cfg, **seq_cfg}, batches)
                results[(opt_name, threads)] = r
                check_session(model, r, refs, what, opt_name, hp, problems, lines,
                              report=(threads == 1))
            r1, r3 = results[(opt_name, 1)], results[(opt_name, 3)]
            if not bitwise_equal(r1, r3):
                problems.append(f"{opt_name}: results differ between 1 and 3 threads")
            else:
                lines.append(f"    {opt_name}: 1 and 3 threads bitwise identical")
        # The gradients do not depend on the optimizer.
        a, b = results[("adamw", 1)], results[("sgd", 1)]
        if any(a["gAB"][n].tobytes() != b["gAB"][n].tobytes() for n in a["gAB"]):
            problems.append("gradients differ between the AdamW and the SGD session")
    finally:
        lib.lib.moert_model_free(handle)
    return lines, [f"{model.name}: {p}" for p in problems]


def bitwise_equal(r1, r3):
    def flat(r):
        parts = []
        for key in ("gA", "gB", "gAB", "params1"):
            for n in sorted(r[key]):
                parts.append(r[key][n].tobytes())
        for key in ("bias1",):
            for i in sorted(r[key]):
                parts.append(r[key][i].tobytes())
        for mb in [r["A"], r["B"]] + r["AB"]:
            parts.append(mb["out"].tobytes())
            parts.append(np.float64(mb["value"]).tobytes())
            if mb["grad_in"] is not None:
                parts.append(mb["grad_in"].tobytes())
        parts.append(np.float64(r["grad_norm"]).tobytes())
        return parts

    return flat(r1) == flat(r3)


def check_session(model, r, refs, what, opt_name, hp, problems, lines, report):
    moe_layers = model.moe_layers()
    # The parameter list: exactly the model's tensors, the gate bias not among them.
    listed = dict(r["param_list"])
    want = {n: int(np.prod(v.shape)) for n, v in model.params.items()}
    if listed != want or len(r["param_list"]) != len(listed):
        problems.append(f"{what}: parameters {r['param_list']}, expected {sorted(want.items())}")
    moe_names = {model.layers[i]["name"] for i in moe_layers}
    if any(n.split(".", 1)[0] in moe_names and "bias" in n.split(".", 1)[-1] for n in listed):
        problems.append(f"{what}: a gate bias is listed among the parameters: {sorted(listed)}")
    if set(listed) != set(want):
        return  # nothing below can be matched up
    for n, v in r["params0"].items():
        if v.tobytes() != model.params[n].reshape(-1).tobytes():
            problems.append(f"{what}: parameter {n} does not hold the stored weights")
    for i in moe_layers:
        stored = model.layers[i]["bias"]
        for key, when in (("bias0", "before training"), ("biasA", "after a backward")):
            if r[key][i].tobytes() != stored.tobytes():
                problems.append(f"{what}: layer {i} gate bias {when} is {r[key][i].tolist()}, "
                                f"stored {stored.tolist()}")

    # Single micro-batches against the reference.
    stats = {}
    for tag, mb, g, ref in (("A", r["A"], r["gA"], refs[0]), ("B", r["B"], r["gB"], refs[1])):
        for i in moe_layers:
            if not np.array_equal(mb["counts"][i], ref["moe"][i][0]):
                problems.append(f"{what}: micro-batch {tag} layer {i} counts "
                                f"{mb['counts'][i].tolist()}, reference "
                                f"{ref['moe'][i][0].tolist()}")
        if ref["loss"] is not None:
            le = abs(mb["value"] - ref["loss"]) / abs(ref["loss"])
            if not le <= LOSS_REL_TOL:
                problems.append(f"{what}: micro-batch {tag} loss {mb['value']!r}, reference "
                                f"{ref['loss']!r} (relative error {le:.2e})")
        else:  # the aux loss of a hidden-state model
            if ref["aux"] == 0.0:
                le = abs(mb["value"])
                if mb["value"] != 0.0:
                    problems.append(f"{what}: micro-batch {tag} aux loss {mb['value']!r}, "
                                    "reference 0")
            else:
                le = abs(mb["value"] - ref["aux"]) / abs(ref["aux"])
                if not le <= LOSS_REL_TOL:
                    problems.append(f"{what}: micro-batch {tag} aux loss {mb['value']!r}, "
                                    f"reference {ref['aux']!r} (relative error {le:.2e})")
        worst, worst_name = compare_grads(g, ref["grads"], f"{what} micro-batch {tag}", problems)
        gi = None
        if mb["grad_in"] is not None:
            gi, absolute = rel_err(mb["grad_in"], ref["grad_in"])
            if absolute or gi > GRAD_REL_TOL or not np.all(np.isfinite(mb["grad_in"])):
                problems.append(f"{what}: micro-batch {tag} grad_in error {gi:.3e}")
        stats[tag] = (le, worst, worst_name, gi)
    for n, v in r["gA_after_misuse"].items():
        if v.tobytes() != r["gA"][n].tobytes():
            problems.append(f"{what}: a refused second backward changed the gradient of {n}")
            break

    # zero_grad and accumulation.
    for n, v in r["g0"].items():
        if np.any(v != 0.0):
            problems.append(f"{what}: gradient of {n} not zero after zero_grad")
    acc_worst = 0.0
    for n, v in r["gAB"].items():
        want_sum = r["gA"][n].astype(np.float64) + r["gB"][n].astype(np.float64)
        e, absolute = rel_err(v, want_sum)
        if absolute:
            if e != 0.0:
                problems.append(f"{what}: accumulated gradient of {n} is not 0 ({e:.2e})")
        else:
            acc_worst = max(acc_worst, e)
            if e > ACCUM_REL_TOL:
                problems.append(f"{what}: accumulated gradient of {n}: relative error {e:.2e} "
                                f"against gA + gB > {ACCUM_REL_TOL:g}")
    for k, (mb, ref) in enumerate(zip(r["AB"], refs)):
        for i in moe_layers:
            if not np.array_equal(mb["counts"][i], ref["moe"][i][0]):
                problems.append(f"{what}: accumulation pass {k} layer {i} counts differ")

    # Step counts: the training-mode forwards since the last zero_grad (A, B); zero_grad discards
    # the counts of the passes before it, as it discards their gradients.
    want_counts = {i: refs[0]["moe"][i][0] + refs[1]["moe"][i][0] for i in moe_layers}
    for i in moe_layers:
        if not np.array_equal(r["step_counts"][i], want_counts[i]):
            problems.append(f"{what}: layer {i} step counts {r['step_counts'][i].tolist()}, "
                            f"expected {want_counts[i].tolist()}")
        if np.any(r["step_counts_after"][i] != 0):
            problems.append(f"{what}: layer {i} step counts not reset by the step")

    # The optimizer step against torch.optim on the library's own averaged gradients.
    g_avg = {n: v.astype(np.float64) / 2.0 for n, v in r["gAB"].items()}
    ref_p = optimizer_reference(model, r["params0"], g_avg, opt_name, hp)
    max_ulp, upd_num, upd_den, par_num, par_den = 0.0, 0.0, 0.0, 0.0, 0.0
    for n, got in r["params1"].items():
        u = ulps(got, ref_p[n])
        max_ulp = max(max_ulp, float(u.max()))
        p0 = r["params0"][n].astype(np.float64)
        upd_num += float(np.sum((got - ref_p[n]) ** 2))
        upd_den += float(np.sum((ref_p[n] - p0) ** 2))
        par_num += float(np.sum((got - ref_p[n]) ** 2))
        par_den += float(np.sum(ref_p[n] ** 2))
        if u.max() > OPT_MAX_ULP or not np.all(np.isfinite(got)):
            k = int(np.argmax(u))
            problems.append(f"{what}: step: {n}[{k}] = {float(got[k])!r}, reference "
                            f"{float(ref_p[n][k])!r} ({float(u[k]):.1f} ulp > {OPT_MAX_ULP:g})")
    par_rel = math.sqrt(par_num / par_den)
    upd_rel = math.sqrt(upd_num / upd_den) if upd_den > 0 else math.inf
    if par_rel > OPT_REL_TOL:
        problems.append(f"{what}: step: parameters relative error {par_rel:.2e} > {OPT_REL_TOL:g}")
    want_norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2))
                              for v in r["gAB"].values())) / 2.0
    if abs(r["grad_norm"] - want_norm) > 1e-9 * want_norm:
        problems.append(f"{what}: step reports grad_norm {r['grad_norm']!r}, expected {want_norm!r}")
    if r["lr"] != hp["lr"]:
        problems.append(f"{what}: step reports lr {r['lr']!r}, expected {hp['lr']!r}")
    if r["steps"] != 1:
        problems.append(f"{what}: step_count {r['steps']}, expected 1")
    # Loss-free bias: b_i += gamma * sign(mean - count_i) over the step's integer counts.
    for i in moe_layers:
        L = model.layers[i]
        want_b = L["bias"].copy()
        if L["policy"] == "LossFreeBias":
            c = want_counts[i]
            mean = float(c.sum()) / len(c)
            gamma = np.float32(DEFAULT_GAMMA)
            for e in range(len(c)):
                if mean > c[e]:
                    want_b[e] = np.float32(want_b[e] + gamma)
                elif mean < c[e]:
                    want_b[e] = np.float32(want_b[e] - gamma)
        if r["bias1"][i].tobytes() != want_b.tobytes():
            problems.append(f"{what}: layer {i} bias after the step {r['bias1'][i].tolist()}, "
                            f"expected {want_b.tolist()}")

    if report:
        for tag in "AB":
            le, worst, worst_name, gi = stats[tag]
            gi_s = f" grad_in={gi:.2e}" if gi is not None else ""
            lname = "loss_rel" if model.ends_in_head and model.token_input else "aux_err"
            lines.append(f"    {what} micro-batch {tag}: {lname}={le:.1e} "
                         f"max_grad_rel={worst:.2e} ({worst_name}){gi_s}")
        lines.append(f"    {what} accumulation max_rel={acc_worst:.1e}; step: max {max_ulp:.2f} "
                     f"ulp, params_rel={par_rel:.1e}, update_rel={upd_rel:.1e}")


# ---- the models -------------------------------------------------------------------------------
# Each factory returns (builder, (rows of micro-batch A, rows of micro-batch B), data seed).


def model_tok_groups_lfb():
    """Tokens (context 3); RMSNorm; grouped sigmoid MoE (4 groups, keep 2) with a loss-free bias,
    normalisation, scaling 2.5 and a shared expert; dense FFN with residual; RMSNorm; ungrouped
    softmax MoE without normalisation, policy None, 2 shared experts; head with bias."""
    b = TrainBuilder("train_tok_groups_lfb", seed=1101)
    b.embedding(vocab=40, dim=8, context=3)
    b.rmsnorm()
    b.moe(E=8, K=2, H=12, score="Sigmoid", G=4, TG=2, normalize=True, scaling=2.5,
          policy="LossFreeBias", residual=True, shared=1, shared_hidden=10, bias_scale=0.25,
          expect_bias_effect=True, expect_group_effect=True)
    b.dense(hidden=20, residual=True)
    b.rmsnorm()
    b.moe(E=6, K=2, H=8, score="Softmax", G=1, TG=1, normalize=False, scaling=1.0,
          policy="None", residual=True, shared=2, shared_hidden=6)
    b.head(vocab=40, bias=True)
    return b, (70, 45), 11


def model_tok_aux_seq():
    """Tokens (context 2), sequence_length 8; grouped softmax MoE (2 groups, keep 1), normalised,
    scaling 1.5, SequenceAuxLoss, no residual; RMSNorm; sigmoid MoE top-3 without normalisation,
    scaling 0.8, AuxLoss (whole batch whatever sequence_length says), one shared expert; head
    without bias."""
    b = TrainBuilder("train_tok_aux_seq", seed=2202, sequence_length=8)
    b.embedding(vocab=32, dim=12, context=2)
    b.moe(E=8, K=2, H=10, score="Softmax", G=2, TG=1, normalize=True, scaling=1.5,
          policy="SequenceAuxLoss", aux_alpha=0.3, residual=False, gate_std=2.5,
          expect_group_effect=True)
    b.rmsnorm()
    b.moe(E=6, K=3, H=8, score="Sigmoid", G=1, TG=1, normalize=False, scaling=0.8,
          policy="AuxLoss", aux_alpha=0.2, residual=True, shared=1, shared_hidden=8)
    b.head(vocab=32, bias=False)
    return b, (72, 40), 23


def model_hidden_ec():
    """Hidden states; sigmoid MoE, no normalisation, scaling 1, policy None, no residual, no shared
    expert; dense FFN without residual; RMSNorm; Expert Choice softmax MoE (cf 1.25, scaling 1.3)
    with a shared expert. No head: backward from a random output gradient, with grad_in."""
    b = TrainBuilder("train_hidden_ec", seed=3303, input_dim=16)
    b.moe(E=6, K=2, H=10, score="Sigmoid", G=1, TG=1, normalize=False, scaling=1.0,
          policy="None", residual=False)
    b.dense(hidden=16, residual=False)
    b.rmsnorm()
    b.moe(E=8, K=2, H=8, score="Softmax", G=1, TG=1, normalize=False, scaling=1.3,
          policy="ExpertChoice", capacity_factor=1.25, residual=True, shared=1, shared_hidden=8)
    return b, (100, 37), 33


def model_hidden_aux_groups():
    """Hidden states; RMSNorm; grouped sigmoid MoE (3 groups, keep 2) top-3, normalised, scaling
    0.7, AuxLoss, 2 shared experts; Expert Choice sigmoid MoE (cf 0.5, scaling 2, no residual);
    head with bias, trained from a random output gradient (backward, not backward_loss)."""
    b = TrainBuilder("train_hidden_aux_groups", seed=4404, input_dim=20)
    b.rmsnorm()
    b.moe(E=12, K=3, H=8, score="Sigmoid", G=3, TG=2, normalize=True, scaling=0.7,
          policy="AuxLoss", aux_alpha=0.5, residual=True, shared=2, shared_hidden=6,
          expect_group_effect=True)
    b.moe(E=4, K=1, H=8, score="Sigmoid", G=1, TG=1, normalize=False, scaling=2.0,
          policy="ExpertChoice", capacity_factor=0.5, residual=False)
    b.head(vocab=10, bias=True)
    return b, (66, 90), 44


def model_tok_ec_lfb():
    """Tokens (context 1); grouped softmax MoE (4 groups, keep 2) with a loss-free bias,
    normalised; Expert Choice softmax MoE (cf 1.25, scaling 2, normalize_weights set but ignored
    by Expert Choice); head without bias."""
    b = TrainBuilder("train_tok_ec_lfb", seed=5505)
    b.embedding(vocab=120, dim=16, context=1)
    b.moe(E=8, K=2, H=12, score="Softmax", G=4, TG=2, normalize=True, scaling=1.0,
          policy="LossFreeBias", residual=True, bias_scale=0.04, gate_std=2.5,
          expect_bias_effect=True, expect_group_effect=True)
    b.moe(E=4, K=2, H=8, score="Softmax", G=1, TG=1, normalize=True, scaling=2.0,
          policy="ExpertChoice", capacity_factor=1.25, residual=True)
    b.head(vocab=25, bias=False)
    return b, (50, 80), 55


MODELS = [model_tok_groups_lfb, model_tok_aux_seq, model_hidden_ec, model_hidden_aux_groups,
          model_tok_ec_lfb]


def main():
    args = parse_args(__doc__)
    lib = TrainLib(args.lib)
    if not lib.abi_ok():
        return 1
    return run_models(MODELS, lambda factory: check_model(lib, factory, args), "backward oracle",
                      named=True)


if __name__ == "__main__":
    sys.exit(main())
