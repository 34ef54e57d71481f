// Text corpora for character-level language models: records read from fortune files (strfile
// format: records separated by lines holding a single '%') or plain text, a fixed character
// vocabulary, and a deterministic train/validation split by record.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moert_cli {

// The vocabulary: id 0 for every byte outside it (non-ASCII bytes, control characters other than
// tab and newline), 1 for tab, 2 for newline, 3..97 for the printable ASCII characters ' '..'~'.
// It is fixed rather than learned from the corpus so that any model trained by `moert train` can
// be evaluated on any text.
inline constexpr int32_t kVocabSize = 98;
int32_t char_id(unsigned char c);
char id_char(int32_t id);  // '?' for the "other" id

struct Corpus {
  std::vector<std::string> files;    // the files read, in order
  std::vector<std::string> records;  // every record, in file order then file position
  uint64_t bytes = 0;
};

// The most text a corpus may hold: train and eval keep it in memory, its records and their
// encoding at 4 bytes per character (about 1.5 GiB at this size). A stream that never ends
// (/dev/zero) is refused when it passes it.
inline constexpr uint64_t kMaxCorpusBytes = uint64_t{256} << 20;

// Reads `path`: a file, or every regular file directly inside a directory (sorted by name),
// skipping strfile indexes (*.dat), their *.u8 links and hidden files. Subdirectories are not
// entered, which keeps Debian's offensive fortunes (fortunes/off/, package fortunes-off) out.
Corpus read_corpus(const std::string& path);

struct Split {
  std::vector<int32_t> train, validation;  // encoded token streams
  uint64_t train_records = 0, validation_records = 0;
  uint64_t other_chars = 0;  // characters mapped to the "other" id
};

// Every `every`-th record (indices every-1, 2*every-1, ...) goes to validation, the rest to
// training; each split is the concatenation of its records, each followed by the "%\n" separator
// line, so the model also learns where a fortune ends. `need_validation`: an empty validation
// split (fewer than `every` records) is an error, named so.
Split split_corpus(const Corpus& corpus, uint32_t every, bool need_validation = true);

}  // namespace moert_cli
