//! Key naming and key choice, as YCSB does them: keys "user<hash>" of the
//! record number, and record numbers drawn uniformly, from a zipfian
//! distribution scrambled by a hash (so hot keys are spread over the key
//! space), or skewed towards the latest inserts.

use clap::ValueEnum;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    Uniform,
    Zipfian,
    Latest,
}

/// FNV-1a 64 of the record number's bytes (YCSB's key hash).
pub fn fnv64(n: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in n.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

pub fn key_name(number: u64) -> Vec<u8> {
    format!("user{}", fnv64(number)).into_bytes()
}

/// Gray et al.'s zipfian generator over [0, items), constant theta (YCSB's).
#[derive(Clone, Debug)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    zeta_n: f64,
    alpha: f64,
    eta: f64,
}

const THETA: f64 = 0.99;

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipfian {
    pub fn new(items: u64) -> Self {
        let items = items.max(2);
        let zeta_n = zeta(items, THETA);
        let zeta2 = zeta(2, THETA);
        let alpha = 1.0 / (1.0 - THETA);
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - THETA)) / (1.0 - zeta2 / zeta_n);
        Self { items, theta: THETA, zeta_n, alpha, eta }
    }

    pub fn next(&self, rng: &mut ChaCha8Rng) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        ((self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.items - 1)
    }
}

/// Chooses record numbers for reads and updates.
pub struct Chooser {
    distribution: Distribution,
    records: u64,
    zipfian: Option<Zipfian>,
}

impl Chooser {
    pub fn new(distribution: Distribution, records: u64) -> Self {
        let zipfian = (distribution != Distribution::Uniform).then(|| Zipfian::new(records));
        Self { distribution, records: records.max(1), zipfian }
    }

    /// A record number below `inserted` (the records so far).
    pub fn next(&self, rng: &mut ChaCha8Rng, inserted: u64) -> u64 {
        match self.distribution {
            Distribution::Uniform => rng.gen_range(0..self.records),
            Distribution::Zipfian => fnv64(self.zipfian.as_ref().expect("zipfian").next(rng)) % self.records,
            Distribution::Latest => {
                let back = self.zipfian.as_ref().expect("zipfian").next(rng);
                inserted.saturating_sub(1).saturating_sub(back % inserted.max(1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn zipfian_is_skewed_and_in_range() {
        let z = Zipfian::new(1000);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[z.next(&mut rng) as usize] += 1;
        }
        assert!(counts[0] > counts[10] && counts[10] > counts[500]);
        assert!(counts[0] > 5_000, "the hottest item is hot: {}", counts[0]);
    }

    #[test]
    fn latest_prefers_recent_records() {
        let c = Chooser::new(Distribution::Latest, 1000);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let recent = (0..10_000).filter(|_| c.next(&mut rng, 1000) >= 990).count();
        assert!(recent > 3_000, "{recent}");
    }
}
