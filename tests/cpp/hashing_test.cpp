#include "sagellm_kv/hashing.hpp"

#include <gtest/gtest.h>
// The reference of plain steps below uses OpenSSL's bare compression (deprecated in OpenSSL 3).
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "sagellm_kv/error.hpp"
#include "test_support.hpp"

namespace sagellm::kv {
namespace {

// The message of one block, built independently of the library from the layout in hashing.hpp.
std::vector<unsigned char> block_message(const BlockHash& parent, const std::string& salt, const std::string& extra,
                                         const std::vector<std::int32_t>& tokens) {
  std::vector<unsigned char> m(parent.bytes.begin(), parent.bytes.end());
  const auto put32 = [&m](std::uint32_t v) {
    for (int i = 0; i < 4; ++i) m.push_back(static_cast<unsigned char>(v >> (8 * i)));
  };
  put32(static_cast<std::uint32_t>(salt.size()));
  m.insert(m.end(), salt.begin(), salt.end());
  put32(static_cast<std::uint32_t>(extra.size()));
  m.insert(m.end(), extra.begin(), extra.end());
  put32(static_cast<std::uint32_t>(tokens.size()));
  for (std::int32_t t : tokens) put32(static_cast<std::uint32_t>(t));
  return m;
}

BlockHash sha256_of(const std::vector<unsigned char>& m) {
  BlockHash h;
  SHA256(m.data(), m.size(), h.bytes.data());  // OpenSSL's one-shot: a path independent of EVP reuse
  return h;
}

// A plain step (hashing.hpp): the token ids as int32, zero-padded to 64-byte pieces, compressed
// onto the chain state `parent` (the domain's root state when parent is the root), built here
// from OpenSSL's bare compression rather than the library's loop.
BlockHash plain_step(const BlockHash& parent, const std::vector<std::int32_t>& tokens) {
  BlockHash start = parent;
  if (parent == kRootBlockHash) {
    std::string m = "sagellm-kv sha256 chain v2";
    for (int i = 0; i < 4; ++i) m.push_back(static_cast<char>(tokens.size() >> (8 * i)));
    start = sha256_of(std::vector<unsigned char>(m.begin(), m.end()));
  }
  SHA256_CTX c;
  SHA256_Init(&c);
  for (std::size_t w = 0; w < 8; ++w) {
    const std::uint8_t* p = start.bytes.data() + 4 * w;
    c.h[w] = (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
  }
  std::vector<unsigned char> bytes;
  for (std::int32_t t : tokens) {
    for (int i = 0; i < 4; ++i) bytes.push_back(static_cast<unsigned char>(static_cast<std::uint32_t>(t) >> (8 * i)));
  }
  bytes.resize((bytes.size() + 63) / 64 * 64, 0);
  for (std::size_t at = 0; at < bytes.size(); at += 64) SHA256_Transform(&c, bytes.data() + at);
  BlockHash out;
  for (std::size_t w = 0; w < 8; ++w) {
    for (std::size_t i = 0; i < 4; ++i) out.bytes[4 * w + i] = static_cast<std::uint8_t>(c.h[w] >> (24 - 8 * i));
  }
  return out;
}

BlockHash from_hex(const std::string& hex) {
  BlockHash h;
  for (std::size_t i = 0; i < hex.size() / 2; ++i) {
    h.bytes[i] = static_cast<std::uint8_t>(std::stoul(hex.substr(2 * i, 2), nullptr, 16));
  }
  return h;
}

std::vector<std::int32_t> iota_tokens(std::size_t n, std::int32_t start = 0) {
  std::vector<std::int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

using testing::code_of;

TEST(Hashing, RootIsThirtyTwoZeroBytes) {
  for (std::uint8_t b : kRootBlockHash.bytes) EXPECT_EQ(b, 0);
  EXPECT_EQ(kRootBlockHash.hex(), std::string(64, '0'));
}

TEST(Hashing, DigestsAreEqualOnlyWhenEveryByteIs) {
  BlockHash a;
  for (std::size_t i = 0; i < kBlockHashBytes; ++i) a.bytes[i] = static_cast<std::uint8_t>(i * 7 + 1);
  const BlockHash same = a;
  EXPECT_TRUE(a == same);
  for (std::size_t i = 0; i < kBlockHashBytes; ++i) {  // each byte, in either 16-byte half, counts
    for (std::uint8_t bit : {std::uint8_t{1}, std::uint8_t{0x80}}) {
      BlockHash b = a;
      b.bytes[i] = static_cast<std::uint8_t>(b.bytes[i] ^ bit);
      EXPECT_FALSE(a == b) << "byte " << i;
      EXPECT_FALSE(b == a) << "byte " << i;
    }
  }
  EXPECT_TRUE(kRootBlockHash == BlockHash{});
}

TEST(Hashing, FirstBlockMatchesKnownVector) {
  BlockHasher hasher;
  const auto tokens = iota_tokens(16);
  const auto digests = hasher.hash_blocks(tokens, 16);
  ASSERT_EQ(digests.size(), 1u);
  // Computed with a plain-Python SHA-256 compression from the description in hashing.hpp.
  EXPECT_EQ(digests[0].hex(), "d5999100ff7d493336a55b6dae703187cb74a79cd38f3bb5a1a9281d0866fe7f");
  EXPECT_EQ(digests[0], plain_step(kRootBlockHash, tokens));
}

TEST(Hashing, BlocksChainFromTheirParent) {
  BlockHasher hasher;
  const auto tokens = iota_tokens(40);  // two full blocks and a partial one, which is not hashed
  const auto digests = hasher.hash_blocks(tokens, 16);
  ASSERT_EQ(digests.size(), 2u);
  EXPECT_EQ(digests[1].hex(), "f50ff1dfb2e8c65bbc777f69af307bbfb6761fb66245ed2c67ed0b47ee72e8f0");
  EXPECT_EQ(digests[1], plain_step(digests[0], iota_tokens(16, 16)));

  // Hashing the continuation from the first digest gives the same second digest.
  const std::vector<std::int32_t> tail(tokens.begin() + 16, tokens.end());
  const auto cont = hasher.hash_blocks(tail, 16, digests[0]);
  ASSERT_EQ(cont.size(), 1u);
  EXPECT_EQ(cont[0], digests[1]);

  // The same block under a different prefix gets a different digest.
  auto other = tokens;
  other[0] = 999;
  const auto changed = hasher.hash_blocks(other, 16);
  EXPECT_NE(changed[0], digests[0]);
  EXPECT_NE(changed[1], digests[1]);
}

TEST(Hashing, NegativeAndExtremeTokenIdsAreLittleEndianInt32) {
  BlockHasher hasher;
  const std::vector<std::int32_t> tokens{-1, 2147483647, -2147483647 - 1, 0};
  const auto d = hasher.hash_blocks(tokens, 4);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].hex(), "689f66f754ac777ac44df3e84c746ae092644d07ab0b65aaa744b06658b3a81e");
  EXPECT_EQ(d[0], plain_step(kRootBlockHash, tokens));
}

TEST(Hashing, PlainStepsPadToWholePiecesAndStartFromTheirBlockSizesRoot) {
  BlockHasher hasher;
  const auto tokens = iota_tokens(60, 1);
  const auto d20 = hasher.hash_blocks(tokens, 20);  // 80 bytes a block: two pieces, the second padded
  ASSERT_EQ(d20.size(), 3u);
  EXPECT_EQ(d20[0], plain_step(kRootBlockHash, iota_tokens(20, 1)));
  EXPECT_EQ(d20[2], plain_step(d20[1], iota_tokens(20, 41)));
  // Zero padding cannot make a block of 8 tokens equal to one of 16 ending in 8 zeros: the chains
  // start from different roots.
  std::vector<std::int32_t> padded = iota_tokens(8, 1);
  padded.resize(16, 0);
  EXPECT_NE(hasher.hash_blocks(iota_tokens(8, 1), 8)[0], hasher.hash_blocks(padded, 16)[0]);
}

TEST(Hashing, SaltedFirstBlockIsAFullMessageAndTheRestArePlainSteps) {
  BlockHasher hasher;
  const auto d = hasher.hash_blocks(iota_tokens(32), 16, kRootBlockHash, {"tenant-a", ""});
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].hex(), "4b0cb99316adf04d5fd690649ad92255d4839365b977521228c5c17095e46542");
  EXPECT_EQ(d[1].hex(), "cc9d08f25c00b291e70990701af3f2ff69487bbca3af3dc0d7c6dad2ad1ca3fb");
  EXPECT_EQ(d[0], sha256_of(block_message(kRootBlockHash, "tenant-a", "", iota_tokens(16))));
  EXPECT_EQ(d[1], plain_step(d[0], iota_tokens(16, 16)));
}

TEST(Hashing, SaltAppliesToTheFirstBlockOnlyAndSeparatesTenants) {
  BlockHasher hasher;
  const auto tokens = iota_tokens(32);
  const auto d = hasher.hash_blocks(tokens, 16, kRootBlockHash, {"tenant-a", "lora-7"});
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].hex(), "c2a0d397cdc5edc6e624ca532c09bfa0b76b2eb53ad74b7138db5691c44525cb");
  EXPECT_EQ(d[1].hex(), "19372dfed58e15688bae9b1be1bf5c10bc031506664e3402177678332aeadf32");
  EXPECT_EQ(d[0], sha256_of(block_message(kRootBlockHash, "tenant-a", "lora-7", iota_tokens(16))));
  EXPECT_EQ(d[1], sha256_of(block_message(d[0], "", "lora-7", iota_tokens(16, 16))));

  const auto b = hasher.hash_blocks(tokens, 16, kRootBlockHash, {"tenant-b", "lora-7"});
  const auto none = hasher.hash_blocks(tokens, 16, kRootBlockHash, {"", "lora-7"});
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_NE(d[i], b[i]) << i;
    EXPECT_NE(d[i], none[i]) << i;
  }
  // A continuation from a non-root parent already carries the salt: passing it again is a no-op.
  std::vector<BlockHash> out(1);
  const std::vector<std::int32_t> tail(tokens.begin() + 16, tokens.end());
  ASSERT_EQ(hasher.hash_blocks(std::span<const std::int32_t>(tail), 16, d[0], {"tenant-a", "lora-7"},
                               std::span<BlockHash>(out)),
            1u);
  EXPECT_EQ(out[0], d[1]);
}

TEST(Hashing, ExtraKeyAppliesToEveryBlock) {
  BlockHasher hasher;
  const auto tokens = iota_tokens(16);
  const BlockHash parent = from_hex("11");
  std::vector<BlockHash> plain(1), lora(1);
  ASSERT_EQ(hasher.hash_blocks(std::span<const std::int32_t>(tokens), 16, parent, {}, std::span<BlockHash>(plain)), 1u);
  ASSERT_EQ(hasher.hash_blocks(std::span<const std::int32_t>(tokens), 16, parent, {"", "adapter"},
                               std::span<BlockHash>(lora)),
            1u);
  EXPECT_NE(plain[0], lora[0]);
  EXPECT_EQ(lora[0], sha256_of(block_message(parent, "", "adapter", tokens)));
}

TEST(Hashing, LengthPrefixesKeepFieldsApart) {
  BlockHasher hasher;
  const auto tokens = iota_tokens(16);
  const auto ab = hasher.hash_blocks(tokens, 16, kRootBlockHash, {"ab", "c"});
  const auto a_bc = hasher.hash_blocks(tokens, 16, kRootBlockHash, {"a", "bc"});
  EXPECT_NE(ab[0], a_bc[0]);
}

TEST(Hashing, Int64InputHashesLikeInt32) {
  BlockHasher hasher;
  const auto t32 = iota_tokens(48, -5);
  std::vector<std::int64_t> t64(t32.begin(), t32.end());
  std::vector<BlockHash> a(3), b(3);
  ASSERT_EQ(hasher.hash_blocks(std::span<const std::int32_t>(t32), 16, kRootBlockHash, {"s", "x"},
                               std::span<BlockHash>(a)),
            3u);
  ASSERT_EQ(hasher.hash_blocks(std::span<const std::int64_t>(t64), 16, kRootBlockHash, {"s", "x"},
                               std::span<BlockHash>(b)),
            3u);
  EXPECT_EQ(a, b);
  // Plain steps too (no salt, no extra key), whole and padded pieces.
  for (std::uint32_t block_size : {16u, 12u}) {
    const std::size_t n = t32.size() / block_size;
    std::vector<BlockHash> p32(n), p64(n);
    ASSERT_EQ(hasher.hash_blocks(std::span<const std::int32_t>(t32), block_size, kRootBlockHash, {},
                                 std::span<BlockHash>(p32)),
              n);
    ASSERT_EQ(hasher.hash_blocks(std::span<const std::int64_t>(t64), block_size, kRootBlockHash, {},
                                 std::span<BlockHash>(p64)),
              n);
    EXPECT_EQ(p32, p64) << block_size;
  }
}

TEST(Hashing, Int64OutOfRangeNamesValueAndPosition) {
  BlockHasher hasher;
  std::vector<std::int64_t> t(32, 1);
  t[20] = std::int64_t{1} << 40;
  std::vector<BlockHash> out(2, from_hex("ee"));
  try {
    (void)hasher.hash_blocks(std::span<const std::int64_t>(t), 16, kRootBlockHash, {}, std::span<BlockHash>(out));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("1099511627776"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("position 20"), std::string::npos) << e.what();
  }
  EXPECT_EQ(out[0], from_hex("ee"));  // nothing written
  // A value in the partial trailing block is never hashed, so it is not checked either.
  std::vector<std::int64_t> tail_bad(20, 1);
  tail_bad[18] = -(std::int64_t{1} << 40);
  EXPECT_EQ(hasher.hash_blocks(std::span<const std::int64_t>(tail_bad), 16, kRootBlockHash, {},
                               std::span<BlockHash>(out)),
            1u);
}

TEST(Hashing, BadArgumentsAreInvalidArgument) {
  BlockHasher hasher;
  const auto tokens = iota_tokens(32);
  std::vector<BlockHash> out(1);
  EXPECT_EQ(code_of([&] {
              (void)hasher.hash_blocks(std::span<const std::int32_t>(tokens), 0, kRootBlockHash, {},
                                       std::span<BlockHash>(out));
            }),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] {
              (void)hasher.hash_blocks(std::span<const std::int32_t>(tokens), 16, kRootBlockHash, {},
                                       std::span<BlockHash>(out));
            }),
            ErrorCode::kInvalidArgument);  // two blocks, room for one
  EXPECT_TRUE(hasher.hash_blocks(iota_tokens(15), 16).empty());
  EXPECT_TRUE(hasher.hash_blocks(std::vector<std::int32_t>{}, 16).empty());
}

TEST(Hashing, AlgorithmNames) {
  EXPECT_EQ(parse_hash_algorithm("sha256"), HashAlgorithm::kSha256);
  EXPECT_EQ(parse_hash_algorithm("xxh3_128"), HashAlgorithm::kXxh3_128);
  EXPECT_EQ(hash_algorithm_name(HashAlgorithm::kXxh3_128), "xxh3_128");
  try {
    (void)parse_hash_algorithm("md5");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    const std::string what = e.what();
    EXPECT_NE(what.find("md5"), std::string::npos);
    EXPECT_NE(what.find("sha256"), std::string::npos);
    EXPECT_NE(what.find("xxh3_128"), std::string::npos);
  }
  const auto names = available_hash_algorithms();
  ASSERT_FALSE(names.empty());
  EXPECT_EQ(names.front(), "sha256");
}

TEST(Hashing, Xxh3OptionOrClearError) {
  if (!hash_algorithm_available(HashAlgorithm::kXxh3_128)) {
    try {
      BlockHasher h(HashAlgorithm::kXxh3_128);
      FAIL() << "xxh3_128 is reported unavailable but constructed";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("available: sha256"), std::string::npos) << e.what();
    }
    GTEST_SKIP() << "built without libxxhash";
  }
  BlockHasher hasher(HashAlgorithm::kXxh3_128);
  EXPECT_EQ(hasher.algorithm(), HashAlgorithm::kXxh3_128);
  const auto tokens = iota_tokens(32);
  const auto d = hasher.hash_blocks(tokens, 16);
  ASSERT_EQ(d.size(), 2u);
  // XXH3_128bits of the first block's message, canonical (big-endian) bytes, computed by a separate
  // program against libxxhash 0.8.1; then 16 zero bytes.
  EXPECT_EQ(d[0].hex(), "b4c184c143500eace8600eee8661bb9e" + std::string(32, '0'));
  for (std::size_t i = 16; i < 32; ++i) EXPECT_EQ(d[1].bytes[i], 0) << i;
  EXPECT_NE(d[0], BlockHasher().hash_blocks(tokens, 16)[0]);
  // Chaining and salting behave as with SHA-256.
  const std::vector<std::int32_t> tail(tokens.begin() + 16, tokens.end());
  EXPECT_EQ(hasher.hash_blocks(tail, 16, d[0])[0], d[1]);
  EXPECT_NE(hasher.hash_blocks(tokens, 16, kRootBlockHash, {"salt", ""})[1], d[1]);
}

TEST(Hashing, IncrementalChainEqualsWholeChain) {
  struct Case {
    HashAlgorithm algorithm;
    std::uint32_t block_size;
    std::string salt;
    std::string extra;
    bool from_root;
  };
  std::vector<Case> cases{{HashAlgorithm::kSha256, 16, "", "", true},  {HashAlgorithm::kSha256, 12, "", "", true},
                          {HashAlgorithm::kSha256, 16, "t", "", true}, {HashAlgorithm::kSha256, 16, "t", "x", true},
                          {HashAlgorithm::kSha256, 16, "", "x", false}, {HashAlgorithm::kSha256, 16, "t", "", false}};
  if (hash_algorithm_available(HashAlgorithm::kXxh3_128)) cases.push_back({HashAlgorithm::kXxh3_128, 16, "t", "x", true});
  const auto tokens = iota_tokens(64, -9);
  const BlockHash other = from_hex("abcdef");
  for (const Case& c : cases) {
    BlockHasher whole(c.algorithm);
    BlockHasher step(c.algorithm);
    const BlockHash parent = c.from_root ? kRootBlockHash : other;
    const BlockHashKey key{c.salt, c.extra};
    const std::size_t n = tokens.size() / c.block_size;
    std::vector<BlockHash> expected(n);
    ASSERT_EQ(whole.hash_blocks(std::span<const std::int32_t>(tokens), c.block_size, parent, key,
                                std::span<BlockHash>(expected)),
              n);
    step.start_chain(c.block_size, parent, key);
    for (std::size_t b = 0; b < n; ++b) {
      BlockHash got;
      step.next_block(tokens.data() + b * c.block_size, got);
      EXPECT_EQ(got, expected[b]) << hash_algorithm_name(c.algorithm) << " bs " << c.block_size << " salt '" << c.salt
                                  << "' extra '" << c.extra << "' block " << b;
    }
  }
}

TEST(Hashing, IncrementalChainEndsWithOtherCalls) {
  BlockHasher h;
  const auto tokens = iota_tokens(16);
  BlockHash out;
  EXPECT_EQ(code_of([&] { h.next_block(tokens.data(), out); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { h.start_chain(0, kRootBlockHash, {}); }), ErrorCode::kInvalidArgument);
  h.start_chain(16, kRootBlockHash, {});
  (void)h.hash_blocks(tokens, 16);  // reuses the chain state: the chain is over
  EXPECT_EQ(code_of([&] { h.next_block(tokens.data(), out); }), ErrorCode::kInvalidArgument);
}

TEST(Hashing, ThreadLocalHashersAgreeAcrossThreads) {
  const auto tokens = iota_tokens(16 * 80 + 7);
  std::vector<BlockHash> expected(80);
  ASSERT_EQ(hash_blocks(HashAlgorithm::kSha256, tokens, 16, kRootBlockHash, {"t", ""}, expected), 80u);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<BlockHash> out(80);
      bool all = true;
      for (int i = 0; i < 50; ++i) {
        all = all && hash_blocks(HashAlgorithm::kSha256, tokens, 16, kRootBlockHash, {"t", ""}, out) == 80u &&
              out == expected;
      }
      ok[static_cast<std::size_t>(t)] = all ? 1 : 0;
    });
  }
  for (auto& th : threads) th.join();
  for (int v : ok) EXPECT_EQ(v, 1);
}

TEST(Hashing, Sha256ChunksArePlainDigestsOfEachChunk) {
  // SHA-256("abc"), the FIPS 180-2 test vector, twice: one per 3-byte chunk.
  const std::vector<std::uint8_t> data{'a', 'b', 'c', 'a', 'b', 'c'};
  std::vector<BlockHash> out(2);
  ASSERT_EQ(sha256_chunks(data, 3, out), 2u);
  const BlockHash abc = from_hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(out[0], abc);
  EXPECT_EQ(out[1], abc);
  EXPECT_EQ(sha256_chunks({}, 3, out), 0u);
  EXPECT_EQ(code_of([&] { (void)sha256_chunks(data, 4, out); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { (void)sha256_chunks(data, 0, out); }), ErrorCode::kInvalidArgument);
  std::vector<BlockHash> short_out(1);
  EXPECT_EQ(code_of([&] { (void)sha256_chunks(data, 3, short_out); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(short_out[0], BlockHash{});  // nothing written on a refusal
}

TEST(Hashing, Sha256ChainCompressesEachKeyOntoThePreviousDigest) {
  // keys[0] || keys[1] is "abc" padded by SHA-256's own rule, so one compression of it from the
  // initial state is SHA-256("abc").
  std::vector<BlockHash> keys(3);
  std::array<unsigned char, 64> padded{};
  padded[0] = 'a';
  padded[1] = 'b';
  padded[2] = 'c';
  padded[3] = 0x80;
  padded[63] = 24;  // the message length in bits
  std::memcpy(keys[0].bytes.data(), padded.data(), 32);
  std::memcpy(keys[1].bytes.data(), padded.data() + 32, 32);
  keys[2].bytes.fill(7);
  std::vector<BlockHash> out(3);
  sha256_chain(keys, out);
  EXPECT_EQ(out[0], keys[0]);
  const std::string abc = "abc";
  EXPECT_EQ(out[1], sha256_of(std::vector<unsigned char>(abc.begin(), abc.end())));
  EXPECT_NE(out[2], out[1]);
  std::vector<BlockHash> other_prefix = keys;
  other_prefix[0].bytes[5] ^= 1;
  std::vector<BlockHash> other_out(3);
  sha256_chain(other_prefix, other_out);
  EXPECT_NE(other_out[2], out[2]);  // same key at the same position, another prefix: another digest
  std::vector<BlockHash> in_place = keys;  // out may alias keys
  sha256_chain(in_place, in_place);
  EXPECT_EQ(in_place, out);
  std::vector<BlockHash> short_out(2);
  EXPECT_EQ(code_of([&] { sha256_chain(keys, short_out); }), ErrorCode::kInvalidArgument);
  sha256_chain({}, short_out);  // no keys, nothing to do
}

}  // namespace
}  // namespace sagellm::kv
