// Greedy generation from a compiled tsedge library with the TVM runtime alone (no Python):
//
//   tsedge_run LIB.so WEIGHTS_DIR [--max-new-tokens N] [--max-context N] [--prefill-chunk N]
//              [--stop ID,ID...] ID [ID ...]
//
// LIB.so comes from `tsedge compile --target llvm` (LIB.json beside it), WEIGHTS_DIR from
// `tsedge convert` for the same model; the IDs are the prompt's token ids. Prints the generated ids
// on one line (the stop id included, as Engine.generate returns them). The sequence is the
// Python engine's (tsedge/engine.py): rope_table once, prefill per chunk, decode per token, the
// *_select variants once the context exceeds a selecting policy's budget.
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "library.h"

namespace ffi = tvm::ffi;
using tsedge::LibraryMeta;
using tsedge::UserError;

namespace {

const char* kUsage =
    "usage: tsedge_run LIB.so WEIGHTS_DIR [--max-new-tokens N] [--max-context N] "
    "[--prefill-chunk N] [--stop ID,ID...] ID [ID ...]";

struct Options {
  std::string lib, weights;
  int64_t max_new_tokens = 32, max_context = 0, prefill_chunk = 512;
  std::set<int64_t> stop;
  std::vector<int64_t> prompt;
};

int64_t ParseInt(const std::string& text, const std::string& what, int64_t lo) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE || v < lo) {
    throw UserError(what + " must be an integer >= " + std::to_string(lo) + ", got '" + text + "'");
  }
  return v;
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      positional.push_back(arg);
      continue;
    }
    if (i + 1 >= argc) throw UserError(arg + " needs a value; " + kUsage);
    std::string value = argv[++i];
    if (arg == "--max-new-tokens") {
      o.max_new_tokens = ParseInt(value, arg, 1);
    } else if (arg == "--max-context") {
      o.max_context = ParseInt(value, arg, 1);
    } else if (arg == "--prefill-chunk") {
      o.prefill_chunk = ParseInt(value, arg, 1);
    } else if (arg == "--stop") {
      std::stringstream ids(value);
      for (std::string id; std::getline(ids, id, ',');) o.stop.insert(ParseInt(id, "a --stop id", 0));
    } else {
      throw UserError("unknown option " + arg + "; " + kUsage);
    }
  }
  if (positional.size() < 3) throw UserError(kUsage);
  o.lib = positional[0];
  o.weights = positional[1];
  for (size_t i = 2; i < positional.size(); ++i) o.prompt.push_back(ParseInt(positional[i], "a token id", 0));
  return o;
}

// The Python engine's sequencer: the KV cache, the policy state, prefill in chunks, decode.
class Runner {
 public:
  Runner(const LibraryMeta& meta, ffi::Module vm, ffi::Array<ffi::Tensor> params, int64_t capacity,
         DLDevice device)
      : meta_(meta), vm_(std::move(vm)), params_(std::move(params)), capacity_(capacity), device_(device) {
    kv_ = tsedge::NewTensor({meta.num_layers, 2, meta.num_kv_heads, capacity, meta.head_dim}, meta.kv_dtype,
                            device);
    for (const tsedge::StateSpec& s : meta.state)
      state_.push_back(tsedge::ZeroTensor(s.Shape(capacity), s.dtype, device));
    rope_ = Function("rope_table")(ffi::Shape({capacity}), params_).cast<ffi::Tensor>();
  }

  int64_t size() const { return past_; }
  int64_t capacity() const { return capacity_; }

  // Appends `ids` in chunks of `chunk` tokens; the logits of the last one.
  std::vector<float> Prefill(const std::vector<int64_t>& ids, int64_t chunk) {
    std::vector<float> logits;
    for (size_t start = 0; start < ids.size(); start += chunk) {
      size_t end = std::min(ids.size(), start + static_cast<size_t>(chunk));
      logits = Run("prefill", std::vector<int32_t>(ids.begin() + start, ids.begin() + end));
    }
    return logits;
  }

  std::vector<float> Decode(int64_t token) { return Run("decode", {static_cast<int32_t>(token)}); }

 private:
  ffi::Function Function(const std::string& name) {
    ffi::Optional<ffi::Function> f = vm_->GetFunction(name);
    if (!f)
      throw UserError(meta_.path + " lists " + name +
                      " but the library lacks it; recompile it with `tsedge compile`");
    return *f;
  }

  std::vector<float> Run(std::string func, const std::vector<int32_t>& ids) {
    auto n = static_cast<int64_t>(ids.size());
    if (meta_.HasFunction(func + "_select") && past_ + n > meta_.budget) func += "_select";
    ffi::Tensor ids_t = tsedge::NewTensor({n}, {kDLInt, 32, 1}, device_, ids.data());
    const int32_t length = static_cast<int32_t>(past_ + n);  // the context after this call
    ffi::Tensor length_t = tsedge::NewTensor({1}, {kDLInt, 32, 1}, device_, &length);
    auto out = Function(func)(ids_t, kv_, rope_, ffi::Shape({past_}), length_t, state_, params_)
                   .cast<ffi::Array<ffi::Any>>();
    if (out.size() != 3)
      throw UserError(func + " returned " + std::to_string(out.size()) +
                      " values, not 3; recompile the library");
    kv_ = out[1].cast<ffi::Tensor>();
    state_ = out[2].cast<ffi::Array<ffi::Tensor>>();
    past_ += n;
    return LastRow(out[0].cast<ffi::Tensor>());
  }

  std::vector<float> LastRow(const ffi::Tensor& logits) {  // float32 [.., vocab] -> its last row
    DLDataType t = logits.dtype();
    if (t.code != kDLFloat || t.bits != 32 || logits.ndim() < 1 ||
        logits.shape().back() != meta_.vocab_size) {
      throw UserError("the library's logits are not float32 [.., " + std::to_string(meta_.vocab_size) +
                      "]; recompile it");
    }
    static const ffi::Function copy = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyToBytes");
    std::vector<float> all(logits.numel());
    copy(logits, static_cast<void*>(all.data()), static_cast<int64_t>(all.size() * sizeof(float)));
    return std::vector<float>(all.end() - meta_.vocab_size, all.end());
  }

  const LibraryMeta& meta_;
  ffi::Module vm_;
  ffi::Array<ffi::Tensor> params_, state_;
  ffi::Tensor kv_, rope_;
  int64_t capacity_, past_ = 0;
  DLDevice device_;
};

int64_t Argmax(const std::vector<float>& logits) {  // the first maximum, as numpy.argmax
  return std::max_element(logits.begin(), logits.end()) - logits.begin();
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

int Run(const Options& o) {
  if (o.lib.size() < 3 || o.lib.compare(o.lib.size() - 3, 3, ".so") != 0) {
    throw UserError(o.lib + ": give the library's .so (its .json stays next to it)");
  }
  std::string meta_path = o.lib.substr(0, o.lib.size() - 3) + ".json";
  if (!std::filesystem::is_regular_file(o.lib) || !std::filesystem::is_regular_file(meta_path)) {
    throw UserError(o.lib + ": library or its metadata " + meta_path +
                    " not found; build one with `tsedge compile`");
  }
  LibraryMeta meta = tsedge::ReadLibraryMeta(meta_path);
  if (meta.target != "llvm") {
    throw UserError(o.lib + " is built for " + meta.target +
                    "; this example runs CPU libraries: compile one "
                    "with `tsedge compile --target llvm`");
  }
  const DLDevice device{kDLCPU, 0};
  int64_t capacity = o.max_context ? o.max_context : meta.max_context;
  if (capacity > meta.max_context) {
    throw UserError("--max-context " + std::to_string(capacity) + " exceeds the library's " +
                    std::to_string(meta.max_context) + "; recompile with a larger --max-context");
  }
  for (int64_t id : o.prompt) {
    if (id >= meta.vocab_size) {
      throw UserError("token id " + std::to_string(id) + " is outside the vocabulary of " +
                      std::to_string(meta.vocab_size));
    }
  }
  if (static_cast<int64_t>(o.prompt.size()) > capacity) {
    throw UserError("prompt of " + std::to_string(o.prompt.size()) + " tokens exceeds the KV cache of " +
                    std::to_string(capacity) + " tokens; shorten it or raise --max-context");
  }
  // A selecting policy's chunk must fit its local window (as Engine.__init__).
  int64_t chunk = meta.policy == "dense" ? o.prefill_chunk : std::min(o.prefill_chunk, meta.chunk_size);

  // An absolute path: dlopen looks a bare file name up in the library search path instead.
  ffi::Module lib = ffi::Module::LoadFromFile(std::filesystem::absolute(o.lib).string());
  ffi::Optional<ffi::Function> load_exec = lib->GetFunction("vm_load_executable");
  if (!load_exec)
    throw UserError(o.lib + " is not a tsedge model library; compile one with `tsedge compile`");
  auto vm = (*load_exec)().cast<ffi::Module>();
  constexpr int kPooledAllocator = 2;  // as tvm.runtime.vm.VirtualMachine's default
  (*vm->GetFunction("vm_initialization"))(static_cast<int>(device.device_type), device.device_id,
                                          kPooledAllocator);

  Runner runner(meta, vm, tsedge::LoadWeights(o.weights, meta, device), capacity, device);
  auto start = std::chrono::steady_clock::now();
  std::vector<int64_t> tokens{Argmax(runner.Prefill(o.prompt, chunk))};
  double prefill_s = Seconds(start);
  auto decode_start = std::chrono::steady_clock::now();
  // As Engine._continue: stop at a stop id, at --max-new-tokens or at a full KV cache.
  while (!o.stop.count(tokens.back()) && static_cast<int64_t>(tokens.size()) < o.max_new_tokens &&
         runner.size() < runner.capacity()) {
    tokens.push_back(Argmax(runner.Decode(tokens.back())));
  }
  double decode_s = Seconds(decode_start);
  for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? " " : "") << tokens[i];
  std::cout << std::endl;
  std::fprintf(stderr, "[%zu prompt tokens at %.1f tok/s, %zu generated at %.1f tok/s]\n", o.prompt.size(),
               o.prompt.size() / prefill_s, tokens.size(),
               decode_s > 0 ? (tokens.size() - 1) / decode_s : 0.0);
  return 0;
}

std::string FirstLine(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const UserError& e) {
    std::cerr << "error: " << e.what() << std::endl;
  } catch (const ffi::Error& e) {
    std::cerr << "error: TVM " << e.kind() << ": " << FirstLine(e.message()) << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << FirstLine(e.what()) << std::endl;
  }
  return 1;
}
