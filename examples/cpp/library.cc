// Reads LIB.json and the weights folder of `tsedge convert` for the C++ example (see library.h).
//
// Weights format: the example reads the folder's params.safetensors (float16, Hugging Face tensor
// names) with the small reader below and builds each library parameter the way tsedge/engine.py
// does (concatenate fused sources, transpose, cast to the library dtype). Chosen over a
// tvm.runtime.save_param_dict file in library order because (1) the library order and layout
// depend on the target (CPU libraries take transposed linears), so one converted folder would no
// longer serve every library compiled for those weights, and (2) TVM's LoadParams trusts the file:
// it allocates the shape a tensor record claims before checking it against the bytes that follow
// (an unchecked ndim, an unchecked element-count product). A safetensors file is an 8-byte header
// length, a JSON header and raw little-endian data, so every span is checked here before reading.
#include "library.h"

#include <tvm/ffi/extra/structural_equal.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <unordered_map>
#include <utility>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader assumes a little-endian host"
#endif

namespace tsedge {
namespace {

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

constexpr int kFormatVersion = 3;                // models/library.py FORMAT_VERSION
constexpr uint64_t kMaxJsonBytes = 64 << 20;     // a metadata file or safetensors header
constexpr int64_t kMaxBytes = int64_t{1} << 40;  // any one tensor: a larger claim is corrupt

// ---- checked reading of JSON values -------------------------------------------------------------
std::string ReadFile(const std::string& path, uint64_t max_bytes, const std::string& fix) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw UserError(path + ": cannot open it; " + fix);
  auto size = static_cast<uint64_t>(f.tellg());
  if (size > max_bytes) throw UserError(path + ": " + std::to_string(size) + " bytes, too large; " + fix);
  std::string data(size, '\0');
  f.seekg(0);
  if (!f.read(data.data(), static_cast<std::streamsize>(size)))
    throw UserError(path + ": read failed; " + fix);
  return data;
}

json::Object ParseObject(const std::string& text, const std::string& origin, const std::string& fix) {
  ffi::String error;
  json::Value value = json::Parse(ffi::String(text), &error);
  if (!error.empty()) throw UserError(origin + ": unreadable JSON (" + std::string(error) + "); " + fix);
  auto object = value.as<json::Object>();
  if (!object) throw UserError(origin + ": not a JSON object; " + fix);
  return *object;
}

// Typed access to one JSON object's fields; each failure names the file, the field and the fix.
class Fields {
 public:
  Fields(json::Object object, std::string where, std::string fix, std::string prefix = "")
      : object_(std::move(object)),
        where_(std::move(where)),
        fix_(std::move(fix)),
        prefix_(std::move(prefix)) {}

  json::Value Get(const std::string& key) const {
    auto it = object_.find(ffi::String(key));
    if (it == object_.end()) Fail(key, "is missing");
    return (*it).second;
  }
  template <typename T>
  T As(const std::string& key, const char* kind) const {
    auto value = Get(key).as<T>();
    if (!value) Fail(key, std::string("is not ") + kind);
    return *value;
  }
  std::string Str(const std::string& key) const { return std::string(As<ffi::String>(key, "a string")); }
  bool Bool(const std::string& key) const { return As<bool>(key, "true or false"); }
  json::Array Arr(const std::string& key) const { return As<json::Array>(key, "a list"); }
  Fields Obj(const std::string& key) const {
    return Fields(As<json::Object>(key, "an object"), where_, fix_, prefix_ + key + ".");
  }
  int64_t Int(const std::string& key, int64_t lo, int64_t hi) const {
    int64_t v = As<int64_t>(key, "an integer");
    if (v < lo || v > hi)
      Fail(key,
           "is " + std::to_string(v) + ", outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v;
  }
  std::vector<int64_t> Dims(const std::string& key) const {  // a shape: sizes >= 0
    std::vector<int64_t> dims;
    for (const ffi::Any& d : Arr(key)) {
      auto v = d.as<int64_t>();
      if (!v || *v < 0) Fail(key, "is not a list of sizes");
      dims.push_back(*v);
    }
    return dims;
  }
  std::vector<int64_t> StateDims(const std::string& key) const {  // sizes >= 0 or "capacity"
    std::vector<int64_t> dims;
    for (const ffi::Any& d : Arr(key)) {
      auto size = d.as<int64_t>();
      auto name = d.as<ffi::String>();
      if (size && *size >= 0) {
        dims.push_back(*size);
      } else if (name && std::string(*name) == "capacity") {
        dims.push_back(kCapacityDim);
      } else {
        Fail(key, "is not a list of sizes (or \"capacity\")");
      }
    }
    return dims;
  }
  std::vector<std::string> Strings(const std::string& key) const {
    std::vector<std::string> out;
    for (const ffi::Any& s : Arr(key)) {
      auto v = s.as<ffi::String>();
      if (!v) Fail(key, "is not a list of strings");
      out.emplace_back(*v);
    }
    return out;
  }
  const json::Object& object() const { return object_; }
  [[noreturn]] void Fail(const std::string& key, const std::string& what) const {
    throw UserError(where_ + ": " + prefix_ + key + " " + what + "; " + fix_);
  }

 private:
  json::Object object_;
  std::string where_, fix_, prefix_;  // prefix_: the path of a nested object ("model.")
};

DLDataType ParseDtype(const Fields& f, const std::string& key) {
  static const std::unordered_map<std::string, DLDataType> kTypes = {
      {"float32", {kDLFloat, 32, 1}}, {"float16", {kDLFloat, 16, 1}}, {"int32", {kDLInt, 32, 1}},
      {"int8", {kDLInt, 8, 1}}};
  auto it = kTypes.find(f.Str(key));
  if (it == kTypes.end()) f.Fail(key, "is not float32, float16, int32 or int8");
  return it->second;
}

// Bytes of `shape` at `elem_bytes` each; none past kMaxBytes (a corrupt or impossible size).
std::optional<int64_t> Bytes(const std::vector<int64_t>& shape, int64_t elem_bytes) {
  int64_t n = elem_bytes;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n) || n > kMaxBytes) return std::nullopt;
  }
  return n;
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  return s.str() + ']';
}

// ---- safetensors ----------------------------------------------------------------------------------
// Tensor entries of a safetensors file, each checked against the file before anything is read.
class Safetensors {
 public:
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t offset, nbytes;  // absolute file offset of the data
  };

  explicit Safetensors(const std::string& path) : path_(path), file_(path, std::ios::binary | std::ios::ate) {
    if (!file_) throw Corrupt("cannot open it");
    uint64_t size = static_cast<uint64_t>(file_.tellg());
    if (size < 8) throw Corrupt(std::to_string(size) + " bytes, less than the 8-byte header length");
    unsigned char len[8];
    file_.seekg(0);
    if (!file_.read(reinterpret_cast<char*>(len), 8)) throw Corrupt("header length unreadable");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
    if (n > size - 8 || n > kMaxJsonBytes)
      throw Corrupt("header of " + std::to_string(n) + " bytes in a " + std::to_string(size) + "-byte file");
    std::string header(n, '\0');
    if (!file_.read(header.data(), static_cast<std::streamsize>(n))) throw Corrupt("header unreadable");
    const uint64_t data_start = 8 + n, data_size = size - data_start;
    json::Object entries = ParseObject(header, path_, kFix);
    for (const auto& [key, value] : entries) {
      auto name = key.as<ffi::String>();
      if (!name || *name == "__metadata__") continue;
      auto object = value.as<json::Object>();
      if (!object) throw Corrupt("tensor " + std::string(*name) + ": entry is not an object");
      Fields f(*object, path_ + ": tensor " + std::string(*name), kFix);
      Entry e{f.Str("dtype"), f.Dims("shape"), 0, 0};
      e.nbytes = ParseSpan(f, e, data_size, &e.offset);
      e.offset += data_start;
      entries_.emplace(std::string(*name), std::move(e));
    }
  }

  const Entry& Get(const std::string& name) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      throw UserError(path_ + ": tensor " + name +
                      " is missing; convert the weights of the model this library "
                      "was compiled for with `tsedge convert`");
    }
    return it->second;
  }

  void Read(const Entry& e, void* out) {
    file_.seekg(static_cast<std::streamoff>(e.offset));
    if (!file_.read(static_cast<char*>(out), static_cast<std::streamsize>(e.nbytes)))
      throw Corrupt("read failed");
  }

 private:
  static constexpr const char* kFix = "write the folder again with `tsedge convert`";

  UserError Corrupt(const std::string& detail) const {
    return UserError(path_ + ": corrupt safetensors file (" + detail + "); " + kFix);
  }

  // The entry's byte span [begin, end) within the data: inside it and as long as F16 x shape.
  uint64_t ParseSpan(const Fields& f, const Entry& e, uint64_t data_size, uint64_t* begin) const {
    if (e.dtype != "F16") f.Fail("dtype", "is " + e.dtype + ", not the F16 that `tsedge convert` writes");
    std::vector<int64_t> offsets = f.Dims("data_offsets");
    std::vector<uint64_t> span(offsets.begin(), offsets.end());
    if (span.size() != 2 || span[0] > span[1] || span[1] > data_size) {
      f.Fail("data_offsets", "is not a span inside the " + std::to_string(data_size) + " data bytes");
    }
    std::optional<int64_t> bytes = Bytes(e.shape, sizeof(uint16_t));
    if (!bytes) f.Fail("shape", ShapeStr(e.shape) + " is too large");
    auto need = static_cast<uint64_t>(*bytes);
    if (span[1] - span[0] != need) {
      f.Fail("data_offsets", "span " + std::to_string(span[1] - span[0]) + " bytes, but F16 " +
                                 ShapeStr(e.shape) + " needs " + std::to_string(need));
    }
    *begin = span[0];
    return need;
  }

  std::string path_;
  std::ifstream file_;
  std::unordered_map<std::string, Entry> entries_;
};

// ---- parameters ---------------------------------------------------------------------------------
float HalfToFloat(uint16_t h) {  // IEEE binary16 -> binary32, exact (as numpy's astype)
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    float v = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  uint32_t bits = sign | (exp == 0x1f ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The float16 `half` [rows, cols] (or its transpose) as `T`, row-major.
template <typename T, typename Convert>
std::vector<T> Arrange(const std::vector<uint16_t>& half, int64_t rows, int64_t cols, bool transposed,
                       Convert convert) {
  std::vector<T> out(half.size());
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      out[transposed ? j * rows + i : i * cols + j] = convert(half[i * cols + j]);
    }
  }
  return out;
}

ffi::Tensor BuildParam(Safetensors& file, const ParamSpec& spec, const LibraryMeta& meta, DLDevice device) {
  std::vector<int64_t> shape;  // the sources concatenated along their first dimension
  std::vector<const Safetensors::Entry*> parts;
  for (const std::string& name : spec.sources) {
    const Safetensors::Entry& e = file.Get(name);
    bool fits = !e.shape.empty() &&
                (shape.empty() || (e.shape.size() == shape.size() &&
                                   std::equal(e.shape.begin() + 1, e.shape.end(), shape.begin() + 1)));
    if (!fits)
      throw UserError("tensor " + name + " " + ShapeStr(e.shape) + " does not fit library parameter " +
                      spec.name + " " + ShapeStr(spec.shape) + "; compile a library for these weights");
    if (shape.empty())
      shape = e.shape;
    else
      shape[0] += e.shape[0];
    parts.push_back(&e);
  }
  int64_t rows = shape.empty() ? 0 : shape[0], cols = 1;
  for (size_t i = 1; i < shape.size(); ++i) cols *= shape[i];
  std::vector<int64_t> final_shape = shape;
  if (spec.transposed)
    final_shape = shape.size() == 2 ? std::vector<int64_t>{cols, rows} : std::vector<int64_t>{};
  if (parts.empty() || final_shape != spec.shape) {
    throw UserError("tensors of " + spec.name + " make " + ShapeStr(shape) +
                    (spec.transposed ? " (transposed)" : "") + ", not the library's " + ShapeStr(spec.shape) +
                    "; compile a library for these weights");
  }
  std::vector<uint16_t> half(static_cast<size_t>(rows * cols));
  uint16_t* at = half.data();
  for (const Safetensors::Entry* e : parts) {
    file.Read(*e, at);
    at += e->nbytes / sizeof(uint16_t);
  }
  if (meta.dtype.bits == 16) {
    auto same = Arrange<uint16_t>(half, rows, cols, spec.transposed, [](uint16_t h) { return h; });
    return NewTensor(spec.shape, meta.dtype, device, same.data());
  }
  auto wide = Arrange<float>(half, rows, cols, spec.transposed, HalfToFloat);
  return NewTensor(spec.shape, meta.dtype, device, wide.data());
}

}  // namespace

// ---- public -------------------------------------------------------------------------------------
bool LibraryMeta::HasFunction(const std::string& name) const {
  return std::find(functions.begin(), functions.end(), name) != functions.end();
}

LibraryMeta ReadLibraryMeta(const std::string& json_path) {
  const std::string fix = "recompile the library with `tsedge compile`";
  Fields root(ParseObject(ReadFile(json_path, kMaxJsonBytes, fix), json_path, fix), json_path, fix);
  if (root.Get("format_version").as<int64_t>() != std::optional<int64_t>(kFormatVersion)) {
    root.Fail("format_version", "is not " + std::to_string(kFormatVersion));
  }
  LibraryMeta meta;
  meta.path = json_path;
  constexpr int64_t kBig = int64_t{1} << 24;
  Fields model = root.Obj("model"), policy = root.Obj("policy");
  meta.model = model.object();
  meta.model_name = model.Str("name");
  meta.num_layers = model.Int("num_layers", 1, 4096);
  meta.num_kv_heads = model.Int("num_kv_heads", 1, 4096);
  meta.head_dim = model.Int("head_dim", 1, 4096);
  meta.vocab_size = model.Int("vocab_size", 1, kBig);
  meta.max_context = root.Int("max_context", 1, kBig);
  meta.policy = policy.Str("name");
  meta.chunk_size = policy.Int("chunk_size", 1, kBig);
  int64_t n_init = policy.Int("n_init", 0, kBig), n_local = policy.Int("n_local", 0, kBig);
  int64_t top_k = policy.Int("top_k", 0, kBig);
  meta.budget = n_init + (meta.policy == "tokenselect" ? top_k : 0) + n_local;  // PolicyConfig.budget
  if (meta.policy == "tidaldecode") meta.budget = policy.Int("tidal_budget", 1, kBig);
  if (meta.policy == "recycled") {  // a token count, or a fraction of the prompt ("1/8"): its least K
    auto count = policy.Get("recycle_k").as<int64_t>();
    meta.budget = count ? *count : policy.Int("recycle_min_k", 1, kBig);
  }
  meta.target = root.Str("target");
  meta.dtype = ParseDtype(root, "dtype");
  if (meta.dtype.code != kDLFloat) root.Fail("dtype", "is not float32 or float16");
  meta.kv_dtype = ParseDtype(root, "kv_dtype");
  if (meta.kv_dtype.code != kDLFloat) root.Fail("kv_dtype", "is not float32 or float16");
  if (root.Str("quantization") != "q0") {  // packed weights: not read by this example
    root.Fail("quantization", "is " + root.Str("quantization") +
                                  "; this example reads float libraries: compile with --quantization q0");
  }
  meta.functions = root.Strings("functions");
  for (const char* name : {"rope_table", "prefill", "decode"}) {
    if (!meta.HasFunction(name)) root.Fail("functions", std::string("lack ") + name);
  }
  for (const ffi::Any& item : root.Arr("params")) {
    auto object = item.as<json::Object>();
    if (!object) root.Fail("params", "is not a list of objects");
    Fields p(*object, json_path + ": a parameter", fix);
    meta.params.push_back({p.Str("name"), p.Dims("shape"), p.Strings("sources"), p.Bool("transposed")});
  }
  for (const ffi::Any& item : root.Arr("state")) {  // [name, shape, dtype] each
    auto triple = item.as<json::Array>();
    if (!triple || triple->size() != 3) root.Fail("state", "is not a list of [name, shape, dtype]");
    Fields s(json::Object{{"name", (*triple)[0]}, {"shape", (*triple)[1]}, {"dtype", (*triple)[2]}},
             json_path + ": a state tensor", fix);
    StateSpec spec{s.Str("name"), s.StateDims("shape"), ParseDtype(s, "dtype")};
    if (!Bytes(spec.Shape(1), spec.dtype.bits / 8)) s.Fail("shape", ShapeStr(spec.shape) + " is too large");
    meta.state.push_back(std::move(spec));
  }
  return meta;
}

std::vector<int64_t> StateSpec::Shape(int64_t capacity) const {
  std::vector<int64_t> out = shape;
  for (int64_t& d : out) d = d == kCapacityDim ? capacity : d;
  return out;
}

ffi::Tensor NewTensor(const std::vector<int64_t>& shape, DLDataType dtype, DLDevice device,
                      const void* data) {
  static const ffi::Function alloc = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
  static const ffi::Function copy = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes");
  std::optional<int64_t> nbytes = Bytes(shape, (dtype.bits + 7) / 8);
  if (!nbytes)
    throw UserError("a tensor of shape " + ShapeStr(shape) +
                    " is too large to allocate; lower --max-context");
  auto tensor = alloc(ffi::Shape(shape), dtype, device, ffi::Optional<ffi::String>()).cast<ffi::Tensor>();
  if (data != nullptr) copy(tensor, const_cast<void*>(data), *nbytes);
  return tensor;
}

ffi::Tensor ZeroTensor(const std::vector<int64_t>& shape, DLDataType dtype, DLDevice device) {
  std::vector<char> zeros(static_cast<size_t>(Bytes(shape, (dtype.bits + 7) / 8).value_or(0)));
  return NewTensor(shape, dtype, device, zeros.data());  // refuses a shape too large itself
}

ffi::Array<ffi::Tensor> LoadWeights(const std::string& folder, const LibraryMeta& meta, DLDevice device) {
  const std::string fix = "give a folder written by `tsedge convert`";
  std::string config_path = folder + "/config.json";
  Fields config(ParseObject(ReadFile(config_path, kMaxJsonBytes, fix), config_path, fix), config_path, fix);
  for (const auto& [key, value] : meta.model) {  // as the engine: every field but the name
    auto it = config.object().find(key);
    if (key.as<ffi::String>() != std::optional<ffi::String>("name") &&
        (it == config.object().end() || !ffi::StructuralEqual::Equal((*it).second, value))) {
      throw UserError("weights " + folder + " do not match library " + meta.path + " (compiled for " +
                      meta.model_name + "; " + std::string(key.cast<ffi::String>()) +
                      " differs): compile a library for these weights");
    }
  }
  Safetensors file(folder + "/params.safetensors");
  ffi::Array<ffi::Tensor> params;
  for (const ParamSpec& spec : meta.params) params.push_back(BuildParam(file, spec, meta, device));
  return params;
}

}  // namespace tsedge
