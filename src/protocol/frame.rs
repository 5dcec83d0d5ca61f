//! The native frame: one layout for client and peer traffic. The only code
//! that knows the wire header's bytes.
//!
//! ```text
//!  0       4    5      6      7      8                16          20         24         28          32
//!  +-------+----+------+------+------+----------------+-----------+----------+----------+-----------+
//!  | magic |ver |opcode|status|flags | request id u64 | body len  | body crc | reserved | header crc|
//!  | "RKVP"| 1  |  u8  |  u8  |  u8  |                |   u32     |  u32     |  zero    | 0..28 u32 |
//!  +-------+----+------+------+------+----------------+-----------+----------+----------+-----------+
//!  | body (body len bytes)                                                                          |
//! ```
//!
//! All integers little-endian. `flags` bit 0 marks a response; `status` is
//! zero in requests. The body length is checked against the limit as soon
//! as the 32 header bytes are in, before anything is allocated for the body;
//! the header CRC is checked before any header field is trusted beyond the
//! magic and version (which name the protocol, so a foreign client gets a
//! precise error). Replies carry the request's id and may come out of order.

use std::fmt;

pub const MAGIC: [u8; 4] = *b"RKVP";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 32;
pub const FLAG_RESPONSE: u8 = 1;

const _: () = assert!(HEADER_BYTES.is_multiple_of(16));

/// Operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Ping = 1,
    Get = 2,
    Put = 3,
    Delete = 4,
    /// Many sub-requests in one frame (see `messages::batch`).
    Batch = 5,
    /// Node facts for shard-aware clients and `admin status`.
    Status = 6,
    /// Last-writer-wins write: supersedes every version the node holds
    /// (concurrent writes elsewhere are lost by design). Redis SET.
    Overwrite = 7,
    /// Last-writer-wins delete: a tombstone superseding every version the
    /// node holds. Redis DEL.
    DeleteAll = 8,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Ping,
            2 => Self::Get,
            3 => Self::Put,
            4 => Self::Delete,
            5 => Self::Batch,
            6 => Self::Status,
            7 => Self::Overwrite,
            8 => Self::DeleteAll,
            _ => return None,
        })
    }
}

/// Outcome of a request, carried in responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    /// Malformed body, bad context, or a frame the server cannot parse.
    BadRequest = 2,
    KeyTooLarge = 3,
    ValueTooLarge = 4,
    FrameTooLarge = 5,
    UnknownOpcode = 6,
    /// Out of disk space; retry later.
    StorageFull = 7,
    /// The node cannot serve it now (unhealthy shard, shutting down).
    Unavailable = 8,
    /// Too many connections or requests in flight.
    Overloaded = 9,
    Internal = 10,
    /// Wrong magic or protocol version.
    Unsupported = 11,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::NotFound,
            2 => Self::BadRequest,
            3 => Self::KeyTooLarge,
            4 => Self::ValueTooLarge,
            5 => Self::FrameTooLarge,
            6 => Self::UnknownOpcode,
            7 => Self::StorageFull,
            8 => Self::Unavailable,
            9 => Self::Overloaded,
            10 => Self::Internal,
            11 => Self::Unsupported,
            _ => return None,
        })
    }

    /// Errors after which the server closes the connection (the byte
    /// stream can no longer be trusted).
    pub fn closes_connection(self) -> bool {
        matches!(self, Self::FrameTooLarge | Self::UnknownOpcode | Self::Unsupported)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub opcode: u8,
    pub status: u8,
    pub flags: u8,
    pub request_id: u64,
    pub body_len: u32,
    pub body_crc: u32,
}

impl Header {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }
}

/// Why bytes are not a frame. Every variant ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    BadMagic([u8; 4]),
    UnsupportedVersion(u8),
    TooLarge { len: u32, limit: u32 },
    HeaderChecksum { expected: u32, actual: u32 },
    BodyChecksum { expected: u32, actual: u32 },
    ReservedNotZero,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "bad magic {m:02x?}: not a ringkv frame"),
            Self::UnsupportedVersion(v) => write!(f, "protocol version {v}, this node speaks {VERSION}"),
            Self::TooLarge { len, limit } => write!(f, "frame body of {len} bytes is over the limit of {limit}"),
            Self::HeaderChecksum { expected, actual } => {
                write!(f, "header checksum mismatch: sent {expected:#010x}, computed {actual:#010x}")
            }
            Self::BodyChecksum { expected, actual } => {
                write!(f, "body checksum mismatch: sent {expected:#010x}, computed {actual:#010x}")
            }
            Self::ReservedNotZero => write!(f, "reserved header bytes are not zero"),
        }
    }
}

impl FrameError {
    /// The status an error reply carries.
    pub fn status(&self) -> Status {
        match self {
            Self::BadMagic(_) | Self::UnsupportedVersion(_) => Status::Unsupported,
            Self::TooLarge { .. } => Status::FrameTooLarge,
            _ => Status::BadRequest,
        }
    }
}

/// Appends a frame to `out`.
pub fn encode(out: &mut Vec<u8>, opcode: u8, status: u8, flags: u8, request_id: u64, body: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(opcode);
    out.push(status);
    out.push(flags);
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).expect("bodies are bounded by the frame limit").to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    let crc = crc32fast::hash(&out[start..start + 28]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
}

/// Appends a response frame whose body is written by `body` (no staging
/// copy): header placeholders are patched after the body is in place.
pub fn encode_response_with(
    out: &mut Vec<u8>,
    opcode: u8,
    status: Status,
    request_id: u64,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.resize(start + HEADER_BYTES, 0);
    body(out);
    let body_len = out.len() - start - HEADER_BYTES;
    let body_crc = crc32fast::hash(&out[start + HEADER_BYTES..]);
    let h = &mut out[start..start + HEADER_BYTES];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = opcode;
    h[6] = status as u8;
    h[7] = FLAG_RESPONSE;
    h[8..16].copy_from_slice(&request_id.to_le_bytes());
    h[16..20].copy_from_slice(&u32::try_from(body_len).expect("bounded body").to_le_bytes());
    h[20..24].copy_from_slice(&body_crc.to_le_bytes());
    h[24..28].fill(0);
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// Validates the 32-byte header at the start of `bytes` (which must hold
/// at least `HEADER_BYTES`).
pub fn decode_header(bytes: &[u8], body_limit: u32) -> Result<Header, FrameError> {
    let h = &bytes[..HEADER_BYTES];
    if h[..4] != MAGIC {
        return Err(FrameError::BadMagic(h[..4].try_into().expect("4 bytes")));
    }
    if h[4] != VERSION {
        return Err(FrameError::UnsupportedVersion(h[4]));
    }
    let expected = u32::from_le_bytes(h[28..32].try_into().expect("4"));
    let actual = crc32fast::hash(&h[..28]);
    if expected != actual {
        return Err(FrameError::HeaderChecksum { expected, actual });
    }
    if h[24..28] != [0; 4] {
        return Err(FrameError::ReservedNotZero);
    }
    let body_len = u32::from_le_bytes(h[16..20].try_into().expect("4"));
    if body_len > body_limit {
        return Err(FrameError::TooLarge { len: body_len, limit: body_limit });
    }
    Ok(Header {
        opcode: h[5],
        status: h[6],
        flags: h[7],
        request_id: u64::from_le_bytes(h[8..16].try_into().expect("8")),
        body_len,
        body_crc: u32::from_le_bytes(h[20..24].try_into().expect("4")),
    })
}

/// A complete frame in a buffer: header, body, and bytes it took.
pub type Decoded<'a> = (Header, &'a [u8], usize);

/// Splits the first complete frame off `bytes`: `Ok(None)` when more bytes
/// are needed, else the header, the body and the bytes consumed.
pub fn decode(bytes: &[u8], body_limit: u32) -> Result<Option<Decoded<'_>>, FrameError> {
    if bytes.len() < HEADER_BYTES {
        return Ok(None);
    }
    let header = decode_header(bytes, body_limit)?;
    let total = HEADER_BYTES + header.body_len as usize;
    if bytes.len() < total {
        return Ok(None);
    }
    let body = &bytes[HEADER_BYTES..total];
    let actual = crc32fast::hash(body);
    if actual != header.body_crc {
        return Err(FrameError::BodyChecksum { expected: header.body_crc, actual });
    }
    Ok(Some((header, body, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden bytes: the wire layout must not drift.
    #[test]
    fn golden_get_request() {
        let mut out = Vec::new();
        encode(&mut out, Opcode::Get as u8, 0, 0, 0x0102_0304_0506_0708, b"key");
        let expected: [u8; 35] = [
            b'R', b'K', b'V', b'P', 1, 2, 0, 0, // magic, version, opcode, status, flags
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // request id
            3, 0, 0, 0, // body length
            0xa9, 0xab, 0x90, 0x8a, // crc32("key") = 0x8a90aba9
            0, 0, 0, 0, // reserved
            0x39, 0x81, 0xd2, 0x4d, // crc32 of bytes 0..28
            b'k', b'e', b'y',
        ];
        assert_eq!(out, expected);
        let (h, body, used) = decode(&out, 1024).unwrap().unwrap();
        assert_eq!((h.opcode, h.request_id, body, used), (2, 0x0102_0304_0506_0708, &b"key"[..], 35));
    }

    #[test]
    fn response_written_in_place_decodes() {
        let mut out = vec![0xaa];
        encode_response_with(&mut out, Opcode::Put as u8, Status::NotFound, 9, |b| b.extend_from_slice(b"ctx"));
        let (h, body, _) = decode(&out[1..], 1024).unwrap().unwrap();
        assert!(h.is_response());
        assert_eq!((Status::from_u8(h.status), body), (Some(Status::NotFound), &b"ctx"[..]));
    }

    #[test]
    fn size_is_checked_before_the_body_arrives() {
        let mut out = Vec::new();
        encode(&mut out, 2, 0, 0, 1, &[0u8; 100]);
        // Only the header is present; the limit is already enforced.
        assert_eq!(decode(&out[..HEADER_BYTES], 50), Err(FrameError::TooLarge { len: 100, limit: 50 }));
        assert_eq!(decode(&out[..HEADER_BYTES + 10], 1000), Ok(None));
    }

    #[test]
    fn damage_is_detected() {
        let mut out = Vec::new();
        encode(&mut out, 2, 0, 0, 1, b"hello");
        for bit in 0..out.len() * 8 {
            let mut d = out.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&d, 1 << 20).is_err(), "flip of bit {bit} not detected");
        }
        assert!(matches!(decode(b"GET /index.html HTTP/1.1\r\n\r\n.....", 100), Err(FrameError::BadMagic(_))));
    }
}
