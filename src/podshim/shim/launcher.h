/* What launcher.c and launcher_zygote.c share (podshim's own code). */
#ifndef PODSHIM_LAUNCHER_H
#define PODSHIM_LAUNCHER_H

#include <stddef.h>

/* The SHA-256 of data[0:len] as 64 lowercase hex digits and a NUL (launcher_sha256.c). */
void sha256_hex(const char *data, size_t len, char out[65]);

/* A new pod's daemon, asked of the zygote (zygote.py's request fields). */
struct zygote_ask {
    const char *zygote;    /* the zygote's socket: <run>/z/<sha256(address)[:40]> */
    const char *socket;    /* the shim socket path to listen at */
    const char *namespace; /* containerd namespace */
    const char *id;
    const char *address;   /* containerd's address */
    const char *bundle;
    int debug;
};

/* Listen at ask->socket and have the zygote fork the daemon serving it: 0 once the
 * daemon is committed to serve; -1 (nothing left behind) when Python must do it. */
int zygote_start(const struct zygote_ask *ask);

#endif
