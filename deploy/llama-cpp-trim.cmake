# Included after every project() call of llama-cpp-python's build (CMAKE_PROJECT_INCLUDE, set in
# the Makefile). llama-cpp-python forces LLAMA_BUILD_COMMON on, but never ships or loads
# llama.cpp's `common` library (argument parsing, chat parsers, downloads); a normal variable in
# llama.cpp's own scope shadows that cache entry (policy CMP0077), so it is not compiled.
if(PROJECT_NAME STREQUAL "llama.cpp")
  set(LLAMA_BUILD_COMMON OFF)
endif()
