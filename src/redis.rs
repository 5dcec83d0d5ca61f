//! The Redis-protocol (RESP2) port, so existing Redis clients and tools
//! (redis-cli, redis-benchmark, redis-py) work unchanged.
//!
//! Semantics: plain `SET` supersedes every version this node holds of the
//! key (an overwrite), and plain `GET` returns the sibling written last (by
//! the coordinator's clock): that view is **last-writer-wins** and can hide
//! concurrent writes made through the native protocol or other nodes. The
//! full model is available as `VGET key` (the causal context, hex, then
//! every live sibling) and `VSET key context value` (a write superseding
//! exactly what `context` covers; returns the new context).
//!
//! Supported: PING ECHO GET SET DEL EXISTS MGET MSET INFO COMMAND CONFIG GET
//! SELECT CLIENT QUIT VGET VSET. Anything else gets `-ERR unknown command`.
//! Replies are written in command order, pipelined commands in one send.

use std::ops::Range;
use std::rc::Rc;

use futures::AsyncWriteExt;
use glommio::net::TcpStream;

use crate::logic::dvv::{encoding, Context};
use crate::protocol::frame::{Opcode, Status};
use crate::protocol::messages::{encode_request, Request};
use crate::protocol::resp::{self, Limits, RespError};
use crate::server::{ReadBuffer, ReadOutcome};
use crate::shard::{internal, push_key_value, Dispatch, Shard};

/// A command of the turn and where its reply comes from.
enum Item {
    /// Reply bytes already known, at this range of `immediate`.
    Immediate(Range<usize>),
    Get(usize),
    Set(usize),
    /// DEL: operations first..first+count; reply is the number deleted.
    Del {
        first: usize,
        count: usize,
    },
    Exists {
        first: usize,
        count: usize,
    },
    MGet {
        first: usize,
        count: usize,
    },
    MSet {
        first: usize,
        count: usize,
    },
    VGet(usize),
    VSet(usize),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok()).collect()
}

fn status_error(out: &mut Vec<u8>, status: Status, body: &[u8]) {
    let message = String::from_utf8_lossy(body);
    let code = match status {
        Status::StorageFull => "ERR storage full",
        Status::Unavailable => "ERR unavailable",
        Status::KeyTooLarge | Status::ValueTooLarge => "ERR too large",
        Status::Overloaded => "ERR overloaded",
        _ => "ERR",
    };
    resp::error(out, &format!("{code}: {message}"));
}

struct Turn {
    dispatch: Dispatch,
    items: Vec<Item>,
    immediate: Vec<u8>,
    quit: bool,
}

impl Turn {
    fn reply(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.immediate.len();
        f(&mut self.immediate);
        self.items.push(Item::Immediate(start..self.immediate.len()));
    }

    fn error(&mut self, message: &str) {
        self.reply(|o| resp::error(o, message));
    }

    fn key_op(&mut self, shard: &Shard, opcode: u8, key: &[u8], body: impl FnOnce(&mut Vec<u8>)) -> usize {
        let op = self.dispatch.len();
        self.dispatch.push(shard.route(key), opcode, body);
        op
    }
}

/// Adds one command to the turn.
fn admit(shard: &Shard, turn: &mut Turn, buf: &[u8], args: &[Range<usize>]) {
    let arg = |i: usize| &buf[args[i].clone()];
    // Upper-cased into a stack buffer: this runs for every command.
    let mut upper = [0u8; 16];
    let name = match arg(0) {
        raw if raw.len() <= upper.len() => {
            let upper = &mut upper[..raw.len()];
            upper.copy_from_slice(raw);
            upper.make_ascii_uppercase();
            std::str::from_utf8(upper).unwrap_or("")
        }
        _ => "",
    };
    let n = args.len();
    let wrong =
        |turn: &mut Turn| turn.error(&format!("ERR wrong number of arguments for '{}' command", name.to_lowercase()));
    match name {
        "PING" => match n {
            1 => turn.reply(|o| resp::simple(o, "PONG")),
            2 => turn.reply(|o| resp::bulk(o, arg(1))),
            _ => wrong(turn),
        },
        "ECHO" if n == 2 => turn.reply(|o| resp::bulk(o, arg(1))),
        "GET" if n == 2 => {
            let op = turn.key_op(shard, internal::GET_LATEST, arg(1), |o| o.extend_from_slice(arg(1)));
            turn.items.push(Item::Get(op));
        }
        "SET" if n == 3 => {
            let op = turn.key_op(shard, internal::OVERWRITE, arg(1), |o| push_key_value(o, arg(1), arg(2)));
            turn.items.push(Item::Set(op));
        }
        "SET" if n > 3 => turn.error("ERR SET options (EX, PX, NX, XX, ...) are not supported"),
        "DEL" | "UNLINK" if n >= 2 => {
            let first = turn.dispatch.len();
            for i in 1..n {
                turn.key_op(shard, internal::DELETE_ALL, arg(i), |o| o.extend_from_slice(arg(i)));
            }
            turn.items.push(Item::Del { first, count: n - 1 });
        }
        "EXISTS" if n >= 2 => {
            let first = turn.dispatch.len();
            for i in 1..n {
                turn.key_op(shard, internal::EXISTS, arg(i), |o| o.extend_from_slice(arg(i)));
            }
            turn.items.push(Item::Exists { first, count: n - 1 });
        }
        "MGET" if n >= 2 => {
            let first = turn.dispatch.len();
            for i in 1..n {
                turn.key_op(shard, internal::GET_LATEST, arg(i), |o| o.extend_from_slice(arg(i)));
            }
            turn.items.push(Item::MGet { first, count: n - 1 });
        }
        "MSET" if n >= 3 && n % 2 == 1 => {
            let first = turn.dispatch.len();
            for i in (1..n).step_by(2) {
                turn.key_op(shard, internal::OVERWRITE, arg(i), |o| push_key_value(o, arg(i), arg(i + 1)));
            }
            turn.items.push(Item::MSet { first, count: (n - 1) / 2 });
        }
        "VGET" if n == 2 => {
            let op = turn.key_op(shard, Opcode::Get as u8, arg(1), |o| o.extend_from_slice(arg(1)));
            turn.items.push(Item::VGet(op));
        }
        "VSET" if n == 4 => {
            let Some(context) = unhex(arg(2)) else {
                return turn.error("ERR context must be the hex string VGET returned (or empty)");
            };
            let op = turn.key_op(shard, Opcode::Put as u8, arg(1), |o| {
                encode_request(o, &Request::Put { key: arg(1), context: &context, value: arg(3) })
            });
            turn.items.push(Item::VSet(op));
        }
        "INFO" => {
            let status = shard.node_status();
            let text = format!(
                "# Server\r\nredis_version:7.0.0\r\nringkv_version:{}\r\nringkv_actor:{:016x}\r\nringkv_shards:{}\r\nringkv_partitions:{}\r\nringkv_semantics:last-writer-wins for GET/SET; VGET/VSET expose siblings\r\n",
                env!("CARGO_PKG_VERSION"),
                status.actor,
                status.shard_count,
                status.partition_count,
            );
            turn.reply(|o| resp::bulk(o, text.as_bytes()));
        }
        // redis-cli asks for command docs at start; an empty list is valid.
        "COMMAND" => turn.reply(|o| resp::array(o, 0)),
        "CONFIG" if n >= 3 && arg(1).eq_ignore_ascii_case(b"GET") => {
            let key = String::from_utf8_lossy(arg(2)).to_ascii_lowercase();
            let value = match key.as_str() {
                "save" => Some(""),
                "appendonly" => {
                    Some(if shard.config.storage.sync_mode == crate::config::SyncMode::None { "no" } else { "yes" })
                }
                _ => None,
            };
            turn.reply(|o| match value {
                Some(v) => {
                    resp::array(o, 2);
                    resp::bulk(o, key.as_bytes());
                    resp::bulk(o, v.as_bytes());
                }
                None => resp::array(o, 0),
            });
        }
        "SELECT" if n == 2 && arg(1) == b"0" => turn.reply(|o| resp::simple(o, "OK")),
        "SELECT" => turn.error("ERR DB index is out of range (ringkv has one keyspace)"),
        "CLIENT" => turn.reply(|o| resp::simple(o, "OK")),
        "QUIT" => {
            turn.reply(|o| resp::simple(o, "OK"));
            turn.quit = true;
        }
        "GET" | "SET" | "DEL" | "UNLINK" | "EXISTS" | "MGET" | "MSET" | "VGET" | "VSET" | "ECHO" => wrong(turn),
        _ => turn
            .error(&format!("ERR unknown command '{}', with args beginning with: ", String::from_utf8_lossy(arg(0)))),
    }
}

fn write_replies(turn: &Turn, out: &mut Vec<u8>) {
    let d = &turn.dispatch;
    for item in &turn.items {
        match *item {
            Item::Immediate(ref range) => out.extend_from_slice(&turn.immediate[range.clone()]),
            Item::Get(op) => match d.reply(op) {
                (Status::Ok, v) => resp::bulk(out, v),
                (Status::NotFound, _) => resp::null_bulk(out),
                (s, b) => status_error(out, s, b),
            },
            Item::Set(op) => match d.reply(op) {
                (Status::Ok, _) => resp::simple(out, "OK"),
                (s, b) => status_error(out, s, b),
            },
            Item::Del { first, count } | Item::Exists { first, count } => {
                let mut total = 0;
                let mut failed = None;
                for op in first..first + count {
                    match d.reply(op) {
                        (Status::Ok, b) if matches!(item, Item::Del { .. }) => {
                            total += i64::from(b.first() == Some(&1))
                        }
                        (Status::Ok, _) => total += 1,
                        (Status::NotFound, _) => {}
                        (s, b) => failed = Some((s, b)),
                    }
                }
                match failed {
                    Some((s, b)) => status_error(out, s, b),
                    None => resp::integer(out, total),
                }
            }
            Item::MGet { first, count } => {
                resp::array(out, count);
                for op in first..first + count {
                    match d.reply(op) {
                        (Status::Ok, v) => resp::bulk(out, v),
                        _ => resp::null_bulk(out),
                    }
                }
            }
            Item::MSet { first, count } => {
                match (first..first + count).map(|op| d.reply(op)).find(|(s, _)| *s != Status::Ok) {
                    Some((s, b)) => status_error(out, s, b),
                    None => resp::simple(out, "OK"),
                }
            }
            Item::VGet(op) => match d.reply(op) {
                (Status::Ok, bytes) => match encoding::decode(bytes) {
                    Ok(set) => {
                        let live: Vec<_> = set.values().filter(|s| !s.tombstone).collect();
                        resp::array(out, 1 + live.len());
                        resp::bulk(out, hex(&set.join().encode()).as_bytes());
                        for s in live {
                            resp::bulk(out, &s.value);
                        }
                    }
                    Err(e) => resp::error(out, &format!("ERR {e}")),
                },
                (Status::NotFound, context) => {
                    let context = Context::decode(context).unwrap_or_default();
                    resp::array(out, 1);
                    resp::bulk(out, hex(&context.encode()).as_bytes());
                }
                (s, b) => status_error(out, s, b),
            },
            Item::VSet(op) => match d.reply(op) {
                (Status::Ok, context) => resp::bulk(out, hex(context).as_bytes()),
                (s, b) => status_error(out, s, b),
            },
        }
    }
}

pub async fn serve_redis(shard: Rc<Shard>, mut stream: TcpStream) {
    let limits = Limits {
        arguments_max: 1 + 2 * 100_000,
        bulk_bytes_max: shard.config.node.value_bytes_max.max(shard.config.storage.key_bytes_max),
    };
    let _serving = shard.balancer.serving();
    let mut input = ReadBuffer::new();
    let mut out = Vec::with_capacity(64 << 10);
    let mut args = Vec::new();
    let mut turn = Turn { dispatch: Dispatch::default(), items: Vec::new(), immediate: Vec::new(), quit: false };
    loop {
        let mut fatal: Option<RespError> = None;
        loop {
            let data = input.data();
            match resp::parse_command(data, limits, &mut args) {
                Ok(Some(used)) => {
                    if !args.is_empty() {
                        admit(&shard, &mut turn, data, &args);
                    }
                    input.consume(used);
                    if turn.quit {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(e);
                    break;
                }
            }
        }
        let operations = turn.dispatch.len();
        if operations > 0 {
            turn.dispatch.run(&shard).await;
        }
        write_replies(&turn, &mut out);
        if let Some(e) = &fatal {
            resp::error(&mut out, &format!("ERR {e}"));
        }
        turn.dispatch.clear();
        turn.items.clear();
        turn.immediate.clear();
        let answered = !out.is_empty();
        if answered && shard.outbox.write_all(&mut stream, &mut out).await.is_err() {
            return;
        }
        if fatal.is_some() || turn.quit {
            let _ = stream.close().await;
            return;
        }
        // Between turns with nothing read ahead, the connection holds no
        // state but its socket: it can move to another shard. Only after
        // a turn that answered something, so that a connection serves at
        // least one turn wherever it lands.
        if answered && input.data().is_empty() && !shard.stopping.get() {
            if let Some(target) = shard.redis_handoff_target(operations) {
                if crate::server::hand_over_redis_connection(&shard, &stream, target) {
                    return;
                }
            }
        }
        match input.fill(&mut stream, &shard, 4096).await {
            ReadOutcome::Data => {}
            _ => return,
        }
    }
}
