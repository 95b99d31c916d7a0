// Holds a stream for a while, so that a benchmark can enqueue many calls before the GPU runs
// them: the CUDA events around each call then time the GPU's work, not the host's enqueueing.

extern "C" __global__ void ep_delay(ep_u64 nanoseconds) {
    const ep_u64 start = ep_globaltimer_ns();
    while (ep_globaltimer_ns() - start < nanoseconds) {
    }
}
