//! nftables over netlink (being written).
