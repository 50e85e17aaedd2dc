/* imgmount native addon: a small FUSE server speaking the kernel protocol directly,
 * serving reads/writes from an extent map on worker threads and handing everything
 * else to JavaScript; plus a few system calls Node lacks. See lib/core/native.ts. */
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifndef BLKGETSIZE64
#define BLKGETSIZE64 _IOR(0x12, 114, size_t)
#endif

#include "fuse_proto.h"

/* Sector encryption in the native data path uses the OpenSSL that Node itself exports
 * (its headers ship with Node's). Without them the addon still builds and every
 * encrypted request goes to JavaScript. */
#if defined(__has_include)
#if __has_include(<openssl/evp.h>)
#include <openssl/evp.h>
#define HAVE_CRYPTO 1
#endif
#endif

extern char **environ;

#define MAP_F_WRITABLE 1
#define MAP_F_ZERO 2
#define MAP_F_DIRECT 4
#define MAP_F_CRYPT 8 /* sectors are encrypted on the host; bits 8.. carry the crypt id */
/* the first write into the extent is reported to JS (onNotify), and the flag cleared: a
 * range linked ahead of a sequential write asks for the next one as soon as it is used */
#define MAP_F_NOTIFY 16
#define MAX_CRYPT 64
#define MAP_CAP_ENTRIES (4u * 1024 * 1024)
#define MAX_THREADS 64
#define WAKE_SIG (SIGRTMIN + 5)

/* ------------------------------------------------------------------ helpers -- */

#define NAPI_CALL(env, call)                                                 \
  do {                                                                       \
    if ((call) != napi_ok) {                                                 \
      const napi_extended_error_info *ei_ = NULL;                            \
      napi_get_last_error_info((env), &ei_);                                 \
      bool pend_ = false;                                                    \
      napi_is_exception_pending((env), &pend_);                              \
      if (!pend_)                                                            \
        napi_throw_error((env), NULL,                                        \
                         ei_ && ei_->error_message ? ei_->error_message      \
                                                   : "napi call failed");    \
      return NULL;                                                           \
    }                                                                        \
  } while (0)

static napi_value throw_errno(napi_env env, const char *what, int err) {
  char msg[512];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_throw_error(env, NULL, msg);
  return NULL;
}

static bool get_double(napi_env env, napi_value v, double *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return false;
  if (t == napi_number) return napi_get_value_double(env, v, out) == napi_ok;
  if (t == napi_bigint) {
    int64_t x;
    bool lossless;
    if (napi_get_value_bigint_int64(env, v, &x, &lossless) != napi_ok) return false;
    *out = (double)x;
    return true;
  }
  return false;
}

static bool get_i64(napi_env env, napi_value v, int64_t *out) {
  double d;
  if (!get_double(env, v, &d)) return false;
  if (d != d || d < -9007199254740992.0 || d > 9007199254740992.0) return false;
  *out = (int64_t)d;
  return true;
}

static bool get_u64(napi_env env, napi_value v, uint64_t *out) {
  int64_t x;
  if (!get_i64(env, v, &x) || x < 0) return false;
  *out = (uint64_t)x;
  return true;
}

static bool get_int(napi_env env, napi_value v, int *out) {
  int64_t x;
  if (!get_i64(env, v, &x) || x < INT_MIN || x > INT_MAX) return false;
  *out = (int)x;
  return true;
}

static napi_value make_num(napi_env env, double d) {
  napi_value v;
  napi_create_double(env, d, &v);
  return v;
}

static napi_value get_prop(napi_env env, napi_value obj, const char *name) {
  napi_value v = NULL;
  napi_get_named_property(env, obj, name, &v);
  return v;
}

static char *get_string(napi_env env, napi_value v) {
  size_t len;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return NULL;
  char *s = malloc(len + 1);
  if (!s) return NULL;
  napi_get_value_string_utf8(env, v, s, len + 1, &len);
  s[len] = 0;
  return s;
}

static bool get_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is = false;
  if (napi_is_typedarray(env, v, &is) == napi_ok && is) {
    napi_typedarray_type type;
    size_t n, off;
    void *p;
    napi_value ab;
    if (napi_get_typedarray_info(env, v, &type, &n, &p, &ab, &off) != napi_ok) return false;
    size_t esz = 1;
    switch (type) {
      case napi_int16_array: case napi_uint16_array: esz = 2; break;
      case napi_int32_array: case napi_uint32_array: case napi_float32_array: esz = 4; break;
      case napi_float64_array: case napi_bigint64_array: case napi_biguint64_array: esz = 8; break;
      default: esz = 1;
    }
    *data = p;
    *len = n * esz;
    return true;
  }
  if (napi_is_buffer(env, v, &is) == napi_ok && is) {
    void *p;
    if (napi_get_buffer_info(env, v, &p, len) != napi_ok) return false;
    *data = p;
    return true;
  }
  return false;
}

/* --------------------------------------------------------------- structures -- */

typedef struct {
  uint64_t guest, len, host;
  int32_t fd;
  uint32_t flags;
} extent_t; /* 32 bytes */

typedef struct {
  extent_t *e;
  size_t n;
  size_t cap;
  size_t dead; /* tombstones (len 0) left by in-place invalidation */
} extmap_t;

typedef struct node {
  uint64_t ino;
  uint64_t parent;
  char *name;
  int is_dir;
  int file; /* index into files or -1 */
} node_t;

/* A sector cipher the JS side registered: immutable once published. The IV of the sector
 * holding host byte h is (h - ivbase) / sector, little-endian in 16 bytes (dm-crypt's
 * plain64; ivbits 32 = plain, 0 = no IV). */
typedef struct {
#ifdef HAVE_CRYPTO
  EVP_CIPHER *cipher;
#endif
  uint8_t key[64];
  int keylen;
  uint32_t sector;
  int64_t ivbase;
  int ivbits;
} crypt_t;

/* per worker thread: OpenSSL contexts are not shareable */
typedef struct {
#ifdef HAVE_CRYPTO
  EVP_CIPHER_CTX *ctx[MAX_CRYPT][2];
#else
  int unused;
#endif
} crypt_tls_t;

typedef struct {
  uint64_t ino;
  uint64_t size;   /* atomic */
  uint64_t blocks; /* atomic */
  int read_only;
  pthread_rwlock_t lock;
  extmap_t map; /* guarded by lock; only the JS thread replaces it */
} file_t;

enum { OP_READ, OP_WRITE, OP_FSYNC, OP_LSEEK, OP_FALLOCATE };
static const char *op_names[] = {"read", "write", "fsync", "lseek", "fallocate"};

typedef struct jsreq {
  struct jsreq *next;
  uint64_t unique;
  int fd;
  int file;
  int op;
  uint64_t offset, length;
  uint32_t whence, mode;
  int datasync;
  uint8_t *data; /* malloc'd write payload */
} jsreq_t;

#define PEND_BUCKETS 1024

struct server;
typedef struct {
  struct server *srv;
  pthread_t tid;
  int fd;
  int started;
  /* the guest range of the native I/O this worker runs without the map lock (see map_take);
   * busy is set under the map's read lock, so an invalidation that took the write lock
   * afterwards sees it */
  int busy;
  int busy_file;
  uint64_t busy_off, busy_end;
} worker_t;

typedef struct server {
  int fd; /* main /dev/fuse fd */
  int nthreads;
  worker_t workers[MAX_THREADS];
  uint32_t max_write;
  uint32_t uid, gid;
  time_t mtime;

  node_t *nodes;
  size_t nnodes;
  file_t *files;
  size_t nfiles;

  pthread_mutex_t qlock;
  jsreq_t *qhead, *qtail;
  int notify_pending;

  jsreq_t *pending[PEND_BUCKETS]; /* JS thread only */

  napi_threadsafe_function tsfn;
  napi_ref on_requests, on_init, on_exit, on_notify;

  int alive;        /* worker threads still running (atomic) */
  int stopping;     /* atomic */
  int exit_err;     /* first fatal error */
  int joined;       /* JS thread only */
  int fds_closed;   /* JS thread only */
  int refs;         /* external + tsfn (atomic) */

  uint64_t st_native_reads, st_native_writes, st_js;
  crypt_t *crypts[MAX_CRYPT]; /* set once each by the JS thread (release), read by workers */
} server_t;

static void server_free(server_t *s) {
  if (!s) return;
  for (size_t i = 0; i < s->nfiles; i++) {
    pthread_rwlock_destroy(&s->files[i].lock);
    free(s->files[i].map.e);
  }
  for (size_t i = 0; i < s->nnodes; i++) free(s->nodes[i].name);
  free(s->nodes);
  free(s->files);
  jsreq_t *r = s->qhead;
  while (r) { jsreq_t *n = r->next; free(r->data); free(r); r = n; }
  for (int b = 0; b < PEND_BUCKETS; b++) {
    r = s->pending[b];
    while (r) { jsreq_t *n = r->next; free(r->data); free(r); r = n; }
  }
  for (int c = 0; c < MAX_CRYPT; c++) {
    if (!s->crypts[c]) continue;
#ifdef HAVE_CRYPTO
    EVP_CIPHER_free(s->crypts[c]->cipher);
#endif
    memset(s->crypts[c]->key, 0, sizeof s->crypts[c]->key);
    free(s->crypts[c]);
  }
  pthread_mutex_destroy(&s->qlock);
  free(s);
}

static void server_unref(server_t *s) {
  if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0) server_free(s);
}

/* ------------------------------------------------------------- tsfn plumbing -- */

enum { EV_REQUESTS = 1, EV_INIT = 2, EV_EXIT = 3, EV_NOTIFY = 4 };
typedef struct { int kind; int err; int file; uint64_t offset; } event_t;

static void tsfn_call_js(napi_env env, napi_value js_cb, void *context, void *data) {
  server_t *s = context;
  event_t *ev = data;
  if (!ev) return;
  if (env) {
    napi_ref ref = ev->kind == EV_REQUESTS ? s->on_requests
                   : ev->kind == EV_INIT   ? s->on_init
                   : ev->kind == EV_NOTIFY ? s->on_notify
                                           : s->on_exit;
    napi_value fn, undef, argv[2];
    if (ref && napi_get_reference_value(env, ref, &fn) == napi_ok && fn) {
      napi_get_undefined(env, &undef);
      size_t argc = 0;
      if (ev->kind == EV_EXIT) { argv[0] = make_num(env, ev->err); argc = 1; }
      if (ev->kind == EV_NOTIFY) { argv[0] = make_num(env, ev->file); argv[1] = make_num(env, (double)ev->offset); argc = 2; }
      napi_valuetype t;
      if (napi_typeof(env, fn, &t) == napi_ok && t == napi_function) {
        napi_value res;
        if (napi_call_function(env, undef, fn, argc, argv, &res) != napi_ok) {
          /* an exception thrown by the callback surfaces as uncaught */
          bool pend = false;
          napi_is_exception_pending(env, &pend);
          if (pend) {
            napi_value exc;
            napi_get_and_clear_last_exception(env, &exc);
            napi_fatal_exception(env, exc);
          }
        }
      }
    }
  }
  free(ev);
}

static void tsfn_finalize(napi_env env, void *data, void *hint) {
  server_t *s = hint;
  if (s->on_requests) napi_delete_reference(env, s->on_requests);
  if (s->on_init) napi_delete_reference(env, s->on_init);
  if (s->on_exit) napi_delete_reference(env, s->on_exit);
  if (s->on_notify) napi_delete_reference(env, s->on_notify);
  s->on_requests = s->on_init = s->on_exit = s->on_notify = NULL;
  server_unref(s);
}

static void post_event_at(server_t *s, int kind, int err, int file, uint64_t offset) {
  event_t *ev = malloc(sizeof *ev);
  if (!ev) return;
  ev->kind = kind;
  ev->err = err;
  ev->file = file;
  ev->offset = offset;
  if (napi_call_threadsafe_function(s->tsfn, ev, napi_tsfn_nonblocking) != napi_ok) free(ev);
}

static void post_event(server_t *s, int kind, int err) { post_event_at(s, kind, err, -1, 0); }

/* ------------------------------------------------------------------- replies -- */

static void send_iov(int fd, struct iovec *iov, int cnt) {
  for (;;) {
    ssize_t r = writev(fd, iov, cnt);
    if (r < 0 && errno == EINTR) continue;
    /* ENOENT: request was interrupted/aborted; other errors: nothing to do */
    return;
  }
}

static void reply_err(int fd, uint64_t unique, int err) {
  struct fp_out_header h = {.len = sizeof h, .error = -err, .unique = unique};
  struct iovec iov = {&h, sizeof h};
  send_iov(fd, &iov, 1);
}

static void reply_data(int fd, uint64_t unique, const void *p1, size_t n1, const void *p2, size_t n2) {
  struct fp_out_header h = {.len = (uint32_t)(sizeof h + n1 + n2), .error = 0, .unique = unique};
  struct iovec iov[3] = {{&h, sizeof h}, {(void *)p1, n1}, {(void *)p2, n2}};
  int cnt = 1;
  if (n1) cnt = 2;
  if (n2) { if (!n1) { iov[1] = iov[2]; cnt = 2; } else cnt = 3; }
  send_iov(fd, iov, cnt);
}

/* ---------------------------------------------------------------- inode ops -- */

static node_t *get_node(server_t *s, uint64_t ino) {
  if (ino < 1 || ino > s->nnodes) return NULL;
  return &s->nodes[ino - 1];
}

static void fill_attr(server_t *s, node_t *n, struct fp_attr *a) {
  memset(a, 0, sizeof *a);
  a->ino = n->ino;
  a->atime = a->mtime = a->ctime = (uint64_t)s->mtime;
  a->uid = s->uid;
  a->gid = s->gid;
  a->blksize = 4096;
  if (n->is_dir) {
    a->mode = S_IFDIR | 0755;
    a->nlink = 2;
  } else {
    file_t *f = &s->files[n->file];
    a->mode = S_IFREG | (f->read_only ? 0444 : 0644);
    a->nlink = 1;
    a->size = __atomic_load_n(&f->size, __ATOMIC_RELAXED);
    a->blocks = __atomic_load_n(&f->blocks, __ATOMIC_RELAXED);
  }
}

/* ----------------------------------------------------------- map operations -- */

/* index of last extent with guest <= off, or -1 */
static ssize_t map_find(const extmap_t *m, uint64_t off) {
  ssize_t lo = 0, hi = (ssize_t)m->n - 1, res = -1;
  while (lo <= hi) {
    ssize_t mid = lo + (hi - lo) / 2;
    if (m->e[mid].guest <= off) { res = mid; lo = mid + 1; } else hi = mid - 1;
  }
  return res;
}

/* Is [off, off+len) covered by contiguous extents all satisfying the flags test?
 * Returns first index or -1. */
static ssize_t map_cover(server_t *s, const extmap_t *m, uint64_t off, uint64_t len, int for_write) {
  ssize_t i = map_find(m, off);
  if (i < 0) return -1;
  uint64_t pos = off, end = off + len;
  size_t j = (size_t)i;
  while (pos < end) {
    if (j >= m->n) return -1;
    const extent_t *e = &m->e[j];
    if (e->guest > pos || e->guest + e->len <= pos) return -1;
    uint32_t fl = __atomic_load_n(&e->flags, __ATOMIC_RELAXED); /* NOTIFY is cleared under the read lock */
    if (for_write && (!(fl & MAP_F_WRITABLE) || (fl & MAP_F_ZERO))) return -1;
    uint64_t pend = e->guest + e->len < end ? e->guest + e->len : end;
    if (fl & MAP_F_DIRECT) {
      uint64_t h = e->host + (pos - e->guest);
      if ((pos | h | (pend - pos)) & 4095) return -1;
    }
    if (fl & MAP_F_CRYPT) {
      /* only whole sectors: partial ones need read-modify-write, which JS does */
      const crypt_t *c = __atomic_load_n(&s->crypts[(fl >> 8) % MAX_CRYPT], __ATOMIC_ACQUIRE);
      int64_t rel = (int64_t)(e->host + (pos - e->guest)) - (c ? c->ivbase : 0);
      if (!c || rel < 0 || (uint64_t)rel % c->sector || (pend - pos) % c->sector) return -1;
    }
    pos = pend;
    j++;
  }
  return i;
}

/* ------------------------------------------------------------- native I/O -- */

static int do_pread_full(int fd, uint8_t *buf, uint64_t len, uint64_t off) {
  uint64_t done = 0;
  while (done < len) {
    ssize_t r = pread(fd, buf + done, len - done, (off_t)(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) { memset(buf + done, 0, len - done); break; }
    done += (uint64_t)r;
  }
  return 0;
}

static int do_pwrite_full(int fd, const uint8_t *buf, uint64_t len, uint64_t off) {
  uint64_t done = 0;
  while (done < len) {
    ssize_t r = pwrite(fd, buf + done, len - done, (off_t)(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) return EIO;
    done += (uint64_t)r;
  }
  return 0;
}

/* En- or decrypts whole sectors from `in` to `out` (may be equal); host = host offset of in[0]. */
static int crypt_run(server_t *s, crypt_tls_t *tl, uint32_t flags, int enc, uint8_t *out, const uint8_t *in,
                     uint64_t len, uint64_t host) {
#ifdef HAVE_CRYPTO
  uint32_t id = (flags >> 8) % MAX_CRYPT;
  const crypt_t *c = __atomic_load_n(&s->crypts[id], __ATOMIC_ACQUIRE);
  if (!c) return EIO;
  EVP_CIPHER_CTX *ctx = tl->ctx[id][enc];
  if (!ctx) {
    ctx = EVP_CIPHER_CTX_new();
    if (!ctx || EVP_CipherInit_ex(ctx, c->cipher, NULL, c->key, NULL, enc) != 1) {
      EVP_CIPHER_CTX_free(ctx);
      return EIO;
    }
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    tl->ctx[id][enc] = ctx;
  }
  uint64_t sector = (uint64_t)((int64_t)host - c->ivbase) / c->sector;
  for (uint64_t p = 0; p < len; p += c->sector, sector++) {
    int outl = 0;
    if (c->ivbits) {
      uint8_t iv[16] = {0};
      uint64_t v = c->ivbits == 32 ? (sector & 0xffffffffu) : sector;
      for (int b = 0; b < 8; b++) iv[b] = (uint8_t)(v >> (8 * b));
      if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1) return EIO;
    }
    if (EVP_CipherUpdate(ctx, out + p, &outl, in + p, (int)c->sector) != 1 || outl != (int)c->sector) return EIO;
  }
  return 0;
#else
  return EIO;
#endif
}

static void crypt_tls_free(crypt_tls_t *tl) {
#ifdef HAVE_CRYPTO
  for (int i = 0; i < MAX_CRYPT; i++)
    for (int k = 0; k < 2; k++) EVP_CIPHER_CTX_free(tl->ctx[i][k]);
#endif
  memset(tl, 0, sizeof *tl);
}

/* Serve natively if covered; returns 1 if handled (reply sent), 0 if JS must do it */
typedef struct {
  server_t *s;
  worker_t *w;
  int fd;
  uint8_t *data;   /* aligned data/bounce buffer, max_write bytes */
  crypt_tls_t crypt;
  extent_t *pieces; /* the extents of the request being served (map_take) */
  size_t npieces;
} tctx_t;

/* Copies the extents covering [off, off+len) out of the map (clipped to the request) and
 * marks this worker busy on the range, so the I/O runs without holding the map lock (a
 * 1 MiB pwrite must not stall invalidations and map updates); invalidations wait for busy
 * workers that overlap them (map_wait_idle). Returns the number of pieces, 0 if the map does
 * not cover the request. */
static size_t map_take(server_t *s, worker_t *w, int fidx, file_t *f, uint64_t off, uint64_t len, int for_write,
                       extent_t *out, size_t cap, uint64_t *notify) {
  *notify = UINT64_MAX;
  pthread_rwlock_rdlock(&f->lock);
  ssize_t i = map_cover(s, &f->map, off, len, for_write);
  size_t n = 0;
  uint64_t pos = off, end = off + len;
  for (size_t j = (size_t)i; i >= 0 && pos < end; j++) {
    if (n == cap) { n = 0; break; }
    extent_t *e = &f->map.e[j];
    uint64_t pend = e->guest + e->len < end ? e->guest + e->len : end;
    out[n] = *e;
    out[n].flags = __atomic_load_n(&e->flags, __ATOMIC_RELAXED);
    /* one report per extent: whoever clears the flag reports it */
    if (for_write && (out[n].flags & MAP_F_NOTIFY) &&
        (__atomic_fetch_and(&e->flags, ~(uint32_t)MAP_F_NOTIFY, __ATOMIC_RELAXED) & MAP_F_NOTIFY) && *notify == UINT64_MAX)
      *notify = e->guest;
    out[n].host = e->host + (pos - e->guest);
    out[n].guest = pos;
    out[n].len = pend - pos;
    n++;
    pos = pend;
  }
  if (n) {
    __atomic_store_n(&w->busy_file, fidx, __ATOMIC_RELAXED);
    __atomic_store_n(&w->busy_off, off, __ATOMIC_RELAXED);
    __atomic_store_n(&w->busy_end, end, __ATOMIC_RELAXED);
    __atomic_store_n(&w->busy, 1, __ATOMIC_SEQ_CST);
  }
  pthread_rwlock_unlock(&f->lock);
  return n;
}

static void map_release(worker_t *w) { __atomic_store_n(&w->busy, 0, __ATOMIC_RELEASE); }

/* after an invalidation: waits until no worker still does I/O on the old extents of the range */
static void map_wait_idle(server_t *s, int fidx, uint64_t off, uint64_t len) {
  uint64_t end = off + len < off ? UINT64_MAX : off + len;
  for (int i = 0; i < s->nthreads; i++) {
    worker_t *w = &s->workers[i];
    for (;;) {
      if (!__atomic_load_n(&w->busy, __ATOMIC_SEQ_CST)) break;
      if (__atomic_load_n(&w->busy_file, __ATOMIC_RELAXED) != fidx) break;
      uint64_t bo = __atomic_load_n(&w->busy_off, __ATOMIC_RELAXED), be = __atomic_load_n(&w->busy_end, __ATOMIC_RELAXED);
      if (bo >= end || be <= off) break;
      struct timespec ts = {0, 20000};
      nanosleep(&ts, NULL);
    }
  }
}

/* Serve natively if covered; returns 1 if handled (reply sent), 0 if JS must do it */
static int native_read(server_t *s, tctx_t *t, int fd, int fidx, file_t *f, uint64_t unique, uint64_t off,
                       uint64_t len, uint8_t *buf) {
  uint64_t notify;
  size_t n = map_take(s, t->w, fidx, f, off, len, 0, t->pieces, t->npieces, &notify);
  if (!n) return 0;
  int err = 0;
  for (size_t j = 0; j < n && !err; j++) {
    const extent_t *e = &t->pieces[j];
    uint8_t *dst = buf + (e->guest - off);
    if (e->flags & MAP_F_ZERO) memset(dst, 0, e->len);
    else {
      err = do_pread_full(e->fd, dst, e->len, e->host);
      if (!err && (e->flags & MAP_F_CRYPT)) err = crypt_run(s, &t->crypt, e->flags, 0, dst, dst, e->len, e->host);
    }
  }
  map_release(t->w);
  if (err) reply_err(fd, unique, err);
  else reply_data(fd, unique, buf, len, NULL, 0);
  __atomic_add_fetch(&s->st_native_reads, 1, __ATOMIC_RELAXED);
  return 1;
}

static int native_write(server_t *s, tctx_t *t, int fd, int fidx, file_t *f, uint64_t unique, uint64_t off,
                        uint64_t len, const uint8_t *data) {
  uint64_t notify;
  size_t n = map_take(s, t->w, fidx, f, off, len, 1, t->pieces, t->npieces, &notify);
  /* before the write, so JS works on it meanwhile */
  if (notify != UINT64_MAX && s->on_notify) post_event_at(s, EV_NOTIFY, 0, fidx, notify);
  if (!n) return 0;
  uint8_t *bounce = t->data;
  int err = 0;
  for (size_t j = 0; j < n && !err; j++) {
    const extent_t *e = &t->pieces[j];
    const uint8_t *src = data + (e->guest - off);
    if (e->flags & MAP_F_CRYPT) {
      err = crypt_run(s, &t->crypt, e->flags, 1, bounce + (e->guest - off), src, e->len, e->host);
      src = bounce + (e->guest - off);
    } else if (e->flags & MAP_F_DIRECT) {
      memcpy(bounce + (e->guest - off), src, e->len);
      src = bounce + (e->guest - off);
    }
    if (!err) err = do_pwrite_full(e->fd, src, e->len, e->host);
  }
  map_release(t->w);
  if (err) reply_err(fd, unique, err);
  else {
    struct fp_write_out wo = {.size = (uint32_t)len};
    reply_data(fd, unique, &wo, sizeof wo, NULL, 0);
  }
  __atomic_add_fetch(&s->st_native_writes, 1, __ATOMIC_RELAXED);
  return 1;
}

/* ------------------------------------------------------------------ JS queue -- */

static void enqueue(server_t *s, jsreq_t *r) {
  __atomic_add_fetch(&s->st_js, 1, __ATOMIC_RELAXED);
  int call = 0;
  pthread_mutex_lock(&s->qlock);
  r->next = NULL;
  if (s->qtail) s->qtail->next = r; else s->qhead = r;
  s->qtail = r;
  if (!s->notify_pending) { s->notify_pending = 1; call = 1; }
  pthread_mutex_unlock(&s->qlock);
  if (call) post_event(s, EV_REQUESTS, 0);
}

static jsreq_t *new_req(int fd, uint64_t unique, int file, int op, uint64_t off, uint64_t len) {
  jsreq_t *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->fd = fd;
  r->unique = unique;
  r->file = file;
  r->op = op;
  r->offset = off;
  r->length = len;
  return r;
}

/* ------------------------------------------------------------- dispatching -- */


static file_t *file_of(server_t *s, uint64_t nodeid, int *idx, int *err) {
  node_t *n = get_node(s, nodeid);
  if (!n) { *err = ENOENT; return NULL; }
  if (n->is_dir) { *err = EISDIR; return NULL; }
  *idx = n->file;
  return &s->files[n->file];
}

static void do_init(tctx_t *t, struct fp_in_header *h, const uint8_t *arg, size_t alen) {
  server_t *s = t->s;
  if (alen < sizeof(struct fp_init_in)) { reply_err(t->fd, h->unique, EINVAL); return; }
  struct fp_init_in in;
  memcpy(&in, arg, sizeof in);
  struct fp_init_out out;
  memset(&out, 0, sizeof out);
  out.major = FP_KERNEL_VERSION;
  out.minor = FP_KERNEL_MINOR_VERSION;
  if (in.major > FP_KERNEL_VERSION) {
    /* kernel will retry with our major */
    reply_data(t->fd, h->unique, &out, FP_COMPAT_22_INIT_OUT_SIZE, NULL, 0);
    return;
  }
  if (in.major < FP_KERNEL_VERSION) { reply_err(t->fd, h->unique, EPROTO); return; }
  if (in.minor < out.minor) out.minor = in.minor;
  out.max_readahead = in.max_readahead;
  uint32_t want = FP_ASYNC_READ | FP_BIG_WRITES | FP_MAX_PAGES | FP_PARALLEL_DIROPS | FP_ASYNC_DIO;
  out.flags = in.flags & want;
  out.max_background = 64;
  out.congestion_threshold = 48;
  out.max_write = s->max_write;
  out.time_gran = 1;
  uint32_t mp = s->max_write / 4096;
  out.max_pages = (uint16_t)(mp > 65535 ? 65535 : mp);
  size_t outsz = in.minor < 23 ? FP_COMPAT_22_INIT_OUT_SIZE : sizeof out;
  reply_data(t->fd, h->unique, &out, outsz, NULL, 0);
  post_event(s, EV_INIT, 0);
}

static void handle(tctx_t *t, uint8_t *buf, size_t n) {
  server_t *s = t->s;
  int fd = t->fd;
  if (n < sizeof(struct fp_in_header)) return;
  struct fp_in_header *h = (struct fp_in_header *)buf;
  if (h->len != n) {
    if (h->len > n || h->len < sizeof *h) { reply_err(fd, h->unique, EIO); return; }
    n = h->len;
  }
  uint8_t *arg = buf + sizeof *h;
  size_t alen = n - sizeof *h;
  int err = 0, fidx = -1;
  file_t *f;
  node_t *nd;

  switch (h->opcode) {
  case FP_INIT:
    do_init(t, h, arg, alen);
    return;
  case FP_FORGET:
  case FP_BATCH_FORGET:
  case FP_INTERRUPT:
  case FP_NOTIFY_REPLY:
    return;
  case FP_DESTROY:
    reply_err(fd, h->unique, 0);
    return;
  case FP_LOOKUP: {
    nd = get_node(s, h->nodeid);
    if (!nd || !nd->is_dir) { reply_err(fd, h->unique, nd ? ENOTDIR : ENOENT); return; }
    if (alen == 0 || memchr(arg, 0, alen) == NULL) { reply_err(fd, h->unique, EINVAL); return; }
    const char *name = (const char *)arg;
    node_t *found = NULL;
    if (strcmp(name, ".") == 0) found = nd;
    else if (strcmp(name, "..") == 0) found = get_node(s, nd->parent);
    else
      for (size_t i = 0; i < s->nnodes; i++)
        if (s->nodes[i].parent == nd->ino && s->nodes[i].ino != nd->ino &&
            strcmp(s->nodes[i].name, name) == 0) { found = &s->nodes[i]; break; }
    if (!found) { reply_err(fd, h->unique, ENOENT); return; }
    struct fp_entry_out eo;
    memset(&eo, 0, sizeof eo);
    eo.nodeid = found->ino;
    eo.entry_valid = 1;
    eo.attr_valid = 1;
    fill_attr(s, found, &eo.attr);
    reply_data(fd, h->unique, &eo, sizeof eo, NULL, 0);
    return;
  }
  case FP_GETATTR: {
    nd = get_node(s, h->nodeid);
    if (!nd) { reply_err(fd, h->unique, ENOENT); return; }
    struct fp_attr_out ao;
    memset(&ao, 0, sizeof ao);
    ao.attr_valid = 1;
    fill_attr(s, nd, &ao.attr);
    reply_data(fd, h->unique, &ao, sizeof ao, NULL, 0);
    return;
  }
  case FP_SETATTR: {
    nd = get_node(s, h->nodeid);
    if (!nd) { reply_err(fd, h->unique, ENOENT); return; }
    if (alen < sizeof(struct fp_setattr_in)) { reply_err(fd, h->unique, EINVAL); return; }
    struct fp_setattr_in si;
    memcpy(&si, arg, sizeof si);
    if (si.valid & FP_FATTR_SIZE) {
      if (nd->is_dir) { reply_err(fd, h->unique, EISDIR); return; }
      f = &s->files[nd->file];
      if (si.size != __atomic_load_n(&f->size, __ATOMIC_RELAXED)) {
        reply_err(fd, h->unique, f->read_only ? EROFS : EPERM);
        return;
      }
    }
    struct fp_attr_out ao;
    memset(&ao, 0, sizeof ao);
    ao.attr_valid = 1;
    fill_attr(s, nd, &ao.attr);
    reply_data(fd, h->unique, &ao, sizeof ao, NULL, 0);
    return;
  }
  case FP_OPEN: {
    f = file_of(s, h->nodeid, &fidx, &err);
    if (!f) { reply_err(fd, h->unique, err); return; }
    if (alen < sizeof(struct fp_open_in)) { reply_err(fd, h->unique, EINVAL); return; }
    struct fp_open_in oi;
    memcpy(&oi, arg, sizeof oi);
    if (f->read_only && (oi.flags & O_ACCMODE) != O_RDONLY) { reply_err(fd, h->unique, EROFS); return; }
    struct fp_open_out oo = {.fh = 0, .open_flags = FP_FOPEN_DIRECT_IO | FP_FOPEN_PARALLEL_DIRECT_WRITES};
    reply_data(fd, h->unique, &oo, sizeof oo, NULL, 0);
    return;
  }
  case FP_OPENDIR: {
    nd = get_node(s, h->nodeid);
    if (!nd) { reply_err(fd, h->unique, ENOENT); return; }
    if (!nd->is_dir) { reply_err(fd, h->unique, ENOTDIR); return; }
    struct fp_open_out oo = {0};
    reply_data(fd, h->unique, &oo, sizeof oo, NULL, 0);
    return;
  }
  case FP_READDIR: {
    nd = get_node(s, h->nodeid);
    if (!nd || !nd->is_dir) { reply_err(fd, h->unique, nd ? ENOTDIR : ENOENT); return; }
    if (alen < sizeof(struct fp_read_in)) { reply_err(fd, h->unique, EINVAL); return; }
    struct fp_read_in ri;
    memcpy(&ri, arg, sizeof ri);
    size_t cap = ri.size < s->max_write ? ri.size : s->max_write;
    uint8_t *out = t->data;
    size_t used = 0;
    uint64_t idx = 0;
    /* entry list: ".", "..", then children in node order */
    for (size_t i = 0; i < s->nnodes + 2; i++) {
      node_t *c;
      const char *name;
      if (i == 0) { c = nd; name = "."; }
      else if (i == 1) { c = get_node(s, nd->parent); name = ".."; }
      else {
        c = &s->nodes[i - 2];
        if (c->parent != nd->ino || c->ino == nd->ino) continue;
        name = c->name;
      }
      idx++;
      if (idx <= ri.offset) continue;
      size_t nl = strlen(name);
      size_t rec = FP_DIRENT_ALIGN(FP_NAME_OFFSET + nl);
      if (used + rec > cap) break;
      struct fp_dirent *d = (struct fp_dirent *)(out + used);
      memset(d, 0, rec);
      d->ino = c->ino;
      d->off = idx;
      d->namelen = (uint32_t)nl;
      d->type = c->is_dir ? 4 : 8;
      memcpy(d->name, name, nl);
      used += rec;
    }
    reply_data(fd, h->unique, out, used, NULL, 0);
    return;
  }
  case FP_RELEASEDIR:
  case FP_RELEASE:
  case FP_FLUSH:
  case FP_FSYNCDIR:
  case FP_ACCESS:
    reply_err(fd, h->unique, 0);
    return;
  case FP_STATFS: {
    struct fp_kstatfs st;
    memset(&st, 0, sizeof st);
    uint64_t total = 0;
    for (size_t i = 0; i < s->nfiles; i++) total += __atomic_load_n(&s->files[i].size, __ATOMIC_RELAXED);
    st.blocks = (total + 4095) / 4096;
    st.files = s->nnodes;
    st.bsize = 4096;
    st.frsize = 4096;
    st.namelen = 255;
    reply_data(fd, h->unique, &st, sizeof st, NULL, 0);
    return;
  }
  case FP_GETXATTR:
  case FP_LISTXATTR:
  case FP_SETXATTR:
  case FP_REMOVEXATTR:
    reply_err(fd, h->unique, ENOSYS);
    return;
  case FP_MKNOD: case FP_MKDIR: case FP_UNLINK: case FP_RMDIR: case FP_RENAME:
  case FP_RENAME2: case FP_LINK: case FP_SYMLINK: case FP_CREATE: case FP_TMPFILE:
    reply_err(fd, h->unique, EPERM);
    return;
  case FP_READ: {
    f = file_of(s, h->nodeid, &fidx, &err);
    if (!f) { reply_err(fd, h->unique, err); return; }
    if (alen < sizeof(struct fp_read_in)) { reply_err(fd, h->unique, EINVAL); return; }
    struct fp_read_in ri;
    memcpy(&ri, arg, sizeof ri);
    uint64_t size = __atomic_load_n(&f->size, __ATOMIC_RELAXED);
    uint64_t off = ri.offset, len = ri.size;
    if (off >= size) { reply_data(fd, h->unique, NULL, 0, NULL, 0); return; }
    if (len > size - off) len = size - off;
    if (len == 0) { reply_data(fd, h->unique, NULL, 0, NULL, 0); return; }
    if (len <= s->max_write && native_read(s, t, fd, fidx, f, h->unique, off, len, t->data)) return;
    jsreq_t *r = new_req(fd, h->unique, fidx, OP_READ, off, len);
    if (!r) { reply_err(fd, h->unique, ENOMEM); return; }
    enqueue(s, r);
    return;
  }
  case FP_WRITE: {
    f = file_of(s, h->nodeid, &fidx, &err);
    if (!f) { reply_err(fd, h->unique, err); return; }
    if (alen < sizeof(struct fp_write_in)) { reply_err(fd, h->unique, EINVAL); return; }
    struct fp_write_in wi;
    memcpy(&wi, arg, sizeof wi);
    const uint8_t *payload = arg + sizeof wi;
    if (wi.size > alen - sizeof wi) { reply_err(fd, h->unique, EINVAL); return; }
    if (f->read_only) { reply_err(fd, h->unique, EROFS); return; }
    uint64_t size = __atomic_load_n(&f->size, __ATOMIC_RELAXED);
    uint64_t off = wi.offset, len = wi.size;
    if (len == 0) {
      struct fp_write_out wo = {0};
      reply_data(fd, h->unique, &wo, sizeof wo, NULL, 0);
      return;
    }
    if (off >= size) { reply_err(fd, h->unique, ENOSPC); return; }
    if (len > size - off) len = size - off;
    if (len <= s->max_write && native_write(s, t, fd, fidx, f, h->unique, off, len, payload)) return;
    jsreq_t *r = new_req(fd, h->unique, fidx, OP_WRITE, off, len);
    if (!r || !(r->data = malloc(len ? len : 1))) { free(r); reply_err(fd, h->unique, ENOMEM); return; }
    memcpy(r->data, payload, len);
    enqueue(s, r);
    return;
  }
  case FP_FSYNC: {
    f = file_of(s, h->nodeid, &fidx, &err);
    if (!f) { reply_err(fd, h->unique, err); return; }
    if (alen < sizeof(struct fp_fsync_in)) { reply_err(fd, h->unique, EINVAL); return; }
    struct fp_fsync_in fi;
    memcpy(&fi, arg, sizeof fi);
    jsreq_t *r = new_req(fd, h->unique, fidx, OP_FSYNC, 0, 0);
    if (!r) { reply_err(fd, h->unique, ENOMEM); return; }
    r->datasync = fi.fsync_flags & 1;
    enqueue(s, r);
    return;
  }
  case FP_LSEEK: {
    f = file_of(s, h->nodeid, &fidx, &err);
    if (!f) { reply_err(fd, h->unique, err); return; }
    if (alen < sizeof(struct fp_lseek_in)) { reply_err(fd, h->unique, EINVAL); return; }
    struct fp_lseek_in li;
    memcpy(&li, arg, sizeof li);
    if (li.whence != 3 && li.whence != 4) { reply_err(fd, h->unique, EINVAL); return; }
    jsreq_t *r = new_req(fd, h->unique, fidx, OP_LSEEK, li.offset, 0);
    if (!r) { reply_err(fd, h->unique, ENOMEM); return; }
    r->whence = li.whence;
    enqueue(s, r);
    return;
  }
  case FP_FALLOCATE: {
    f = file_of(s, h->nodeid, &fidx, &err);
    if (!f) { reply_err(fd, h->unique, err); return; }
    if (alen < sizeof(struct fp_fallocate_in)) { reply_err(fd, h->unique, EINVAL); return; }
    if (f->read_only) { reply_err(fd, h->unique, EROFS); return; }
    struct fp_fallocate_in fa;
    memcpy(&fa, arg, sizeof fa);
    jsreq_t *r = new_req(fd, h->unique, fidx, OP_FALLOCATE, fa.offset, fa.length);
    if (!r) { reply_err(fd, h->unique, ENOMEM); return; }
    r->mode = fa.mode;
    enqueue(s, r);
    return;
  }
  default:
    reply_err(fd, h->unique, ENOSYS);
    return;
  }
}

static void wake_handler(int sig) { (void)sig; }

static void *worker_main(void *arg) {
  worker_t *w = arg;
  server_t *s = w->srv;
  sigset_t set;
  sigfillset(&set);
  sigdelset(&set, WAKE_SIG);
  pthread_sigmask(SIG_SETMASK, &set, NULL);

  size_t bufsz = (size_t)s->max_write + 4096 + 4096;
  if (bufsz < 8192 * 2) bufsz = 8192 * 2;
  uint8_t *buf = malloc(bufsz);
  void *data = NULL;
  if (posix_memalign(&data, 4096, s->max_write) != 0) data = NULL;
  int err = 0;
  if (!buf || !data) err = ENOMEM;
  tctx_t *tp = calloc(1, sizeof *tp);
  if (!tp) err = ENOMEM;
  tctx_t dummy = {0};
  tctx_t *t = tp ? tp : &dummy;
  t->s = s;
  t->w = w;
  t->fd = w->fd;
  t->data = data;
  t->npieces = s->max_write / 512 + 2;
  t->pieces = tp ? malloc(t->npieces * sizeof(extent_t)) : NULL;
  if (!t->pieces) { t->npieces = 0; err = ENOMEM; }
  while (!err && !__atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE)) {
    ssize_t r = read(w->fd, buf, bufsz);
    if (r < 0) {
      int e = errno;
      if (e == EINTR || e == EAGAIN || e == ENOENT) continue;
      if (e == ENODEV) break;
      err = e;
      break;
    }
    handle(t, buf, (size_t)r);
  }
  if (tp) { crypt_tls_free(&tp->crypt); free(tp->pieces); free(tp); }
  free(buf);
  free(data);
  if (err) {
    int zero = 0;
    __atomic_compare_exchange_n(&s->exit_err, &zero, err, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  }
  if (__atomic_sub_fetch(&s->alive, 1, __ATOMIC_ACQ_REL) == 0) {
    /* last one out: tell JS, and let the tsfn stop holding the loop */
    post_event(s, EV_EXIT, __atomic_load_n(&s->exit_err, __ATOMIC_ACQUIRE));
    napi_release_threadsafe_function(s->tsfn, napi_tsfn_release);
  }
  return NULL;
}

/* -------------------------------------------------------------------- mount -- */

static void append_escaped(char *dst, size_t cap, const char *src) {
  size_t n = strlen(dst);
  for (; *src && n + 2 < cap; src++) {
    if (*src == ',' || *src == '\\') dst[n++] = '\\';
    dst[n++] = *src;
  }
  dst[n] = 0;
}

static int mount_fusermount(const char *mnt, const char *fsname, const char *subtype, int allow_other,
                            char *errbuf, size_t errcap) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
    snprintf(errbuf, errcap, "socketpair: %s", strerror(errno));
    return -1;
  }
  char opts[4096] = "fsname=";
  append_escaped(opts, sizeof opts, fsname);
  strncat(opts, ",subtype=", sizeof opts - strlen(opts) - 1);
  append_escaped(opts, sizeof opts, subtype);
  strncat(opts, ",nosuid,nodev,default_permissions", sizeof opts - strlen(opts) - 1);
  if (allow_other) strncat(opts, ",allow_other", sizeof opts - strlen(opts) - 1);

  /* capture fusermount3's stderr so its reason ends up in our one-line error */
  int ep[2] = {-1, -1};
  if (pipe2(ep, O_CLOEXEC) < 0) ep[0] = ep[1] = -1;
  /* the child end is dup2'ed to another number in the child, which clears CLOEXEC there */
  int target = 3;
  while (target == sv[1] || target == ep[1]) target++;
  size_t ne = 0;
  while (environ && environ[ne]) ne++;
  char **envp = calloc(ne + 2, sizeof(char *));
  if (!envp) {
    close(sv[0]); close(sv[1]);
    if (ep[0] >= 0) { close(ep[0]); close(ep[1]); }
    snprintf(errbuf, errcap, "out of memory");
    return -1;
  }
  char commfd[64];
  snprintf(commfd, sizeof commfd, "_FUSE_COMMFD=%d", target);
  size_t k = 0;
  for (size_t i = 0; i < ne; i++)
    if (strncmp(environ[i], "_FUSE_COMMFD=", 13) != 0) envp[k++] = environ[i];
  envp[k++] = commfd;
  envp[k] = NULL;

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (ep[1] >= 0) posix_spawn_file_actions_adddup2(&fa, ep[1], 2);
  posix_spawn_file_actions_adddup2(&fa, sv[1], target);
  char *argv[] = {"fusermount3", "-o", opts, "--", (char *)mnt, NULL};
  pid_t pid;
  int rc = posix_spawnp(&pid, "fusermount3", &fa, NULL, argv, envp);
  posix_spawn_file_actions_destroy(&fa);
  free(envp);
  close(sv[1]);
  if (ep[1] >= 0) close(ep[1]);
  if (rc != 0) {
    close(sv[0]);
    if (ep[0] >= 0) close(ep[0]);
    if (rc == ENOENT) snprintf(errbuf, errcap, "fusermount3 not found (install the fuse3 package)");
    else snprintf(errbuf, errcap, "fusermount3: %s", strerror(rc));
    return -1;
  }
  char byte;
  struct iovec iov = {&byte, 1};
  union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } cbuf;
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf.b;
  msg.msg_controllen = sizeof cbuf.b;
  ssize_t r;
  do r = recvmsg(sv[0], &msg, MSG_CMSG_CLOEXEC); while (r < 0 && errno == EINTR);
  int fusefd = -1;
  if (r > 0) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(&fusefd, CMSG_DATA(c), sizeof(int));
  }
  close(sv[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  char emsg[512] = "";
  size_t el = 0;
  if (ep[0] >= 0) {
    for (;;) {
      ssize_t k = read(ep[0], emsg + el, sizeof emsg - 1 - el);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) break;
      el += (size_t)k;
      if (el >= sizeof emsg - 1) break;
    }
    emsg[el] = 0;
    close(ep[0]);
    /* first line only */
    char *nl = strchr(emsg, '\n');
    if (nl) *nl = 0;
  }
  if (fusefd < 0) {
    if (emsg[0]) snprintf(errbuf, errcap, "%s", emsg);
    else if (WIFEXITED(status)) snprintf(errbuf, errcap, "fusermount3 failed (exit status %d)", WEXITSTATUS(status));
    else snprintf(errbuf, errcap, "fusermount3 failed");
    return -1;
  }
  if (emsg[0]) fprintf(stderr, "%s\n", emsg); /* warnings from a successful mount */
  return fusefd;
}

static int mount_direct(const char *mnt, const char *fsname, const char *subtype, int allow_other,
                        char *errbuf, size_t errcap) {
  int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    snprintf(errbuf, errcap, "/dev/fuse: %s", strerror(errno));
    return -1;
  }
  char data[256];
  snprintf(data, sizeof data, "fd=%d,rootmode=40000,user_id=%u,group_id=%u,default_permissions%s", fd,
           (unsigned)getuid(), (unsigned)getgid(), allow_other ? ",allow_other" : "");
  char type[256];
  if (subtype && *subtype) snprintf(type, sizeof type, "fuse.%s", subtype);
  else snprintf(type, sizeof type, "fuse");
  if (mount(fsname && *fsname ? fsname : "imgmount", mnt, type, MS_NOSUID | MS_NODEV, data) < 0) {
    snprintf(errbuf, errcap, "mount %s: %s", mnt, strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

static int build_tree(server_t *s, char **paths, size_t nfiles, char *errbuf, size_t errcap) {
  size_t cap = 1 + nfiles * 4 + 4;
  s->nodes = calloc(cap, sizeof(node_t));
  if (!s->nodes) return ENOMEM;
  s->nodes[0] = (node_t){.ino = 1, .parent = 1, .name = strdup(""), .is_dir = 1, .file = -1};
  s->nnodes = 1;
  for (size_t i = 0; i < nfiles; i++) {
    char *p = paths[i];
    uint64_t parent = 1;
    char *save = NULL;
    char *tok = strtok_r(p, "/", &save);
    if (!tok) { snprintf(errbuf, errcap, "invalid file path"); return EINVAL; }
    while (tok) {
      char *next = strtok_r(NULL, "/", &save);
      if (strcmp(tok, ".") == 0 || strcmp(tok, "..") == 0 || strlen(tok) > 255) {
        snprintf(errbuf, errcap, "invalid file path component '%s'", tok);
        return EINVAL;
      }
      node_t *found = NULL;
      for (size_t j = 1; j < s->nnodes; j++)
        if (s->nodes[j].parent == parent && strcmp(s->nodes[j].name, tok) == 0) { found = &s->nodes[j]; break; }
      if (found) {
        if (!next || !found->is_dir) { snprintf(errbuf, errcap, "duplicate file path '%s'", tok); return EINVAL; }
        parent = found->ino;
      } else {
        if (s->nnodes >= cap) {
          size_t nc = cap * 2;
          node_t *nn = realloc(s->nodes, nc * sizeof(node_t));
          if (!nn) return ENOMEM;
          s->nodes = nn;
          cap = nc;
        }
        node_t *nd = &s->nodes[s->nnodes];
        nd->ino = s->nnodes + 1;
        nd->parent = parent;
        nd->name = strdup(tok);
        nd->is_dir = next != NULL;
        nd->file = next ? -1 : (int)i;
        s->nnodes++;
        if (!next) s->files[i].ino = nd->ino;
        parent = nd->ino;
      }
      tok = next;
    }
  }
  return 0;
}

static void ext_finalize(napi_env env, void *data, void *hint) {
  server_t *s = data;
  server_unref(s);
}

static napi_value js_fuse_mount(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) { napi_throw_type_error(env, NULL, "fuseMount(opts) needs an options object"); return NULL; }
  napi_value o = argv[0];
  char errbuf[600] = "";

  static int sig_installed = 0;
  if (!sig_installed) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = wake_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: a blocked read() returns EINTR */
    sigaction(WAKE_SIG, &sa, NULL);
    sig_installed = 1;
  }

  server_t *s = calloc(1, sizeof *s);
  if (!s) { napi_throw_error(env, NULL, "out of memory"); return NULL; }
  pthread_mutex_init(&s->qlock, NULL);
  s->fd = -1;
  s->refs = 1;
  char *mnt = NULL, *fsname = NULL, *subtype = NULL;
  char **paths = NULL;
  napi_value files_v = NULL;
  uint32_t nfiles = 0;
  int threads = 1, allow_other = 0;
  double maxw = 1 << 20;
  bool b;
  napi_value v;

  mnt = get_string(env, get_prop(env, o, "mountpoint"));
  fsname = get_string(env, get_prop(env, o, "fsname"));
  subtype = get_string(env, get_prop(env, o, "subtype"));
  if (!mnt) { napi_throw_type_error(env, NULL, "fuseMount: mountpoint must be a string"); goto fail_nothrow; }
  if (!fsname) fsname = strdup("imgmount");
  if (!subtype) subtype = strdup("imgmount");
  v = get_prop(env, o, "allowOther");
  if (v && napi_get_value_bool(env, v, &b) == napi_ok) allow_other = b;
  v = get_prop(env, o, "threads");
  if (v) get_int(env, v, &threads);
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  v = get_prop(env, o, "maxWrite");
  if (v) get_double(env, v, &maxw);
  if (!(maxw >= 4096)) maxw = 4096;
  if (maxw > 16 << 20) maxw = 16 << 20;
  s->max_write = ((uint32_t)maxw) & ~4095u;
  int tmp;
  if (get_int(env, get_prop(env, o, "uid"), &tmp)) s->uid = (uint32_t)tmp; else s->uid = getuid();
  if (get_int(env, get_prop(env, o, "gid"), &tmp)) s->gid = (uint32_t)tmp; else s->gid = getgid();
  s->nthreads = threads;

  files_v = get_prop(env, o, "files");
  bool isarr = false;
  if (!files_v || napi_is_array(env, files_v, &isarr) != napi_ok || !isarr) {
    napi_throw_type_error(env, NULL, "fuseMount: files must be an array");
    goto fail_nothrow;
  }
  napi_get_array_length(env, files_v, &nfiles);
  s->files = calloc(nfiles ? nfiles : 1, sizeof(file_t));
  paths = calloc(nfiles ? nfiles : 1, sizeof(char *));
  if (!s->files || !paths) { napi_throw_error(env, NULL, "out of memory"); goto fail_nothrow; }
  for (uint32_t i = 0; i < nfiles; i++) {
    napi_value fv;
    napi_get_element(env, files_v, i, &fv);
    file_t *f = &s->files[i];
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&f->lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    s->nfiles = i + 1;
    paths[i] = get_string(env, get_prop(env, fv, "path"));
    if (!paths[i] || !get_u64(env, get_prop(env, fv, "size"), &f->size)) {
      napi_throw_type_error(env, NULL, "fuseMount: each file needs a path and a size");
      goto fail_nothrow;
    }
    if (!get_u64(env, get_prop(env, fv, "blocks"), &f->blocks)) f->blocks = (f->size + 511) / 512;
    v = get_prop(env, fv, "readOnly");
    if (v && napi_get_value_bool(env, v, &b) == napi_ok) f->read_only = b;
  }
  if (build_tree(s, paths, nfiles, errbuf, sizeof errbuf) != 0) {
    napi_throw_error(env, NULL, errbuf[0] ? errbuf : "out of memory");
    goto fail_nothrow;
  }

  napi_value fn;
  napi_valuetype t;
  const char *cbn[3] = {"onRequests", "onInit", "onExit"};
  napi_ref *refs[3] = {&s->on_requests, &s->on_init, &s->on_exit};
  for (int i = 0; i < 3; i++) {
    fn = get_prop(env, o, cbn[i]);
    if (!fn || napi_typeof(env, fn, &t) != napi_ok || t != napi_function) {
      char m[80];
      snprintf(m, sizeof m, "fuseMount: %s must be a function", cbn[i]);
      napi_throw_type_error(env, NULL, m);
      goto fail_nothrow;
    }
    napi_create_reference(env, fn, 1, refs[i]);
  }
  fn = get_prop(env, o, "onNotify"); /* optional */
  if (fn && napi_typeof(env, fn, &t) == napi_ok && t == napi_function) napi_create_reference(env, fn, 1, &s->on_notify);

  s->mtime = time(NULL);
  /* IMGMOUNT_FUSERMOUNT=1 forces the fusermount3 path even as root (for tests) */
  const char *force_fm = getenv("IMGMOUNT_FUSERMOUNT");
  if (geteuid() == 0 && !(force_fm && strcmp(force_fm, "1") == 0)) s->fd = mount_direct(mnt, fsname, subtype, allow_other, errbuf, sizeof errbuf);
  else s->fd = mount_fusermount(mnt, fsname, subtype, allow_other, errbuf, sizeof errbuf);
  if (s->fd < 0) { napi_throw_error(env, NULL, errbuf); goto fail_nothrow; }

  napi_value name;
  napi_create_string_utf8(env, "imgmount-fuse", NAPI_AUTO_LENGTH, &name);
  s->refs = 2; /* external + tsfn */
  if (napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, s, tsfn_finalize, s, tsfn_call_js,
                                      &s->tsfn) != napi_ok) {
    s->refs = 1;
    umount2(mnt, MNT_DETACH);
    close(s->fd);
    s->fd = -1;
    napi_throw_error(env, NULL, "cannot create threadsafe function");
    goto fail_nothrow;
  }
  /* From here on the tsfn finalizer owns the refs and one server ref. */

  /* one fd per thread: clone the main fd when the kernel supports it */
  for (int i = 0; i < threads; i++) {
    worker_t *w = &s->workers[i];
    w->srv = s;
    w->fd = s->fd;
    if (i > 0) {
      int cfd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
      if (cfd >= 0) {
        uint32_t master = (uint32_t)s->fd;
        if (ioctl(cfd, FP_DEV_IOC_CLONE, &master) == 0) w->fd = cfd;
        else close(cfd);
      }
    }
  }
  s->alive = threads;
  pthread_attr_t pa;
  pthread_attr_init(&pa);
  pthread_attr_setstacksize(&pa, 256 * 1024);
  int started = 0;
  for (int i = 0; i < threads; i++) {
    if (pthread_create(&s->workers[i].tid, &pa, worker_main, &s->workers[i]) == 0) {
      s->workers[i].started = 1;
      started++;
    }
  }
  pthread_attr_destroy(&pa);
  if (started < threads) {
    /* account for threads that never ran */
    int missing = threads - started;
    if (__atomic_sub_fetch(&s->alive, missing, __ATOMIC_ACQ_REL) == 0) {
      post_event(s, EV_EXIT, EAGAIN);
      napi_release_threadsafe_function(s->tsfn, napi_tsfn_release);
    }
  }
  for (uint32_t i = 0; i < nfiles; i++) free(paths[i]);
  free(paths);
  free(mnt); free(fsname); free(subtype);

  napi_value ext;
  NAPI_CALL(env, napi_create_external(env, s, ext_finalize, NULL, &ext));
  return ext;

fail_nothrow:
  if (paths) { for (uint32_t i = 0; i < nfiles; i++) free(paths[i]); free(paths); }
  free(mnt); free(fsname); free(subtype);
  for (int i = 0; i < 3; i++) {
    napi_ref *r = i == 0 ? &s->on_requests : i == 1 ? &s->on_init : &s->on_exit;
    if (*r) napi_delete_reference(env, *r);
    *r = NULL;
  }
  if (s->on_notify) napi_delete_reference(env, s->on_notify);
  s->on_notify = NULL;
  server_free(s);
  return NULL;
}

static server_t *get_srv(napi_env env, napi_value v) {
  void *p = NULL;
  napi_valuetype t;
  if (!v || napi_typeof(env, v, &t) != napi_ok || t != napi_external ||
      napi_get_value_external(env, v, &p) != napi_ok || !p) {
    napi_throw_type_error(env, NULL, "not a FuseServer");
    return NULL;
  }
  return p;
}

/* ------------------------------------------------------------ JS entry points -- */

static void free_cb(napi_env env, void *data, void *hint) { free(data); }

static napi_value js_take_requests(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  server_t *s = get_srv(env, argc ? argv[0] : NULL);
  if (!s) return NULL;
  pthread_mutex_lock(&s->qlock);
  jsreq_t *list = s->qhead;
  s->qhead = s->qtail = NULL;
  s->notify_pending = 0;
  pthread_mutex_unlock(&s->qlock);
  napi_value arr;
  NAPI_CALL(env, napi_create_array(env, &arr));
  uint32_t idx = 0;
  while (list) {
    jsreq_t *r = list;
    list = r->next;
    if (s->fds_closed) { free(r->data); free(r); continue; }
    napi_value o;
    napi_create_object(env, &o);
    napi_set_named_property(env, o, "id", make_num(env, (double)r->unique));
    napi_set_named_property(env, o, "file", make_num(env, r->file));
    napi_value opv;
    napi_create_string_utf8(env, op_names[r->op], NAPI_AUTO_LENGTH, &opv);
    napi_set_named_property(env, o, "op", opv);
    napi_set_named_property(env, o, "offset", make_num(env, (double)r->offset));
    napi_set_named_property(env, o, "length", make_num(env, (double)r->length));
    if (r->op == OP_WRITE) {
      napi_value bufv;
      if (napi_create_external_buffer(env, r->length, r->data, free_cb, NULL, &bufv) == napi_ok) {
        r->data = NULL; /* owned by the Buffer now */
      } else {
        bool pend = false;
        napi_is_exception_pending(env, &pend);
        if (pend) { napi_value e; napi_get_and_clear_last_exception(env, &e); }
        void *p;
        napi_create_buffer_copy(env, r->length, r->data, &p, &bufv);
        free(r->data);
        r->data = NULL;
      }
      napi_set_named_property(env, o, "data", bufv);
    } else if (r->op == OP_LSEEK) {
      napi_set_named_property(env, o, "whence", make_num(env, r->whence));
    } else if (r->op == OP_FALLOCATE) {
      napi_set_named_property(env, o, "mode", make_num(env, r->mode));
    } else if (r->op == OP_FSYNC) {
      napi_value bv;
      napi_get_boolean(env, r->datasync != 0, &bv);
      napi_set_named_property(env, o, "datasync", bv);
    }
    napi_set_element(env, arr, idx++, o);
    size_t bkt = r->unique % PEND_BUCKETS;
    r->next = s->pending[bkt];
    s->pending[bkt] = r;
  }
  return arr;
}

static napi_value js_reply(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  server_t *s = get_srv(env, argc ? argv[0] : NULL);
  if (!s) return NULL;
  uint64_t id;
  if (argc < 3 || !get_u64(env, argv[1], &id)) { napi_throw_type_error(env, NULL, "reply(srv, id, errno, payload)"); return NULL; }
  int e = 0;
  if (!get_int(env, argv[2], &e)) { napi_throw_type_error(env, NULL, "reply: errno must be a number"); return NULL; }
  if (e < 0) e = -e;
  size_t bkt = id % PEND_BUCKETS;
  jsreq_t **pp = &s->pending[bkt], *r = NULL;
  while (*pp) {
    if ((*pp)->unique == id) { r = *pp; *pp = r->next; break; }
    pp = &(*pp)->next;
  }
  if (!r) return NULL; /* unknown or already answered */
  if (s->fds_closed) { free(r->data); free(r); return NULL; }
  napi_valuetype pt = napi_undefined;
  if (argc >= 4) napi_typeof(env, argv[3], &pt);
  if (e) {
    reply_err(r->fd, r->unique, e);
  } else if (r->op == OP_READ) {
    uint8_t *p = NULL;
    size_t n = 0;
    if (argc >= 4 && pt != napi_undefined && pt != napi_null && !get_bytes(env, argv[3], &p, &n)) {
      reply_err(r->fd, r->unique, EIO); /* answer anyway so the kernel request does not hang */
      free(r->data);
      free(r);
      napi_throw_type_error(env, NULL, "reply: read payload must be a Buffer");
      return NULL;
    }
    if (n > r->length) n = r->length;
    reply_data(r->fd, r->unique, p, n, NULL, 0);
  } else if (r->op == OP_WRITE) {
    double d = (double)r->length;
    if (pt == napi_number || pt == napi_bigint) get_double(env, argv[3], &d);
    if (d < 0) d = 0;
    if (d > (double)r->length) d = (double)r->length;
    struct fp_write_out wo = {.size = (uint32_t)d};
    reply_data(r->fd, r->unique, &wo, sizeof wo, NULL, 0);
  } else if (r->op == OP_LSEEK) {
    int64_t off = 0;
    if (!(pt == napi_number || pt == napi_bigint) || !get_i64(env, argv[3], &off) || off < 0) {
      reply_err(r->fd, r->unique, off < 0 ? (int)-off : EIO);
    } else {
      struct fp_lseek_out lo = {.offset = (uint64_t)off};
      reply_data(r->fd, r->unique, &lo, sizeof lo, NULL, 0);
    }
  } else {
    reply_err(r->fd, r->unique, 0);
  }
  free(r->data);
  free(r);
  return NULL;
}

static int cmp_ext(const void *a, const void *b) {
  const extent_t *x = a, *y = b;
  return x->guest < y->guest ? -1 : x->guest > y->guest;
}

/* Remove from `old` every part overlapping the (sorted, non-overlapping) ranges of `cut`,
 * then merge in `add` (may be NULL). Result is freshly allocated. */
static int map_rebuild(const extmap_t *old, const extent_t *cut, size_t ncut, const extent_t *add, size_t nadd,
                       int compact, extmap_t *out) {
  /* Only old entries that can overlap [cut[0].guest, end of last cut) are processed one
   * by one; the untouched prefix and suffix are block-copied (unless compacting, which
   * also drops tombstones everywhere). `add` must lie within that span. */
  size_t i0 = 0, i1 = old->n;
  if (!compact && ncut > 0) {
    uint64_t cs = cut[0].guest, ce = cut[ncut - 1].guest + cut[ncut - 1].len;
    size_t lo = 0, hi = old->n;
    while (lo < hi) { size_t mid = lo + (hi - lo) / 2; if (old->e[mid].guest < cs) lo = mid + 1; else hi = mid; }
    i0 = lo;
    if (i0 > 0 && old->e[i0 - 1].len > 0 && old->e[i0 - 1].guest + old->e[i0 - 1].len > cs) i0--;
    lo = i0; hi = old->n;
    while (lo < hi) { size_t mid = lo + (hi - lo) / 2; if (old->e[mid].guest < ce) lo = mid + 1; else hi = mid; }
    i1 = lo;
  }
  size_t mid_n = i1 - i0;
  size_t cap = old->n + ncut + nadd + 1;
  cap += cap / 8 + 16; /* slack for in-place splits */
  /* splitting an old extent by k cuts yields at most k+1 pieces */
  extent_t *rem = malloc((mid_n + ncut + 1) * sizeof(extent_t));
  extent_t *res = malloc(cap * sizeof(extent_t));
  if (!rem || !res) { free(rem); free(res); return ENOMEM; }
  size_t nrem = 0, c = 0;
  for (size_t i = i0; i < i1; i++) {
    extent_t e = old->e[i];
    if (e.len == 0) continue; /* tombstone */
    uint64_t end = e.guest + e.len;
    while (c < ncut && cut[c].guest + cut[c].len <= e.guest) c++;
    size_t k = c;
    uint64_t pos = e.guest;
    while (pos < end) {
      if (k >= ncut || cut[k].guest >= end) {
        extent_t p = e;
        p.guest = pos; p.len = end - pos; p.host = e.host + (pos - e.guest);
        rem[nrem++] = p;
        break;
      }
      if (cut[k].guest > pos) {
        extent_t p = e;
        p.guest = pos; p.len = cut[k].guest - pos; p.host = e.host + (pos - e.guest);
        rem[nrem++] = p;
      }
      uint64_t cend = cut[k].guest + cut[k].len;
      pos = cend > pos ? cend : pos;
      k++;
    }
  }
  size_t n = 0, dead = 0;
  memcpy(res, old->e, i0 * sizeof(extent_t));
  n = i0;
  /* merge rem and add */
  size_t i = 0, j = 0;
  while (i < nrem || j < nadd) {
    if (j >= nadd || (i < nrem && rem[i].guest < add[j].guest)) res[n++] = rem[i++];
    else res[n++] = add[j++];
  }
  free(rem);
  memcpy(res + n, old->e + i1, (old->n - i1) * sizeof(extent_t));
  n += old->n - i1;
  if (!compact) {
    dead = old->dead; /* upper bound: tombstones in the middle were dropped */
    if (dead > n) dead = n;
  }
  if (n > MAP_CAP_ENTRIES) {
    /* over budget: keep only the newly added entries (misses just go to JS) */
    n = nadd > MAP_CAP_ENTRIES ? MAP_CAP_ENTRIES : nadd;
    memcpy(res, add, n * sizeof(extent_t));
    dead = 0;
  }
  out->e = res;
  out->n = n;
  out->cap = cap;
  out->dead = dead;
  return 0;
}

static void map_swap(file_t *f, extmap_t *nm) {
  pthread_rwlock_wrlock(&f->lock);
  extmap_t old = f->map;
  f->map = *nm;
  pthread_rwlock_unlock(&f->lock);
  free(old.e);
}

/* Invalidate without rebuilding: the overlapped entries are replaced in place by at
 * most a head and a tail piece, the rest become tombstones (len 0, guest = off, so the
 * array stays sorted and lookups in the gap miss). Returns -1 when a rebuild is needed. */
static int map_invalidate_inplace(file_t *f, uint64_t off, uint64_t len) {
  extmap_t *m = &f->map;
  uint64_t end = off + len;
  ssize_t k = map_find(m, off);
  size_t i = (k >= 0 && m->e[k].guest + m->e[k].len > off) ? (size_t)k : (size_t)(k + 1);
  size_t lo = i, hi = m->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (m->e[mid].guest < end) lo = mid + 1; else hi = mid;
  }
  size_t j = lo;
  int any = 0;
  for (size_t x = i; x < j && !any; x++) any = m->e[x].len > 0;
  if (!any) return 0; /* nothing in the map overlaps */
  if (m->dead > 4096 && m->dead > m->n / 4) return -1; /* compact via rebuild */
  extent_t first = m->e[i], last = m->e[j - 1], head = first, tail = last;
  int has_head = first.len > 0 && first.guest < off;
  if (has_head) head.len = off - first.guest;
  int has_tail = last.len > 0 && last.guest + last.len > end;
  if (has_tail) {
    tail.host = last.host + (end - last.guest);
    tail.len = last.guest + last.len - end;
    tail.guest = end;
  }
  size_t removed = j - i, newcount = (size_t)has_head + (size_t)has_tail;
  if (newcount > removed && m->n >= m->cap) return -1;
  pthread_rwlock_wrlock(&f->lock);
  if (newcount > removed) {
    memmove(&m->e[i + 2], &m->e[i + 1], (m->n - i - 1) * sizeof(extent_t));
    m->e[i] = head;
    m->e[i + 1] = tail;
    m->n++;
  } else {
    size_t dead_before = 0;
    for (size_t x = i; x < j; x++) dead_before += m->e[x].len == 0;
    size_t x = i;
    if (has_head) m->e[x++] = head;
    size_t stop = has_tail ? j - 1 : j;
    for (; x < stop; x++) m->e[x] = (extent_t){.guest = off, .len = 0, .fd = -1};
    if (has_tail) m->e[j - 1] = tail;
    m->dead = m->dead - dead_before + (removed - newcount);
  }
  pthread_rwlock_unlock(&f->lock);
  return 0;
}

static file_t *get_file_arg(napi_env env, server_t *s, napi_value v, int *idx) {
  int i;
  if (!get_int(env, v, &i) || i < 0 || (size_t)i >= s->nfiles) {
    napi_throw_range_error(env, NULL, "file index out of range");
    return NULL;
  }
  if (idx) *idx = i;
  return &s->files[i];
}

static napi_value js_set_map(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  server_t *s = get_srv(env, argc ? argv[0] : NULL);
  if (!s) return NULL;
  if (argc < 3) { napi_throw_type_error(env, NULL, "setMap(srv, file, entries)"); return NULL; }
  file_t *f = get_file_arg(env, s, argv[1], NULL);
  if (!f) return NULL;
  bool ista = false;
  napi_typedarray_type type;
  size_t len = 0;
  void *data = NULL;
  if (napi_is_typedarray(env, argv[2], &ista) != napi_ok || !ista ||
      napi_get_typedarray_info(env, argv[2], &type, &len, &data, NULL, NULL) != napi_ok ||
      type != napi_float64_array || len % 5) {
    napi_throw_type_error(env, NULL, "setMap: entries must be a Float64Array of 5-tuples");
    return NULL;
  }
  const double *d = data;
  size_t n = len / 5;
  extent_t *add = malloc((n ? n : 1) * sizeof(extent_t));
  if (!add) { napi_throw_error(env, NULL, "out of memory"); return NULL; }
  size_t k = 0;
  int sorted = 1;
  for (size_t i = 0; i < n; i++) {
    double g = d[i * 5], l = d[i * 5 + 1], fd = d[i * 5 + 2], h = d[i * 5 + 3], fl = d[i * 5 + 4];
    if (!(g >= 0 && g < 9007199254740992.0 && l > 0 && l < 9007199254740992.0 && h >= 0 &&
          h < 9007199254740992.0 && fd >= -1 && fd < 2147483647.0 && fl >= 0 && fl < 65536)) {
      free(add);
      napi_throw_range_error(env, NULL, "setMap: invalid entry");
      return NULL;
    }
    extent_t e = {.guest = (uint64_t)g, .len = (uint64_t)l, .host = (uint64_t)h, .fd = (int32_t)fd,
                  .flags = (uint32_t)fl};
    if (!(e.flags & MAP_F_ZERO) && e.fd < 0) {
      free(add);
      napi_throw_range_error(env, NULL, "setMap: entry without fd");
      return NULL;
    }
    if (k && e.guest < add[k - 1].guest) sorted = 0;
    add[k++] = e;
  }
  if (!sorted) qsort(add, k, sizeof(extent_t), cmp_ext);
  /* drop overlaps (keep the earlier entry, trim the later one) */
  size_t m = 0;
  for (size_t i = 0; i < k; i++) {
    extent_t e = add[i];
    if (m) {
      uint64_t pend = add[m - 1].guest + add[m - 1].len;
      if (e.guest < pend) {
        uint64_t eend = e.guest + e.len;
        if (eend <= pend) continue;
        e.host += pend - e.guest;
        e.len = eend - pend;
        e.guest = pend;
      }
    }
    add[m++] = e;
  }
  extmap_t nm;
  if (map_rebuild(&f->map, add, m, add, m, f->map.dead > 4096 && f->map.dead > f->map.n / 4, &nm) != 0) {
    free(add);
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  free(add);
  map_swap(f, &nm);
  return NULL;
}

/* setCrypt(srv, id, cipher, key, sectorSize, ivBase, ivBits): registers a sector cipher for
 * map entries flagged MAP_CRYPT | id << 8. Returns 0, or an errno when the native side cannot
 * do this cipher (the caller then keeps such ranges out of the map). Each id is set once. */
static napi_value js_set_crypt(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  server_t *s = get_srv(env, argc ? argv[0] : NULL);
  if (!s) return NULL;
  if (argc < 7) { napi_throw_type_error(env, NULL, "setCrypt(srv, id, cipher, key, sectorSize, ivBase, ivBits)"); return NULL; }
  int id = -1, sector = 0, ivbits = -1;
  int64_t ivbase = 0;
  uint8_t *key = NULL;
  size_t keylen = 0;
  if (!get_int(env, argv[1], &id) || !get_bytes(env, argv[3], &key, &keylen) || !get_int(env, argv[4], &sector) ||
      !get_i64(env, argv[5], &ivbase) || !get_int(env, argv[6], &ivbits)) {
    napi_throw_type_error(env, NULL, "setCrypt: bad arguments");
    return NULL;
  }
  if (id < 0 || id >= MAX_CRYPT || s->crypts[id] || keylen == 0 || keylen > 64 || sector < 16 ||
      sector > 65536 || sector % 16 || (ivbits != 0 && ivbits != 32 && ivbits != 64))
    return make_num(env, EINVAL);
#ifdef HAVE_CRYPTO
  char *name = get_string(env, argv[2]);
  if (!name) return make_num(env, EINVAL);
  EVP_CIPHER *cipher = EVP_CIPHER_fetch(NULL, name, NULL);
  free(name);
  if (!cipher) return make_num(env, ENOTSUP);
  int ok = EVP_CIPHER_get_key_length(cipher) == (int)keylen && EVP_CIPHER_get_block_size(cipher) <= 16 &&
           (ivbits == 0 || EVP_CIPHER_get_iv_length(cipher) == 16);
  /* refuse what OpenSSL would refuse later (e.g. XTS with equal key halves) */
  for (int enc = 0; ok && enc < 2; enc++) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    uint8_t iv[16] = {0};
    ok = ctx && EVP_CipherInit_ex(ctx, cipher, NULL, key, ivbits ? iv : NULL, enc) == 1;
    EVP_CIPHER_CTX_free(ctx);
  }
  crypt_t *c = ok ? calloc(1, sizeof *c) : NULL;
  if (!c) { EVP_CIPHER_free(cipher); return make_num(env, ok ? ENOMEM : ENOTSUP); }
  c->cipher = cipher;
  memcpy(c->key, key, keylen);
  c->keylen = (int)keylen;
  c->sector = (uint32_t)sector;
  c->ivbase = ivbase;
  c->ivbits = ivbits;
  __atomic_store_n(&s->crypts[id], c, __ATOMIC_RELEASE);
  return make_num(env, 0);
#else
  return make_num(env, ENOTSUP);
#endif
}

static napi_value js_invalidate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  server_t *s = get_srv(env, argc ? argv[0] : NULL);
  if (!s) return NULL;
  if (argc < 4) { napi_throw_type_error(env, NULL, "invalidate(srv, file, offset, length)"); return NULL; }
  int fidx = -1;
  file_t *f = get_file_arg(env, s, argv[1], &fidx);
  if (!f) return NULL;
  uint64_t off, len;
  if (!get_u64(env, argv[2], &off) || !get_u64(env, argv[3], &len)) {
    napi_throw_type_error(env, NULL, "invalidate: offset and length must be non-negative numbers");
    return NULL;
  }
  if (len == 0) return NULL;
  if (off + len < off) len = UINT64_MAX - off;
  if (map_invalidate_inplace(f, off, len) != 0) {
    extent_t cut = {.guest = off, .len = len};
    extmap_t nm;
    if (map_rebuild(&f->map, &cut, 1, NULL, 0, 1, &nm) != 0) {
      /* fall back to dropping everything: always correct */
      nm.e = NULL;
      nm.n = 0;
    }
    map_swap(f, &nm);
  }
  /* the entries are gone; I/O that took them before may still run */
  map_wait_idle(s, fidx, off, len);
  return NULL;
}

static napi_value js_set_file_attr(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  server_t *s = get_srv(env, argc ? argv[0] : NULL);
  if (!s) return NULL;
  if (argc < 4) { napi_throw_type_error(env, NULL, "setFileAttr(srv, file, size, blocks)"); return NULL; }
  file_t *f = get_file_arg(env, s, argv[1], NULL);
  if (!f) return NULL;
  uint64_t size, blocks;
  if (!get_u64(env, argv[2], &size) || !get_u64(env, argv[3], &blocks)) {
    napi_throw_type_error(env, NULL, "setFileAttr: size and blocks must be non-negative numbers");
    return NULL;
  }
  __atomic_store_n(&f->size, size, __ATOMIC_RELAXED);
  __atomic_store_n(&f->blocks, blocks, __ATOMIC_RELAXED);
  if (!s->fds_closed && s->fd >= 0) {
    struct fp_out_header h = {.len = sizeof h + sizeof(struct fp_notify_inval_inode_out),
                              .error = FP_NOTIFY_INVAL_INODE, .unique = 0};
    struct fp_notify_inval_inode_out n = {.ino = f->ino, .off = 0, .len = 0};
    struct iovec iov[2] = {{&h, sizeof h}, {&n, sizeof n}};
    send_iov(s->fd, iov, 2); /* ENOENT (inode not cached) is fine */
  }
  return NULL;
}

static napi_value js_stop(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  server_t *s = get_srv(env, argc ? argv[0] : NULL);
  if (!s) return NULL;
  if (!s->joined) {
    __atomic_store_n(&s->stopping, 1, __ATOMIC_RELEASE);
    /* wake threads blocked in read(): the signal has no SA_RESTART, so read() fails
     * with EINTR and the loop sees `stopping`. Repeat until all are gone (a signal
     * may land just before a thread enters read()). */
    for (int round = 0; __atomic_load_n(&s->alive, __ATOMIC_ACQUIRE) > 0; round++) {
      for (int i = 0; i < s->nthreads; i++)
        if (s->workers[i].started) pthread_kill(s->workers[i].tid, WAKE_SIG);
      struct timespec ts = {0, round < 10 ? 1000000 : 10000000};
      nanosleep(&ts, NULL);
    }
    for (int i = 0; i < s->nthreads; i++)
      if (s->workers[i].started) pthread_join(s->workers[i].tid, NULL);
    s->joined = 1;
  }
  if (!s->fds_closed) {
    /* closing the last /dev/fuse fd aborts the connection: a still-mounted fs then
     * answers ENOTCONN instead of hanging */
    for (int i = 0; i < s->nthreads; i++)
      if (s->workers[i].fd >= 0 && s->workers[i].fd != s->fd) close(s->workers[i].fd);
    if (s->fd >= 0) close(s->fd);
    for (int i = 0; i < s->nthreads; i++) s->workers[i].fd = -1;
    s->fd = -1;
    s->fds_closed = 1;
    /* drop queued and pending requests */
    pthread_mutex_lock(&s->qlock);
    jsreq_t *r = s->qhead;
    s->qhead = s->qtail = NULL;
    pthread_mutex_unlock(&s->qlock);
    while (r) { jsreq_t *n = r->next; free(r->data); free(r); r = n; }
    for (int b = 0; b < PEND_BUCKETS; b++) {
      r = s->pending[b];
      s->pending[b] = NULL;
      while (r) { jsreq_t *n = r->next; free(r->data); free(r); r = n; }
    }
  }
  return NULL;
}

static napi_value js_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  server_t *s = get_srv(env, argc ? argv[0] : NULL);
  if (!s) return NULL;
  napi_value o;
  NAPI_CALL(env, napi_create_object(env, &o));
  napi_set_named_property(env, o, "nativeReads", make_num(env, (double)__atomic_load_n(&s->st_native_reads, __ATOMIC_RELAXED)));
  napi_set_named_property(env, o, "nativeWrites", make_num(env, (double)__atomic_load_n(&s->st_native_writes, __ATOMIC_RELAXED)));
  napi_set_named_property(env, o, "jsRequests", make_num(env, (double)__atomic_load_n(&s->st_js, __ATOMIC_RELAXED)));
  return o;
}

/* --------------------------------------------------------- system call helpers -- */

static bool args_ints(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return false;
  if (argc < want) { napi_throw_type_error(env, NULL, "missing arguments"); return false; }
  return true;
}

static int lock_type(napi_env env, napi_value v, short *out) {
  char t[4] = "";
  size_t n;
  if (napi_get_value_string_utf8(env, v, t, sizeof t, &n) != napi_ok) return -1;
  if (!strcmp(t, "r")) *out = F_RDLCK;
  else if (!strcmp(t, "w")) *out = F_WRLCK;
  else if (!strcmp(t, "u")) *out = F_UNLCK;
  else return -1;
  return 0;
}

static napi_value js_ofd_set_lock(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (!args_ints(env, info, 4, argv)) return NULL;
  int fd;
  int64_t start, len;
  short type;
  if (!get_int(env, argv[0], &fd) || !get_i64(env, argv[1], &start) || !get_i64(env, argv[2], &len) ||
      lock_type(env, argv[3], &type) < 0) {
    napi_throw_type_error(env, NULL, "ofdSetLock(fd, start, len, 'r'|'w'|'u')");
    return NULL;
  }
  struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len, .l_pid = 0};
  int r;
  do r = fcntl(fd, F_OFD_SETLK, &fl); while (r < 0 && errno == EINTR);
  return make_num(env, r < 0 ? errno : 0);
}

static napi_value js_ofd_get_lock(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (!args_ints(env, info, 4, argv)) return NULL;
  int fd;
  int64_t start, len;
  short type;
  if (!get_int(env, argv[0], &fd) || !get_i64(env, argv[1], &start) || !get_i64(env, argv[2], &len) ||
      lock_type(env, argv[3], &type) < 0 || type == F_UNLCK) {
    napi_throw_type_error(env, NULL, "ofdGetLock(fd, start, len, 'r'|'w')");
    return NULL;
  }
  struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len, .l_pid = 0};
  int r;
  do r = fcntl(fd, F_OFD_GETLK, &fl); while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, "F_OFD_GETLK", errno);
  napi_value res;
  if (fl.l_type == F_UNLCK) { napi_get_null(env, &res); return res; }
  napi_create_object(env, &res);
  napi_value tv;
  napi_create_string_utf8(env, fl.l_type == F_WRLCK ? "w" : "r", 1, &tv);
  napi_set_named_property(env, res, "type", tv);
  napi_set_named_property(env, res, "pid", make_num(env, fl.l_pid));
  return res;
}

static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (!args_ints(env, info, 4, argv)) return NULL;
  int fd, mode;
  int64_t off, len;
  if (!get_int(env, argv[0], &fd) || !get_int(env, argv[1], &mode) || !get_i64(env, argv[2], &off) ||
      !get_i64(env, argv[3], &len)) {
    napi_throw_type_error(env, NULL, "fallocate(fd, mode, offset, len)");
    return NULL;
  }
  int r;
  do r = fallocate(fd, mode, off, len); while (r < 0 && errno == EINTR);
  return make_num(env, r < 0 ? errno : 0);
}

static napi_value js_lseek(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (!args_ints(env, info, 3, argv)) return NULL;
  int fd, whence;
  int64_t off;
  if (!get_int(env, argv[0], &fd) || !get_i64(env, argv[1], &off) || !get_int(env, argv[2], &whence)) {
    napi_throw_type_error(env, NULL, "lseek(fd, offset, whence)");
    return NULL;
  }
  off_t r = lseek(fd, off, whence);
  return make_num(env, r < 0 ? -(double)errno : (double)r);
}

static napi_value js_blk_get_size64(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!args_ints(env, info, 1, argv)) return NULL;
  int fd;
  if (!get_int(env, argv[0], &fd)) { napi_throw_type_error(env, NULL, "blkGetSize64(fd)"); return NULL; }
  uint64_t sz = 0;
  if (ioctl(fd, BLKGETSIZE64, &sz) < 0) return throw_errno(env, "BLKGETSIZE64", errno);
  return make_num(env, (double)sz);
}

static napi_value js_umount(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!args_ints(env, info, 2, argv)) return NULL;
  char *p = get_string(env, argv[0]);
  int flags;
  if (!p || !get_int(env, argv[1], &flags)) {
    free(p);
    napi_throw_type_error(env, NULL, "umount(path, flags)");
    return NULL;
  }
  int r = umount2(p, flags);
  int e = r < 0 ? errno : 0;
  free(p);
  return make_num(env, e);
}

static void aligned_free(napi_env env, void *data, void *hint) {
  size_t sz = (size_t)(uintptr_t)hint;
  int64_t adj;
  napi_adjust_external_memory(env, -(int64_t)sz, &adj);
  free(data);
}

static napi_value js_alloc_aligned(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!args_ints(env, info, 2, argv)) return NULL;
  int64_t size, align;
  if (!get_i64(env, argv[0], &size) || !get_i64(env, argv[1], &align) || size < 0 || align <= 0 ||
      (align & (align - 1)) || align > (1 << 24)) {
    napi_throw_range_error(env, NULL, "allocAligned(size, align): align must be a power of two");
    return NULL;
  }
  if (align < (int64_t)sizeof(void *)) align = sizeof(void *);
  void *p = NULL;
  size_t asz = size ? (size_t)size : 1;
  if (posix_memalign(&p, (size_t)align, asz) != 0) return throw_errno(env, "allocAligned", ENOMEM);
  memset(p, 0, asz);
  napi_value buf;
  napi_status st = napi_create_external_buffer(env, (size_t)size, p, aligned_free, (void *)(uintptr_t)asz, &buf);
  if (st != napi_ok) {
    free(p);
    bool pend = false;
    napi_is_exception_pending(env, &pend);
    if (!pend) napi_throw_error(env, NULL, "allocAligned: external buffers are not allowed in this runtime");
    return NULL;
  }
  int64_t adj;
  napi_adjust_external_memory(env, (int64_t)asz, &adj);
  return buf;
}

static napi_value js_is_aligned(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!args_ints(env, info, 2, argv)) return NULL;
  uint8_t *p;
  size_t n;
  int64_t align;
  if (!get_bytes(env, argv[0], &p, &n) || !get_i64(env, argv[1], &align) || align <= 0) {
    napi_throw_type_error(env, NULL, "isAligned(buf, align)");
    return NULL;
  }
  napi_value r;
  napi_get_boolean(env, ((uintptr_t)p % (uint64_t)align) == 0, &r);
  return r;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"fuseMount", 0, js_fuse_mount, 0, 0, 0, napi_enumerable, 0},
      {"takeRequests", 0, js_take_requests, 0, 0, 0, napi_enumerable, 0},
      {"reply", 0, js_reply, 0, 0, 0, napi_enumerable, 0},
      {"setMap", 0, js_set_map, 0, 0, 0, napi_enumerable, 0},
      {"invalidate", 0, js_invalidate, 0, 0, 0, napi_enumerable, 0},
      {"setCrypt", 0, js_set_crypt, 0, 0, 0, napi_enumerable, 0},
      {"setFileAttr", 0, js_set_file_attr, 0, 0, 0, napi_enumerable, 0},
      {"stop", 0, js_stop, 0, 0, 0, napi_enumerable, 0},
      {"stats", 0, js_stats, 0, 0, 0, napi_enumerable, 0},
      {"ofdSetLock", 0, js_ofd_set_lock, 0, 0, 0, napi_enumerable, 0},
      {"ofdGetLock", 0, js_ofd_get_lock, 0, 0, 0, napi_enumerable, 0},
      {"fallocate", 0, js_fallocate, 0, 0, 0, napi_enumerable, 0},
      {"lseek", 0, js_lseek, 0, 0, 0, napi_enumerable, 0},
      {"blkGetSize64", 0, js_blk_get_size64, 0, 0, 0, napi_enumerable, 0},
      {"umount", 0, js_umount, 0, 0, 0, napi_enumerable, 0},
      {"allocAligned", 0, js_alloc_aligned, 0, 0, 0, napi_enumerable, 0},
      {"isAligned", 0, js_is_aligned, 0, 0, 0, napi_enumerable, 0},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
