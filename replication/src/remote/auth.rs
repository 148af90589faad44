//! Connection handshake: version check, then mutual HMAC-SHA256 challenge–response
//! over a cluster secret. Nothing but these fixed-size messages is accepted before
//! both sides have proven knowledge of the secret, so a peer without it learns
//! nothing (not even replica names) and can change nothing.
//!
//! ```text
//! client -> HELLO      "UBLKDRP1" | version u16 | 0 u16 | 0 u32 | client_nonce[32]   (48 B)
//! server -> CHALLENGE  "UBLKDRP1" | status u16 | version u16 | 0 u32 |
//!                      server_nonce[32] | HMAC(secret, "ublkd server" | cn | sn)     (80 B)
//! client -> PROOF      HMAC(secret, "ublkd client" | sn | cn)                         (32 B)
//! server -> RESULT     "UBAUTHOK" or "UBAUTHNO", then frames or close                 (8 B)
//! ```
//! A version mismatch is answered with CHALLENGE status 1 and the server's version,
//! then the server closes: the client reports both versions instead of hanging.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::PROTOCOL_VERSION;
use crate::error::ReplicationError;

pub const HELLO_MAGIC: [u8; 8] = *b"UBLKDRP1";
pub const AUTH_OK: [u8; 8] = *b"UBAUTHOK";
pub const AUTH_NO: [u8; 8] = *b"UBAUTHNO";
const STATUS_OK: u16 = 0;
const STATUS_VERSION: u16 = 1;
/// A peer that does not finish the handshake in this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster secret. Not `Debug`, so it cannot end up in a log line.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        assert!(!bytes.is_empty(), "empty cluster secret");
        Secret(bytes)
    }

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }

    fn prove(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
        self.mac(label, a, b).finalize().into_bytes().into()
    }

    /// Constant-time check.
    fn check(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac(label, a, b).verify_slice(proof).is_ok()
    }
}

const SERVER_LABEL: &[u8] = b"ublkd server";
const CLIENT_LABEL: &[u8] = b"ublkd client";

pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("kernel random source");
    n
}

/// A random 64-bit value (session ids, owner ids).
pub fn random_u64() -> u64 {
    let mut n = [0u8; 8];
    getrandom::fill(&mut n).expect("kernel random source");
    u64::from_le_bytes(n)
}

fn auth_err(why: impl Into<String>) -> ReplicationError {
    ReplicationError::Auth(why.into())
}

/// Client side. On success the stream carries frames.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &Secret,
) -> Result<(), ReplicationError> {
    let cn = nonce();
    let mut hello = [0u8; 48];
    hello[..8].copy_from_slice(&HELLO_MAGIC);
    hello[8..10].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello[16..48].copy_from_slice(&cn);
    s.write_all(&hello).await.map_err(ReplicationError::Net)?;
    let mut ch = [0u8; 80];
    s.read_exact(&mut ch).await.map_err(ReplicationError::Net)?;
    if ch[..8] != HELLO_MAGIC {
        return Err(auth_err("peer is not a ublkd replica server (bad magic)"));
    }
    let status = u16::from_le_bytes([ch[8], ch[9]]);
    let version = u16::from_le_bytes([ch[10], ch[11]]);
    if status == STATUS_VERSION || (status == STATUS_OK && version != PROTOCOL_VERSION) {
        return Err(ReplicationError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    if status != STATUS_OK || ch[12..16] != [0; 4] {
        return Err(auth_err(format!(
            "garbled challenge (status {status}, reserved bytes set?)"
        )));
    }
    let sn: [u8; 32] = ch[16..48].try_into().expect("32 bytes");
    let server_proof: [u8; 32] = ch[48..80].try_into().expect("32 bytes");
    if !secret.check(SERVER_LABEL, &cn, &sn, &server_proof) {
        return Err(auth_err(
            "server does not know the cluster secret (wrong secret on one side?)",
        ));
    }
    s.write_all(&secret.prove(CLIENT_LABEL, &sn, &cn))
        .await
        .map_err(ReplicationError::Net)?;
    let mut res = [0u8; 8];
    s.read_exact(&mut res)
        .await
        .map_err(ReplicationError::Net)?;
    match res {
        AUTH_OK => Ok(()),
        AUTH_NO => Err(auth_err("server rejected our proof of the cluster secret")),
        _ => Err(auth_err("garbled handshake result")),
    }
}

/// Server side. `Err` means: close the connection (after logging the reason).
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &Secret,
) -> Result<(), ReplicationError> {
    let mut hello = [0u8; 48];
    s.read_exact(&mut hello)
        .await
        .map_err(ReplicationError::Net)?;
    if hello[..8] != HELLO_MAGIC {
        return Err(auth_err("not a ublkd client (bad hello magic)"));
    }
    let version = u16::from_le_bytes([hello[8], hello[9]]);
    if hello[10..16] != [0; 6] {
        return Err(auth_err("reserved hello bytes set"));
    }
    let mut ch = [0u8; 80];
    ch[..8].copy_from_slice(&HELLO_MAGIC);
    ch[10..12].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    if version != PROTOCOL_VERSION {
        ch[8..10].copy_from_slice(&STATUS_VERSION.to_le_bytes());
        let _ = s.write_all(&ch).await;
        let _ = s.flush().await;
        return Err(ReplicationError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let cn: [u8; 32] = hello[16..48].try_into().expect("32 bytes");
    let sn = nonce();
    ch[16..48].copy_from_slice(&sn);
    ch[48..80].copy_from_slice(&secret.prove(SERVER_LABEL, &cn, &sn));
    s.write_all(&ch).await.map_err(ReplicationError::Net)?;
    let mut proof = [0u8; 32];
    s.read_exact(&mut proof)
        .await
        .map_err(ReplicationError::Net)?;
    if !secret.check(CLIENT_LABEL, &sn, &cn, &proof) {
        let _ = s.write_all(&AUTH_NO).await;
        return Err(auth_err("client failed the cluster-secret challenge"));
    }
    s.write_all(&AUTH_OK).await.map_err(ReplicationError::Net)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(client: &Secret, server: &Secret) -> (Result<(), String>, Result<(), String>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (client, server) = (client.clone(), server.clone());
        // Each side owns (and on failure drops) its end, so the other sees EOF.
        let c = tokio::spawn(async move { client_handshake(&mut a, &client).await });
        let s = tokio::spawn(async move { server_handshake(&mut b, &server).await });
        let (c, s) = (c.await.unwrap(), s.await.unwrap());
        (c.map_err(|e| e.to_string()), s.map_err(|e| e.to_string()))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn same_secret_authenticates_both_ways() {
        let k = Secret::new(b"0123456789abcdef".to_vec());
        let (c, s) = rt().block_on(pair(&k, &k));
        assert_eq!((c, s), (Ok(()), Ok(())));
    }

    #[test]
    fn wrong_secret_is_rejected_on_both_sides() {
        let (c, s) = rt().block_on(pair(
            &Secret::new(b"0123456789abcdef".to_vec()),
            &Secret::new(b"fedcba9876543210".to_vec()),
        ));
        // The client notices first (the server's proof is wrong) and hangs up, so the
        // server never sees a valid proof either.
        assert!(c.unwrap_err().contains("does not know the cluster secret"));
        assert!(s.is_err());
    }

    #[test]
    fn version_mismatch_gets_an_explicit_reply() {
        rt().block_on(async {
            let k = Secret::new(b"0123456789abcdef".to_vec());
            let (mut a, mut b) = tokio::io::duplex(4096);
            let server = tokio::spawn(async move { server_handshake(&mut b, &k).await });
            let mut hello = [0u8; 48];
            hello[..8].copy_from_slice(&HELLO_MAGIC);
            hello[8..10].copy_from_slice(&7u16.to_le_bytes());
            a.write_all(&hello).await.unwrap();
            let mut ch = [0u8; 80];
            a.read_exact(&mut ch).await.unwrap();
            assert_eq!(u16::from_le_bytes([ch[8], ch[9]]), STATUS_VERSION);
            assert_eq!(u16::from_le_bytes([ch[10], ch[11]]), PROTOCOL_VERSION);
            let err = server.await.unwrap().unwrap_err();
            assert!(matches!(err, ReplicationError::Version { theirs: 7, .. }));
        });
    }
}
