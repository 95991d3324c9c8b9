// Binding of the request manager. Request ids are Python ints; token ids come as lists, tuples,
// array.array, numpy arrays or torch CPU tensors (see append_tokens); block ids go back as int32
// arrays. Arguments are converted into per-thread buffers with the GIL held, then the GIL is
// released around the C++ work.
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/request_manager.hpp"

namespace sagellm::kv::bindings {
namespace {

// Below these sizes a manager call costs less than releasing and re-taking the GIL, so the binding
// keeps it (the core never needs the GIL, so holding it while waiting for the manager's mutex
// cannot deadlock).
constexpr std::size_t kGilReleaseMinTokens = 512;
constexpr std::size_t kGilReleaseMinRequests = 32;

bool worth_releasing(std::size_t requests, std::size_t tokens) {
  return requests >= kGilReleaseMinRequests || tokens >= kGilReleaseMinTokens;
}

struct BoundRequestManager {
  std::shared_ptr<PagedKVPool> pool;  // members destroyed in reverse: the manager goes first
  py::object allocator_owner;
  py::object cache_owner;
  HashAlgorithm algorithm = HashAlgorithm::kSha256;
  std::unique_ptr<RequestManager> manager;
};

// Per-thread argument buffers, reused across calls. A call that re-enters the binding while
// converting (an __index__ that calls back) gets fresh ones.
struct Scratch {
  bool busy = false;
  std::vector<RequestId> ids;
  std::vector<std::int32_t> tokens;
  std::vector<std::size_t> offsets;
  std::vector<AdmitRequest> admits;
  std::vector<std::uint32_t> counts;
  std::vector<BlockId> blocks;
  std::vector<BlockHash> digests;
  std::vector<std::size_t> digest_offsets;
  std::vector<BlockHash> feed;
};

class ScratchLease {
 public:
  ScratchLease() {
    thread_local Scratch shared;
    if (!shared.busy) {
      s_ = &shared;
    } else {
      own_ = std::make_unique<Scratch>();
      s_ = own_.get();
    }
    s_->busy = true;
    s_->ids.clear();
    s_->tokens.clear();
    s_->offsets.assign(1, 0);
    s_->admits.clear();
    s_->counts.clear();
    s_->blocks.clear();
  }
  ~ScratchLease() { s_->busy = false; }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  Scratch* operator->() const noexcept { return s_; }

 private:
  Scratch* s_;
  std::unique_ptr<Scratch> own_;
};

// One id (an int) or a sequence of ids.
void read_ids(const py::handle& obj, std::vector<RequestId>& out, const char* what) {
  PyObject* p = obj.ptr();
  if (PyList_Check(p) || PyTuple_Check(p)) {
    const bool list = PyList_Check(p);
    const Py_ssize_t n = list ? PyList_GET_SIZE(p) : PyTuple_GET_SIZE(p);
    out.reserve(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < (list ? PyList_GET_SIZE(p) : n); ++i) {
      // Held: an odd item's __index__ may run code that drops it from the list.
      const auto item = py::reinterpret_borrow<py::object>(list ? PyList_GET_ITEM(p, i) : PyTuple_GET_ITEM(p, i));
      out.push_back(request_id_value(item.ptr(), what));
    }
    return;
  }
  const bool is_ndarray = py::isinstance<py::array>(obj);
  // One id: an int, or anything else with __index__ that is not a container (numpy integer
  // scalars export a buffer too, but they are single ints; a torch tensor has __index__ as well,
  // and is read as an array below so that a bool or float tensor is refused, not taken as 1).
  if (PyLong_Check(p) || (PyIndex_Check(p) && !is_ndarray && PyObject_HasAttrString(p, "__len__") == 0)) {
    out.push_back(request_id_value(p, what));
    return;
  }
  // numpy integer arrays, other buffers of ids (array.array, memoryview) and torch CPU tensors,
  // read by value.
  if (PyUnicode_Check(p) || PyBytes_Check(p) || PyByteArray_Check(p) ||
      (!is_ndarray && PyObject_CheckBuffer(p) == 0 && !PyIndex_Check(p))) {
    throw py::type_error(std::string(what) + " must be an int or a sequence of ints, got " + Py_TYPE(p)->tp_name);
  }
  py::array any = as_array(obj, what, "an int or a sequence of ints");
  const char kind = any.dtype().kind();
  if ((kind == 'i' || kind == 'u') && any.ndim() == 0) {  // a 0-d array or tensor: one id
    out.push_back(request_id_value(any.attr("item")().ptr(), what));
    return;
  }
  if ((kind != 'i' && kind != 'u') || any.ndim() != 1) {
    throw py::type_error(std::string(what) + " must be an int or a 1-D sequence of ints, got an array of dtype " +
                         std::string(py::str(any.dtype())) + " and " + std::to_string(any.ndim()) + " dimensions");
  }
  if (kind == 'u') {  // uint64 ids above 2**63 are valid request ids: read unsigned, never wrapped
    auto arr = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>::ensure(any);
    if (!arr) throw py::type_error(std::string(what) + " could not be read as integers");
    out.insert(out.end(), arr.data(), arr.data() + arr.size());
    return;
  }
  auto arr = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(any);
  if (!arr) throw py::type_error(std::string(what) + " could not be read as integers");
  for (py::ssize_t i = 0; i < arr.size(); ++i) {
    if (arr.data()[i] < 0) {
      throw py::value_error(std::string(what) + " must be in [0, 2**64), got " + std::to_string(arr.data()[i]) +
                            " at position " + std::to_string(i));
    }
    out.push_back(static_cast<RequestId>(arr.data()[i]));
  }
}

// A list/tuple of token sequences into s.tokens + s.offsets.
// `hasher` (admit with a cache): each sequence's full blocks are also digested while it is read,
// from the root under `key`, into s.digests at s.digest_offsets (an empty range: hash in the core).
void read_token_lists(const py::handle& obj, Scratch& s, std::size_t expected, const char* what,
                      BlockHasher* hasher = nullptr, std::uint32_t block_size = 0, const BlockHashKey& key = {}) {
  PyObject* p = obj.ptr();
  if (!PyList_Check(p) && !PyTuple_Check(p)) {
    throw py::type_error(std::string(what) + " must be a list of token sequences, got " + Py_TYPE(p)->tp_name);
  }
  const auto seq = py::reinterpret_borrow<py::sequence>(obj);
  if (seq.size() != expected) {
    throw py::value_error(std::string(what) + " holds " + std::to_string(seq.size()) + " sequences for " +
                          std::to_string(expected) + " request ids");
  }
  s.digests.clear();
  s.digest_offsets.assign(1, 0);
  for (std::size_t i = 0; i < expected; ++i) {
    if (hasher != nullptr) {
      hasher->start_chain(block_size, kRootBlockHash, key);
      BlockFeed feed{hasher, block_size, &s.feed};
      append_tokens(seq[i], s.tokens, what, feed);
      s.digests.insert(s.digests.end(), s.feed.begin(), s.feed.end());
      s.digest_offsets.push_back(s.digests.size());
    } else {
      append_tokens(seq[i], s.tokens, what);
    }
    s.offsets.push_back(s.tokens.size());
  }
}

py::array_t<std::int32_t> int32_array(const std::int32_t* data, std::size_t n) {
  py::array_t<std::int32_t> out(static_cast<py::ssize_t>(n));
  if (n != 0) std::memcpy(out.mutable_data(), data, n * sizeof(std::int32_t));
  return out;
}

[[noreturn]] void refused(const char* call, const BatchStatus& st, const std::vector<RequestId>& ids,
                          const BlockAllocator& alloc) {
  const auto i = static_cast<std::size_t>(st.index);
  throw Error(st.code, std::string(call) + ": request " + std::to_string(ids.at(i)) + " (position " +
                           std::to_string(i) + ") does not fit: " + std::to_string(alloc.num_available()) +
                           " blocks free after evicting unused cached blocks; nothing was changed");
}

std::unique_ptr<BoundRequestManager> make_manager(const py::object& allocator, const py::object& cache,
                                                  std::optional<std::int64_t> block_size,
                                                  const std::string& hash_algorithm, bool match_last_token) {
  auto self = std::make_unique<BoundRequestManager>();
  BlockAllocator* alloc = nullptr;
  if (py::isinstance<PagedKVPool>(allocator)) {
    self->pool = allocator.cast<std::shared_ptr<PagedKVPool>>();
    alloc = &self->pool->allocator();
  } else if (py::isinstance<BlockAllocator>(allocator)) {
    self->allocator_owner = allocator;
    alloc = allocator.cast<BlockAllocator*>();
  } else {
    throw py::type_error("allocator must be a PagedKVPool or a BlockAllocator, got " +
                         std::string(Py_TYPE(allocator.ptr())->tp_name));
  }
  RequestManagerOptions o;
  o.match_last_token = match_last_token;
  o.hash_algorithm = parse_hash_algorithm(hash_algorithm);
  PrefixCache* c = nullptr;
  if (!cache.is_none()) {
    if (!py::isinstance<BoundPrefixCache>(cache)) {
      throw py::type_error("cache must be a _core.PrefixCache or None, got " + std::string(Py_TYPE(cache.ptr())->tp_name));
    }
    auto& bound = cache.cast<BoundPrefixCache&>();
    self->cache_owner = cache;
    c = bound.cache.get();
    o.hash_algorithm = bound.algorithm;  // digests must be the cache's
  }
  if (block_size) {
    o.block_size = checked_count(*block_size, "block_size");
  } else if (c != nullptr) {
    o.block_size = c->block_size();
  } else if (self->pool) {
    o.block_size = self->pool->spec().block_size;
  }
  self->algorithm = o.hash_algorithm;
  self->manager = std::make_unique<RequestManager>(*alloc, c, o);
  return self;
}

py::tuple admit_one(BoundRequestManager& self, const py::handle& request_id, const py::handle& tokens,
                    const py::handle& salt_arg, const py::handle& extra_arg) {
  const std::optional<std::string> salt = optional_key(salt_arg, "salt");
  const std::optional<std::string> extra = optional_key(extra_arg, "extra");
  ScratchLease s;
  s->ids.push_back(request_id_value(request_id.ptr(), "request_id"));
  const BlockHashKey key{salt ? std::string_view(*salt) : std::string_view{},
                         extra ? std::string_view(*extra) : std::string_view{}};
  // With a cache, each block is hashed while the next items load, on this thread's hasher: an
  // admit re-entered from an item's __index__ may use it meanwhile, which is harmless because such
  // an item ends the feeding of the outer sequence (see BlockFeed).
  if (self.manager->cache() != nullptr) {
    BlockHasher& hasher = thread_block_hasher(self.algorithm);
    hasher.start_chain(self.manager->block_size(), kRootBlockHash, key);
    BlockFeed feed{&hasher, self.manager->block_size(), &s->digests};
    append_tokens(tokens, s->tokens, "tokens", feed);
  } else {
    s->digests.clear();
    append_tokens(tokens, s->tokens, "tokens");
  }
  AdmitRequest r{s->ids[0], s->tokens, key};
  r.digests = s->digests;
  std::uint32_t cached = 0;
  BatchStatus st;
  {
    const MaybeReleaseGil release(worth_releasing(1, s->tokens.size()));
    st = self.manager->admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1), &s->blocks);
  }
  if (!st.ok()) refused("admit", st, s->ids, self.manager->allocator());
  return py::make_tuple(cached, int32_array(s->blocks.data(), s->blocks.size()));
}

py::tuple admit_batch(BoundRequestManager& self, const py::handle& request_ids, const py::handle& tokens,
                      const py::handle& salt_arg, const py::handle& extra_arg) {
  const std::optional<std::string> salt = optional_key(salt_arg, "salt");
  const std::optional<std::string> extra = optional_key(extra_arg, "extra");
  ScratchLease s;
  read_ids(request_ids, s->ids, "request_ids");
  const std::size_t n = s->ids.size();
  const BlockHashKey key{salt ? std::string_view(*salt) : std::string_view{},
                         extra ? std::string_view(*extra) : std::string_view{}};
  const bool feed = self.manager->cache() != nullptr;  // hash each block while the next items load
  read_token_lists(tokens, *s.operator->(), n, "tokens", feed ? &thread_block_hasher(self.algorithm) : nullptr,
                   self.manager->block_size(), key);
  for (std::size_t i = 0; i < n; ++i) {
    const auto span = std::span<const std::int32_t>(s->tokens).subspan(s->offsets[i], s->offsets[i + 1] - s->offsets[i]);
    AdmitRequest& r = s->admits.emplace_back(AdmitRequest{s->ids[i], span, key});
    if (feed) {
      r.digests = std::span<const BlockHash>(s->digests)
                      .subspan(s->digest_offsets[i], s->digest_offsets[i + 1] - s->digest_offsets[i]);
    }
  }
  py::array_t<std::int32_t> cached(static_cast<py::ssize_t>(n));
  auto cached_span = std::span<std::uint32_t>(reinterpret_cast<std::uint32_t*>(cached.mutable_data()), n);
  BatchStatus st;
  {
    const MaybeReleaseGil release(worth_releasing(n, s->tokens.size()));
    st = self.manager->admit(s->admits, cached_span, &s->blocks);
  }
  if (!st.ok()) refused("admit_batch", st, s->ids, self.manager->allocator());
  const std::uint32_t bs = self.manager->block_size();
  py::array_t<std::int64_t> offsets(static_cast<py::ssize_t>(n + 1));
  auto* off = offsets.mutable_data();
  off[0] = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t len = s->offsets[i + 1] - s->offsets[i];
    off[i + 1] = off[i] + static_cast<std::int64_t>((len + bs - 1) / bs);
  }
  return py::make_tuple(cached, int32_array(s->blocks.data(), s->blocks.size()), offsets);
}

// Appends s.tokens (already split by s.offsets) to s.ids; the new block ids land in s.blocks.
void do_append(BoundRequestManager& self, Scratch& s, const char* call) {
  s.counts.resize(s.ids.size());
  BatchStatus st;
  {
    const MaybeReleaseGil release(worth_releasing(s.ids.size(), s.tokens.size()));
    st = self.manager->append(s.ids, s.tokens, s.offsets, s.counts, &s.blocks);
  }
  if (!st.ok()) refused(call, st, s.ids, self.manager->allocator());
}

py::array_t<std::int32_t> append_decode(BoundRequestManager& self, const py::handle& request_ids,
                                        const py::handle& tokens, const py::object& out) {
  ScratchLease s;
  read_ids(request_ids, s->ids, "request_ids");
  append_tokens(tokens, s->tokens, "tokens");
  const std::size_t n = s->ids.size();
  if (s->tokens.size() != n) {
    throw py::value_error("append_decode: " + std::to_string(s->tokens.size()) + " tokens for " + std::to_string(n) +
                          " request ids (one each)");
  }
  py::array_t<std::int32_t> result;
  if (out.is_none()) {
    result = py::array_t<std::int32_t>(static_cast<py::ssize_t>(n));
  } else {
    if (!py::array_t<std::int32_t, py::array::c_style>::check_(out)) {
      throw py::type_error("out must be a C-contiguous int32 array");
    }
    result = py::reinterpret_borrow<py::array_t<std::int32_t>>(out);
    if (result.ndim() != 1 || static_cast<std::size_t>(result.shape(0)) != n || !result.writeable()) {
      throw py::value_error("out must be a writable 1-D int32 array of " + std::to_string(n) + " entries");
    }
  }
  for (std::size_t i = 1; i <= n; ++i) s->offsets.push_back(i);
  do_append(self, *s.operator->(), "append_decode");
  std::int32_t* dst = result.mutable_data();
  std::size_t at = 0;
  for (std::size_t i = 0; i < n; ++i) dst[i] = s->counts[i] != 0 ? s->blocks[at++] : -1;
  return result;
}

py::object block_tables(const BoundRequestManager& self, const py::handle& request_ids, const py::object& out,
                        std::optional<std::int64_t> width) {
  ScratchLease s;
  read_ids(request_ids, s->ids, "request_ids");
  const std::size_t n = s->ids.size();
  py::array_t<std::int32_t> table;
  std::size_t stride = 0;
  if (!out.is_none()) {
    if (!py::array_t<std::int32_t, py::array::c_style>::check_(out)) {
      throw py::type_error("out must be a C-contiguous 2-D int32 array");
    }
    table = py::reinterpret_borrow<py::array_t<std::int32_t>>(out);
    if (table.ndim() != 2 || static_cast<std::size_t>(table.shape(0)) < n || !table.writeable()) {
      throw py::value_error("out must be a writable 2-D int32 array with at least " + std::to_string(n) + " rows");
    }
    stride = static_cast<std::size_t>(table.shape(1));
    if (width && *width != table.shape(1)) {  // out's columns are the width: a different one is a mistake
      throw py::value_error("width " + std::to_string(*width) + " does not match out's " +
                            std::to_string(table.shape(1)) + " columns");
    }
  } else {
    if (width) {
      stride = checked_count(*width, "width", /*allow_zero=*/true);
    } else {
      for (RequestId id : s->ids) {
        stride = std::max<std::size_t>(stride, self.manager->block_table(id).size());
      }
    }
    table = py::array_t<std::int32_t>({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(stride)});
  }
  const auto span = std::span<BlockId>(table.mutable_data(), n * stride);
  {
    std::optional<ResizeGuard> guard;  // the caller's `out`, written without the GIL
    if (!out.is_none() && worth_releasing(n, 0)) guard.emplace(table);
    const MaybeReleaseGil release(worth_releasing(n, 0));
    (void)self.manager->block_tables(s->ids, span, stride, -1);
  }
  return table;
}

py::dict stats_dict(const RequestManagerStats& st) {
  py::dict d;
  d["admitted"] = st.admitted;
  d["refused"] = st.refused;
  d["finished"] = st.finished;
  d["aborted"] = st.aborted;
  d["preempted"] = st.preempted;
  d["queried_blocks"] = st.queried_blocks;
  d["hit_blocks"] = st.hit_blocks;
  d["published_blocks"] = st.published_blocks;
  d["evicted_for_room"] = st.evicted_for_room;
  d["running"] = st.running;
  d["owned_blocks"] = st.owned_blocks;
  return d;
}

}  // namespace

void bind_manager(py::module_& m) {
  py::class_<BoundRequestManager>(m, "RequestManager")
      .def(py::init(&make_manager), py::arg("allocator"), py::arg("cache") = py::none(),
           py::arg("block_size") = py::none(), py::arg("hash_algorithm") = "sha256",
           py::arg("match_last_token") = false)
      .def("admit", &admit_one, py::arg("request_id"), py::arg("tokens"), py::arg("salt") = py::none(),
           py::arg("extra") = py::none(), "Admits one request: (num_cached_tokens, block_table int32).")
      .def("admit_batch", &admit_batch, py::arg("request_ids"), py::arg("tokens"), py::arg("salt") = py::none(),
           py::arg("extra") = py::none(),
           "Admits all or none: (num_cached_tokens int32[n], block_tables int32[total], offsets int64[n+1]).")
      .def("reserve", [](BoundRequestManager& self, const py::handle& request_id, std::int64_t num_tokens) {
             if (num_tokens <= 0) throw py::value_error("num_tokens must be > 0, got " + std::to_string(num_tokens));
             ScratchLease s;
             s->ids.push_back(request_id_value(request_id.ptr(), "request_id"));
             AdmitRequest r{s->ids[0], {}, {}, static_cast<std::uint64_t>(num_tokens)};
             std::uint32_t cached = 0;
             const BatchStatus st =
                 self.manager->admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1), &s->blocks);
             if (!st.ok()) refused("reserve", st, s->ids, self.manager->allocator());
             return int32_array(s->blocks.data(), s->blocks.size());
           }, py::arg("request_id"), py::arg("num_tokens"),
           "Reserves blocks for num_tokens tokens whose ids are unknown (never hashed or shared): the block table.")
      .def("append", [](BoundRequestManager& self, const py::handle& request_id, const py::handle& tokens) {
             ScratchLease s;
             s->ids.push_back(request_id_value(request_id.ptr(), "request_id"));
             append_tokens(tokens, s->tokens, "tokens");
             s->offsets.push_back(s->tokens.size());
             do_append(self, *s.operator->(), "append");
             return int32_array(s->blocks.data(), s->blocks.size());
           }, py::arg("request_id"), py::arg("tokens"), "Appends tokens to one request: its new block ids.")
      .def("append_batch", [](BoundRequestManager& self, const py::handle& request_ids, const py::handle& tokens) {
             ScratchLease s;
             read_ids(request_ids, s->ids, "request_ids");
             read_token_lists(tokens, *s.operator->(), s->ids.size(), "tokens");
             do_append(self, *s.operator->(), "append_batch");
             py::array_t<std::int32_t> counts(static_cast<py::ssize_t>(s->ids.size()));
             for (std::size_t i = 0; i < s->ids.size(); ++i) counts.mutable_data()[i] = static_cast<std::int32_t>(s->counts[i]);
             return py::make_tuple(counts, int32_array(s->blocks.data(), s->blocks.size()));
           }, py::arg("request_ids"), py::arg("tokens"),
           "All or nothing: (new_block_counts int32[n], new_block_ids int32[total]).")
      .def("append_decode", &append_decode, py::arg("request_ids"), py::arg("tokens"), py::arg("out") = py::none(),
           "One token per request, all or nothing: int32[n], each request's new block id or -1.")
      .def("finish", [](BoundRequestManager& self, const py::handle& ids) {
             ScratchLease s;
             read_ids(ids, s->ids, "request_ids");
             const MaybeReleaseGil release(worth_releasing(s->ids.size(), 0));
             self.manager->finish(s->ids);
           }, py::arg("request_ids"))
      .def("abort", [](BoundRequestManager& self, const py::handle& ids) {
             ScratchLease s;
             read_ids(ids, s->ids, "request_ids");
             const MaybeReleaseGil release(worth_releasing(s->ids.size(), 0));
             self.manager->abort(s->ids);
           }, py::arg("request_ids"))
      .def("preempt", [](BoundRequestManager& self, const py::handle& ids) {
             ScratchLease s;
             read_ids(ids, s->ids, "request_ids");
             const MaybeReleaseGil release(worth_releasing(s->ids.size(), 0));
             return self.manager->preempt(s->ids);
           }, py::arg("request_ids"), "Releases the requests (resume by admitting all their tokens); total tokens.")
      .def("block_table", [](const BoundRequestManager& self, const py::handle& id) {
             const std::vector<BlockId> t = self.manager->block_table(request_id_value(id.ptr(), "request_id"));
             return int32_array(t.data(), t.size());
           }, py::arg("request_id"))
      .def("block_tables", &block_tables, py::arg("request_ids"), py::arg("out") = py::none(),
           py::arg("width") = py::none(), "Block tables as rows of a 2-D int32 array padded with -1.")
      .def("num_tokens", [](const BoundRequestManager& self, const py::handle& id) {
             return self.manager->num_tokens(request_id_value(id.ptr(), "request_id"));
           }, py::arg("request_id"))
      .def("__contains__", [](const BoundRequestManager& self, const py::handle& id) {
             if (!PyIndex_Check(id.ptr()) || PyFloat_Check(id.ptr())) return false;
             const auto value = py::reinterpret_steal<py::object>(PyNumber_Index(id.ptr()));
             if (!value) throw py::error_already_set();
             int overflow = 0;
             const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
             if (overflow == 0) return v >= 0 && self.manager->contains(static_cast<RequestId>(v));
             if (overflow < 0) return false;  // negative: never a request id
             const unsigned long long u = PyLong_AsUnsignedLongLong(value.ptr());
             if (u == static_cast<unsigned long long>(-1) && PyErr_Occurred() != nullptr) {
               PyErr_Clear();  // 2**64 or more: never a request id
               return false;
             }
             return self.manager->contains(static_cast<RequestId>(u));
           })
      .def("__len__", [](const BoundRequestManager& self) { return self.manager->stats().running; })
      .def("running", [](const BoundRequestManager& self) { return self.manager->running(); })
      .def("stats", [](const BoundRequestManager& self) { return stats_dict(self.manager->stats()); })
      .def("check_invariants", [](const BoundRequestManager& self) {
             py::gil_scoped_release release;
             self.manager->check_invariants();
           })
      .def_property_readonly("block_size", [](const BoundRequestManager& self) { return self.manager->block_size(); })
      .def_property_readonly("hash_algorithm", [](const BoundRequestManager& self) {
             return std::string(hash_algorithm_name(self.algorithm));
           })
      .def_property_readonly("match_last_token",
                             [](const BoundRequestManager& self) { return self.manager->options().match_last_token; });
}

}  // namespace sagellm::kv::bindings
