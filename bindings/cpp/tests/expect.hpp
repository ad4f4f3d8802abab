// What the C++ binding tests share: EXPECT, which ends the test with the
// failed condition, and the message of the exception that a throwing
// reduction leaves nested in an lra::Error.
#ifndef LRA_TESTS_EXPECT_HPP
#define LRA_TESTS_EXPECT_HPP

#include <lra.hpp>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#define EXPECT(cond)                                                                \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

// `call` must throw an lra::Error with ReductionFailed: the what() of the
// std::exception nested in it ("" for none).
template <class F>
std::string nested_what_of(F&& call) {
  try {
    call();
  } catch (const lra::Error& e) {
    EXPECT(e.code() == lra::Status::ReductionFailed);
    try {
      std::rethrow_if_nested(e);
    } catch (const std::exception& inner) {
      return inner.what();
    }
    return "";
  }
  EXPECT(false);  // it did not throw
  return "";
}

#endif  // LRA_TESTS_EXPECT_HPP
