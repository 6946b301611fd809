/* Benchmark-only LD_PRELOAD shim: getnameinfo() never does a reverse DNS lookup.
 *
 * torch's c10d formats socket addresses for its log messages with getnameinfo()
 * without NI_NUMERICHOST, i.e. a reverse DNS lookup on every TCPStore connection.
 * Where the resolver drops queries (this benchmark VM's sandbox resolver does,
 * in bursts) a connection stalls for the resolver timeout, 5 s, whichever library
 * opens it. With this shim the lookups answer with the numeric address at once, so
 * the benchmarks measure the libraries, not the resolver. Built by
 * benchmarks/_common.py when a benchmark runs with --numeric-hosts.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <sys/socket.h>

typedef int (*getnameinfo_fn)(const struct sockaddr *, socklen_t, char *, socklen_t, char *, socklen_t, int);

int getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen, char *serv,
                socklen_t servlen, int flags) {
    static getnameinfo_fn real = 0;
    if (!real) {
        real = (getnameinfo_fn)dlsym(RTLD_NEXT, "getnameinfo");
    }
    return real(sa, salen, host, hostlen, serv, servlen, flags | NI_NUMERICHOST);
}
