// See include/ember_mpi.h. The few constants are Open MPI's ABI (libmpi.so.40, mpi.h):
// MPI_THREAD_MULTIPLE = 3, MPI_IN_PLACE = (void *)1, MPI_STATUS(ES)_IGNORE = NULL, and the
// predefined handles are the addresses of the ompi_mpi_* globals.
#define _GNU_SOURCE
#include "ember_mpi.h"
#include <sched.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

typedef void *H;
static void *lib;
static H comm_world, type_byte, type_float, errors_return;
static int (*p_init_thread)(int *, char ***, int, int *);
static int (*p_finalize)(void);
static int (*p_abort)(H, int);
static int (*p_comm_rank)(H, int *);
static int (*p_comm_size)(H, int *);
static int (*p_set_errhandler)(H, H);
static int (*p_get_processor_name)(char *, int *);
static int (*p_isend)(const void *, int, H, int, int, H, ember_mpi_request *);
static int (*p_irecv)(void *, int, H, int, int, H, ember_mpi_request *);
static int (*p_iprobe)(int, int, H, int *, void *);
static int (*p_testall)(int, ember_mpi_request *, int *, void *);
static int (*p_ialltoallv)(const void *, const int *, const int *, H, void *, const int *, const int *, H, H, ember_mpi_request *);
static int (*p_iallgatherv)(const void *, int, H, void *, const int *, const int *, H, H, ember_mpi_request *);
static int (*p_ibarrier)(H, ember_mpi_request *);
static int (*p_request_free)(ember_mpi_request *);
static int (*p_allreduce)(const void *, void *, int, H, H, H);
static H op_sum;

#define RESOLVE(var, name) do { *(void **)(&var) = dlsym(lib, name); if (!var) { snprintf(err, err_len, "libmpi has no %s", name); return -1; } } while (0)

int ember_mpi_load(char *err, size_t err_len) {
    if (lib) return 0;
    const char *names[] = {"libmpi.so.40", "libmpi.so"};
    for (int i = 0; i < 2 && !lib; i++) lib = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
    if (!lib) { snprintf(err, err_len, "cannot load Open MPI (libmpi.so.40): %s", dlerror()); return -1; }
    RESOLVE(comm_world, "ompi_mpi_comm_world");
    RESOLVE(type_byte, "ompi_mpi_byte");
    RESOLVE(type_float, "ompi_mpi_float");
    RESOLVE(errors_return, "ompi_mpi_errors_return");
    RESOLVE(p_init_thread, "MPI_Init_thread");
    RESOLVE(p_finalize, "MPI_Finalize");
    RESOLVE(p_abort, "MPI_Abort");
    RESOLVE(p_comm_rank, "MPI_Comm_rank");
    RESOLVE(p_comm_size, "MPI_Comm_size");
    RESOLVE(p_set_errhandler, "MPI_Comm_set_errhandler");
    RESOLVE(p_get_processor_name, "MPI_Get_processor_name");
    RESOLVE(p_isend, "MPI_Isend");
    RESOLVE(p_irecv, "MPI_Irecv");
    RESOLVE(p_iprobe, "MPI_Iprobe");
    RESOLVE(p_testall, "MPI_Testall");
    RESOLVE(p_ialltoallv, "MPI_Ialltoallv");
    RESOLVE(p_iallgatherv, "MPI_Iallgatherv");
    RESOLVE(p_ibarrier, "MPI_Ibarrier");
    RESOLVE(p_request_free, "MPI_Request_free");
    RESOLVE(p_allreduce, "MPI_Allreduce");
    RESOLVE(op_sum, "ompi_mpi_op_sum");
    return 0;
}

#define LOADED if (!lib) return -1

int ember_mpi_init(int *rank, int *size, int *provided_multiple) {
    LOADED;
    int provided = 0;
    int rc = p_init_thread(NULL, NULL, 3, &provided);
    if (rc) return rc;
    *provided_multiple = provided >= 3;
    if ((rc = p_set_errhandler(comm_world, errors_return))) return rc;
    if ((rc = p_comm_rank(comm_world, rank))) return rc;
    return p_comm_size(comm_world, size);
}

int ember_mpi_finalize(void) { LOADED; return p_finalize(); }
int ember_mpi_abort(int code) { LOADED; return p_abort(comm_world, code); }

int ember_mpi_processor_name(char *name, int capacity) {
    LOADED;
    char buf[512];   /* MPI_MAX_PROCESSOR_NAME is 256 in Open MPI */
    int len = 0;
    int rc = p_get_processor_name(buf, &len);
    if (rc) return rc;
    if (len >= capacity) len = capacity - 1;
    memcpy(name, buf, (size_t)len);
    name[len] = 0;
    return 0;
}

static H type_of(int kind) { return kind == 1 ? type_float : type_byte; }

int ember_mpi_isend(const void *buf, int count, int kind, int dest, int tag, ember_mpi_request *req) {
    LOADED; return p_isend(buf, count, type_of(kind), dest, tag, comm_world, req);
}
int ember_mpi_irecv(void *buf, int count, int kind, int source, int tag, ember_mpi_request *req) {
    LOADED; return p_irecv(buf, count, type_of(kind), source, tag, comm_world, req);
}
int ember_mpi_iprobe(int source, int tag, int *flag) { LOADED; return p_iprobe(source, tag, comm_world, flag, NULL); }
int ember_mpi_testall(int count, ember_mpi_request *reqs, int *flag) { LOADED; return p_testall(count, reqs, flag, NULL); }

int ember_mpi_ialltoallv(const float *send, const int *send_counts, const int *send_displs,
                         float *recv, const int *recv_counts, const int *recv_displs, ember_mpi_request *req) {
    LOADED;
    return p_ialltoallv(send, send_counts, send_displs, type_float, recv, recv_counts, recv_displs, type_float, comm_world, req);
}
int ember_mpi_iallgatherv(float *buf, const int *counts, const int *displs, ember_mpi_request *req) {
    LOADED;
    return p_iallgatherv((const void *)1, 0, type_float, buf, counts, displs, type_float, comm_world, req);
}
int ember_mpi_ibarrier(ember_mpi_request *req) { LOADED; return p_ibarrier(comm_world, req); }
int ember_mpi_allreduce_sum(float *buf, int count) { LOADED; return p_allreduce((const void *)1, buf, count, type_float, op_sum, comm_world); }
int ember_mpi_request_free(ember_mpi_request *req) { LOADED; return p_request_free(req); }

int ember_cpu_affinity_count(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    return CPU_COUNT(&set);
}
