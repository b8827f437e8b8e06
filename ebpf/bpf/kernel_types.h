/* Kernel types read by headroom.bpf.c, reduced to the fields it touches.
 *
 * Written by hand instead of a generated vmlinux.h so the committed object depends only on this
 * file, clang and libbpf's headers, never on the kernel of the machine that compiled it.
 * preserve_access_index makes every field access a CO-RE relocation: libbpf/aya resolve the real
 * offsets against the running kernel's BTF at load time, so the layout here need not match any
 * kernel. */
#ifndef HEADROOM_KERNEL_TYPES_H
#define HEADROOM_KERNEL_TYPES_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef __s32 s32;
typedef __s64 s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
typedef unsigned long size_t;
#define true 1
#define false 0

/* Map types and flags from include/uapi/linux/bpf.h (stable ABI numbers). */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_SK_STORAGE = 24,
	BPF_MAP_TYPE_TASK_STORAGE = 29,
};
enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_F_NO_PREALLOC = 1,
	BPF_LOCAL_STORAGE_GET_F_CREATE = 1,
};

/* TCP states (include/net/tcp_states.h), stable since 2.6. */
enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_RECV = 3,
	TCP_CLOSE = 7,
};

struct kernfs_node {
	u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct css_set {
	struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));

/* task_struct.flags bit of kernel threads (include/linux/sched.h, unchanged since 2.6). */
#define PF_KTHREAD 0x00200000

struct task_struct {
	unsigned int __state;
	unsigned int flags;
	int pid;
	struct css_set *cgroups;
} __attribute__((preserve_access_index));

/* Before Linux 5.14 the task state was `volatile long state` (renamed to __state, an unsigned
 * int, in 5.14). A "___flavor" suffix is ignored by CO-RE matching, so this names the same
 * kernel struct with the old field. */
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

struct sock_common {
	u16 skc_num;
	volatile unsigned char skc_state;
} __attribute__((preserve_access_index));

struct bpf_local_storage;

struct sock {
	struct sock_common __sk_common;
	struct bpf_local_storage *sk_bpf_storage;
} __attribute__((preserve_access_index));

struct socket {
	struct sock *sk;
} __attribute__((preserve_access_index));

struct msghdr;

#endif
