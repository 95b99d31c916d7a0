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

/// `CUlaunchAttribute` (cuda.h, CUDA 12+): an id padded to 8 bytes, then a 64-byte value union
/// of which only `programmaticStreamSerializationAllowed` (an int at its start) is used here.
typedef struct {
    unsigned int id;
    char pad[4];
    union {
        int programmaticStreamSerializationAllowed;
        char bytes[64];
    } value;
} ep_cu_launch_attribute;

/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`.
#define EP_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION 6

/// `CUlaunchConfig` (cuda.h, CUDA 12+), the first argument of `cuLaunchKernelEx`.
typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    void* hStream;
    ep_cu_launch_attribute* attrs;
    unsigned int numAttrs;
} ep_cu_launch_config;

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

/// Unix domain sockets in Linux's abstract namespace, for passing descriptors between the ranks
/// of one host (`SCM_RIGHTS`). `name` is `length` bytes without the leading NUL; the name
/// disappears when the last descriptor of the listening socket is closed.

/// A non-blocking, close-on-exec stream socket bound to abstract name `name` and listening with
/// `backlog`. The descriptor, or -errno (-EADDRINUSE when the name is taken).
int ep_shim_unix_listen(const char* name, int length, int backlog);

/// A non-blocking, close-on-exec stream socket connected to abstract name `name`. The
/// descriptor, or -errno (-EAGAIN: the listener's backlog is full; -ECONNREFUSED: nobody listens).
int ep_shim_unix_connect(const char* name, int length);

/// `accept4` on a listening socket (the new socket close-on-exec and blocking). The descriptor,
/// or -errno (-EAGAIN: nobody waits).
int ep_shim_unix_accept(int listener);

/// `SO_PEERCRED` of a connected Unix socket: the peer's process id and user id when it
/// connected (or, for a connecting socket, when the listener called listen). 0, or -errno.
int ep_shim_peer_credentials(int socket, int* pid, unsigned int* uid);

/// This process's real user id.
unsigned int ep_shim_user_id(void);

/// Sends `length` bytes and `count` (at most 253, Linux's SCM_MAX_FD) descriptors (`SCM_RIGHTS`) in one message, never raising
/// SIGPIPE; at most `milliseconds` blocked. Bytes sent, or -errno.
int ep_shim_send_descriptors(int socket, const void* bytes, int length, const int* descriptors, int count, int milliseconds);

/// Receives one message of at most `length` bytes and at most `capacity` descriptors without
/// blocking (`MSG_DONTWAIT`; received descriptors are close-on-exec). `*received` is the number
/// of descriptors written to `descriptors`. Bytes received (0: the peer closed), or -errno
/// (-EAGAIN: nothing yet; -EMSGSIZE: more descriptors or bytes than room, those received are closed).
int ep_shim_receive_descriptors(int socket, void* bytes, int length, int* descriptors, int capacity, int* received);

/// `close(fd)`.
void ep_shim_close_fd(int fd);

/// For tests: functions with the same shapes, which report what they received.
int ep_shim_test_checksum_unique_id(void** out, int nranks, ep_nccl_unique_id id, int rank);
int ep_shim_test_checksum_ipc_handle(unsigned long long* out, ep_cu_ipc_mem_handle handle, unsigned int flags);

/// For tests: forks a child process that (when `uid` is not this process's, which needs root)
/// switches to user `uid`, connects to abstract socket `name` and reads until the other end
/// closes. Its exit status says what happened: 0 closed without descriptors (refused), 1 got
/// descriptors, 2 could not connect, 3 could not switch user, 4 no answer in 5 s. The child's
/// pid, or -errno.
int ep_shim_test_spawn_connector(const char* name, int length, unsigned int uid);

/// For tests: waits for child `pid` and returns its exit status, or -errno.
int ep_shim_test_wait_child(int pid);

#ifdef __cplusplus
}
#endif

#endif
