// What one kernel launch costs, by factor: an empty kernel (and ones with 184- and 1136-byte
// parameters, 40 KB of shared memory, two kernels alternating, dependent launches), 100 launches
// behind a spin kernel that holds the stream, timed three ways: events around each launch (as
// ep-bench times a call), back to back between one pair of events, replayed from a graph; and
// the host's time per launch. On the GPU machine (CUDA toolkit there):
//   nvcc -O2 -arch=sm_90 -o /tmp/launch-cost scripts/launch-cost.cu -lcuda && /tmp/launch-cost
// Session 18 on an H200: 3.3-3.6 us a launch between events, 1.3-1.6 back to back, 0.5-0.8 in a
// graph, 0.9-1.0 dependent; host 4.5-6.0 us a launch (docs/performance.md).
#include <cuda.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

struct Big { unsigned long long w[142]; };   // 1136 B, like EpArgs at R = 8
struct Mid { unsigned long long w[23]; };    // 184 B, like EpArgs at R = 1

__global__ void spin(long long ns) { long long t0 = clock64(); while (clock64() - t0 < ns * 2) {} }
__global__ void k_empty(int* p) { if (p && threadIdx.x == 1000) p[0] = 1; }
__global__ void k_big(Big b) { if (b.w[141] == 12345 && threadIdx.x == 1000) ((int*)b.w[0])[0] = 1; }
__global__ void k_mid(Mid b) { if (b.w[22] == 12345 && threadIdx.x == 1000) ((int*)b.w[0])[0] = 1; }
__global__ void k_smem(int* p) {
  __shared__ int s[10240];   // 40 KB
  s[threadIdx.x] = threadIdx.x; __syncthreads();
  if (p && s[(threadIdx.x + 1) % blockDim.x] == 1000000) p[0] = 1;
}
__global__ void k_pdl(int* p) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (p && threadIdx.x == 1000) p[0] = 1;
}

static float median(std::vector<float> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

typedef void (*Launch)(cudaStream_t, int);
static int G = 1, T = 256;
static Big big;
static Mid mid;
static void l_mid(cudaStream_t s, int) { k_mid<<<G, T, 0, s>>>(mid); }

static void l_empty(cudaStream_t s, int) { k_empty<<<G, T, 0, s>>>(nullptr); }
static void l_big(cudaStream_t s, int) { k_big<<<G, T, 0, s>>>(big); }
static void l_alt(cudaStream_t s, int i) { if (i & 1) k_smem<<<G, T, 0, s>>>(nullptr); else k_empty<<<G, T, 0, s>>>(nullptr); }
static void l_smem(cudaStream_t s, int) { k_smem<<<G, T, 0, s>>>(nullptr); }
static void l_pdl(cudaStream_t s, int) {
  cudaLaunchConfig_t c = {}; c.gridDim = G; c.blockDim = T; c.stream = s;
  cudaLaunchAttribute a[1]; a[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; a[0].val.programmaticStreamSerializationAllowed = 1;
  c.attrs = a; c.numAttrs = 1; cudaLaunchKernelEx(&c, k_pdl, (int*)nullptr);
}

static void run(const char* name, Launch f) {
  cudaStream_t s; cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  const int N = 100;
  std::vector<cudaEvent_t> ev(2 * N + 2);
  for (auto& e : ev) cudaEventCreate(&e);
  for (int i = 0; i < 10; i++) f(s, i);
  cudaStreamSynchronize(s);
  // per call, events around each
  std::vector<float> per;
  for (int rep = 0; rep < 4; rep++) {
    spin<<<1, 1, 0, s>>>(20000000);
    for (int i = 0; i < 25; i++) { cudaEventRecord(ev[2 * i], s); f(s, i); cudaEventRecord(ev[2 * i + 1], s); }
    cudaStreamSynchronize(s);
    for (int i = 0; i < 25; i++) { float ms; cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]); per.push_back(ms * 1000); }
  }
  // back to back, one event pair
  spin<<<1, 1, 0, s>>>(20000000);
  cudaEventRecord(ev[0], s);
  auto h0 = std::chrono::steady_clock::now();
  for (int i = 0; i < N; i++) f(s, i);
  double host = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count() / N;
  cudaEventRecord(ev[1], s);
  cudaStreamSynchronize(s);
  float b2b; cudaEventElapsedTime(&b2b, ev[0], ev[1]);
  // graph
  cudaGraph_t g; cudaGraphExec_t ge;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  for (int i = 0; i < N; i++) f(s, i);
  cudaStreamEndCapture(s, &g);
  cudaGraphInstantiate(&ge, g, 0);
  cudaGraphLaunch(ge, s); cudaStreamSynchronize(s);
  spin<<<1, 1, 0, s>>>(20000000);
  cudaEventRecord(ev[0], s); cudaGraphLaunch(ge, s); cudaEventRecord(ev[1], s);
  cudaStreamSynchronize(s);
  float gr; cudaEventElapsedTime(&gr, ev[0], ev[1]);
  cudaError_t e = cudaGetLastError();
  printf("%-10s G=%3d  per-call(events) %6.2f us   back-to-back %6.2f us   graph %6.2f us  host/launch %5.2f us %s\n", name, G,
         median(per), b2b * 1000 / N, gr * 1000 / N, host, e ? cudaGetErrorString(e) : "");
}

int main() {
  big.w[0] = 0;
  for (int g : {1, 132}) {
    G = g;
    run("empty", l_empty); run("mid184", l_mid); run("big1136", l_big); run("smem40k", l_smem); run("alt", l_alt); run("pdl", l_pdl);
  }
  cudaFuncSetAttribute(k_empty, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  cudaFuncSetAttribute(k_smem, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  G = 132; run("alt-c100", l_alt);
  return 0;
}
