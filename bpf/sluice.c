/* sluice kernel side: the TC egress classifier and the cgroup socket hooks.
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
#define SLUICE_FLOW_ENTRIES 16384
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
BPF_TABLE_PINNED("lru_hash", struct sluice_flow_key, struct sluice_flow_state, map_flows,
		 SLUICE_FLOW_ENTRIES, PIN(map_flows));
BPF_TABLE_PINNED("percpu_array", u32, u64, map_counters, SLUICE_CNT_MAX, PIN(map_counters));
/* A plain hash, not an LRU: when it is full an insert fails and the loss is counted, where an
 * LRU would evict a parked record without a trace. */
BPF_TABLE_PINNED("hash", struct sluice_flow_key, struct sluice_flow_state, map_overflow,
		 SLUICE_OVERFLOW_ENTRIES, PIN(map_overflow));
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

/* Fill the owner fields from the socket the cgroup hooks saw being used. */
static __always_inline void fill_owner(struct __sk_buff *skb, struct sluice_event *ev)
{
	u64 cookie = bpf_get_socket_cookie(skb);
	if (!cookie)
		return;
	struct sluice_sock_owner *owner = map_sock_owner.lookup(&cookie);
	if (!owner)
		return;
	ev->pid = owner->tgid;
	__builtin_memcpy(ev->comm, owner->comm, SLUICE_COMM_LEN);
}

/* The ring buffer refused a record: park it in map_overflow (per flow, packets added up),
 * where capture's sweep turns it into a record; counted as lost only if that map is full. */
static __always_inline void park(struct sluice_flow_key *key, struct sluice_event *ev, u32 packets)
{
	struct sluice_flow_state *parked = map_overflow.lookup(key);
	if (!parked) {
		u32 zero = 0;
		struct sluice_flow_state *fresh = map_scratch.lookup(&zero);
		if (fresh) {
			fresh->last_emit = ev->timestamp;
			fresh->pending = 0;
			__builtin_memcpy(&fresh->last, ev, sizeof(*ev));
			/* Fails when full, or when another CPU parked this flow first. */
			map_overflow.insert(key, fresh);
			parked = map_overflow.lookup(key);
		}
	}
	if (!parked) {
		count(SLUICE_CNT_LOST, packets);
		return;
	}
	__sync_fetch_and_add(&parked->pending, packets);
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
		u32 pending = state->pending;
		__sync_fetch_and_add(&state->pending, -pending);
		packets += pending;
		state->last_emit = now;
	}

	ev->timestamp = now;
	ev->packets = packets;
	fill_owner(skb, ev);

	if (!state) {
		struct sluice_flow_state fresh = { .last_emit = now };
		__builtin_memcpy(&fresh.last, ev, sizeof(*ev));
		map_flows.update(&key, &fresh);
		state = map_flows.lookup(&key);
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

/* cgroup sock_addr hooks: remember who owns each socket, in the caller's context, so the
 * name is right even when the process exits before userspace reads the record. */
static __always_inline int record_owner(struct bpf_sock_addr *ctx)
{
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct sluice_sock_owner owner = { .tgid = bpf_get_current_pid_tgid() >> 32 };
	bpf_get_current_comm(owner.comm, sizeof(owner.comm));
	map_sock_owner.update(&cookie, &owner);
	return 1; /* never blocks */
}

int sluice_connect4(struct bpf_sock_addr *ctx) { return record_owner(ctx); }
int sluice_connect6(struct bpf_sock_addr *ctx) { return record_owner(ctx); }
int sluice_sendmsg4(struct bpf_sock_addr *ctx) { return record_owner(ctx); }
int sluice_sendmsg6(struct bpf_sock_addr *ctx) { return record_owner(ctx); }
