//! Replays the `frame_decoder` fuzz corpus (fuzz/corpus/frame_decoder) and 100 000
//! pseudo-random inputs through the fuzz target's checks, on stable Rust, so CI
//! exercises them without nightly or cargo-fuzz.

#[path = "../../fuzz/common/frame_check.rs"]
mod frame_check;

use replication::testing::Rng;
use std::panic::{catch_unwind, resume_unwind};
use std::path::PathBuf;

use replication::remote::wire::{
    self, OpenReply, OpenRequest, ReplyHeader, RequestHeader, StatReply, StatRequest,
    REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decoder");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()));
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| {
            let path = e.expect("corpus entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            (name, data)
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 12,
        "fuzz corpus {} has only {} files",
        dir.display(),
        files.len()
    );
    files
}

/// The fuzz target's checks; on failure, name the input before the panic goes on.
fn check(what: &str, data: &[u8]) {
    if let Err(panic) = catch_unwind(|| frame_check::check(data)) {
        eprintln!("input {what} ({} bytes) failed: {data:02x?}", data.len());
        resume_unwind(panic);
    }
}

#[test]
fn corpus_passes_the_fuzz_checks() {
    for (name, data) in corpus() {
        check(&name, &data);
    }
}

fn request(data: &[u8]) -> Result<(), String> {
    let head = data.first_chunk().ok_or("short")?;
    let h = RequestHeader::decode(head).map_err(|e| e.to_string())?;
    let payload = &data[REQUEST_HEADER_LEN..];
    if payload.len() == h.payload_len as usize {
        h.verify_payload(payload).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn reply(data: &[u8]) -> Result<(), String> {
    let head = data.first_chunk().ok_or("short")?;
    let r = ReplyHeader::decode(head).map_err(|e| e.to_string())?;
    let payload = &data[REPLY_HEADER_LEN..];
    if payload.len() == r.payload_len as usize {
        r.verify_payload(payload).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn control(kind: &str, p: &[u8]) -> bool {
    match kind {
        "open-request" => wire::decode_control::<OpenRequest>(p).is_ok(),
        "open-reply" => wire::decode_control::<OpenReply>(p).is_ok(),
        "stat-request" => wire::decode_control::<StatRequest>(p).is_ok(),
        "stat-reply" => wire::decode_control::<StatReply>(p).is_ok(),
        _ => panic!("unknown control kind {kind}"),
    }
}

/// The seeds were written from docs/protocol.md, independently of the code: their
/// names say what the decoders must make of them.
#[test]
fn seeds_decode_as_their_names_say() {
    for (name, data) in corpus() {
        if name.starts_with("valid-req-") {
            assert_eq!(request(&data), Ok(()), "{name}");
            let h = RequestHeader::decode(data.first_chunk().unwrap()).unwrap();
            assert_eq!(
                data.len(),
                REQUEST_HEADER_LEN + h.payload_len as usize,
                "{name}"
            );
        } else if name.starts_with("valid-rep-") {
            assert_eq!(reply(&data), Ok(()), "{name}");
            let r = ReplyHeader::decode(data.first_chunk().unwrap()).unwrap();
            assert_eq!(
                data.len(),
                REPLY_HEADER_LEN + r.payload_len as usize,
                "{name}"
            );
        } else if name.starts_with("bad-req-") {
            assert!(request(&data).is_err(), "{name} is accepted");
        } else if name.starts_with("bad-rep-") {
            assert!(reply(&data).is_err(), "{name} is accepted");
        } else if let Some(rest) = name.strip_prefix("valid-json-") {
            let kind = ["open-request", "open-reply", "stat-request", "stat-reply"]
                .into_iter()
                .find(|k| rest.starts_with(k))
                .unwrap_or_else(|| panic!("{name}: which control type?"));
            assert!(control(kind, &data), "{name} does not decode as {kind}");
        } else if name.starts_with("bad-json-") {
            for kind in ["open-request", "open-reply", "stat-request", "stat-reply"] {
                assert!(!control(kind, &data), "{name} decodes as {kind}");
            }
        }
    }
}

/// The worked example of docs/protocol.md §14 is the seed `valid-req-write-4k-fua`.
#[test]
fn worked_example_matches_the_spec() {
    let (_, data) = corpus()
        .into_iter()
        .find(|(n, _)| n == "valid-req-write-4k-fua")
        .expect("seed valid-req-write-4k-fua");
    let h = RequestHeader::decode(data.first_chunk().unwrap()).unwrap();
    assert_eq!(h.op, wire::Op::Write);
    assert_eq!(
        (h.flags, h.id, h.offset, h.len),
        (wire::FLAG_FUA, 7, 1 << 20, 4096)
    );
    assert_eq!((h.generation, h.session), (3, 0x0123_4567_89ab_cdef));
    assert_eq!(h.volume, wire::volume_id("v1"));
    assert_eq!(h.volume, 0x9264_ef94_9526_fc3b);
    assert_eq!(h.payload_crc, 0x9437_4193);
    assert_eq!(&data[60..64], &0xc68c_a265u32.to_le_bytes());
    assert_eq!(&data[REQUEST_HEADER_LEN..], &[0xab; 4096][..]);
    let reply = ReplyHeader::new(wire::Status::Ok, 7).encode();
    assert_eq!(&reply[36..], &0x0bde_b303u32.to_le_bytes());
}

/// 100 000 inputs: even ones are random bytes (a quarter of them behind a valid
/// magic), odd ones corpus seeds with one to four random bytes changed.
#[test]
fn random_inputs_pass_the_fuzz_checks() {
    let seeds = corpus();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut data = Vec::new();
    for i in 0..100_000u32 {
        data.clear();
        if i % 2 == 0 {
            let len = rng.below(161);
            data.extend((0..len).map(|_| rng.next() as u8));
            match rng.below(8) {
                0 if len >= 4 => data[..4].copy_from_slice(b"UKRQ"),
                1 if len >= 4 => data[..4].copy_from_slice(b"UKRP"),
                _ => {}
            }
        } else {
            let (_, seed) = &seeds[rng.below(seeds.len())];
            data.extend_from_slice(seed);
            if !data.is_empty() {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(data.len());
                    data[at] = rng.next() as u8;
                }
            }
        }
        check(&format!("random #{i}"), &data);
    }
}
