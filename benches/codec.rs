//! Criterion benchmarks of the pure pieces on the storage hot path: record
//! encode (copy + CRC), record parse (CRC check), index insert and lookup,
//! and the version-set work of a Redis SET and GET (validated view,
//! overwrite, encode).
//! These are the per-request costs DESIGN.md §5a budgets for.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringkv::logic::dvv::{encoding, Sibling, VersionSet};
use ringkv::storage::format::{encode_record, parse_record, record_len, RecordKind};
use ringkv::storage::index::{KeyIndex, Location};

fn records(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for value_len in [100usize, 1024, 16384] {
        let key = b"key-000000123456";
        let value = vec![0x5au8; value_len];
        let mut buf = vec![0u8; record_len(key.len(), value_len)];
        group.throughput(Throughput::Bytes(value_len as u64));
        group.bench_with_input(BenchmarkId::new("encode", value_len), &value_len, |b, _| {
            b.iter(|| encode_record(black_box(&mut buf), RecordKind::Put, 7, 42, key, black_box(&value)))
        });
        encode_record(&mut buf, RecordKind::Put, 7, 42, key, &value);
        group.bench_with_input(BenchmarkId::new("parse", value_len), &value_len, |b, _| {
            b.iter(|| parse_record(black_box(&buf)).unwrap().value.len())
        });
    }
    group.finish();
}

fn index(c: &mut Criterion) {
    let mut group = c.benchmark_group("index");
    let keys: Vec<[u8; 16]> =
        (0..100_000u64).map(|i| *format!("key-{i:012}").as_bytes().first_chunk().unwrap()).collect();
    group.bench_function("insert 100k", |b| {
        b.iter(|| {
            let mut index = KeyIndex::default();
            for (i, k) in keys.iter().enumerate() {
                index.insert(k, Location { slot: 0, offset: i as u32, value_len: 100 });
            }
            index.len()
        })
    });
    let mut index = KeyIndex::default();
    for (i, k) in keys.iter().enumerate() {
        index.insert(k, Location { slot: 0, offset: i as u32, value_len: 100 });
    }
    let mut i = 0;
    group.bench_function("get (100k keys)", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            index.get(black_box(&keys[i]))
        })
    });
    group.finish();
}

fn version_sets(c: &mut Criterion) {
    let mut group = c.benchmark_group("version set");
    let value = |byte: u8| Sibling { value: vec![byte; 100], tombstone: false, written_ms: 1 };
    // A key written before by two actors, as a SET finds it.
    let stored = VersionSet::write(None, &Default::default(), value(1), 7);
    let stored = encoding::with_view(&encoding::encode(&stored), |v| v.overwrite(value(2), 9)).unwrap();
    let bytes = encoding::encode(&stored);
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    aligned.extend_from_slice(&bytes);
    group.bench_function("view + last written (GET)", |b| {
        b.iter(|| encoding::with_view(black_box(&aligned), |v| v.last_written().map(|s| s.value.len())).unwrap())
    });
    // The same archive one byte off alignment: `with_view` copies it into
    // an aligned buffer first, as for a cached value whose key length is
    // not a multiple of 16 (the cache does not pad: see README, Performance).
    let mut shifted = rkyv::util::AlignedVec::<16>::new();
    shifted.push(0);
    shifted.extend_from_slice(&bytes);
    group.bench_function("view + last written, misaligned (GET)", |b| {
        b.iter(|| encoding::with_view(black_box(&shifted[1..]), |v| v.last_written().map(|s| s.value.len())).unwrap())
    });
    let mut out = rkyv::util::AlignedVec::<16>::new();
    group.bench_function("view + overwrite + encode (SET)", |b| {
        b.iter(|| {
            let next = encoding::with_view(black_box(&aligned), |v| v.overwrite(value(3), 9)).unwrap();
            encoding::encode_into(&next, &mut out);
            out.len()
        })
    });
    group.finish();
}

criterion_group!(benches, records, index, version_sets);
criterion_main!(benches);
