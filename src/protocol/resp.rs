//! RESP2 (the Redis protocol), request side: commands are arrays of bulk
//! strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or inline (`PING\r\n`).
//!
//! Written here rather than taken from `redis-protocol` because the hot path
//! must not allocate per request: the crate's zero-copy decoder still builds
//! a `Vec` per array. `parse_command` fills a caller-owned, reused vector of
//! byte ranges into the receive buffer. Limits on argument count and bulk
//! length are checked before anything grows.

use std::ops::Range;

/// Why bytes are not a RESP2 command. All end the connection (as in Redis).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RespError {
    /// A length or count that is not a number, or a missing CRLF.
    Protocol(&'static str),
    TooManyArguments {
        count: u64,
        limit: usize,
    },
    BulkTooLarge {
        len: u64,
        limit: usize,
    },
}

impl std::fmt::Display for RespError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Protocol(what) => write!(f, "Protocol error: {what}"),
            Self::TooManyArguments { count, limit } => {
                write!(f, "Protocol error: {count} arguments, at most {limit} allowed")
            }
            Self::BulkTooLarge { len, limit } => write!(f, "Protocol error: bulk string of {len} bytes, limit {limit}"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub arguments_max: usize,
    pub bulk_bytes_max: usize,
}

/// Reads a decimal number terminated by CRLF at `buf[at..]`; returns the
/// number and the index after the CRLF, or None if incomplete.
fn number(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, RespError> {
    let Some(cr) = buf[at..].iter().position(|&b| b == b'\r') else {
        if buf.len() - at > 20 {
            return Err(RespError::Protocol("invalid length"));
        }
        return Ok(None);
    };
    let end = at + cr;
    if end + 1 >= buf.len() {
        return Ok(None);
    }
    if buf[end + 1] != b'\n' {
        return Err(RespError::Protocol("expected CRLF"));
    }
    let n = decimal(&buf[at..end]).ok_or(RespError::Protocol("invalid length"))?;
    Ok(Some((n, end + 2)))
}

/// `str::parse::<i64>` of ASCII bytes, without the UTF-8 check and the
/// generic parser: every command has a few of these (array and bulk
/// lengths), and the two were ~2% of a SET profile.
fn decimal(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    let mut magnitude: u64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        magnitude = magnitude.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
    }
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Parses the first command in `buf`. On success fills `args` with ranges of
/// the arguments and returns the bytes consumed; `Ok(None)` means more bytes
/// are needed (and `args` is left in an unspecified state).
pub fn parse_command(buf: &[u8], limits: Limits, args: &mut Vec<Range<usize>>) -> Result<Option<usize>, RespError> {
    args.clear();
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        return parse_inline(buf, limits, args);
    }
    let Some((count, mut at)) = number(buf, 1)? else { return Ok(None) };
    if count < 0 {
        return Ok(Some(at)); // a null array: nothing to run
    }
    if count as u64 > limits.arguments_max as u64 {
        return Err(RespError::TooManyArguments { count: count as u64, limit: limits.arguments_max });
    }
    for _ in 0..count {
        if at >= buf.len() {
            return Ok(None);
        }
        if buf[at] != b'$' {
            return Err(RespError::Protocol("expected '$'"));
        }
        let Some((len, start)) = number(buf, at + 1)? else { return Ok(None) };
        if len < 0 {
            return Err(RespError::Protocol("invalid bulk length"));
        }
        if len as u64 > limits.bulk_bytes_max as u64 {
            return Err(RespError::BulkTooLarge { len: len as u64, limit: limits.bulk_bytes_max });
        }
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(RespError::Protocol("expected CRLF after bulk string"));
        }
        args.push(start..end);
        at = end + 2;
    }
    Ok(Some(at))
}

/// An inline command: space-separated words ending in LF (or CRLF).
fn parse_inline(buf: &[u8], limits: Limits, args: &mut Vec<Range<usize>>) -> Result<Option<usize>, RespError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.bulk_bytes_max {
            return Err(RespError::Protocol("too big inline request"));
        }
        return Ok(None);
    };
    let line_end = if lf > 0 && buf[lf - 1] == b'\r' { lf - 1 } else { lf };
    let mut at = 0;
    while at < line_end {
        while at < line_end && buf[at] == b' ' {
            at += 1;
        }
        let start = at;
        while at < line_end && buf[at] != b' ' {
            at += 1;
        }
        if at > start {
            if args.len() == limits.arguments_max {
                return Err(RespError::TooManyArguments { count: args.len() as u64 + 1, limit: limits.arguments_max });
            }
            args.push(start..at);
        }
    }
    Ok(Some(lf + 1))
}

pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn error(out: &mut Vec<u8>, s: &str) {
    out.push(b'-');
    // A message must stay on one line.
    out.extend(s.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\r\n");
}

pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    out.extend_from_slice(itoa(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(itoa(bytes.len() as i64).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

pub fn null_bulk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

pub fn array(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    out.extend_from_slice(itoa(len as i64).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn itoa(n: i64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { arguments_max: 16, bulk_bytes_max: 100 };

    fn words(buf: &[u8]) -> (Vec<String>, usize) {
        let mut args = Vec::new();
        let used = parse_command(buf, LIMITS, &mut args).unwrap().expect("complete");
        (args.iter().map(|r| String::from_utf8_lossy(&buf[r.clone()]).into_owned()).collect(), used)
    }

    #[test]
    fn arrays_and_inline_commands() {
        assert_eq!(
            words(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\nrest"),
            (vec!["SET".into(), "k".into(), "value".into()], 31)
        );
        assert_eq!(words(b"PING\r\n"), (vec!["PING".into()], 6));
        assert_eq!(words(b"  get   key \n"), (vec!["get".into(), "key".into()], 13));
        assert_eq!(words(b"*1\r\n$0\r\n\r\n"), (vec!["".into()], 10));
    }

    #[test]
    fn incomplete_input_asks_for_more_at_every_cut() {
        let full = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";
        let mut args = Vec::new();
        for cut in 0..full.len() {
            assert_eq!(parse_command(&full[..cut], LIMITS, &mut args), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_command(full, LIMITS, &mut args), Ok(Some(full.len())));
    }

    #[test]
    fn limits_and_garbage_are_errors() {
        let mut args = Vec::new();
        assert!(matches!(parse_command(b"*99\r\n", LIMITS, &mut args), Err(RespError::TooManyArguments { .. })));
        assert!(matches!(parse_command(b"*1\r\n$101\r\n", LIMITS, &mut args), Err(RespError::BulkTooLarge { .. })));
        assert!(matches!(parse_command(b"*1\r\n#3\r\n", LIMITS, &mut args), Err(RespError::Protocol(_))));
        assert!(matches!(parse_command(b"*x\r\n", LIMITS, &mut args), Err(RespError::Protocol(_))));
        assert!(matches!(parse_command(b"*1\r\n$2\r\nabX\r\n", LIMITS, &mut args), Err(RespError::Protocol(_))));
    }

    /// A command as a client encodes it (array of bulk strings).
    fn encode_command(args: &[Vec<u8>]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn decimals_at_the_edges_parse_as_std_does() {
        for text in ["0", "-0", "+7", "-1", "9223372036854775807", "-9223372036854775808"] {
            assert_eq!(decimal(text.as_bytes()), text.parse().ok(), "{text}");
        }
        for text in ["", "-", "+", "9223372036854775808", "-9223372036854775809", "1 ", "0x1", "--1", "١"] {
            assert_eq!(decimal(text.as_bytes()), None, "{text}");
        }
    }

    proptest::proptest! {
        /// The hand-written decimal parser agrees with the standard one.
        #[test]
        fn decimals_parse_as_std_does(text in "[-+]?[0-9]{0,21}|[-+0-9a ]{0,6}", bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..6)) {
            proptest::prop_assert_eq!(decimal(text.as_bytes()), text.parse::<i64>().ok());
            let standard = std::str::from_utf8(&bytes).ok().and_then(|t| t.parse::<i64>().ok());
            proptest::prop_assert_eq!(decimal(&bytes), standard);
        }

        /// Whatever arrives, the parser returns (no panic), consumes no
        /// more than it was given, and points only inside what it consumed.
        #[test]
        fn any_bytes_give_an_answer_within_bounds(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut args = Vec::new();
            if let Ok(Some(used)) = parse_command(&bytes, LIMITS, &mut args) {
                proptest::prop_assert!(used <= bytes.len());
                for range in &args {
                    proptest::prop_assert!(range.start <= range.end && range.end <= used);
                }
            }
        }

        /// A well-formed command, whatever its bytes (CR, LF, '*' and '$'
        /// inside arguments included), parses to exactly its arguments;
        /// cut anywhere it asks for more; bytes after it are left alone.
        #[test]
        fn encoded_commands_parse_back_at_every_cut(
            args in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 1..6),
            trailing in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
        ) {
            let command = encode_command(&args);
            let mut found = Vec::new();
            for cut in 0..command.len() {
                proptest::prop_assert_eq!(parse_command(&command[..cut], LIMITS, &mut found), Ok(None), "cut at {}", cut);
            }
            let mut buf = command.clone();
            buf.extend_from_slice(&trailing);
            proptest::prop_assert_eq!(parse_command(&buf, LIMITS, &mut found), Ok(Some(command.len())));
            let parsed: Vec<Vec<u8>> = found.iter().map(|r| buf[r.clone()].to_vec()).collect();
            proptest::prop_assert_eq!(parsed, args);
        }
    }

    #[test]
    fn replies() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        bulk(&mut out, b"v");
        null_bulk(&mut out);
        integer(&mut out, -3);
        array(&mut out, 2);
        error(&mut out, "ERR bad\nthing");
        assert_eq!(out, b"+OK\r\n$1\r\nv\r\n$-1\r\n:-3\r\n*2\r\n-ERR bad thing\r\n");
    }
}
