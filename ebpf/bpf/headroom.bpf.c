// SPDX-License-Identifier: GPL-2.0
/* headroom's in-kernel probes: per-request server latency per (cgroup, local port) and run-queue
 * delay per cgroup, both kept as bounded log-linear histograms in maps that the agent reads.
 *
 * Nothing here sends per-event data to user space: every event ends as an atomic add into a
 * histogram bucket. Each hook exists in up to three program types (tp_btf, fentry/fexit,
 * raw_tracepoint) around one shared body, so the loader can fall back when a kernel or sandbox
 * refuses a type.
 *
 * Histogram layout (must match src/hist.rs): values in nanoseconds; 0..15 ns get one bucket each;
 * above that, each power of two [2^e, 2^(e+1)) is split into 16 equal linear sub-buckets, so a
 * bucket is never wider than 1/16 of its lower bound. e is capped at 35 (~68.7 s); larger values
 * land in the last bucket.
 *
 * Per-socket and per-task state lives in socket/task local storage for the tp_btf programs (a
 * pointer away from the object, freed with it) and in bounded LRU hash maps for the fentry and
 * raw_tracepoint programs, whose arguments the verifier does not trust for local storage. Built
 * with -DHEADROOM_COMPAT, the tp_btf programs use the hash maps too and the object needs no
 * local-storage map types (kernels before 5.11). */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define SUB_BITS 4
#define SUBS (1 << SUB_BITS)
#define MAX_EXP 35
#define NBUCKETS ((MAX_EXP - SUB_BITS + 2) * SUBS) /* 528 */

/* The count is the sum of the buckets, so it costs no atomic add of its own. */
struct hist {
	u64 sum_ns;
	u64 buckets[NBUCKETS];
};

struct req_key {
	u64 cgroup_id;
	u16 port;
	u16 pad[3];
};

/* A socket is present here only once it was accepted (passive open); start_ns is 0 between
 * requests and the time the current request's first bytes were read otherwise. */
struct sock_req {
	u64 start_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, u64);
	__type(value, struct sock_req);
} server_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, u32);
	__type(value, u64);
} runq_start SEC(".maps");

#ifndef HEADROOM_COMPAT
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_req);
} sk_req SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, u64);
} task_runq SEC(".maps");
#endif

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2048);
	__type(key, struct req_key);
	__type(value, struct hist);
} req_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2048);
	__type(key, u64);
	__type(value, struct hist);
} runq_hist SEC(".maps");

/* Source of an all-zero histogram for inserts: a 4 KiB value does not fit the 512-byte stack. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct hist);
} zero_hist SEC(".maps");

/* Events dropped because a histogram map was full: [0] request latency, [1] run-queue delay. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, u32);
	__type(value, u64);
} dropped SEC(".maps");

/* Field reads: tp_btf arguments are typed kernel pointers the verifier lets a program load from
 * directly (one instruction); the other program types get plain integers and must go through
 * bpf_probe_read_kernel (a helper call each). `btf` is a compile-time constant per program, so
 * each program keeps only one of the two. */
#define KREAD(btf, ptr, ...) ((btf) ? (ptr)->__VA_ARGS__ : BPF_CORE_READ(ptr, __VA_ARGS__))

static __always_inline u32 log2_u64(u64 v)
{
	u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

static __always_inline u32 bucket_of(u64 ns)
{
	if (ns < SUBS)
		return (u32)ns;
	u32 e = log2_u64(ns);
	if (e > MAX_EXP)
		return NBUCKETS - 1;
	u32 sub = (u32)(ns >> (e - SUB_BITS)) & (SUBS - 1);
	return (e - SUB_BITS + 1) * SUBS + sub;
}

static __always_inline void count_drop(u32 which)
{
	u64 *d = bpf_map_lookup_elem(&dropped, &which);
	if (d)
		__sync_fetch_and_add(d, 1);
}

static __always_inline void record(void *map, const void *key, u64 ns, u32 which)
{
	struct hist *h = bpf_map_lookup_elem(map, key);
	if (!h) {
		u32 zero = 0;
		struct hist *z = bpf_map_lookup_elem(&zero_hist, &zero);
		if (!z)
			return;
		/* EEXIST from a racing insert is fine: the lookup below finds that one. */
		bpf_map_update_elem(map, key, z, BPF_NOEXIST);
		h = bpf_map_lookup_elem(map, key);
		if (!h) {
			count_drop(which);
			return;
		}
	}
	u64 idx = bucket_of(ns);
	/* Compared and clamped in one register: in C, clang tests a zero-extended copy of the index
	 * and then indexes with the original, and the 5.10 and 6.1 verifiers lose the bound across
	 * that copy ("R1 unbounded memory access"). */
	asm volatile("if %[i] < %[n] goto +1\n\t%[i] = %[last]"
		     : [i] "+r"(idx)
		     : [n] "i"(NBUCKETS), [last] "i"(NBUCKETS - 1));
	__sync_fetch_and_add(&h->buckets[idx], 1);
	__sync_fetch_and_add(&h->sum_ns, ns);
}

/* ---- request latency ---------------------------------------------------------------------- */

/* Where a socket's request state lives: `btf` is a compile-time constant per program type. */
static __always_inline struct sock_req *sock_slot(struct sock *sk, bool btf, bool create)
{
#ifndef HEADROOM_COMPAT
	if (btf) {
		/* Nearly every socket these tracepoints see was never tracked (the clients' own, those
		 * accepted before the probes loaded, UDP): it has no local storage at all, which one
		 * load tells without the helper call. */
		if (!create && bpf_core_field_exists(sk->sk_bpf_storage) && !sk->sk_bpf_storage)
			return 0;
		return bpf_sk_storage_get(&sk_req, sk, 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	}
#endif
	u64 key = (u64)sk;
	if (create) {
		struct sock_req fresh = { .start_ns = 0 };
		bpf_map_update_elem(&server_socks, &key, &fresh, BPF_ANY);
	}
	return bpf_map_lookup_elem(&server_socks, &key);
}

static __always_inline void on_state(struct sock *sk, int oldstate, int newstate, bool btf)
{
	/* SYN_RECV -> ESTABLISHED is the passive open of an accepted socket; a client's own sockets
	 * go SYN_SENT -> ESTABLISHED and are never tracked. */
	if (newstate == TCP_ESTABLISHED && oldstate == TCP_SYN_RECV) {
		struct sock_req *r = sock_slot(sk, btf, true);
		if (r)
			r->start_ns = 0;
	} else if (newstate == TCP_CLOSE) {
#ifndef HEADROOM_COMPAT
		if (btf) {
			bpf_sk_storage_delete(&sk_req, sk);
			return;
		}
#endif
		u64 key = (u64)sk;
		bpf_map_delete_elem(&server_socks, &key);
	}
}

static __always_inline void on_recv(struct sock *sk, int ret, bool btf)
{
	if (ret <= 0)
		return;
	struct sock_req *r = sock_slot(sk, btf, false);
	/* Keep the first read of a request: later reads of the same request do not move its start. */
	if (r && r->start_ns == 0)
		r->start_ns = bpf_ktime_get_ns();
}

static __always_inline void on_send(struct sock *sk, int ret, bool btf)
{
	if (ret <= 0)
		return;
	struct sock_req *r = sock_slot(sk, btf, false);
	if (!r)
		return;
	u64 start = r->start_ns;
	if (start == 0)
		return; /* a later write of the same response */
	r->start_ns = 0;
	u64 now = bpf_ktime_get_ns();
	if (now <= start)
		return;
	struct req_key k = {};
	k.cgroup_id = bpf_get_current_cgroup_id();
	k.port = KREAD(btf, sk, __sk_common.skc_num);
	record(&req_hist, &k, now - start, 0);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tp_sock_state, const struct sock *sk, int oldstate, int newstate)
{
	on_state((struct sock *)sk, oldstate, newstate, true);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(tp_sock_recv, struct sock *sk, int ret, int flags)
{
	on_recv(sk, ret, true);
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(tp_sock_send, struct sock *sk, int ret, int flags)
{
	on_send(sk, ret, true);
	return 0;
}

SEC("fentry/tcp_set_state")
int BPF_PROG(fe_sock_state, struct sock *sk, int state)
{
	on_state(sk, BPF_CORE_READ(sk, __sk_common.skc_state), state, false);
	return 0;
}

/* Not sock_recvmsg/sock_sendmsg: inside net/socket.c the compiler inlines them into the system
 * calls, so an fexit on their out-of-line copies misses most reads and every write (seen on
 * 6.1: no fexit of sock_sendmsg in 300 requests). The inet ops below are only ever called
 * through the socket's ops pointer (or INDIRECT_CALL from another file), never inlined, and take
 * the same arguments from 5.10 to 6.12. */
SEC("fexit/inet_recvmsg")
int BPF_PROG(fe_inet_recv, struct socket *sock, struct msghdr *msg, size_t size, int flags, int ret)
{
	on_recv(BPF_CORE_READ(sock, sk), ret, false);
	return 0;
}

SEC("fexit/inet6_recvmsg")
int BPF_PROG(fe_inet6_recv, struct socket *sock, struct msghdr *msg, size_t size, int flags,
	     int ret)
{
	on_recv(BPF_CORE_READ(sock, sk), ret, false);
	return 0;
}

SEC("fexit/inet_sendmsg")
int BPF_PROG(fe_inet_send, struct socket *sock, struct msghdr *msg, size_t size, int ret)
{
	on_send(BPF_CORE_READ(sock, sk), ret, false);
	return 0;
}

SEC("fexit/inet6_sendmsg")
int BPF_PROG(fe_inet6_send, struct socket *sock, struct msghdr *msg, size_t size, int ret)
{
	on_send(BPF_CORE_READ(sock, sk), ret, false);
	return 0;
}

SEC("raw_tracepoint/inet_sock_set_state")
int BPF_PROG(raw_sock_state, struct sock *sk, int oldstate, int newstate)
{
	on_state(sk, oldstate, newstate, false);
	return 0;
}

SEC("raw_tracepoint/sock_recv_length")
int BPF_PROG(raw_sock_recv, struct sock *sk, int ret, int flags)
{
	on_recv(sk, ret, false);
	return 0;
}

SEC("raw_tracepoint/sock_send_length")
int BPF_PROG(raw_sock_send, struct sock *sk, int ret, int flags)
{
	on_send(sk, ret, false);
	return 0;
}

/* ---- run-queue delay ---------------------------------------------------------------------- */

/* Kernel threads (and the idle task) live in the root cgroup, which the agent never reports;
 * skipping them spares a local-storage lookup, a clock read and a histogram update on some of the
 * busiest scheduler events (kworkers, ksoftirqd, RCU). */
static __always_inline bool untracked_task(struct task_struct *p, bool btf)
{
	return KREAD(btf, p, pid) == 0 || (KREAD(btf, p, flags) & PF_KTHREAD);
}

static __always_inline void stamp_runnable(struct task_struct *p, u64 now, bool btf)
{
#ifndef HEADROOM_COMPAT
	if (btf) {
		u64 *ts = bpf_task_storage_get(&task_runq, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (ts)
			*ts = now;
		return;
	}
#endif
	u32 pid = BPF_CORE_READ(p, pid);
	bpf_map_update_elem(&runq_start, &pid, &now, BPF_ANY);
}

static __always_inline void on_wakeup(struct task_struct *p, bool btf)
{
	if (untracked_task(p, btf))
		return;
	stamp_runnable(p, bpf_ktime_get_ns(), btf);
}

/* When `p` became runnable, consumed (so each wait is counted once); 0 when unknown. */
static __always_inline u64 take_stamp(struct task_struct *p, bool btf)
{
	u64 start = 0;
#ifndef HEADROOM_COMPAT
	if (btf) {
		u64 *ts = bpf_task_storage_get(&task_runq, p, 0, 0);
		if (ts) {
			start = *ts;
			*ts = 0;
		}
		return start;
	}
#endif
	u32 pid = BPF_CORE_READ(p, pid);
	u64 *tsp = bpf_map_lookup_elem(&runq_start, &pid);
	if (!tsp)
		return 0;
	start = *tsp;
	bpf_map_delete_elem(&runq_start, &pid);
	return start;
}

/* 0 when the task is runnable (TASK_RUNNING). The dead branch's relocation is poisoned at load
 * time and never verified, so one object serves kernels on both sides of 5.14. */
static __always_inline long task_state(struct task_struct *p, bool btf)
{
	if (bpf_core_field_exists(p->__state))
		return KREAD(btf, p, __state);
	struct task_struct___pre514 *old = (void *)p;
	return KREAD(btf, old, state);
}

static __always_inline void on_switch(struct task_struct *prev, struct task_struct *next, bool btf)
{
	/* A task switched out while still runnable (preempted or throttled) waits on the run queue
	 * from now on, exactly like a freshly woken one. One clock read serves both ends. */
	u64 now = 0;
	if (task_state(prev, btf) == 0 && !untracked_task(prev, btf)) {
		now = bpf_ktime_get_ns();
		stamp_runnable(prev, now, btf);
	}

	if (untracked_task(next, btf))
		return;
	u64 start = take_stamp(next, btf);
	if (start == 0)
		return;
	if (now == 0)
		now = bpf_ktime_get_ns();
	if (now <= start)
		return;
	u64 cg = btf ? next->cgroups->dfl_cgrp->kn->id : BPF_CORE_READ(next, cgroups, dfl_cgrp, kn, id);
	record(&runq_hist, &cg, now - start, 1);
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(tp_sched_wakeup, struct task_struct *p)
{
	on_wakeup(p, true);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(tp_sched_wakeup_new, struct task_struct *p)
{
	on_wakeup(p, true);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(tp_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	on_switch(prev, next, true);
	return 0;
}

SEC("raw_tracepoint/sched_wakeup")
int BPF_PROG(raw_sched_wakeup, struct task_struct *p)
{
	on_wakeup(p, false);
	return 0;
}

SEC("raw_tracepoint/sched_wakeup_new")
int BPF_PROG(raw_sched_wakeup_new, struct task_struct *p)
{
	on_wakeup(p, false);
	return 0;
}

SEC("raw_tracepoint/sched_switch")
int BPF_PROG(raw_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	on_switch(prev, next, false);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
