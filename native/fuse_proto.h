/* Minimal FUSE kernel protocol definitions (7.38 layout), written for imgmount.
 * Only what the server in imgmount.c uses. Layouts follow the Linux kernel ABI. */
#ifndef IMGMOUNT_FUSE_PROTO_H
#define IMGMOUNT_FUSE_PROTO_H

#include <stdint.h>
#include <sys/ioctl.h>

#define FP_KERNEL_VERSION 7
#define FP_KERNEL_MINOR_VERSION 38
#define FP_MIN_MINOR 31
#define FP_ROOT_ID 1

/* INIT flags */
#define FP_ASYNC_READ       (1u << 0)
#define FP_BIG_WRITES       (1u << 5)
#define FP_ASYNC_DIO        (1u << 15)
#define FP_PARALLEL_DIROPS  (1u << 18)
#define FP_MAX_PAGES        (1u << 22)

/* open_out.open_flags */
#define FP_FOPEN_DIRECT_IO              (1u << 0)
#define FP_FOPEN_PARALLEL_DIRECT_WRITES (1u << 6)

/* setattr valid bits */
#define FP_FATTR_SIZE (1u << 3)

#define FP_NOTIFY_INVAL_INODE 2

#define FP_DEV_IOC_CLONE _IOR(229, 0, uint32_t)

enum fp_opcode {
  FP_LOOKUP = 1, FP_FORGET = 2, FP_GETATTR = 3, FP_SETATTR = 4, FP_READLINK = 5,
  FP_SYMLINK = 6, FP_MKNOD = 8, FP_MKDIR = 9, FP_UNLINK = 10, FP_RMDIR = 11,
  FP_RENAME = 12, FP_LINK = 13, FP_OPEN = 14, FP_READ = 15, FP_WRITE = 16,
  FP_STATFS = 17, FP_RELEASE = 18, FP_FSYNC = 20, FP_SETXATTR = 21, FP_GETXATTR = 22,
  FP_LISTXATTR = 23, FP_REMOVEXATTR = 24, FP_FLUSH = 25, FP_INIT = 26, FP_OPENDIR = 27,
  FP_READDIR = 28, FP_RELEASEDIR = 29, FP_FSYNCDIR = 30, FP_ACCESS = 34, FP_CREATE = 35,
  FP_INTERRUPT = 36, FP_DESTROY = 38, FP_NOTIFY_REPLY = 41, FP_BATCH_FORGET = 42,
  FP_FALLOCATE = 43, FP_RENAME2 = 45, FP_LSEEK = 46, FP_TMPFILE = 51,
};

struct fp_attr {
  uint64_t ino, size, blocks, atime, mtime, ctime;
  uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};

struct fp_kstatfs {
  uint64_t blocks, bfree, bavail, files, ffree;
  uint32_t bsize, namelen, frsize, padding;
  uint32_t spare[6];
};

struct fp_in_header {
  uint32_t len, opcode;
  uint64_t unique, nodeid;
  uint32_t uid, gid, pid;
  uint16_t total_extlen, padding;
};

struct fp_out_header {
  uint32_t len;
  int32_t error;
  uint64_t unique;
};

struct fp_entry_out {
  uint64_t nodeid, generation, entry_valid, attr_valid;
  uint32_t entry_valid_nsec, attr_valid_nsec;
  struct fp_attr attr;
};

struct fp_attr_out {
  uint64_t attr_valid;
  uint32_t attr_valid_nsec, dummy;
  struct fp_attr attr;
};

struct fp_setattr_in {
  uint32_t valid, padding;
  uint64_t fh, size, lock_owner, atime, mtime, ctime;
  uint32_t atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5;
};

struct fp_open_in { uint32_t flags, open_flags; };
struct fp_open_out { uint64_t fh; uint32_t open_flags, padding; };

struct fp_read_in {
  uint64_t fh, offset;
  uint32_t size, read_flags;
  uint64_t lock_owner;
  uint32_t flags, padding;
};

struct fp_write_in {
  uint64_t fh, offset;
  uint32_t size, write_flags;
  uint64_t lock_owner;
  uint32_t flags, padding;
};

struct fp_write_out { uint32_t size, padding; };

struct fp_fsync_in { uint64_t fh; uint32_t fsync_flags, padding; };

struct fp_init_in {
  uint32_t major, minor, max_readahead, flags;
  /* 7.36+: flags2 and unused[11] follow; we do not need them */
};

struct fp_init_out {
  uint32_t major, minor, max_readahead, flags;
  uint16_t max_background, congestion_threshold;
  uint32_t max_write, time_gran;
  uint16_t max_pages, map_alignment;
  uint32_t flags2;
  uint32_t unused[7];
};
#define FP_COMPAT_22_INIT_OUT_SIZE 24

struct fp_dirent {
  uint64_t ino, off;
  uint32_t namelen, type;
  char name[];
};
#define FP_NAME_OFFSET 24
#define FP_DIRENT_ALIGN(x) (((x) + 7) & ~(size_t)7)

struct fp_forget_in { uint64_t nlookup; };
struct fp_batch_forget_in { uint32_t count, dummy; };

struct fp_fallocate_in { uint64_t fh, offset, length; uint32_t mode, padding; };
struct fp_lseek_in { uint64_t fh, offset; uint32_t whence, padding; };
struct fp_lseek_out { uint64_t offset; };

struct fp_notify_inval_inode_out { uint64_t ino; int64_t off, len; };

_Static_assert(sizeof(struct fp_attr) == 88, "fuse_attr size");
_Static_assert(sizeof(struct fp_in_header) == 40, "in header size");
_Static_assert(sizeof(struct fp_out_header) == 16, "out header size");
_Static_assert(sizeof(struct fp_entry_out) == 128, "entry_out size");
_Static_assert(sizeof(struct fp_attr_out) == 104, "attr_out size");
_Static_assert(sizeof(struct fp_init_out) == 64, "init_out size");
_Static_assert(sizeof(struct fp_setattr_in) == 88, "setattr_in size");
_Static_assert(sizeof(struct fp_read_in) == 40, "read_in size");
_Static_assert(sizeof(struct fp_write_in) == 40, "write_in size");
_Static_assert(sizeof(struct fp_kstatfs) == 80, "kstatfs size");

#endif
