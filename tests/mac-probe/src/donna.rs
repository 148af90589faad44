//! Poly1305, radix 2^44 ("donna64").
pub struct Poly1305 {
    r: [u64; 3],
    s: [u64; 2],
    h: [u64; 3],
    pad: [u64; 2],
    buf: [u8; 16],
    used: usize,
}
const M44: u64 = 0xfff_ffff_ffff;
const M42: u64 = 0x3ff_ffff_ffff;
#[inline(always)]
fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}
impl Poly1305 {
    pub fn new(key: &[u8; 32]) -> Self {
        let t0 = le64(&key[0..8]);
        let t1 = le64(&key[8..16]);
        let r0 = t0 & 0xffc_0fff_ffff;
        let r1 = ((t0 >> 44) | (t1 << 20)) & 0xfff_ffc0_ffff;
        let r2 = (t1 >> 24) & 0x00f_ffff_fc0f;
        Poly1305 {
            r: [r0, r1, r2],
            s: [r1 * 20, r2 * 20],
            h: [0; 3],
            pad: [le64(&key[16..24]), le64(&key[24..32])],
            buf: [0; 16],
            used: 0,
        }
    }
    #[inline(always)]
    fn blocks(&mut self, m: &[u8], hibit: u64) {
        let [r0, r1, r2] = self.r;
        let [s1, s2] = self.s;
        let [mut h0, mut h1, mut h2] = self.h;
        for b in m.chunks_exact(16) {
            let t0 = le64(&b[0..8]);
            let t1 = le64(&b[8..16]);
            h0 += t0 & M44;
            h1 += ((t0 >> 44) | (t1 << 20)) & M44;
            h2 += ((t1 >> 24) & M42) | hibit;
            let m = |a: u64, b: u64| a as u128 * b as u128;
            let d0 = m(h0, r0) + m(h1, s2) + m(h2, s1);
            let mut d1 = m(h0, r1) + m(h1, r0) + m(h2, s2);
            let mut d2 = m(h0, r2) + m(h1, r1) + m(h2, r0);
            let mut c = (d0 >> 44) as u64;
            h0 = d0 as u64 & M44;
            d1 += c as u128;
            c = (d1 >> 44) as u64;
            h1 = d1 as u64 & M44;
            d2 += c as u128;
            c = (d2 >> 42) as u64;
            h2 = d2 as u64 & M42;
            h0 += c * 5;
            c = h0 >> 44;
            h0 &= M44;
            h1 += c;
        }
        self.h = [h0, h1, h2];
    }
    pub fn update(&mut self, mut m: &[u8]) {
        if self.used > 0 {
            let n = (16 - self.used).min(m.len());
            self.buf[self.used..self.used + n].copy_from_slice(&m[..n]);
            self.used += n;
            m = &m[n..];
            if self.used < 16 {
                return;
            }
            let b = self.buf;
            self.blocks(&b, 1 << 40);
            self.used = 0;
        }
        let full = m.len() & !15;
        self.blocks(&m[..full], 1 << 40);
        let rest = &m[full..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.used = rest.len();
    }
    pub fn finish(mut self) -> [u8; 16] {
        if self.used > 0 {
            let mut b = [0u8; 16];
            b[..self.used].copy_from_slice(&self.buf[..self.used]);
            b[self.used] = 1;
            self.blocks(&b, 0);
        }
        let [mut h0, mut h1, mut h2] = self.h;
        let mut c = h1 >> 44;
        h1 &= M44;
        h2 += c;
        c = h2 >> 42;
        h2 &= M42;
        h0 += c * 5;
        c = h0 >> 44;
        h0 &= M44;
        h1 += c;
        c = h1 >> 44;
        h1 &= M44;
        h2 += c;
        c = h2 >> 42;
        h2 &= M42;
        h0 += c * 5;
        c = h0 >> 44;
        h0 &= M44;
        h1 += c;
        // g = h + 5 - 2^130
        let mut g0 = h0.wrapping_add(5);
        c = g0 >> 44;
        g0 &= M44;
        let mut g1 = h1.wrapping_add(c);
        c = g1 >> 44;
        g1 &= M44;
        let g2 = h2.wrapping_add(c).wrapping_sub(1 << 42);
        // select h if h < p (g2 negative), else g
        let mask = (g2 >> 63).wrapping_sub(1); // all ones if g2 >= 0
        g0 &= mask;
        g1 &= mask;
        let g2 = g2 & mask;
        let nmask = !mask;
        h0 = (h0 & nmask) | g0;
        h1 = (h1 & nmask) | g1;
        h2 = (h2 & nmask) | g2;
        // h = h + pad
        let t0 = self.pad[0];
        let t1 = self.pad[1];
        h0 += t0 & M44;
        c = h0 >> 44;
        h0 &= M44;
        h1 += (((t0 >> 44) | (t1 << 20)) & M44) + c;
        c = h1 >> 44;
        h1 &= M44;
        h2 += ((t1 >> 24) & M42) + c;
        h2 &= M42;
        let o0 = h0 | (h1 << 44);
        let o1 = (h1 >> 20) | (h2 << 24);
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&o0.to_le_bytes());
        out[8..].copy_from_slice(&o1.to_le_bytes());
        out
    }
}
