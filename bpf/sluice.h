/* Shared by the classifier, the socket hooks and userspace (tests compile it with gcc to
 * check that Python's view of every struct has the same layout). Plain C, no BPF helpers. */
#ifndef SLUICE_H
#define SLUICE_H

#include <linux/types.h>

#define SLUICE_DENY  0
#define SLUICE_ALLOW 1

/* sluice_event.flags */
#define SLUICE_FLAG_MID_STREAM 0x01 /* a denied TCP segment of an established flow */
#define SLUICE_FLAG_FRAGMENT   0x02 /* a non-first fragment: ports are 0/0 */

#define SLUICE_COMM_LEN 16

/* One ring-buffer record: the seed's BpfBlockedEvent (first 60 bytes, same meanings),
 * then the packet count of an aggregated flow, the process name and its cgroup. */
struct sluice_event {
	__u8 ip_version;        /* 4 or 6 */
	__u8 allowed;           /* verdict: 1 allow, 0 deny (also 0 for would-deny in audit mode) */
	__u8 ip_proto;          /* L4 protocol number */
	__u8 flags;             /* SLUICE_FLAG_* */
	__u32 src_ip;           /* IPv4, host byte order */
	__u32 dst_ip;           /* IPv4, host byte order */
	__u16 src_port;         /* host order; 0 for protocol blocks and non-first fragments */
	__u16 dst_port;         /* host order; the protocol number for protocol blocks */
	__u8 src_ip6[16];       /* IPv6, network byte order */
	__u8 dst_ip6[16];
	__u64 timestamp;        /* bpf_ktime_get_ns(): monotonic, not wall clock */
	__u32 pid;              /* tgid of the socket's owner, 0 if unknown */
	__u32 packets;          /* packets this record stands for (flood aggregation) */
	char comm[SLUICE_COMM_LEN]; /* owner's process name, "" if unknown */
	__u64 cgroup_id;        /* owner's cgroup v2 id (its cgroupfs inode), 0 if unknown */
} __attribute__((packed));

/* Global switches, one array slot. generation != 0 once policy has programmed the maps:
 * capture attaches the classifier only then (no start-up window of false blocks). */
struct sluice_config {
	__u8 default_action;
	__u8 audit_mode;
	__u16 pad;
	__u32 generation;
};

struct sluice_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];           /* network order */
};

struct sluice_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

struct sluice_cidr_value {
	__u8 action;
	__u8 port_specific;     /* 1: the verdict comes from the port maps */
	__u16 pad;
};

/* Port rules live in their own LPM tries keyed by (protocol, port, address prefix), so a
 * subnet rule with ports covers every address of the subnet. prefixlen counts the 32 bits of
 * proto/pad/port first: a wildcard (0.0.0.0/0 with ports) has prefixlen 32, a host 64. */
struct sluice_port_lpm_v4 {
	__u32 prefixlen;
	__u8 proto;
	__u8 pad;
	__u16 port;             /* host order (only ever matched whole) */
	__u8 addr[4];
};

struct sluice_port_lpm_v6 {
	__u32 prefixlen;
	__u8 proto;
	__u8 pad;
	__u16 port;
	__u8 addr[16];
};

struct sluice_port_value {
	__u8 action;
	__u8 pad[3];
};

/* Socket cookie -> owner, recorded by the cgroup hooks in the caller's context; also the
 * value of the flow-owner map, for packets that reach the classifier without their socket
 * (forwarded from a container's network namespace). */
struct sluice_sock_owner {
	__u32 tgid;
	char comm[SLUICE_COMM_LEN];
	__u32 pad;
	__u64 cgroup_id;
};

/* A flow as the classifier sees it after the host's NAT, which keeps ports where it can:
 * the key the cgroup egress hook records an owner under. */
struct sluice_flow_tuple {
	__u8 ip_version;
	__u8 ip_proto;
	__u16 src_port;         /* host order */
	__u16 dst_port;         /* host order */
	__u16 pad;
	__u8 dst[16];           /* IPv4 in the first 4 bytes */
};

/* DNS redirect (one array slot, written by capture): every TCP/UDP connect or sendmsg to
 * port 53 of a non-loopback address goes to the proxy's redirect address instead, unless
 * the socket carries SLUICE_DNS_MARK (the proxy's own upstream traffic). */
#define SLUICE_DNS_PORT 53
#define SLUICE_DNS_MARK 0x2d53

struct sluice_dns_redirect {
	__u8 enabled;
	__u8 has_v6;            /* 0: IPv6 queries are refused (EPERM) rather than let through */
	__u16 port;             /* network order: the proxy's port on the redirect addresses */
	__u8 addr4[4];          /* network order */
	__u8 addr6[16];
};

/* Socket cookie -> the resolver address a redirected socket asked, so its answers (recvmsg)
 * and its peer (getpeername) show that address, not the proxy's. */
struct sluice_dns_origin {
	__u8 ip_version;
	__u8 pad;
	__u16 port;             /* network order */
	__u8 addr[16];          /* IPv4 in the first 4 bytes, network order */
};

/* Flood aggregation: one entry per flow that recently emitted an event. The same value
 * holds a record the ring buffer refused, in map_parked, until capture sweeps it. */
struct sluice_flow_key {
	__u8 ip_version;
	__u8 ip_proto;
	__u8 allowed;
	__u8 flags;
	__u16 src_port;         /* 0 for mid-stream (rate-limited per destination) */
	__u16 dst_port;
	__u8 dst[16];           /* IPv4 in the first 4 bytes */
};

struct sluice_flow_state {
	__u64 last_emit;        /* ns of the last record emitted for this flow */
	__u64 pending;          /* packets seen since then, not yet reported (64 bits: the
				 * width the kernel exchanges atomically; it was a u32 and a
				 * zero pad, so pinned maps read the same) */
	struct sluice_event last; /* template for the record that reports them */
};

/* map_parked's key. A refused record is inserted whole under a key no other record has (its
 * flow, CPU and time; one CPU never handles two packets in the same nanosecond) and never
 * changed after: capture takes entries while the kernel parks more, and an entry the kernel
 * could still add to might be taken, freed and reused between its lookup and its add. */
struct sluice_park_key {
	struct sluice_flow_key flow;
	__u32 cpu;
	__u32 pad;
	__u64 time;             /* the record's timestamp */
};

/* Per-CPU counters, indexes into map_counters. */
#define SLUICE_CNT_PACKETS        0
#define SLUICE_CNT_ALLOWED        1
#define SLUICE_CNT_DENIED         2
#define SLUICE_CNT_EVENTS         3  /* records submitted to the ring buffer */
#define SLUICE_CNT_AGGREGATED     4  /* packets folded into a pending count instead */
#define SLUICE_CNT_RINGBUF_FULL   5  /* ring-buffer reserve failures (the record is parked) */
#define SLUICE_CNT_MALFORMED      6  /* headers that could not be read */
#define SLUICE_CNT_PARKED         7  /* packets of refused records kept in map_parked */
#define SLUICE_CNT_LOST           8  /* packets of refused records map_parked had no room for */
#define SLUICE_CNT_DNS_REDIRECTED 9  /* DNS connects/sends sent to the proxy instead */
#define SLUICE_CNT_DNS_REFUSED    10 /* IPv6 DNS refused: no IPv6 redirect address */
#define SLUICE_CNT_TAIL_TAKEN     11 /* aggregated packets a record or a claim took from a flow;
				      * aggregated - this - what flows still hold: packets whose
				      * flow the LRU evicted before they were reported */
#define SLUICE_CNT_MAX            16

#endif
