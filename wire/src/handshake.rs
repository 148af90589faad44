//! Connection handshake, as pure message transformations (the caller moves the
//! bytes): a version check, mutual HMAC-SHA256 challenge–response over the cluster
//! secret, and the derivation of the session keys that authenticate every frame.
//!
//! ```text
//! client -> HELLO      "UBLKDRP1" | version u16 | offered u32 | 0[2] | cn[32]       (48 B)
//! server -> CHALLENGE  "UBLKDRP1" | status u16 | version u16 | agreed u32 | sn[32] |
//!                      HMAC(secret, "ublkd v3 server" | cn | sn | offered | agreed) (80 B)
//! client -> PROOF      HMAC(secret, "ublkd v3 client" | sn | cn | offered | agreed) (32 B)
//! server -> RESULT     "UBAUTHOK" or "UBAUTHNO"                                     (8 B)
//! keys:   HMAC(secret, "ublkd v3 keys" | cn | sn) = client->server key | server->client key
//! ```
//! `offered` is the client's [`Features`], `agreed` the ones the session uses (those
//! both know); both proofs cover both, so no one on the path can strip a feature.
//! A v3 server also answers a version-2 HELLO as version 2 did (the `offered` and
//! `agreed` bytes zero, labels "ublkd v2 …", no features), so servers can be
//! upgraded before owners.
//! Nothing but these fixed-size messages is accepted before both sides proved the
//! secret, so a peer without it learns nothing (not even replica names). A version
//! mismatch is answered with CHALLENGE status 1 and the server's version, then the
//! server closes: the client reports both versions instead of hanging. The labels
//! name the version, so a proof made for one version is worthless in another.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::WireError;
use crate::frame::FrameKey;
use crate::version::{Features, ProtocolVersion};

pub const HELLO_MAGIC: [u8; 8] = *b"UBLKDRP1";
pub const AUTH_OK: [u8; 8] = *b"UBAUTHOK";
pub const AUTH_NO: [u8; 8] = *b"UBAUTHNO";
pub const HELLO_LEN: usize = 48;
pub const CHALLENGE_LEN: usize = 80;
pub const PROOF_LEN: usize = 32;
pub const RESULT_LEN: usize = 8;
pub const STATUS_OK: u16 = 0;
pub const STATUS_VERSION: u16 = 1;
/// A peer that does not finish the handshake in this time is dropped (server side).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The proof and key labels of a version: a proof made in one is worthless in
/// another.
struct Labels {
    server: &'static [u8],
    client: &'static [u8],
    keys: &'static [u8],
}

const V2_LABELS: Labels = Labels {
    server: b"ublkd v2 server",
    client: b"ublkd v2 client",
    keys: b"ublkd v2 keys",
};

const V3_LABELS: Labels = Labels {
    server: b"ublkd v3 server",
    client: b"ublkd v3 client",
    keys: b"ublkd v3 keys",
};

fn labels(version: u16) -> &'static Labels {
    if version == ProtocolVersion::V2 as u16 {
        &V2_LABELS
    } else {
        &V3_LABELS
    }
}

type Nonce = [u8; 32];

/// The cluster secret. Not `Debug`, so it cannot end up in a log line.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        assert!(!bytes.is_empty(), "empty cluster secret");
        Secret(bytes)
    }

    fn mac(&self, label: &[u8], a: &Nonce, b: &Nonce, extra: &[u8]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(a);
        m.update(b);
        m.update(extra);
        m
    }

    fn prove(&self, label: &[u8], a: &Nonce, b: &Nonce, extra: &[u8]) -> [u8; 32] {
        self.mac(label, a, b, extra).finalize().into_bytes().into()
    }

    /// Constant-time check.
    fn check(&self, label: &[u8], a: &Nonce, b: &Nonce, extra: &[u8], proof: &[u8; 32]) -> bool {
        self.mac(label, a, b, extra).verify_slice(proof).is_ok()
    }

    fn keys(&self, labels: &Labels, cn: &Nonce, sn: &Nonce) -> (FrameKey, FrameKey) {
        let okm = self.prove(labels.keys, cn, sn, &[]);
        let half = |i: usize| FrameKey(okm[i..i + 16].try_into().expect("16 bytes"));
        (half(0), half(16))
    }
}

/// What one side of a connection agreed on: `send` seals what it sends, `recv`
/// opens what it receives (each direction has its own key, so a frame cannot be
/// reflected back to its sender), and the features the session uses.
pub struct SessionKeys {
    pub send: FrameKey,
    pub recv: FrameKey,
    pub features: Features,
}

const V: u16 = ProtocolVersion::CURRENT as u16;

/// The feature bytes both proofs cover.
fn feature_bytes(offered: Features, agreed: Features) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&offered.0.to_le_bytes());
    b[4..].copy_from_slice(&agreed.0.to_le_bytes());
    b
}

/// The client's side, between HELLO and PROOF.
pub struct ClientHandshake {
    cn: Nonce,
    offered: Features,
}

impl ClientHandshake {
    /// HELLO with a fresh nonce, offering every feature this build knows.
    pub fn start() -> (ClientHandshake, [u8; HELLO_LEN]) {
        Self::with_nonce(crate::random::bytes(), Features::ALL)
    }

    pub fn with_nonce(cn: Nonce, offered: Features) -> (ClientHandshake, [u8; HELLO_LEN]) {
        let mut hello = [0u8; HELLO_LEN];
        hello[..8].copy_from_slice(&HELLO_MAGIC);
        hello[8..10].copy_from_slice(&V.to_le_bytes());
        hello[10..14].copy_from_slice(&offered.0.to_le_bytes());
        hello[16..48].copy_from_slice(&cn);
        (ClientHandshake { cn, offered }, hello)
    }

    /// Check the server's CHALLENGE; on success, the PROOF to send and the keys the
    /// session will use once RESULT says OK ([`client_result`]).
    pub fn on_challenge(
        &self,
        secret: &Secret,
        ch: &[u8; CHALLENGE_LEN],
    ) -> Result<([u8; PROOF_LEN], SessionKeys), WireError> {
        if ch[..8] != HELLO_MAGIC {
            return Err(WireError::Auth(
                "peer is not a ublkd replica server (bad magic)",
            ));
        }
        let status = u16::from_le_bytes([ch[8], ch[9]]);
        let version = u16::from_le_bytes([ch[10], ch[11]]);
        if status == STATUS_VERSION || (status == STATUS_OK && version != V) {
            return Err(WireError::Version {
                ours: V,
                theirs: version,
            });
        }
        let agreed = Features(u32::from_le_bytes(ch[12..16].try_into().expect("4 bytes")));
        if status != STATUS_OK || agreed.common(self.offered) != agreed {
            return Err(WireError::Auth(
                "garbled challenge (unknown status, or features we did not offer)",
            ));
        }
        let sn: Nonce = ch[16..48].try_into().expect("32 bytes");
        let server_proof: [u8; 32] = ch[48..80].try_into().expect("32 bytes");
        let feats = feature_bytes(self.offered, agreed);
        if !secret.check(V3_LABELS.server, &self.cn, &sn, &feats, &server_proof) {
            return Err(WireError::Auth(
                "server does not know the cluster secret (wrong secret on one side?)",
            ));
        }
        let (c2s, s2c) = secret.keys(&V3_LABELS, &self.cn, &sn);
        Ok((
            secret.prove(V3_LABELS.client, &sn, &self.cn, &feats),
            SessionKeys {
                send: c2s,
                recv: s2c,
                features: agreed,
            },
        ))
    }
}

/// The server's RESULT, as the client sees it.
pub fn client_result(res: &[u8; RESULT_LEN]) -> Result<(), WireError> {
    match *res {
        AUTH_OK => Ok(()),
        AUTH_NO => Err(WireError::Auth(
            "server rejected our proof of the cluster secret",
        )),
        _ => Err(WireError::Auth("garbled handshake result")),
    }
}

/// The server's side, between CHALLENGE and PROOF.
pub struct ServerHandshake {
    cn: Nonce,
    sn: Nonce,
    /// The client's version (3, or 2 for an owner not upgraded yet).
    version: u16,
    offered: Features,
    agreed: Features,
}

/// Why the server ends a handshake, with the bytes to send before closing.
pub struct Refusal {
    pub reply: Vec<u8>,
    pub error: WireError,
}

impl ServerHandshake {
    /// Check HELLO; on success the CHALLENGE to send (with server nonce `sn`).
    pub fn on_hello(
        secret: &Secret,
        hello: &[u8; HELLO_LEN],
        sn: Nonce,
    ) -> Result<(ServerHandshake, [u8; CHALLENGE_LEN]), Refusal> {
        if hello[..8] != HELLO_MAGIC {
            return Err(Refusal {
                reply: Vec::new(),
                error: WireError::Auth("not a ublkd client (bad hello magic)"),
            });
        }
        let version = u16::from_le_bytes([hello[8], hello[9]]);
        let mut ch = [0u8; CHALLENGE_LEN];
        ch[..8].copy_from_slice(&HELLO_MAGIC);
        let v2 = ProtocolVersion::V2 as u16;
        if version != V && version != v2 {
            ch[8..10].copy_from_slice(&STATUS_VERSION.to_le_bytes());
            ch[10..12].copy_from_slice(&V.to_le_bytes());
            return Err(Refusal {
                reply: ch.to_vec(),
                error: WireError::Version {
                    ours: V,
                    theirs: version,
                },
            });
        }
        let offered = Features(u32::from_le_bytes(
            hello[10..14].try_into().expect("4 bytes"),
        ));
        let reserved = match version == v2 {
            true => &hello[10..16],
            false => &hello[14..16],
        };
        if reserved.iter().any(|&b| b != 0) {
            return Err(Refusal {
                reply: Vec::new(),
                error: WireError::Auth("reserved hello bytes set"),
            });
        }
        // A version-2 owner is answered as version 2 did: no features.
        let agreed = match version == v2 {
            true => Features::NONE,
            false => offered.common(Features::ALL),
        };
        let cn: Nonce = hello[16..48].try_into().expect("32 bytes");
        ch[10..12].copy_from_slice(&version.to_le_bytes());
        ch[12..16].copy_from_slice(&agreed.0.to_le_bytes());
        ch[16..48].copy_from_slice(&sn);
        let hs = ServerHandshake {
            cn,
            sn,
            version,
            offered,
            agreed,
        };
        ch[48..80].copy_from_slice(&secret.prove(
            labels(version).server,
            &cn,
            &sn,
            &hs.feature_bytes(),
        ));
        Ok((hs, ch))
    }

    /// What the proofs cover besides the nonces: nothing in version 2.
    fn feature_bytes(&self) -> Vec<u8> {
        match self.version == ProtocolVersion::V2 as u16 {
            true => Vec::new(),
            false => feature_bytes(self.offered, self.agreed).to_vec(),
        }
    }

    /// The client's protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Check the client's PROOF: the RESULT to send and, on success, the keys.
    pub fn on_proof(
        self,
        secret: &Secret,
        proof: &[u8; PROOF_LEN],
    ) -> Result<([u8; RESULT_LEN], SessionKeys), Refusal> {
        let labels = labels(self.version);
        if !secret.check(
            labels.client,
            &self.sn,
            &self.cn,
            &self.feature_bytes(),
            proof,
        ) {
            return Err(Refusal {
                reply: AUTH_NO.to_vec(),
                error: WireError::Auth("client failed the cluster-secret challenge"),
            });
        }
        let (c2s, s2c) = secret.keys(labels, &self.cn, &self.sn);
        Ok((
            AUTH_OK,
            SessionKeys {
                send: s2c,
                recv: c2s,
                features: self.agreed,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(client: &Secret, server: &Secret) -> Result<(SessionKeys, SessionKeys), WireError> {
        let (c, hello) = ClientHandshake::start();
        let (s, ch) = ServerHandshake::on_hello(server, &hello, [9; 32]).map_err(|r| r.error)?;
        let (proof, ck) = c.on_challenge(client, &ch)?;
        let (res, sk) = s.on_proof(server, &proof).map_err(|r| r.error)?;
        client_result(&res)?;
        Ok((ck, sk))
    }

    #[test]
    fn same_secret_authenticates_both_ways_and_agrees_on_keys() {
        let k = Secret::new(b"0123456789abcdef".to_vec());
        let (c, s) = run(&k, &k).unwrap();
        assert_eq!(c.send.0, s.recv.0);
        assert_eq!(c.recv.0, s.send.0);
        assert_ne!(c.send.0, c.recv.0, "one key per direction");
        let (c2, _) = run(&k, &k).unwrap();
        assert_ne!(c.send.0, c2.send.0, "fresh keys per connection");
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let err = run(
            &Secret::new(b"0123456789abcdef".to_vec()),
            &Secret::new(b"fedcba9876543210".to_vec()),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("does not know the cluster secret"));
    }

    #[test]
    fn a_forged_proof_is_refused_with_auth_no() {
        let k = Secret::new(b"0123456789abcdef".to_vec());
        let (_, hello) = ClientHandshake::start();
        let (s, _) = ServerHandshake::on_hello(&k, &hello, [1; 32]).ok().unwrap();
        let r = s.on_proof(&k, &[0; 32]).err().unwrap();
        assert_eq!(r.reply, AUTH_NO.to_vec());
    }

    #[test]
    fn a_v1_client_gets_a_version_reply_and_an_upgrade_message() {
        let k = Secret::new(b"0123456789abcdef".to_vec());
        let (_, mut hello) = ClientHandshake::start();
        hello[8..10].copy_from_slice(&1u16.to_le_bytes());
        let r = ServerHandshake::on_hello(&k, &hello, [1; 32])
            .err()
            .unwrap();
        assert_eq!(r.reply.len(), CHALLENGE_LEN);
        assert_eq!(u16::from_le_bytes([r.reply[8], r.reply[9]]), STATUS_VERSION);
        assert_eq!(u16::from_le_bytes([r.reply[10], r.reply[11]]), 3);
        assert!(r.error.to_string().contains("upgrade ublkd on the peer"));
        // What a v3 client says when a v2 server answers.
        let (c, _) = ClientHandshake::start();
        let mut ch = [0u8; CHALLENGE_LEN];
        ch[..8].copy_from_slice(&HELLO_MAGIC);
        ch[8..10].copy_from_slice(&STATUS_VERSION.to_le_bytes());
        ch[10..12].copy_from_slice(&2u16.to_le_bytes());
        let e = c.on_challenge(&k, &ch).err().unwrap();
        assert_eq!(e, WireError::Version { ours: 3, theirs: 2 });
        assert!(e.to_string().contains("upgrade ublkd on the peer"), "{e}");
    }

    #[test]
    fn features_are_agreed_and_no_one_on_the_path_can_strip_them() {
        let k = Secret::new(b"0123456789abcdef".to_vec());
        let (c, s) = run(&k, &k).unwrap();
        assert_eq!((c.features, s.features), (Features::ALL, Features::ALL));
        // A client offering bits this build does not know gets only known ones.
        let (c, hello) = ClientHandshake::with_nonce([3; 32], Features(0xffff_0000 | 1));
        let (s, ch) = ServerHandshake::on_hello(&k, &hello, [4; 32]).ok().unwrap();
        assert_eq!(u32::from_le_bytes(ch[12..16].try_into().unwrap()), 1);
        let (proof, ck) = c.on_challenge(&k, &ch).unwrap();
        let (_, sk) = s.on_proof(&k, &proof).ok().unwrap();
        assert_eq!((ck.features, sk.features), (Features(1), Features(1)));
        // A man in the middle clears the agreed features in CHALLENGE: the
        // server's proof no longer matches.
        let (c, hello) = ClientHandshake::start();
        let (_, mut ch) = ServerHandshake::on_hello(&k, &hello, [5; 32]).ok().unwrap();
        ch[12..16].copy_from_slice(&[0; 4]);
        let e = c.on_challenge(&k, &ch).err().unwrap();
        assert!(e.to_string().contains("cluster secret"), "{e}");
        // ... or in HELLO: the client's check of the server's proof fails too.
        let (c, mut hello) = ClientHandshake::start();
        hello[10..14].copy_from_slice(&[0; 4]);
        let (_, ch) = ServerHandshake::on_hello(&k, &hello, [6; 32]).ok().unwrap();
        assert!(c.on_challenge(&k, &ch).is_err());
    }

    /// Servers are upgraded first: a v3 server completes a version-2 owner's
    /// handshake as version 2 did (v2 labels, no features).
    #[test]
    fn a_v3_server_serves_a_v2_owner() {
        let k = Secret::new(b"0123456789abcdef".to_vec());
        let cn = [7u8; 32];
        let mut hello = [0u8; HELLO_LEN];
        hello[..8].copy_from_slice(&HELLO_MAGIC);
        hello[8..10].copy_from_slice(&2u16.to_le_bytes());
        hello[16..48].copy_from_slice(&cn);
        let (s, ch) = ServerHandshake::on_hello(&k, &hello, [8; 32]).ok().unwrap();
        assert_eq!(u16::from_le_bytes([ch[10], ch[11]]), 2);
        assert_eq!(ch[12..16], [0; 4]);
        let sn: Nonce = ch[16..48].try_into().unwrap();
        let server_proof: [u8; 32] = ch[48..80].try_into().unwrap();
        assert!(k.check(b"ublkd v2 server", &cn, &sn, &[], &server_proof));
        let proof = k.prove(b"ublkd v2 client", &sn, &cn, &[]);
        let (res, sk) = s.on_proof(&k, &proof).ok().unwrap();
        assert_eq!(res, AUTH_OK);
        assert_eq!(sk.features, Features::NONE);
        let okm = k.prove(b"ublkd v2 keys", &cn, &sn, &[]);
        assert_eq!(sk.recv.0[..], okm[..16], "the v2 key schedule");
        // A v2 HELLO with bytes set where v3 carries features is garbled.
        hello[11] = 1;
        assert!(ServerHandshake::on_hello(&k, &hello, [8; 32]).is_err());
    }
}
