//! The checks of the `frame_decoder` fuzz target, shared with
//! `replication/tests/fuzz_corpus.rs`, which replays the corpus on stable Rust.
//!
//! For any byte string:
//! * the request / reply header parsers agree with docs/protocol.md §3.3, restated
//!   here independently (literal magics, offsets and limits): same verdict, and the
//!   same failing check when both reject;
//! * a header that parses, sealed with the corpus key, opens again to itself; with
//!   any one byte changed, or under another key, or out of sequence, it does not;
//! * the payload tag accepts exactly the payload it was made for;
//! * the DATA_EXTENTS reply decoder agrees with docs/protocol.md §4.1, restated
//!   here, on which lists it accepts, and what it accepts encodes back to itself;
//! * control payloads and label slots that decode re-encode to values that decode
//!   to the same value (JSON has many spellings of one value, so the round trip is
//!   on values, and the re-encoding is checked to be stable);
//! * the handshake messages (docs/protocol.md §2): a server accepts a HELLO exactly
//!   when the spec says (magic, version 3 or 2, reserved bytes zero) and agrees on
//!   the features both know; a client accepts a CHALLENGE only when its magic,
//!   status, version and agreed features are right (and its proof, which random
//!   bytes never are);
//! * nothing panics.
//!
//! A failed check panics, which is what the fuzzer and the test report.

use wire::control::{
    self, DeleteReply, DeleteRequest, LabelUpdate, OpenReply, OpenRequest, SnapshotAction,
    SnapshotReply, StatReply, StatRequest,
};
use wire::frame::{
    decode_extents, encode_extents, FrameKey, Opener, ReplyHeader, RequestHeader, Sealer,
    REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};
use wire::label::{self, Slot};
use wire::WireError;

const REQUEST_LEN: usize = 96;
const REPLY_LEN: usize = 72;
/// docs/protocol.md §11.
const MAX_DATA: u32 = 32 << 20;
const MAX_CONTROL: u32 = 64 << 10;
const MAX_CHECKSUM: u32 = 64 << 20;
const MAX_EXTENTS_RANGE: u32 = 1 << 30;
const MAX_EXTENTS: usize = 256;
/// The key the corpus's valid frames are sealed with.
pub const CORPUS_KEY: [u8; 16] = [0x42; 16];

/// The check of docs/protocol.md §3.3 that rejects a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    Magic,
    Reserved,
    Unknown,
    Malformed,
    TooLarge,
}

/// Runs every check on `data`: as a request frame (header, then payload), as a
/// reply frame, as a control payload at offsets 0, 72 and 96, as a label slot, and
/// as a DATA_EXTENTS reply (bytes 0..8 the request's offset, 8..12 its length).
pub fn check(data: &[u8]) {
    assert_eq!(REQUEST_LEN, REQUEST_HEADER_LEN);
    assert_eq!(REPLY_LEN, REPLY_HEADER_LEN);
    if let Some(head) = data.first_chunk::<REQUEST_LEN>() {
        check_request(head, &data[REQUEST_LEN..]);
    }
    if let Some(head) = data.first_chunk::<REPLY_LEN>() {
        check_reply(head, &data[REPLY_LEN..]);
    }
    check_control(data);
    for at in [REPLY_LEN, REQUEST_LEN] {
        if let Some(p) = data.get(at..) {
            check_control(p);
        }
    }
    check_slot(data);
    check_extents(data);
    check_handshake(data);
}

/// docs/protocol.md §2, restated: the HELLO at the start of `data` (48 bytes) as a
/// server sees it, and the CHALLENGE (80 bytes) as a client sees it.
fn check_handshake(data: &[u8]) {
    use wire::handshake::{ClientHandshake, Secret, ServerHandshake};
    use wire::version::Features;
    let secret = Secret::new(CORPUS_KEY.to_vec());
    if let Some(hello) = data.first_chunk::<48>() {
        let version = u16::from_le_bytes([hello[8], hello[9]]);
        let reserved_ok = match version {
            2 => hello[10..16] == [0; 6],
            _ => hello[14..16] == [0; 2],
        };
        let spec_ok = &hello[..8] == b"UBLKDRP1" && matches!(version, 2 | 3) && reserved_ok;
        match ServerHandshake::on_hello(&secret, hello, [5; 32]) {
            Ok((_, ch)) => {
                assert!(spec_ok, "HELLO accepted against the spec: {hello:?}");
                assert_eq!(u16::from_le_bytes([ch[8], ch[9]]), 0, "status");
                assert_eq!(u16::from_le_bytes([ch[10], ch[11]]), version);
                let offered = u32::from_le_bytes(hello[10..14].try_into().unwrap());
                let agreed = u32::from_le_bytes(ch[12..16].try_into().unwrap());
                let want = if version == 2 {
                    0
                } else {
                    offered & Features::ALL.0
                };
                assert_eq!(agreed, want, "agreed features");
            }
            Err(r) => {
                assert!(!spec_ok, "HELLO refused against the spec: {hello:?}");
                // A wrong version is answered (status 1, our version); the rest not.
                if &hello[..8] == b"UBLKDRP1" && !matches!(version, 2 | 3) {
                    assert_eq!(r.reply.len(), 80);
                    assert_eq!(u16::from_le_bytes([r.reply[8], r.reply[9]]), 1);
                    assert_eq!(u16::from_le_bytes([r.reply[10], r.reply[11]]), 3);
                }
            }
        }
    }
    if let Some(ch) = data.first_chunk::<80>() {
        let (c, _) = ClientHandshake::with_nonce([6; 32], Features::ALL);
        if c.on_challenge(&secret, ch).is_ok() {
            let agreed = u32::from_le_bytes(ch[12..16].try_into().unwrap());
            assert_eq!(&ch[..8], b"UBLKDRP1");
            assert_eq!(u16::from_le_bytes([ch[8], ch[9]]), 0);
            assert_eq!(u16::from_le_bytes([ch[10], ch[11]]), 3);
            assert_eq!(agreed & !Features::ALL.0, 0, "a feature never offered");
        }
    }
}

fn key() -> FrameKey {
    FrameKey::from_bytes(CORPUS_KEY)
}

fn check_request(head: &[u8; REQUEST_LEN], payload: &[u8]) {
    let got = RequestHeader::parse(head);
    let verdict = got.as_ref().err().map(|e| reject_of(e, head));
    assert_eq!(
        verdict,
        spec_request(head),
        "request header {head:02x?}: the parser ({got:?}) disagrees with docs/protocol.md"
    );
    // Opening checks the tag before anything else believes the bytes.
    let _ = Opener::new(key()).open_request(head);
    let Ok((h, _)) = got else { return };
    // Seal it (over a payload of its length, if the input has one) and open it.
    let body = if payload.len() == h.payload_len as usize {
        payload.to_vec()
    } else if h.payload_len <= 1 << 16 {
        vec![0x5a; h.payload_len as usize]
    } else {
        return;
    };
    let sealed = Sealer::new(key()).seal_request(&h, &body);
    let mut o = Opener::new(key());
    let (back, seal) = o.open_request(&sealed).expect("a sealed header opens");
    assert_eq!(back, h, "request round trip");
    assert!(o.open_payload(&seal, &body).is_ok());
    if let Some(first) = body.first() {
        let mut bad = body.clone();
        bad[0] = first ^ 1;
        assert!(
            o.open_payload(&seal, &bad).is_err(),
            "payload flip accepted"
        );
    }
    for at in [0, 4, 8, 16, 40, 64, 80, 95] {
        let mut b = sealed;
        b[at] ^= 0x80;
        assert!(
            Opener::new(key()).open_request(&b).is_err(),
            "flip at {at} accepted"
        );
    }
    assert!(Opener::new(FrameKey::from_bytes([7; 16]))
        .open_request(&sealed)
        .is_err());
    let mut o = Opener::new(key());
    o.open_request(&sealed).expect("first");
    assert!(
        matches!(o.open_request(&sealed), Err(WireError::Sequence { .. })),
        "replay accepted"
    );
}

fn check_reply(head: &[u8; REPLY_LEN], payload: &[u8]) {
    let got = ReplyHeader::parse(head);
    let verdict = got.as_ref().err().map(|e| reject_of(e, head));
    assert_eq!(
        verdict,
        spec_reply(head),
        "reply header {head:02x?}: the parser ({got:?}) disagrees with docs/protocol.md"
    );
    let _ = Opener::new(key()).open_reply(head);
    let Ok((r, _)) = got else { return };
    let body = if payload.len() == r.payload_len as usize {
        payload.to_vec()
    } else if r.payload_len <= 1 << 16 {
        vec![0xa5; r.payload_len as usize]
    } else {
        return;
    };
    let sealed = Sealer::new(key()).seal_reply(&r, &body);
    let mut o = Opener::new(key());
    let (back, seal) = o.open_reply(&sealed).expect("a sealed reply opens");
    assert_eq!(back, r, "reply round trip");
    assert!(o.open_payload(&seal, &body).is_ok());
}

/// Decode `$p` as `$t`; if that works, encode, decode again and compare.
macro_rules! control_round_trip {
    ($t:ty, $p:expr) => {
        match control::decode_control::<$t>($p) {
            Ok(v) => {
                let enc = control::encode_control(&v);
                let back = control::decode_control::<$t>(&enc).unwrap_or_else(|e| {
                    panic!("{v:?} encodes to {enc:?}, which does not decode: {e}")
                });
                assert_eq!(back, v, "{} round trip", stringify!($t));
                assert_eq!(control::encode_control(&back), enc, "stable re-encoding");
                Some(v)
            }
            Err(WireError::Control(_)) => None,
            Err(e) => panic!("decode_control::<{}> failed with {e:?}", stringify!($t)),
        }
    };
}

fn check_control(p: &[u8]) {
    if let Some(o) = control_round_trip!(OpenRequest, p) {
        check_name(&o.replica);
        check_name(&o.volume);
        let _ = wire::VolumeTag::of(&o.volume);
    }
    if let Some(s) = control_round_trip!(StatRequest, p) {
        check_name(&s.replica);
    }
    if let Some(r) = control_round_trip!(OpenReply, p) {
        let _ = r.label.checked();
    }
    if let Some(r) = control_round_trip!(StatReply, p) {
        let _ = r.label.map(|l| l.checked());
    }
    if let Some(d) = control_round_trip!(DeleteRequest, p) {
        check_name(&d.replica);
    }
    control_round_trip!(DeleteReply, p);
    control_round_trip!(LabelUpdate, p);
    control_round_trip!(SnapshotAction, p);
    control_round_trip!(SnapshotReply, p);
}

/// docs/protocol.md §7.
fn check_name(s: &str) {
    let spec = (1..=64).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
    assert_eq!(wire::names::valid_name(s), spec, "valid_name({s:?})");
}

/// A label slot decodes to a label that encodes to a slot that decodes to it.
fn check_slot(b: &[u8]) {
    if let Slot::Label { seq, label } = label::decode_slot(b) {
        let again = label::encode_slot(&label, seq);
        assert_eq!(
            label::decode_slot(&again),
            Slot::Label { seq, label },
            "label slot round trip"
        );
    }
    let half = b.len() / 2;
    let _ = label::read_area(&b[..half], &b[half..]);
}

/// A DATA_EXTENTS reply decodes exactly when the restated rules accept it, to the
/// same list, which encodes back to the same bytes.
fn check_extents(data: &[u8]) {
    let Some(head) = data.first_chunk::<12>() else {
        return;
    };
    let (offset, len) = (le64(head, 0), u64::from(le32(head, 8)));
    if offset.checked_add(len).is_none() {
        return; // no request has such a range (§3.3 check 7)
    }
    let payload = &data[12..];
    let got = decode_extents(wire::ByteOffset(offset), wire::ByteLen(len), payload);
    let spec = spec_extents(offset, len, payload);
    assert_eq!(
        got.as_ref()
            .ok()
            .map(|v| v.iter().map(|(o, l)| (o.0, l.0)).collect::<Vec<_>>()),
        spec,
        "DATA_EXTENTS reply for [{offset}, +{len}): the decoder ({got:?}) disagrees with docs/protocol.md"
    );
    match got {
        Ok(v) => assert_eq!(encode_extents(&v), payload, "extents round trip"),
        Err(e) => assert!(matches!(e, WireError::Malformed { .. }), "{e:?}"),
    }
}

/// docs/protocol.md §4.1: the records of a DATA_EXTENTS reply to a request for
/// `[offset, offset + len)`, or `None` when the client must close.
fn spec_extents(offset: u64, len: u64, p: &[u8]) -> Option<Vec<(u64, u64)>> {
    if !p.len().is_multiple_of(16) || p.len() / 16 > MAX_EXTENTS {
        return None;
    }
    let end = u128::from(offset) + u128::from(len);
    let mut next_free = u128::from(offset);
    let mut v = Vec::new();
    for r in p.chunks(16) {
        let (at, n) = (le64(r, 0), le64(r, 8));
        let (start, stop) = (u128::from(at), u128::from(at) + u128::from(n));
        if n == 0 || start < next_free || stop > end {
            return None;
        }
        next_free = stop;
        v.push((at, n));
    }
    Some(v)
}

fn reject_of(e: &WireError, head: &[u8]) -> Reject {
    match e {
        WireError::BadMagic(m) => {
            assert_eq!(*m, le32(head, 0), "BadMagic names the magic");
            Reject::Magic
        }
        WireError::Reserved => Reject::Reserved,
        WireError::UnknownField { value, .. } => {
            assert_eq!(*value, u64::from(head[4]), "UnknownField names the byte");
            Reject::Unknown
        }
        WireError::Malformed { .. } => Reject::Malformed,
        WireError::FrameTooLarge { len, .. } => {
            assert!(*len > MAX_CONTROL);
            Reject::TooLarge
        }
        other => panic!("a header parser failed with a non-frame error: {other:?}"),
    }
}

/// docs/protocol.md §3.1, §3.3 and §4: which check rejects a request header.
fn spec_request(b: &[u8; REQUEST_LEN]) -> Option<Reject> {
    if b[..4] != *b"UKQ2" {
        return Some(Reject::Magic);
    }
    if b[6..8] != [0, 0] {
        return Some(Reject::Reserved);
    }
    let (op, flags) = (b[4], b[5]);
    let (offset, len, payload_len) = (le64(b, 24), le32(b, 32), le32(b, 36));
    let ids_zero = b[40..64].iter().all(|&x| x == 0);
    // (carries data, allowed flags): FUA = 1 on WRITE, NO_UNMAP = 2 on WRITE_ZEROES.
    let (data, allowed) = match op {
        1 | 3 | 4 => (true, 0),
        2 => (true, 1),
        5 => (true, 2),
        6..=9 | 16..=19 => (false, 0),
        _ => return Some(Reject::Unknown),
    };
    if flags & !allowed != 0 || offset.checked_add(u64::from(len)).is_none() {
        return Some(Reject::Malformed);
    }
    if payload_len > if data { MAX_DATA } else { MAX_CONTROL } {
        return Some(Reject::TooLarge);
    }
    let ok = match op {
        1 => (1..=MAX_DATA).contains(&len) && payload_len == 0,
        2 => len >= 1 && payload_len == len,
        3 => offset == 0 && len == 0 && payload_len == 0,
        4 | 5 => len >= 1 && payload_len == 0,
        6 | 9 => offset == 0 && len == 0 && payload_len >= 1,
        7 => (1..=MAX_CHECKSUM).contains(&len) && payload_len == 0,
        8 => (1..=MAX_EXTENTS_RANGE).contains(&len) && payload_len == 0,
        18 => offset == 0 && len == 0 && payload_len == 0 && ids_zero,
        _ => offset == 0 && len == 0 && payload_len >= 1 && ids_zero,
    };
    if !ok {
        return Some(Reject::Malformed);
    }
    (payload_len == 0 && b[64..80] != [0; 16]).then_some(Reject::Malformed)
}

/// docs/protocol.md §3.2 and §3.3: which check rejects a reply header.
fn spec_reply(b: &[u8; REPLY_LEN]) -> Option<Reject> {
    if b[..4] != *b"UKP2" {
        return Some(Reject::Magic);
    }
    if b[5..8] != [0; 3] || b[36..40] != [0; 4] {
        return Some(Reject::Reserved);
    }
    if b[4] > 6 {
        return Some(Reject::Unknown);
    }
    if le32(b, 32) > MAX_DATA {
        return Some(Reject::TooLarge);
    }
    (le32(b, 32) == 0 && b[40..56] != [0; 16]).then_some(Reject::Reserved)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}
