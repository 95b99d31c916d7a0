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

/// For tests: functions with the same shapes, which report what they received.
int ep_shim_test_checksum_unique_id(void** out, int nranks, ep_nccl_unique_id id, int rank);
int ep_shim_test_checksum_ipc_handle(unsigned long long* out, ep_cu_ipc_mem_handle handle, unsigned int flags);

#ifdef __cplusplus
}
#endif

#endif
