//! SipHash-2-4 compression over N interleaved words, no finalization: a speed bound for
//! a tree of N SipHash lanes, not a MAC.
#[derive(Clone, Copy)]
struct S {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

#[inline(always)]
fn round(s: &mut S) {
    s.v0 = s.v0.wrapping_add(s.v1);
    s.v1 = s.v1.rotate_left(13) ^ s.v0;
    s.v0 = s.v0.rotate_left(32);
    s.v2 = s.v2.wrapping_add(s.v3);
    s.v3 = s.v3.rotate_left(16) ^ s.v2;
    s.v0 = s.v0.wrapping_add(s.v3);
    s.v3 = s.v3.rotate_left(21) ^ s.v0;
    s.v2 = s.v2.wrapping_add(s.v1);
    s.v1 = s.v1.rotate_left(17) ^ s.v2;
    s.v2 = s.v2.rotate_left(32);
}

pub fn lanes<const N: usize>(data: &[u8]) -> u64 {
    let mut st = [S {
        v0: 1,
        v1: 2,
        v2: 3,
        v3: 4,
    }; N];
    for c in data.chunks_exact(8 * N) {
        for (l, s) in st.iter_mut().enumerate() {
            let m = u64::from_le_bytes(c[8 * l..8 * l + 8].try_into().unwrap());
            s.v3 ^= m;
            round(s);
            round(s);
            s.v0 ^= m;
        }
    }
    st.iter().fold(0, |a, s| a ^ s.v0 ^ s.v1 ^ s.v2 ^ s.v3)
}
