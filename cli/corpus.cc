#include "cli/corpus.h"

#include <algorithm>
#include <filesystem>

#include "cli/error.h"
#include "cli/model_codec.h"
#include "cli/regular_file.h"

namespace moert_cli {

int32_t char_id(unsigned char c) {
  if (c == '\t') return 1;
  if (c == '\n') return 2;
  if (c >= 0x20 && c <= 0x7e) return 3 + (c - 0x20);
  return 0;
}

char id_char(int32_t id) {
  if (id == 1) return '\t';
  if (id == 2) return '\n';
  if (id >= 3 && id < kVocabSize) return static_cast<char>(0x20 + id - 3);
  return '?';
}

namespace {

bool skipped(const std::filesystem::path& p) {
  const std::string name = p.filename().string();
  const std::string ext = p.extension().string();
  return name.empty() || name[0] == '.' || ext == ".dat" || ext == ".u8";
}

// Appends the records of one file: the text between separator lines ("%" alone on a line).
void add_records(const std::string& text, std::vector<std::string>& out) {
  std::string record;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    const bool last = end == std::string::npos;
    if (last) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line == "%") {
      if (!record.empty()) out.push_back(std::move(record));
      record.clear();
    } else {
      record.append(line);
      record += '\n';
    }
    pos = end + 1;
  }
  if (!record.empty()) out.push_back(std::move(record));
}

}  // namespace

Corpus read_corpus(const std::string& path) {
  namespace fs = std::filesystem;
  Corpus c;
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, ": no such file or directory");
  if (fs::is_directory(path, ec)) {
    for (const auto& entry : fs::directory_iterator(path, ec)) {
      // Symbolic links are skipped too: Debian's *.u8 entries are links to the files themselves.
      if (!entry.is_regular_file() || entry.is_symlink() || skipped(entry.path())) continue;
      c.files.push_back(entry.path().string());
    }
    if (ec) fail(path, ": cannot list: ", ec.message());
    std::sort(c.files.begin(), c.files.end());
    if (c.files.empty()) fail(path, ": holds no text files");
  } else {
    c.files.push_back(path);
  }
  for (const std::string& f : c.files) {
    const std::vector<uint8_t> bytes = read_stream(f, kMaxCorpusBytes - c.bytes);
    if (bytes.size() > kMaxCorpusBytes - c.bytes)
      fail(path, ": holds more than ", kMaxCorpusBytes >> 20,
           " MiB of text, the most a corpus may (train and eval keep it in memory)");
    c.bytes += bytes.size();
    add_records(std::string(bytes.begin(), bytes.end()), c.records);
  }
  if (c.records.empty()) fail(path, ": holds no text");
  return c;
}

Split split_corpus(const Corpus& corpus, uint32_t every, bool need_validation) {
  if (every < 2) fail("the validation split needs every >= 2");
  Split s;
  for (size_t i = 0; i < corpus.records.size(); ++i) {
    const bool val = i % every == every - 1;
    std::vector<int32_t>& out = val ? s.validation : s.train;
    (val ? s.validation_records : s.train_records) += 1;
    for (unsigned char ch : corpus.records[i]) {
      const int32_t id = char_id(ch);
      if (id == 0) ++s.other_chars;
      out.push_back(id);
    }
    out.push_back(char_id('%'));
    out.push_back(char_id('\n'));
  }
  if (need_validation && s.validation_records == 0)
    fail("the corpus has ", corpus.records.size(), " record", corpus.records.size() == 1 ? "" : "s",
         " (records are separated by lines holding only '%': a plain text file without them is "
         "one record); the validation split takes one record in ",
         every, " and would be empty");
  return s;
}

}  // namespace moert_cli
