/* ctx_xdp.h: the context shim for XDP. Library code (parse.h, nat.h, revnat.h, lb.h) is
 * written against CTX / ctx_* only; ctx_skb.h is the tc twin. Include exactly one of them
 * before the library headers.
 */
#pragma once
#define CTX struct xdp_md
#define CTX_IS_XDP 1
#define CTX_OK XDP_PASS
#define CTX_DROP XDP_DROP

static __always_inline void *ctx_data(const struct xdp_md *ctx) { return (void *)(long)ctx->data; }
static __always_inline void *ctx_data_end(const struct xdp_md *ctx) { return (void *)(long)ctx->data_end; }
/* The program is loaded with BPF_F_XDP_HAS_FRAGS: a frame may be multi-buffer (MTU above a
 * page, GRO on veth), and data_end only bounds its linear part, which always holds the headers. */
static __always_inline __u32 ctx_len(struct xdp_md *ctx) { return bpf_xdp_get_buff_len(ctx); }
/* Does the frame have at least n bytes? The linear part answers without a helper call. */
static __always_inline int ctx_has(struct xdp_md *ctx, __u32 n)
{
	return n <= (__u32)(ctx->data_end - ctx->data) || n <= bpf_xdp_get_buff_len(ctx);
}

/* XDP cannot pull fragments into the linear part (it holds at least ~3.5k bytes anyway). */
static __always_inline int ctx_pull(struct xdp_md *ctx, __u32 len) { return -1; }

/* Store len (a compile-time constant: 2, 4 or 16) bytes at off. */
static __always_inline int ctx_store(struct xdp_md *ctx, __u32 off, const void *from, __u32 len)
{
	void *data = ctx_data(ctx), *end = ctx_data_end(ctx);
	if (off > 0xffff)
		return -1;
	if (data + off + len > end)
		return -1;
	__builtin_memcpy(data + off, from, len);
	return 0;
}

/* Same contract as bpf_l3_csum_replace / bpf_l4_csum_replace (size in the low flag bits,
 * 0 = "to" is a precomputed 32-bit diff). XDP frames never carry a partial checksum, so
 * BPF_F_PSEUDO_HDR needs no special case here. */
static __always_inline int ctx_csum_replace(struct xdp_md *ctx, __u32 off, __u32 from, __u32 to, __u64 flags)
{
	void *data = ctx_data(ctx), *end = ctx_data_end(ctx);
	__sum16 *sum;
	__u64 diff;

	if (off > 0xffff)
		return -1;
	sum = data + off;
	if ((void *)(sum + 1) > end)
		return -1;
	if ((flags & BPF_F_MARK_MANGLED_0) && *sum == 0)
		return 0;  /* UDP over IPv4 without checksum stays without */
	switch (flags & 0xf) {
	case 2: diff = (__u16)~(__u16)from + (__u16)to; break;
	case 4: diff = (__u64)(__u32)~from + (__u32)to; break;
	default: diff = to; break;
	}
	csum_apply(sum, diff, flags & BPF_F_MARK_MANGLED_0);
	return 0;
}
#define ctx_l3_csum_replace(ctx, off, from, to, size) ctx_csum_replace(ctx, off, from, to, size)
#define ctx_l4_csum_replace(ctx, off, from, to, flags) ctx_csum_replace(ctx, off, from, to, flags)
