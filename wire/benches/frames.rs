//! What a frame's integrity check costs per 4 KiB WRITE, sender and receiver together:
//! protocol v2 (seal: sequence + SipHash-2-4-128 tags over payload and header; open:
//! the same checks) against protocol v1's CRC32C over header and payload. The
//! end-to-end cost, in the VM, is `bench_costs` of `tests/vm/run bench`.
//! Run: `cargo bench -p wire --bench frames`; figures go to stdout and to
//! `target/bench-results/frames.txt`.

use std::hint::black_box;
use std::time::Instant;

use wire::frame::{FrameKey, Op, Opener, RequestHeader, Sealer};
use wire::{ByteOffset, Generation, RequestId, SessionId, VolumeTag};

fn header(i: u64) -> RequestHeader {
    let mut h = RequestHeader::new(Op::Write, RequestId(i));
    h.offset = ByteOffset(i * 4096);
    h.len = 4096;
    h.payload_len = 4096;
    h.generation = Generation(3);
    h.session = SessionId(7);
    h.volume = VolumeTag::of("bench");
    h
}

/// ns per frame for `f`, best of 5 rounds of `n`.
fn time(n: u64, mut f: impl FnMut(u64)) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let n = 50_000;
    let payload = vec![0xabu8; 4096];
    let key = [0x42u8; 16];
    let (mut sealer, mut opener) = (
        Sealer::new(FrameKey::from_bytes(key)),
        Opener::new(FrameKey::from_bytes(key)),
    );
    let v2 = time(n, |i| {
        let head = sealer.seal_request(&header(i), &payload);
        let (_, seal) = opener.open_request(black_box(&head)).unwrap();
        opener.open_payload(&seal, black_box(&payload)).unwrap();
    });
    // Version 1: crc32c of header bytes 0..60 and of the payload, by both sides.
    let v1 = time(n, |i| {
        let mut b = [0u8; 64];
        b[8..16].copy_from_slice(&i.to_le_bytes());
        let pc = crc32c::crc32c(&payload);
        b[56..60].copy_from_slice(&pc.to_le_bytes());
        let hc = crc32c::crc32c(&b[..60]);
        b[60..].copy_from_slice(&hc.to_le_bytes());
        let b = black_box(b);
        assert_eq!(crc32c::crc32c(&b[..60]).to_le_bytes(), b[60..64]);
        assert_eq!(crc32c::crc32c(black_box(&payload)), pc);
    });
    let lines = [
        format!("frames_v2_siphash_ns_per_4k_write={v2:.0}"),
        format!("frames_v1_crc32c_ns_per_4k_write={v1:.0}"),
        format!("frames_v2_minus_v1_ns_per_4k_write={:.0}", v2 - v1),
    ];
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("frames.txt"), lines.join("\n") + "\n").unwrap();
    for l in lines {
        println!("RESULT {l}");
    }
}
