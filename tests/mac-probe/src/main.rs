//! MiB/s of candidate bulk MACs over a 1 MiB payload (see Cargo.toml for how to run).
//! `donna64` is Poly1305 in radix 2^44 with 64-bit multiplies, the fastest scalar
//! form; it is checked against RFC 8439's test vector and the `poly1305` crate before
//! it is timed. `nh` is one pass of UMAC's NH inner loop (32 bits of security per pass;
//! a real UMAC-64 needs two) and `lanes<N>` SipHash-2-4 compression over N interleaved
//! words: speed bounds only, not MACs.
mod donna;
mod lanes;

use std::hint::black_box;
use std::time::Instant;

fn time(n: usize, mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::MAX, f64::min)
}

fn nh(key: &[u32; 256], data: &[u8]) -> u64 {
    let mut total = 0u64;
    for block in data.chunks(1024) {
        let mut y = 0u64;
        for (i, w) in block.chunks_exact(8).enumerate() {
            let a = u32::from_le_bytes(w[0..4].try_into().unwrap()).wrapping_add(key[2 * i]);
            let b = u32::from_le_bytes(w[4..8].try_into().unwrap()).wrapping_add(key[2 * i + 1]);
            y = y.wrapping_add(a as u64 * b as u64);
        }
        total = total.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(y);
    }
    total
}

fn hex<const N: usize>(s: &str) -> [u8; N] {
    let mut o = [0u8; N];
    for (i, b) in o.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    o
}

fn check_donna64() {
    // RFC 8439 §2.5.2.
    let key: [u8; 32] = hex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b");
    let mut p = donna::Poly1305::new(&key);
    p.update(b"Cryptographic Forum Research Group");
    assert_eq!(p.finish(), hex::<16>("a8061dc1305136c6c22b8baf0c0127a9"));
    use poly1305::universal_hash::KeyInit;
    let mut x = 12345u64;
    for len in 0..600 {
        let (mut k, mut msg) = ([0u8; 32], vec![0u8; len]);
        for b in k.iter_mut().chain(msg.iter_mut()) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if len % 7 == 0 {
            msg.fill(0xff);
            k[..16].fill(0xff);
        }
        let want = poly1305::Poly1305::new(&k.into()).compute_unpadded(&msg);
        let mut p = donna::Poly1305::new(&k);
        let (a, b) = msg.split_at(len / 3);
        p.update(a);
        p.update(b);
        assert_eq!(p.finish().as_slice(), want.as_slice(), "len {len}");
    }
}

fn main() {
    check_donna64();
    let data = vec![0xabu8; 1 << 20];
    let n = std::env::args().nth(1).map_or(100, |s| s.parse().unwrap());
    let row = |name: &str, ns: f64| println!("{name:<22} {:>6.0} MiB/s", 1e9 / ns);
    use siphasher::sip128::Hasher128;
    use std::hash::Hasher;
    row(
        "siphash-2-4-128 (v2)",
        time(n, || {
            let mut h = siphasher::sip128::SipHasher24::new_with_keys(1, 2);
            h.write(black_box(&data));
            black_box(h.finish128());
        }),
    );
    row(
        "siphash-1-3-128",
        time(n, || {
            let mut h = siphasher::sip128::SipHasher13::new_with_keys(1, 2);
            h.write(black_box(&data));
            black_box(h.finish128());
        }),
    );
    row(
        "poly1305 (RustCrypto)",
        time(n, || {
            use poly1305::universal_hash::KeyInit;
            let m = poly1305::Poly1305::new(&[7u8; 32].into());
            black_box(m.compute_unpadded(black_box(&data)));
        }),
    );
    row(
        "poly1305 donna64",
        time(n, || {
            let mut p = donna::Poly1305::new(&[7u8; 32]);
            p.update(black_box(&data));
            black_box(p.finish());
        }),
    );
    row(
        "blake3 keyed",
        time(n, || {
            black_box(blake3::keyed_hash(&[7u8; 32], black_box(&data)));
        }),
    );
    let key = [0x1234_5678u32; 256];
    row(
        "nh, one pass (bound)",
        time(n, || {
            black_box(nh(black_box(&key), black_box(&data)));
        }),
    );
    row(
        "sip rounds, 2 lanes",
        time(n, || {
            black_box(lanes::lanes::<2>(black_box(&data)));
        }),
    );
    row(
        "sip rounds, 4 lanes",
        time(n, || {
            black_box(lanes::lanes::<4>(black_box(&data)));
        }),
    );
}
