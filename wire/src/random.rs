//! Randomness for ids and nonces: the kernel's source, nothing seeded.

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("kernel random source");
    b
}

/// A random 64-bit value (owner ids, session ids, device tags).
pub fn u64() -> u64 {
    u64::from_le_bytes(bytes::<8>())
}
