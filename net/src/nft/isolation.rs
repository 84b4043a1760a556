//! The filter half of table `ip keel`: what keeps container networks apart from the host's
//! loopback, from each other, and — with `masquerade = false` — from everything beyond the
//! host. In the same batch as the NAT rules, so the walls go up and change atomically with
//! them.
//!
//! - `input`: `iifname BRIDGE ip daddr 127.0.0.0/8 ct status != dnat drop`. Bridges have
//!   route_localnet on (so that the host's own 127.0.0.1 can reach a published port), which
//!   would otherwise let a container with NET_RAW address the host's loopback services
//!   through its gateway (Kubernetes' CVE-2020-8558 fix is this rule).
//! - `forward`: `iifname A oifname B ct status != dnat drop` for every two networks A and B:
//!   one network's containers cannot reach another's, except through a published port (which
//!   anyone may use).
//! - `forward`: `iifname BRIDGE oifname != BRIDGE ct status != dnat drop` for an internal
//!   network (`masquerade = false`): nothing leaves it but answers to published ports. It
//!   still reaches the host itself, which is input, not forward.

use super::*;

pub(super) const CHAIN_INPUT: &str = "input";
pub(super) const CHAIN_FORWARD: &str = "forward";

/// The filter chains: name, hook, priority (0, iptables' filter priority).
pub(super) const CHAINS: [(&str, InetHookNumber, i32); 2] = [
    (CHAIN_INPUT, InetHookNumber::LocalIn, 0),
    (CHAIN_FORWARD, InetHookNumber::Forward, 0),
];

/// One rule: its chain, how it reads in nft syntax (for errors), its expressions.
pub(super) struct FilterRule {
    pub chain: &'static str,
    pub text: String,
    pub exprs: Vec<Expressions>,
}

/// Every filter rule of `networks`, in order.
pub(super) fn rules(networks: &[NatNetwork]) -> Vec<FilterRule> {
    let mut out = Vec::new();
    for net in networks {
        let mut e = vec![
            meta(MetaKey::Iifname),
            cmp(Operator::Equal, ifname(&net.bridge)),
        ];
        e.extend(addr_in(DADDR_OFFSET, Ipv4Addr::new(127, 0, 0, 0), 8));
        // Answers to the host's own 127.0.0.1 connections to a published port arrive with
        // 127.0.0.1 restored as their destination: those belong to a DNAT.
        e.extend(ct_status_dnat(Operator::Equal));
        e.push(drop_verdict());
        out.push(FilterRule {
            chain: CHAIN_INPUT,
            text: format!(
                "iifname {} ip daddr 127.0.0.0/8 ct status != dnat drop",
                net.bridge
            ),
            exprs: e,
        });
    }
    for from in networks {
        for to in networks.iter().filter(|n| n.bridge != from.bridge) {
            let mut e = vec![
                meta(MetaKey::Iifname),
                cmp(Operator::Equal, ifname(&from.bridge)),
                meta(MetaKey::Oifname),
                cmp(Operator::Equal, ifname(&to.bridge)),
            ];
            e.extend(ct_status_dnat(Operator::Equal));
            e.push(drop_verdict());
            out.push(FilterRule {
                chain: CHAIN_FORWARD,
                text: format!(
                    "iifname {} oifname {} ct status != dnat drop",
                    from.bridge, to.bridge
                ),
                exprs: e,
            });
        }
    }
    for net in networks.iter().filter(|n| !n.masquerade) {
        let mut e = vec![
            meta(MetaKey::Iifname),
            cmp(Operator::Equal, ifname(&net.bridge)),
            meta(MetaKey::Oifname),
            cmp(Operator::NotEqual, ifname(&net.bridge)),
        ];
        e.extend(ct_status_dnat(Operator::Equal));
        e.push(drop_verdict());
        out.push(FilterRule {
            chain: CHAIN_FORWARD,
            text: format!(
                "iifname {0} oifname != {0} ct status != dnat drop",
                net.bridge
            ),
            exprs: e,
        });
    }
    out
}

/// `drop`: the verdict register set to NF_DROP.
fn drop_verdict() -> Expressions {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
            Verdict::Other(NF_DROP),
        )])),
    ])
}
