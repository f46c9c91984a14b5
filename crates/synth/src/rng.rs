//! The crate's own pseudo-random generators.
//!
//! Output must be byte-identical for a seed forever, so we do not depend on `rand`: a dependency
//! upgrade could silently change every stream. SplitMix64 derives seeds, xoshiro256** generates.

/// SplitMix64's output function: a bijection on `u64` with good avalanche, used to derive
/// independent seeds from `(seed, stream)` pairs.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256** (Blackman & Vigna), seeded through SplitMix64 as its authors recommend.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for stream `stream` of `seed`. Streams are independent, so each patient can be
    /// generated on its own (and the data set stays stable when the patient count changes).
    pub(crate) fn for_stream(seed: u64, stream: u64) -> Rng {
        let mut x = mix64(seed ^ mix64(stream.wrapping_add(0x9e37_79b9_7f4a_7c15)));
        let mut s = [0u64; 4];
        for slot in &mut s {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            *slot = mix64(x);
        }
        Rng { s }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, n)`; `n` must be non-zero. Lemire's multiply-shift: the tiny bias is
    /// irrelevant for synthetic data and it avoids a division.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[lo, hi]` (inclusive).
    pub(crate) fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One element of a non-empty slice.
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Approximately normal (Irwin–Hall sum of four uniforms): cheap, bounded, deterministic
    /// without transcendental functions whose last bits could differ between platforms.
    pub(crate) fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        let s = self.unit() + self.unit() + self.unit() + self.unit();
        // The sum has mean 2 and variance 4/12.
        mean + sd * (s - 2.0) * 1.732_050_807_568_877_2
    }

    /// Heavy-tailed count: a Pareto with shape 4/3 and minimum `min`, capped at `cap`.
    /// Most draws are near `min`; a few reach the cap, which is what gives the data set its
    /// realistic "a few patients have thousands of resources" skew. Shape 4/3 is chosen because
    /// `u^(-3/4)` needs only `sqrt`, which IEEE 754 rounds exactly on every platform (`powf`
    /// does not promise that).
    pub(crate) fn heavy_tail(&mut self, min: f64, cap: u64) -> u64 {
        // 1 - unit() is in (0, 1], so the division is finite.
        let u = 1.0 - self.unit();
        let root = u.sqrt();
        let x = min / (root * root.sqrt());
        (x as u64).min(cap)
    }
}

/// Bijective scramble of the low 62 bits: multiplication by an odd constant and xor-shifts are
/// both invertible modulo 2^62, so distinct inputs give distinct outputs.
fn scramble62(mut x: u64) -> u64 {
    const M: u64 = (1 << 62) - 1;
    x &= M;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) & M;
    x ^= x >> 29;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb) & M;
    x ^= x >> 32;
    x
}

/// A resource id: a UUID (version 4 layout) as 36 ASCII bytes, kept inline so it is `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Id([u8; 36]);

impl Id {
    /// The id for the unique key `key` (< 2^62) under `seed`.
    ///
    /// Uniqueness is by construction, not by chance: the low 62 bits of the UUID are a bijection
    /// of `key`, so two different keys never collide whatever the seed.
    pub(crate) fn mint(seed: u64, key: u64) -> Id {
        debug_assert!(key < 1 << 62);
        let lo = (0b10 << 62) | scramble62(key ^ (mix64(seed) >> 2));
        let hi = (mix64(seed ^ mix64(key)) & !0xf000) | 0x4000;
        let mut out = [0u8; 36];
        let mut pos = 0;
        let bytes = ((hi as u128) << 64 | lo as u128).to_be_bytes();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                out[pos] = b'-';
                pos += 1;
            }
            out[pos] = HEX[(b >> 4) as usize];
            out[pos + 1] = HEX[(b & 15) as usize];
            pos += 2;
        }
        Id(out)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII hex digits and dashes are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl std::fmt::Debug for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scramble_is_injective_on_a_sample() {
        let mut seen = std::collections::HashSet::new();
        for k in 0..200_000u64 {
            assert!(seen.insert(scramble62(k)), "collision at {k}");
        }
    }

    #[test]
    fn ids_are_uuid_v4_shaped_and_differ_by_seed() {
        let a = Id::mint(1, 42);
        let s = a.as_str();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(a, Id::mint(2, 42));
        assert_ne!(a, Id::mint(1, 43));
    }

    #[test]
    fn streams_are_reproducible() {
        let mut a = Rng::for_stream(7, 3);
        let mut b = Rng::for_stream(7, 3);
        let mut c = Rng::for_stream(7, 4);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }
}
