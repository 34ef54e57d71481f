#include "model_builder.h"

#include <cstring>

#include "moert_generated.h"

namespace capi_test {
namespace fb = moert::fb;

TensorDesc TensorDesc::absent() {
  TensorDesc t;
  t.present = false;
  return t;
}

TensorDesc TensorDesc::init(int8_t kind, float std) {
  TensorDesc t;
  t.source = Source::kInit;
  t.init_kind = kind;
  t.init_std = std;
  return t;
}

TensorDesc TensorDesc::f32(const std::vector<float>& values) {
  TensorDesc t;
  t.source = Source::kData;
  t.dtype = 0;
  t.data.resize(values.size() * sizeof(float));
  std::memcpy(t.data.data(), values.data(), t.data.size());
  return t;
}

TensorDesc TensorDesc::bf16(const std::vector<float>& values) {
  TensorDesc t;
  t.source = Source::kData;
  t.dtype = 1;
  t.data.resize(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &values[i], sizeof bits);
    const uint16_t hi = static_cast<uint16_t>(bits >> 16);
    std::memcpy(t.data.data() + 2 * i, &hi, 2);
  }
  return t;
}

TensorDesc TensorDesc::external(uint64_t offset, uint64_t size) {
  TensorDesc t;
  t.source = Source::kExternal;
  t.ext_offset = offset;
  t.ext_size = size;
  return t;
}

std::vector<float> ramp(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = scale * static_cast<float>(static_cast<int>((i * 7 + 3) % 17) - 8);
  return v;
}

LayerDesc embedding_layer(const std::string& name, uint32_t vocab, uint32_t dim, uint32_t context) {
  LayerDesc l;
  l.name = name;
  l.kind_type = static_cast<uint8_t>(fb::LayerKind::Embedding);
  l.body = Body::kEmbedding;
  l.embedding.vocab_size = vocab;
  l.embedding.dim = dim;
  l.embedding.context = context;
  l.embedding.weight = TensorDesc::init(2, 1.0f);
  return l;
}

LayerDesc rmsnorm_layer(const std::string& name, uint32_t dim) {
  LayerDesc l;
  l.name = name;
  l.kind_type = static_cast<uint8_t>(fb::LayerKind::RMSNorm);
  l.body = Body::kRMSNorm;
  l.rmsnorm.dim = dim;
  return l;
}

LayerDesc moe_layer(const std::string& name, uint32_t dim) {
  LayerDesc l;
  l.name = name;
  l.kind_type = static_cast<uint8_t>(fb::LayerKind::MoE);
  l.body = Body::kMoE;
  l.moe.dim = dim;
  return l;
}

LayerDesc dense_layer(const std::string& name, uint32_t dim, uint32_t hidden) {
  LayerDesc l;
  l.name = name;
  l.kind_type = static_cast<uint8_t>(fb::LayerKind::DenseFFN);
  l.body = Body::kDenseFFN;
  l.dense.dim = dim;
  l.dense.hidden = hidden;
  return l;
}

LayerDesc head_layer(const std::string& name, uint32_t dim, uint32_t vocab) {
  LayerDesc l;
  l.name = name;
  l.kind_type = static_cast<uint8_t>(fb::LayerKind::OutputHead);
  l.body = Body::kOutputHead;
  l.head.dim = dim;
  l.head.vocab_size = vocab;
  return l;
}

ModelDesc token_baseline() {
  ModelDesc m;
  m.name = "capi-token";
  LayerDesc embed = embedding_layer("embed", 16, 8, 1);
  embed.embedding.weight = TensorDesc::f32(ramp(16 * 8, 0.25f));
  m.layers.push_back(embed);
  m.layers.push_back(rmsnorm_layer("norm0", 8));
  LayerDesc moe = moe_layer("moe0", 8);
  moe.moe.gate_bias = TensorDesc::f32({0.0f, 0.01f, -0.01f, 0.02f});
  m.layers.push_back(moe);
  LayerDesc ffn = dense_layer("ffn0", 8, 8);
  ffn.dense.w2 = TensorDesc::bf16(ramp(8 * 8, 0.03f));
  m.layers.push_back(ffn);
  LayerDesc head = head_layer("head", 8, 16);
  head.head.bias = TensorDesc::f32(ramp(16, 0.01f));
  m.layers.push_back(head);
  return m;
}

ModelDesc hidden_baseline() {
  ModelDesc m;
  m.name = "capi-hidden";
  m.input_dim = 8;
  m.layers.push_back(rmsnorm_layer("norm0", 8));
  m.layers.push_back(moe_layer("moe0", 8));
  m.layers.push_back(head_layer("head", 8, 16));
  return m;
}

namespace {

flatbuffers::Offset<fb::Tensor> tensor(flatbuffers::FlatBufferBuilder& b, const TensorDesc& t) {
  if (!t.present) return 0;
  flatbuffers::Offset<flatbuffers::Vector<uint64_t>> shape = 0;
  if (t.shape) shape = b.CreateVector(*t.shape);
  flatbuffers::Offset<flatbuffers::Vector<uint8_t>> data = 0;
  if (t.source == TensorDesc::Source::kData) {
    b.ForceVectorAlignment(t.data.size(), sizeof(uint8_t), 32);
    data = b.CreateVector(t.data);
  }
  flatbuffers::Offset<fb::Init> init = 0;
  if (t.source == TensorDesc::Source::kInit || t.also_init) {
    fb::InitBuilder ib(b);
    ib.add_kind(static_cast<fb::InitKind>(t.init_kind));
    ib.add_std(t.init_std);
    ib.add_seed(t.init_seed);
    init = ib.Finish();
  }
  flatbuffers::Offset<fb::BlockScales> scales = 0;
  if (t.has_scales) {
    const auto values = b.CreateVector(t.scales);
    fb::BlockScalesBuilder sb(b);
    sb.add_block_rows(t.block_rows);
    sb.add_block_cols(t.block_cols);
    sb.add_scales(values);
    scales = sb.Finish();
  }
  const fb::ExternalRef ref(t.ext_offset, t.ext_size);
  fb::TensorBuilder tb(b);
  if (t.shape) tb.add_shape(shape);
  tb.add_dtype(static_cast<fb::DType>(t.dtype));
  if (t.source == TensorDesc::Source::kData) tb.add_data(data);
  if (t.source == TensorDesc::Source::kExternal) tb.add_external(&ref);
  if (t.source == TensorDesc::Source::kInit || t.also_init) tb.add_init(init);
  if (t.has_scales) tb.add_scales(scales);
  return tb.Finish();
}

flatbuffers::Offset<void> embedding(flatbuffers::FlatBufferBuilder& b, const EmbeddingDesc& e) {
  const auto w = tensor(b, e.weight);
  fb::EmbeddingBuilder eb(b);
  eb.add_vocab_size(e.vocab_size);
  eb.add_dim(e.dim);
  eb.add_context(e.context);
  if (!w.IsNull()) eb.add_weight(w);
  return eb.Finish().Union();
}

flatbuffers::Offset<void> rmsnorm(flatbuffers::FlatBufferBuilder& b, const RMSNormDesc& n) {
  const auto w = tensor(b, n.weight);
  fb::RMSNormBuilder nb(b);
  nb.add_dim(n.dim);
  nb.add_eps(n.eps);
  if (!w.IsNull()) nb.add_weight(w);
  return nb.Finish().Union();
}

flatbuffers::Offset<void> dense(flatbuffers::FlatBufferBuilder& b, const DenseDesc& f) {
  const auto w1 = tensor(b, f.w1), w3 = tensor(b, f.w3), w2 = tensor(b, f.w2);
  fb::DenseFFNBuilder fbld(b);
  fbld.add_dim(f.dim);
  fbld.add_hidden(f.hidden);
  fbld.add_residual(f.residual);
  if (!w1.IsNull()) fbld.add_w1(w1);
  if (!w3.IsNull()) fbld.add_w3(w3);
  if (!w2.IsNull()) fbld.add_w2(w2);
  return fbld.Finish().Union();
}

flatbuffers::Offset<void> moe(flatbuffers::FlatBufferBuilder& b, const MoEDesc& m) {
  flatbuffers::Offset<fb::Balancing> balancing = 0;
  if (m.balancing.present) {
    fb::BalancingBuilder bb(b);
    if (m.balancing.policy) bb.add_policy(static_cast<fb::BalancingPolicy>(*m.balancing.policy));
    bb.add_bias_update_rate(m.balancing.bias_update_rate);
    bb.add_bias_centering(m.balancing.bias_centering);
    bb.add_bias_frozen(m.balancing.bias_frozen);
    const bool aux_loss = m.balancing.policy == 2 || m.balancing.policy == 3;
    if (!m.balancing.leave_out_aux_alpha && (aux_loss || m.balancing.aux_alpha != 0.0f))
      bb.add_aux_alpha(m.balancing.aux_alpha);
    bb.add_capacity_factor(m.balancing.capacity_factor);
    balancing = bb.Finish();
  }
  const auto gate = tensor(b, m.gate), gate_bias = tensor(b, m.gate_bias);
  const auto w1 = tensor(b, m.w1), w3 = tensor(b, m.w3), w2 = tensor(b, m.w2);
  const auto sw1 = tensor(b, m.shared_w1), sw3 = tensor(b, m.shared_w3),
             sw2 = tensor(b, m.shared_w2);
  fb::MoEBuilder mb(b);
  mb.add_dim(m.dim);
  if (m.num_experts) mb.add_num_experts(*m.num_experts);
  if (m.top_k) mb.add_top_k(*m.top_k);
  if (m.expert_hidden) mb.add_expert_hidden(*m.expert_hidden);
  if (m.score_function) mb.add_score_function(static_cast<fb::ScoreFunction>(*m.score_function));
  if (m.num_groups) mb.add_num_groups(*m.num_groups);
  if (m.topk_groups) mb.add_topk_groups(*m.topk_groups);
  if (m.normalize_weights) mb.add_normalize_weights(*m.normalize_weights);
  if (m.routed_scaling_factor) mb.add_routed_scaling_factor(*m.routed_scaling_factor);
  mb.add_num_shared_experts(m.num_shared);
  mb.add_shared_hidden(m.shared_hidden);
  mb.add_residual(m.residual);
  if (!balancing.IsNull()) mb.add_balancing(balancing);
  if (!gate.IsNull()) mb.add_gate(gate);
  if (!gate_bias.IsNull()) mb.add_gate_bias(gate_bias);
  if (!w1.IsNull()) mb.add_w1(w1);
  if (!w3.IsNull()) mb.add_w3(w3);
  if (!w2.IsNull()) mb.add_w2(w2);
  if (!sw1.IsNull()) mb.add_shared_w1(sw1);
  if (!sw3.IsNull()) mb.add_shared_w3(sw3);
  if (!sw2.IsNull()) mb.add_shared_w2(sw2);
  return mb.Finish().Union();
}

flatbuffers::Offset<void> head(flatbuffers::FlatBufferBuilder& b, const HeadDesc& h) {
  const auto w = tensor(b, h.weight), bias = tensor(b, h.bias);
  fb::OutputHeadBuilder hb(b);
  hb.add_dim(h.dim);
  hb.add_vocab_size(h.vocab_size);
  if (!w.IsNull()) hb.add_weight(w);
  if (!bias.IsNull()) hb.add_bias(bias);
  return hb.Finish().Union();
}

flatbuffers::Offset<fb::Layer> layer(flatbuffers::FlatBufferBuilder& b, const LayerDesc& l) {
  flatbuffers::Offset<void> body = 0;
  switch (l.body) {
    case Body::kNone:
      break;
    case Body::kEmbedding:
      body = embedding(b, l.embedding);
      break;
    case Body::kRMSNorm:
      body = rmsnorm(b, l.rmsnorm);
      break;
    case Body::kMoE:
      body = moe(b, l.moe);
      break;
    case Body::kDenseFFN:
      body = dense(b, l.dense);
      break;
    case Body::kOutputHead:
      body = head(b, l.head);
      break;
  }
  flatbuffers::Offset<flatbuffers::String> name = 0;
  if (l.name) name = b.CreateString(*l.name);
  fb::LayerBuilder lb(b);
  if (l.name) lb.add_name(name);
  lb.add_kind_type(static_cast<fb::LayerKind>(l.kind_type));
  if (!body.IsNull()) lb.add_kind(body);
  return lb.Finish();
}

}  // namespace

std::vector<uint8_t> build(const ModelDesc& m) {
  flatbuffers::FlatBufferBuilder b;
  std::vector<flatbuffers::Offset<fb::Layer>> layers;
  for (const auto& l : m.layers) layers.push_back(layer(b, l));
  const auto layers_vec = b.CreateVector(layers);
  flatbuffers::Offset<flatbuffers::String> name = 0, external = 0;
  if (m.name) name = b.CreateString(*m.name);
  if (m.external_data) external = b.CreateString(*m.external_data);
  fb::ModelBuilder mb(b);
  mb.add_schema_major(m.schema_major);
  mb.add_schema_minor(m.schema_minor);
  if (m.name) mb.add_name(name);
  mb.add_input_dim(m.input_dim);
  mb.add_layers(layers_vec);
  mb.add_seed(m.seed);
  if (m.external_data) mb.add_external_data(external);
  fb::FinishModelBuffer(b, mb.Finish());
  return std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
}

}  // namespace capi_test
