// tsedge's Vulkan backend for the TVM runtime: a `webgpu` device on wgpu-native.
//
// TVM's webgpu codegen emits WGSL; the wheel's runtime knows the device name `webgpu` but ships no
// device API nor module loader for it. This file registers both with the TVM runtime:
//   device_api.webgpu                  memory (wgpu storage buffers), copies, stream sync
//   ffi.Module.load_from_bytes.webgpu  the WGSL module of a compiled library: one compute pipeline
//                                      per kernel, dispatched in TVM's WebGPU calling convention
// and runs them on wgpu-native's Vulkan backend (Mesa llvmpipe in CI, a GPU driver elsewhere).
//
// Calling convention (TVM's webgpu codegen): buffer arguments are @group(0) @binding(i) in the
// device function's argument order, read-only or read-write per the `paramWriteAccess:[...]`
// launch tag; every 32-bit scalar argument, then a u32 `packGridDimX`, fills one uniform struct at
// the next binding; the launch arguments after the scalars give the grid (blockIdx.*) and block
// (threadIdx.*, fixed in the WGSL) extents; a grid x of 65536 or more is folded into z.
//
// Device pointers are handles into a private 64-bit address range: each allocation owns
// [base, base + size), so a pointer plus an offset still names its buffer (TVM views).
// Dispatches are recorded into one compute pass of a pending command encoder and submitted on
// a copy, a sync, or when the uniform ring is full; bind groups are cached per (kernel, buffers)
// and the scalars go to a ring buffer bound with a dynamic offset, so a steady decode step
// creates no wgpu objects.

#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/device_api.h>

#include <webgpu.h>
#include <wgpu.h>

#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace tsedge {
namespace vulkan {

using tvm::runtime::DeviceAPI;
using tvm::runtime::DeviceAttrKind;
namespace ffi = tvm::ffi;

constexpr int kWebGPU = static_cast<int>(kDLWebGPU);
constexpr uint64_t kAddressBase = uint64_t(1) << 44;  // handles never collide with host pointers
constexpr uint64_t kRingBytes = 1 << 20;              // uniform ring: scalars of pending dispatches

static WGPUStringView View(const std::string& s) { return WGPUStringView{s.data(), s.size()}; }
static std::string Str(WGPUStringView v) {
  if (!v.data) return "";
  return v.length == WGPU_STRLEN ? std::string(v.data) : std::string(v.data, v.length);
}

struct Allocation {
  WGPUBuffer buffer;
  uint64_t base;
  uint64_t size;  // bytes the caller asked for
  uint64_t padded;  // bytes of the wgpu buffer (a multiple of 4)
};

struct Dispatch;  // one kernel's pipeline and layout

class Context {
 public:
  static Context* Global() {
    static Context* inst = new Context();
    return inst;
  }

  // Adapter description, or throws a one-line error naming the fix.
  std::string Describe() {
    Ensure();
    return adapter_name_;
  }
  bool Exists() {
    try {
      Ensure();
      return true;
    } catch (...) {
      return false;
    }
  }

  void Ensure() {
    std::lock_guard<std::mutex> lock(init_mutex_);
    if (device_) return;
    if (!init_error_.empty()) TVM_FFI_THROW(RuntimeError) << init_error_;
    WGPUInstanceExtras extras = {};
    extras.chain.sType = static_cast<WGPUSType>(WGPUSType_InstanceExtras);
    extras.backends = WGPUInstanceBackend_Vulkan;
    WGPUInstanceDescriptor idesc = WGPU_INSTANCE_DESCRIPTOR_INIT;
    idesc.nextInChain = &extras.chain;
    instance_ = wgpuCreateInstance(&idesc);
    if (!instance_) Fail("wgpu-native could not create an instance");
    WGPURequestAdapterOptions opts = WGPU_REQUEST_ADAPTER_OPTIONS_INIT;
    opts.powerPreference = WGPUPowerPreference_HighPerformance;
    WGPURequestAdapterCallbackInfo acb = WGPU_REQUEST_ADAPTER_CALLBACK_INFO_INIT;
    acb.mode = WGPUCallbackMode_AllowProcessEvents;
    acb.callback = [](WGPURequestAdapterStatus status, WGPUAdapter adapter, WGPUStringView msg,
                      void* self, void*) {
      auto* ctx = static_cast<Context*>(self);
      ctx->adapter_ = status == WGPURequestAdapterStatus_Success ? adapter : nullptr;
      ctx->pending_message_ = Str(msg);
      ctx->waiting_ = false;
    };
    acb.userdata1 = this;
    waiting_ = true;
    wgpuInstanceRequestAdapter(instance_, &opts, acb);
    while (waiting_) wgpuInstanceProcessEvents(instance_);
    if (!adapter_) {
      Fail("no Vulkan device found: install a Vulkan driver, e.g. `apt install mesa-vulkan-drivers libvulkan1` "
           "(wgpu: " + pending_message_ + ")");
    }
    WGPUAdapterInfo info = WGPU_ADAPTER_INFO_INIT;
    wgpuAdapterGetInfo(adapter_, &info);
    adapter_name_ = Str(info.device) + " (" + Str(info.description) + ")";
    wgpuAdapterInfoFreeMembers(info);
    limits_ = WGPU_LIMITS_INIT;
    wgpuAdapterGetLimits(adapter_, &limits_);
    has_f16_ = wgpuAdapterHasFeature(adapter_, WGPUFeatureName_ShaderF16);
    std::vector<WGPUFeatureName> features;
    if (has_f16_) features.push_back(WGPUFeatureName_ShaderF16);
    WGPUDeviceDescriptor ddesc = WGPU_DEVICE_DESCRIPTOR_INIT;
    ddesc.requiredFeatureCount = features.size();
    ddesc.requiredFeatures = features.data();
    ddesc.requiredLimits = &limits_;  // the adapter's own limits, not WebGPU's minimums
    ddesc.uncapturedErrorCallbackInfo.callback = [](WGPUDevice const*, WGPUErrorType, WGPUStringView msg,
                                                    void* self, void*) {
      auto* ctx = static_cast<Context*>(self);
      if (ctx->error_.empty()) ctx->error_ = Str(msg);
    };
    ddesc.uncapturedErrorCallbackInfo.userdata1 = this;
    WGPURequestDeviceCallbackInfo dcb = WGPU_REQUEST_DEVICE_CALLBACK_INFO_INIT;
    dcb.mode = WGPUCallbackMode_AllowProcessEvents;
    dcb.callback = [](WGPURequestDeviceStatus status, WGPUDevice device, WGPUStringView msg, void* self,
                      void*) {
      auto* ctx = static_cast<Context*>(self);
      ctx->device_ = status == WGPURequestDeviceStatus_Success ? device : nullptr;
      ctx->pending_message_ = Str(msg);
      ctx->waiting_ = false;
    };
    dcb.userdata1 = this;
    waiting_ = true;
    wgpuAdapterRequestDevice(adapter_, &ddesc, dcb);
    while (waiting_) wgpuInstanceProcessEvents(instance_);
    if (!device_) Fail("the Vulkan adapter " + adapter_name_ + " refused a device: " + pending_message_);
    queue_ = wgpuDeviceGetQueue(device_);
    WGPUBufferDescriptor rdesc = WGPU_BUFFER_DESCRIPTOR_INIT;
    rdesc.size = kRingBytes;
    rdesc.usage = WGPUBufferUsage_Uniform | WGPUBufferUsage_CopyDst;
    ring_ = wgpuDeviceCreateBuffer(device_, &rdesc);
    ring_host_.resize(kRingBytes);
    uniform_align_ = std::max<uint32_t>(limits_.minUniformBufferOffsetAlignment, 16);
  }

  const WGPULimits& limits() const { return limits_; }
  bool has_f16() const { return has_f16_; }
  WGPUDevice device() const { return device_; }
  WGPUBuffer ring() const { return ring_; }

  // ---- memory ----------------------------------------------------------------------------
  void* Alloc(size_t nbytes) {
    Ensure();
    uint64_t padded = std::max<uint64_t>((nbytes + 3) / 4 * 4, 4);
    if (padded > limits_.maxBufferSize) {
      TVM_FFI_THROW(RuntimeError) << "a tensor of " << (nbytes >> 20) << " MiB exceeds the Vulkan adapter's "
                                  << (limits_.maxBufferSize >> 20)
                                  << " MiB buffer limit: lower --max-context or use a smaller model";
    }
    WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
    desc.size = padded;
    desc.usage = WGPUBufferUsage_Storage | WGPUBufferUsage_CopySrc | WGPUBufferUsage_CopyDst;
    WGPUBuffer buf = wgpuDeviceCreateBuffer(device_, &desc);
    CheckError("allocating a buffer");
    uint64_t base = next_base_;
    next_base_ += (padded + 4095) / 4096 * 4096 + 4096;  // a gap: a past-the-end pointer stays unique
    allocs_[base] = Allocation{buf, base, nbytes, padded};
    return reinterpret_cast<void*>(base);
  }

  void Free(void* ptr) {
    auto it = allocs_.find(reinterpret_cast<uint64_t>(ptr));
    if (it == allocs_.end()) return;
    Flush();  // pending work may still read it
    DropBindGroups(it->second.base);
    wgpuBufferDestroy(it->second.buffer);
    wgpuBufferRelease(it->second.buffer);
    allocs_.erase(it);
  }

  // The allocation holding handle ``ptr`` and the byte offset of ``ptr`` in it.
  const Allocation& Find(const void* ptr, uint64_t* offset) {
    uint64_t addr = reinterpret_cast<uint64_t>(ptr);
    auto it = allocs_.upper_bound(addr);
    if (it == allocs_.begin() || addr > std::prev(it)->second.base + std::prev(it)->second.padded) {
      TVM_FFI_THROW(RuntimeError) << "pointer " << ptr << " is not a webgpu (Vulkan) buffer of this process";
    }
    --it;
    *offset = addr - it->second.base;
    return it->second;
  }

  void CopyToDevice(const void* host, void* dst, size_t offset, size_t size) {
    if (size == 0) return;
    uint64_t base_off;
    const Allocation& a = Find(dst, &base_off);
    offset += base_off;
    Flush();  // queue writes run before the pending encoder's work otherwise
    if (offset % 4 == 0 && size % 4 == 0) {
      wgpuQueueWriteBuffer(queue_, a.buffer, offset, host, size);
    } else {  // unaligned: read the enclosing words, patch, write back
      uint64_t lo = offset / 4 * 4, hi = (offset + size + 3) / 4 * 4;
      std::vector<uint8_t> words(hi - lo);
      ReadBack(a.buffer, lo, hi - lo, words.data());
      std::memcpy(words.data() + (offset - lo), host, size);
      wgpuQueueWriteBuffer(queue_, a.buffer, lo, words.data(), words.size());
    }
    CheckError("copying to the device");
  }

  void CopyToHost(const void* src, size_t offset, void* host, size_t size) {
    if (size == 0) return;
    uint64_t base_off;
    const Allocation& a = Find(src, &base_off);
    offset += base_off;
    uint64_t lo = offset / 4 * 4, hi = (offset + size + 3) / 4 * 4;
    if (lo == offset && hi - lo == size) {
      ReadBack(a.buffer, lo, size, host);
    } else {
      std::vector<uint8_t> words(hi - lo);
      ReadBack(a.buffer, lo, hi - lo, words.data());
      std::memcpy(host, words.data() + (offset - lo), size);
    }
  }

  void CopyWithin(const void* src, size_t src_offset, void* dst, size_t dst_offset, size_t size) {
    if (size == 0) return;
    uint64_t so, dofs;
    const Allocation& a = Find(src, &so);
    const Allocation& b = Find(dst, &dofs);
    src_offset += so;
    dst_offset += dofs;
    if (src_offset % 4 || dst_offset % 4 || size % 4) {  // rare: through the host
      std::vector<uint8_t> tmp(size);
      CopyToHost(src, src_offset - so, tmp.data(), size);
      CopyToDevice(tmp.data(), dst, dst_offset - dofs, size);
      return;
    }
    EndPass();
    wgpuCommandEncoderCopyBufferToBuffer(Encoder(), a.buffer, src_offset, b.buffer, dst_offset, size);
  }

  void Sync() {
    if (!device_) return;
    Flush();
    wgpuDevicePoll(device_, true, nullptr);
    CheckError("running kernels");
  }

  // ---- dispatch ---------------------------------------------------------------------------
  WGPUComputePassEncoder Pass() {
    if (!pass_) {
      WGPUComputePassDescriptor desc = WGPU_COMPUTE_PASS_DESCRIPTOR_INIT;
      pass_ = wgpuCommandEncoderBeginComputePass(Encoder(), &desc);
    }
    return pass_;
  }

  // Room for ``bytes`` of scalars in the uniform ring: their offset (flushes when full).
  uint32_t RingAlloc(const void* data, size_t bytes) {
    uint64_t need = (bytes + uniform_align_ - 1) / uniform_align_ * uniform_align_;
    if (ring_used_ + need > kRingBytes) Flush();
    uint32_t offset = static_cast<uint32_t>(ring_used_);
    std::memcpy(ring_host_.data() + offset, data, bytes);
    ring_used_ += need;
    return offset;
  }

  WGPUBindGroup BindGroup(Dispatch* kernel, const std::vector<uint64_t>& key,
                          const std::vector<WGPUBindGroupEntry>& (*make)(Dispatch*, const std::vector<uint64_t>&));

  void Flush() {
    if (!encoder_) return;
    EndPass();
    if (ring_used_) wgpuQueueWriteBuffer(queue_, ring_, 0, ring_host_.data(), ring_used_);
    WGPUCommandBufferDescriptor desc = WGPU_COMMAND_BUFFER_DESCRIPTOR_INIT;
    WGPUCommandBuffer cmd = wgpuCommandEncoderFinish(encoder_, &desc);
    wgpuQueueSubmit(queue_, 1, &cmd);
    wgpuCommandBufferRelease(cmd);
    wgpuCommandEncoderRelease(encoder_);
    encoder_ = nullptr;
    ring_used_ = 0;
    CheckError("submitting kernels");
  }

  void CheckError(const char* what) {
    if (error_.empty()) return;
    std::string msg = error_;
    error_.clear();
    size_t nl = msg.find('\n');  // wgpu's messages run over several lines; keep them, lead with ours
    TVM_FFI_THROW(RuntimeError) << "Vulkan (wgpu) error while " << what << ": "
                                << (nl == std::string::npos ? msg : msg.substr(0, nl)) << " | " << msg;
  }

  std::map<std::vector<uint64_t>, WGPUBindGroup> bind_groups_;
  std::map<uint64_t, std::vector<std::vector<uint64_t>>> groups_of_buffer_;
  uint32_t uniform_align_ = 256;

 private:
  [[noreturn]] void Fail(std::string msg) {
    for (char& c : msg) {
      if (c == '\n') c = ' ';  // one line: wgpu's messages span several
    }
    init_error_ = msg;
    TVM_FFI_THROW(RuntimeError) << msg;
  }

  WGPUCommandEncoder Encoder() {
    if (!encoder_) {
      WGPUCommandEncoderDescriptor desc = WGPU_COMMAND_ENCODER_DESCRIPTOR_INIT;
      encoder_ = wgpuDeviceCreateCommandEncoder(device_, &desc);
    }
    return encoder_;
  }

  void EndPass() {
    if (pass_) {
      wgpuComputePassEncoderEnd(pass_);
      wgpuComputePassEncoderRelease(pass_);
      pass_ = nullptr;
    }
  }

  void DropBindGroups(uint64_t base) {
    auto it = groups_of_buffer_.find(base);
    if (it == groups_of_buffer_.end()) return;
    for (const auto& key : it->second) {
      auto g = bind_groups_.find(key);
      if (g != bind_groups_.end()) {
        wgpuBindGroupRelease(g->second);
        bind_groups_.erase(g);
      }
    }
    groups_of_buffer_.erase(it);
  }

  void ReadBack(WGPUBuffer src, uint64_t offset, uint64_t size, void* host) {
    if (staging_size_ < size) {
      if (staging_) wgpuBufferRelease(staging_);
      WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
      staging_size_ = std::max<uint64_t>(size, 1 << 16);
      desc.size = staging_size_;
      desc.usage = WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst;
      staging_ = wgpuDeviceCreateBuffer(device_, &desc);
    }
    EndPass();
    wgpuCommandEncoderCopyBufferToBuffer(Encoder(), src, offset, staging_, 0, size);
    Flush();
    WGPUBufferMapCallbackInfo cb = WGPU_BUFFER_MAP_CALLBACK_INFO_INIT;
    cb.mode = WGPUCallbackMode_AllowProcessEvents;
    map_status_ = -1;
    cb.callback = [](WGPUMapAsyncStatus status, WGPUStringView, void* self, void*) {
      static_cast<Context*>(self)->map_status_ = status == WGPUMapAsyncStatus_Success ? 1 : 0;
    };
    cb.userdata1 = this;
    wgpuBufferMapAsync(staging_, WGPUMapMode_Read, 0, size, cb);
    while (map_status_ < 0) {
      wgpuDevicePoll(device_, true, nullptr);
      wgpuInstanceProcessEvents(instance_);
    }
    CheckError("reading back a tensor");
    if (map_status_ != 1) TVM_FFI_THROW(RuntimeError) << "Vulkan: mapping a read-back buffer failed";
    std::memcpy(host, wgpuBufferGetConstMappedRange(staging_, 0, size), size);
    wgpuBufferUnmap(staging_);
  }

  std::mutex init_mutex_;
  std::string init_error_, adapter_name_, pending_message_, error_;
  volatile bool waiting_ = false;
  volatile int map_status_ = -1;
  WGPUInstance instance_ = nullptr;
  WGPUAdapter adapter_ = nullptr;
  WGPUDevice device_ = nullptr;
  WGPUQueue queue_ = nullptr;
  WGPULimits limits_ = WGPU_LIMITS_INIT;
  bool has_f16_ = false;
  WGPUCommandEncoder encoder_ = nullptr;
  WGPUComputePassEncoder pass_ = nullptr;
  WGPUBuffer ring_ = nullptr, staging_ = nullptr;
  uint64_t staging_size_ = 0, ring_used_ = 0;
  std::vector<uint8_t> ring_host_;
  std::map<uint64_t, Allocation> allocs_;
  uint64_t next_base_ = kAddressBase;
};

// ---- one kernel -------------------------------------------------------------------------------
enum class Pod : uint8_t { kInt, kUInt, kFloat };

struct Dispatch {
  std::string name;
  std::vector<bool> writes;  // per buffer argument
  std::vector<Pod> pods;     // per scalar argument
  std::vector<int> grid_dims;  // per launch argument: 0..2 blockIdx.xyz, 3..5 threadIdx.xyz
  WGPUComputePipeline pipeline = nullptr;
  WGPUBindGroupLayout layout = nullptr;
  uint32_t uniform_bytes = 0;
  std::vector<WGPUBindGroupEntry> entries;  // scratch for bind group creation
  uint64_t calls = 0;
  double seconds = 0;  // with profiling on: wall time of each dispatch run alone (submit + wait)

  void Call(ffi::PackedArgs args);
};

struct FunctionInfo {  // what TVM's serialized FunctionInfo holds, as the backend needs it
  std::vector<DLDataType> arg_types;
  std::vector<std::string> tags;
};

static const std::vector<WGPUBindGroupEntry>& MakeEntries(Dispatch* k, const std::vector<uint64_t>& key) {
  Context* ctx = Context::Global();
  k->entries.clear();
  for (size_t i = 0; i + 1 < key.size(); ++i) {
    uint64_t offset;
    const Allocation& a = ctx->Find(reinterpret_cast<void*>(key[i + 1]), &offset);
    if (offset % ctx->limits().minStorageBufferOffsetAlignment) {
      TVM_FFI_THROW(RuntimeError) << "kernel " << k->name << ": argument " << i << " starts " << offset
                                  << " bytes into its buffer, not a multiple of the adapter's storage alignment "
                                  << ctx->limits().minStorageBufferOffsetAlignment;
    }
    uint64_t size = a.padded - offset;
    if (size > ctx->limits().maxStorageBufferBindingSize) {
      TVM_FFI_THROW(RuntimeError) << "kernel " << k->name << ": a tensor of " << (size >> 20)
                                  << " MiB exceeds the Vulkan adapter's storage binding limit of "
                                  << (ctx->limits().maxStorageBufferBindingSize >> 20)
                                  << " MiB: lower --max-context (the KV cache is one tensor)";
    }
    WGPUBindGroupEntry e = WGPU_BIND_GROUP_ENTRY_INIT;
    e.binding = static_cast<uint32_t>(i);
    e.buffer = a.buffer;
    e.offset = offset;
    e.size = size;
    k->entries.push_back(e);
  }
  WGPUBindGroupEntry u = WGPU_BIND_GROUP_ENTRY_INIT;
  u.binding = static_cast<uint32_t>(key.size() - 1);
  u.buffer = ctx->ring();
  u.offset = 0;
  u.size = k->uniform_bytes;
  k->entries.push_back(u);
  return k->entries;
}

WGPUBindGroup Context::BindGroup(Dispatch* kernel, const std::vector<uint64_t>& key,
                                 const std::vector<WGPUBindGroupEntry>& (*make)(Dispatch*, const std::vector<uint64_t>&)) {
  auto it = bind_groups_.find(key);
  if (it != bind_groups_.end()) return it->second;
  const auto& entries = make(kernel, key);
  WGPUBindGroupDescriptor desc = WGPU_BIND_GROUP_DESCRIPTOR_INIT;
  desc.layout = kernel->layout;
  desc.entryCount = entries.size();
  desc.entries = entries.data();
  WGPUBindGroup group = wgpuDeviceCreateBindGroup(device_, &desc);
  CheckError(("binding the arguments of " + kernel->name).c_str());
  bind_groups_[key] = group;
  for (size_t i = 1; i < key.size(); ++i) {
    uint64_t offset;
    groups_of_buffer_[Find(reinterpret_cast<void*>(key[i]), &offset).base].push_back(key);
  }
  return group;
}

void Dispatch::Call(ffi::PackedArgs args) {
  Context* ctx = Context::Global();
  size_t nbuf = writes.size(), npod = pods.size();
  TVM_FFI_ICHECK_EQ(static_cast<size_t>(args.size()), nbuf + npod + grid_dims.size())
      << "kernel " << name << ": wrong number of arguments";
  // bind group key: this kernel, then its buffer handles
  thread_local std::vector<uint64_t> key;
  key.assign(1, reinterpret_cast<uint64_t>(this));
  for (size_t i = 0; i < nbuf; ++i) key.push_back(reinterpret_cast<uint64_t>(args[i].cast<void*>()));
  uint64_t work[6] = {1, 1, 1, 1, 1, 1};
  for (size_t i = 0; i < grid_dims.size(); ++i) work[grid_dims[i]] = args[nbuf + npod + i].cast<int64_t>();
  uint32_t podbuf[64] = {0};
  TVM_FFI_ICHECK_LE(npod + 1, 64u);
  for (size_t i = 0; i < npod; ++i) {
    const ffi::AnyView& v = args[nbuf + i];
    if (pods[i] == Pod::kFloat) {
      float f = static_cast<float>(v.cast<double>());
      std::memcpy(&podbuf[i], &f, 4);
    } else {
      podbuf[i] = static_cast<uint32_t>(v.cast<int64_t>());
    }
  }
  // fold a grid x >= 65536 into z (the shader recomputes x = z * gridDim.x + x). The generated
  // guard is `x > packGridDimX`, one too lax: pass the last valid index instead of the count
  TVM_FFI_ICHECK_EQ(work[2], 1u) << "kernel " << name << ": blockIdx.z is reserved by TVM's webgpu codegen";
  uint64_t total = work[0];
  if (total == 0 || work[1] == 0) return;
  uint64_t max_dim = ctx->limits().maxComputeWorkgroupsPerDimension;
  while (work[0] > max_dim) {
    work[0] = (work[0] + 1) / 2;
    work[2] *= 2;
  }
  podbuf[npod] = static_cast<uint32_t>(total - 1);
  uint32_t offset = ctx->RingAlloc(podbuf, (npod + 1) * 4);
  WGPUBindGroup group = ctx->BindGroup(this, key, &MakeEntries);
  WGPUComputePassEncoder pass = ctx->Pass();
  wgpuComputePassEncoderSetPipeline(pass, pipeline);
  wgpuComputePassEncoderSetBindGroup(pass, 0, group, 1, &offset);
  static const bool profile = std::getenv("TSEDGE_VULKAN_PROFILE") != nullptr;
  auto start = std::chrono::steady_clock::now();
  wgpuComputePassEncoderDispatchWorkgroups(pass, static_cast<uint32_t>(work[0]), static_cast<uint32_t>(work[1]),
                                           static_cast<uint32_t>(work[2]));
  ++calls;
  if (profile) {
    ctx->Sync();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
}

// Every kernel built in this process (for dispatch counts and profiles); kernels live as long as
// their module, and modules of a loaded library are never unloaded by the TVM runtime.
static std::vector<Dispatch*>& AllKernels() {
  static std::vector<Dispatch*> all;
  return all;
}

// {kernel name: [dispatches so far, seconds if profiled]}, summed over loaded libraries
static ffi::Map<ffi::String, ffi::Array<double>> DispatchCounts() {
  std::map<std::string, std::pair<double, double>> sums;
  for (const Dispatch* d : AllKernels()) {
    sums[d->name].first += static_cast<double>(d->calls);
    sums[d->name].second += d->seconds;
  }
  ffi::Map<ffi::String, ffi::Array<double>> out;
  for (const auto& kv : sums) out.Set(kv.first, ffi::Array<double>{kv.second.first, kv.second.second});
  return out;
}

// TVM's webgpu codegen prints float infinity as `inff` (f32) / `infh` (f16), which are not WGSL
// (WGSL has no infinity literal): spell them as bit patterns.
static std::string PatchInfinity(const std::string& wgsl) {
  auto ident = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  std::string out;
  out.reserve(wgsl.size());
  for (size_t i = 0; i < wgsl.size();) {
    bool at_word = i == 0 || !ident(wgsl[i - 1]);
    if (at_word && wgsl.compare(i, 3, "inf") == 0 && i + 4 <= wgsl.size() &&
        (wgsl[i + 3] == 'f' || wgsl[i + 3] == 'h') && (i + 4 == wgsl.size() || !ident(wgsl[i + 4]))) {
      out += wgsl[i + 3] == 'f' ? "bitcast<f32>(0x7f800000u)" : "bitcast<vec2<f16>>(0x7c00u)[0]";
      i += 4;
    } else {
      out += wgsl[i++];
    }
  }
  return out;
}

// ---- the module --------------------------------------------------------------------------------
class Reader {
 public:
  explicit Reader(const ffi::Bytes& b) : data_(b.data()), size_(b.size()) {}
  uint64_t U64() { return Pod<uint64_t>(); }
  std::string Str() {
    uint64_t n = U64();
    Need(n);
    std::string s(data_ + pos_, n);
    pos_ += n;
    return s;
  }
  template <typename T>
  T Pod() {
    Need(sizeof(T));
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

 private:
  void Need(uint64_t n) {
    if (pos_ + n > size_) TVM_FFI_THROW(RuntimeError) << "truncated webgpu module in the library";
  }
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

class WebGPUModule final : public ffi::ModuleObj {
 public:
  WebGPUModule(std::map<std::string, FunctionInfo> fmap, std::map<std::string, std::string> smap)
      : fmap_(std::move(fmap)), smap_(std::move(smap)) {}

  const char* kind() const final { return "webgpu"; }
  int GetPropertyMask() const final { return 0; }
  ffi::String InspectSource(const ffi::String&) const final {
    std::string all;
    for (const auto& kv : smap_) all += kv.second;
    return all;
  }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    std::string key(name);
    auto it = kernels_.find(key);
    if (it == kernels_.end()) {
      auto f = fmap_.find(key);
      auto s = smap_.find(key);
      if (f == fmap_.end() || s == smap_.end()) return std::nullopt;
      it = kernels_.emplace(key, Build(key, f->second, s->second)).first;
      AllKernels().push_back(it->second.get());
    }
    Dispatch* d = it->second.get();
    return ffi::Function([d](ffi::PackedArgs args, ffi::Any*) { d->Call(args); });
  }

 private:
  static std::unique_ptr<Dispatch> Build(const std::string& name, const FunctionInfo& info, const std::string& wgsl) {
    Context* ctx = Context::Global();
    ctx->Ensure();
    auto d = std::make_unique<Dispatch>();
    d->name = name;
    std::vector<int> write_access;
    for (const std::string& tag : info.tags) {
      if (tag.rfind("blockIdx.", 0) == 0) {
        d->grid_dims.push_back(tag.back() - 'x');
      } else if (tag.rfind("threadIdx.", 0) == 0) {
        d->grid_dims.push_back(3 + tag.back() - 'x');
      } else if (tag.rfind("paramWriteAccess:", 0) == 0) {
        std::string list = tag.substr(17);
        for (char c : list) {
          if (c == '0' || c == '1') write_access.push_back(c - '0');
        }
      } else {
        TVM_FFI_THROW(RuntimeError) << "kernel " << name << ": launch tag " << tag << " is not supported on Vulkan";
      }
    }
    for (const DLDataType& t : info.arg_types) {
      if (t.code == kDLOpaqueHandle) {
        d->writes.push_back(false);
      } else if (t.code == kDLInt) {
        d->pods.push_back(Pod::kInt);
      } else if (t.code == kDLUInt) {
        d->pods.push_back(Pod::kUInt);
      } else if (t.code == kDLFloat) {
        d->pods.push_back(Pod::kFloat);
      } else {
        TVM_FFI_THROW(RuntimeError) << "kernel " << name << ": argument type code " << int(t.code) << " unsupported";
      }
    }
    TVM_FFI_ICHECK_EQ(write_access.size(), d->writes.size()) << "kernel " << name << ": paramWriteAccess";
    for (size_t i = 0; i < write_access.size(); ++i) d->writes[i] = write_access[i] != 0;
    d->uniform_bytes = static_cast<uint32_t>((d->pods.size() + 1) * 4 + 15) / 16 * 16;

    std::vector<WGPUBindGroupLayoutEntry> entries;
    for (size_t i = 0; i < d->writes.size(); ++i) {
      WGPUBindGroupLayoutEntry e = WGPU_BIND_GROUP_LAYOUT_ENTRY_INIT;
      e.binding = static_cast<uint32_t>(i);
      e.visibility = WGPUShaderStage_Compute;
      e.buffer.type = d->writes[i] ? WGPUBufferBindingType_Storage : WGPUBufferBindingType_ReadOnlyStorage;
      entries.push_back(e);
    }
    WGPUBindGroupLayoutEntry u = WGPU_BIND_GROUP_LAYOUT_ENTRY_INIT;
    u.binding = static_cast<uint32_t>(d->writes.size());
    u.visibility = WGPUShaderStage_Compute;
    u.buffer.type = WGPUBufferBindingType_Uniform;
    u.buffer.hasDynamicOffset = true;
    entries.push_back(u);
    WGPUBindGroupLayoutDescriptor ldesc = WGPU_BIND_GROUP_LAYOUT_DESCRIPTOR_INIT;
    ldesc.entryCount = entries.size();
    ldesc.entries = entries.data();
    d->layout = wgpuDeviceCreateBindGroupLayout(ctx->device(), &ldesc);
    WGPUPipelineLayoutDescriptor pdesc = WGPU_PIPELINE_LAYOUT_DESCRIPTOR_INIT;
    pdesc.bindGroupLayoutCount = 1;
    pdesc.bindGroupLayouts = &d->layout;
    WGPUPipelineLayout playout = wgpuDeviceCreatePipelineLayout(ctx->device(), &pdesc);

    WGPUShaderSourceWGSL src = WGPU_SHADER_SOURCE_WGSL_INIT;
    std::string code = PatchInfinity(wgsl);
    src.code = View(code);
    WGPUShaderModuleDescriptor sdesc = WGPU_SHADER_MODULE_DESCRIPTOR_INIT;
    sdesc.nextInChain = &src.chain;
    WGPUShaderModule shader = wgpuDeviceCreateShaderModule(ctx->device(), &sdesc);
    ctx->CheckError(("compiling the WGSL of " + name).c_str());
    WGPUComputePipelineDescriptor cdesc = WGPU_COMPUTE_PIPELINE_DESCRIPTOR_INIT;
    cdesc.layout = playout;
    cdesc.compute.module = shader;
    cdesc.compute.entryPoint = View(name);
    d->pipeline = wgpuDeviceCreateComputePipeline(ctx->device(), &cdesc);
    ctx->CheckError(("creating the pipeline of " + name).c_str());
    wgpuShaderModuleRelease(shader);
    wgpuPipelineLayoutRelease(playout);
    return d;
  }

  std::map<std::string, FunctionInfo> fmap_;
  std::map<std::string, std::string> smap_;
  std::unordered_map<std::string, std::unique_ptr<Dispatch>> kernels_;
};

// TVM's serialization of the webgpu module: map<name, FunctionInfo>, then map<name, WGSL>; a
// string is a u64 length and its bytes, an array a u64 count and its items, a DLDataType 4 bytes
static ffi::Module LoadFromBytes(const ffi::Bytes& bytes) {
  Reader r(bytes);
  std::map<std::string, FunctionInfo> fmap;
  for (uint64_t n = r.U64(); n > 0; --n) {
    std::string key = r.Str();
    FunctionInfo info;
    r.Str();  // name
    for (uint64_t k = r.U64(); k > 0; --k) info.arg_types.push_back(r.Pod<DLDataType>());
    for (uint64_t k = r.U64(); k > 0; --k) info.tags.push_back(r.Str());
    for (uint64_t k = r.U64(); k > 0; --k) r.Pod<int32_t>();  // arg_extra_tags: none on webgpu
    fmap.emplace(key, std::move(info));
  }
  std::map<std::string, std::string> smap;
  for (uint64_t n = r.U64(); n > 0; --n) {
    std::string key = r.Str();
    smap.emplace(key, r.Str());
  }
  return ffi::Module(ffi::make_object<WebGPUModule>(std::move(fmap), std::move(smap)));
}

// ---- the device API ----------------------------------------------------------------------------
class WebGPUDeviceAPI final : public DeviceAPI {
 public:
  void SetDevice(DLDevice) final {}
  void GetAttr(DLDevice dev, DeviceAttrKind kind, ffi::Any* rv) final {
    Context* ctx = Context::Global();
    if (kind == tvm::runtime::kExist) {
      *rv = dev.device_id == 0 && ctx->Exists() ? 1 : 0;
      return;
    }
    ctx->Ensure();
    const WGPULimits& l = ctx->limits();
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock: *rv = static_cast<int64_t>(l.maxComputeInvocationsPerWorkgroup); break;
      case tvm::runtime::kWarpSize: *rv = 1; break;
      case tvm::runtime::kMaxSharedMemoryPerBlock: *rv = static_cast<int64_t>(l.maxComputeWorkgroupStorageSize); break;
      case tvm::runtime::kDeviceName: *rv = ffi::String(ctx->Describe()); break;
      default: break;
    }
  }
  void* AllocDataSpace(DLDevice, size_t nbytes, size_t, DLDataType) final { return Context::Global()->Alloc(nbytes); }
  void FreeDataSpace(DLDevice, void* ptr) final { Context::Global()->Free(ptr); }
  void StreamSync(DLDevice, TVMStreamHandle) final { Context::Global()->Sync(); }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset, size_t size,
                      DLDevice dev_from, DLDevice dev_to, DLDataType, TVMStreamHandle) final {
    Context* ctx = Context::Global();
    int src = static_cast<int>(dev_from.device_type), dst = static_cast<int>(dev_to.device_type);
    if (src == kWebGPU && dst == kWebGPU) {
      ctx->CopyWithin(from, from_offset, to, to_offset, size);
    } else if (src == kWebGPU && dst == kDLCPU) {
      ctx->CopyToHost(from, from_offset, static_cast<uint8_t*>(to) + to_offset, size);
    } else if (src == kDLCPU && dst == kWebGPU) {
      ctx->CopyToDevice(static_cast<const uint8_t*>(from) + from_offset, to, to_offset, size);
    } else {
      TVM_FFI_THROW(RuntimeError) << "webgpu copies go between the Vulkan device and the CPU";
    }
  }

 public:
  static WebGPUDeviceAPI* Global() {
    static WebGPUDeviceAPI* inst = new WebGPUDeviceAPI();
    return inst;
  }
};

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("ffi.Module.load_from_bytes.webgpu", LoadFromBytes)
      .def_packed("device_api.webgpu",
                  [](ffi::PackedArgs, ffi::Any* rv) { *rv = static_cast<void*>(WebGPUDeviceAPI::Global()); })
      .def("tsedge.vulkan.dispatch_counts", DispatchCounts)
      .def("tsedge.vulkan.describe", []() { return ffi::String(Context::Global()->Describe()); })
      .def("tsedge.vulkan.shader_f16", []() {
        Context::Global()->Ensure();
        return Context::Global()->has_f16();
      });
}

}  // namespace vulkan
}  // namespace tsedge
