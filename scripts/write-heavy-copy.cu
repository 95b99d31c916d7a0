// Write-heavy copy probe (no library): the HT flat dispatch's traffic at 8 virtual ranks (each
// source row read once, written to each of its destination ranks' rows; `ll` as the second
// argument: LL expert-major, every token to 8 slots), moved by warps of 16-byte loads and stores
// (the library's way, in row pieces) and by the bulk-copy engine (TMA: a chunk staged in shared
// memory, one bulk store per destination), against the floor of the same bytes at the measured
// copy bandwidth. On the GPU machine:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/whc scripts/write-heavy-copy.cu && /tmp/whc 4096 && /tmp/whc 7168 ll
// An H100 80GB HBM3 (session 49; copy 3031 GB/s), % of floor: hidden 4096 (ht-4k's rows) 16-byte
// copies 87.6-88.1, bulk 89.0-90.1 (best: 16 warps, 2 stages of 2 KB, one block an SM); hidden 7168
// 88.6-88.8 against 89.4-90.2; writes alone 117-119 (the HBM takes writes faster than copies). The
// LL shape with one warp a row: 71 % against 77-82 % (too few warps for the 16-byte copies; the
// library cuts LL rows into pieces: the 16-byte copies now run with 1, 2, 4 and 7 pieces a row too,
// not yet measured).
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

struct __align__(16) V { unsigned x, y, z, w; };

__device__ __forceinline__ V ldcg(const void* p) {
  V v; asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p)); return v;
}
__device__ __forceinline__ void st(void* p, V v) {
  asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};" :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// rows[t * R + d]: destination row of token t at rank d, or -1. dst: R buffers of cap rows.
template <int UNROLL>
__global__ void __launch_bounds__(512, 2) warp_copy(const char* src, char* const* dst, const int* rows, int tokens, int R, int row_bytes, int pieces) {
  const int lane = threadIdx.x % 32, warps = gridDim.x * (blockDim.x / 32);
  const int all_vecs = row_bytes / 16, per = (all_vecs + pieces - 1) / pieces;
  __shared__ unsigned long long table[16][32];
  const int w = threadIdx.x / 32;
  for (int item = blockIdx.x * (blockDim.x / 32) + w; item < tokens * pieces; item += warps) {
    const int t = item / pieces, p0 = (item % pieces) * per, vecs = min(all_vecs, p0 + per);
    unsigned long long a = 0;
    if (lane < R) { int r = rows[t * R + lane]; if (r >= 0) a = (unsigned long long)(dst[lane] + (size_t)r * row_bytes); }
    table[w][lane] = a;
    __syncwarp();
    const char* s = src + (size_t)t * row_bytes;
    for (int v = p0 + lane; v < vecs; v += 32 * UNROLL) {
      V x[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) if (v + 32 * u < vecs) x[u] = ldcg(s + (size_t)(v + 32 * u) * 16);
      for (int d = 0; d < R; ++d) {
        char* p = (char*)table[w][d];
        if (!p) continue;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) if (v + 32 * u < vecs) st(p + (size_t)(v + 32 * u) * 16, x[u]);
      }
    }
    __syncwarp();
  }
}

__device__ __forceinline__ unsigned smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* b) { asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem(b))); }
__device__ __forceinline__ void mbar_expect(unsigned long long* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity) {
  asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}" :: "r"(smem(b)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_load(void* s, const void* g, unsigned bytes, unsigned long long* b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem(s)), "l"(g), "r"(bytes), "r"(smem(b)) : "memory");
}
__device__ __forceinline__ void bulk_store(void* g, const void* s, unsigned bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(g), "r"(smem(s)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;" :: "n"(N) : "memory"); }
template <int N> __device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;" :: "n"(N) : "memory"); }

// A warp per token, STAGES row buffers of `stage` bytes in shared memory per warp; a token's row is
// cut into pieces of at most `stage` bytes. Lane 0 loads; lanes < R each store to their destination.
template <int STAGES>
__global__ void tma_copy(const char* src, char* const* dst, const int* rows, int tokens, int R, int row_bytes, int stage) {
  extern __shared__ __align__(128) char buf[];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32, wpb = blockDim.x / 32;
  const int warps = gridDim.x * wpb;
  __shared__ unsigned long long bars[32][STAGES];
  char* mine = buf + (size_t)w * STAGES * stage;
  if (lane == 0) for (int s = 0; s < STAGES; ++s) mbar_init(&bars[w][s]);
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncwarp();
  const int pieces = (row_bytes + stage - 1) / stage;
  // items: (token, piece) of this warp in order
  long long first = blockIdx.x * wpb + w;
  const long long total = (long long)tokens * pieces;
  // Each warp's items: first, first + warps, ...; item j of the warp goes to stage j % STAGES.
  int issued = 0, done = 0;
  auto item_of = [&](int j) { return first + (long long)j * warps; };
  // Prologue: fill the stages.
  for (; issued < STAGES && item_of(issued) < total; ++issued) {
    long long it = item_of(issued);
    int t = (int)(it / pieces), p = (int)(it % pieces);
    int off = p * stage, bytes = min(stage, row_bytes - off);
    if (lane == 0) { mbar_expect(&bars[w][issued % STAGES], bytes); bulk_load(mine + (issued % STAGES) * stage, src + (size_t)t * row_bytes + off, bytes, &bars[w][issued % STAGES]); }
  }
  while (done < issued) {
    const int s = done % STAGES;
    long long it = item_of(done);
    int t = (int)(it / pieces), p = (int)(it % pieces);
    int off = p * stage, bytes = min(stage, row_bytes - off);
    int r = lane < R ? rows[t * R + lane] : -1;
    mbar_wait(&bars[w][s], (done / STAGES) & 1);
    if (r >= 0) bulk_store(dst[lane] + (size_t)r * row_bytes + off, mine + s * stage, bytes);
    bulk_commit();
    ++done;
    // Refill stage s with item `issued` once the stores reading it are done (this lane's groups).
    if (item_of(issued) < total) {
      bulk_wait_read<0>();
      __syncwarp();
      long long it2 = item_of(issued);
      int t2 = (int)(it2 / pieces), p2 = (int)(it2 % pieces);
      int off2 = p2 * stage, bytes2 = min(stage, row_bytes - off2);
      if (lane == 0) { mbar_expect(&bars[w][s], bytes2); bulk_load(mine + s * stage, src + (size_t)t2 * row_bytes + off2, bytes2, &bars[w][s]); }
      ++issued;
    }
  }
  bulk_wait<0>();
}

// Pure writes: every destination row written with 16-byte stores (the write ceiling).
__global__ void __launch_bounds__(512, 2) write_only(char* const* dst, const int* rows, int tokens, int R, int row_bytes) {
  const int lane = threadIdx.x % 32, warps = gridDim.x * (blockDim.x / 32);
  const int vecs = row_bytes / 16;
  V z = {1u, 2u, 3u, 4u};
  for (int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; t < tokens; t += warps)
    for (int d = 0; d < R; ++d) {
      int r = rows[t * R + d];
      if (r < 0) continue;
      char* p = dst[d] + (size_t)r * row_bytes;
      for (int v = lane; v < vecs; v += 32) st(p + (size_t)v * 16, z);
    }
}

int main(int argc, char** argv) {
  const bool ll = argc > 2;   // LL expert-major: every token to 8 slots
  int R = 8, tokens_per = ll ? 128 : 4096, hidden = argc > 1 ? atoi(argv[1]) : 4096, K = 8, E = 256;
  int row_bytes = hidden * 2, tokens = R * tokens_per;
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::mt19937 g(7);
  std::vector<int> rows(tokens * R, -1), fill(R, 0);
  long long pairs = 0;
  for (int t = 0; t < tokens; ++t) {
    std::vector<int> ex(E); for (int i = 0; i < E; ++i) ex[i] = i;
    std::shuffle(ex.begin(), ex.end(), g);
    bool to[64] = {false};
    for (int k = 0; k < K; ++k) to[ex[k] / (E / R)] = true;
    for (int d = 0; d < R; ++d) if (to[d] || ll) { rows[t * R + d] = fill[d]++; ++pairs; }
  }
  int cap = *std::max_element(fill.begin(), fill.end());
  char* src; CK(cudaMalloc(&src, (size_t)tokens * row_bytes)); CK(cudaMemset(src, 1, (size_t)tokens * row_bytes));
  std::vector<char*> d(R); for (auto& p : d) { CK(cudaMalloc(&p, (size_t)cap * row_bytes)); CK(cudaMemset(p, 0, (size_t)cap * row_bytes)); }
  char** dd; CK(cudaMalloc(&dd, R * sizeof(char*))); CK(cudaMemcpy(dd, d.data(), R * sizeof(char*), cudaMemcpyHostToDevice));
  int* rr; CK(cudaMalloc(&rr, rows.size() * 4)); CK(cudaMemcpy(rr, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice));
  // Copy bandwidth: 2 GiB device-to-device.
  size_t big = (size_t)2 << 30; char *a, *b; CK(cudaMalloc(&a, big)); CK(cudaMalloc(&b, big)); CK(cudaMemset(a, 3, big)); CK(cudaMemset(b, 0, big));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  auto timeit = [&](auto&& f, int reps) {
    f(); CK(cudaDeviceSynchronize());
    std::vector<float> ms;
    for (int i = 0; i < reps; ++i) { CK(cudaEventRecord(e0)); f(); CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1)); float m; CK(cudaEventElapsedTime(&m, e0, e1)); ms.push_back(m); }
    CK(cudaGetLastError());
    std::sort(ms.begin(), ms.end()); return ms[ms.size() / 2] * 1000.0f;
  };
  float copy_us = timeit([&] { CK(cudaMemcpyAsync(b, a, big, cudaMemcpyDeviceToDevice)); }, 10);
  double bw = 2.0 * big / (copy_us * 1e-6) / 1e9;
  double bytes = (double)tokens * row_bytes + (double)pairs * row_bytes;
  double floor_us = bytes / (bw * 1e3);
  printf("%s hidden %d tokens %d pairs %lld (%.2f/token) copy %.0f GB/s floor %.1f us\n", ll ? "LL" : "HT", hidden, tokens, pairs, (double)pairs / tokens, bw, floor_us);
  auto check = [&](const char* name) {
    // every destination row equals its source row (sources are all bytes 1: check a sample of rows' ends)
    std::vector<char> h(row_bytes);
    int bad = 0;
    for (int t = 0; t < tokens; t += 997) for (int q = 0; q < R; ++q) { int r = rows[t * R + q]; if (r < 0) continue;
      CK(cudaMemcpy(h.data(), d[q] + (size_t)r * row_bytes, row_bytes, cudaMemcpyDeviceToHost));
      for (int i = 0; i < row_bytes; ++i) if (h[i] != 1) { ++bad; break; } }
    if (bad) printf("  %s: %d rows wrong\n", name, bad);
  };
  auto report = [&](const char* name, float us) { printf("%-28s %8.1f us  %5.1f %% of floor\n", name, us, 100.0 * floor_us / us); };
  for (auto& p : d) CK(cudaMemset(p, 0, (size_t)cap * row_bytes));
  for (int pieces : {1, 2, 4, 7}) {
    char name[64]; snprintf(name, 64, "warp copy unroll 4 pieces %d", pieces);
    for (auto& p : d) CK(cudaMemset(p, 0, (size_t)cap * row_bytes));
    report(name, timeit([&] { warp_copy<4><<<2 * sms, 512>>>(src, dd, rr, tokens, R, row_bytes, pieces); }, 20)); check(name);
  }
  report("warp copy unroll 8", timeit([&] { warp_copy<8><<<2 * sms, 512>>>(src, dd, rr, tokens, R, row_bytes, 1); }, 20));
  report("write only", timeit([&] { write_only<<<2 * sms, 512>>>(dd, rr, tokens, R, row_bytes); }, 20));
  struct Cfg { int warps, stage, blocks; };
  auto tma = [&](auto kernel, int stages, std::initializer_list<Cfg> cfgs) {
    for (Cfg c : cfgs) {
      size_t sm_bytes = (size_t)c.warps * stages * c.stage;
      CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm_bytes));
      for (auto& p : d) CK(cudaMemset(p, 0, (size_t)cap * row_bytes));
      char name[64]; snprintf(name, 64, "tma%d w%d stage %d x%d/SM", stages, c.warps, c.stage, c.blocks);
      report(name, timeit([&] { kernel<<<c.blocks * sms, c.warps * 32, sm_bytes>>>(src, dd, rr, tokens, R, row_bytes, c.stage); }, 20));
      check(name);
    }
  };
  tma(tma_copy<2>, 2, {Cfg{16, 1024, 2}, Cfg{16, 512, 2}, Cfg{8, 1024, 4}, Cfg{4, 4096, 3}, Cfg{4, 8192, 1}, Cfg{8, 4096, 1},
                       Cfg{2, 8192, 3}, Cfg{4, 2048, 6}, Cfg{8, 2048, 3}, Cfg{16, 2048, 1}});
  tma(tma_copy<3>, 3, {Cfg{4, 4096, 2}, Cfg{4, 2048, 4}});
  return 0;
}
