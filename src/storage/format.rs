//! On-disk layouts: records, file headers and hint entries. The only code that
//! knows byte positions on disk; everything is fixed-width little-endian.
//!
//! # Records
//!
//! One record layout serves the commit log and the partition segments, so a
//! record encoded once into a commit-log batch is copied byte for byte into its
//! partition's segment (one CRC computation per write). Records start on a
//! 16-byte boundary and are zero-padded to one, so a value is 16-byte aligned
//! inside any 16-byte aligned buffer (rkyv needs that for zero-copy access).
//!
//! ```text
//!  0        4    5    6        8            12           16                   24                  32
//!  +--------+----+----+--------+------------+------------+--------------------+-------------------+
//!  | crc32  |kind|flag|key_len | value_len  | partition  | lsn                | reserved (zero)   |
//!  +--------+----+----+--------+------------+------------+--------------------+-------------------+
//!  | key (key_len bytes), zero pad to 16 | value (value_len bytes), zero pad to 16               |
//!  +--------------------------------------------------------------------------------------------+
//! ```
//!
//! - `crc32` (IEEE, crc32fast) covers every byte of the record after itself,
//!   padding included, so any single-bit flip anywhere in a record is detected.
//! - `kind`: 1 put, 2 remove (tombstone of a physical removal), 3 pad. A pad
//!   record says "the rest of this 4 KiB block is padding"; writers pad before
//!   every partial-block write so no block that holds acknowledged data is ever
//!   rewritten (a torn rewrite could damage it).
//! - `lsn`: the shard's log sequence number, strictly increasing per shard and
//!   never reused. Among records for one key, the highest lsn wins; this is
//!   what makes recovery and compaction order-independent.
//!
//! # Files
//!
//! Every file starts with one 4 KiB header block: an 8-byte magic naming the
//! file type, a u16 format version, type-specific fields, zero reserved bytes,
//! and a CRC32 of bytes 0..4092 stored at 4092..4096. Data starts at 4096.
//!
//! ```text
//! segment header:   magic "RINGKVSG" | version u16 | segment_kind u16 | partition u32 |
//!                   segment_id u64 | partition_count u32 | supersedes_count u32 |
//!                   supersedes [u64; supersedes_count] | zero ... | crc32 @4092
//! commit log:       magic "RINGKVCL" | version u16 | reserved u16 | shard u32 |
//!                   file_number u64 | first_lsn u64 | zero ... | crc32 @4092
//! hint header:      magic "RINGKVHT" | version u16 | flags u16 | partition u32 |
//!                   segment_id u64 | covered_end u64 | entry_count u64 | entries_len u64 |
//!                   entries_crc u32 | reserved u32 | min_lsn u64 | max_lsn u64 | zero ... | crc32 @4092
//! hint entry (20 B + key): kind u8 | reserved u8 | key_len u16 | value_len u32 | offset u32 | lsn u64 | key
//! ```
//!
//! A hint file lists every record of its segment below `covered_end` (the
//! Bitcask "hint file"), so a restart reads hints instead of whole segments.

use std::fmt;

/// Unit of every disk write and the alignment of O_DIRECT positions. The device
/// reports 512-byte logical blocks but its physical block is 4 KiB.
pub const BLOCK_BYTES: usize = 4096;
/// Records start at multiples of this, and values inside them too.
pub const RECORD_ALIGN_BYTES: usize = 16;
pub const RECORD_HEADER_BYTES: usize = 32;
/// Every file begins with one header block.
pub const FILE_HEADER_BYTES: usize = BLOCK_BYTES;
pub const FORMAT_VERSION: u16 = 1;
pub const HINT_ENTRY_FIXED_BYTES: usize = 20;
/// A compaction output may supersede at most this many input segments (their
/// ids live in the output's header block).
pub const SUPERSEDES_MAX: usize = 64;
/// Keys are at most u16::MAX bytes by layout; configuration may lower it.
pub const KEY_BYTES_LIMIT: usize = u16::MAX as usize;
/// Segments are addressed with u32 offsets.
pub const SEGMENT_BYTES_LIMIT: u64 = u32::MAX as u64;

const HEADER_CRC_AT: usize = BLOCK_BYTES - 4;

pub const SEGMENT_MAGIC: [u8; 8] = *b"RINGKVSG";
pub const COMMIT_LOG_MAGIC: [u8; 8] = *b"RINGKVCL";
pub const HINT_MAGIC: [u8; 8] = *b"RINGKVHT";
pub const MANIFEST_MAGIC: [u8; 8] = *b"RINGKVMF";

const _: () = assert!(RECORD_HEADER_BYTES.is_multiple_of(RECORD_ALIGN_BYTES));
const _: () = assert!(BLOCK_BYTES.is_multiple_of(RECORD_ALIGN_BYTES));
const _: () = assert!(32 + SUPERSEDES_MAX * 8 <= HEADER_CRC_AT);
// A pad record must fit in the smallest gap left before a block boundary.
const _: () = assert!(RECORD_ALIGN_BYTES >= 16 && RECORD_HEADER_BYTES <= BLOCK_BYTES);

/// Rounds `n` up to a multiple of `align` (a power of two).
pub const fn align_up(n: usize, align: usize) -> usize {
    (n + align - 1) & !(align - 1)
}

pub const fn align_up_u64(n: u64, align: u64) -> u64 {
    (n + align - 1) & !(align - 1)
}

pub const fn align_down_u64(n: u64, align: u64) -> u64 {
    n & !(align - 1)
}

/// Bytes a record with these lengths occupies, padding included.
pub const fn record_len(key_len: usize, value_len: usize) -> usize {
    RECORD_HEADER_BYTES + align_up(key_len, RECORD_ALIGN_BYTES) + align_up(value_len, RECORD_ALIGN_BYTES)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    Put = 1,
    Remove = 2,
    Pad = 3,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Put),
            2 => Some(Self::Remove),
            3 => Some(Self::Pad),
            _ => None,
        }
    }
}

/// Why bytes at a position are not a valid record. Recovery treats all of
/// these as "the valid data ends here"; scrubbing reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes remain than the header or the lengths need.
    Truncated {
        needed_bytes: usize,
        available_bytes: usize,
    },
    /// An all-zero header: never-written space.
    Unwritten,
    /// Kind, flags or reserved bytes hold values no writer produces.
    BadHeader,
    ChecksumMismatch {
        expected: u32,
        actual: u32,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed_bytes, available_bytes } => {
                write!(f, "truncated record: needs {needed_bytes} bytes, {available_bytes} available")
            }
            Self::Unwritten => write!(f, "unwritten space"),
            Self::BadHeader => write!(f, "record header holds impossible values"),
            Self::ChecksumMismatch { expected, actual } => {
                write!(f, "record checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")
            }
        }
    }
}

/// A validated record borrowed from a buffer.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    pub kind: RecordKind,
    pub partition: u32,
    pub lsn: u64,
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// Bytes the record occupies, padding included (for a pad record: its header only).
    pub len: usize,
}

/// Header fields decoded without checking the CRC (cheap plausibility only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub crc: u32,
    pub kind: RecordKind,
    pub key_len: usize,
    pub value_len: usize,
    pub partition: u32,
    pub lsn: u64,
}

impl RecordHeader {
    pub fn record_len(&self) -> usize {
        match self.kind {
            RecordKind::Pad => RECORD_HEADER_BYTES,
            _ => record_len(self.key_len, self.value_len),
        }
    }
}

/// Decodes and sanity-checks a record header; does not check the CRC.
pub fn parse_header(bytes: &[u8]) -> Result<RecordHeader, RecordError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Truncated { needed_bytes: RECORD_HEADER_BYTES, available_bytes: bytes.len() });
    }
    let h = &bytes[..RECORD_HEADER_BYTES];
    if h.iter().all(|&b| b == 0) {
        return Err(RecordError::Unwritten);
    }
    let kind = RecordKind::from_u8(h[4]).ok_or(RecordError::BadHeader)?;
    if h[5] != 0 || le_u64(h, 24) != 0 {
        return Err(RecordError::BadHeader);
    }
    let key_len = usize::from(le_u16(h, 6));
    let value_len = le_u32(h, 8) as usize;
    if kind == RecordKind::Pad && (key_len != 0 || value_len != 0) {
        return Err(RecordError::BadHeader);
    }
    Ok(RecordHeader { crc: le_u32(h, 0), kind, key_len, value_len, partition: le_u32(h, 12), lsn: le_u64(h, 16) })
}

/// Parses and fully validates the record at the start of `bytes`.
pub fn parse_record(bytes: &[u8]) -> Result<RecordView<'_>, RecordError> {
    let header = parse_header(bytes)?;
    let len = header.record_len();
    if bytes.len() < len {
        return Err(RecordError::Truncated { needed_bytes: len, available_bytes: bytes.len() });
    }
    let actual = crc32fast::hash(&bytes[4..len]);
    if actual != header.crc {
        return Err(RecordError::ChecksumMismatch { expected: header.crc, actual });
    }
    let key_start = RECORD_HEADER_BYTES;
    let value_start = key_start + align_up(header.key_len, RECORD_ALIGN_BYTES);
    Ok(RecordView {
        kind: header.kind,
        partition: header.partition,
        lsn: header.lsn,
        key: &bytes[key_start..key_start + header.key_len],
        value: &bytes[value_start..value_start + header.value_len],
        len,
    })
}

/// Encodes a put or remove record at the start of `out`, which must hold at
/// least `record_len(key.len(), value.len())` bytes. Returns the bytes written.
pub fn encode_record(out: &mut [u8], kind: RecordKind, partition: u32, lsn: u64, key: &[u8], value: &[u8]) -> usize {
    assert!(kind != RecordKind::Pad, "pad records are written by encode_pad");
    let key_len = u16::try_from(key.len()).expect("key length checked against KEY_BYTES_LIMIT by the caller");
    let value_len =
        u32::try_from(value.len()).expect("value length checked against the configured limit by the caller");
    let len = record_len(key.len(), value.len());
    let out = &mut out[..len];
    out[4] = kind as u8;
    out[5] = 0;
    put_u16(out, 6, key_len);
    put_u32(out, 8, value_len);
    put_u32(out, 12, partition);
    put_u64(out, 16, lsn);
    put_u64(out, 24, 0);
    let key_end = RECORD_HEADER_BYTES + key.len();
    out[RECORD_HEADER_BYTES..key_end].copy_from_slice(key);
    let value_start = RECORD_HEADER_BYTES + align_up(key.len(), RECORD_ALIGN_BYTES);
    out[key_end..value_start].fill(0);
    out[value_start..value_start + value.len()].copy_from_slice(value);
    out[value_start + value.len()..].fill(0);
    let crc = crc32fast::hash(&out[4..]);
    put_u32(out, 0, crc);
    len
}

/// Writes a pad record at `out[0..]` and zeroes the rest of `out`, which must
/// end on a block boundary. The gap is always a non-zero multiple of 16 bytes.
pub fn encode_pad(out: &mut [u8], partition: u32, lsn: u64) {
    // `pad_len` never yields a gap too small for a header.
    assert!(
        out.len() >= RECORD_HEADER_BYTES && out.len().is_multiple_of(RECORD_ALIGN_BYTES),
        "pad gap of {} bytes",
        out.len()
    );
    out.fill(0);
    out[4] = RecordKind::Pad as u8;
    put_u32(out, 12, partition);
    put_u64(out, 16, lsn);
    let crc = crc32fast::hash(&out[4..RECORD_HEADER_BYTES]);
    put_u32(out, 0, crc);
}

/// Bytes to append at logical `offset` so that the next record starts on a
/// block boundary: zero if already aligned, otherwise the gap to the next
/// boundary, or gap + one block when the gap is too small for a pad header.
pub fn pad_len(offset: u64) -> usize {
    let gap = (align_up_u64(offset, BLOCK_BYTES as u64) - offset) as usize;
    if gap == 0 {
        0
    } else if gap < RECORD_HEADER_BYTES {
        gap + BLOCK_BYTES
    } else {
        gap
    }
}

/// Where the next record begins after the record or pad that starts at
/// `offset` and occupies `len` bytes.
pub fn next_record_offset(offset: u64, kind: RecordKind, len: usize) -> u64 {
    match kind {
        // A pad header may straddle a boundary (a 16-byte gap gets one more block).
        RecordKind::Pad => align_up_u64(offset + RECORD_HEADER_BYTES as u64, BLOCK_BYTES as u64),
        _ => offset + len as u64,
    }
}

/// Why a file header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    Truncated,
    BadMagic { found: [u8; 8] },
    UnsupportedVersion { found: u16 },
    ChecksumMismatch { expected: u32, actual: u32 },
    BadField(&'static str),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => write!(f, "file shorter than its 4096-byte header"),
            Self::BadMagic { found } => write!(f, "bad magic {:?}", String::from_utf8_lossy(found)),
            Self::UnsupportedVersion { found } => {
                write!(f, "format version {found}, this build reads version {FORMAT_VERSION}")
            }
            Self::ChecksumMismatch { expected, actual } => {
                write!(f, "header checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")
            }
            Self::BadField(what) => write!(f, "header field out of range: {what}"),
        }
    }
}

fn seal_header(block: &mut [u8]) {
    let crc = crc32fast::hash(&block[..HEADER_CRC_AT]);
    put_u32(block, HEADER_CRC_AT, crc);
}

/// Checks length, magic, version and CRC of a header block. Magic is checked
/// before the CRC so a foreign file is named as such rather than as corrupt.
fn open_header<'a>(bytes: &'a [u8], magic: &[u8; 8]) -> Result<&'a [u8], HeaderError> {
    if bytes.len() < BLOCK_BYTES {
        return Err(HeaderError::Truncated);
    }
    let block = &bytes[..BLOCK_BYTES];
    if &block[..8] != magic {
        return Err(HeaderError::BadMagic { found: block[..8].try_into().expect("8 bytes") });
    }
    let version = le_u16(block, 8);
    let expected = le_u32(block, HEADER_CRC_AT);
    let actual = crc32fast::hash(&block[..HEADER_CRC_AT]);
    if expected != actual {
        return Err(HeaderError::ChecksumMismatch { expected, actual });
    }
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion { found: version });
    }
    Ok(block)
}

fn zero_after(block: &[u8], from: usize) -> Result<(), HeaderError> {
    if block[from..HEADER_CRC_AT].iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(HeaderError::BadField("reserved bytes are not zero"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum SegmentKind {
    /// Written by the write path, records in lsn order.
    Appended = 1,
    /// Written by compaction; supersedes its input segments.
    Compacted = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub kind: SegmentKind,
    pub partition: u32,
    pub segment_id: u64,
    pub partition_count: u32,
    /// Input segments a compaction output replaces; recovery deletes them.
    pub supersedes: Vec<u64>,
}

impl SegmentHeader {
    pub fn encode(&self, block: &mut [u8]) {
        assert!(self.supersedes.len() <= SUPERSEDES_MAX);
        let block = &mut block[..BLOCK_BYTES];
        block.fill(0);
        block[..8].copy_from_slice(&SEGMENT_MAGIC);
        put_u16(block, 8, FORMAT_VERSION);
        put_u16(block, 10, self.kind as u16);
        put_u32(block, 12, self.partition);
        put_u64(block, 16, self.segment_id);
        put_u32(block, 24, self.partition_count);
        put_u32(block, 28, self.supersedes.len() as u32);
        for (i, id) in self.supersedes.iter().enumerate() {
            put_u64(block, 32 + i * 8, *id);
        }
        seal_header(block);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let block = open_header(bytes, &SEGMENT_MAGIC)?;
        let kind = match le_u16(block, 10) {
            1 => SegmentKind::Appended,
            2 => SegmentKind::Compacted,
            _ => return Err(HeaderError::BadField("segment kind")),
        };
        let count = le_u32(block, 28) as usize;
        if count > SUPERSEDES_MAX {
            return Err(HeaderError::BadField("supersedes count"));
        }
        let supersedes = (0..count).map(|i| le_u64(block, 32 + i * 8)).collect();
        zero_after(block, 32 + count * 8)?;
        Ok(Self {
            kind,
            partition: le_u32(block, 12),
            segment_id: le_u64(block, 16),
            partition_count: le_u32(block, 24),
            supersedes,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitLogHeader {
    pub shard: u32,
    pub file_number: u64,
    /// Every valid record in this incarnation of the file has lsn >= first_lsn;
    /// records left over from before the file was recycled have smaller ones.
    pub first_lsn: u64,
}

impl CommitLogHeader {
    pub fn encode(&self, block: &mut [u8]) {
        let block = &mut block[..BLOCK_BYTES];
        block.fill(0);
        block[..8].copy_from_slice(&COMMIT_LOG_MAGIC);
        put_u16(block, 8, FORMAT_VERSION);
        put_u32(block, 12, self.shard);
        put_u64(block, 16, self.file_number);
        put_u64(block, 24, self.first_lsn);
        seal_header(block);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let block = open_header(bytes, &COMMIT_LOG_MAGIC)?;
        if le_u16(block, 10) != 0 {
            return Err(HeaderError::BadField("reserved bytes are not zero"));
        }
        zero_after(block, 32)?;
        Ok(Self { shard: le_u32(block, 12), file_number: le_u64(block, 16), first_lsn: le_u64(block, 24) })
    }
}

pub const HINT_FLAG_SEALED: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintHeader {
    /// The hint covers the whole segment and the segment will not grow.
    pub sealed: bool,
    pub partition: u32,
    pub segment_id: u64,
    /// Segment bytes below this offset are described by the entries.
    pub covered_end: u64,
    pub entry_count: u64,
    pub entries_len: u64,
    pub entries_crc: u32,
    pub min_lsn: u64,
    pub max_lsn: u64,
}

impl HintHeader {
    pub fn encode(&self, block: &mut [u8]) {
        let block = &mut block[..BLOCK_BYTES];
        block.fill(0);
        block[..8].copy_from_slice(&HINT_MAGIC);
        put_u16(block, 8, FORMAT_VERSION);
        put_u16(block, 10, if self.sealed { HINT_FLAG_SEALED } else { 0 });
        put_u32(block, 12, self.partition);
        put_u64(block, 16, self.segment_id);
        put_u64(block, 24, self.covered_end);
        put_u64(block, 32, self.entry_count);
        put_u64(block, 40, self.entries_len);
        put_u32(block, 48, self.entries_crc);
        put_u64(block, 56, self.min_lsn);
        put_u64(block, 64, self.max_lsn);
        seal_header(block);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let block = open_header(bytes, &HINT_MAGIC)?;
        let flags = le_u16(block, 10);
        if flags & !HINT_FLAG_SEALED != 0 || le_u32(block, 52) != 0 {
            return Err(HeaderError::BadField("hint flags"));
        }
        zero_after(block, 72)?;
        Ok(Self {
            sealed: flags & HINT_FLAG_SEALED != 0,
            partition: le_u32(block, 12),
            segment_id: le_u64(block, 16),
            covered_end: le_u64(block, 24),
            entry_count: le_u64(block, 32),
            entries_len: le_u64(block, 40),
            entries_crc: le_u32(block, 48),
            min_lsn: le_u64(block, 56),
            max_lsn: le_u64(block, 64),
        })
    }
}

/// One record of a segment as listed in its hint file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintEntry<'a> {
    pub kind: RecordKind,
    pub value_len: u32,
    pub offset: u32,
    pub lsn: u64,
    pub key: &'a [u8],
}

impl HintEntry<'_> {
    pub fn encoded_len(&self) -> usize {
        HINT_ENTRY_FIXED_BYTES + self.key.len()
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&(self.key.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.value_len.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.lsn.to_le_bytes());
        out.extend_from_slice(self.key);
    }

    pub fn record_len(&self) -> usize {
        record_len(self.key.len(), self.value_len as usize)
    }
}

/// Iterates hint entries; stops with an error on malformed bytes (the entries
/// CRC is checked by the caller first, so that means a writer bug).
pub struct HintEntries<'a> {
    bytes: &'a [u8],
}

impl<'a> HintEntries<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }
}

impl<'a> Iterator for HintEntries<'a> {
    type Item = Result<HintEntry<'a>, HeaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.bytes.is_empty() {
            return None;
        }
        if self.bytes.len() < HINT_ENTRY_FIXED_BYTES {
            self.bytes = &[];
            return Some(Err(HeaderError::BadField("hint entry truncated")));
        }
        let b = self.bytes;
        let kind = match RecordKind::from_u8(b[0]) {
            Some(k @ (RecordKind::Put | RecordKind::Remove)) if b[1] == 0 => k,
            _ => {
                self.bytes = &[];
                return Some(Err(HeaderError::BadField("hint entry kind")));
            }
        };
        let key_len = usize::from(le_u16(b, 2));
        let total = HINT_ENTRY_FIXED_BYTES + key_len;
        if b.len() < total {
            self.bytes = &[];
            return Some(Err(HeaderError::BadField("hint entry key truncated")));
        }
        let entry = HintEntry {
            kind,
            value_len: le_u32(b, 4),
            offset: le_u32(b, 8),
            lsn: le_u64(b, 12),
            key: &b[HINT_ENTRY_FIXED_BYTES..total],
        };
        self.bytes = &b[total..];
        Some(Ok(entry))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestHeader {
    pub shard_count: u32,
    pub partition_count: u32,
}

impl ManifestHeader {
    pub fn encode(&self, block: &mut [u8]) {
        let block = &mut block[..BLOCK_BYTES];
        block.fill(0);
        block[..8].copy_from_slice(&MANIFEST_MAGIC);
        put_u16(block, 8, FORMAT_VERSION);
        put_u32(block, 12, self.shard_count);
        put_u32(block, 16, self.partition_count);
        seal_header(block);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let block = open_header(bytes, &MANIFEST_MAGIC)?;
        if le_u16(block, 10) != 0 {
            return Err(HeaderError::BadField("reserved bytes are not zero"));
        }
        zero_after(block, 20)?;
        Ok(Self { shard_count: le_u32(block, 12), partition_count: le_u32(block, 16) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_alignment() {
        let mut buf = vec![0u8; 256];
        let len = encode_record(&mut buf, RecordKind::Put, 7, 42, b"key-1", b"hello world");
        assert_eq!(len, 32 + 16 + 16);
        let r = parse_record(&buf).unwrap();
        assert_eq!(
            (r.kind, r.partition, r.lsn, r.key, r.value, r.len),
            (RecordKind::Put, 7, 42, &b"key-1"[..], &b"hello world"[..], len)
        );
        let value_offset = r.value.as_ptr() as usize - buf.as_ptr() as usize;
        assert_eq!(value_offset % RECORD_ALIGN_BYTES, 0);
    }

    #[test]
    fn every_bit_flip_in_a_record_is_detected() {
        let mut buf = vec![0u8; 128];
        let len = encode_record(&mut buf, RecordKind::Put, 1, 9, b"abc", b"0123456789abcdefXYZ");
        for bit in 0..len * 8 {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(parse_record(&damaged[..len]).is_err(), "flip of bit {bit} not detected");
        }
    }

    #[test]
    fn zero_bytes_are_unwritten_space() {
        assert_eq!(parse_record(&[0u8; 64]).unwrap_err(), RecordError::Unwritten);
    }

    #[test]
    fn pad_fills_to_block_boundary() {
        assert_eq!(pad_len(4096), 0);
        assert_eq!(pad_len(4096 + 16), 4096 - 16);
        assert_eq!(pad_len(8192 - 16), 16 + 4096);
        let mut block = vec![0xffu8; 4096 - 64];
        encode_pad(&mut block, 3, 5);
        let r = parse_record(&block).unwrap();
        assert_eq!(r.kind, RecordKind::Pad);
        assert_eq!(next_record_offset(4096 + 64, RecordKind::Pad, r.len), 8192);
    }

    #[test]
    fn headers_round_trip_and_refuse_foreign_files() {
        let mut block = vec![0u8; BLOCK_BYTES];
        let h = SegmentHeader {
            kind: SegmentKind::Compacted,
            partition: 3,
            segment_id: 99,
            partition_count: 256,
            supersedes: vec![4, 5],
        };
        h.encode(&mut block);
        assert_eq!(SegmentHeader::decode(&block).unwrap(), h);
        assert!(matches!(CommitLogHeader::decode(&block), Err(HeaderError::BadMagic { .. })));
        let mut newer = block.clone();
        put_u16(&mut newer, 8, FORMAT_VERSION + 1);
        seal_header(&mut newer);
        assert_eq!(SegmentHeader::decode(&newer), Err(HeaderError::UnsupportedVersion { found: FORMAT_VERSION + 1 }));
        block[100] ^= 1;
        assert!(matches!(SegmentHeader::decode(&block), Err(HeaderError::ChecksumMismatch { .. })));
    }

    #[test]
    fn hint_entries_round_trip() {
        let entries = [
            HintEntry { kind: RecordKind::Put, value_len: 10, offset: 4096, lsn: 1, key: b"a" },
            HintEntry { kind: RecordKind::Remove, value_len: 0, offset: 4160, lsn: 2, key: b"bcd" },
        ];
        let mut bytes = Vec::new();
        for e in &entries {
            e.encode(&mut bytes);
        }
        let decoded: Vec<_> = HintEntries::new(&bytes).map(Result::unwrap).collect();
        assert_eq!(decoded, entries);
    }
}
