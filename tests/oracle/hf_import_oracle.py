"""`moert import` / `moert export` against an independent float64 oracle (label oracle, cli).

Builds small Hugging Face checkpoints in each family's exact layout (config.json, tensor names,
dtypes, FP8 `weight_scale_inv` [ceil(out/128), ceil(in/128)], a sharded
model.safetensors.index.json) with random weights, written here byte by byte from the safetensors
specification (not by moert's writer). Each is imported with the `moert` command and run through
libmoert.so (ctypes); the output is compared with a NumPy float64 implementation of that family's
MoE block written from the published model code (transformers' DeepseekV3MoE/MoEGate,
Glm4MoeMoE, Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock), on the weights as stored (bf16 and FP8 decoded
exactly: FP8 value = E4M3 code value * block scale):
  - relative error ||out - ref|| / ||ref|| <= 1e-5, and per row;
  - the tokens each expert receives equal the oracle's (exact selection; near-ties are refused
    as a failure of the set-up);
then exports the imported model (in its family's layout) and imports the export again: the two moert
files (description and data) must be identical byte for byte, and the exported tensors must equal
the checkpoint's; a softmax model exported as the other softmax family runs identically, and an
export to a family of the other score function is refused. Finally,
checkpoints that moert must refuse (a dense layer, transposed scales, an unknown scoring function,
a tensor with no place in moert, router jitter) must fail with a message naming the culprit.

Needs NumPy (skips with 77 without it). Usage:
  hf_import_oracle.py --lib libmoert.so --cli moert --workdir DIR
"""

import argparse
import ctypes
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - depends on the machine
    print(f"SKIP: cannot import numpy with {sys.executable}: {exc}")
    sys.exit(77)

REL_TOL = 1e-5
TIE_TOL = 2e-5
MOERT_COUNTS_LAST = 0


class Failure(Exception):
    pass


# ---- element types, from their definitions -------------------------------------------------


def bf16_bits(a):
    """fp32 -> bf16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def e4m3_value(code):
    """OCP E4M3 "fn": bias 7, 3 mantissa bits, exponent 0 subnormal, 0x7F/0xFF NaN."""
    code = np.asarray(code, dtype=np.uint8)
    s = np.where(code >> 7, -1.0, 1.0)
    e = ((code >> 3) & 15).astype(np.int64)
    m = (code & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    return s * mag


_E4M3_POS = e4m3_value(np.arange(0x7F, dtype=np.uint8))  # 0x00..0x7E, ascending


def e4m3_code(v):
    """Nearest E4M3 code of each value (|v| <= 448)."""
    a = np.abs(v)
    i = np.clip(np.searchsorted(_E4M3_POS, a), 1, len(_E4M3_POS) - 1)
    lo, hi = _E4M3_POS[i - 1], _E4M3_POS[i]
    idx = np.where(a - lo <= hi - a, i - 1, i).astype(np.uint8)
    return np.where(v < 0, idx | 0x80, idx).astype(np.uint8)


def quantize_fp8(w, block=128):
    """DeepSeek-V3's layout: codes [out, in] and weight_scale_inv [ceil(out/b), ceil(in/b)] with
    dequantised = code value * scale. Returns (codes, scales fp32, dequantised float64)."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    scales = np.zeros((br, bc), dtype=np.float32)
    codes = np.zeros(w.shape, dtype=np.uint8)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = np.float32(np.abs(blk).max() / 448.0)
            scales[i, j] = s
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = e4m3_code(blk / s)
    deq = e4m3_value(codes) * np.repeat(np.repeat(scales.astype(np.float64), block, 0), block,
                                        1)[:rows, :cols]
    return codes, scales, deq


# ---- safetensors, from the format's specification -------------------------------------------


def write_safetensors(path, tensors):
    """tensors: name -> (dtype string, shape, raw bytes), laid out in name order."""
    header, data = {}, b""
    for name in sorted(tensors):
        dt, shape, raw = tensors[name]
        header[name] = {"dtype": dt, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[name] = (v["dtype"], tuple(v["shape"]), data[b:e])
    return out


def read_checkpoint(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if not os.path.exists(index):
        return read_safetensors(os.path.join(d, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        out.update(read_safetensors(os.path.join(d, name)))
    return out


class Store:
    """Tensors of a checkpoint being built, and their float64 values as the model code sees them."""

    def __init__(self, rng):
        self.rng = rng
        self.tensors = {}
        self.values = {}

    def put(self, name, shape, dtype, std=0.05, values=None, scale_dtype="F32"):
        w = values if values is not None else self.rng.normal(0, std, size=shape)
        w = np.asarray(w, dtype=np.float32)
        if dtype == "F32":
            self.tensors[name] = ("F32", shape, w.tobytes())
            self.values[name] = w.astype(np.float64)
        elif dtype == "BF16":
            bits = bf16_bits(w)
            self.tensors[name] = ("BF16", shape, bits.tobytes())
            self.values[name] = bf16_value(bits)
        elif dtype == "F8_E4M3":
            codes, scales, deq = quantize_fp8(w)
            self.tensors[name] = ("F8_E4M3", shape, codes.tobytes())
            if scale_dtype == "F32":
                raw = scales.tobytes()
            else:
                # Qwen3's FP8 releases store the scales in 16 bits: the values are those stored.
                if scale_dtype == "BF16":
                    bits = bf16_bits(scales)
                    stored, raw = bf16_value(bits), bits.tobytes()
                else:
                    half = scales.astype("<f2")
                    stored, raw = half.astype(np.float64), half.tobytes()
                rows, cols = shape
                deq = e4m3_value(codes) * np.repeat(np.repeat(stored, 128, 0), 128,
                                                    1)[:rows, :cols]
            self.tensors[name + "_scale_inv"] = (scale_dtype, scales.shape, raw)
            self.values[name] = deq
        else:
            raise ValueError(dtype)
        return self.values[name]

    def write(self, d, config, shards=1):
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        names = sorted(self.tensors)
        if shards == 1:
            write_safetensors(os.path.join(d, "model.safetensors"), self.tensors)
            return
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: self.tensors[n] for n in names[s::shards]}
            write_safetensors(os.path.join(d, file), part)
            weight_map.update({n: file for n in part})
        total = sum(len(t[2]) for t in self.tensors.values())
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---- the families' MoE blocks in float64, from the published model code ---------------------


def silu(x):
    return x / (1.0 + np.exp(-x))


def expert(x, w1, w3, w2):
    """down(silu(gate(x)) * up(x)); x [N, D], weights as stored [out, in]."""
    return (silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def topk_desc(v, k):
    """Indices of the k largest values, ties to the lower index; and the gap between the k-th
    and the (k+1)-th largest (inf when there is none)."""
    order = np.argsort(-v, kind="stable")
    gap = v[order[k - 1]] - v[order[k]] if k < len(v) else np.inf
    return order[:k], gap


def route_deepseek(cfg, logits, bias, gaps, norm_single=False):
    """MoEGate with topk_method noaux_tc: selection on sigmoid + bias, groups by top-2 sum,
    masked groups at -inf; weights from the unbiased scores, normalised when norm_topk_prob and
    K > 1 (DeepSeek's code) or whenever norm_topk_prob (norm_single: Glm4MoeMoE)."""
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    G, TG = cfg["n_group"], cfg["topk_group"]
    scores = 1.0 / (1.0 + np.exp(-logits))
    sel, weights = [], []
    for t in range(logits.shape[0]):
        biased = scores[t] + bias
        groups = biased.reshape(G, E // G)
        gs = np.sort(groups, axis=1)[:, ::-1][:, :2].sum(axis=1)
        kept, g_gap = topk_desc(gs, TG)
        gaps[t] = min(gaps[t], g_gap)
        masked = np.full(E, -np.inf)
        for g in kept:
            masked[g * (E // G):(g + 1) * (E // G)] = biased[g * (E // G):(g + 1) * (E // G)]
        idx, gap = topk_desc(masked, K)
        gaps[t] = min(gaps[t], gap)
        w = scores[t, idx]
        if cfg["norm_topk_prob"] and (K > 1 or norm_single):
            w = w / (w.sum() + 1e-20)
        sel.append(idx)
        weights.append(w * cfg["routed_scaling_factor"])
    return sel, weights


def route_softmax(K, normalize, logits, gaps):
    """Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock: softmax, top-K, optional renormalisation."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    sel, weights = [], []
    for t in range(p.shape[0]):
        idx, gap = topk_desc(p[t], K)
        gaps[t] = min(gaps[t], gap)
        w = p[t, idx]
        if normalize:
            w = w / w.sum()
        sel.append(idx)
        weights.append(w)
    return sel, weights


def moe_block(family, cfg, V, layer, x, gaps):
    """The MLP module's output for input rows x and the experts each row chose; gaps[t] is
    lowered to row t's smallest routing gap."""
    pre = f"model.layers.{layer}." + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    logits = x @ V[pre + "gate.weight"].T
    if family in ("deepseek_v3", "glm4_moe"):
        E = cfg["n_routed_experts"]
        sel, weights = route_deepseek(cfg, logits, V[pre + "gate.e_score_correction_bias"], gaps,
                                      norm_single=family == "glm4_moe")
    elif family == "qwen3_moe":
        E = cfg["num_experts"]
        sel, weights = route_softmax(cfg["num_experts_per_tok"], cfg["norm_topk_prob"], logits,
                                     gaps)
    else:
        E = cfg["num_local_experts"]
        sel, weights = route_softmax(cfg["num_experts_per_tok"], True, logits, gaps)
    names = ({1: "w1", 3: "w3", 2: "w2"} if family == "mixtral"
             else {1: "gate_proj", 3: "up_proj", 2: "down_proj"})
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(sel[t], weights[t]):
            ws = [V[f"{pre}experts.{e}.{names[k]}.weight"] for k in (1, 3, 2)]
            y[t] += w * expert(x[t:t + 1], *ws)[0]
    if family in ("deepseek_v3", "glm4_moe") and cfg.get("n_shared_experts"):
        y += expert(x, *[V[f"{pre}shared_experts.{p}.weight"]
                         for p in ("gate_proj", "up_proj", "down_proj")])
    return y, sel, E


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * w


# ---- the checkpoints ------------------------------------------------------------------------


def deepseek(name, dtype, shared_dtype, gate_dtype, seed, shards, layers, D=160, fp8=False):
    """A DeepSeek-V3-layout checkpoint: 5 decoder layers, layer 0 dense, 16 experts in 4 groups,
    2 groups kept, top-4, 2 shared experts; D = 160 makes 128x128 FP8 blocks partial."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": D, "num_hidden_layers": 5, "intermediate_size": 256,
        "moe_intermediate_size": 96, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "n_group": 4, "topk_group": 2, "n_shared_experts": 2, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
        "torch_dtype": "bfloat16",
    }
    if fp8:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                      "quant_method": "fp8", "weight_block_size": [128, 128]}
    rng = np.random.default_rng(seed)
    st = Store(rng)
    H, E, SH = 96, 16, 192
    for L in range(5):
        st.put(f"model.layers.{L}.post_attention_layernorm.weight", (D,), gate_dtype,
               values=1.0 + rng.normal(0, 0.1, D))
        if L == 0:
            for p, shape in (("gate_proj", (256, D)), ("up_proj", (256, D)),
                             ("down_proj", (D, 256))):
                st.put(f"model.layers.0.mlp.{p}.weight", shape, "BF16")
            continue
        pre = f"model.layers.{L}.mlp."
        st.put(pre + "gate.weight", (E, D), gate_dtype, std=0.1)
        st.put(pre + "gate.e_score_correction_bias", (E,), "F32", std=0.05)
        for e in range(E):
            st.put(f"{pre}experts.{e}.gate_proj.weight", (H, D), dtype)
            st.put(f"{pre}experts.{e}.up_proj.weight", (H, D), dtype)
            st.put(f"{pre}experts.{e}.down_proj.weight", (D, H), dtype)
        st.put(pre + "shared_experts.gate_proj.weight", (SH, D), shared_dtype)
        st.put(pre + "shared_experts.up_proj.weight", (SH, D), shared_dtype)
        st.put(pre + "shared_experts.down_proj.weight", (D, SH), shared_dtype)
    return dict(name=name, family="deepseek_v3", cfg=cfg, store=st, shards=shards, layers=layers,
                D=D)


def glm4(name, dtype, top_k, seed, shards, layers):
    """A GLM-4.5-layout checkpoint (Glm4MoeConfig's keys: no scoring_func, topk_method or
    moe_layer_freq): 4 decoder layers, layer 0 dense, 16 experts, one group, one shared expert."""
    D, H, E = 96, 64, 16
    cfg = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": D,
           "num_hidden_layers": 4, "intermediate_size": 192, "moe_intermediate_size": H,
           "n_routed_experts": E, "num_experts_per_tok": top_k, "n_group": 1, "topk_group": 1,
           "n_shared_experts": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
           "first_k_dense_replace": 1, "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "num_nextn_predict_layers": 1, "use_qk_norm": True, "partial_rotary_factor": 0.5,
           "torch_dtype": "bfloat16"}
    rng = np.random.default_rng(seed)
    st = Store(rng)
    for L in range(4):
        st.put(f"model.layers.{L}.post_attention_layernorm.weight", (D,), dtype,
               values=1.0 + rng.normal(0, 0.1, D))
        pre = f"model.layers.{L}.mlp."
        if L == 0:
            for p, shape in (("gate_proj", (192, D)), ("up_proj", (192, D)),
                             ("down_proj", (D, 192))):
                st.put(pre + p + ".weight", shape, dtype)
            continue
        st.put(pre + "gate.weight", (E, D), dtype, std=0.1)
        st.put(pre + "gate.e_score_correction_bias", (E,), "F32", std=0.05)
        for e in range(E):
            st.put(f"{pre}experts.{e}.gate_proj.weight", (H, D), dtype)
            st.put(f"{pre}experts.{e}.up_proj.weight", (H, D), dtype)
            st.put(f"{pre}experts.{e}.down_proj.weight", (D, H), dtype)
        st.put(pre + "shared_experts.gate_proj.weight", (H, D), dtype)
        st.put(pre + "shared_experts.up_proj.weight", (H, D), dtype)
        st.put(pre + "shared_experts.down_proj.weight", (D, H), dtype)
    return dict(name=name, family="glm4_moe", cfg=cfg, store=st, shards=shards, layers=layers,
                D=D)


def qwen3(name, dtype, norm, seed, shards, layers, fp8_scales=None):
    """fp8_scales: "BF16" or "F16" for FP8 experts whose scales are stored so (Qwen3-FP8)."""
    D, H, E = 64, 48, 12
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
           "hidden_size": D, "num_hidden_layers": 4, "intermediate_size": 128,
           "moe_intermediate_size": H, "num_experts": E, "num_experts_per_tok": 3,
           "norm_topk_prob": norm, "decoder_sparse_step": 1, "mlp_only_layers": [0],
           "hidden_act": "silu", "rms_norm_eps": 1e-6, "output_router_logits": False,
           "router_aux_loss_coef": 0.001, "torch_dtype": "bfloat16"}
    if fp8_scales:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                      "quant_method": "fp8", "weight_block_size": [128, 128]}
    st = Store(np.random.default_rng(seed))
    experts = "F8_E4M3" if fp8_scales else dtype
    for L in range(1, 4):
        pre = f"model.layers.{L}.mlp."
        st.put(f"model.layers.{L}.post_attention_layernorm.weight", (D,), dtype)
        st.put(pre + "gate.weight", (E, D), dtype, std=0.3)
        for e in range(E):
            for p, shape in (("gate_proj", (H, D)), ("up_proj", (H, D)), ("down_proj", (D, H))):
                st.put(f"{pre}experts.{e}.{p}.weight", shape, experts,
                       scale_dtype=fp8_scales or "F32")
    return dict(name=name, family="qwen3_moe", cfg=cfg, store=st, shards=shards, layers=layers,
                D=D)


def mixtral(name, dtype, seed, shards, layers):
    D, H, E = 64, 80, 8
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": D,
           "num_hidden_layers": 2, "intermediate_size": H, "num_local_experts": E,
           "num_experts_per_tok": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16"}
    st = Store(np.random.default_rng(seed))
    for L in range(2):
        pre = f"model.layers.{L}.block_sparse_moe."
        st.put(f"model.layers.{L}.post_attention_layernorm.weight", (D,), dtype)
        st.put(pre + "gate.weight", (E, D), dtype, std=0.3)
        for e in range(E):
            st.put(f"{pre}experts.{e}.w1.weight", (H, D), dtype)
            st.put(f"{pre}experts.{e}.w3.weight", (H, D), dtype)
            st.put(f"{pre}experts.{e}.w2.weight", (D, H), dtype)
    return dict(name=name, family="mixtral", cfg=cfg, store=st, shards=shards, layers=layers, D=D)


CASES = [
    lambda: deepseek("deepseek_v3_bf16_sharded", "BF16", "BF16", "BF16", 1, 3, [2, 4]),
    lambda: deepseek("deepseek_v3_fp8", "F8_E4M3", "F8_E4M3", "BF16", 2, 1, [3], fp8=True),
    lambda: deepseek("deepseek_v3_fp32", "F32", "F32", "F32", 3, 2, [1]),
    lambda: glm4("glm4_moe_bf16_sharded", "BF16", 4, 9, 2, [1, 3]),
    # top-1 with norm_topk_prob: Glm4MoeMoE normalises the single weight to 1 (x 2.5).
    lambda: glm4("glm4_moe_bf16_top1", "BF16", 1, 10, 1, [2]),
    lambda: qwen3("qwen3_moe_bf16", "BF16", True, 4, 2, [1, 3]),
    lambda: qwen3("qwen3_moe_fp32_unnormalised", "F32", False, 5, 1, [2]),
    lambda: qwen3("qwen3_moe_fp8_bf16_scales", "BF16", True, 7, 1, [1], fp8_scales="BF16"),
    lambda: qwen3("qwen3_moe_fp8_f16_scales", "BF16", True, 8, 2, [2], fp8_scales="F16"),
    lambda: mixtral("mixtral_bf16", "BF16", 6, 2, [0, 1]),
]


# ---- moert ----------------------------------------------------------------------------------


class Lib:
    def __init__(self, path):
        lib = ctypes.CDLL(path)
        P, U32, U64, I32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32
        PP, FP = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float)
        for name, res, args in [
            ("moert_status_code", I32, [P]), ("moert_status_message", ctypes.c_char_p, [P]),
            ("moert_status_free", None, [P]),
            ("moert_model_load_file", P, [ctypes.c_char_p, PP]),
            ("moert_model_free", None, [P]),
            ("moert_session_options_create", P, [PP]),
            ("moert_session_options_free", None, [P]),
            ("moert_session_options_set_threads", P, [P, U32]),
            ("moert_session_create", P, [P, P, PP]), ("moert_session_free", None, [P]),
            ("moert_session_forward_hidden", P, [P, FP, U64, U64, FP, U64]),
            ("moert_session_expert_counts", P, [P, U32, I32, ctypes.POINTER(ctypes.c_int64),
                                                 U64]),
            ("moert_session_options_set_mode", P, [P, I32]),
            ("moert_session_backward", P, [P, FP, U64, FP, U64, ctypes.POINTER(ctypes.c_double)]),
            ("moert_session_zero_grad", P, [P]),
            ("moert_session_step", P, [P, ctypes.POINTER(ctypes.c_double),
                                       ctypes.POINTER(ctypes.c_double)]),
            ("moert_session_get_expert_bias", P, [P, U32, FP, U64]),
            ("moert_session_get_parameter", P, [P, ctypes.c_char_p, FP, U64]),
            ("moert_session_save", P, [P, ctypes.c_char_p]),
        ]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.lib = lib

    def ok(self, st, what):
        if st:
            msg = self.lib.moert_status_message(st).decode()
            self.lib.moert_status_free(st)
            raise Failure(f"{what}: {msg}")

    def run(self, path, x, moe_layers, E):
        """Forward of rows x through the model at path; output and per-MoE-layer counts."""
        L = self.lib
        m, o, s = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        self.ok(L.moert_model_load_file(path.encode(), ctypes.byref(m)), f"load {path}")
        try:
            self.ok(L.moert_session_options_create(ctypes.byref(o)), "options")
            self.ok(L.moert_session_options_set_threads(o, 2), "threads")
            self.ok(L.moert_session_create(m, o, ctypes.byref(s)), "session")
            xin = np.ascontiguousarray(x, dtype=np.float32)
            out = np.full(x.shape, np.nan, dtype=np.float32)
            fp = ctypes.POINTER(ctypes.c_float)
            self.ok(L.moert_session_forward_hidden(s, xin.ctypes.data_as(fp), xin.size,
                                                   x.shape[0], out.ctypes.data_as(fp), out.size),
                    "forward")
            counts = []
            for layer in moe_layers:
                c = np.zeros(E, dtype=np.int64)
                self.ok(L.moert_session_expert_counts(
                    s, layer, MOERT_COUNTS_LAST, c.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                    E), "counts")
                counts.append(c)
            return out.astype(np.float64), counts
        finally:
            L.moert_session_free(s)
            L.moert_session_options_free(o)
            L.moert_model_free(m)


    def train_and_save(self, path, x, steps, ckpt, E, params):
        """Trains the hidden-state model at path for `steps` steps (loss: half the squared
        output), saves a checkpoint; returns the trained loss-free bias and parameters."""
        L, fp = self.lib, ctypes.POINTER(ctypes.c_float)
        m, o, s = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        self.ok(L.moert_model_load_file(path.encode(), ctypes.byref(m)), f"load {path}")
        try:
            self.ok(L.moert_session_options_create(ctypes.byref(o)), "options")
            self.ok(L.moert_session_options_set_mode(o, 1), "mode")
            self.ok(L.moert_session_create(m, o, ctypes.byref(s)), "session")
            xin = np.ascontiguousarray(x, dtype=np.float32)
            out = np.zeros(x.shape, dtype=np.float32)
            for _ in range(steps):
                self.ok(L.moert_session_zero_grad(s), "zero_grad")
                self.ok(L.moert_session_forward_hidden(s, xin.ctypes.data_as(fp), xin.size,
                                                       x.shape[0], out.ctypes.data_as(fp),
                                                       out.size), "forward")
                g = np.ascontiguousarray(out / x.shape[0])
                self.ok(L.moert_session_backward(s, g.ctypes.data_as(fp), g.size, None, 0, None),
                        "backward")
                self.ok(L.moert_session_step(s, None, None), "step")
            bias = np.zeros(E, dtype=np.float32)
            self.ok(L.moert_session_get_expert_bias(s, 1, bias.ctypes.data_as(fp), E), "bias")
            values = {}
            for name, n in params.items():
                v = np.zeros(n, dtype=np.float32)
                self.ok(L.moert_session_get_parameter(s, name.encode(), v.ctypes.data_as(fp), n),
                        f"get {name}")
                values[name] = v
            self.ok(L.moert_session_save(s, ckpt.encode()), "save")
            return bias, values
        finally:
            L.moert_session_free(s)
            L.moert_session_options_free(o)
            L.moert_model_free(m)


def cli(args, cli_path, expect_ok=True):
    p = subprocess.run([cli_path] + args, capture_output=True, text=True, timeout=120)
    if expect_ok and p.returncode != 0:
        raise Failure(f"moert {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def files_of(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, n))}


def check_case(case, lib, cli_path, work):
    name, fam, cfg, st = case["name"], case["family"], case["cfg"], case["store"]
    ck = os.path.join(work, name, "checkpoint")
    st.write(ck, cfg, case["shards"])
    lines, failures = [], []

    for with_norm in (False, True):
        out_dir = os.path.join(work, name, "norm" if with_norm else "plain")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        model = os.path.join(out_dir, "model.moert")
        args = ["import", ck, model] + sum((["--layer", str(L)] for L in case["layers"]), [])
        cli(args + (["--with-norm"] if with_norm else []), cli_path)
        # Rows whose routing the float64 oracle finds a near-tie (a gap below TIE_TOL between the
        # last chosen and the first rejected score or group) are left out of the input: fp32 may
        # legitimately decide those the other way. Rows are independent, so this only chooses
        # the test's input; at least 64 of 128 must remain.
        rng = np.random.default_rng(100)
        x = rng.normal(0, 1, size=(128, case["D"]))
        ref, gaps, sels, moe_layers = x, np.full(len(x), np.inf), [], []
        for L in case["layers"]:
            if with_norm:
                ref = rmsnorm(ref, st.values[f"model.layers.{L}.post_attention_layernorm.weight"],
                              np.float32(cfg["rms_norm_eps"]))
            ref, sel, E = moe_block(fam, cfg, st.values, L, ref, gaps)
            sels.append(sel)
            moe_layers.append(2 * len(moe_layers) + 1 if with_norm else len(moe_layers))
        keep = np.nonzero(gaps >= TIE_TOL)[0]
        if len(keep) < 64:
            failures.append(f"{name}: only {len(keep)} of 128 rows route without a near-tie")
        x, ref, min_gap = x[keep], ref[keep], gaps[keep].min()
        ref_counts = [np.bincount(np.concatenate([sel[t] for t in keep]), minlength=E)
                      for sel in sels]
        out, counts = lib.run(model, x, moe_layers, E)
        # The checkpoint's score-correction bias steered its training; imported, it is frozen,
        # which inspect must say (it once showed the update rate of a bias that never moves).
        info = json.loads(cli(["inspect", "--json", model], cli_path).stdout)
        moes = [l["moe"] for l in info["layers"] if "moe" in l]
        biased = [m for m in moes if m["balancing"] == "loss-free bias"]
        if fam in ("deepseek_v3", "glm4_moe") and len(biased) != len(moes):
            failures.append(f"{name}: inspect shows balancing {[m['balancing'] for m in moes]}")
        if any(not m["bias_frozen"] for m in biased):
            failures.append(f"{name}: inspect shows an imported loss-free bias not frozen")
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        row = (np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()
        same = all((a == b).all() for a, b in zip(counts, ref_counts))
        lines.append(f"  {name}{' --with-norm' if with_norm else ''}: layers {case['layers']}, "
                     f"rel err {rel:.2e} (worst row {row:.2e}), selection "
                     f"{'exact' if same else 'DIFFERS'} over {len(keep)} rows, smallest routing "
                     f"gap {min_gap:.1e}")
        if not rel <= REL_TOL or not row <= 10 * REL_TOL:
            failures.append(f"{name}: relative error {rel:.2e} (worst row {row:.2e})")
        if not same:
            failures.append(f"{name}: expert counts {counts} != oracle {ref_counts}")

        # import -> export -> import: the same moert files, the checkpoint's tensors, in the
        # family's own layout (recorded by import in the model's name).
        exp = os.path.join(out_dir, "exported")
        cli(["export", model, exp], cli_path)
        again_dir = os.path.join(out_dir, "again")
        shutil.rmtree(again_dir, ignore_errors=True)
        os.makedirs(again_dir)
        cli(args[:1] + [exp, os.path.join(again_dir, "model.moert")] + args[3:] +
            (["--with-norm"] if with_norm else []), cli_path)
        a = {n: b for n, b in files_of(out_dir).items() if n.startswith("model.moert")}
        b = files_of(again_dir)
        identical = a == b
        orig, back = read_checkpoint(ck), read_checkpoint(exp)

        def same_tensor(n, t):
            o = orig.get(n)
            if o == t:
                return True
            # 16-bit block scales come back as F32 of the same values.
            if o is None or not n.endswith("_scale_inv") or o[0] not in ("BF16", "F16") \
                    or t[0] != "F32" or o[1] != t[1]:
                return False
            stored = (bf16_value(np.frombuffer(o[2], "<u2")) if o[0] == "BF16"
                      else np.frombuffer(o[2], "<f2").astype(np.float64))
            return (np.frombuffer(t[2], "<f4").astype(np.float64) == stored).all()
        mismatched = [n for n, t in back.items() if not same_tensor(n, t)]
        lines.append(f"    import -> export -> import: {'bit-identical' if identical else 'DIFFERS'}"
                     f" ({sum(map(len, a.values()))} bytes); {len(back)} exported tensors, "
                     f"{len(mismatched)} differ from the checkpoint")
        if not identical:
            failures.append(f"{name}: re-import differs: {sorted(a)} vs {sorted(b)}")
        if mismatched:
            failures.append(f"{name}: exported tensors differ from the checkpoint: {mismatched[:4]}")
        if "quantization_config" in cfg and not with_norm:
            # FP8 exported as fp32 (code value x scale) runs exactly as the FP8 model does.
            exp32 = os.path.join(out_dir, "exported_fp32")
            cli(["export", model, exp32, "--dtype", "fp32"], cli_path)
            m32 = os.path.join(out_dir, "fp32.moert")
            cli(["import", exp32, m32] + args[3:], cli_path)
            out32, _ = lib.run(m32, x, moe_layers, E)
            d32 = np.abs(out32 - out).max()
            lines.append(f"    export --dtype fp32 -> import: max |difference| to the FP8 model "
                         f"{d32:.1e}")
            if d32 > 1e-6 * np.abs(out).max():
                failures.append(f"{name}: the fp32 export runs differently ({d32:.2e})")
        with open(os.path.join(exp, "config.json")) as f:
            ecfg = json.load(f)
        for k in EXPORTED_KEYS[fam]:
            if ecfg.get(k) != cfg[k]:
                failures.append(f"{name}: exported config.json {k} = {ecfg.get(k)!r}, "
                                f"checkpoint has {cfg[k]!r}")
        if not with_norm:
            lines_x, failures_x = check_other_layout(case, lib, cli_path, model, out_dir, x, out,
                                                     moe_layers, E)
            lines += lines_x
            failures += failures_x
    return lines, failures


EXPORTED_KEYS = {
    "deepseek_v3": ("model_type", "n_routed_experts", "num_experts_per_tok", "n_group",
                    "topk_group", "norm_topk_prob", "routed_scaling_factor", "scoring_func",
                    "topk_method", "moe_intermediate_size", "hidden_size", "n_shared_experts"),
    "glm4_moe": ("model_type", "architectures", "n_routed_experts", "num_experts_per_tok",
                 "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                 "moe_intermediate_size", "hidden_size", "n_shared_experts"),
    "qwen3_moe": ("model_type", "architectures", "num_experts", "num_experts_per_tok",
                  "norm_topk_prob", "moe_intermediate_size", "hidden_size", "decoder_sparse_step"),
    "mixtral": ("model_type", "architectures", "num_local_experts", "num_experts_per_tok",
                "intermediate_size", "hidden_size"),
}


def check_other_layout(case, lib, cli_path, model, out_dir, x, out, moe_layers, E):
    """export --layout: a softmax model written as the other softmax family runs the same (or is
    refused when Mixtral cannot say norm_topk_prob false); a family of the other score function
    is refused, naming score_function."""
    fam, cfg = case["family"], case["cfg"]
    lines, failures = [], []
    other = {"qwen3_moe": "mixtral", "mixtral": "qwen3_moe"}.get(fam)
    if other:
        exp = os.path.join(out_dir, "exported_" + other)
        p = cli(["export", model, exp, "--layout", other], cli_path, expect_ok=False)
        if fam == "qwen3_moe" and not cfg["norm_topk_prob"]:
            ok = p.returncode == 1 and "normalize_weights" in p.stderr
            lines.append(f"    export --layout mixtral refused: {p.stderr.strip()}")
            if not ok:
                failures.append(f"{case['name']}: --layout mixtral of an unnormalised router: "
                                f"exit {p.returncode}, {p.stderr!r}")
            return lines, failures
        if p.returncode != 0:
            failures.append(f"{case['name']}: export --layout {other}: {p.stderr!r}")
            return lines, failures
        with open(os.path.join(exp, "config.json")) as f:
            mt = json.load(f)["model_type"]
        m2 = os.path.join(out_dir, other + ".moert")
        cli(["import", exp, m2] + sum((["--layer", str(L)] for L in case["layers"]), []),
            cli_path)
        out2, _ = lib.run(m2, x, moe_layers, E)
        d = np.abs(out2 - out).max()
        lines.append(f"    export --layout {other} (model_type {mt}) -> import: max |difference| "
                     f"{d:.1e}")
        if mt != other or d != 0.0:
            failures.append(f"{case['name']}: --layout {other} gives model_type {mt}, "
                            f"difference {d:.2e}")
    wrong = "qwen3_moe" if fam in ("deepseek_v3", "glm4_moe") else "glm4_moe"
    p = cli(["export", model, os.path.join(out_dir, "exported_" + wrong), "--layout", wrong],
            cli_path, expect_ok=False)
    lines.append(f"    export --layout {wrong} refused: {p.stderr.strip()}")
    if p.returncode != 1 or "score_function" not in p.stderr:
        failures.append(f"{case['name']}: --layout {wrong}: exit {p.returncode}, {p.stderr!r}")
    return lines, failures


def check_refusals(cli_path, work):
    """Checkpoints moert must refuse, each with the message naming the culprit."""
    lines, failures = [], []
    base = deepseek("refuse", "F8_E4M3", "BF16", "BF16", 7, 1, [1], D=160, fp8=True)
    cases = []

    cases.append(("dense layer", base["cfg"], None, ["--layer", "0"], "dense MLP"))
    cases.append(("missing layer", base["cfg"], None, ["--layer", "9"], "does not exist"))
    cfg = dict(base["cfg"], scoring_func="softmax")
    cases.append(("softmax DeepSeek", cfg, None, ["--layer", "1"], "scoring_func"))
    cfg = dict(base["cfg"])
    del cfg["routed_scaling_factor"]
    cases.append(("missing knob", cfg, None, ["--layer", "1"], "routed_scaling_factor"))
    cfg = dict(base["cfg"], topk_method="greedy")
    cases.append(("greedy top-K", cfg, None, ["--layer", "1"], "topk_method"))

    def transpose_scales(t):
        n = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
        dt, shape, raw = t[n]
        t[n] = (dt, (shape[1], shape[0]), raw)
    cases.append(("transposed scales", base["cfg"], transpose_scales, ["--layer", "1"],
                  "transposed"))

    def extra(t):
        t["model.layers.1.mlp.shared_expert_gate.weight"] = ("F32", (1, 160), bytes(640))
    cases.append(("unknown tensor", base["cfg"], extra, ["--layer", "1"], "shared_expert_gate"))

    def drop(t):
        del t["model.layers.1.mlp.experts.15.up_proj.weight"]
    cases.append(("missing expert", base["cfg"], drop, ["--layer", "1"], "experts.15.up_proj"))
    cfg = dict(base["cfg"])
    del cfg["quantization_config"]
    cases.append(("fp8 without block size", cfg, None, ["--layer", "1"], "weight_block_size"))

    # What the library's loader would refuse is refused before anything is written.
    w = "model.layers.1.mlp.experts.2.gate_proj.weight"

    def poke(name, at, raw_value):
        def mutate(t):
            dt, shape, raw = t[name]
            t[name] = (dt, shape, raw[:at] + raw_value + raw[at + len(raw_value):])
        return mutate
    cases.append(("fp8 NaN code", base["cfg"], poke(w, 150, bytes([0xFF])), ["--layer", "1"],
                  w + "' in model.safetensors holds an FP8 NaN code in block 1"))
    for label, scale, want in (("negative scale", -0.002, "holds the scale -0.002"),
                               ("zero scale", 0.0, "holds the scale 0 at"),
                               ("subnormal scale", 1e-42, "at least 2^-126"),
                               ("overflowing scale", 3e38, "decodes past the largest float")):
        cases.append((label, base["cfg"], poke(w + "_scale_inv", 0, struct.pack("<f", scale)),
                      ["--layer", "1"], want))
    def f64_scales(t):
        n = w + "_scale_inv"
        dt, shape, raw = t[n]
        t[n] = ("F64", shape, np.frombuffer(raw, "<f4").astype("<f8").tobytes())
    cases.append(("F64 scales", base["cfg"], f64_scales, ["--layer", "1"],
                  "is F64; block scales must be F32, BF16 or F16"))
    cases.append(("NaN in bf16 norm", base["cfg"],
                  poke("model.layers.1.post_attention_layernorm.weight", 6, b"\xc0\x7f"),
                  ["--layer", "1", "--with-norm"], "NaN or infinity at element 3"))
    cases.append(("inf in bf16 router", base["cfg"],
                  poke("model.layers.1.mlp.gate.weight", 10, b"\x80\x7f"), ["--layer", "1"],
                  "NaN or infinity at element 5"))
    cases.append(("scaling past float", dict(base["cfg"], routed_scaling_factor=1e39), None,
                  ["--layer", "1"], "past the largest float"))
    cases.append(("zero eps", dict(base["cfg"], rms_norm_eps=0.0), None, ["--layer", "1"],
                  "rms_norm_eps"))
    # A top-K past the experts is named as such, not as the groups' shortfall it also causes.
    cases.append(("top-K past the experts", dict(base["cfg"], num_experts_per_tok=17), None,
                  ["--layer", "1"], "'num_experts_per_tok' exceeds the 16 experts"))

    mx = mixtral("refuse_mixtral", "F32", 8, 1, [0])
    for label, c, mutate, layer_args, want in cases:
        d = os.path.join(work, "refusals", label.replace(" ", "_"))
        st = base["store"]
        saved = dict(st.tensors)
        if mutate:
            mutate(st.tensors)
        st.write(d, c)
        st.tensors = saved
        p = cli(["import", d, os.path.join(d, "out.moert")] + layer_args, cli_path,
                expect_ok=False)
        ok = p.returncode == 1 and want in p.stderr and not os.path.exists(
            os.path.join(d, "out.moert"))
        lines.append(f"  refused {label}: {p.stderr.strip()}")
        if not ok:
            failures.append(f"refusal '{label}': exit {p.returncode}, stderr {p.stderr!r}")
    # A key given twice in config.json: which one was meant is unknown (the JSON parser would
    # keep the last one silently).
    d = os.path.join(work, "refusals", "duplicate_key")
    base["store"].write(d, base["cfg"])
    with open(os.path.join(d, "config.json")) as f:
        text = f.read().rstrip()
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write(text[:-1].rstrip() + ',\n  "n_routed_experts": 8\n}\n')
    p = cli(["import", d, os.path.join(d, "out.moert"), "--layer", "1"], cli_path, False)
    lines.append(f"  refused duplicate key: {p.stderr.strip()}")
    if p.returncode != 1 or "duplicate JSON key 'n_routed_experts'" not in p.stderr:
        failures.append(f"refusal 'duplicate key': exit {p.returncode}, stderr {p.stderr!r}")
    gl = glm4("refuse_glm4", "F32", 4, 11, 1, [1])
    for label, c, want in (("glm4 groups", dict(gl["cfg"], n_group=2, topk_group=1), "n_group"),
                           ("glm4 softmax", dict(gl["cfg"], scoring_func="softmax"),
                            "scoring_func"),
                           ("glm4 dense layer", gl["cfg"], "dense MLP")):
        d = os.path.join(work, "refusals", label.replace(" ", "_"))
        gl["store"].write(d, c)
        layer = "0" if "dense" in label else "1"
        p = cli(["import", d, os.path.join(d, "out.moert"), "--layer", layer], cli_path, False)
        lines.append(f"  refused {label}: {p.stderr.strip()}")
        if p.returncode != 1 or want not in p.stderr:
            failures.append(f"refusal '{label}': exit {p.returncode}, stderr {p.stderr!r}")
    def expect_refused(label, d, out, layer, want):
        p = cli(["import", d, out, "--layer", layer], cli_path, False)
        lines.append(f"  refused {label}: {p.stderr.strip()}")
        if p.returncode != 1 or want not in p.stderr or os.path.exists(out):
            failures.append(f"refusal '{label}': exit {p.returncode}, stderr {p.stderr!r}")

    # In a sharded checkpoint, a refusal names the shard that holds the tensor at fault.
    d = os.path.join(work, "refusals", "sharded_scale")
    saved = dict(base["store"].tensors)
    poke(w + "_scale_inv", 0, struct.pack("<f", -0.5))(base["store"].tensors)
    base["store"].write(d, base["cfg"], shards=3)
    shard = sorted(base["store"].tensors).index(w + "_scale_inv") % 3 + 1
    base["store"].tensors = saved
    expect_refused("sharded scale", d, os.path.join(d, "out.moert"), "1",
                   f"{w}_scale_inv' in model-{shard:05d}-of-00003.safetensors holds the scale -0.5")

    # A model.safetensors link whose target is gone (a cache's blob removed) names the link.
    d = os.path.join(work, "refusals", "dangling_link")
    base["store"].write(d, base["cfg"])
    os.remove(os.path.join(d, "model.safetensors"))
    os.symlink("blobs/gone", os.path.join(d, "model.safetensors"))
    expect_refused("dangling link", d, os.path.join(d, "out.moert"), "1",
                   "a symbolic link to 'blobs/gone', which does not exist")
    # An OUTPUT name too long for the data file beside it: said before anything is written.
    d = os.path.join(work, "refusals", "long_name")
    base["store"].write(d, base["cfg"])
    expect_refused("long OUTPUT name", d, os.path.join(d, "x" * 245 + ".moert"), "1",
                   "its file name is 251 bytes")
    if any(n.startswith("xxxx") for n in os.listdir(d)):
        failures.append(f"refusal 'long OUTPUT name' left {os.listdir(d)}")
    d = os.path.join(work, "refusals", "jitter")
    mx["store"].write(d, dict(mx["cfg"], router_jitter_noise=0.01))
    expect_refused("jitter", d, os.path.join(d, "out.moert"), "0", "router_jitter_noise")
    # An OUTPUT naming one of the checkpoint's own files (directly or through a link) would
    # replace what the import reads: refused, the file left as it was.
    d = os.path.join(work, "refusals", "own_input")
    base["store"].write(d, base["cfg"])
    os.symlink("model.safetensors", os.path.join(d, "link.moert"))
    for target in ("model.safetensors", "config.json", "link.moert"):
        path = os.path.join(d, os.path.basename(target))
        before = open(path, "rb").read()
        p = cli(["import", d, path, "--layer", "1"], cli_path, False)
        lines.append(f"  refused OUTPUT {target}: {p.stderr.strip()}")
        if (p.returncode != 2 or "would replace what this command reads" not in p.stderr
                or open(path, "rb").read() != before):
            failures.append(f"refusal 'OUTPUT {target}': exit {p.returncode}, stderr {p.stderr!r}")
    return lines, failures


def check_outputs_onto_inputs(cli_path, work):
    """convert and export refuse to write onto what they read (a model's own data file, an
    OUT_DIR whose config.json is the model), and import refuses a folder whose export did not
    finish (its marker is still there)."""
    lines, failures = [], []
    base = deepseek("onto_inputs", "BF16", "BF16", "BF16", 6, 1, [1])
    d = os.path.join(work, "onto_inputs")
    base["store"].write(os.path.join(d, "checkpoint"), base["cfg"])
    model = os.path.join(d, "layer.moert")
    cli(["import", os.path.join(d, "checkpoint"), model, "--layer", "1"], cli_path)
    data = [n for n in os.listdir(d) if n.startswith("layer.moert.") and n.endswith(".data")]
    if len(data) != 1:
        return lines, [f"outputs onto inputs: the import wrote data files {data}"]
    data_path = os.path.join(d, data[0])
    before = open(data_path, "rb").read()
    p = cli(["convert", model, data_path], cli_path, expect_ok=False)
    lines.append(f"  refused convert onto its data file: {p.stderr.strip()}")
    if (p.returncode != 2 or "would replace what this command reads" not in p.stderr
            or open(data_path, "rb").read() != before):
        failures.append(f"convert onto its data file: exit {p.returncode}, {p.stderr!r}")
    # A model kept as OUT_DIR/config.json.
    as_config = os.path.join(d, "as_config")
    os.makedirs(as_config, exist_ok=True)
    shutil.copy(model, os.path.join(as_config, "config.json"))
    shutil.copy(data_path, os.path.join(as_config, data[0]))  # the name the model refers to
    before = open(os.path.join(as_config, "config.json"), "rb").read()
    p = cli(["export", os.path.join(as_config, "config.json"), as_config], cli_path, False)
    lines.append(f"  refused export onto its input: {p.stderr.strip()}")
    if (p.returncode != 2 or "would replace what this command reads" not in p.stderr
            or open(os.path.join(as_config, "config.json"), "rb").read() != before):
        failures.append(f"export onto its input: exit {p.returncode}, {p.stderr!r}")
    # An export that did not finish leaves its marker: import refuses the folder.
    out = os.path.join(d, "exported")
    cli(["export", model, out], cli_path)
    if os.path.exists(os.path.join(out, ".moert-export-incomplete")):
        failures.append("a finished export left its marker")
    open(os.path.join(out, ".moert-export-incomplete"), "wb").close()
    p = cli(["import", out, os.path.join(d, "again.moert"), "--layer", "1"], cli_path, False)
    lines.append(f"  refused an unfinished export: {p.stderr.strip()}")
    if p.returncode != 1 or "did not finish" not in p.stderr:
        failures.append(f"import of an unfinished export: exit {p.returncode}, {p.stderr!r}")
    return lines, failures


def check_interrupted_imports(cli_path, work):
    """What imports killed midway left beside OUTPUT (their temporary data and description files,
    named by host and process id) is removed by the next import to it; a live process's is kept,
    as is any other file."""
    lines, failures = [], []
    base = deepseek("leftovers", "BF16", "BF16", "BF16", 5, 1, [1])
    d = os.path.join(work, "leftovers")
    base["store"].write(os.path.join(d, "checkpoint"), base["cfg"])
    out = os.path.join(d, "layer.moert")
    host = socket.gethostname()
    # Process ids above the kernel's largest (4194304): no such process.
    left = [f"{out}.data.tmp.{host}.4194401", f"{out}.tmp.{host}.4194402"]
    kept = [f"{out}.tmp.{host}.{os.getpid()}",  # a live writer's (this process)
            f"{out}.tmp.otherhost.4194403",  # another host's
            f"{out}.tmp.4194404",  # not a temporary file of moert's
            os.path.join(d, f"other.moert.tmp.{host}.4194405")]  # another file's
    for f in left + kept:
        with open(f, "wb") as w:
            w.write(b"x" * 4096)
    cli(["import", os.path.join(d, "checkpoint"), out, "--layer", "1"], cli_path)
    remaining = [f for f in left if os.path.exists(f)]
    gone = [f for f in kept if not os.path.exists(f)]
    lines.append(f"  leftovers of killed imports removed: {len(left) - len(remaining)} of "
                 f"{len(left)}; others kept: {len(kept) - len(gone)} of {len(kept)}")
    if remaining or gone:
        failures.append(f"interrupted imports: left {remaining}, removed {gone}")
    for f in kept:
        if os.path.exists(f):
            os.remove(f)
    return lines, failures


def check_reimports(cli_path, work):
    """An import to OUTPUT removes the data files of earlier imports to it, except one that a copy
    of an earlier description still names (`cp layer.moert best.moert`)."""
    lines, failures = [], []
    d = os.path.join(work, "reimports")
    shutil.rmtree(d, ignore_errors=True)
    out = os.path.join(d, "layer.moert")
    for seed, name in enumerate(("first", "second", "third")):
        base = deepseek(f"reimport_{name}", "BF16", "BF16", "BF16", 11 + seed, 1, [1])
        base["store"].write(os.path.join(d, name), base["cfg"])

    def data_files():
        return sorted(n for n in os.listdir(d)
                      if n.startswith("layer.moert.") and n.endswith(".data"))

    cli(["import", os.path.join(d, "first"), out, "--layer", "1"], cli_path)
    first = data_files()
    shutil.copy(out, os.path.join(d, "best.moert"))
    cli(["import", os.path.join(d, "second"), out, "--layer", "1"], cli_path)
    second = data_files()
    p = cli(["inspect", os.path.join(d, "best.moert")], cli_path, expect_ok=False)
    lines.append(f"  data files kept for a copied description: {len(second)} after a re-import "
                 f"(best.moert loads: exit {p.returncode})")
    if len(first) != 1 or first[0] not in second or len(second) != 2 or p.returncode != 0:
        failures.append(f"re-import: data files {first} then {second}, inspect of the copy "
                        f"exit {p.returncode}: {p.stderr.strip()}")
    os.remove(os.path.join(d, "best.moert"))
    cli(["import", os.path.join(d, "third"), out, "--layer", "1"], cli_path)
    third = data_files()
    if len(third) != 1 or third[0] in second:
        failures.append(f"re-import after the copy was removed: data files {third}")
    # Two imports to OUT at once take turns where one's clean-up could remove the other's data
    # file: whichever description is left loads.
    broken = 0
    for _ in range(8):
        both = [subprocess.Popen([cli_path, "import", os.path.join(d, name), out, "--layer", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for name in ("first", "second")]
        codes = [p.wait(timeout=120) for p in both]
        p = cli(["inspect", out], cli_path, expect_ok=False)
        broken += p.returncode != 0 or codes != [0, 0]
    lines.append(f"  concurrent imports to one OUTPUT that left it unloadable: {broken} of 8")
    if broken:
        failures.append(f"concurrent imports: {broken} of 8 left {out} unloadable")
    return lines, failures


def check_export_folders(cli_path, work):
    """An export replaces only an earlier export's files: never another checkpoint's config.json;
    a smaller export removes the shards of a larger one before it; an export that fails midway (a
    shard it cannot write) leaves the earlier export as it was, loadable, with nothing of its own."""
    lines, failures = [], []
    d = os.path.join(work, "export_folders")
    shutil.rmtree(d, ignore_errors=True)
    base = deepseek("export_folders", "BF16", "BF16", "BF16", 21, 1, [1])
    base["store"].write(os.path.join(d, "checkpoint"), base["cfg"], 2)  # sharded: an index
    three = os.path.join(d, "three.moert")
    one = os.path.join(d, "one.moert")
    cli(["import", os.path.join(d, "checkpoint"), three, "--layer", "1", "--layer", "2",
         "--layer", "3"], cli_path)
    cli(["import", os.path.join(d, "checkpoint"), one, "--layer", "4"], cli_path)
    # Into the Hugging Face checkpoint itself: refused, its files as they were.
    ck = os.path.join(d, "checkpoint")
    before = files_of(ck)
    p = cli(["export", one, ck], cli_path, expect_ok=False)
    lines.append(f"  refused into another checkpoint: {p.stderr.strip()}")
    if p.returncode != 1 or "that no moert export wrote" not in p.stderr or files_of(ck) != before:
        failures.append(f"export into another checkpoint: exit {p.returncode}, {p.stderr!r}")
    # Into a folder holding shards and nothing else (a download in progress): refused, the shards
    # as they were. (The export replaced them, exit 0: only config.json and the index were
    # looked at.)
    partial = os.path.join(d, "partial")
    os.makedirs(partial)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        shutil.copy(os.path.join(ck, name), os.path.join(partial, name))
    before = files_of(partial)
    p = cli(["export", one, partial], cli_path, expect_ok=False)
    lines.append(f"  refused over another checkpoint's shards: {p.stderr.strip()}")
    if (p.returncode != 1 or "a shard that no moert export of this folder wrote" not in p.stderr
            or files_of(partial) != before):
        failures.append(f"export over another checkpoint's shards: exit {p.returncode}, "
                        f"{p.stderr!r}")
    # Three layers, then one: the two shards only the first wrote are gone.
    out = os.path.join(d, "out")
    cli(["export", three, out], cli_path)
    cli(["export", one, out], cli_path)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    p = cli(["import", out, os.path.join(d, "back.moert"), "--layer", "4"], cli_path, False)
    if shards != ["model-00001-of-00001.safetensors"] or p.returncode != 0:
        failures.append(f"smaller export over a larger one: shards {shards}, import exit "
                        f"{p.returncode}: {p.stderr.strip()}")
    # A manifest names only shards that the next export may remove: not another file of the
    # folder, nor one outside it.
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("kept\n")
    with open(os.path.join(d, "outside.txt"), "w") as f:
        f.write("kept\n")
    with open(os.path.join(out, ".moert-export"), "w") as f:
        json.dump({"format": "moert-export 1",
                   "files": ["keep.txt", "../outside.txt", "config.json",
                             "model-00001-of-00001.safetensors"]}, f)
    cli(["export", one, out], cli_path)
    if not (os.path.exists(os.path.join(out, "keep.txt"))
            and os.path.exists(os.path.join(d, "outside.txt"))
            and os.path.exists(os.path.join(out, "config.json"))):
        failures.append(f"a manifest had files removed: {sorted(os.listdir(out))}")
    os.remove(os.path.join(out, "keep.txt"))
    # A manifest that is not one (another content under its name) does not make the folder an
    # export's: refused, as a folder without one.
    manifest = open(os.path.join(out, ".moert-export")).read()
    with open(os.path.join(out, ".moert-export"), "w") as f:
        f.write("{}")
    p = cli(["export", one, out], cli_path, expect_ok=False)
    if p.returncode != 1 or "that no moert export wrote" not in p.stderr:
        failures.append(f"export past a manifest that is not one: exit {p.returncode}, "
                        f"{p.stderr!r}")
    with open(os.path.join(out, ".moert-export"), "w") as f:
        f.write(manifest)
    # A failing export (its third shard's name is taken by a folder) leaves the one-layer export.
    before = files_of(out)
    os.makedirs(os.path.join(out, "model-00003-of-00003.safetensors"))
    p = cli(["export", three, out], cli_path, expect_ok=False)
    os.rmdir(os.path.join(out, "model-00003-of-00003.safetensors"))
    after = files_of(out)
    lines.append(f"  failed export: exit {p.returncode}, earlier export "
                 f"{'kept' if after == before else 'changed'}")
    if p.returncode != 1 or after != before or sorted(os.listdir(out)) != sorted(before):
        failures.append(f"failed export: exit {p.returncode}, files {sorted(os.listdir(out))} "
                        f"against {sorted(before)}")
    return lines, failures


def check_trained(lib, cli_path, work):
    """A model trained by moert (fp32 masters, a loss-free bias moved by training, two shared
    experts) exported and imported back: the same forward, the bias as e_score_correction_bias,
    the masters as fp32 (default) or rounded to bf16 (--dtype bf16)."""
    d = os.path.join(work, "trained")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    D, E, H = 32, 8, 16

    def t(std):
        return {"init": {"kind": "Normal", "std": std}}
    model = {
        "schema_major": 1, "schema_minor": 1, "name": "trained", "seed": 11, "input_dim": D,
        "layers": [
            {"name": "norm", "kind_type": "RMSNorm",
             "kind": {"dim": D, "eps": 1e-5, "weight": t(0.2)}},
            {"name": "moe", "kind_type": "MoE", "kind": {
                "dim": D, "num_experts": E, "top_k": 2, "expert_hidden": H,
                "score_function": "Sigmoid", "num_groups": 2, "topk_groups": 1,
                "normalize_weights": True, "routed_scaling_factor": 2.5,
                "num_shared_experts": 2, "shared_hidden": H, "residual": False,
                "balancing": {"policy": "LossFreeBias", "bias_update_rate": 0.01},
                "gate": t(0.5), "w1": t(0.3), "w3": t(0.3), "w2": t(0.3),
                "shared_w1": t(0.3), "shared_w3": t(0.3), "shared_w2": t(0.3)}},
        ],
    }
    with open(os.path.join(d, "model.json"), "w") as f:
        json.dump(model, f)
    cli(["convert", os.path.join(d, "model.json"), os.path.join(d, "model.moert")], cli_path)
    x = np.random.default_rng(12).normal(0, 1, size=(64, D))
    params = {"moe.gate": E * D, "moe.w1": E * H * D, "norm.weight": D}
    ckpt = os.path.join(d, "ckpt.moert")
    bias, masters = lib.train_and_save(os.path.join(d, "model.moert"), x, 5, ckpt, E, params)
    lines, failures = [], []
    ref, ref_counts = lib.run(ckpt, x, [1], E)
    for dtype in ("as-stored", "bf16", "fp8"):
        exp = os.path.join(d, "export_" + dtype)
        cli(["export", ckpt, exp, "--dtype", dtype], cli_path)
        back = read_checkpoint(exp)
        m2 = os.path.join(d, f"reimported_{dtype}.moert")
        cli(["import", exp, m2, "--layer", "0", "--with-norm"], cli_path)
        out, counts = lib.run(m2, x, [1], E)
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        eb = np.frombuffer(back["model.layers.0.mlp.gate.e_score_correction_bias"][2], np.float32)
        gate = back["model.layers.0.mlp.gate.weight"]
        w1 = back["model.layers.0.mlp.experts.3.gate_proj.weight"]
        master_w1 = masters["moe.w1"].reshape(E, H, D)[3]
        if dtype == "as-stored":
            stored_ok = (gate[0] == "F32" and gate[2] == masters["moe.gate"].tobytes()
                         and w1[0] == "F32" and w1[2] == master_w1.tobytes())
        elif dtype == "bf16":
            stored_ok = (gate[0] == "BF16" and gate[2] == bf16_bits(masters["moe.gate"]).tobytes()
                         and w1[0] == "BF16" and w1[2] == bf16_bits(master_w1).tobytes())
        else:
            # Experts in E4M3, one 128x128 block here, scale amax / 448; the router in bf16. The
            # codes are the nearest E4M3 values of w / scale (ties aside, which the oracle's
            # nearest-value search may break differently: allow those, nothing else).
            codes, scales, deq = quantize_fp8(master_w1)
            sc = back["model.layers.0.mlp.experts.3.gate_proj.weight_scale_inv"]
            scale = np.frombuffer(sc[2], np.float32)[0]
            got = e4m3_value(np.frombuffer(w1[2], np.uint8)).reshape(H, D) * np.float64(scale)
            exact = (np.frombuffer(w1[2], np.uint8).reshape(H, D) == codes).mean()
            stored_ok = (gate[0] == "BF16" and gate[2] == bf16_bits(masters["moe.gate"]).tobytes()
                         and w1[0] == "F8_E4M3" and tuple(sc[1]) == (1, 1)
                         and scale == scales[0, 0] and exact >= 0.99
                         and np.abs(got - master_w1).max() <= scale * 16)
        shared = back["model.layers.0.mlp.shared_experts.down_proj.weight"]
        lines.append(f"  trained checkpoint, --dtype {dtype}: bias |b| max {np.abs(bias).max():.3f} "
                     f"exported {'exactly' if (eb == bias).all() else 'WRONG'}, masters "
                     f"{'as ' + gate[0] if stored_ok else 'WRONG'}, shared down_proj "
                     f"{list(shared[1])}, re-imported forward rel err {rel:.2e}, selection "
                     f"{'exact' if (counts[0] == ref_counts[0]).all() else 'DIFFERS'}")
        if not (eb == bias).all() or not np.abs(bias).max() > 0:
            failures.append(f"trained {dtype}: bias {eb} != trained {bias}")
        if not stored_ok:
            failures.append(f"trained {dtype}: exported router/expert weights are not the masters")
        if tuple(shared[1]) != (D, 2 * H):
            failures.append(f"trained {dtype}: shared down_proj shape {shared[1]}")
        if dtype == "as-stored" and (not rel <= REL_TOL or (counts[0] != ref_counts[0]).any()):
            failures.append(f"trained: re-imported forward differs (rel {rel:.2e})")
    return lines, failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", required=True)
    ap.add_argument("--cli", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    lib = Lib(args.lib)
    failures = []
    for make in CASES:
        case = make()
        try:
            lines, f = check_case(case, lib, args.cli, args.workdir)
        except Failure as exc:
            lines, f = [], [f"{case['name']}: {exc}"]
        print(case["name"])
        print("\n".join(lines))
        failures += f
    print("trained")
    try:
        lines, f = check_trained(lib, args.cli, args.workdir)
    except Failure as exc:
        lines, f = [], [f"trained: {exc}"]
    print("\n".join(lines))
    failures += f
    for name, check in (("refusals", check_refusals),
                        ("outputs onto inputs", check_outputs_onto_inputs),
                        ("interrupted imports", check_interrupted_imports),
                        ("re-imports", check_reimports),
                        ("export folders", check_export_folders)):
        print(name)
        try:
            lines, f = check(args.cli, args.workdir)
        except Failure as exc:
            lines, f = [], [f"{name}: {exc}"]
        print("\n".join(lines))
        failures += f
    for f in failures:
        print("FAIL:", f)
    print("hf import oracle:", "FAILED" if failures else "all checkpoints agree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
