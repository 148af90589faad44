//! Newtypes: a peer's address and a wall-clock instant (both also persisted in
//! events and records).

use serde::{Deserialize, Serialize};

use crate::HaError;

/// A replica server as the config names it: `host:port`, host a name, an IPv4
/// address or a bracketed IPv6 address. Compared as written (no DNS): the config
/// is expected to name one server one way.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerAddr(String);

impl PeerAddr {
    pub fn new(addr: &str) -> Result<PeerAddr, HaError> {
        let bad = |why| HaError::BadPeer {
            addr: addr.to_string(),
            why,
        };
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no :port"))?;
        match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port must be 1..=65535")),
            Ok(_) => {}
        }
        let ok_host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        };
        if !ok_host {
            return Err(bad("the host must be a name, an IPv4 address or [IPv6]"));
        }
        Ok(PeerAddr(addr.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PeerAddr {
    type Error = HaError;
    fn try_from(s: String) -> Result<PeerAddr, HaError> {
        PeerAddr::new(&s)
    }
}

impl From<PeerAddr> for String {
    fn from(p: PeerAddr) -> String {
        p.0
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Milliseconds since the Unix epoch: the monitor's "now", given by its caller.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMs(pub u64);

impl UnixMs {
    pub fn plus_ms(self, ms: u64) -> UnixMs {
        UnixMs(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn since(self, earlier: UnixMs) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_are_host_and_port() {
        for ok in ["10.0.0.4:7450", "node-4.example:7450", "[::1]:7450"] {
            assert_eq!(PeerAddr::new(ok).unwrap().as_str(), ok);
        }
        for (bad, why) in [
            ("10.0.0.4", "no :port"),
            ("10.0.0.4:0", "1..=65535"),
            ("10.0.0.4:99999", "1..=65535"),
            (":7450", "the host"),
            ("[zz]:7450", "the host"),
            ("a b:7450", "the host"),
        ] {
            let e = PeerAddr::new(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}
