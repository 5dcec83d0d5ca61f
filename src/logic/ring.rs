//! Partitioning: the key space is the 160-bit SHA-1 ring cut into Q = 2^k
//! equal partitions (Dynamo's strategy 3); a key belongs to the partition
//! named by the top k bits of SHA-1(key). Within a node, partition p is owned
//! by shard p mod shard_count. Splitting Q -> 2Q later keeps this: the
//! children of p are 2p and 2p+1.

use sha1::{Digest, Sha1};

/// The partition of `key` in a ring of `partition_count` (a power of two).
pub fn partition_of(key: &[u8], partition_count: u32) -> u32 {
    debug_assert!(partition_count.is_power_of_two());
    let digest = Sha1::digest(key);
    let top = u32::from_be_bytes(digest[..4].try_into().expect("sha1 has 20 bytes"));
    let bits = partition_count.trailing_zeros();
    if bits == 0 {
        0
    } else {
        top >> (32 - bits)
    }
}

/// The shard of a node that owns `partition`.
pub fn shard_of(partition: u32, shard_count: u32) -> u32 {
    partition % shard_count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_the_top_bits_and_split_into_children() {
        for i in 0..1000u32 {
            let key = format!("key-{i}");
            let p = partition_of(key.as_bytes(), 256);
            assert!(p < 256);
            let child = partition_of(key.as_bytes(), 512);
            assert!(child == 2 * p || child == 2 * p + 1);
        }
        assert_eq!(partition_of(b"anything", 1), 0);
    }

    #[test]
    fn keys_spread_evenly() {
        let mut counts = vec![0u32; 64];
        for i in 0..64_000u32 {
            counts[partition_of(format!("k{i}").as_bytes(), 64) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }
}
