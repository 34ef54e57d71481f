#include "cli/model_codec.h"

#include <fcntl.h>
#include <flatbuffers/idl.h>
#include <flatbuffers/reflection.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <type_traits>

#include "cli/error.h"
#include "cli/regular_file.h"
#include "moert_schema_text.h"

namespace moert_cli {
namespace {

// The parser reports "LINE: COLUMN: error: MESSAGE" (no file name: the text came from memory),
// sometimes over several lines; the CLI reports one line that says where.
std::string one_line(std::string message) {
  for (char& c : message)
    if (c == '\n' || c == '\r') c = ' ';
  while (!message.empty() && message.back() == ' ') message.pop_back();
  const size_t c1 = message.find(": "), c2 = message.find(": ", c1 + 2);
  const std::string tag = ": error: ";
  if (c1 != std::string::npos && c2 != std::string::npos &&
      message.compare(c2, tag.size(), tag) == 0 && message.find_first_not_of("0123456789") == c1 &&
      message.find_first_not_of("0123456789", c1 + 2) == c2)
    return "line " + message.substr(0, c1) + ", column " + message.substr(c1 + 2, c2 - c1 - 2) +
           ": " + message.substr(c2 + tag.size());
  return message;
}

// A parser that has read the schema and is ready for one JSON document.
void load_schema(flatbuffers::Parser& parser) {
  if (!parser.Parse(kMoertSchemaText))
    throw std::logic_error("the embedded schema does not parse: " + parser.error_);
}

flatbuffers::IDLOptions json_options() {
  flatbuffers::IDLOptions o;
  o.strict_json = true;  // quoted field names: any JSON tool can read the output
  o.indent_step = 2;
  o.output_enum_identifiers = true;
  return o;
}

// What rendering needs is read from the schema once: its reflection form (which drives a
// verifier that needs no generated code) and a parser holding it, which rendering only reads.
struct Renderer {
  flatbuffers::Parser schema_parser;
  flatbuffers::Parser parser{json_options()};
  Renderer() {
    load_schema(schema_parser);
    schema_parser.Serialize();
    load_schema(parser);
  }
  const reflection::Schema* schema() const {
    return reflection::GetSchema(schema_parser.builder_.GetBufferPointer());
  }
};

const Renderer& renderer() {
  static const Renderer r;
  return r;
}

// Whether `bytes` verify as a model against the schema, as binary_to_json checks them. The
// reflection verifier is stricter than the generated one: it also refuses a union whose type is
// set without its value (a layer with "kind_type" and no "kind"), which FlatBuffers' JSON parser
// accepts.
bool verifies(const uint8_t* bytes, size_t size) {
  const reflection::Schema* schema = renderer().schema();
  return schema->root_table() && flatbuffers::Verify(*schema, *schema->root_table(), bytes, size);
}

bool same_value(double a, double b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0;
}

std::string shown(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// float_changes' walk over one table (or struct) of `type` in both buffers.
class FloatWalk {
 public:
  explicit FloatWalk(const reflection::Schema& schema) : schema_(schema) {}
  FloatChanges changes;

  template <typename T>  // flatbuffers::Table or flatbuffers::Struct
  void object(const reflection::Object& type, const T& a, const T& b, const std::string& path) {
    for (const reflection::Field* f : *type.fields()) {
      const std::string at = path + (path.empty() ? "" : ".") + f->name()->str();
      const reflection::Type& t = *f->type();
      switch (t.base_type()) {
        case reflection::Float:
        case reflection::Double:
          value(flatbuffers::GetAnyFieldF(a, *f), flatbuffers::GetAnyFieldF(b, *f), at);
          break;
        case reflection::Obj: {
          const reflection::Object& sub = *schema_.objects()->Get(t.index());
          if constexpr (std::is_same_v<T, flatbuffers::Table>) {
            if (sub.is_struct()) {
              const auto* sa = a.template GetStruct<const flatbuffers::Struct*>(f->offset());
              const auto* sb = b.template GetStruct<const flatbuffers::Struct*>(f->offset());
              if (sa && sb) object(sub, *sa, *sb, at);
            } else {
              const auto* ta = a.template GetPointer<const flatbuffers::Table*>(f->offset());
              const auto* tb = b.template GetPointer<const flatbuffers::Table*>(f->offset());
              if (ta && tb) object(sub, *ta, *tb, at);
            }
          } else {  // a struct inside a struct
            object(sub, *a.template GetStruct<const flatbuffers::Struct*>(f->offset()),
                   *b.template GetStruct<const flatbuffers::Struct*>(f->offset()), at);
          }
          break;
        }
        case reflection::Union:
          if constexpr (std::is_same_v<T, flatbuffers::Table>) {
            // The member from the "_type" field, checked (flatbuffers::GetUnionType is not: a
            // layer of kind NONE, or of a kind this schema lacks, would index past the objects).
            const reflection::Object* member = union_member(type, *f, a);
            const auto* ta = a.template GetPointer<const flatbuffers::Table*>(f->offset());
            const auto* tb = b.template GetPointer<const flatbuffers::Table*>(f->offset());
            if (member && member == union_member(type, *f, b) && ta && tb)
              object(*member, *ta, *tb, at);
          }
          break;
        case reflection::Vector:
          if constexpr (std::is_same_v<T, flatbuffers::Table>) vector(t, a, b, *f, at);
          break;
        default:
          break;
      }
    }
  }

 private:
  // `where` names the value; called only for the first change (vectors hold many values).
  template <typename Where>
  void value(double a, double b, const Where& where) {
    ++changes.values;
    if (same_value(a, b)) return;
    if (changes.changed++ == 0) changes.first = where() + ": " + shown(a) + " -> " + shown(b);
  }
  void value(double a, double b, const std::string& at) {
    value(a, b, [&] { return at; });
  }

  // The table type a union field of `table` holds, or null for NONE or a type the schema lacks.
  const reflection::Object* union_member(const reflection::Object& type,
                                         const reflection::Field& field,
                                         const flatbuffers::Table& table) const {
    const reflection::Field* tf =
        type.fields()->LookupByKey((field.name()->str() + "_type").c_str());
    if (!tf) return nullptr;
    const auto code = flatbuffers::GetFieldI<uint8_t>(table, *tf);
    if (code == 0) return nullptr;
    const reflection::EnumVal* v =
        schema_.enums()->Get(field.type()->index())->values()->LookupByKey(code);
    if (!v || !v->union_type() || v->union_type()->index() < 0 ||
        static_cast<flatbuffers::uoffset_t>(v->union_type()->index()) >= schema_.objects()->size())
      return nullptr;
    return schema_.objects()->Get(static_cast<flatbuffers::uoffset_t>(v->union_type()->index()));
  }

  void vector(const reflection::Type& t, const flatbuffers::Table& a, const flatbuffers::Table& b,
              const reflection::Field& f, const std::string& at) {
    const auto* va = a.GetPointer<const flatbuffers::VectorOfAny*>(f.offset());
    const auto* vb = b.GetPointer<const flatbuffers::VectorOfAny*>(f.offset());
    if (!va || !vb) return;
    const flatbuffers::uoffset_t n = std::min(va->size(), vb->size());
    auto item = [&](flatbuffers::uoffset_t i) { return at + "[" + std::to_string(i) + "]"; };
    switch (t.element()) {
      case reflection::Float:
      case reflection::Double:
        for (flatbuffers::uoffset_t i = 0; i < n; ++i)
          value(flatbuffers::GetAnyVectorElemF(va, t.element(), i),
                flatbuffers::GetAnyVectorElemF(vb, t.element(), i), [&] { return item(i); });
        break;
      case reflection::Obj: {
        const reflection::Object& sub = *schema_.objects()->Get(t.index());
        const size_t stride = static_cast<size_t>(sub.bytesize());
        for (flatbuffers::uoffset_t i = 0; i < n; ++i) {
          if (sub.is_struct()) {
            object(sub, *reinterpret_cast<const flatbuffers::Struct*>(va->Data() + i * stride),
                   *reinterpret_cast<const flatbuffers::Struct*>(vb->Data() + i * stride), item(i));
          } else {
            object(sub, *flatbuffers::GetAnyVectorElemPointer<const flatbuffers::Table>(va, i),
                   *flatbuffers::GetAnyVectorElemPointer<const flatbuffers::Table>(vb, i), item(i));
          }
        }
        break;
      }
      default:
        break;
    }
  }

  const reflection::Schema& schema_;
};

}  // namespace

FloatChanges float_changes(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  const reflection::Schema& schema = *renderer().schema();
  FloatWalk walk(schema);
  walk.object(*schema.root_table(), *flatbuffers::GetAnyRoot(a.data()),
              *flatbuffers::GetAnyRoot(b.data()), "");
  return walk.changes;
}

bool is_binary_model(const std::vector<uint8_t>& bytes) {
  return bytes.size() >= 8 && flatbuffers::BufferHasIdentifier(bytes.data(), "MOE1");
}

std::vector<uint8_t> json_to_binary(const std::string& json, const std::string& origin) {
  // One parser per thread holds the schema and reads every document with ParseJson, which takes
  // JSON only: a document cannot add declarations to the schema (or change its root type), as it
  // could through Parse, which reads schema text as well.
  thread_local std::unique_ptr<flatbuffers::Parser> parser;
  if (!parser) {
    parser = std::make_unique<flatbuffers::Parser>(json_options());
    load_schema(*parser);
  }
  if (!parser->ParseJson(json.c_str())) {
    const std::string error = one_line(parser->error_);
    // A parse that fails part-way leaves state behind in FlatBuffers 2.0.8's parser (its field
    // stack is cleared by Parse, not by ParseJson): the next document gets a fresh one.
    parser.reset();
    fail(origin, ": not a valid model description: ", error);
  }
  const uint8_t* p = parser->builder_.GetBufferPointer();
  const size_t size = parser->builder_.GetSize();
  // The converter writes nothing that it would refuse to read back (found by fuzzing).
  if (!verifies(p, size))
    fail(origin,
         ": not a valid model description: it does not verify as a model (a union's type "
         "without its value, such as a layer's \"kind_type\" without its \"kind\" table?)");
  return std::vector<uint8_t>(p, p + size);
}

std::string binary_to_json(const std::vector<uint8_t>& bytes, const std::string& origin) {
  if (!is_binary_model(bytes))
    fail(origin, ": not a binary moert model (no 'MOE1' file identifier)");
  const Renderer& r = renderer();
  if (!verifies(bytes.data(), bytes.size()))
    fail(origin, ": damaged model file (the FlatBuffers verifier refuses it)");

  std::string text;
  if (!flatbuffers::GenerateText(r.parser, bytes.data(), &text))
    fail(origin, ": cannot render the model as JSON");
  return text;
}

std::vector<uint8_t> read_file(const std::string& path) { return read_regular_file(path); }

std::string directory_of(const std::string& path) {
  const std::string dir = std::filesystem::path(path).parent_path().string();
  return dir.empty() ? "." : dir;
}

std::vector<uint8_t> read_model_file(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  if (!is_binary_model(bytes)) {
    const std::string text(bytes.begin(), bytes.end());
    bytes = json_to_binary(text, path);
  }
  return bytes;
}

ModelPtr load_model_file(const std::string& path, int32_t* refusal, LoadWeights weights) {
  return load_model_bytes(read_model_file(path), directory_of(path), path, refusal, weights);
}

}  // namespace moert_cli
