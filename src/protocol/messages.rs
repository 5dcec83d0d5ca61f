//! Bodies of the native protocol's requests and responses. Decoding borrows
//! from the receive buffer (no copies); encoding appends to a send buffer.
//!
//! ```text
//! GET    request : key
//!        response: Ok -> version set bytes (dvv::encoding) | NotFound -> context
//! PUT    request : key_len u16 | key | context_len u32 | context | value
//!        response: Ok -> new context
//! DELETE request : key_len u16 | key | context_len u32 | context
//!        response: Ok -> new context (of the tombstone)
//! PING   request : any bytes        response: the same bytes
//! STATUS request : empty
//!        response: shard_count u32 | partition_count u32 | client_port u16 |
//!                  redis_port u16 | actor u64 | human-readable report (UTF-8)
//! OVERWRITE request: key_len u16 | key | value       response: Ok (empty)
//! DELETE_ALL request: key     response: Ok -> 1 byte, 1 if a live value was deleted
//! BATCH  request : { opcode u8 | len u32 | body }*
//!        response: { opcode u8 | status u8 | len u32 | body }*  (same order)
//! any error response: a UTF-8 message
//! ```

use super::frame::{Opcode, Status};

/// A decoded request, borrowing from the frame body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Ping(&'a [u8]),
    Get { key: &'a [u8] },
    Put { key: &'a [u8], context: &'a [u8], value: &'a [u8] },
    Delete { key: &'a [u8], context: &'a [u8] },
    Status,
    Batch(&'a [u8]),
    Overwrite { key: &'a [u8], value: &'a [u8] },
    DeleteAll { key: &'a [u8] },
}

/// Why a request body is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    UnknownOpcode(u8),
    Malformed(&'static str),
}

impl RequestError {
    pub fn status(&self) -> Status {
        match self {
            Self::UnknownOpcode(_) => Status::UnknownOpcode,
            Self::Malformed(_) => Status::BadRequest,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::UnknownOpcode(op) => format!("unknown opcode {op}"),
            Self::Malformed(what) => format!("malformed request: {what}"),
        }
    }
}

fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], RequestError> {
    if bytes.len() < n {
        return Err(RequestError::Malformed(what));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn key_and_context<'a>(body: &mut &'a [u8]) -> Result<(&'a [u8], &'a [u8]), RequestError> {
    let key_len = u16::from_le_bytes(take(body, 2, "key length")?.try_into().expect("2")) as usize;
    let key = take(body, key_len, "key")?;
    let context_len = u32::from_le_bytes(take(body, 4, "context length")?.try_into().expect("4")) as usize;
    let context = take(body, context_len, "context")?;
    Ok((key, context))
}

pub fn decode_request(opcode: u8, body: &[u8]) -> Result<Request<'_>, RequestError> {
    let mut rest = body;
    Ok(match Opcode::from_u8(opcode).ok_or(RequestError::UnknownOpcode(opcode))? {
        Opcode::Ping => Request::Ping(body),
        Opcode::Get => Request::Get { key: body },
        Opcode::Put => {
            let (key, context) = key_and_context(&mut rest)?;
            Request::Put { key, context, value: rest }
        }
        Opcode::Delete => {
            let (key, context) = key_and_context(&mut rest)?;
            if !rest.is_empty() {
                return Err(RequestError::Malformed("trailing bytes after a delete"));
            }
            Request::Delete { key, context }
        }
        Opcode::Status if !body.is_empty() => return Err(RequestError::Malformed("a status request has no body")),
        Opcode::Status => Request::Status,
        Opcode::Batch => Request::Batch(body),
        Opcode::Overwrite => {
            let key_len = u16::from_le_bytes(take(&mut rest, 2, "key length")?.try_into().expect("2")) as usize;
            let key = take(&mut rest, key_len, "key")?;
            Request::Overwrite { key, value: rest }
        }
        Opcode::DeleteAll => Request::DeleteAll { key: body },
    })
}

/// Appends a request body for `request` (the opcode goes in the header).
pub fn encode_request(out: &mut Vec<u8>, request: &Request<'_>) {
    match *request {
        Request::Ping(b) | Request::Batch(b) => out.extend_from_slice(b),
        Request::Get { key } => out.extend_from_slice(key),
        Request::Put { key, context, value } => {
            push_key_and_context(out, key, context);
            out.extend_from_slice(value);
        }
        Request::Delete { key, context } => push_key_and_context(out, key, context),
        Request::Status => {}
        Request::Overwrite { key, value } => {
            out.extend_from_slice(&u16::try_from(key.len()).expect("keys are at most 65535 bytes").to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(value);
        }
        Request::DeleteAll { key } => out.extend_from_slice(key),
    }
}

fn push_key_and_context(out: &mut Vec<u8>, key: &[u8], context: &[u8]) {
    out.extend_from_slice(&u16::try_from(key.len()).expect("keys are at most 65535 bytes").to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&u32::try_from(context.len()).expect("bounded context").to_le_bytes());
    out.extend_from_slice(context);
}

pub fn opcode_of(request: &Request<'_>) -> Opcode {
    match request {
        Request::Ping(_) => Opcode::Ping,
        Request::Get { .. } => Opcode::Get,
        Request::Put { .. } => Opcode::Put,
        Request::Delete { .. } => Opcode::Delete,
        Request::Status => Opcode::Status,
        Request::Batch(_) => Opcode::Batch,
        Request::Overwrite { .. } => Opcode::Overwrite,
        Request::DeleteAll { .. } => Opcode::DeleteAll,
    }
}

/// Batch framing of sub-requests and sub-responses.
pub mod batch {
    use super::RequestError;

    pub fn push_request(out: &mut Vec<u8>, opcode: u8, body: &[u8]) {
        out.push(opcode);
        out.extend_from_slice(&u32::try_from(body.len()).expect("bounded").to_le_bytes());
        out.extend_from_slice(body);
    }

    /// Iterates (opcode, body) of a batch request.
    pub fn requests(mut body: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), RequestError>> {
        std::iter::from_fn(move || {
            if body.is_empty() {
                return None;
            }
            if body.len() < 5 {
                body = &[];
                return Some(Err(RequestError::Malformed("batch entry header")));
            }
            let opcode = body[0];
            let len = u32::from_le_bytes(body[1..5].try_into().expect("4")) as usize;
            if body.len() < 5 + len {
                body = &[];
                return Some(Err(RequestError::Malformed("batch entry body")));
            }
            let entry = &body[5..5 + len];
            body = &body[5 + len..];
            Some(Ok((opcode, entry)))
        })
    }

    /// Appends a sub-response whose body is written by `f`.
    pub fn push_response_with(out: &mut Vec<u8>, opcode: u8, status: u8, f: impl FnOnce(&mut Vec<u8>)) {
        let at = begin_response(out, opcode);
        f(out);
        end_response(out, at, status);
    }

    /// Starts a sub-response whose body the caller appends next (for a body
    /// produced by an await); returns where it starts, for `end_response`.
    pub fn begin_response(out: &mut Vec<u8>, opcode: u8) -> usize {
        let at = out.len();
        out.extend_from_slice(&[opcode, 0, 0, 0, 0, 0]);
        at
    }

    /// Completes the sub-response begun at `at` with its status and length.
    pub fn end_response(out: &mut [u8], at: usize, status: u8) {
        let len = u32::try_from(out.len() - at - 6).expect("bounded");
        out[at + 1] = status;
        out[at + 2..at + 6].copy_from_slice(&len.to_le_bytes());
    }

    /// Iterates (opcode, status, body) of a batch response.
    pub fn responses(mut body: &[u8]) -> impl Iterator<Item = Option<(u8, u8, &[u8])>> {
        std::iter::from_fn(move || {
            if body.is_empty() {
                return None;
            }
            if body.len() < 6 {
                body = &[];
                return Some(None);
            }
            let (opcode, status) = (body[0], body[1]);
            let len = u32::from_le_bytes(body[2..6].try_into().expect("4")) as usize;
            if body.len() < 6 + len {
                body = &[];
                return Some(None);
            }
            let entry = &body[6..6 + len];
            body = &body[6 + len..];
            Some(Some((opcode, status, entry)))
        })
    }
}

/// The STATUS response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub shard_count: u32,
    pub partition_count: u32,
    pub client_port: u16,
    pub redis_port: u16,
    pub actor: u64,
    pub report: String,
}

impl NodeStatus {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.shard_count.to_le_bytes());
        out.extend_from_slice(&self.partition_count.to_le_bytes());
        out.extend_from_slice(&self.client_port.to_le_bytes());
        out.extend_from_slice(&self.redis_port.to_le_bytes());
        out.extend_from_slice(&self.actor.to_le_bytes());
        out.extend_from_slice(self.report.as_bytes());
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 20 {
            return None;
        }
        Some(Self {
            shard_count: u32::from_le_bytes(b[0..4].try_into().ok()?),
            partition_count: u32::from_le_bytes(b[4..8].try_into().ok()?),
            client_port: u16::from_le_bytes(b[8..10].try_into().ok()?),
            redis_port: u16::from_le_bytes(b[10..12].try_into().ok()?),
            actor: u64::from_le_bytes(b[12..20].try_into().ok()?),
            report: String::from_utf8_lossy(&b[20..]).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for request in [
            Request::Ping(b"hi"),
            Request::Get { key: b"k" },
            Request::Put { key: b"k", context: b"ctx", value: b"value" },
            Request::Put { key: b"k", context: b"", value: b"" },
            Request::Delete { key: b"k", context: b"c" },
            Request::Status,
            Request::Overwrite { key: b"k", value: b"v" },
            Request::DeleteAll { key: b"k" },
        ] {
            let mut body = Vec::new();
            encode_request(&mut body, &request);
            assert_eq!(decode_request(opcode_of(&request) as u8, &body), Ok(request));
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert_eq!(decode_request(99, b""), Err(RequestError::UnknownOpcode(99)));
        assert!(decode_request(Opcode::Put as u8, &[5, 0, b'a']).is_err());
        assert!(decode_request(Opcode::Put as u8, &[1, 0, b'a', 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_request(Opcode::Delete as u8, &[1, 0, b'a', 0, 0, 0, 0, 1]).is_err());
        assert!(decode_request(Opcode::Status as u8, &[0]).is_err());
    }

    proptest::proptest! {
        /// Any opcode with any body decodes or is refused, never panics; a
        /// decoded request encodes back to the same body.
        #[test]
        fn any_body_decodes_or_is_refused(opcode in proptest::num::u8::ANY, body in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            if let Ok(request) = decode_request(opcode, &body) {
                let mut again = Vec::new();
                encode_request(&mut again, &request);
                proptest::prop_assert_eq!(again, body);
            }
        }

        /// Batches of any bytes: every sub-request is returned or refused.
        #[test]
        fn any_batch_body_is_walked_without_panicking(body in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            for (_, sub) in batch::requests(&body).flatten() {
                proptest::prop_assert!(sub.len() <= body.len());
            }
            for (_, _, sub) in batch::responses(&body).flatten() {
                proptest::prop_assert!(sub.len() <= body.len());
            }
        }
    }

    #[test]
    fn batches_round_trip() {
        let mut body = Vec::new();
        batch::push_request(&mut body, Opcode::Get as u8, b"a");
        batch::push_request(&mut body, Opcode::Ping as u8, b"");
        let got: Vec<_> = batch::requests(&body).map(Result::unwrap).collect();
        assert_eq!(got, vec![(2, &b"a"[..]), (1, &b""[..])]);
        let mut resp = Vec::new();
        batch::push_response_with(&mut resp, 2, 1, |o| o.extend_from_slice(b"x"));
        assert_eq!(batch::responses(&resp).collect::<Vec<_>>(), vec![Some((2, 1, &b"x"[..]))]);
    }
}
