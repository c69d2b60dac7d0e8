// One-shot all-reduce over peer-mapped GPU memory (NVLink/PCIe P2P) for a decode step's small
// tensors: each rank copies its float16 tensor into its own shared buffer, raises a flag in every
// peer's flag array, waits for all peers' flags, then sums every rank's buffer in rank order (the
// same order on every rank: identical results) plus an optional residual, in float32, rounded once.
// The technique of vLLM's and TensorRT-LLM's custom all-reduce; one block, so small sizes only.
//
// bufs[r]: rank r's buffer (2 slots of slot_vecs 16-byte vectors: calls alternate, so a rank one
// call ahead never overwrites what a slower peer still reads); flags[r]: rank r's flag array
// (one uint32 per peer); epoch: this rank's call count, in its own memory (advanced by the
// kernel, so CUDA graph replays keep counting).

struct __align__(16) Vec {  // 8 float16 values (no headers: NVRTC compiles this as is)
  unsigned int x, y, z, w;
};

__device__ __forceinline__ float h2f(unsigned short h) {
  float f;
  asm volatile("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned int f2h2(float lo, float hi) {
  unsigned short a, b;
  asm volatile("cvt.rn.f16.f32 %0, %1;" : "=h"(a) : "f"(lo));
  asm volatile("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(hi));
  return (unsigned int)a | ((unsigned int)b << 16);
}

__device__ __forceinline__ Vec load_volatile(const Vec* p) {
  Vec v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void accumulate(float* acc, Vec v) {
  unsigned int w[4] = {v.x, v.y, v.z, v.w};
  for (int j = 0; j < 4; ++j) {
    acc[2 * j] += h2f((unsigned short)(w[j] & 0xFFFF));
    acc[2 * j + 1] += h2f((unsigned short)(w[j] >> 16));
  }
}

extern "C" __global__ void __launch_bounds__(1024)
tsedge_p2p_allreduce_f16(const Vec* x, const Vec* residual, Vec* out, int vecs,
                         const unsigned long long* bufs, const unsigned long long* flags,
                         unsigned int* epoch_ptr, int rank, int nranks, int slot_vecs) {
  const unsigned int epoch = *epoch_ptr + 1;
  const int slot = (epoch & 1) * slot_vecs;
  Vec* mine = reinterpret_cast<Vec*>(bufs[rank]) + slot;
  for (int i = threadIdx.x; i < vecs; i += blockDim.x) mine[i] = x[i];
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < nranks) {
    volatile unsigned int* theirs = reinterpret_cast<volatile unsigned int*>(flags[threadIdx.x]);
    theirs[rank] = epoch;  // my data of this call is in place
    volatile unsigned int* own = reinterpret_cast<volatile unsigned int*>(flags[rank]);
    while (own[threadIdx.x] < epoch) {
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (residual != nullptr) accumulate(acc, residual[i]);
    for (int r = 0; r < nranks; ++r) {
      accumulate(acc, load_volatile(reinterpret_cast<const Vec*>(bufs[r]) + slot + i));
    }
    Vec sum;
    sum.x = f2h2(acc[0], acc[1]);
    sum.y = f2h2(acc[2], acc[3]);
    sum.z = f2h2(acc[4], acc[5]);
    sum.w = f2h2(acc[6], acc[7]);
    out[i] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) *epoch_ptr = epoch;
}
