#include "ep_shim.h"

typedef int (*ep_comm_init_rank_fn)(void**, int, ep_nccl_unique_id, int);
typedef int (*ep_ipc_open_fn)(unsigned long long*, ep_cu_ipc_mem_handle, unsigned int);

int ep_shim_nccl_comm_init_rank(const void* function, void** comm, int nranks, const ep_nccl_unique_id* id, int rank) {
    return ((ep_comm_init_rank_fn)function)(comm, nranks, *id, rank);
}

int ep_shim_cu_ipc_open_mem_handle(const void* function, unsigned long long* pointer, const ep_cu_ipc_mem_handle* handle,
                                   unsigned int flags) {
    return ((ep_ipc_open_fn)function)(pointer, *handle, flags);
}

// Sum of the bytes weighted by position, so a shifted or truncated copy gives another value.
static unsigned long long ep_checksum(const char* bytes, int count) {
    unsigned long long sum = 0;
    for (int i = 0; i < count; ++i) sum += (unsigned long long)(unsigned char)bytes[i] * (unsigned long long)(i + 1);
    return sum;
}

int ep_shim_test_checksum_unique_id(void** out, int nranks, ep_nccl_unique_id id, int rank) {
    *out = (void*)(ep_checksum(id.internal, 128) + (unsigned long long)nranks * 1000003ull + (unsigned long long)rank);
    return 0;
}

int ep_shim_test_checksum_ipc_handle(unsigned long long* out, ep_cu_ipc_mem_handle handle, unsigned int flags) {
    *out = ep_checksum(handle.reserved, 64) * 10ull + flags;
    return 0;
}
