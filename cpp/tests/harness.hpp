// A minimal test harness (no third-party test framework needed): TEST(name) { ... } with CHECK / CHECK_EQ /
// CHECK_THROWS. Each test file is its own executable registered with ctest.
#pragma once
#include <cstdio>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace osengine_test {

struct TestCase {
  const char* name;
  std::function<void()> body;
};
inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}
struct Registrar {
  Registrar(const char* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};
struct Failure : std::exception {
  std::string message;
  explicit Failure(std::string m) : message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

inline int run_all() {
  int failed = 0;
  for (const auto& test : registry()) {
    try {
      test.body();
      std::printf("[ PASS ] %s\n", test.name);
    } catch (const std::exception& e) {
      ++failed;
      std::printf("[ FAIL ] %s: %s\n", test.name, e.what());
    }
  }
  std::printf("%d passed, %d failed\n", static_cast<int>(registry().size()) - failed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace osengine_test

#define OSE_CONCAT_(a, b) a##b
#define OSE_CONCAT(a, b) OSE_CONCAT_(a, b)
#define TEST(name)                                                                          \
  static void name();                                                                       \
  static osengine_test::Registrar OSE_CONCAT(registrar_, name)(#name, name);                \
  static void name()

#define CHECK(cond)                                                                         \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::ostringstream ose_msg;                                                           \
      ose_msg << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed";                \
      throw osengine_test::Failure(ose_msg.str());                                          \
    }                                                                                       \
  } while (0)

#define CHECK_EQ(a, b)                                                                      \
  do {                                                                                      \
    const auto& ose_a = (a);                                                                \
    const auto& ose_b = (b);                                                                \
    if (!(ose_a == ose_b)) {                                                                \
      std::ostringstream ose_msg;                                                           \
      ose_msg << __FILE__ << ":" << __LINE__ << ": CHECK_EQ(" #a ", " #b ") failed: " << ose_a \
              << " != " << ose_b;                                                           \
      throw osengine_test::Failure(ose_msg.str());                                          \
    }                                                                                       \
  } while (0)

// Checks that `expr` throws `exc_type` whose what() contains `fragment`.
#define CHECK_THROWS(expr, exc_type, fragment)                                              \
  do {                                                                                      \
    bool ose_thrown = false;                                                                \
    try {                                                                                   \
      expr;                                                                                 \
    } catch (const exc_type& ose_e) {                                                       \
      ose_thrown = true;                                                                    \
      if (std::string(ose_e.what()).find(fragment) == std::string::npos) {                  \
        std::ostringstream ose_msg;                                                         \
        ose_msg << __FILE__ << ":" << __LINE__ << ": message '" << ose_e.what()             \
                << "' lacks '" << (fragment) << "'";                                        \
        throw osengine_test::Failure(ose_msg.str());                                        \
      }                                                                                     \
    }                                                                                       \
    if (!ose_thrown) {                                                                      \
      std::ostringstream ose_msg;                                                           \
      ose_msg << __FILE__ << ":" << __LINE__ << ": " #expr " did not throw " #exc_type;     \
      throw osengine_test::Failure(ose_msg.str());                                          \
    }                                                                                       \
  } while (0)

#define OSENGINE_TEST_MAIN \
  int main() { return osengine_test::run_all(); }
