// The CLI's safetensors reader (cli/safetensors.h): a well-formed file reads back as written, and
// every kind of malformed header is refused with a message that names the defect.
#include "cli/safetensors.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cli/error.h"

namespace {

using moert_cli::Error;
using moert_cli::SafetensorsFile;
using moert_cli::StDType;

std::vector<uint8_t> file_of(const std::string& header, size_t data_bytes, uint64_t length = 0) {
  const uint64_t n = length ? length : header.size();
  // Sized once, then filled: GCC 12 at -O3 (the cuda preset) takes the insert into an 8-byte
  // vector for a copy out of its bounds (a false -Warray-bounds).
  std::vector<uint8_t> out(8 + header.size());
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  for (size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<uint8_t>(i));
  return out;
}

std::string refusal(const std::vector<uint8_t>& bytes) {
  try {
    SafetensorsFile::parse(bytes, "t.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  return "accepted";
}

TEST(Safetensors, ReadsTensorsInOffsetOrderWithMetadata) {
  const auto bytes = file_of(
      R"({"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},)"
      R"("__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("e":{"dtype":"F8_E4M3","shape":[0,5],"data_offsets":[22,22]}}   )",
      22);
  auto f = SafetensorsFile::parse(bytes, "t");
  ASSERT_EQ(f->tensors().size(), 3u);
  EXPECT_EQ(f->tensors()[0].name, "a");
  EXPECT_EQ(f->tensors()[1].name, "b");
  EXPECT_EQ(f->metadata().at("format"), "pt");
  const auto* b = f->find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, StDType::BF16);
  EXPECT_EQ(b->bytes.size(), 6u);
  EXPECT_EQ(b->bytes[0], 16);
  EXPECT_EQ(f->find("e")->numel(), 0u);
  EXPECT_EQ(f->find("missing"), nullptr);
}

TEST(Safetensors, RefusesEveryMalformedHeader) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(refusal(file_of(ok, 8)), "accepted");
  struct Case {
    std::vector<uint8_t> bytes;
    const char* message;
  };
  const Case cases[] = {
      {{1, 2, 3}, "too short"},
      {file_of(ok, 8, 1000), "runs past the end of the file"},
      {file_of(ok, 8, uint64_t{1} << 40), "exceeds the limit"},
      {file_of("[1,2]", 0), "does not start with a JSON object"},
      {file_of("{\"a\":", 0), "malformed JSON"},
      {file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{}})", 8), "duplicate"},
      {file_of(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
       "duplicate"},
      {file_of(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8), "unknown"},
      {file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8),
       "unknown key"},
      {file_of(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "needs dtype"},
      {file_of(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative"},
      {file_of(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8), "non-negative"},
      {file_of(R"({"a":{"dtype":"F32","shape":[9007199254740993],"data_offsets":[0,8]}})", 8),
       "above 2^53"},
      {file_of(R"({"a":{"dtype":"F64","shape":[9007199254740992,9007199254740992],)"
               R"("data_offsets":[0,8]}})",
               8),
       "overflows"},
      {file_of(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes"},
      {file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4), "past the data"},
      {file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "reversed"},
      {file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
               8),
       "overlaps"},
      {file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "belong to no"},
      {file_of(ok, 12), "belong to no tensor"},
      {file_of(R"({"__metadata__":{"k":1}})", 0), "not a string"},
      {file_of(R"({"a":{"dtype":"F32","shape":[[[2]]],"data_offsets":[0,8]}})", 8), "nested"},
      {file_of(R"({"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8), "empty name"},
      {file_of("{\"a\xff\":1}", 0), "malformed JSON"},
      {file_of(ok + std::string(4, '\0'), 8), "NUL byte"},
      {file_of(std::string(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})") + '\0' +
                   "garbage",
               8),
       "NUL byte"},
  };
  // Space padding is the format's own.
  EXPECT_EQ(refusal(file_of(ok + "    ", 8)), "accepted");
  for (const Case& c : cases) {
    const std::string m = refusal(c.bytes);
    EXPECT_NE(m.find(c.message), std::string::npos) << "want '" << c.message << "', got: " << m;
  }
}

TEST(Safetensors, HeaderWriterRoundTrips) {
  const std::vector<uint8_t> za(8, 1), yb(6, 2);
  moert_cli::StOutTensor a{"z", StDType::F32, {2}, za};
  moert_cli::StOutTensor b{"y", StDType::BF16, {1, 3}, yb};
  auto bytes = moert_cli::safetensors_header({&a, &b}, {{"format", "pt"}});
  EXPECT_EQ((bytes.size() - 8) % 8, 0u);
  bytes.insert(bytes.end(), a.bytes.begin(), a.bytes.end());
  bytes.insert(bytes.end(), b.bytes.begin(), b.bytes.end());
  auto f = SafetensorsFile::parse(bytes, "t");
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(f->find("y")->shape, (std::vector<uint64_t>{1, 3}));
  EXPECT_EQ(f->find("y")->bytes[0], 2);
  EXPECT_EQ(f->metadata().at("format"), "pt");
}

TEST(Safetensors, IndexNamesPlainFilesOnly) {
  auto m = moert_cli::parse_safetensors_index(
      R"({"metadata":{"total_size":8},"weight_map":{"a":"s1.safetensors"}})", "i");
  EXPECT_EQ(m.at("a"), "s1.safetensors");
  EXPECT_THROW(
      moert_cli::parse_safetensors_index(R"({"weight_map":{"a":"../x.safetensors"}})", "i"), Error);
  EXPECT_THROW(moert_cli::parse_safetensors_index(R"({"weight_map":{"a":"d/x"}})", "i"), Error);
  EXPECT_THROW(moert_cli::parse_safetensors_index(R"({"weight_map":{"a":3}})", "i"), Error);
  EXPECT_THROW(moert_cli::parse_safetensors_index(R"({"metadata":{}})", "i"), Error);
}

TEST(Safetensors, OpensMappedFilesAndShardedCheckpoints) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(MOERT_CLI_WORKDIR) / "safetensors_sharded";
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const std::vector<uint8_t>& b) {
    std::ofstream(dir / name, std::ios::binary)
        .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  };
  write("s1.safetensors", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8));
  write("s2.safetensors", file_of(R"({"b":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})", 3));
  write("model.safetensors.index.json",
        {std::begin(R"({"weight_map":{"a":"s1.safetensors","b":"s2.safetensors",)"
                    R"("c":"s2.safetensors"}})"),
         std::end(R"({"weight_map":{"a":"s1.safetensors","b":"s2.safetensors",)"
                  R"("c":"s2.safetensors"}})") -
             1});
  moert_cli::Checkpoint ck(dir.string());
  EXPECT_EQ(ck.get("a").bytes.size(), 8u);
  EXPECT_EQ(ck.get("b").bytes[2], 2);
  EXPECT_EQ(ck.find("nope"), nullptr);
  EXPECT_THROW(ck.get("c"), Error);  // listed, but not in its shard
  EXPECT_EQ(ck.names().size(), 3u);
  EXPECT_THROW(moert_cli::Checkpoint((dir / "absent").string()), Error);

  // A model.safetensors beside an index that does not name it: readers differ on which is the
  // checkpoint, so neither is taken; an index whose shard it is takes it as one.
  write("model.safetensors",
        file_of(R"({"z":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1));
  try {
    moert_cli::Checkpoint both(dir.string());
    ADD_FAILURE() << "a folder with both model.safetensors and an index was imported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("holds both model.safetensors and "
                                         "model.safetensors.index.json"),
              std::string::npos)
        << e.what();
  }
  const std::string naming = R"({"weight_map":{"a":"s1.safetensors","z":"model.safetensors"}})";
  write("model.safetensors.index.json", {naming.begin(), naming.end()});
  moert_cli::Checkpoint shard_of_index(dir.string());
  EXPECT_EQ(shard_of_index.get("z").bytes.size(), 1u);
}

// A checkpoint folder whose files are replaced while an import reads it (an export committing
// into it renames new files over the old ones): the import would mix two checkpoints. The check
// the import makes before it writes names the replaced file; a shard removed since is no change
// (what was read of it is whole).
TEST(Safetensors, FilesReplacedWhileReadAreRefused) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(MOERT_CLI_WORKDIR) / "safetensors_replaced";
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto write = [&](const fs::path& path, const std::string& text) {
    std::ofstream(path, std::ios::binary) << text;
  };
  auto write_bytes = [&](const fs::path& path, const std::vector<uint8_t>& b) {
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  };
  const std::vector<uint8_t> shard =
      file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
  const std::string index = R"({"weight_map":{"a":"s1.safetensors"}})";
  auto reset = [&] {
    write(dir / "config.json", "{}");
    write(dir / "model.safetensors.index.json", index);
    write_bytes(dir / "s1.safetensors", shard);
  };
  // Renamed over the file, as an export's commit does.
  auto replace = [&](const std::string& name) {
    fs::copy_file(dir / name, dir / "replacement", fs::copy_options::overwrite_existing);
    fs::rename(dir / "replacement", dir / name);
  };
  auto refusal = [&](moert_cli::Checkpoint& ck) -> std::string {
    try {
      ck.check_unchanged();
      return "";
    } catch (const Error& e) {
      return e.what();
    }
  };
  for (const char* name : {"config.json", "model.safetensors.index.json", "s1.safetensors"}) {
    reset();
    moert_cli::Checkpoint ck(dir.string());
    ck.config_text();
    EXPECT_EQ(ck.get("a").bytes.size(), 8u);
    EXPECT_EQ(refusal(ck), "");
    replace(name);
    const std::string why = refusal(ck);
    EXPECT_NE(why.find((dir / name).string() + "' was replaced while"), std::string::npos)
        << name << ": " << why;
  }
  reset();
  moert_cli::Checkpoint ck(dir.string());
  EXPECT_EQ(ck.get("a").bytes.size(), 8u);
  fs::remove(dir / "s1.safetensors");
  EXPECT_EQ(refusal(ck), "");
}

// A shard cut short while it is mapped (a download still running): reading the lost pages raised
// SIGBUS, which killed `moert import` midway. Now they read as zeros and the file is refused as
// changed, by name; the CLI's handler is installed only while a file is mapped.
TEST(Safetensors, AFileCutShortWhileMappedIsRefusedNotACrash) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(MOERT_CLI_WORKDIR) / "safetensors_cut_short";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path path = dir / "model.safetensors";
  constexpr size_t kData = 1 << 20;  // pages past the cut whatever the page size
  const auto bytes = file_of("{\"w\":{\"dtype\":\"U8\",\"shape\":[" + std::to_string(kData) +
                                 "],\"data_offsets\":[0," + std::to_string(kData) + "]}}",
                             kData);
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));

  struct sigaction before {};
  ASSERT_EQ(sigaction(SIGBUS, nullptr, &before), 0);
  {
    auto f = SafetensorsFile::open(path.string());
    f->check_unchanged();
    const moert_cli::StTensor* w = f->find("w");
    ASSERT_NE(w, nullptr);
    const size_t header = bytes.size() - kData;
    fs::resize_file(path, header + 100);
    // Every byte is read: those still in the file as they are, the rest as zeros.
    uint64_t sum = 0, past = 0;
    for (size_t i = 0; i < kData; ++i) {
      sum += w->bytes[i];
      if (i >= 100 && w->bytes[i] != 0) ++past;
    }
    EXPECT_EQ(past, 0u);
    EXPECT_GT(sum, 0u);
    try {
      f->check_unchanged();
      ADD_FAILURE() << "a file cut short was not refused";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("'" + path.string() + "' changed while being read (" +
                                           std::to_string(bytes.size()) + " bytes when opened, " +
                                           std::to_string(header + 100) + " now)"),
                std::string::npos)
          << e.what();
    }
    // A file grown back to its size is refused as well: what was read of it is zeros.
    fs::resize_file(path, bytes.size());
    EXPECT_THROW(f->check_unchanged(), Error);
  }
  // The previous disposition is back once nothing is mapped.
  struct sigaction after {};
  ASSERT_EQ(sigaction(SIGBUS, nullptr, &after), 0);
  EXPECT_EQ(after.sa_handler, before.sa_handler);
  EXPECT_EQ(after.sa_flags & SA_SIGINFO, before.sa_flags & SA_SIGINFO);

  // A file whose header promises more data than it holds (the same read past the end, known
  // before any read) is refused as such when opened.
  fs::resize_file(path, bytes.size() - 1);
  try {
    SafetensorsFile::open(path.string());
    ADD_FAILURE() << "a file shorter than its header says was opened";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("run past the data section"), std::string::npos)
        << e.what();
  }
}

// How the disposition the CLI's handler passes other SIGBUSes to ends the process: by SIGBUS, or,
// under AddressSanitizer (whose own handler that is), with its report and exit status 1.
#if defined(__SANITIZE_ADDRESS__)
const auto kPreviousSigbus = ::testing::ExitedWithCode(1);
constexpr const char* kPreviousSigbusSays = "AddressSanitizer: BUS";
#else
const auto kPreviousSigbus = ::testing::KilledBySignal(SIGBUS);
constexpr const char* kPreviousSigbusSays = "";
#endif

// While a file is mapped, a SIGBUS that is not a read of it (another mapping's lost page, a
// signal sent) still ends the process as SIGBUS did before.
TEST(SafetensorsDeathTest, AnyOtherSigbusStillEndsTheProcess) {
  namespace fs = std::filesystem;
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const fs::path dir = fs::path(MOERT_CLI_WORKDIR) / "safetensors_other_sigbus";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto bytes = file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
  for (const char* name : {"model.safetensors", "other"})
    std::ofstream(dir / name, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
  EXPECT_EXIT(
      {
        auto f = SafetensorsFile::open((dir / "model.safetensors").string());
        raise(SIGBUS);
      },
      kPreviousSigbus, kPreviousSigbusSays);
  EXPECT_EXIT(
      {
        auto f = SafetensorsFile::open((dir / "model.safetensors").string());
        const int fd = open((dir / "other").c_str(), O_RDONLY);
        const auto* p = static_cast<const volatile uint8_t*>(
            mmap(nullptr, 1 << 16, PROT_READ, MAP_PRIVATE, fd, 0));
        if (truncate((dir / "other").c_str(), 0) != 0) std::exit(2);
        std::exit(p[0]);  // past the end of a mapping that is not the CLI's
      },
      kPreviousSigbus, kPreviousSigbusSays);
}

}  // namespace
