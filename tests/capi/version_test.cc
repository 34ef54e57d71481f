// Versions and status codes: what a binding checks at load and shows to its users.
#include <climits>
#include <string>

#include "capi_test_util.h"

namespace capi_test {
namespace {

TEST(Version, AbiVersionMatchesTheHeader) {
  EXPECT_EQ(moert_abi_version(), static_cast<uint32_t>(MOERT_ABI_VERSION));
  EXPECT_EQ(MOERT_ABI_VERSION, 1);
}

TEST(Version, VersionStringMatchesTheMacros) {
  const char* v = moert_version_string();
  ASSERT_NE(v, nullptr);
  const std::string expected = std::to_string(MOERT_VERSION_MAJOR) + "." +
                               std::to_string(MOERT_VERSION_MINOR) + "." +
                               std::to_string(MOERT_VERSION_PATCH);
  EXPECT_EQ(std::string(v), expected);
  // Static storage: the same pointer every time.
  EXPECT_EQ(moert_version_string(), v);
}

TEST(Version, SchemaVersion) {
  uint32_t major = 12345, minor = 12345;
  moert_schema_version(&major, &minor);
  EXPECT_EQ(major, 1u);
  EXPECT_EQ(minor, 1u);
  // Either pointer may be NULL.
  uint32_t only_major = 0, only_minor = 77;
  moert_schema_version(&only_major, nullptr);
  moert_schema_version(nullptr, &only_minor);
  moert_schema_version(nullptr, nullptr);
  EXPECT_EQ(only_major, major);
  EXPECT_EQ(only_minor, minor);
}

TEST(Status, CodeNamesForEveryCode) {
  struct Named {
    int32_t code;
    const char* name;
  };
  const Named all[] = {
      {MOERT_OK, "MOERT_OK"},
      {MOERT_ERR_INVALID_ARGUMENT, "MOERT_ERR_INVALID_ARGUMENT"},
      {MOERT_ERR_INVALID_MODEL, "MOERT_ERR_INVALID_MODEL"},
      {MOERT_ERR_IO, "MOERT_ERR_IO"},
      {MOERT_ERR_OUT_OF_MEMORY, "MOERT_ERR_OUT_OF_MEMORY"},
      {MOERT_ERR_UNSUPPORTED, "MOERT_ERR_UNSUPPORTED"},
      {MOERT_ERR_INVALID_STATE, "MOERT_ERR_INVALID_STATE"},
      {MOERT_ERR_NUMERIC, "MOERT_ERR_NUMERIC"},
      {MOERT_ERR_INTERNAL, "MOERT_ERR_INTERNAL"},
      {MOERT_ERR_COMM, "MOERT_ERR_COMM"},
      {MOERT_ERR_LIMIT, "MOERT_ERR_LIMIT"},
  };
  for (const auto& n : all) {
    const char* got = moert_status_code_name(n.code);
    ASSERT_NE(got, nullptr) << n.code;
    EXPECT_STREQ(got, n.name) << n.code;
  }
  for (int32_t unknown : {-1, 11, 100, INT32_MIN, INT32_MAX})
    EXPECT_STREQ(moert_status_code_name(unknown), "MOERT_ERR_UNKNOWN") << unknown;
}

TEST(Status, NullStatusIsSuccess) {
  EXPECT_EQ(moert_status_code(nullptr), MOERT_OK);
  ASSERT_NE(moert_status_message(nullptr), nullptr);
  EXPECT_STREQ(moert_status_message(nullptr), "");
  moert_status_free(nullptr);
}

TEST(Status, StatusOwnsItsMessageIndependently) {
  // Two failures give two independent statuses: freeing one leaves the other intact.
  moert_model* m = nullptr;
  moert_status* a = moert_model_load_file("/nonexistent/a.moert", &m);
  moert_status* b = moert_model_load_file(nullptr, &m);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_NE(a, b);
  const std::string b_message = moert_status_message(b);
  moert_status_free(a);
  EXPECT_EQ(moert_status_code(b), MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(std::string(moert_status_message(b)), b_message);
  moert_status_free(b);
  EXPECT_EQ(m, nullptr);
}

}  // namespace
}  // namespace capi_test
