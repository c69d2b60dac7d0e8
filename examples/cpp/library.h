// A compiled tsedge library's metadata (LIB.json) and its weights folder, read for the C++ example.
// Both are files, hence untrusted: every count, shape, length and offset is checked before use.
#ifndef TSEDGE_EXAMPLES_CPP_LIBRARY_H_
#define TSEDGE_EXAMPLES_CPP_LIBRARY_H_

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tsedge {

// A problem with the inputs; its message is one line that names the fix.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One library parameter: its source tensors (weights-folder names) concatenated along their first
// dimension, then transposed or not (models/library.py ParamSpec).
struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<std::string> sources;
  bool transposed = false;
};

// A policy state tensor the runtime allocates zeroed (e.g. TokenSelect's selection cache). A size
// of kCapacityDim ("capacity" in LIB.json) is the KV cache's tokens (per-token state: int8 key codes).
constexpr int64_t kCapacityDim = -1;
struct StateSpec {
  std::string name;
  std::vector<int64_t> shape;
  DLDataType dtype;
  std::vector<int64_t> Shape(int64_t capacity) const;  // shape with kCapacityDim -> capacity
};

// What the runtime needs from LIB.json, written by `tsedge compile` (models/library.py LibraryMeta).
struct LibraryMeta {
  std::string path;              // the .json read
  tvm::ffi::json::Object model;  // the model config, compared with the weights' config.json
  std::string model_name, policy, target;
  DLDataType dtype;     // of the parameters
  DLDataType kv_dtype;  // of the KV cache (float16 in CPU libraries of quantized weights)
  int64_t num_layers, num_kv_heads, head_dim, vocab_size, max_context;
  int64_t chunk_size, budget;  // a selecting policy's prefill chunk cap and its token budget
  std::vector<std::string> functions;
  std::vector<ParamSpec> params;
  std::vector<StateSpec> state;

  bool HasFunction(const std::string& name) const;
};

// Reads and checks LIB.json (the library's metadata, next to it).
LibraryMeta ReadLibraryMeta(const std::string& json_path);

// A new tensor of `shape` and `dtype` on `device`, filled from `data` (nbytes of it) when given.
tvm::ffi::Tensor NewTensor(const std::vector<int64_t>& shape, DLDataType dtype, DLDevice device,
                           const void* data = nullptr);

// A new tensor of zeros (a policy state tensor starts so, as in KVCache.reset_state).
tvm::ffi::Tensor ZeroTensor(const std::vector<int64_t>& shape, DLDataType dtype, DLDevice device);

// The library's parameters, in its order, from a folder written by `tsedge convert`.
tvm::ffi::Array<tvm::ffi::Tensor> LoadWeights(const std::string& folder, const LibraryMeta& meta,
                                              DLDevice device);

}  // namespace tsedge

#endif  // TSEDGE_EXAMPLES_CPP_LIBRARY_H_
