// Open MPI, loaded at run time (dlopen of libmpi.so.40) only when the server runs under mpirun.
// The binary has no link-time dependency on MPI: a server started without mpirun never loads it.
// Handles are Open MPI's (pointers); only point-to-point, probe, test and the non-blocking
// all-to-all, all-gather and barrier are used. Every function returns 0 on success, else an MPI
// error code (or -1 when the library is not loaded).
#ifndef EMBER_MPI_H
#define EMBER_MPI_H
#include <stddef.h>

typedef void *ember_mpi_request;

/// Loads libmpi and resolves the symbols; on failure writes a message into err.
int ember_mpi_load(char *err, size_t err_len);
/// MPI_Init_thread(MPI_THREAD_MULTIPLE) with MPI_ERRORS_RETURN on MPI_COMM_WORLD.
int ember_mpi_init(int *rank, int *size, int *provided_multiple);
int ember_mpi_finalize(void);
int ember_mpi_abort(int code);
int ember_mpi_processor_name(char *name, int capacity);
/// kind: 0 bytes, 1 floats.
int ember_mpi_isend(const void *buf, int count, int kind, int dest, int tag, ember_mpi_request *req);
int ember_mpi_irecv(void *buf, int count, int kind, int source, int tag, ember_mpi_request *req);
int ember_mpi_iprobe(int source, int tag, int *flag);
int ember_mpi_testall(int count, ember_mpi_request *reqs, int *flag);
/// Floats.
int ember_mpi_ialltoallv(const float *send, const int *send_counts, const int *send_displs,
                         float *recv, const int *recv_counts, const int *recv_displs, ember_mpi_request *req);
/// Floats, in place.
int ember_mpi_iallgatherv(float *buf, const int *counts, const int *displs, ember_mpi_request *req);
int ember_mpi_ibarrier(ember_mpi_request *req);
/// MPI_Allreduce(MPI_SUM) of floats in place: Open MPI's own order of additions (the benchmark's
/// anchor only; Ember's sums go over its fixed tree).
int ember_mpi_allreduce_sum(float *buf, int count);
/// Lets a request complete on its own (heartbeats are sent and forgotten).
int ember_mpi_request_free(ember_mpi_request *req);

/// CPUs this process may run on (its affinity mask; -1 if unknown). Not MPI, but ranks need it.
int ember_cpu_affinity_count(void);

#endif
