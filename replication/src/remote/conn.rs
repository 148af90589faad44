//! The socket side of the protocol: the handshake of [`wire::handshake`] and
//! framed exchanges of [`wire::frame`], over any tokio stream.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wire::frame::{
    Opener, ReplyHeader, RequestHeader, Sealer, REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};
use wire::handshake::{
    client_result, ClientHandshake, Secret, ServerHandshake, SessionKeys, CHALLENGE_LEN, HELLO_LEN,
    PROOF_LEN, RESULT_LEN,
};

use crate::error::ReplicationError;

fn net(e: std::io::Error) -> ReplicationError {
    ReplicationError::Net(e)
}

/// Client side. On success the stream carries frames, sealed and opened with the keys.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &Secret,
) -> Result<SessionKeys, ReplicationError> {
    let (hs, hello) = ClientHandshake::start();
    s.write_all(&hello).await.map_err(net)?;
    let mut ch = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut ch).await.map_err(net)?;
    let (proof, keys) = hs.on_challenge(secret, &ch)?;
    s.write_all(&proof).await.map_err(net)?;
    let mut res = [0u8; RESULT_LEN];
    s.read_exact(&mut res).await.map_err(net)?;
    client_result(&res)?;
    Ok(keys)
}

/// Server side. `Err` means: close the connection (after logging the reason); any
/// reply the protocol owes the peer (a version mismatch, `UBAUTHNO`) was sent.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &Secret,
) -> Result<SessionKeys, ReplicationError> {
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).await.map_err(net)?;
    let (hs, ch) = match ServerHandshake::on_hello(secret, &hello, wire::random::bytes()) {
        Ok(x) => x,
        Err(refusal) => {
            let _ = s.write_all(&refusal.reply).await;
            let _ = s.flush().await;
            return Err(refusal.error.into());
        }
    };
    s.write_all(&ch).await.map_err(net)?;
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof).await.map_err(net)?;
    match hs.on_proof(secret, &proof) {
        Ok((res, keys)) => {
            s.write_all(&res).await.map_err(net)?;
            Ok(keys)
        }
        Err(refusal) => {
            let _ = s.write_all(&refusal.reply).await;
            Err(refusal.error.into())
        }
    }
}

/// One framed request and its reply on an otherwise idle connection (OPEN, STAT).
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    sealer: &mut Sealer,
    opener: &mut Opener,
    h: &RequestHeader,
    payload: &[u8],
) -> Result<(ReplyHeader, Vec<u8>), ReplicationError> {
    let head: [u8; REQUEST_HEADER_LEN] = sealer.seal_request(h, payload);
    s.write_all(&head).await.map_err(net)?;
    s.write_all(payload).await.map_err(net)?;
    let mut hb = [0u8; REPLY_HEADER_LEN];
    s.read_exact(&mut hb).await.map_err(net)?;
    let (r, seal) = opener.open_reply(&hb)?;
    let mut p = vec![0u8; r.payload_len as usize];
    s.read_exact(&mut p).await.map_err(net)?;
    opener.open_payload(&seal, &p)?;
    if r.id != h.id {
        return Err(ReplicationError::Protocol(format!(
            "reply to request {} answers {}",
            h.id.0, r.id.0
        )));
    }
    Ok((r, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(client: &Secret, server: &Secret) -> (Result<(), String>, Result<(), String>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (client, server) = (client.clone(), server.clone());
        // Each side owns (and on failure drops) its end, so the other sees EOF.
        let c = tokio::spawn(async move { client_handshake(&mut a, &client).await.map(drop) });
        let s = tokio::spawn(async move { server_handshake(&mut b, &server).await.map(drop) });
        let (c, s) = (c.await.unwrap(), s.await.unwrap());
        (c.map_err(|e| e.to_string()), s.map_err(|e| e.to_string()))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn handshake_over_a_stream() {
        let k = Secret::new(b"0123456789abcdef".to_vec());
        assert_eq!(rt().block_on(pair(&k, &k)), (Ok(()), Ok(())));
        let (c, s) = rt().block_on(pair(&k, &Secret::new(b"fedcba9876543210".to_vec())));
        // The client notices first (the server's proof is wrong) and hangs up.
        assert!(c.unwrap_err().contains("does not know the cluster secret"));
        assert!(s.is_err());
    }
}
