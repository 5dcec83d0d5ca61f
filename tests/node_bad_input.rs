//! Bad input on the native port: every case gets a typed error reply where
//! one can be sent, the connection is closed, and the node keeps serving a
//! well-behaved client.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ringkv::protocol::frame::{self, Opcode, Status, HEADER_BYTES};
use ringkv::protocol::messages::{encode_request, Request};
use support::{block_on, config_file, scratch, Node};

/// Sends `bytes`, then reads until the node closes the connection.
/// Returns the (status, body) of every reply frame and whether EOF came.
fn exchange(address: SocketAddr, bytes: &[u8]) -> (Vec<(Status, Vec<u8>)>, bool) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(bytes).unwrap();
    read_until_closed(&mut stream)
}

fn read_until_closed(stream: &mut TcpStream) -> (Vec<(Status, Vec<u8>)>, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let closed = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false, // read timeout: the node never closed
        }
    };
    let mut replies = Vec::new();
    let mut at = 0;
    while let Ok(Some((h, body, used))) = frame::decode(&buf[at..], 64 << 20) {
        replies.push((Status::from_u8(h.status).unwrap(), body.to_vec()));
        at += used;
    }
    (replies, closed)
}

fn request(opcode: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(&mut out, opcode, 0, 0, 7, body);
    out
}

fn put_body(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    encode_request(&mut body, &Request::Put { key, context: &[], value });
    body
}

/// A header claiming `len` body bytes, with a valid header checksum.
fn header_claiming(len: u32) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_BYTES];
    h[..4].copy_from_slice(&frame::MAGIC);
    h[4] = frame::VERSION;
    h[5] = Opcode::Put as u8;
    h[8..16].copy_from_slice(&9u64.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn assert_refused(case: &str, (replies, closed): (Vec<(Status, Vec<u8>)>, bool), status: Status) {
    assert!(closed, "{case}: the connection was not closed");
    assert_eq!(replies.len(), 1, "{case}: expected exactly one (error) reply, got {replies:?}");
    assert_eq!(replies[0].0, status, "{case}: {}", String::from_utf8_lossy(&replies[0].1));
}

#[test]
fn bad_input_gets_an_error_and_a_close_and_the_node_keeps_serving() {
    let dir = scratch("bad-input-");
    let config = config_file(dir.path(), "[node]\nread_timeout_ms = 300\nconnections_max_per_shard = 4\n");
    let node = Node::start(
        &dir.path().join("data"),
        "127.0.0.21",
        &["--shards", "1", "--config", &config.display().to_string()],
    );
    let address = node.client_address();
    let healthy = node.client();
    let check_healthy = |case: &str| {
        block_on(async {
            healthy.ping().await.unwrap_or_else(|e| panic!("after {case}: {e}"));
            let key = format!("after-{case}");
            healthy.put(key.as_bytes(), b"fine", None).await.unwrap();
            assert_eq!(healthy.get(key.as_bytes()).await.unwrap().unwrap().siblings, vec![b"fine".to_vec()]);
        })
    };

    assert_refused("length 0xFFFFFFFF", exchange(address, &header_claiming(u32::MAX)), Status::FrameTooLarge);
    check_healthy("huge length");

    // A truncated frame, then silence: closed after the read deadline.
    let (replies, closed) = exchange(address, &request(Opcode::Get as u8, b"some-key")[..10]);
    assert!(closed && replies.is_empty(), "stalled connection: closed={closed} replies={replies:?}");
    check_healthy("truncated");

    assert_refused("unknown opcode", exchange(address, &request(99, b"x")), Status::UnknownOpcode);
    assert_refused("internal opcode", exchange(address, &request(0x82, b"k")), Status::UnknownOpcode);
    check_healthy("unknown opcode");

    let big_key = vec![b'k'; 5000];
    assert_refused(
        "oversize key",
        exchange(address, &request(Opcode::Put as u8, &put_body(&big_key, b"v"))),
        Status::KeyTooLarge,
    );
    let big_value = vec![b'v'; (1 << 20) + 1];
    assert_refused(
        "oversize value",
        exchange(address, &request(Opcode::Put as u8, &put_body(b"k", &big_value))),
        Status::ValueTooLarge,
    );
    check_healthy("oversize");

    let mut http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    http.resize(HEADER_BYTES, b' ');
    assert_refused("wrong magic", exchange(address, &http), Status::Unsupported);
    let mut future = request(Opcode::Ping as u8, b"");
    future[4] = 2;
    assert_refused("wrong version", exchange(address, &future), Status::Unsupported);
    let mut damaged = request(Opcode::Put as u8, &put_body(b"k", b"value"));
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert_refused("body checksum", exchange(address, &damaged), Status::BadRequest);
    let mut response = Vec::new();
    frame::encode(&mut response, Opcode::Get as u8, 0, frame::FLAG_RESPONSE, 1, b"k");
    assert_refused("response as request", exchange(address, &response), Status::BadRequest);
    check_healthy("malformed frames");

    // Too many connections: the shard allows 4 (the healthy client holds 2:
    // the shared port and the shard's own port, both on shard 0).
    let shard_port = SocketAddr::new(node.ip, node.client_port + 1);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(shard_port).unwrap();
        s.write_all(&request(Opcode::Ping as u8, b"hi")).unwrap();
        let mut reply = vec![0u8; HEADER_BYTES + 2];
        s.read_exact(&mut reply).unwrap();
        held.push(s);
    }
    let mut extra = TcpStream::connect(shard_port).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_refused("too many connections", read_until_closed(&mut extra), Status::Overloaded);
    drop(held);
    check_healthy("too many connections");
}
