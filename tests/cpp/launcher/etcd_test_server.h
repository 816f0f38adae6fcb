// A real etcd member for tests (etcd_process.h) and REQUIRE_ETCD, which skips
// a test where no etcd binary is installed.
#pragma once

#include <gtest/gtest.h>

#include "etcd_process.h"

namespace flashckpt::rendezvous::etcd_testing {

#define REQUIRE_ETCD(server)                                                                       \
  if (!::flashckpt::rendezvous::etcd_testing::FindProgram("etcd")) GTEST_SKIP() << "no etcd binary (apt install etcd-server)";           \
  ASSERT_TRUE((server).up()) << "etcd did not come up on " << (server).endpoint()

}  // namespace flashckpt::rendezvous::etcd_testing
