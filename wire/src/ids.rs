//! Newtypes for every number and id that crosses the wire or lands in a persisted
//! record, so that a generation can never be passed where an epoch is expected.

use serde::{Deserialize, Serialize};

/// A byte offset into a volume (and into a replica's data area).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ByteOffset(pub u64);

/// A length in bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ByteLen(pub u64);

impl ByteOffset {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl ByteLen {
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Owner generation of a volume: every activation takes one above every generation
/// it has seen. Replicas refuse I/O stamped with an older one (fencing).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// No real history reaches this (a new owner every nanosecond for 146 years):
    /// a generation at or past it is damaged or hostile, refused where it enters
    /// (OPEN, activation) so that arithmetic on it never overflows.
    pub const LIMIT: Generation = Generation(1 << 63);

    /// `None` at the maximum (a replica's stored generation is peer-controlled).
    pub fn checked_next(self) -> Option<Generation> {
        self.0.checked_add(1).map(Generation)
    }
}

/// Membership epoch: bumped every time the set of replicas that hold every
/// acknowledged write changes (a fault, a rebuild completing, an activation).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// As [`Generation::LIMIT`]: activation refuses a label or record at or past
    /// it, so a running volume's epochs (which start below it) cannot overflow.
    pub const LIMIT: Epoch = Epoch(1 << 63);

    pub fn next(self) -> Epoch {
        Epoch(self.0.checked_add(1).expect("membership epoch overflow"))
    }
}

/// Random per activation of an owner: tells two activations that took the same
/// generation number apart (a reconnect of the same activation is allowed).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct OwnerId(pub u64);

/// Random per successful OPEN; every I/O frame of the connection carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

/// Chosen by the client, echoed in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Position of a frame in its direction of one connection, from 0 (protocol v2):
/// a replayed, reordered or deleted frame breaks the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct FrameSeq(pub u64);

/// The 64-bit volume tag carried by I/O frames: the first 8 bytes of SHA-256 of
/// the volume name, so a frame meant for one volume can never be applied to
/// another's replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VolumeTag(pub u64);

impl VolumeTag {
    pub fn of(volume_name: &str) -> VolumeTag {
        use sha2::Digest;
        let d = sha2::Sha256::digest(volume_name.as_bytes());
        VolumeTag(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")))
    }
}

macro_rules! uuid_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// A random (version 4) id.
            pub fn random() -> $name {
                let mut b = crate::random::bytes::<16>();
                b[6] = (b[6] & 0x0f) | 0x40;
                b[8] = (b[8] & 0x3f) | 0x80;
                $name(b)
            }

            /// The all-zero id: "not assigned yet" (a label adopted from protocol v1).
            pub fn is_nil(&self) -> bool {
                self.0 == [0; 16]
            }

            /// First 8 hex digits: enough to tell replicas apart in logs.
            pub fn short(&self) -> String {
                self.to_string()[..8].to_string()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let b = &self.0;
                for (i, x) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{x:02x}")?;
                }
                Ok(())
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<$name, String> {
                let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
                let dashes_ok = s.len() == 36
                    && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-');
                if hex.len() != 32 || !dashes_ok {
                    return Err(format!("{s:?} is not a uuid (8-4-4-4-12 hex digits)"));
                }
                let mut b = [0u8; 16];
                for (i, pair) in hex.chunks(2).enumerate() {
                    let pair = std::str::from_utf8(pair).map_err(|_| format!("{s:?}: not hex"))?;
                    b[i] = u8::from_str_radix(pair, 16).map_err(|_| format!("{s:?}: not hex"))?;
                }
                Ok($name(b))
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

uuid_type!(
    /// A volume's identity, minted at its first activation and written into every
    /// replica's label: a replica of another volume is never mistaken for ours.
    VolumeUuid
);
uuid_type!(
    /// A replica's identity, minted when the replica is created (or adopted); the
    /// membership record lists replicas by it.
    ReplicaUuid
);
uuid_type!(
    /// A snapshot's identity, chosen by the owner that takes it and the same on
    /// every replica: a retried snapshot operation is recognised by it.
    SnapshotUuid
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_round_trip_through_text_and_json() {
        let u = ReplicaUuid::random();
        assert_eq!(u.to_string().len(), 36);
        assert_eq!(u.to_string().parse::<ReplicaUuid>(), Ok(u));
        let j = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<ReplicaUuid>(&j).unwrap(), u);
        assert_ne!(u, ReplicaUuid::random());
        assert!(!u.is_nil() && ReplicaUuid::default().is_nil());
        for bad in [
            "",
            "00",
            &"0".repeat(36),
            "0123456789abcdef0123456789abcdef",
        ] {
            assert!(bad.parse::<VolumeUuid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn volume_tags_differ_by_name() {
        assert_eq!(VolumeTag::of("v1"), VolumeTag(0x9264_ef94_9526_fc3b));
        assert_ne!(VolumeTag::of("v1"), VolumeTag::of("v2"));
    }
}
