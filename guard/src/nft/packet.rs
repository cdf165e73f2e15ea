//! The synthetic packet the reachability analysis follows ([`ProbePacket`]),
//! and the three-valued answer a match gives it ([`Tri`]). A leaf: the
//! analysis and the iptables (`xt`) matches both use these, neither owns them.

use std::net::IpAddr;

use super::model::Hook;

/// Three-valued match result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tri {
    Yes,
    No,
    Maybe,
}

impl Tri {
    pub fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::No, _) | (_, Self::No) => Self::No,
            (Self::Yes, Self::Yes) => Self::Yes,
            _ => Self::Maybe,
        }
    }

    pub fn negate(self) -> Self {
        match self {
            Self::Yes => Self::No,
            Self::No => Self::Yes,
            Self::Maybe => Self::Maybe,
        }
    }

    pub fn negate_if(self, cond: bool) -> Self {
        if cond { self.negate() } else { self }
    }
}

impl From<bool> for Tri {
    fn from(b: bool) -> Self {
        if b { Self::Yes } else { Self::No }
    }
}

/// A synthetic packet: the first packet of a new connection to a protected
/// port on a local address, which the analysis walks through the ruleset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbePacket {
    pub hook: Hook,
    pub v6: bool,
    pub l4proto: u8,
    pub dport: u16,
    pub daddr: IpAddr,
    /// The interface the connection arrives on (prerouting).
    pub iifname: Option<String>,
    pub iifindex: u32,
}

impl ProbePacket {
    /// The first bytes of the network header, `None` where the probe does not fix them.
    pub fn network_byte(&self, at: usize) -> Option<u8> {
        match (self.v6, self.daddr) {
            (false, IpAddr::V4(d)) => match at {
                0 => Some(0x45),
                9 => Some(self.l4proto),
                16..20 => Some(d.octets()[at - 16]),
                _ => None,
            },
            (true, IpAddr::V6(d)) => match at {
                6 => Some(self.l4proto),
                24..40 => Some(d.octets()[at - 24]),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn transport_byte(&self, at: usize) -> Option<u8> {
        match at {
            2 => Some((self.dport >> 8) as u8),
            3 => Some(self.dport as u8),
            _ => None,
        }
    }
}
