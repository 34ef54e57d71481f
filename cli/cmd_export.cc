// `moert export`: MoE layers of a moert model or checkpoint as a Hugging Face checkpoint.
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/error.h"
#include "cli/hf_export.h"
#include "cli/model_codec.h"

namespace moert_cli {

const CommandSpec kExportSpec = {
    "export",
    "MODEL_OR_CHECKPOINT OUT_DIR [--dtype as-stored|fp32|bf16|fp8] [--layout FAMILY] [--no-check]",
    "write the MoE layers of a model or checkpoint as a Hugging Face checkpoint",
    "Writes OUT_DIR/config.json (model_type and the family's routing knobs), one safetensors\n"
    "shard per MoE layer and model.safetensors.index.json, in the layout of one family:\n"
    "deepseek_v3 / kimi_k2 / glm4_moe: the router as mlp.gate.weight, the bias as\n"
    "mlp.gate.e_score_correction_bias (fp32), experts as mlp.experts.E.{gate,up,down}_proj.weight\n"
    "(w1, w3, w2), shared experts merged into mlp.shared_experts.*; qwen3_moe: mlp.gate.weight\n"
    "and mlp.experts.E.{gate,up,down}_proj.weight; mixtral: block_sparse_moe.gate.weight and\n"
    "block_sparse_moe.experts.E.w1/w3/w2.weight. An RMSNorm just before a MoE layer becomes its\n"
    "post_attention_layernorm. The family is --layout, else the one 'moert import' recorded in\n"
    "the model's name, else deepseek_v3 for sigmoid routers and qwen3_moe for softmax ones.\n"
    "A MoE layer named 'layers.N....' (as 'moert import' names them) becomes decoder layer N;\n"
    "otherwise MoE layers are numbered from 0. Other layers are not exported. By default every\n"
    "tensor is written as stored (bf16 stays bf16, FP8 stays FP8 with its blocks as\n"
    "weight_scale_inv), so import -> export -> import gives the same moert file; a trained\n"
    "checkpoint's fp32 masters are written as fp32 unless --dtype asks otherwise: bf16 rounds\n"
    "to nearest even; fp8 writes the experts as E4M3 in 128x128 blocks with weight_scale_inv\n"
    "(amax / 448, the rules of moert's FP8 kernels; experts already in FP8 keep their blocks)\n"
    "and the router and norms as bf16, like DeepSeek-V3's FP8 release. The bias is always fp32.\n"
    "MODEL is loaded first, as a session would load it: what the library refuses is not exported\n"
    "(--no-check skips that: for a model larger than memory, or a checkpoint it cannot verify).\n"
    "What the family cannot express is refused: a softmax router in deepseek_v3/glm4_moe, a\n"
    "sigmoid one, groups, a scaling factor, shared experts or a bias in qwen3_moe/mixtral.",
    2,
    2,
    {{"dtype", "NAME", "as-stored, fp32, bf16 or fp8", "as-stored"},
     {"layout", "FAMILY", "deepseek_v3, kimi_k2, glm4_moe, qwen3_moe or mixtral", ""},
     {"no-check", "", "export MODEL without loading it through the library first", ""}},
};

int run_export(const Args& args) {
  ExportRequest r;
  r.model_path = args.positional()[0];
  r.out_dir = args.positional()[1];
  const std::string d = args.str("dtype", "as-stored");
  if (d == "as-stored")
    r.dtype = ExportDType::AsStored;
  else if (d == "fp32")
    r.dtype = ExportDType::F32;
  else if (d == "bf16")
    r.dtype = ExportDType::BF16;
  else if (d == "fp8")
    r.dtype = ExportDType::FP8;
  else
    usage_fail("--dtype takes as-stored, fp32, bf16 or fp8, got '", d, "'");
  r.layout = args.str("layout", "");
  // What the library refuses is not exported: the exporter reads the file's fields as written
  // (so that import -> export -> import is exact), and a damaged or hand-edited model would
  // otherwise become a checkpoint that other tools take as it is. Loading checks every field, a
  // checkpoint's digest included; the model is released before the export reads it again. It
  // holds the weights in memory as a session would (bf16 as fp32), where the export streams
  // them: --no-check is the way for a model larger than memory, or a checkpoint this version
  // cannot verify.
  if (!args.has("no-check")) {
    int32_t refusal = MOERT_OK;  // stays so for a file that cannot be read or parsed
    try {
      load_model_file(r.model_path, &refusal).reset();
    } catch (const Error& e) {
      // The way past is offered where the model may be sound: too large to load, or a checkpoint
      // whose digest this version cannot verify; not for a defect the export would carry over.
      const bool may_be_sound = refusal == MOERT_ERR_LIMIT || refusal == MOERT_ERR_OUT_OF_MEMORY ||
                                e.message().find("schema 1.0 digest") != std::string::npos;
      if (!may_be_sound) throw;
      fail(e.message(), " (--no-check exports it without loading it first)");
    }
  }
  const ExportResult res = export_checkpoint(r);
  std::printf("%s: %u MoE layer%s%s -> %s (%s): %llu tensors, %.1f MiB%s%s\n", r.model_path.c_str(),
              res.moe_layers, res.moe_layers == 1 ? "" : "s",
              res.norms ? (res.norms == 1 ? " with its RMSNorm" : " with their RMSNorms") : "",
              r.out_dir.c_str(), res.layout.c_str(), static_cast<unsigned long long>(res.tensors),
              res.bytes / 1048576.0,
              res.skipped_layers
                  ? cat(" (", res.skipped_layers, " other layers not exported)").c_str()
                  : "",
              res.residual ? "; the model's MoE layers add their input, which a Hugging Face "
                             "decoder layer does outside its MLP"
                           : "");
  return 0;
}

}  // namespace moert_cli
