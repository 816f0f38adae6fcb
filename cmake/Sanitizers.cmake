# FLASHCKPT_SANITIZE: builds every target with a sanitizer (scripts/sanitize.sh).
#   ""        none (default)
#   address   AddressSanitizer + UndefinedBehaviorSanitizer (any UB report is fatal)
#   thread    ThreadSanitizer
# With gcc, address links UBSan as a second runtime whose reports go to stderr
# whatever log_path says (GCC bug 94328); clang has one runtime for both, which
# is why scripts/sanitize.sh builds its ASan tree with clang.
# The flags are added to the compile and link lines of every C/C++ target
# (directory scope: included right after project(), before any target).
set(FLASHCKPT_SANITIZE "" CACHE STRING "Build with a sanitizer: \"\", address (ASan+UBSan) or thread (TSan)")
set_property(CACHE FLASHCKPT_SANITIZE PROPERTY STRINGS "" address thread)

if(FLASHCKPT_SANITIZE STREQUAL "")
  return()
elseif(FLASHCKPT_SANITIZE STREQUAL "address")
  set(_fc_sanitize_flags -fsanitize=address,undefined -fno-sanitize-recover=undefined)
elseif(FLASHCKPT_SANITIZE STREQUAL "thread")
  set(_fc_sanitize_flags -fsanitize=thread)
else()
  message(FATAL_ERROR "FLASHCKPT_SANITIZE='${FLASHCKPT_SANITIZE}': expected \"\", address or thread")
endif()

# C and C++ only: a CUDA compile (nvcc) would not take these flags.
add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${_fc_sanitize_flags};-fno-omit-frame-pointer;-g>")
add_link_options("$<$<LINK_LANGUAGE:C,CXX>:${_fc_sanitize_flags}>")
message(STATUS "flashckpt: sanitizer ${FLASHCKPT_SANITIZE} (${_fc_sanitize_flags})")
unset(_fc_sanitize_flags)
