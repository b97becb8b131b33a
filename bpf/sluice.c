/* sluice kernel side: the TC egress classifier, the cgroup socket hooks (owners and the DNS
 * redirect) and the cgroup egress hook that names forwarded container flows.
 *
 * Loaded by the capture stage with bcc. Knobs come as -D flags (see pipeline/kernel/loader.py):
 *   SLUICE_PIN_DIR      "..."  bpffs directory where every map is pinned (required)
 *   SLUICE_AGG_WINDOW_NS       a flow emits at most one record per window; the rest are counted
 *   SLUICE_MIDSTREAM_WINDOW_NS the same for denied mid-stream TCP segments, per destination
 *   SLUICE_RINGBUF_PAGES       ring-buffer size in pages
 *   SLUICE_FLOW_ENTRIES        size of the flow-aggregation LRU
 *   SLUICE_OVERFLOW_ENTRIES    records the ring buffer refused that wait for capture's sweep
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "sluice.h"

#ifndef SLUICE_PIN_DIR
#error "SLUICE_PIN_DIR must be set"
#endif
#ifndef SLUICE_AGG_WINDOW_NS
#define SLUICE_AGG_WINDOW_NS 1000000000ULL
#endif
#ifndef SLUICE_MIDSTREAM_WINDOW_NS
#define SLUICE_MIDSTREAM_WINDOW_NS 10000000000ULL
#endif
#ifndef SLUICE_RINGBUF_PAGES
#define SLUICE_RINGBUF_PAGES 256
#endif
#ifndef SLUICE_FLOW_ENTRIES
#define SLUICE_FLOW_ENTRIES 65536
#endif
#ifndef SLUICE_OVERFLOW_ENTRIES
#define SLUICE_OVERFLOW_ENTRIES 65536
#endif
#define SLUICE_RULE_ENTRIES 16384

#define PIN(name) SLUICE_PIN_DIR "/" #name

BPF_TABLE_PINNED("array", u32, struct sluice_config, map_config, 1, PIN(map_config));
BPF_TABLE_PINNED("lpm_trie", struct sluice_lpm_v4, struct sluice_cidr_value, map_cidrs,
		 SLUICE_RULE_ENTRIES, PIN(map_cidrs), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct sluice_lpm_v6, struct sluice_cidr_value, map_cidrs_v6,
		 SLUICE_RULE_ENTRIES, PIN(map_cidrs_v6), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct sluice_port_lpm_v4, struct sluice_port_value, map_ports,
		 SLUICE_RULE_ENTRIES, PIN(map_ports), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct sluice_port_lpm_v6, struct sluice_port_value, map_ports_v6,
		 SLUICE_RULE_ENTRIES, PIN(map_ports_v6), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", u64, struct sluice_sock_owner, map_sock_owner, 65536,
		 PIN(map_sock_owner));
BPF_TABLE_PINNED("lru_hash", struct sluice_flow_tuple, struct sluice_sock_owner, map_flow_owner,
		 65536, PIN(map_flow_owner));
BPF_TABLE_PINNED("array", u32, struct sluice_dns_redirect, map_dns_redirect, 1,
		 PIN(map_dns_redirect));
BPF_TABLE_PINNED("lru_hash", u64, struct sluice_dns_origin, map_dns_origin, 65536,
		 PIN(map_dns_origin));
BPF_TABLE_PINNED("lru_hash", struct sluice_flow_key, struct sluice_flow_state, map_flows,
		 SLUICE_FLOW_ENTRIES, PIN(map_flows));
BPF_TABLE_PINNED("percpu_array", u32, u64, map_counters, SLUICE_CNT_MAX, PIN(map_counters));
/* A plain hash, not an LRU: when it is full an insert fails and the loss is counted, where an
 * LRU would evict a parked record without a trace. Its pin is not map_overflow's, the map
 * before records had keys of their own: bcc adopts a pin whatever its key size. */
BPF_TABLE_PINNED("hash", struct sluice_park_key, struct sluice_flow_state, map_parked,
		 SLUICE_OVERFLOW_ENTRIES, PIN(map_parked));
BPF_PERCPU_ARRAY(map_scratch, struct sluice_flow_state, 1); /* too big for the stack */

/* bcc's BPF_RINGBUF_OUTPUT cannot be pinned; this is the same table with a pin path. */
struct map_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN(map_events))))
struct map_events_table_t map_events = { .max_entries = SLUICE_RINGBUF_PAGES * 4096 };

#define VLAN_MAX_DEPTH 2
#define IPV6_EXT_MAX 6

static __always_inline void count(u32 index, u64 n)
{
	u64 *value = map_counters.lookup(&index);
	if (value)
		*value += n;
}

static __always_inline struct sluice_config *config(void)
{
	u32 zero = 0;
	return map_config.lookup(&zero);
}

static __always_inline u8 default_action(void)
{
	struct sluice_config *cfg = config();
	return cfg ? cfg->default_action : SLUICE_DENY;
}

/* Verdict for one destination, reference lookup order: the longest CIDR entry decides,
 * unless it is port specific; then the longest port entry for (proto, port); then default. */
static __always_inline u8 verdict_v4(const u8 *addr, u16 port, u8 proto)
{
	struct sluice_lpm_v4 key = { .prefixlen = 32 };
	__builtin_memcpy(key.addr, addr, 4);
	struct sluice_cidr_value *cidr = map_cidrs.lookup(&key);
	if (cidr && !cidr->port_specific)
		return cidr->action;
	struct sluice_port_lpm_v4 pkey = { .prefixlen = 64, .proto = proto, .port = port };
	__builtin_memcpy(pkey.addr, addr, 4);
	struct sluice_port_value *rule = map_ports.lookup(&pkey);
	if (rule)
		return rule->action;
	return default_action();
}

static __always_inline u8 verdict_v6(const u8 *addr, u16 port, u8 proto)
{
	struct sluice_lpm_v6 key = { .prefixlen = 128 };
	__builtin_memcpy(key.addr, addr, 16);
	struct sluice_cidr_value *cidr = map_cidrs_v6.lookup(&key);
	if (cidr && !cidr->port_specific)
		return cidr->action;
	struct sluice_port_lpm_v6 pkey = { .prefixlen = 160, .proto = proto, .port = port };
	__builtin_memcpy(pkey.addr, addr, 16);
	struct sluice_port_value *rule = map_ports_v6.lookup(&pkey);
	if (rule)
		return rule->action;
	return default_action();
}

/* Fill the owner fields from the socket the cgroup hooks saw being used; a packet forwarded
 * from another network namespace (a container behind a bridge) comes without its socket, so
 * its owner is found by the flow the cgroup egress hook recorded. */
static __always_inline void fill_owner(struct __sk_buff *skb, struct sluice_event *ev)
{
	struct sluice_sock_owner *owner = 0;
	u64 cookie = bpf_get_socket_cookie(skb);
	if (cookie)
		owner = map_sock_owner.lookup(&cookie);
	if (!owner && (ev->ip_proto == IPPROTO_TCP || ev->ip_proto == IPPROTO_UDP)) {
		struct sluice_flow_tuple flow = {
			.ip_version = ev->ip_version,
			.ip_proto = ev->ip_proto,
			.src_port = ev->src_port,
			.dst_port = ev->dst_port,
		};
		if (ev->ip_version == 4) {
			u32 dst = bpf_htonl(ev->dst_ip);
			__builtin_memcpy(flow.dst, &dst, 4);
		} else {
			__builtin_memcpy(flow.dst, ev->dst_ip6, 16);
		}
		owner = map_flow_owner.lookup(&flow);
	}
	if (!owner)
		return;
	ev->pid = owner->tgid;
	ev->cgroup_id = owner->cgroup_id;
	__builtin_memcpy(ev->comm, owner->comm, SLUICE_COMM_LEN);
}

/* The ring buffer refused a record: park it, complete, in map_parked, where capture's sweep
 * turns it into a record; counted as lost only if that map is full. */
static __always_inline void park(struct sluice_flow_key *key, struct sluice_event *ev, u32 packets)
{
	u32 zero = 0;
	struct sluice_flow_state *parked = map_scratch.lookup(&zero);
	if (!parked) {
		count(SLUICE_CNT_LOST, packets);
		return;
	}
	struct sluice_park_key at = { .cpu = bpf_get_smp_processor_id(), .pad = 0,
				      .time = ev->timestamp };
	__builtin_memcpy(&at.flow, key, sizeof(*key));
	parked->last_emit = ev->timestamp;
	parked->pending = packets;
	__builtin_memcpy(&parked->last, ev, sizeof(*ev));
	if (map_parked.insert(&at, parked)) {
		count(SLUICE_CNT_LOST, packets);
		return;
	}
	count(SLUICE_CNT_PARKED, packets);
}

/* Emit one record for this packet, or fold it into its flow's pending count when the
 * flow already emitted within its window. A record that cannot be reserved is parked. */
static __always_inline void emit(struct __sk_buff *skb, struct sluice_event *ev, u16 key_src_port,
				 u64 window)
{
	struct sluice_flow_key key = {
		.ip_version = ev->ip_version,
		.ip_proto = ev->ip_proto,
		.allowed = ev->allowed,
		.flags = ev->flags,
		.src_port = key_src_port,
		.dst_port = ev->dst_port,
	};
	if (ev->ip_version == 4)
		__builtin_memcpy(key.dst, &ev->dst_ip, 4);
	else
		__builtin_memcpy(key.dst, ev->dst_ip6, 16);

	u64 now = bpf_ktime_get_ns();
	u32 packets = 1;
	struct sluice_flow_state *state = map_flows.lookup(&key);
	if (state) {
		if (now - state->last_emit < window) {
			__sync_fetch_and_add(&state->pending, 1);
			count(SLUICE_CNT_AGGREGATED, 1);
			return;
		}
		/* Exchanged, not read then subtracted: capture claims tails the same way
		 * (sluice_claim_tail), so each pending packet is reported by one of the two. */
		u64 taken = __sync_lock_test_and_set(&state->pending, 0);
		if (taken)
			count(SLUICE_CNT_TAIL_TAKEN, taken);
		packets += taken;
		state->last_emit = now;
	}

	ev->timestamp = now;
	ev->packets = packets;
	fill_owner(skb, ev);

	if (!state) {
		/* Inserted only if absent: a packet of the same flow on another CPU may have made
		 * the entry meanwhile, and packets since folded into it must not be overwritten. */
		struct sluice_flow_state fresh = { .last_emit = now };
		__builtin_memcpy(&fresh.last, ev, sizeof(*ev));
		map_flows.insert(&key, &fresh);
	} else {
		__builtin_memcpy(&state->last, ev, sizeof(*ev));
	}

	struct sluice_event *slot = map_events.ringbuf_reserve(sizeof(struct sluice_event));
	if (!slot) {
		count(SLUICE_CNT_RINGBUF_FULL, 1);
		park(&key, ev, packets);
		return;
	}
	__builtin_memcpy(slot, ev, sizeof(*ev));
	map_events.ringbuf_submit(slot, 0);
	count(SLUICE_CNT_EVENTS, 1);
}

static __always_inline int finish(u8 allowed)
{
	count(allowed ? SLUICE_CNT_ALLOWED : SLUICE_CNT_DENIED, 1);
	if (allowed)
		return TC_ACT_OK;
	struct sluice_config *cfg = config();
	if (cfg && cfg->audit_mode)
		return TC_ACT_OK;
	return TC_ACT_SHOT;
}

/* Unreadable or impossible headers: drop (pass in audit mode), counted, no event. */
static __always_inline int malformed(void)
{
	count(SLUICE_CNT_MALFORMED, 1);
	return finish(0);
}

/* Protocol block: the seed's shape, src_port 0 and dst_port = protocol number. */
static __always_inline int protocol_block(struct __sk_buff *skb, struct sluice_event *ev, u8 proto)
{
	ev->allowed = 0;
	ev->ip_proto = proto;
	ev->src_port = 0;
	ev->dst_port = proto;
	emit(skb, ev, 0, SLUICE_AGG_WINDOW_NS);
	return finish(0);
}

/* TCP/UDP verdict and event emission, shared by both families. addr is the destination in
 * network order, as the maps key it. */
static __always_inline int transport(struct __sk_buff *skb, struct sluice_event *ev, u32 l4off,
				     bool first_fragment, const u8 *addr)
{
	u8 proto = ev->ip_proto;
	u8 syn = 0, mid_stream = 0;
	if (first_fragment) {
		if (proto == IPPROTO_TCP) {
			struct tcphdr tcp;
			if (bpf_skb_load_bytes(skb, l4off, &tcp, sizeof(tcp)) < 0)
				return malformed();
			ev->src_port = bpf_ntohs(tcp.source);
			ev->dst_port = bpf_ntohs(tcp.dest);
			syn = tcp.syn && !tcp.ack;
			mid_stream = tcp.ack && !tcp.syn && !tcp.rst;
		} else {
			struct udphdr udp;
			if (bpf_skb_load_bytes(skb, l4off, &udp, sizeof(udp)) < 0)
				return malformed();
			ev->src_port = bpf_ntohs(udp.source);
			ev->dst_port = bpf_ntohs(udp.dest);
		}
	} else {
		ev->flags |= SLUICE_FLAG_FRAGMENT;
	}

	u8 allowed = ev->ip_version == 4 ? verdict_v4(addr, ev->dst_port, proto)
					 : verdict_v6(addr, ev->dst_port, proto);
	ev->allowed = allowed;
	if (proto == IPPROTO_TCP) {
		if (syn) {
			emit(skb, ev, ev->src_port, SLUICE_AGG_WINDOW_NS);
		} else if (mid_stream && !allowed) {
			ev->flags |= SLUICE_FLAG_MID_STREAM;
			emit(skb, ev, 0, SLUICE_MIDSTREAM_WINDOW_NS);
		}
	} else if (!allowed) {
		emit(skb, ev, ev->src_port, SLUICE_AGG_WINDOW_NS);
	}
	return finish(allowed);
}

static __always_inline int ipv4(struct __sk_buff *skb, u32 off)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
		return malformed();
	u8 daddr[4];
	__builtin_memcpy(daddr, &ip.daddr, 4);

	struct sluice_event ev = {
		.ip_version = 4,
		.ip_proto = ip.protocol,
		.src_ip = bpf_ntohl(ip.saddr),
		.dst_ip = bpf_ntohl(ip.daddr),
	};
	/* Every IPv4 protocol but TCP, UDP and ICMP is blocked, before any other check. */
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP && ip.protocol != IPPROTO_ICMP)
		return protocol_block(skb, &ev, ip.protocol);

	u32 ihl = ip.ihl * 4;
	if (ihl < 20 || ihl > 60)
		return malformed();
	bool first_fragment = (bpf_ntohs(ip.frag_off) & 0x1FFF) == 0;

	if (ip.protocol == IPPROTO_ICMP) {
		if (verdict_v4(daddr, 0, IPPROTO_ICMP))
			return finish(1);
		return protocol_block(skb, &ev, IPPROTO_ICMP);
	}
	return transport(skb, &ev, off + ihl, first_fragment, daddr);
}

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60
#define NEXTHDR_MOBILITY 135

static __always_inline int ipv6(struct __sk_buff *skb, u32 off)
{
	struct ipv6hdr ip;
	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
		return malformed();
	/* Multicast (neighbour discovery among it) always passes. */
	if (ip.daddr.in6_u.u6_addr8[0] == 0xff)
		return TC_ACT_OK;

	struct sluice_event ev = { .ip_version = 6 };
	__builtin_memcpy(ev.src_ip6, ip.saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(ev.dst_ip6, ip.daddr.in6_u.u6_addr8, 16);

	u8 next = ip.nexthdr;
	u32 l4off = off + sizeof(ip);
	bool first_fragment = true;
#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_FRAGMENT &&
		    next != NEXTHDR_DEST && next != NEXTHDR_MOBILITY)
			break;
		u8 ext[4];
		if (bpf_skb_load_bytes(skb, l4off, ext, sizeof(ext)) < 0)
			return malformed();
		if (next == NEXTHDR_FRAGMENT) {
			u16 frag = ((u16)ext[2] << 8) | ext[3];
			if (frag & 0xFFF8)
				first_fragment = false;
			l4off += 8;
		} else {
			l4off += ((u32)ext[1] + 1) * 8;
		}
		next = ext[0];
	}
	ev.ip_proto = next;
	if (next == IPPROTO_ICMPV6)
		return TC_ACT_OK;
	if (next != IPPROTO_TCP && next != IPPROTO_UDP)
		return protocol_block(skb, &ev, next);
	return transport(skb, &ev, l4off, first_fragment, ip.daddr.in6_u.u6_addr8);
}

int sluice_egress(struct __sk_buff *skb)
{
	count(SLUICE_CNT_PACKETS, 1);
	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return malformed();
	u32 off = sizeof(eth);
	u16 proto = bpf_ntohs(eth.h_proto);
#pragma unroll
	for (int i = 0; i < VLAN_MAX_DEPTH; i++) {
		if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
			break;
		u8 tag[4];
		if (bpf_skb_load_bytes(skb, off, tag, sizeof(tag)) < 0)
			return malformed();
		proto = ((u16)tag[2] << 8) | tag[3];
		off += sizeof(tag);
	}
	if (proto == ETH_P_IP)
		return ipv4(skb, off);
	if (proto == ETH_P_IPV6)
		return ipv6(skb, off);
	return TC_ACT_OK; /* ARP, LLDP and other non-IP frames */
}

/* cgroup sock_addr hooks, in the caller's context. Each remembers who owns the socket, so the
 * name is right even when the process exits before userspace reads the record, and sends
 * DNS to the proxy. */
static __always_inline void record_owner(struct bpf_sock_addr *ctx, u64 cookie)
{
	struct sluice_sock_owner owner = {
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.cgroup_id = bpf_get_current_cgroup_id(),
	};
	bpf_get_current_comm(owner.comm, sizeof(owner.comm));
	map_sock_owner.update(&cookie, &owner);
}

static __always_inline struct sluice_dns_redirect *dns_redirect(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != bpf_htons(SLUICE_DNS_PORT))
		return 0;
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 0;
	u32 zero = 0;
	struct sluice_dns_redirect *cfg = map_dns_redirect.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (sk && sk->mark == SLUICE_DNS_MARK)
		return 0; /* the proxy's own upstream query */
	return cfg;
}

/* A query to a resolver on loopback (a stub resolver, Docker's embedded one) is that
 * resolver's to answer: its own upstream queries are the ones redirected. */
static __always_inline bool loopback4(u32 addr)
{
	return (addr & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

static __always_inline void remember_origin(u64 cookie, u8 version, const void *addr, u32 port)
{
	struct sluice_dns_origin origin = { .ip_version = version, .port = port };
	__builtin_memcpy(origin.addr, addr, version == 4 ? 4 : 16);
	map_dns_origin.update(&cookie, &origin);
}

static __always_inline int hook4(struct bpf_sock_addr *ctx)
{
	u64 cookie = bpf_get_socket_cookie(ctx);
	record_owner(ctx, cookie);
	struct sluice_dns_redirect *cfg = dns_redirect(ctx);
	if (!cfg)
		return 1;
	u32 dst = ctx->user_ip4, target;
	__builtin_memcpy(&target, cfg->addr4, 4);
	if (loopback4(dst) || (dst == target && ctx->user_port == cfg->port))
		return 1;
	remember_origin(cookie, 4, &dst, ctx->user_port);
	ctx->user_ip4 = target;
	ctx->user_port = cfg->port;
	count(SLUICE_CNT_DNS_REDIRECTED, 1);
	return 1;
}

static __always_inline int hook6(struct bpf_sock_addr *ctx)
{
	u64 cookie = bpf_get_socket_cookie(ctx);
	record_owner(ctx, cookie);
	struct sluice_dns_redirect *cfg = dns_redirect(ctx);
	if (!cfg)
		return 1;
	u32 dst[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	u32 target[4];
	__builtin_memcpy(target, cfg->addr6, 16);
	if (dst[0] == 0 && dst[1] == 0 && dst[2] == bpf_htonl(0xffff)) {
		/* IPv4-mapped, on a dual-stack socket: redirected as IPv4, still mapped. */
		u32 target4;
		__builtin_memcpy(&target4, cfg->addr4, 4);
		if (loopback4(dst[3]) || (dst[3] == target4 && ctx->user_port == cfg->port))
			return 1;
		remember_origin(cookie, 6, dst, ctx->user_port);
		ctx->user_ip6[3] = target4;
		ctx->user_port = cfg->port;
		count(SLUICE_CNT_DNS_REDIRECTED, 1);
		return 1;
	}
	if (dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == bpf_htonl(1))
		return 1; /* ::1 */
	if (dst[0] == target[0] && dst[1] == target[1] && dst[2] == target[2] &&
	    dst[3] == target[3] && ctx->user_port == cfg->port)
		return 1;
	if (!cfg->has_v6) {
		count(SLUICE_CNT_DNS_REFUSED, 1);
		return 0; /* no IPv6 address to send it to: refused, never let past the proxy */
	}
	remember_origin(cookie, 6, dst, ctx->user_port);
	ctx->user_ip6[0] = target[0];
	ctx->user_ip6[1] = target[1];
	ctx->user_ip6[2] = target[2];
	ctx->user_ip6[3] = target[3];
	ctx->user_port = cfg->port;
	count(SLUICE_CNT_DNS_REDIRECTED, 1);
	return 1;
}

int sluice_connect4(struct bpf_sock_addr *ctx) { return hook4(ctx); }
int sluice_connect6(struct bpf_sock_addr *ctx) { return hook6(ctx); }
int sluice_sendmsg4(struct bpf_sock_addr *ctx) { return hook4(ctx); }
int sluice_sendmsg6(struct bpf_sock_addr *ctx) { return hook6(ctx); }

/* recvmsg and getpeername of a redirected socket: an address that is the proxy's becomes the
 * one the socket asked, so the answer comes from where the client sent its question. */
static __always_inline int restore4(struct bpf_sock_addr *ctx)
{
	u32 zero = 0;
	struct sluice_dns_redirect *cfg = map_dns_redirect.lookup(&zero);
	if (!cfg || ctx->user_port != cfg->port)
		return 1;
	u32 target;
	__builtin_memcpy(&target, cfg->addr4, 4);
	if (ctx->user_ip4 != target)
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct sluice_dns_origin *origin = map_dns_origin.lookup(&cookie);
	if (!origin || origin->ip_version != 4)
		return 1;
	u32 addr;
	__builtin_memcpy(&addr, origin->addr, 4);
	ctx->user_ip4 = addr;
	ctx->user_port = origin->port;
	return 1;
}

static __always_inline int restore6(struct bpf_sock_addr *ctx)
{
	u32 zero = 0;
	struct sluice_dns_redirect *cfg = map_dns_redirect.lookup(&zero);
	if (!cfg || ctx->user_port != cfg->port)
		return 1;
	u32 src[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	u32 target[4], target4;
	__builtin_memcpy(target, cfg->addr6, 16);
	__builtin_memcpy(&target4, cfg->addr4, 4);
	bool mapped = src[0] == 0 && src[1] == 0 && src[2] == bpf_htonl(0xffff) && src[3] == target4;
	bool native = src[0] == target[0] && src[1] == target[1] && src[2] == target[2] &&
		      src[3] == target[3];
	if (!mapped && !native)
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct sluice_dns_origin *origin = map_dns_origin.lookup(&cookie);
	if (!origin || origin->ip_version != 6)
		return 1;
	u32 addr[4];
	__builtin_memcpy(addr, origin->addr, 16);
	ctx->user_ip6[0] = addr[0];
	ctx->user_ip6[1] = addr[1];
	ctx->user_ip6[2] = addr[2];
	ctx->user_ip6[3] = addr[3];
	ctx->user_port = origin->port;
	return 1;
}

int sluice_recvmsg4(struct bpf_sock_addr *ctx) { return restore4(ctx); }
int sluice_recvmsg6(struct bpf_sock_addr *ctx) { return restore6(ctx); }
int sluice_getpeername4(struct bpf_sock_addr *ctx) { return restore4(ctx); }
int sluice_getpeername6(struct bpf_sock_addr *ctx) { return restore6(ctx); }

/* cgroup egress, in the sending socket's own network namespace: a TCP SYN or a UDP datagram
 * records its owner under the flow, so the classifier can name it after the host's NAT,
 * where the packet arrives forwarded and without its socket. */
int sluice_sock_egress(struct __sk_buff *skb)
{
	struct sluice_flow_tuple flow = {};
	u32 l4off;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return 1;
		if (bpf_ntohs(ip.frag_off) & 0x1FFF)
			return 1;
		flow.ip_version = 4;
		flow.ip_proto = ip.protocol;
		__builtin_memcpy(flow.dst, &ip.daddr, 4);
		l4off = ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return 1;
		flow.ip_version = 6;
		flow.ip_proto = ip.nexthdr;
		__builtin_memcpy(flow.dst, ip.daddr.in6_u.u6_addr8, 16);
		l4off = sizeof(ip);
	} else {
		return 1;
	}
	if (flow.ip_proto == IPPROTO_TCP) {
		struct tcphdr tcp;
		if (bpf_skb_load_bytes(skb, l4off, &tcp, sizeof(tcp)) < 0 || !tcp.syn || tcp.ack)
			return 1;
		flow.src_port = bpf_ntohs(tcp.source);
		flow.dst_port = bpf_ntohs(tcp.dest);
	} else if (flow.ip_proto == IPPROTO_UDP) {
		struct udphdr udp;
		if (bpf_skb_load_bytes(skb, l4off, &udp, sizeof(udp)) < 0)
			return 1;
		flow.src_port = bpf_ntohs(udp.source);
		flow.dst_port = bpf_ntohs(udp.dest);
	} else {
		return 1;
	}
	u64 cookie = bpf_get_socket_cookie(skb);
	struct sluice_sock_owner *owner = map_sock_owner.lookup(&cookie);
	if (!owner)
		return 1;
	struct sluice_sock_owner *known = map_flow_owner.lookup(&flow);
	if (known && known->tgid == owner->tgid && known->cgroup_id == owner->cgroup_id)
		return 1; /* a UDP flow already recorded: no map write per datagram */
	map_flow_owner.update(&flow, owner);
	return 1;
}

/* Not attached: capture runs it (BPF_PROG_TEST_RUN) to claim a quiet flow's tail, the packets
 * still pending in map_flows. The test packet carries the flow's key after an Ethernet header's
 * room; the program exchanges the pending count for 0 and returns it, and writes the flow's
 * last record over the key for capture to read back. Deleting the entry instead (a lookup and
 * delete from userspace) raced the classifier: a packet between its lookup and its exchange
 * reported the same tail again, or added to an entry already freed and reused by another flow.
 * The entry stays; the LRU evicts it when the map needs room. */
int sluice_claim_tail(struct __sk_buff *skb)
{
	struct sluice_flow_key key;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &key, sizeof(key)) < 0)
		return 0;
	struct sluice_flow_state *state = map_flows.lookup(&key);
	if (!state)
		return 0;
	u64 pending = __sync_lock_test_and_set(&state->pending, 0);
	if (!pending)
		return 0;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &state->last, sizeof(state->last), 0) < 0) {
		__sync_fetch_and_add(&state->pending, pending); /* given back: claimed next sweep */
		return 0;
	}
	count(SLUICE_CNT_TAIL_TAKEN, pending);
	return pending;
}
