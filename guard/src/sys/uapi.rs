//! Linux UAPI constants: the one place portguard names a kernel number.
//!
//! Where `libc` (or `netlink-packet-core`, for the `NLM_F_*`/`NLMSG_*` flags
//! already typed `u16`) exports a number, the value is taken from there and only
//! given the type it has on the wire (`libc` types them all `c_int`): these
//! lines are casts, never literals. The numbers neither crate has are written
//! here, each under the kernel header it comes from. No other module of
//! `guard/src` defines a kernel constant.

// <linux/netlink.h> (netlink-packet-core, libc)
pub use netlink_packet_core::{
    NLA_F_NESTED, NLA_HEADER_SIZE as NLA_HDRLEN, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
};
/// `NLMSG_HDRLEN`: `struct nlmsghdr`, 4-byte aligned already.
pub const NLMSG_HDRLEN: usize = size_of::<libc::nlmsghdr>();

// <linux/rtnetlink.h>, <linux/if_addr.h> (libc)
pub const RTM_NEWADDR: u16 = libc::RTM_NEWADDR;
pub const RTM_DELADDR: u16 = libc::RTM_DELADDR;
pub const RTM_GETADDR: u16 = libc::RTM_GETADDR;
pub const RTMGRP_IPV4_IFADDR: u32 = libc::RTMGRP_IPV4_IFADDR as u32;
pub const RTMGRP_IPV6_IFADDR: u32 = libc::RTMGRP_IPV6_IFADDR as u32;
/// `RTN_LOCAL`: the route type (and `fib daddr type`) of a local address.
pub const RTN_LOCAL: u32 = libc::RTN_LOCAL as u32;

// <linux/netfilter/nfnetlink.h> (libc)
pub const NFNL_SUBSYS_NFTABLES: u16 = libc::NFNL_SUBSYS_NFTABLES as u16;
pub const NFNL_MSG_BATCH_BEGIN: u16 = libc::NFNL_MSG_BATCH_BEGIN as u16;
pub const NFNL_MSG_BATCH_END: u16 = libc::NFNL_MSG_BATCH_END as u16;
pub const NFNLGRP_NFTABLES: u32 = libc::NFNLGRP_NFTABLES as u32;
/// `NFNL_BATCH_GENID` (`enum nfnl_batch_attributes`): the generation a batch
/// was decided on, an attribute of `NFNL_MSG_BATCH_BEGIN`; not in libc.
pub const NFNL_BATCH_GENID: u16 = 1;
/// What the kernel answers a batch whose `NFNL_BATCH_GENID` is not the current
/// generation (`<asm-generic/errno.h>`).
pub const ERESTART: i32 = libc::ERESTART;
/// `sizeof(struct nfgenmsg)` (family, version, res_id); not in libc.
pub const NFGENMSG_LEN: usize = 4;

// <linux/netfilter.h> (libc)
pub const NFPROTO_UNSPEC: u8 = libc::NFPROTO_UNSPEC as u8;
pub const NFPROTO_INET: u8 = libc::NFPROTO_INET as u8;
pub const NFPROTO_IPV4: u8 = libc::NFPROTO_IPV4 as u8;
pub const NFPROTO_ARP: u8 = libc::NFPROTO_ARP as u8;
pub const NFPROTO_NETDEV: u8 = libc::NFPROTO_NETDEV as u8;
pub const NFPROTO_BRIDGE: u8 = libc::NFPROTO_BRIDGE as u8;
pub const NFPROTO_IPV6: u8 = libc::NFPROTO_IPV6 as u8;
pub const NF_DROP: i32 = libc::NF_DROP;
pub const NF_ACCEPT: i32 = libc::NF_ACCEPT;
pub const NF_INET_PRE_ROUTING: u32 = libc::NF_INET_PRE_ROUTING as u32;
pub const NF_INET_LOCAL_IN: u32 = libc::NF_INET_LOCAL_IN as u32;
pub const NF_INET_FORWARD: u32 = libc::NF_INET_FORWARD as u32;
pub const NF_INET_LOCAL_OUT: u32 = libc::NF_INET_LOCAL_OUT as u32;
pub const NF_INET_POST_ROUTING: u32 = libc::NF_INET_POST_ROUTING as u32;
/// `NF_NETDEV_INGRESS` as a hook number of an `inet` chain (`NF_INET_INGRESS`).
pub const NF_INET_INGRESS: u32 = libc::NF_INET_NUMHOOKS as u32;

// <linux/netfilter_ipv4.h> (libc)
pub const NF_IP_PRI_NAT_DST: i32 = libc::NF_IP_PRI_NAT_DST;
pub const NF_IP_PRI_NAT_SRC: i32 = libc::NF_IP_PRI_NAT_SRC;

// <linux/if_ether.h>, <net/if.h> (libc)
pub const ETH_P_IP: u16 = libc::ETH_P_IP as u16;
pub const ETH_P_IPV6: u16 = libc::ETH_P_IPV6 as u16;
pub const IFNAMSIZ: usize = libc::IF_NAMESIZE;

// <linux/netfilter/nf_conntrack_common.h>: `NF_CT_STATE_BIT(IP_CT_NEW)`
// (`IP_CT_NEW` is 2), the `ct state new` bit; xt_state's `XT_STATE_BIT` is the same.
pub const NF_CT_STATE_NEW_BIT: u32 = 1 << (2 + 1);

// <linux/netfilter/nf_tables.h>: messages (libc)
pub const NFT_MSG_NEWTABLE: u16 = libc::NFT_MSG_NEWTABLE as u16;
pub const NFT_MSG_GETTABLE: u16 = libc::NFT_MSG_GETTABLE as u16;
pub const NFT_MSG_DELTABLE: u16 = libc::NFT_MSG_DELTABLE as u16;
pub const NFT_MSG_NEWCHAIN: u16 = libc::NFT_MSG_NEWCHAIN as u16;
pub const NFT_MSG_GETCHAIN: u16 = libc::NFT_MSG_GETCHAIN as u16;
pub const NFT_MSG_NEWRULE: u16 = libc::NFT_MSG_NEWRULE as u16;
pub const NFT_MSG_GETRULE: u16 = libc::NFT_MSG_GETRULE as u16;
pub const NFT_MSG_DELRULE: u16 = libc::NFT_MSG_DELRULE as u16;
pub const NFT_MSG_NEWSET: u16 = libc::NFT_MSG_NEWSET as u16;
pub const NFT_MSG_GETSET: u16 = libc::NFT_MSG_GETSET as u16;
pub const NFT_MSG_NEWSETELEM: u16 = libc::NFT_MSG_NEWSETELEM as u16;
pub const NFT_MSG_GETSETELEM: u16 = libc::NFT_MSG_GETSETELEM as u16;
pub const NFT_MSG_NEWGEN: u16 = libc::NFT_MSG_NEWGEN as u16;
pub const NFT_MSG_GETGEN: u16 = libc::NFT_MSG_GETGEN as u16;
pub const NFT_MSG_TRACE: u16 = libc::NFT_MSG_TRACE as u16;

// <linux/netfilter/nf_tables.h>: expression enums (libc)
pub const NFT_REG_VERDICT: u32 = libc::NFT_REG_VERDICT as u32;
pub const NFT_REG_1: u32 = libc::NFT_REG_1 as u32;
pub const NFT_REG_2: u32 = libc::NFT_REG_2 as u32;
pub const NFT_DATA_VERDICT: u32 = libc::NFT_DATA_VERDICT;
pub const NFT_CONTINUE: i32 = libc::NFT_CONTINUE;
pub const NFT_BREAK: i32 = libc::NFT_BREAK;
pub const NFT_JUMP: i32 = libc::NFT_JUMP;
pub const NFT_GOTO: i32 = libc::NFT_GOTO;
pub const NFT_RETURN: i32 = libc::NFT_RETURN;
pub const NFT_CMP_EQ: u32 = libc::NFT_CMP_EQ as u32;
pub const NFT_CMP_NEQ: u32 = libc::NFT_CMP_NEQ as u32;
pub const NFT_CMP_LT: u32 = libc::NFT_CMP_LT as u32;
pub const NFT_CMP_LTE: u32 = libc::NFT_CMP_LTE as u32;
pub const NFT_CMP_GT: u32 = libc::NFT_CMP_GT as u32;
pub const NFT_CMP_GTE: u32 = libc::NFT_CMP_GTE as u32;
pub const NFT_RANGE_NEQ: u32 = libc::NFT_RANGE_NEQ as u32;
pub const NFT_LOOKUP_F_INV: u32 = libc::NFT_LOOKUP_F_INV as u32;
pub const NFT_PAYLOAD_LL_HEADER: u32 = libc::NFT_PAYLOAD_LL_HEADER as u32;
pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = libc::NFT_PAYLOAD_NETWORK_HEADER as u32;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32;
pub const NFT_META_PROTOCOL: u32 = libc::NFT_META_PROTOCOL as u32;
pub const NFT_META_IIF: u32 = libc::NFT_META_IIF as u32;
pub const NFT_META_OIF: u32 = libc::NFT_META_OIF as u32;
pub const NFT_META_IIFNAME: u32 = libc::NFT_META_IIFNAME as u32;
pub const NFT_META_OIFNAME: u32 = libc::NFT_META_OIFNAME as u32;
pub const NFT_META_NFPROTO: u32 = libc::NFT_META_NFPROTO as u32;
pub const NFT_META_L4PROTO: u32 = libc::NFT_META_L4PROTO as u32;
pub const NFT_CT_STATE: u32 = libc::NFT_CT_STATE as u32;
pub const NFT_CT_DIRECTION: u32 = libc::NFT_CT_DIRECTION as u32;
pub const NFT_NAT_SNAT: u32 = libc::NFT_NAT_SNAT as u32;
pub const NFT_NAT_DNAT: u32 = libc::NFT_NAT_DNAT as u32;
pub const NFT_SET_ANONYMOUS: u32 = libc::NFT_SET_ANONYMOUS as u32;
pub const NFT_SET_CONSTANT: u32 = libc::NFT_SET_CONSTANT as u32;
pub const NFT_SET_INTERVAL: u32 = libc::NFT_SET_INTERVAL as u32;
pub const NFT_SET_MAP: u32 = libc::NFT_SET_MAP as u32;
pub const NFT_SET_TIMEOUT: u32 = libc::NFT_SET_TIMEOUT as u32;
pub const NFT_SET_EVAL: u32 = libc::NFT_SET_EVAL as u32;
pub const NFT_SET_ELEM_INTERVAL_END: u32 = libc::NFT_SET_ELEM_INTERVAL_END as u32;

// <linux/netfilter/nf_tables.h>: what libc lacks
pub const NFT_SET_OBJECT: u32 = 0x40;
pub const NFT_SET_CONCAT: u32 = 0x80;
/// `enum nft_set_elem_flags`: `NFT_SET_ELEM_INTERVAL_END = 0x1`,
/// `NFT_SET_ELEM_CATCHALL = 0x2` (it was written 0x4 here once, which hid
/// every catch-all element: issue 14).
pub const NFT_SET_ELEM_CATCHALL: u32 = 0x2;
/// `enum nft_bitwise_ops`.
pub const NFT_BITWISE_BOOL: u32 = 0;
/// `enum nft_fib_result`, `enum nft_fib_flags`.
pub const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
pub const NFTA_FIB_F_DADDR: u32 = 1 << 1;
pub const NFTA_FIB_F_IIF: u32 = 1 << 3;
pub const NFTA_FIB_F_OIF: u32 = 1 << 4;
pub const NFTA_FIB_F_PRESENT: u32 = 1 << 5;

// <linux/netfilter/nf_tables.h>: attributes (none in libc)
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
pub const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_DATA_VERDICT: u16 = 2;
pub const NFTA_VERDICT_CODE: u16 = 1;
pub const NFTA_VERDICT_CHAIN: u16 = 2;
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;
pub const NFTA_TABLE_HANDLE: u16 = 4;
/// The netlink port id of the socket that owns the table (with `NFT_TABLE_F_OWNER`).
pub const NFTA_TABLE_OWNER: u16 = 7;
/// Table flag: the table lives only as long as the netlink socket that
/// created it; the kernel deletes it when that socket closes.
pub const NFT_TABLE_F_OWNER: u32 = 0x2;
/// `NFT_TABLE_F_DORMANT`: the table's base chains are not registered; the
/// kernel never runs its rules.
pub const NFT_TABLE_F_DORMANT: u32 = 0x1;
/// Table flag: an owned table outlives its socket. portguard never sets it.
pub const NFT_TABLE_F_PERSIST: u32 = 0x4;
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_HANDLE: u16 = 2;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_CHAIN_POLICY: u16 = 5;
pub const NFTA_CHAIN_TYPE: u16 = 7;
pub const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_HANDLE: u16 = 3;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_RULE_COMPAT: u16 = 5;
pub const NFTA_RULE_POSITION: u16 = 6;
pub const NFTA_RULE_USERDATA: u16 = 7;
pub const NFTA_RULE_COMPAT_PROTO: u16 = 1;
pub const NFTA_RULE_COMPAT_FLAGS: u16 = 2;
pub const NFTA_SET_TABLE: u16 = 1;
pub const NFTA_SET_NAME: u16 = 2;
pub const NFTA_SET_FLAGS: u16 = 3;
pub const NFTA_SET_KEY_TYPE: u16 = 4;
pub const NFTA_SET_KEY_LEN: u16 = 5;
pub const NFTA_SET_DATA_TYPE: u16 = 6;
pub const NFTA_SET_DATA_LEN: u16 = 7;
pub const NFTA_SET_DESC: u16 = 9;
pub const NFTA_SET_HANDLE: u16 = 16;
pub const NFTA_SET_DESC_CONCAT: u16 = 2;
pub const NFTA_SET_FIELD_LEN: u16 = 1;
pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub const NFTA_SET_ELEM_KEY: u16 = 1;
pub const NFTA_SET_ELEM_DATA: u16 = 2;
pub const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub const NFTA_SET_ELEM_KEY_END: u16 = 10;
// `enum nft_gen_attributes` (`linux/netfilter/nf_tables.h`; not in libc):
// the generation, and the pid and comm of the process that committed it.
pub const NFTA_GEN_ID: u16 = 1;
pub const NFTA_GEN_PROC_PID: u16 = 2;
pub const NFTA_GEN_PROC_NAME: u16 = 3;
pub const NFTA_PAYLOAD_DREG: u16 = 1;
pub const NFTA_PAYLOAD_BASE: u16 = 2;
pub const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub const NFTA_PAYLOAD_LEN: u16 = 4;
pub const NFTA_PAYLOAD_SREG: u16 = 5;
pub const NFTA_META_DREG: u16 = 1;
pub const NFTA_META_KEY: u16 = 2;
pub const NFTA_META_SREG: u16 = 3;
pub const NFTA_CMP_SREG: u16 = 1;
pub const NFTA_CMP_OP: u16 = 2;
pub const NFTA_CMP_DATA: u16 = 3;
pub const NFTA_RANGE_SREG: u16 = 1;
pub const NFTA_RANGE_OP: u16 = 2;
pub const NFTA_RANGE_FROM_DATA: u16 = 3;
pub const NFTA_RANGE_TO_DATA: u16 = 4;
pub const NFTA_BITWISE_SREG: u16 = 1;
pub const NFTA_BITWISE_DREG: u16 = 2;
pub const NFTA_BITWISE_LEN: u16 = 3;
pub const NFTA_BITWISE_MASK: u16 = 4;
pub const NFTA_BITWISE_XOR: u16 = 5;
pub const NFTA_BITWISE_OP: u16 = 6;
pub const NFTA_IMMEDIATE_DREG: u16 = 1;
pub const NFTA_IMMEDIATE_DATA: u16 = 2;
pub const NFTA_LOOKUP_SET: u16 = 1;
pub const NFTA_LOOKUP_SREG: u16 = 2;
pub const NFTA_LOOKUP_DREG: u16 = 3;
pub const NFTA_LOOKUP_FLAGS: u16 = 5;
pub const NFTA_NAT_TYPE: u16 = 1;
pub const NFTA_NAT_FAMILY: u16 = 2;
pub const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
pub const NFTA_NAT_REG_ADDR_MAX: u16 = 4;
pub const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
pub const NFTA_NAT_REG_PROTO_MAX: u16 = 6;
pub const NFTA_NAT_FLAGS: u16 = 7;
pub const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
pub const NFTA_REDIR_REG_PROTO_MAX: u16 = 2;
pub const NFTA_REDIR_FLAGS: u16 = 3;
pub const NFTA_TPROXY_FAMILY: u16 = 1;
pub const NFTA_TPROXY_REG_ADDR: u16 = 2;
pub const NFTA_TPROXY_REG_PORT: u16 = 3;
pub const NFTA_FIB_DREG: u16 = 1;
pub const NFTA_FIB_RESULT: u16 = 2;
pub const NFTA_FIB_FLAGS: u16 = 3;
pub const NFTA_CT_DREG: u16 = 1;
pub const NFTA_CT_KEY: u16 = 2;
pub const NFTA_CT_DIRECTION: u16 = 3;
pub const NFTA_DYNSET_SET_NAME: u16 = 1;
pub const NFTA_DYNSET_OP: u16 = 3;

// <linux/netfilter/nf_tables_compat.h>
pub const NFTA_XT_NAME: u16 = 1;
pub const NFTA_XT_REV: u16 = 2;
pub const NFTA_XT_INFO: u16 = 3;

// <linux/netfilter/nf_nat.h>
pub const NF_NAT_RANGE_MAP_IPS: u32 = 1;
pub const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

// <linux/netfilter/xt_addrtype.h>
pub const XT_ADDRTYPE_LOCAL: u16 = 1 << 2;
pub const XT_ADDRTYPE_INVERT_SOURCE: u32 = 0x1;
pub const XT_ADDRTYPE_INVERT_DEST: u32 = 0x2;

// <linux/netfilter/xt_tcpudp.h>
pub const XT_TCP_INV_DSTPT: u8 = 0x02;
pub const XT_UDP_INV_DSTPT: u8 = 0x02;

// <linux/netfilter/xt_multiport.h>
pub const XT_MULTIPORT_SOURCE: u8 = 0;
pub const XT_MULTIPORT_DESTINATION: u8 = 1;
pub const XT_MULTIPORT_EITHER: u8 = 2;
pub const XT_MULTI_PORTS: usize = 15;

// <linux/netfilter/xt_comment.h>
pub const XT_MAX_COMMENT_LEN: usize = 256;

// <linux/netfilter/xt_conntrack.h> (`enum` bits of `match_flags`/`invert_flags`)
pub const XT_CONNTRACK_STATE: u16 = 1 << 0;
pub const XT_CONNTRACK_PROTO: u16 = 1 << 1;
pub const XT_CONNTRACK_ORIGDST: u16 = 1 << 3;
pub const XT_CONNTRACK_ORIGDST_PORT: u16 = 1 << 9;
pub const XT_CONNTRACK_DIRECTION: u16 = 1 << 12;
/// `XT_CONNTRACK_STATE_ALIAS`: the match stands for `-m state` (no effect on matching).
pub const XT_CONNTRACK_STATE_ALIAS: u16 = 1 << 13;
/// `struct xt_conntrack_mtinfo1..3`: eight `union nf_inet_addr` (16 bytes
/// each), then `expires_min`, `expires_max` (u32), `l4proto` (u16), four
/// `__be16` ports, `match_flags`, `invert_flags` (u16), `state_mask`,
/// `status_mask` (u8 in rev 1, u16 in rev 2 and 3), and in rev 3 four
/// `__u16` high ports.
pub const XT_CONNTRACK_ORIGDST_ADDR_OFFSET: usize = 32;
pub const XT_CONNTRACK_ORIGDST_MASK_OFFSET: usize = 48;
pub const XT_CONNTRACK_L4PROTO_OFFSET: usize = 136;
pub const XT_CONNTRACK_ORIGDST_PORT_OFFSET: usize = 140;
pub const XT_CONNTRACK_MATCH_FLAGS_OFFSET: usize = 146;
pub const XT_CONNTRACK_INVERT_FLAGS_OFFSET: usize = 148;
pub const XT_CONNTRACK_STATE_MASK_OFFSET: usize = 150;
/// Rev 3: `origdst_port_high`, after `state_mask`, `status_mask` (u16 each)
/// and `origsrc_port_high`.
pub const XT_CONNTRACK_V3_ORIGDST_PORT_HIGH_OFFSET: usize = 156;

// <linux/netfilter/xt_iprange.h> (`struct xt_iprange_mtinfo`: src_min,
// src_max, dst_min, dst_max as `union nf_inet_addr`, then `flags`)
pub const IPRANGE_SRC: u8 = 1 << 0;
pub const IPRANGE_DST: u8 = 1 << 1;
pub const IPRANGE_DST_INV: u8 = 1 << 5;
pub const XT_IPRANGE_DST_MIN_OFFSET: usize = 32;
pub const XT_IPRANGE_DST_MAX_OFFSET: usize = 48;
pub const XT_IPRANGE_FLAGS_OFFSET: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_libc_lacks_match_the_kernel_layout() {
        // The netlink header is 16 bytes; an attribute header 4.
        assert_eq!(NLMSG_HDRLEN, 16);
        assert_eq!(NLA_HDRLEN, 4);
        assert_eq!(NF_INET_INGRESS, 5);
        assert_eq!(NF_CT_STATE_NEW_BIT, 8);
    }
}
