#define _GNU_SOURCE
#include "ep_shim.h"

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif
#ifndef PR_SET_PTRACER_ANY
#define PR_SET_PTRACER_ANY ((unsigned long)-1)
#endif

typedef int (*ep_comm_init_rank_fn)(void**, int, ep_nccl_unique_id, int);
typedef int (*ep_comm_init_rank_config_fn)(void**, int, ep_nccl_unique_id, int, ep_nccl_config*);
typedef int (*ep_ipc_open_fn)(unsigned long long*, ep_cu_ipc_mem_handle, unsigned int);

int ep_shim_nccl_comm_init_rank(const void* function, void** comm, int nranks, const ep_nccl_unique_id* id, int rank) {
    return ((ep_comm_init_rank_fn)function)(comm, nranks, *id, rank);
}

int ep_shim_cu_ipc_open_mem_handle(const void* function, unsigned long long* pointer, const ep_cu_ipc_mem_handle* handle,
                                   unsigned int flags) {
    return ((ep_ipc_open_fn)function)(pointer, *handle, flags);
}

ep_nccl_config ep_shim_nccl_config(int blocking) {
    ep_nccl_config config;
    config.size = sizeof(ep_nccl_config);
    config.magic = 0xcafebeef;
    config.version = 21400;   // NCCL_VERSION(2, 14, 0): the fields above are all it reads
    config.blocking = blocking;
    config.cgaClusterSize = INT_MIN;   // NCCL_CONFIG_UNDEF_INT
    config.minCTAs = INT_MIN;
    config.maxCTAs = INT_MIN;
    config.netName = NULL;
    config.splitShare = INT_MIN;
    return config;
}

int ep_shim_nccl_comm_init_rank_config(const void* function, void** comm, int nranks, const ep_nccl_unique_id* id, int rank,
                                       ep_nccl_config* config) {
    return ((ep_comm_init_rank_config_fn)function)(comm, nranks, *id, rank, config);
}

int ep_shim_allow_fd_taking(void) {
    return prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0) == 0 || errno == EINVAL ? 0 : -errno;
}

int ep_shim_forbid_fd_taking(void) {
    return prctl(PR_SET_PTRACER, 0, 0, 0, 0) == 0 || errno == EINVAL ? 0 : -errno;
}

int ep_shim_take_fd(int pid, int fd) {
    int process = (int)syscall(SYS_pidfd_open, pid, 0);
    if (process < 0) return -errno;
    int taken = (int)syscall(SYS_pidfd_getfd, process, fd, 0);
    int error = errno;
    close(process);
    return taken < 0 ? -error : taken;
}

void ep_shim_close_fd(int fd) { close(fd); }

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
