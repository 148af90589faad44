//! Replays the `frame_decoder` fuzz corpus (fuzz/corpus/frame_decoder) and 100 000
//! pseudo-random inputs through the fuzz target's checks, on stable Rust, so CI
//! exercises them without nightly or cargo-fuzz. The corpus's seeds are made here
//! (valid frames sealed with the corpus key): `UBLKD_WRITE_CORPUS=1 cargo test -p
//! replication --test fuzz_corpus` rewrites them.

#[path = "../../fuzz/common/frame_check.rs"]
mod frame_check;

use std::panic::{catch_unwind, resume_unwind};
use std::path::PathBuf;

use replication::testing::Rng;
use wire::control::{
    encode_control, Capacity, LabelUpdate, OpenReply, OpenRequest, SnapshotAction, SnapshotEntry,
    SnapshotReply, StatReply, StatRequest,
};
use wire::frame::{
    decode_extents, encode_extents, FrameKey, Op, Opener, ReplyHeader, RequestHeader, Sealer,
    Status, FLAG_FUA, FLAG_NO_UNMAP, MAX_CONTROL, MAX_EXTENTS_RANGE, REPLY_HEADER_LEN,
    REQUEST_HEADER_LEN,
};
use wire::label::{encode_slot, Label, Membership};
use wire::{
    ByteLen, ByteOffset, Epoch, Generation, OwnerId, ReplicaUuid, RequestId, SessionId, VolumeTag,
    VolumeUuid,
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decoder")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let entries = std::fs::read_dir(dir()).unwrap_or_else(|e| panic!("fuzz corpus: {e}"));
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| {
            let path = e.expect("corpus entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The fuzz target's checks; on failure, name the input before the panic goes on.
fn check(what: &str, data: &[u8]) {
    if let Err(panic) = catch_unwind(|| frame_check::check(data)) {
        eprintln!("input {what} ({} bytes) failed: {data:02x?}", data.len());
        resume_unwind(panic);
    }
}

fn key() -> FrameKey {
    FrameKey::from_bytes(frame_check::CORPUS_KEY)
}

/// A DATA_EXTENTS reply as the fuzz checks read it: the request's offset (8 bytes)
/// and length (4), then the records.
fn extents(offset: u64, len: u32, v: &[(u64, u64)]) -> Vec<u8> {
    let mut b = offset.to_le_bytes().to_vec();
    b.extend_from_slice(&len.to_le_bytes());
    let v: Vec<_> = v
        .iter()
        .map(|&(o, l)| (ByteOffset(o), ByteLen(l)))
        .collect();
    b.extend_from_slice(&encode_extents(&v));
    b
}

fn req(op: Op, f: impl FnOnce(&mut RequestHeader)) -> RequestHeader {
    let mut h = RequestHeader::new(op, RequestId(7));
    if op.is_fenced() {
        h.generation = Generation(3);
        h.session = SessionId(0x0123_4567_89ab_cdef);
        h.volume = VolumeTag::of("v1");
    }
    f(&mut h);
    h
}

fn sealed_req(h: RequestHeader, payload: &[u8]) -> Vec<u8> {
    let mut v = Sealer::new(key()).seal_request(&h, payload).to_vec();
    v.extend_from_slice(payload);
    v
}

fn sealed_rep(status: Status, aux: u64, payload: &[u8]) -> Vec<u8> {
    let h = ReplyHeader {
        status,
        id: RequestId(7),
        aux,
        payload_len: payload.len() as u32,
    };
    let mut v = Sealer::new(key()).seal_reply(&h, payload).to_vec();
    v.extend_from_slice(payload);
    v
}

fn label() -> Label {
    let vu: VolumeUuid = "7b0c4a4e-2f61-4c2e-9a4b-5f1e2d3c4b5a".parse().unwrap();
    let ru: ReplicaUuid = "0e2d4c6b-8a9f-4e1d-b2c3-a4b5c6d7e8f9".parse().unwrap();
    let mut l = Label::new("v1", vu, ru, 1 << 30, 4096);
    l.generation = Generation(3);
    l.owner = OwnerId(42);
    l.membership = Membership {
        epoch: Epoch(5),
        generation: Generation(3),
        members: vec![ru],
    };
    l
}

fn open_request() -> OpenRequest {
    OpenRequest {
        replica: "v1-b".into(),
        volume: "v1".into(),
        volume_uuid: label().volume_uuid,
        size: 1 << 30,
        block_size: 4096,
        generation: Generation(3),
        owner: OwnerId(42),
        create: Some(label().replica_uuid),
    }
}

/// Every seed, by what the decoders must make of it (its name).
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let data = |n: usize, b: u8| vec![b; n];
    let write = |len: u32, fua: bool| {
        req(Op::Write, |h| {
            h.offset = ByteOffset(1 << 20);
            h.len = len;
            h.payload_len = len;
            h.flags = if fua { FLAG_FUA } else { 0 };
        })
    };
    let (_, hello_v3) =
        wire::handshake::ClientHandshake::with_nonce([6; 32], wire::version::Features::ALL);
    let mut hello_v2 = hello_v3;
    hello_v2[8..16].copy_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
    let secret = wire::handshake::Secret::new(frame_check::CORPUS_KEY.to_vec());
    let challenge = match wire::handshake::ServerHandshake::on_hello(&secret, &hello_v3, [5; 32]) {
        Ok((_, ch)) => ch,
        Err(_) => panic!("the corpus HELLO is valid"),
    };
    let open_json = encode_control(&open_request());
    let stat_json = encode_control(&StatRequest {
        replica: "v1-b".into(),
    });
    let snapshot_json = encode_control(&SnapshotAction::Create {
        uuid: wire::SnapshotUuid([0x5a; 16]),
        name: "nightly-1".into(),
        created_ms: 1_765_000_000_000,
    });
    let snapshot_reply = encode_control(&SnapshotReply {
        done: true,
        snapshots: vec![SnapshotEntry {
            uuid: wire::SnapshotUuid([0x5a; 16]),
            name: "nightly-1".into(),
            created_ms: 1_765_000_000_000,
            owned_bytes: 1 << 20,
            reclaimable_bytes: 65536,
            deleting: false,
        }],
    });
    let update_json = encode_control(&LabelUpdate {
        membership: label().membership,
        outdated: false,
    });
    let open_reply = encode_control(&OpenReply {
        session: SessionId(0x0123_4567_89ab_cdef),
        label: label(),
        created: false,
        previous_generation: Generation(2),
        previous_owner: OwnerId(41),
        cheap_zeroing: true,
        instance: Some(wire::control::ServerInstance {
            boot_id: "6d3c5a8e-1f2b-4c7d-9e0a-b1c2d3e4f5a6".into(),
            process: 0x5eed,
        }),
    });
    let stat_reply = encode_control(&StatReply {
        label: Some(label()),
        capacity: Capacity {
            total_bytes: 1 << 40,
            free_bytes: 1 << 39,
        },
    });
    let control = |op: Op, p: &[u8]| sealed_req(req(op, |h| h.payload_len = p.len() as u32), p);
    let mut torn_slot = encode_slot(&label(), 3);
    torn_slot[40] ^= 0xff;
    let ping = sealed_req(req(Op::Ping, |_| {}), &[]);
    let extents_reply = extents(1 << 20, 1 << 20, &[(1 << 20, 4096), (3 << 19, 65536)]);
    let flip = |mut v: Vec<u8>, at: usize| {
        v[at] ^= 0x01;
        v
    };
    vec![
        (
            "valid-req-read",
            sealed_req(req(Op::Read, |h| h.len = 4096), &[]),
        ),
        (
            "valid-req-write-512",
            sealed_req(write(512, false), &data(512, 0x11)),
        ),
        (
            "valid-req-write-4k-fua",
            sealed_req(write(4096, true), &data(4096, 0xab)),
        ),
        ("valid-req-flush", sealed_req(req(Op::Flush, |_| {}), &[])),
        (
            "valid-req-discard",
            sealed_req(req(Op::Discard, |h| h.len = 1 << 20), &[]),
        ),
        (
            "valid-req-write-zeroes-no-unmap",
            sealed_req(
                req(Op::WriteZeroes, |h| {
                    h.len = 8192;
                    h.flags = FLAG_NO_UNMAP;
                }),
                &[],
            ),
        ),
        ("valid-req-set-label", control(Op::SetLabel, &update_json)),
        ("valid-req-snapshot", control(Op::Snapshot, &snapshot_json)),
        ("valid-req-open", control(Op::Open, &open_json)),
        ("valid-req-stat", control(Op::Stat, &stat_json)),
        ("valid-req-ping", ping.clone()),
        (
            "valid-req-data-extents",
            sealed_req(
                req(Op::DataExtents, |h| {
                    h.offset = ByteOffset(1 << 20);
                    h.len = MAX_EXTENTS_RANGE;
                }),
                &[],
            ),
        ),
        ("valid-rep-ok", sealed_rep(Status::Ok, 0, &[])),
        (
            "valid-rep-read-512",
            sealed_rep(Status::Ok, 0, &data(512, 0x22)),
        ),
        ("valid-rep-io-error", sealed_rep(Status::IoError, 5, &[])),
        ("valid-rep-fenced", sealed_rep(Status::Fenced, 4, &[])),
        (
            "valid-rep-not-open",
            sealed_rep(
                Status::NotOpen,
                0,
                b"no open replica for this session/volume",
            ),
        ),
        ("valid-rep-open", sealed_rep(Status::Ok, 0, &open_reply)),
        (
            "valid-rep-data-extents",
            sealed_rep(Status::Ok, 0, &extents_reply[12..]),
        ),
        ("valid-rep-stat", sealed_rep(Status::Ok, 0, &stat_reply)),
        ("bad-req-header-tag", flip(ping.clone(), 90)),
        ("bad-req-magic-v1", flip(ping.clone(), 3)),
        ("bad-req-reserved", flip(ping.clone(), 6)),
        ("bad-req-unknown-op", {
            let mut v = ping.clone();
            v[4] = 99;
            v
        }),
        ("bad-req-sequence", {
            let mut v = ping.clone();
            v[8] = 1;
            v
        }),
        (
            "bad-req-flags-on-flush",
            sealed_req(req(Op::Flush, |h| h.flags = FLAG_FUA), &[]),
        ),
        (
            "bad-req-offset-overflow",
            sealed_req(
                req(Op::Read, |h| {
                    h.offset = ByteOffset(u64::MAX - 10);
                    h.len = 4096;
                }),
                &[],
            ),
        ),
        (
            "bad-req-write-len-mismatch",
            sealed_req(
                req(Op::Write, |h| {
                    h.len = 4096;
                    h.payload_len = 512;
                }),
                &data(512, 1),
            ),
        ),
        (
            "bad-req-control-too-large",
            sealed_req(
                req(Op::Stat, |h| h.payload_len = MAX_CONTROL + 1),
                &data(MAX_CONTROL as usize + 1, b' '),
            ),
        ),
        (
            "bad-req-ids-on-stat",
            sealed_req(
                req(Op::Stat, |h| {
                    h.payload_len = stat_json.len() as u32;
                    h.generation = Generation(3);
                }),
                &stat_json,
            ),
        ),
        (
            "bad-req-data-extents-payload",
            sealed_req(
                req(Op::DataExtents, |h| {
                    h.len = 4096;
                    h.payload_len = 16;
                }),
                &data(16, 0),
            ),
        ),
        (
            "bad-req-data-extents-too-long",
            sealed_req(req(Op::DataExtents, |h| h.len = MAX_EXTENTS_RANGE + 1), &[]),
        ),
        ("bad-req-payload-tag", {
            let mut v = sealed_req(write(512, false), &data(512, 0x11));
            v[REQUEST_HEADER_LEN + 100] ^= 1;
            v
        }),
        (
            "bad-rep-header-tag",
            flip(sealed_rep(Status::Ok, 0, &[]), 60),
        ),
        ("bad-rep-reserved", flip(sealed_rep(Status::Ok, 0, &[]), 6)),
        ("bad-rep-unknown-status", {
            let mut v = sealed_rep(Status::Ok, 0, &[]);
            v[4] = 9;
            v
        }),
        ("valid-json-open-request", open_json.clone()),
        ("valid-json-open-reply", open_reply.clone()),
        ("valid-json-stat-request", stat_json.clone()),
        ("valid-json-stat-reply", stat_reply.clone()),
        (
            "valid-json-stat-reply-no-label",
            encode_control(&StatReply {
                label: None,
                capacity: Capacity {
                    total_bytes: 0,
                    free_bytes: 0,
                },
            }),
        ),
        ("valid-json-label-update", update_json.clone()),
        ("valid-json-snapshot-action", snapshot_json.clone()),
        ("valid-json-snapshot-reply", snapshot_reply.clone()),
        ("bad-json-open-unknown-field", {
            let mut s = String::from_utf8(open_json.clone()).unwrap();
            s.insert_str(1, "\"stale\":true,");
            s.into_bytes()
        }),
        ("valid-extents-two", extents_reply.clone()),
        ("valid-extents-hole", extents(1 << 20, 1 << 20, &[])),
        (
            "bad-extents-outside",
            extents(1 << 20, 1 << 20, &[(0, 4096)]),
        ),
        (
            "bad-extents-unsorted",
            extents(0, 1 << 20, &[(65536, 4096), (0, 4096)]),
        ),
        (
            "bad-extents-torn",
            extents_reply[..extents_reply.len() - 1].to_vec(),
        ),
        ("valid-slot-label", encode_slot(&label(), 3)),
        ("bad-slot-torn", torn_slot),
        ("empty", Vec::new()),
        // Handshake messages (docs/protocol.md §2): a v3 HELLO offering every
        // feature, a v2 one, and the CHALLENGE a server answers the v3 one with.
        ("valid-hello-v3", hello_v3.to_vec()),
        ("valid-hello-v2", hello_v2.to_vec()),
        ("valid-challenge-v3", challenge.to_vec()),
        ("truncated-req", ping[..50].to_vec()),
        (
            "truncated-rep",
            sealed_rep(Status::Ok, 0, &[])[..30].to_vec(),
        ),
    ]
}

#[test]
fn the_corpus_holds_the_seeds() {
    if std::env::var_os("UBLKD_WRITE_CORPUS").is_some() {
        let d = dir();
        for e in std::fs::read_dir(&d).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        for (name, data) in seeds() {
            std::fs::write(d.join(name), data).unwrap();
        }
    }
    let corpus = corpus();
    for (name, data) in seeds() {
        let found = corpus.iter().find(|(n, _)| n == name);
        assert_eq!(
            found.map(|(_, d)| d),
            Some(&data),
            "seed {name} missing or stale: UBLKD_WRITE_CORPUS=1 cargo test -p replication --test fuzz_corpus"
        );
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
    let mut o = Opener::new(key());
    let (h, seal) = o.open_request(head).map_err(|e| e.to_string())?;
    let payload = &data[REQUEST_HEADER_LEN..];
    if payload.len() != h.payload_len as usize {
        return Err("payload length".into());
    }
    o.open_payload(&seal, payload).map_err(|e| e.to_string())
}

fn reply(data: &[u8]) -> Result<(), String> {
    let head = data.first_chunk().ok_or("short")?;
    let mut o = Opener::new(key());
    let (r, seal) = o.open_reply(head).map_err(|e| e.to_string())?;
    let payload = &data[REPLY_HEADER_LEN..];
    if payload.len() != r.payload_len as usize {
        return Err("payload length".into());
    }
    o.open_payload(&seal, payload).map_err(|e| e.to_string())
}

/// What each seed's name says, checked.
#[test]
fn seeds_decode_as_their_names_say() {
    for (name, data) in seeds() {
        if name.starts_with("valid-req-") {
            assert_eq!(request(&data), Ok(()), "{name}");
        } else if name.starts_with("valid-rep-") {
            assert_eq!(reply(&data), Ok(()), "{name}");
        } else if name.starts_with("bad-req-") {
            assert!(request(&data).is_err(), "{name} is accepted");
        } else if name.starts_with("bad-rep-") {
            assert!(reply(&data).is_err(), "{name} is accepted");
        } else if name.starts_with("valid-extents-") || name.starts_with("bad-extents-") {
            let (offset, len) = (
                u64::from_le_bytes(data[..8].try_into().unwrap()),
                u32::from_le_bytes(data[8..12].try_into().unwrap()),
            );
            let got = decode_extents(ByteOffset(offset), ByteLen(len.into()), &data[12..]);
            assert_eq!(got.is_ok(), name.starts_with("valid-"), "{name}: {got:?}");
        } else if name.starts_with("valid-slot-") {
            assert!(
                matches!(
                    wire::label::decode_slot(&data),
                    wire::label::Slot::Label { .. }
                ),
                "{name}"
            );
        } else if name.starts_with("bad-slot-") {
            assert!(
                matches!(
                    wire::label::decode_slot(&data),
                    wire::label::Slot::Corrupt(_)
                ),
                "{name}"
            );
        } else if name == "bad-json-open-unknown-field" {
            assert!(
                wire::control::decode_control::<OpenRequest>(&data).is_err(),
                "{name}"
            );
        }
    }
}

/// The worked example of docs/protocol.md §14 is the seed `valid-req-write-4k-fua`.
#[test]
fn worked_example_matches_the_spec() {
    let (_, data) = seeds()
        .into_iter()
        .find(|(n, _)| *n == "valid-req-write-4k-fua")
        .unwrap();
    let (h, _) = RequestHeader::parse(data.first_chunk().unwrap()).unwrap();
    assert_eq!(h.op, Op::Write);
    assert_eq!(
        (h.flags, h.id, h.offset, h.len),
        (FLAG_FUA, RequestId(7), ByteOffset(1 << 20), 4096)
    );
    assert_eq!(
        (h.generation, h.session),
        (Generation(3), SessionId(0x0123_4567_89ab_cdef))
    );
    assert_eq!(h.volume, VolumeTag(0x9264_ef94_9526_fc3b));
    let hex: String = data[..REQUEST_HEADER_LEN]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let doc = include_str!("../../docs/protocol.md");
    let doc_hex: String = doc
        .split("## 14.")
        .nth(1)
        .expect("docs/protocol.md §14")
        .split("```text")
        .nth(1)
        .expect("§14 example block")
        .split("```")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split("   ").next())
        .flat_map(|l| l.split_whitespace().skip(1))
        .collect();
    assert_eq!(
        doc_hex, hex,
        "docs/protocol.md §14 shows other header bytes"
    );
}

/// 100 000 inputs: even ones are random bytes (a quarter of them behind a valid
/// magic), odd ones seeds with one to four random bytes changed.
#[test]
fn random_inputs_pass_the_fuzz_checks() {
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut data = Vec::new();
    for i in 0..100_000u32 {
        data.clear();
        if i % 2 == 0 {
            let len = rng.below(200);
            data.extend((0..len).map(|_| rng.next() as u8));
            match rng.below(8) {
                0 if len >= 4 => data[..4].copy_from_slice(b"UKQ2"),
                1 if len >= 4 => data[..4].copy_from_slice(b"UKP2"),
                2 if len >= 8 => data[..8].copy_from_slice(b"UBLKDLBL"),
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
