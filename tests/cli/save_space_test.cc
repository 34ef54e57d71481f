// `moert train --save`'s check for room before training (cli/save_space.h): the arithmetic of
// saves that replace earlier checkpoints, the refusal's message, and the bound against the files
// that `train --save` really writes. The refusal itself needs a file system too small for the
// run, which a test cannot count on without mounting one: it is driven here with the free bytes
// given.
#include "cli/save_space.h"

#include <gtest/gtest.h>
#include <moert/moert.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "cli/error.h"

namespace {

namespace fs = std::filesystem;
using moert_cli::PlannedSave;

TEST(SaveSpace, ACheckpointReplacedIsFreedOnlyOnceItsSuccessorIsWritten) {
  using moert_cli::bytes_needed;
  EXPECT_EQ(bytes_needed({}), 0u);
  EXPECT_EQ(bytes_needed({{"a", 10, 0}, {"b", 10, 0}, {"c", 10, 0}}), 30u);
  // Each save needs its own bytes on top of what the earlier ones left: 10, 20 - 8, 30 - 16.
  EXPECT_EQ(bytes_needed({{"a", 10, 8}, {"b", 10, 8}, {"c", 10, 8}}), 14u);
  // A larger checkpoint replaced first leaves room for the next.
  EXPECT_EQ(bytes_needed({{"a", 10, 20}, {"b", 10, 0}}), 10u);
}

TEST(SaveSpace, ARunWhoseCheckpointsCannotFitIsRefusedNamingTheFolderAndBothFigures) {
  const std::vector<PlannedSave> saves = {{"ck/none.moert", 600, 0}, {"ck/aux.moert", 600, 0}};
  EXPECT_NO_THROW(moert_cli::refuse_saves_past("ck", 1200, saves));
  try {
    moert_cli::refuse_saves_past("ck", 1199, saves);
    ADD_FAILURE() << "1199 bytes took 1200";
  } catch (const moert_cli::Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.rfind("--save: 'ck' has 1199 bytes free (", 0), 0u) << m;
    EXPECT_NE(m.find("the 2 checkpoints of this run need up to 1200 ("), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
  EXPECT_TRUE(moert_cli::free_bytes(MOERT_CLI_WORKDIR).has_value());
}

// The bound the check uses holds what `train --save` writes, description and data file, and is
// not far above it (the description's allowance: 1 MiB and 4 KiB per tensor).
TEST(SaveSpace, TheBoundHoldsTheCheckpointsTrainWrites) {
  const fs::path dir = fs::path(MOERT_CLI_WORKDIR) / "save_space";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string cmd = std::string("'") + MOERT_CLI + "' train --corpus " + MOERT_TINY_CORPUS +
                          " --steps 2 --balancing none,loss-free --probe-rows 0 --eval-rows 64" +
                          " --save '" + (dir / "ck").string() + "' >/dev/null 2>&1";
  const int status = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << cmd;
  for (const char* label : {"none", "loss-free"}) {
    const fs::path ck = dir / "ck" / (std::string(label) + ".moert");
    uint64_t written = 0;
    for (const auto& e : fs::directory_iterator(dir / "ck"))
      if (e.path().filename().string().rfind(ck.filename().string(), 0) == 0)
        written += e.file_size();
    moert_model* m = nullptr;
    ASSERT_EQ(moert_model_load_file(ck.c_str(), &m), nullptr);
    const uint64_t bound = moert_cli::checkpoint_bytes_bound(m);
    moert_model_free(m);
    EXPECT_GE(bound, written) << label;
    EXPECT_LE(bound - written, uint64_t{2} << 20) << label << ": " << written << " written";
  }
}

}  // namespace
