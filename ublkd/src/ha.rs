//! The HA monitor's edge: probing replica servers. The decisions are in the `ha`
//! crate ([`ha::monitor`]); this module turns the network into its inputs.

use std::time::Duration;

use ha::peer::{Probe, ProbeFailure};
use replication::remote::client::stat;
use replication::remote::{RemoteSpec, Secret};
use replication::ReplicationError;
use wire::control::OpenRequest;

/// The replica id a probe STATs: any valid name will do (the reply's capacity
/// and the fact of a reply are what count); one no volume uses keeps the
/// server's log readable.
const PROBE_ID: &str = "ublkd-ha-probe";

/// One probe of the replica server at `addr`: connect, authenticate with the
/// cluster secret, STAT, all within `timeout`.
pub async fn probe(addr: &str, secret: &Secret, timeout: Duration) -> Probe {
    let spec = RemoteSpec {
        addr: addr.to_string(),
        secret: secret.clone(),
        open: OpenRequest {
            replica: PROBE_ID.into(),
            volume: PROBE_ID.into(),
            volume_uuid: wire::VolumeUuid::default(),
            size: 0,
            block_size: 4096,
            generation: wire::Generation(0),
            owner: wire::OwnerId(0),
            create: None,
        },
        deadline: timeout,
        connect_timeout: timeout,
    };
    match tokio::time::timeout(timeout, stat(&spec)).await {
        Ok(Ok(reply)) => Probe::Answered {
            capacity: reply.capacity,
        },
        Ok(Err(e)) => Probe::Failed(classify(&e)),
        Err(_) => Probe::Failed(ProbeFailure::NoReply),
    }
}

/// What a failed probe says about the peer.
pub fn classify(e: &ReplicationError) -> ProbeFailure {
    use std::io::ErrorKind;
    match e {
        ReplicationError::Connect { source, .. }
            if source.kind() == ErrorKind::ConnectionRefused =>
        {
            ProbeFailure::Refused
        }
        // A connect that timed out: nothing answered at all.
        ReplicationError::Connect { source, .. } => ProbeFailure::Unreachable {
            error: source.to_string(),
        },
        // Connected, then the handshake or the reply did not come in time.
        ReplicationError::Net(source) if source.kind() == ErrorKind::TimedOut => {
            ProbeFailure::NoReply
        }
        ReplicationError::Net(source) => ProbeFailure::Unreachable {
            error: source.to_string(),
        },
        other => ProbeFailure::Rejected {
            error: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_errors_say_whether_the_host_or_the_server_is_gone() {
        let io = |k| std::io::Error::from(k);
        let connect = |k| ReplicationError::Connect {
            addr: "10.0.0.2:7450".into(),
            source: io(k),
        };
        use std::io::ErrorKind::*;
        for (e, want) in [
            (connect(ConnectionRefused), "refused"),
            (connect(TimedOut), "unreachable"),
            (connect(HostUnreachable), "unreachable"),
            (ReplicationError::Net(io(TimedOut)), "no_reply"),
            (ReplicationError::Net(io(ConnectionReset)), "unreachable"),
            (ReplicationError::Protocol("bad tag".into()), "rejected"),
        ] {
            let got = serde_json::to_value(classify(&e)).unwrap();
            assert_eq!(got["failure"], want, "{e}");
        }
    }
}
