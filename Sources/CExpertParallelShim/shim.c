#define _GNU_SOURCE
#include "ep_shim.h"

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

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

// An abstract-namespace address: sun_path[0] = NUL, then the name's bytes (no terminator).
static int ep_abstract_address(struct sockaddr_un* address, const char* name, int length, socklen_t* size) {
    if (length <= 0 || (size_t)length >= sizeof(address->sun_path)) return -ENAMETOOLONG;
    memset(address, 0, sizeof(*address));
    address->sun_family = AF_UNIX;
    memcpy(address->sun_path + 1, name, (size_t)length);
    *size = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)length);
    return 0;
}

// A non-blocking, close-on-exec Unix stream socket and the abstract address of `name`;
// -errno when either cannot be made.
static int ep_abstract_socket(const char* name, int length, struct sockaddr_un* address, socklen_t* size) {
    int bad = ep_abstract_address(address, name, length, size);
    if (bad) return bad;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    return fd < 0 ? -errno : fd;
}

// After a failed call on `fd`: closes it and returns -errno of the failure.
static int ep_close_failed(int fd) {
    int error = errno;
    close(fd);
    return -error;
}

int ep_shim_unix_listen(const char* name, int length, int backlog) {
    struct sockaddr_un address;
    socklen_t size;
    int fd = ep_abstract_socket(name, length, &address, &size);
    if (fd < 0) return fd;
    if (bind(fd, (struct sockaddr*)&address, size) != 0 || listen(fd, backlog) != 0) return ep_close_failed(fd);
    return fd;
}

int ep_shim_unix_connect(const char* name, int length) {
    struct sockaddr_un address;
    socklen_t size;
    int fd = ep_abstract_socket(name, length, &address, &size);
    if (fd < 0) return fd;
    if (connect(fd, (struct sockaddr*)&address, size) != 0) return ep_close_failed(fd);
    return fd;
}

int ep_shim_unix_accept(int listener) {
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ep_shim_peer_credentials(int socket, int* pid, unsigned int* uid) {
    struct ucred credentials;
    socklen_t size = sizeof(credentials);
    if (getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &credentials, &size) != 0) return -errno;
    *pid = (int)credentials.pid;
    *uid = (unsigned int)credentials.uid;
    return 0;
}

unsigned int ep_shim_user_id(void) { return (unsigned int)getuid(); }

#define EP_MAX_DESCRIPTORS 253   // SCM_MAX_FD: the most one message may carry

int ep_shim_send_descriptors(int socket, const void* bytes, int length, const int* descriptors, int count, int milliseconds) {
    if (count < 0 || count > EP_MAX_DESCRIPTORS || length <= 0) return -EINVAL;
    struct timeval limit = {milliseconds / 1000, (milliseconds % 1000) * 1000};
    if (setsockopt(socket, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit)) != 0) return -errno;
    union {
        char buffer[CMSG_SPACE(sizeof(int) * EP_MAX_DESCRIPTORS)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof(control));
    struct iovec part = {(void*)bytes, (size_t)length};
    struct msghdr message;
    memset(&message, 0, sizeof(message));
    message.msg_iov = &part;
    message.msg_iovlen = 1;
    if (count > 0) {
        message.msg_control = control.buffer;
        message.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)count);
        struct cmsghdr* header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)count);
        memcpy(CMSG_DATA(header), descriptors, sizeof(int) * (size_t)count);
    }
    ssize_t sent = sendmsg(socket, &message, MSG_NOSIGNAL);
    return sent < 0 ? -errno : (int)sent;
}

int ep_shim_receive_descriptors(int socket, void* bytes, int length, int* descriptors, int capacity, int* received) {
    *received = 0;
    if (capacity < 0 || capacity > EP_MAX_DESCRIPTORS || length <= 0) return -EINVAL;
    union {
        char buffer[CMSG_SPACE(sizeof(int) * EP_MAX_DESCRIPTORS)];
        struct cmsghdr align;
    } control;
    struct iovec part = {bytes, (size_t)length};
    struct msghdr message;
    memset(&message, 0, sizeof(message));
    message.msg_iov = &part;
    message.msg_iovlen = 1;
    message.msg_control = control.buffer;
    message.msg_controllen = sizeof(control.buffer);
    ssize_t got = recvmsg(socket, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0) return -errno;
    int overflow = (message.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) != 0;
    for (struct cmsghdr* header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((header->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int* incoming = (int*)CMSG_DATA(header);
        for (int i = 0; i < count; ++i) {
            int fd;
            memcpy(&fd, incoming + i, sizeof(int));
            if (*received < capacity) descriptors[(*received)++] = fd;
            else { close(fd); overflow = 1; }
        }
    }
    if (overflow) {
        for (int i = 0; i < *received; ++i) close(descriptors[i]);
        *received = 0;
        return -EMSGSIZE;
    }
    return (int)got;
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

// The child runs only system calls (it was forked from a multithreaded process).
int ep_shim_test_spawn_connector(const char* name, int length, unsigned int uid) {
    struct sockaddr_un address;
    socklen_t size;
    int bad = ep_abstract_address(&address, name, length, &size);
    if (bad) return bad;
    pid_t child = fork();
    if (child < 0) return -errno;
    if (child > 0) return (int)child;
    /* The child of a multithreaded test process holds a copy of every descriptor open at the
     * fork, other tests' listening sockets included (no exec follows to apply CLOEXEC): close
     * them all, so that no socket outlives its owner's close() while this child runs. */
    for (int fd = 3; fd < 4096; ++fd) close(fd);
    if (uid != (unsigned int)getuid() && syscall(SYS_setresuid, uid, uid, uid) != 0) _exit(3);
    int fd = -1;
    for (int attempt = 0; attempt < 200; ++attempt) {   // up to about 2 s
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr*)&address, size) == 0) break;
        if (fd >= 0) close(fd);
        fd = -1;
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    if (fd < 0) _exit(2);
    struct timeval limit = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    char bytes[4096];
    int descriptors[EP_MAX_DESCRIPTORS];
    int received = 0;
    for (;;) {
        int got = ep_shim_receive_descriptors(fd, bytes, sizeof(bytes), descriptors, EP_MAX_DESCRIPTORS, &received);
        if (got == -EAGAIN || got == -EWOULDBLOCK) {   // MSG_DONTWAIT: wait for data, bounded
            struct pollfd one = {fd, POLLIN, 0};
            if (poll(&one, 1, 5000) <= 0) _exit(4);
            continue;
        }
        if (received > 0 || got > 0 || got == -EMSGSIZE) _exit(1);   // answered
        if (got == 0) _exit(0);
        if (got < 0) _exit(4);
    }
}

int ep_shim_test_wait_child(int pid) {
    int status = 0;
    if (waitpid(pid, &status, 0) < 0) return -errno;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}
