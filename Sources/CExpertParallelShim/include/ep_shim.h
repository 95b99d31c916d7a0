// Calls into NCCL and the CUDA driver whose C signatures take a struct by value, which Swift's
// @convention(c) function types cannot declare. Each trampoline receives the function pointer
// that the Swift side resolved with dlsym, and the struct by address.
#ifndef EP_SHIM_H
#define EP_SHIM_H

#ifdef __cplusplus
extern "C" {
#endif

/// `ncclUniqueId` (nccl.h: `typedef struct { char internal[128]; } ncclUniqueId;`).
typedef struct { char internal[128]; } ep_nccl_unique_id;

/// `CUipcMemHandle` (cuda.h: `typedef struct CUipcMemHandle_st { char reserved[64]; } CUipcMemHandle;`).
typedef struct { char reserved[64]; } ep_cu_ipc_mem_handle;

/// `ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank)`.
int ep_shim_nccl_comm_init_rank(const void* function, void** comm, int nranks, const ep_nccl_unique_id* id, int rank);

/// `cuIpcOpenMemHandle_v2(CUdeviceptr* pdptr, CUipcMemHandle handle, unsigned int flags)`.
int ep_shim_cu_ipc_open_mem_handle(const void* function, unsigned long long* pointer, const ep_cu_ipc_mem_handle* handle,
                                   unsigned int flags);

/// The leading fields of `ncclConfig_t` (nccl.h, stable since NCCL 2.14): NCCL reads `size`
/// and `version` to learn how many fields follow; the rest keep their defaults.
typedef struct {
    unsigned long size;
    unsigned int magic;
    unsigned int version;
    int blocking;
    int cgaClusterSize;
    int minCTAs;
    int maxCTAs;
    const char* netName;
    int splitShare;
} ep_nccl_config;

/// An `ep_nccl_config` as `NCCL_CONFIG_INITIALIZER` makes it, with `blocking` set.
ep_nccl_config ep_shim_nccl_config(int blocking);

/// `ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank, ncclConfig_t* config)`.
int ep_shim_nccl_comm_init_rank_config(const void* function, void** comm, int nranks, const ep_nccl_unique_id* id, int rank,
                                       ep_nccl_config* config);

/// Lets any process of this user take file descriptors from this one (`prctl(PR_SET_PTRACER, ANY)`),
/// which `ep_shim_take_fd` needs where Yama restricts ptrace to descendants. 0, or -errno.
int ep_shim_allow_fd_taking(void);

/// Undoes `ep_shim_allow_fd_taking` (`prctl(PR_SET_PTRACER, 0)`). 0, or -errno.
int ep_shim_forbid_fd_taking(void);

/// A duplicate, in this process, of file descriptor `fd` of process `pid` (`pidfd_open` +
/// `pidfd_getfd`, Linux 5.6+). The descriptor, or -errno.
int ep_shim_take_fd(int pid, int fd);

/// `close(fd)`.
void ep_shim_close_fd(int fd);

/// For tests: functions with the same shapes, which report what they received.
int ep_shim_test_checksum_unique_id(void** out, int nranks, ep_nccl_unique_id id, int rank);
int ep_shim_test_checksum_ipc_handle(unsigned long long* out, ep_cu_ipc_mem_handle handle, unsigned int flags);

#ifdef __cplusplus
}
#endif

#endif
