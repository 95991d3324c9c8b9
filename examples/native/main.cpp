// Allocates a paged KV pool through the installed C++ core, writes a block, copies it through the
// staging layout into another block and reads it back.
#include <sagellm_kv/kv_pool.hpp>
#include <sagellm_kv/version.hpp>

#include <cstdio>
#include <cstring>
#include <vector>

int main() {
  using namespace sagellm::kv;
  KVCacheSpec spec{4, 8, 64, DType::kFloat16, 16};
  PagedKVPool pool(spec, 256);
  std::vector<BlockId> ids(2);
  pool.allocate(ids);

  std::memset(pool.block_data(3, true, ids[0]), 0x5A, spec.layer_block_bytes());
  std::vector<std::byte> staging(pool.block_bytes());
  pool.gather(std::span<const BlockId>(ids.data(), 1), staging);
  pool.scatter(staging, std::span<const BlockId>(ids.data() + 1, 1));
  const bool same = std::memcmp(pool.block_data(3, true, ids[0]), pool.block_data(3, true, ids[1]),
                                spec.layer_block_bytes()) == 0;
  pool.free(ids);
  std::printf("sagellm_kv %s: pool of %u blocks x %zu bytes, copy %s, %u free\n", SAGELLM_KV_VERSION,
              pool.num_blocks(), pool.block_bytes(), same ? "ok" : "MISMATCH", pool.num_free_blocks());
  return same && pool.num_free_blocks() == pool.num_blocks() ? 0 : 1;
}
