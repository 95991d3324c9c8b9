#include "sagellm_kv/hashing.hpp"

// The low-level SHA256_* calls are deprecated in OpenSSL 3 in favour of EVP, but EVP re-initialises
// its provider state on every message: ~145 ns against ~104 ns for a 108-byte block message here
// (same SHA-NI code underneath). Prompts are hashed block by block, so per-message cost is the cost.
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/evp.h>
#include <openssl/sha.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "sagellm_kv/error.hpp"

#if defined(SAGELLM_KV_HAVE_XXHASH)
// Header-only use of the system libxxhash: every function is inlined here, so neither the core
// library nor its consumers link libxxhash.
#define XXH_INLINE_ALL
#include <xxhash.h>
#endif

namespace sagellm::kv {
namespace {

constexpr std::size_t kTokenBytes = 4;

// OpenSSL 3 resolves "SHA2-256" through its provider table on every implicit fetch; fetching the
// EVP_MD once keeps that lookup (and its lock) off the per-block path.
class Sha256Md {
 public:
  Sha256Md() : md_(EVP_MD_fetch(nullptr, "SHA2-256", nullptr)) {}
  ~Sha256Md() { EVP_MD_free(md_); }
  Sha256Md(const Sha256Md&) = delete;
  Sha256Md& operator=(const Sha256Md&) = delete;
  [[nodiscard]] const EVP_MD* get() const noexcept { return md_; }

 private:
  EVP_MD* md_;
};

const EVP_MD* sha256_md() {
  static const Sha256Md md;  // thread-safe initialisation (C++11 magic statics)
  if (md.get() == nullptr) {
    throw Error(ErrorCode::kBackendUnavailable, "OpenSSL cannot provide SHA2-256 (EVP_MD_fetch failed)");
  }
  return md.get();
}

void store_le32(unsigned char* dst, std::uint32_t v) noexcept {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(dst, &v, sizeof v);
  } else {
    dst[0] = static_cast<unsigned char>(v);
    dst[1] = static_cast<unsigned char>(v >> 8);
    dst[2] = static_cast<unsigned char>(v >> 16);
    dst[3] = static_cast<unsigned char>(v >> 24);
  }
}

void store_tokens(unsigned char* dst, const std::int32_t* tokens, std::size_t n) noexcept {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(dst, tokens, n * kTokenBytes);
  } else {
    for (std::size_t i = 0; i < n; ++i) store_le32(dst + i * kTokenBytes, static_cast<std::uint32_t>(tokens[i]));
  }
}

// Callers have range-checked every value.
void store_tokens(unsigned char* dst, const std::int64_t* tokens, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    store_le32(dst + i * kTokenBytes, static_cast<std::uint32_t>(static_cast<std::int32_t>(tokens[i])));
  }
}

void store_be32(unsigned char* dst, std::uint32_t v) noexcept {
  dst[0] = static_cast<unsigned char>(v >> 24);
  dst[1] = static_cast<unsigned char>(v >> 16);
  dst[2] = static_cast<unsigned char>(v >> 8);
  dst[3] = static_cast<unsigned char>(v);
}

// A digest read back as a SHA-256 chain state (eight big-endian words).
std::array<std::uint32_t, 8> load_state(const BlockHash& h) noexcept {
  std::array<std::uint32_t, 8> st{};
  for (std::size_t w = 0; w < 8; ++w) {
    const std::uint8_t* p = h.bytes.data() + 4 * w;
    st[w] = (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
  }
  return st;
}

// Domain of the root state of plain steps; the block size follows it (hashing.hpp).
constexpr char kPlainChainDomain[] = "sagellm-kv sha256 chain v2";

std::uint32_t field_length(std::string_view field, const char* what) {
  if (field.size() > std::numeric_limits<std::uint32_t>::max()) {
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + " is " + std::to_string(field.size()) +
                                                 " bytes; at most 4294967295 are supported");
  }
  return static_cast<std::uint32_t>(field.size());
}

std::string join_available() {
  std::string names;
  for (const auto& n : available_hash_algorithms()) names += (names.empty() ? "" : ", ") + n;
  return names;
}

void check_algorithm(HashAlgorithm algorithm) {
  if (algorithm != HashAlgorithm::kSha256 && algorithm != HashAlgorithm::kXxh3_128) {
    throw Error(ErrorCode::kInvalidArgument, "hash algorithm value " + std::to_string(static_cast<int>(algorithm)) +
                                                 " is unknown; available: " + join_available());
  }
  if (!hash_algorithm_available(algorithm)) {
    throw Error(ErrorCode::kInvalidArgument,
                "hash algorithm '" + std::string(hash_algorithm_name(algorithm)) +
                    "' is not available in this build (sagellm_kv was built without libxxhash); available: " +
                    join_available());
  }
}

}  // namespace

std::string BlockHash::hex() const {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(2 * bytes.size(), '0');
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    s[2 * i] = kDigits[bytes[i] >> 4];
    s[2 * i + 1] = kDigits[bytes[i] & 0xF];
  }
  return s;
}

std::string_view hash_algorithm_name(HashAlgorithm algorithm) noexcept {
  switch (algorithm) {
    case HashAlgorithm::kSha256: return "sha256";
    case HashAlgorithm::kXxh3_128: return "xxh3_128";
  }
  return "unknown";
}

HashAlgorithm parse_hash_algorithm(std::string_view name) {
  if (name == "sha256") return HashAlgorithm::kSha256;
  if (name == "xxh3_128" || name == "xxh128") return HashAlgorithm::kXxh3_128;
  throw Error(ErrorCode::kInvalidArgument, "unknown hash algorithm '" + std::string(name) +
                                               "'; known: sha256, xxh3_128 (available in this build: " +
                                               join_available() + ")");
}

bool hash_algorithm_available(HashAlgorithm algorithm) noexcept {
  switch (algorithm) {
    case HashAlgorithm::kSha256: return true;
    case HashAlgorithm::kXxh3_128:
#if defined(SAGELLM_KV_HAVE_XXHASH)
      return true;
#else
      return false;
#endif
  }
  return false;
}

std::vector<std::string> available_hash_algorithms() {
  std::vector<std::string> names{"sha256"};
  if (hash_algorithm_available(HashAlgorithm::kXxh3_128)) names.emplace_back("xxh3_128");
  return names;
}

struct BlockHasher::State {
  HashAlgorithm algorithm = HashAlgorithm::kSha256;
  const EVP_MD* md = nullptr;
  EVP_MD_CTX* ctx = nullptr;
  // One block's message, rebuilt in place: the parent digest and the token ids change per block,
  // the key section between them only once (after the salted first block).
  std::vector<unsigned char> message;

  // The chain being hashed (begin_chain / chain_step): plain steps on `sha`, or full messages in
  // `message` (tokens at chain_tokens_at; the first one salted while chain_salted). chain_open:
  // a chain the caller started with start_chain and may continue with next_block.
  bool chain_open = false;
  bool chain_plain = false;
  bool chain_salted = false;
  std::uint32_t chain_block_size = 0;
  std::size_t chain_tokens_at = 0;
  std::string_view chain_extra;

  State() = default;
  State(const State&) = delete;
  State& operator=(const State&) = delete;
  ~State() { EVP_MD_CTX_free(ctx); }

  // Writes parent, key section and token count; returns the offset of the token ids. The room
  // for the token ids is made by chain_step, once a block is there to fill it: a chain started
  // under a huge block size for a short prompt must not allocate a block's worth of message.
  std::size_t layout(const BlockHash& parent, std::string_view salt, std::string_view extra,
                     std::uint32_t block_size) {
    const std::size_t tokens_at = kBlockHashBytes + 4 + salt.size() + 4 + extra.size() + 4;
    message.resize(tokens_at);
    unsigned char* p = message.data();
    std::memcpy(p, parent.bytes.data(), kBlockHashBytes);
    p += kBlockHashBytes;
    store_le32(p, static_cast<std::uint32_t>(salt.size()));
    p += 4;
    if (!salt.empty()) std::memcpy(p, salt.data(), salt.size());
    p += salt.size();
    store_le32(p, static_cast<std::uint32_t>(extra.size()));
    p += 4;
    if (!extra.empty()) std::memcpy(p, extra.data(), extra.size());
    p += extra.size();
    store_le32(p, block_size);
    return tokens_at;
  }

  void digest(BlockHash& out) {
    if (algorithm == HashAlgorithm::kSha256) {
#if !defined(OPENSSL_NO_DEPRECATED_3_0)
      SHA256_CTX c;
      if (SHA256_Init(&c) != 1 || SHA256_Update(&c, message.data(), message.size()) != 1 ||
          SHA256_Final(out.bytes.data(), &c) != 1) {
        throw Error(ErrorCode::kInternal, "OpenSSL SHA-256 digest failed");
      }
      return;
#endif
      unsigned int len = 0;
      // Re-initialising with the same EVP_MD keeps the provider context: no allocation per block.
      if (EVP_DigestInit_ex2(ctx, md, nullptr) != 1 || EVP_DigestUpdate(ctx, message.data(), message.size()) != 1 ||
          EVP_DigestFinal_ex(ctx, out.bytes.data(), &len) != 1 || len != kBlockHashBytes) {
        throw Error(ErrorCode::kInternal, "OpenSSL SHA-256 digest failed");
      }
      return;
    }
#if defined(SAGELLM_KV_HAVE_XXHASH)
    const XXH128_hash_t h = XXH3_128bits(message.data(), message.size());
    XXH128_canonical_t canonical;
    XXH128_canonicalFromHash(&canonical, h);
    static_assert(sizeof(canonical.digest) == 16);
    std::memcpy(out.bytes.data(), canonical.digest, sizeof(canonical.digest));
    std::fill(out.bytes.begin() + sizeof(canonical.digest), out.bytes.end(), std::uint8_t{0});
#else
    (void)out;
#endif
  }

#if !defined(OPENSSL_NO_DEPRECATED_3_0)
  // Chain state of a plain step from the root, per block size (see hashing.hpp): computed once.
  std::uint32_t iv_block_size = 0;
  std::array<std::uint32_t, 8> iv{};

  const std::array<std::uint32_t, 8>& root_state(std::uint32_t block_size) {
    if (iv_block_size != block_size) {
      std::array<unsigned char, sizeof(kPlainChainDomain) - 1 + 4> m{};
      std::memcpy(m.data(), kPlainChainDomain, sizeof(kPlainChainDomain) - 1);
      store_le32(m.data() + sizeof(kPlainChainDomain) - 1, block_size);
      BlockHash h;
      SHA256_CTX c;
      if (SHA256_Init(&c) != 1 || SHA256_Update(&c, m.data(), m.size()) != 1 || SHA256_Final(h.bytes.data(), &c) != 1) {
        throw Error(ErrorCode::kInternal, "OpenSSL SHA-256 digest failed");
      }
      iv = load_state(h);
      iv_block_size = block_size;
    }
    return iv;
  }

  // Plain steps: a block's digest is the chain state after compressing its token ids (as int32,
  // zero-padded to whole 64-byte pieces) onto the state of its parent. No padding, no length, no
  // finalisation: one compression per block of 16 tokens. `sha` carries the chain state.
  SHA256_CTX sha{};

  void start_plain(std::uint32_t block_size, const BlockHash& parent) {
    if (SHA256_Init(&sha) != 1) throw Error(ErrorCode::kInternal, "OpenSSL SHA-256 init failed");
    const std::array<std::uint32_t, 8> start = parent == kRootBlockHash ? root_state(block_size) : load_state(parent);
    for (std::size_t w = 0; w < 8; ++w) sha.h[w] = start[w];
  }

  template <class Token>
  void plain_block(const Token* t, std::uint32_t block_size, BlockHash& out) noexcept {
    constexpr std::size_t kPieceTokens = 64 / kTokenBytes;
    for (std::size_t at = 0; at < block_size; at += kPieceTokens) {
      if (std::is_same_v<Token, std::int32_t> && std::endian::native == std::endian::little &&
          block_size - at >= kPieceTokens) {
        SHA256_Transform(&sha, reinterpret_cast<const unsigned char*>(t + at));
      } else {
        alignas(64) std::array<unsigned char, 64> piece{};
        store_tokens(piece.data(), t + at, std::min<std::size_t>(kPieceTokens, block_size - at));
        SHA256_Transform(&sha, piece.data());
      }
    }
    // The digest is the state as eight big-endian words: read the state once, swap, store once.
    std::array<std::uint32_t, 8> words{};
    for (std::size_t w = 0; w < 8; ++w) words[w] = static_cast<std::uint32_t>(sha.h[w]);
    if constexpr (std::endian::native == std::endian::little) {
      for (std::uint32_t& w : words) w = (w >> 24) | ((w >> 8) & 0xFF00u) | ((w << 8) & 0xFF0000u) | (w << 24);  // bswap
      std::memcpy(out.bytes.data(), words.data(), kBlockHashBytes);
    } else {
      for (std::size_t w = 0; w < 8; ++w) store_be32(out.bytes.data() + 4 * w, words[w]);
    }
  }
#endif

  // A chain from `parent` under `key` (arguments already checked): plain steps on `sha` when
  // SHA-256 and no key is in play; otherwise full messages laid out in `message`, the first one
  // salted when the salt applies, after which a SHA-256 chain without an extra key turns plain.
  void begin_chain(std::uint32_t block_size, const BlockHash& parent, const BlockHashKey& key) {
    const bool salted = !key.salt.empty() && parent == kRootBlockHash;
    chain_block_size = block_size;
    chain_extra = key.extra;
    chain_plain = false;
    chain_salted = false;
#if !defined(OPENSSL_NO_DEPRECATED_3_0)
    if (algorithm == HashAlgorithm::kSha256 && key.extra.empty() && !salted) {
      start_plain(block_size, parent);
      chain_plain = true;
      return;
    }
#endif
    chain_tokens_at = layout(parent, salted ? key.salt : std::string_view{}, key.extra, block_size);
    chain_salted = salted;
  }

  // The digest of the chain's next block of chain_block_size tokens (range-checked by the caller).
  template <class Token>
  void chain_step(const Token* tokens, BlockHash& out) {
    const std::uint32_t bs = chain_block_size;
#if !defined(OPENSSL_NO_DEPRECATED_3_0)
    if (chain_plain) {
      plain_block(tokens, bs, out);
      return;
    }
#endif
    message.resize(chain_tokens_at + std::size_t{bs} * kTokenBytes);  // no-op after the first block
    store_tokens(message.data() + chain_tokens_at, tokens, bs);
    digest(out);
#if !defined(OPENSSL_NO_DEPRECATED_3_0)
    if (algorithm == HashAlgorithm::kSha256 && chain_extra.empty()) {  // after a salted first block
      start_plain(bs, out);
      chain_plain = true;
      return;
    }
#endif
    if (chain_salted) {
      chain_tokens_at = layout(out, {}, chain_extra, bs);
      chain_salted = false;
    } else {
      std::memcpy(message.data(), out.bytes.data(), kBlockHashBytes);
    }
  }

  template <class Token>
  std::size_t run(std::span<const Token> tokens, std::uint32_t block_size, const BlockHash& parent,
                  const BlockHashKey& key, std::span<BlockHash> out) {
    chain_open = false;  // the chain state is reused below
    if (block_size == 0) throw Error(ErrorCode::kInvalidArgument, "block_size must be > 0, got 0");
    const std::size_t n = num_full_blocks(tokens.size(), block_size);
    if (out.size() < n) {
      throw Error(ErrorCode::kInvalidArgument, "output holds " + std::to_string(out.size()) + " digests but " +
                                                   std::to_string(tokens.size()) + " tokens make " +
                                                   std::to_string(n) + " full blocks");
    }
    field_length(key.salt, "salt");
    field_length(key.extra, "extra key");
    if constexpr (sizeof(Token) > sizeof(std::int32_t)) {
      const std::size_t used = n * block_size;
      for (std::size_t i = 0; i < used; ++i) {
        if (tokens[i] < std::numeric_limits<std::int32_t>::min() || tokens[i] > std::numeric_limits<std::int32_t>::max()) {
          throw Error(ErrorCode::kInvalidArgument, "token id " + std::to_string(tokens[i]) + " at position " +
                                                       std::to_string(i) + " is outside the int32 range");
        }
      }
    }
    if (n == 0) return 0;
    begin_chain(block_size, parent, key);
    std::size_t b = 0;
#if !defined(OPENSSL_NO_DEPRECATED_3_0)
    // Once the chain is plain (from the start, or after a salted first block) every step is one
    // plain_block: run them in this loop, without chain_step's call and checks per block.
    for (; b < n && !chain_plain; ++b) chain_step(tokens.data() + b * block_size, out[b]);
    for (; b < n; ++b) plain_block(tokens.data() + b * block_size, block_size, out[b]);
#endif
    for (; b < n; ++b) chain_step(tokens.data() + b * block_size, out[b]);
    chain_open = false;  // a chain is only the caller's through start_chain
    return n;
  }
};

BlockHasher::BlockHasher(HashAlgorithm algorithm) : state_(std::make_unique<State>()) {
  check_algorithm(algorithm);
  state_->algorithm = algorithm;
  if (algorithm == HashAlgorithm::kSha256) {
    state_->md = sha256_md();
    state_->ctx = EVP_MD_CTX_new();
    if (state_->ctx == nullptr) throw Error(ErrorCode::kMemoryExhausted, "EVP_MD_CTX_new failed");
  }
}

void BlockHasher::start_chain(std::uint32_t block_size, const BlockHash& parent, const BlockHashKey& key) {
  State& s = *state_;
  s.chain_open = false;
  if (block_size == 0) throw Error(ErrorCode::kInvalidArgument, "block_size must be > 0, got 0");
  field_length(key.salt, "salt");
  field_length(key.extra, "extra key");
  s.begin_chain(block_size, parent, key);
  s.chain_open = true;
}

void BlockHasher::next_block(const std::int32_t* tokens, BlockHash& out) {
  State& s = *state_;
  if (!s.chain_open) throw Error(ErrorCode::kInvalidArgument, "next_block: no chain started (call start_chain)");
  s.chain_step(tokens, out);
}

BlockHasher::~BlockHasher() = default;
BlockHasher::BlockHasher(BlockHasher&&) noexcept = default;
BlockHasher& BlockHasher::operator=(BlockHasher&&) noexcept = default;

HashAlgorithm BlockHasher::algorithm() const noexcept { return state_->algorithm; }

std::size_t BlockHasher::hash_blocks(std::span<const std::int32_t> tokens, std::uint32_t block_size,
                                     const BlockHash& parent, const BlockHashKey& key, std::span<BlockHash> out) {
  return state_->run(tokens, block_size, parent, key, out);
}

std::size_t BlockHasher::hash_blocks(std::span<const std::int64_t> tokens, std::uint32_t block_size,
                                     const BlockHash& parent, const BlockHashKey& key, std::span<BlockHash> out) {
  return state_->run(tokens, block_size, parent, key, out);
}

std::vector<BlockHash> BlockHasher::hash_blocks(std::span<const std::int32_t> tokens, std::uint32_t block_size,
                                                const BlockHash& parent, const BlockHashKey& key) {
  std::vector<BlockHash> out(num_full_blocks(tokens.size(), block_size));
  const std::size_t n = state_->run(tokens, block_size, parent, key, out);
  out.resize(n);
  return out;
}

BlockHasher& thread_block_hasher(HashAlgorithm algorithm) {
  check_algorithm(algorithm);
  thread_local std::array<std::unique_ptr<BlockHasher>, 2> hashers;
  auto& h = hashers[static_cast<std::size_t>(algorithm)];
  if (!h) h = std::make_unique<BlockHasher>(algorithm);
  return *h;
}

std::size_t hash_blocks(HashAlgorithm algorithm, std::span<const std::int32_t> tokens, std::uint32_t block_size,
                        const BlockHash& parent, const BlockHashKey& key, std::span<BlockHash> out) {
  return thread_block_hasher(algorithm).hash_blocks(tokens, block_size, parent, key, out);
}

std::size_t hash_blocks(HashAlgorithm algorithm, std::span<const std::int64_t> tokens, std::uint32_t block_size,
                        const BlockHash& parent, const BlockHashKey& key, std::span<BlockHash> out) {
  return thread_block_hasher(algorithm).hash_blocks(tokens, block_size, parent, key, out);
}

namespace {

void sha256_once(const std::uint8_t* data, std::size_t size, BlockHash& out) {
#if !defined(OPENSSL_NO_DEPRECATED_3_0)
  SHA256_CTX c;  // see State::digest: the low-level calls skip EVP's per-message provider work
  if (SHA256_Init(&c) == 1 && SHA256_Update(&c, data, size) == 1 && SHA256_Final(out.bytes.data(), &c) == 1) return;
#else
  unsigned int len = 0;
  if (EVP_Digest(data, size, out.bytes.data(), &len, sha256_md(), nullptr) == 1 && len == kBlockHashBytes) return;
#endif
  throw Error(ErrorCode::kInternal, "OpenSSL SHA-256 digest failed");
}

// SHA-256's compression function applied once, from the standard initial state, to one 64-byte
// block, without padding or length: a fixed-input-length hash as collision resistant as SHA-256
// itself (Merkle-Damgard rests on it), at half the cost of hashing 64 bytes with SHA-256. Builds
// without OpenSSL's low-level API use full SHA-256 instead (other values, same properties).
void sha256_compress(const std::uint8_t* block, BlockHash& out) {
#if !defined(OPENSSL_NO_DEPRECATED_3_0)
  SHA256_CTX c;
  if (SHA256_Init(&c) != 1) throw Error(ErrorCode::kInternal, "OpenSSL SHA-256 init failed");
  SHA256_Transform(&c, block);
  for (std::size_t w = 0; w < 8; ++w) store_be32(out.bytes.data() + 4 * w, static_cast<std::uint32_t>(c.h[w]));
#else
  sha256_once(block, 2 * kBlockHashBytes, out);
#endif
}

}  // namespace

std::size_t sha256_chunks(std::span<const std::uint8_t> data, std::size_t chunk_bytes, std::span<BlockHash> out) {
  if (chunk_bytes == 0) throw Error(ErrorCode::kInvalidArgument, "chunk_bytes must be > 0, got 0");
  if (data.size() % chunk_bytes != 0) {
    throw Error(ErrorCode::kInvalidArgument, std::to_string(data.size()) + " bytes are not a whole number of " +
                                                 std::to_string(chunk_bytes) + "-byte chunks");
  }
  const std::size_t n = data.size() / chunk_bytes;
  if (out.size() < n) {
    throw Error(ErrorCode::kInvalidArgument, "output holds " + std::to_string(out.size()) + " digests, " +
                                                 std::to_string(n) + " chunks need them");
  }
  for (std::size_t i = 0; i < n; ++i) sha256_once(data.data() + i * chunk_bytes, chunk_bytes, out[i]);
  return n;
}

void sha256_chain(std::span<const BlockHash> keys, std::span<BlockHash> out) {
  if (out.size() < keys.size()) {
    throw Error(ErrorCode::kInvalidArgument, "output holds " + std::to_string(out.size()) + " digests, " +
                                                 std::to_string(keys.size()) + " keys need them");
  }
  if (keys.empty()) return;
  std::array<std::uint8_t, 2 * kBlockHashBytes> message{};
  std::memcpy(message.data(), keys[0].bytes.data(), kBlockHashBytes);
  out[0] = keys[0];
  for (std::size_t i = 1; i < keys.size(); ++i) {
    // message = out[i-1] || keys[i]; keys[i] is read before out[i] is written, so out may alias keys.
    std::memcpy(message.data() + kBlockHashBytes, keys[i].bytes.data(), kBlockHashBytes);
    sha256_compress(message.data(), out[i]);
    std::memcpy(message.data(), out[i].bytes.data(), kBlockHashBytes);
  }
}

}  // namespace sagellm::kv
