//! The checks of the `frame_decoder` fuzz target, shared with
//! `replication/tests/fuzz_corpus.rs`, which replays the corpus on stable Rust.
//!
//! For any byte string:
//! * the request / reply header decoders agree with docs/protocol.md §3.3, restated
//!   here independently (own CRC32C, literal magics and limits): same verdict, and
//!   the same failing check when both reject;
//! * whatever decodes re-encodes to the very same bytes;
//! * `verify_payload` accepts exactly the payloads whose length and CRC the header
//!   carries;
//! * control payloads that decode re-encode to JSON that decodes to the same value
//!   (JSON has many spellings of one value, so the round trip is on values, and the
//!   re-encoding is checked to be stable).
//!
//! A failed check panics, which is what the fuzzer and the test report.

use replication::remote::wire::{
    self, OpenReply, OpenRequest, ReplyHeader, RequestHeader, StatReply, StatRequest,
};
use replication::ReplicationError;

const REQUEST_LEN: usize = 64;
const REPLY_LEN: usize = 40;
/// docs/protocol.md §11.
const MAX_DATA: u32 = 32 << 20;
const MAX_CONTROL: u32 = 64 << 10;

/// The check of docs/protocol.md §3.3 that rejects a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    Magic,
    HeaderCrc,
    Reserved,
    Unknown,
    Malformed,
    TooLarge,
}

/// Runs every check on `data`: as a request frame, as a reply frame (header,
/// then payload), and as a control payload at offsets 0, 40 and 64.
pub fn check(data: &[u8]) {
    if let Some(head) = data.first_chunk::<REQUEST_LEN>() {
        let payload = &data[REQUEST_LEN..];
        check_request(head, payload);
        // The header CRC stops nearly every mutation of a valid header at the second
        // check: also decode a copy with a correct CRC, to reach the field rules.
        check_request(&with_crc(*head), payload);
    }
    if let Some(head) = data.first_chunk::<REPLY_LEN>() {
        let payload = &data[REPLY_LEN..];
        check_reply(head, payload);
        check_reply(&with_crc(*head), payload);
    }
    check_control(data);
    for at in [REPLY_LEN, REQUEST_LEN] {
        if let Some(p) = data.get(at..) {
            check_control(p);
        }
    }
}

fn check_request(head: &[u8; REQUEST_LEN], payload: &[u8]) {
    let got = RequestHeader::decode(head);
    let verdict = got.as_ref().err().map(|e| reject_of(e, head));
    assert_eq!(
        verdict,
        spec_request(head),
        "request header {head:02x?}: the decoder ({got:?}) disagrees with docs/protocol.md"
    );
    let Ok(h) = got else { return };
    assert_eq!(&h.encode(), head, "request header round trip");
    // Receivers call verify_payload with exactly payload_len bytes.
    if payload.len() == h.payload_len as usize {
        let stamped = h.with_payload(payload);
        assert!(stamped.verify_payload(payload).is_ok());
        assert_eq!(
            h.verify_payload(payload).is_ok(),
            stamped == h,
            "request payload check of {h:?}"
        );
    }
}

fn check_reply(head: &[u8; REPLY_LEN], payload: &[u8]) {
    let got = ReplyHeader::decode(head);
    let verdict = got.as_ref().err().map(|e| reject_of(e, head));
    assert_eq!(
        verdict,
        spec_reply(head),
        "reply header {head:02x?}: the decoder ({got:?}) disagrees with docs/protocol.md"
    );
    let Ok(r) = got else { return };
    assert_eq!(&r.encode(), head, "reply header round trip");
    let Ok(len) = u32::try_from(payload.len()) else {
        return;
    };
    let stamped = r.with_payload(payload);
    assert!(stamped.verify_payload(payload).is_ok());
    assert_eq!(
        r.verify_payload(payload).is_ok(),
        stamped.payload_crc == r.payload_crc,
        "reply payload check of {r:?}"
    );
    if len == r.payload_len {
        assert_eq!(r.verify_payload(payload).is_ok(), stamped == r);
    }
}

/// Decode `$p` as `$t`; if that works, encode, decode again and compare.
macro_rules! control_round_trip {
    ($t:ty, $p:expr) => {
        match wire::decode_control::<$t>($p) {
            Ok(v) => {
                let enc = wire::encode_control(&v);
                let back = wire::decode_control::<$t>(&enc).unwrap_or_else(|e| {
                    panic!("{v:?} encodes to {enc:?}, which does not decode: {e}")
                });
                assert_eq!(back, v, "{} round trip", stringify!($t));
                assert_eq!(wire::encode_control(&back), enc, "stable re-encoding");
                Some(v)
            }
            Err(ReplicationError::Control(_)) => None,
            Err(e) => panic!("decode_control::<{}> failed with {e:?}", stringify!($t)),
        }
    };
}

fn check_control(p: &[u8]) {
    if let Some(o) = control_round_trip!(OpenRequest, p) {
        check_name(&o.replica);
        check_name(&o.volume);
        let _ = wire::volume_id(&o.volume);
    }
    if let Some(s) = control_round_trip!(StatRequest, p) {
        check_name(&s.replica);
    }
    control_round_trip!(OpenReply, p);
    control_round_trip!(StatReply, p);
}

/// docs/protocol.md §7.
fn check_name(s: &str) {
    let spec = (1..=64).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
    assert_eq!(wire::valid_name(s), spec, "valid_name({s:?})");
}

fn reject_of(e: &ReplicationError, head: &[u8]) -> Reject {
    match e {
        ReplicationError::BadMagic(m) => {
            assert_eq!(*m, le32(head, 0), "BadMagic names the magic");
            Reject::Magic
        }
        ReplicationError::HeaderCrc => Reject::HeaderCrc,
        ReplicationError::Reserved => Reject::Reserved,
        ReplicationError::UnknownField { value, .. } => {
            assert_eq!(*value, u64::from(head[4]), "UnknownField names the byte");
            Reject::Unknown
        }
        ReplicationError::Malformed { .. } => Reject::Malformed,
        ReplicationError::FrameTooLarge { len, .. } => {
            assert!(*len > MAX_CONTROL);
            Reject::TooLarge
        }
        other => panic!("a header decoder failed with a non-frame error: {other:?}"),
    }
}

/// docs/protocol.md §3.1, §3.3 and §4: which check rejects a request header.
fn spec_request(b: &[u8; REQUEST_LEN]) -> Option<Reject> {
    if b[..4] != *b"UKRQ" {
        return Some(Reject::Magic);
    }
    if crc32c(&b[..60]) != le32(b, 60) {
        return Some(Reject::HeaderCrc);
    }
    if b[6..8] != [0, 0] {
        return Some(Reject::Reserved);
    }
    let (op, flags) = (b[4], b[5]);
    let (offset, len, payload_len) = (le64(b, 16), le32(b, 24), le32(b, 28));
    // (I/O op, allowed flags): FUA = 1 on WRITE, NO_UNMAP = 2 on WRITE_ZEROES.
    let (io, allowed) = match op {
        1 | 3 | 4 => (true, 0),
        2 => (true, 1),
        5 => (true, 2),
        16..=18 => (false, 0),
        _ => return Some(Reject::Unknown),
    };
    if flags & !allowed != 0 || offset.checked_add(u64::from(len)).is_none() {
        return Some(Reject::Malformed);
    }
    if payload_len > if io { MAX_DATA } else { MAX_CONTROL } {
        return Some(Reject::TooLarge);
    }
    let ok = match op {
        1 => (1..=MAX_DATA).contains(&len) && payload_len == 0,
        2 => len >= 1 && payload_len == len,
        3 | 18 => offset == 0 && len == 0 && payload_len == 0,
        4 | 5 => len >= 1 && payload_len == 0,
        _ => offset == 0 && len == 0 && payload_len >= 1,
    };
    (!ok).then_some(Reject::Malformed)
}

/// docs/protocol.md §3.2 and §3.3: which check rejects a reply header.
fn spec_reply(b: &[u8; REPLY_LEN]) -> Option<Reject> {
    if b[..4] != *b"UKRP" {
        return Some(Reject::Magic);
    }
    if crc32c(&b[..36]) != le32(b, 36) {
        return Some(Reject::HeaderCrc);
    }
    if b[5..8] != [0; 3] || b[32..36] != [0; 4] {
        return Some(Reject::Reserved);
    }
    if b[4] > 6 {
        return Some(Reject::Unknown);
    }
    (le32(b, 24) > MAX_DATA).then_some(Reject::TooLarge)
}

/// `b` with its last four bytes replaced by the CRC32C of the others.
fn with_crc<const N: usize>(mut b: [u8; N]) -> [u8; N] {
    let crc = crc32c(&b[..N - 4]);
    b[N - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// CRC-32/Castagnoli, bitwise (independent of the `crc32c` crate the code uses).
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in data {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}
