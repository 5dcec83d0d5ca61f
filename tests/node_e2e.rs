//! End to end on real nodes (one process each, on its own 127.0.0.x):
//! versions through the client, the CLI and the Redis port; startup
//! failures; graceful stop; identity.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{block_on, cli, redis_cli, scratch, Node};

#[test]
fn client_puts_gets_deletes_with_siblings_and_contexts() {
    let dir = scratch("e2e-client-");
    let node = Node::start(&dir.path().join("data"), "127.0.0.11", &["--shards", "2"]);
    let c = node.client();
    assert_eq!(c.node().shard_count, 2);
    block_on(async {
        assert_eq!(c.get(b"k").await.unwrap(), None);
        // Two blind writes through one node: both survive as siblings.
        c.put(b"k", b"one", None).await.unwrap();
        c.put(b"k", b"two", None).await.unwrap();
        let read = c.get(b"k").await.unwrap().unwrap();
        let siblings: BTreeSet<_> = read.siblings.iter().cloned().collect();
        assert_eq!(siblings, [b"one".to_vec(), b"two".to_vec()].into());
        // A write with that context supersedes exactly what was read.
        c.put(b"k", b"other", None).await.unwrap(); // concurrent with the next one
        c.put(b"k", b"resolved", Some(&read.context)).await.unwrap();
        let after = c.get(b"k").await.unwrap().unwrap();
        let siblings: BTreeSet<_> = after.siblings.iter().cloned().collect();
        assert_eq!(siblings, [b"other".to_vec(), b"resolved".to_vec()].into());
        // Delete with a context covering everything: not found.
        c.delete(b"k", &after.context).await.unwrap();
        assert_eq!(c.get(b"k").await.unwrap(), None);
        // Writing with the not-found context supersedes the tombstone.
        let context = c.context(b"k").await.unwrap();
        c.put(b"k", b"reborn", Some(&context)).await.unwrap();
        assert_eq!(c.get(b"k").await.unwrap().unwrap().siblings, vec![b"reborn".to_vec()]);
        // Many keys across both shards.
        for i in 0..200u32 {
            c.put(format!("key-{i}").as_bytes(), format!("value-{i}").as_bytes(), None).await.unwrap();
        }
        for i in 0..200u32 {
            let v = c.get(format!("key-{i}").as_bytes()).await.unwrap().unwrap();
            assert_eq!(v.siblings, vec![format!("value-{i}").into_bytes()]);
        }
    });
}

/// riak_test's pattern through a real node: two clients interleave
/// read-resolve-write on one key for 100 rounds.
#[test]
fn interleaved_read_resolve_write_keeps_at_most_two_siblings_and_every_write() {
    let dir = scratch("e2e-interleave-");
    let node = Node::start(&dir.path().join("data"), "127.0.0.12", &["--shards", "2"]);
    let clients = [node.client(), node.client()];
    let decode = |v: &[u8]| -> BTreeSet<String> {
        String::from_utf8(v.to_vec()).unwrap().split(',').filter(|s| !s.is_empty()).map(String::from).collect()
    };
    let mut written = BTreeSet::new();
    block_on(async {
        for round in 0..100 {
            let mut reads = Vec::new();
            for c in &clients {
                reads.push(c.get(b"shared").await.unwrap());
            }
            for (i, (c, read)) in clients.iter().zip(reads).enumerate() {
                let mut items: BTreeSet<String> =
                    read.as_ref().map(|r| r.siblings.iter().flat_map(|s| decode(s)).collect()).unwrap_or_default();
                let item = format!("c{i}r{round}");
                written.insert(item.clone());
                items.insert(item);
                let value = items.into_iter().collect::<Vec<_>>().join(",");
                c.put(b"shared", value.as_bytes(), read.as_ref().map(|r| r.context.as_slice())).await.unwrap();
                let now = c.get(b"shared").await.unwrap().unwrap();
                assert!(now.siblings.len() <= 2, "sibling explosion at round {round}: {}", now.siblings.len());
            }
        }
        let last = clients[0].get(b"shared").await.unwrap().unwrap();
        let held: BTreeSet<String> = last.siblings.iter().flat_map(|s| decode(s)).collect();
        assert_eq!(held, written, "a write was lost");
    });
}

#[test]
fn the_cli_puts_gets_and_deletes() {
    let dir = scratch("e2e-cli-");
    let node = Node::start(&dir.path().join("data"), "127.0.0.13", &["--shards", "2"]);
    let addr = node.client_address().to_string();
    let (ok, out, err) = cli(&["put", "greeting", "hello", "--node", &addr]);
    assert!(ok, "{err}");
    assert!(out.contains("ok"));
    let (ok, out, _) = cli(&["put", "greeting", "hi", "--node", &addr]);
    assert!(ok);
    let (ok, out2, _) = cli(&["get", "greeting", "--node", &addr]);
    assert!(ok);
    assert!(out2.contains("siblings: 2") && out2.contains("hello") && out2.contains("hi"), "{out2}");
    let context = out2.lines().find_map(|l| l.strip_prefix("context: ")).unwrap().to_string();
    let (ok, _, err) = cli(&["put", "greeting", "resolved", "--context", &context, "--node", &addr]);
    assert!(ok, "{err}");
    let (_, out3, _) = cli(&["get", "greeting", "--node", &addr]);
    assert!(out3.contains("siblings: 1") && out3.contains("resolved"), "{out3}");
    let context = out3.lines().find_map(|l| l.strip_prefix("context: ")).unwrap().to_string();
    let (ok, _, err) = cli(&["del", "greeting", "--context", &context, "--node", &addr]);
    assert!(ok, "{err}");
    let (_, out4, _) = cli(&["get", "greeting", "--node", &addr]);
    assert!(out4.starts_with("not found"), "{out4}");
    let (ok, status, err) = cli(&["admin", "status", "--node", &addr]);
    assert!(ok, "{err}");
    assert!(status.contains("shards: 2") && status.contains("shard 1:"), "{status}");
    for shard in 0..2 {
        for part in ["reads", "disk", "network"] {
            assert!(status.contains(&format!("shard {shard} {part}: ")), "{status}");
        }
    }
    let puts: u64 =
        status.lines().filter_map(|l| l.split(" puts ").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum();
    assert_eq!(puts, 4, "the three puts and the delete above, counted across both shards: {status}");
    let _ = out;
    // Output into a closed pipe (`ringkv admin status | head -1`) ends the
    // command quietly, as SIGPIPE ends other tools, not in a panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let piped = std::process::Command::new(support::BIN)
        .args(["admin", "status", "--node", &addr])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(piped.status.signal(), Some(libc::SIGPIPE), "{:?} {stderr}", piped.status);
    // Errors are clear and non-zero.
    let (ok, _, err) = cli(&["put", "k", "v", "--context", "zz", "--node", &addr]);
    assert!(!ok && err.contains("hex"), "{err}");
    let (ok, _, err) = cli(&["get", "k", "--node", "127.0.0.13:1"]);
    assert!(!ok && err.contains("is a node running"), "{err}");
}

#[test]
fn the_redis_port_works_with_redis_cli() {
    let dir = scratch("e2e-redis-");
    let node = Node::start(&dir.path().join("data"), "127.0.0.14", &["--shards", "2"]);
    let r = std::net::SocketAddr::new(node.ip, node.redis_port);
    assert_eq!(redis_cli(r, &["PING"]).trim(), "PONG");
    assert_eq!(redis_cli(r, &["SET", "foo", "bar"]).trim(), "OK");
    assert_eq!(redis_cli(r, &["GET", "foo"]).trim(), "bar");
    // Plain SET overwrites: no siblings through the Redis port.
    assert_eq!(redis_cli(r, &["SET", "foo", "baz"]).trim(), "OK");
    assert_eq!(redis_cli(r, &["GET", "foo"]).trim(), "baz");
    assert_eq!(redis_cli(r, &["MSET", "a", "1", "b", "2"]).trim(), "OK");
    assert_eq!(redis_cli(r, &["MGET", "a", "b", "nope"]), "1\n2\n\n");
    assert_eq!(redis_cli(r, &["EXISTS", "a", "nope", "b"]).trim(), "2");
    assert_eq!(redis_cli(r, &["DEL", "a", "nope"]).trim(), "1");
    assert_eq!(redis_cli(r, &["GET", "a"]).trim(), "");
    assert_eq!(redis_cli(r, &["ECHO", "hi"]).trim(), "hi");
    assert!(redis_cli(r, &["INFO"]).contains("ringkv_shards:2"));
    assert!(redis_cli(r, &["FLUSHALL"]).contains("ERR unknown command"));
    // Siblings made through the native protocol are visible with VGET, and
    // VSET with the context resolves them.
    let c = node.client();
    block_on(async {
        c.put(b"shared", b"x", None).await.unwrap();
        c.put(b"shared", b"y", None).await.unwrap();
    });
    let vget = redis_cli(r, &["VGET", "shared"]);
    let mut lines = vget.lines();
    let context = lines.next().unwrap().to_string();
    let siblings: BTreeSet<&str> = lines.collect();
    assert_eq!(siblings, ["x", "y"].into());
    // GET shows the sibling written last.
    assert_eq!(redis_cli(r, &["GET", "shared"]).trim(), "y");
    redis_cli(r, &["VSET", "shared", &context, "merged"]);
    assert_eq!(block_on(c.get(b"shared")).unwrap().unwrap().siblings, vec![b"merged".to_vec()]);
    // Pipelined commands across both shards answer in order.
    let mut input = String::new();
    for i in 0..100 {
        input.push_str(&format!("SET p{i} v{i}\nGET p{i}\n"));
    }
    let out = std::process::Command::new("redis-cli")
        .args(["-h", &r.ip().to_string(), "-p", &r.port().to_string(), "--pipe"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("errors: 0, replies: 200"), "{text}");
    for i in (0..100).step_by(17) {
        assert_eq!(redis_cli(r, &["GET", &format!("p{i}")]).trim(), format!("v{i}"));
    }
}

#[test]
fn sigterm_drains_syncs_and_exits_zero_and_identity_persists() {
    let dir = scratch("e2e-stop-");
    let data = dir.path().join("data");
    let mut node = Node::start(&data, "127.0.0.15", &["--shards", "2"]);
    let c = node.client();
    let actor = c.node().actor;
    block_on(async {
        for i in 0..500u32 {
            c.put(format!("k{i}").as_bytes(), b"v", None).await.unwrap();
        }
    });
    let status = node.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}\n{}", node.log());
    assert!(node.log().contains("stopped cleanly"));
    let node = Node::start(&data, "127.0.0.15", &["--shards", "2"]);
    let c = node.client();
    assert_eq!(c.node().actor, actor, "the actor id must survive restarts");
    block_on(async {
        for i in 0..500u32 {
            assert!(c.get(format!("k{i}").as_bytes()).await.unwrap().is_some());
        }
    });
    drop(node);
    // A wiped data directory is a new incarnation: a new actor.
    std::fs::remove_dir_all(&data).unwrap();
    let node = Node::start(&data, "127.0.0.15", &["--shards", "2"]);
    assert_ne!(node.client().node().actor, actor);
}

#[test]
fn startup_fails_loudly_on_a_locked_directory_a_taken_port_and_too_little_locked_memory() {
    let dir = scratch("e2e-startup-");
    let data = dir.path().join("data");
    let _first = Node::start(&data, "127.0.0.16", &["--shards", "1"]);
    // Same directory, other ports: refused, naming the directory.
    let mut second = Node::spawn(&data, "127.0.0.17", &["--shards", "1"]);
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(second.log().contains("in use by another process"), "{}", second.log());
    // A port already taken (by a listener without SO_REUSEPORT).
    let _holder = std::net::TcpListener::bind("127.0.0.18:7700").unwrap();
    let mut third = Node::spawn(&dir.path().join("other"), "127.0.0.18", &["--shards", "1"]);
    let status = third.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(third.log().contains("127.0.0.18:7700 is in use"), "{}", third.log());
    // Executors cannot start without enough locked memory.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -l 64 && exec {} serve --data-dir {} --listen 127.0.0.19 --shards 1",
            support::BIN,
            dir.path().join("third").display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("could not start") && stderr.contains("ulimit -l"), "{stderr}");
}

/// A shard that panics brings the whole node down (non-zero exit, clear
/// message) instead of leaving it half-alive.
#[test]
fn a_panicking_shard_stops_the_node_with_a_non_zero_exit() {
    let dir = scratch("e2e-panic-");
    let mut node = Node::spawn_with_env(
        &dir.path().join("data"),
        "127.0.0.20",
        &["--shards", "2"],
        &[("RINGKV_FAULT_PANIC_KEY", "boom")],
    );
    node.wait_serving(Duration::from_secs(60));
    let c = node.client();
    block_on(async {
        c.put(b"before", b"fine", None).await.unwrap();
        // The shard owning "boom" panics on this read; the reply never comes.
        assert!(c.get(b"boom").await.is_err());
    });
    let status = node.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "exit {status:?}");
    assert!(node.log().contains("stopped unexpectedly (it panicked)"), "{}", node.log());
}

/// The client works from a plain tokio program, and a request that gets no
/// reply in time reports an unknown outcome (never a failure).
#[test]
fn the_client_runs_under_tokio_and_reports_timeouts_as_unknown_outcomes() {
    let dir = scratch("e2e-tokio-");
    let node = Node::start(&dir.path().join("data"), "127.0.0.22", &["--shards", "2"]);
    let address = node.client_address();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        use ringkv::client::{Client, ClientError, ClientOptions};
        let patient = ClientOptions { timeout: Duration::from_secs(30), ..Default::default() };
        let c = Client::connect(address, patient).unwrap();
        c.put(b"from-tokio", b"works", None).await.unwrap();
        let got = c.get(b"from-tokio").await.unwrap().unwrap();
        assert_eq!(got.siblings, vec![b"works".to_vec()]);
        // A client whose requests time out quickly. On a loaded machine even
        // its connect (a status request) or a request to a running node can
        // time out, so those are retried until a deadline; only the request
        // to the frozen node is asserted on.
        let impatient = ClientOptions { timeout: Duration::from_millis(200), ..Default::default() };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let quick = loop {
            match Client::connect(address, impatient.clone()) {
                Ok(client) => break client,
                Err(ClientError::UnknownOutcome { .. }) if std::time::Instant::now() < deadline => {}
                Err(e) => panic!("connect: {e:?}"),
            }
        };
        // Freeze the node: the write may or may not happen, and the client
        // must say exactly that.
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(node.pid(), libc::SIGSTOP) };
        let result = quick.put(b"frozen", b"maybe", None).await;
        unsafe { libc::kill(node.pid(), libc::SIGCONT) };
        match result {
            Err(ClientError::UnknownOutcome { .. }) => {}
            other => panic!("expected an unknown outcome, got {other:?}"),
        }
        // Once the node runs again, the same client serves again, on the
        // connection that timed out (the key's shard) as well.
        loop {
            match quick.get(b"frozen").await {
                Ok(_) => break,
                Err(ClientError::UnknownOutcome { .. }) if std::time::Instant::now() < deadline => {}
                Err(e) => panic!("after the freeze: {e:?}"),
            }
        }
    });
}

/// Concurrent writers on one hot key (group mode, where writes to a key
/// coalesce into one commit batch): every acknowledged overwrite takes its
/// own dot (the key's counter equals the writes acknowledged: no two writes
/// built on the same base), and concurrent blind puts all survive as
/// siblings.
#[test]
fn concurrent_writes_to_one_key_never_reuse_a_dot() {
    let dir = scratch("e2e-hot-");
    let node = Node::start(&dir.path().join("data"), "127.0.0.23", &["--shards", "2"]);
    let writers = 8;
    let per_writer = 50;
    std::thread::scope(|scope| {
        for w in 0..writers {
            let c = node.client();
            scope.spawn(move || {
                block_on(async {
                    // Many in flight per client: all of them queue on the key.
                    let writes = (0..per_writer).map(|i| {
                        let c = c.clone();
                        async move { c.overwrite(b"hot", format!("w{w}-{i}").as_bytes()).await.unwrap() }
                    });
                    futures::future::join_all(writes).await;
                });
            });
        }
    });
    let c = node.client();
    let got = block_on(c.get(b"hot")).unwrap().unwrap();
    assert_eq!(got.siblings.len(), 1, "overwrites leave one value");
    let context = ringkv::logic::dvv::Context::decode(&got.context).unwrap();
    assert_eq!(context.0.len(), 1);
    assert_eq!(context.0[0].1, (writers * per_writer) as u64, "one dot per acknowledged overwrite");
    // Blind puts, all concurrent: every one is a sibling.
    let values: Vec<String> = (0..16).map(|i| format!("blind-{i}")).collect();
    block_on(futures::future::join_all(values.iter().map(|v| c.put(b"siblings", v.as_bytes(), None))))
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    let got = block_on(c.get(b"siblings")).unwrap().unwrap();
    let held: BTreeSet<String> = got.siblings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    assert_eq!(held, values.into_iter().collect());
}

/// One pipelined send mixing reads, writes and batches of both (group
/// mode, where reads are answered before the writes' fdatasync): every
/// request gets exactly one reply, matched by request id, with the right
/// opcode and status; the writes are then readable.
#[test]
fn a_pipeline_mixing_reads_and_writes_gets_every_reply_by_request_id() {
    use ringkv::protocol::frame::{self, Opcode, Status};
    use ringkv::protocol::messages::{batch, encode_request, Request};
    use std::collections::BTreeMap;
    use std::io::{Read, Write};

    let dir = scratch("e2e-lanes-");
    let node = Node::start(&dir.path().join("data"), "127.0.0.24", &["--shards", "2", "--sync", "group"]);
    let c = node.client();
    block_on(async {
        for i in 0..20u32 {
            c.put(format!("old-{i}").as_bytes(), format!("old-value-{i}").as_bytes(), None).await.unwrap();
        }
    });
    let body = |request: &Request<'_>| {
        let mut b = Vec::new();
        encode_request(&mut b, request);
        b
    };
    // Per request id: the reply's opcode, status and (batch) sub-replies.
    type Reply = (u8, Status, Vec<(u8, Status)>);
    let mut expected: BTreeMap<u64, Reply> = BTreeMap::new();
    let mut wire = Vec::new();
    let mut id = 0u64;
    for round in 0..20u32 {
        let (old, new, missing) = (format!("old-{round}"), format!("new-{round}"), format!("missing-{round}"));
        let value = format!("new-value-{round}");
        let mut push = |opcode: Opcode, b: Vec<u8>, status: Status, subs: Vec<(u8, Status)>| {
            id += 1;
            frame::encode(&mut wire, opcode as u8, 0, 0, id, &b);
            expected.insert(id, (opcode as u8, status, subs));
        };
        let overwrite = body(&Request::Overwrite { key: new.as_bytes(), value: value.as_bytes() });
        push(Opcode::Overwrite, overwrite.clone(), Status::Ok, vec![]);
        push(Opcode::Get, body(&Request::Get { key: old.as_bytes() }), Status::Ok, vec![]);
        push(Opcode::Get, body(&Request::Get { key: missing.as_bytes() }), Status::NotFound, vec![]);
        let mut reads = Vec::new();
        batch::push_request(&mut reads, Opcode::Get as u8, &body(&Request::Get { key: old.as_bytes() }));
        batch::push_request(&mut reads, Opcode::Get as u8, &body(&Request::Get { key: missing.as_bytes() }));
        let read_subs = vec![(Opcode::Get as u8, Status::Ok), (Opcode::Get as u8, Status::NotFound)];
        push(Opcode::Batch, reads, Status::Ok, read_subs);
        let mut mixed = Vec::new();
        let other = format!("batch-{round}");
        let put = body(&Request::Put { key: other.as_bytes(), context: &[], value: b"from-a-batch" });
        batch::push_request(&mut mixed, Opcode::Put as u8, &put);
        batch::push_request(&mut mixed, Opcode::Get as u8, &body(&Request::Get { key: old.as_bytes() }));
        let mixed_subs = vec![(Opcode::Put as u8, Status::Ok), (Opcode::Get as u8, Status::Ok)];
        push(Opcode::Batch, mixed, Status::Ok, mixed_subs);
        push(Opcode::Ping, Vec::new(), Status::Ok, vec![]);
    }
    let mut stream = std::net::TcpStream::connect(node.client_address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(&wire).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut seen = BTreeMap::new();
    while seen.len() < expected.len() {
        let n = stream.read(&mut chunk).expect("a reply before the deadline");
        assert!(n > 0, "the node closed the connection after {} replies", seen.len());
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some((h, body, used)) = frame::decode(&buf[at..], 64 << 20).unwrap() {
            let subs: Vec<(u8, Status)> = if h.opcode == Opcode::Batch as u8 {
                batch::responses(body).map(|r| r.unwrap()).map(|(o, s, _)| (o, Status::from_u8(s).unwrap())).collect()
            } else {
                vec![]
            };
            let previous = seen.insert(h.request_id, (h.opcode, Status::from_u8(h.status).unwrap(), subs));
            assert!(previous.is_none(), "two replies to request {}", h.request_id);
            at += used;
        }
        buf.drain(..at);
    }
    assert_eq!(seen, expected);
    block_on(async {
        for round in 0..20u32 {
            let v = c.get(format!("new-{round}").as_bytes()).await.unwrap().unwrap();
            assert_eq!(v.siblings, vec![format!("new-value-{round}").into_bytes()]);
            let v = c.get(format!("batch-{round}").as_bytes()).await.unwrap().unwrap();
            assert_eq!(v.siblings, vec![b"from-a-batch".to_vec()]);
        }
    });
}

/// Redis clients expect pipelined commands to take effect one after another:
/// a GET after a SET of the same key in one pipeline sees it, in `group`
/// mode too (where a write is visible only once durable). Pipelines of
/// random commands over a few hot keys, each sent in one write or (every
/// other one) cut into random pieces, so commands arrive split across
/// reads; every reply must equal what sequential execution against a
/// model gives. `RINGKV_PIPELINE_SEEDS` (default 4) pipelines per mode.
#[test]
fn a_redis_pipeline_behaves_as_if_its_commands_ran_one_after_another() {
    let seeds: u64 = std::env::var("RINGKV_PIPELINE_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    for sync in ["group", "none"] {
        let dir = scratch("e2e-pipeline-");
        let node = Node::start(&dir.path().join("data"), "127.0.0.25", &["--shards", "2", "--sync", sync]);
        for seed in 0..seeds {
            run_random_pipeline(&node, sync, seed);
        }
    }
}

/// A Redis connection moved to another shard (see `balance`) keeps its
/// replies whole and in order. Fault injection (debug builds) moves every
/// idle Redis connection to the next shard after each turn, so the random
/// pipelines of the test above (`RINGKV_PIPELINE_SEEDS` of them per mode)
/// cross shards hundreds of times.
#[test]
fn a_redis_connection_moved_between_shards_after_every_turn_answers_as_if_it_never_moved() {
    use std::io::{Read, Write};
    let seeds: u64 = std::env::var("RINGKV_PIPELINE_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    for sync in ["group", "none"] {
        let dir = scratch("e2e-handoff-");
        let mut node = Node::spawn_with_env(
            &dir.path().join("data"),
            "127.0.0.28",
            &["--shards", "2", "--sync", sync],
            &[("RINGKV_FAULT_HANDOFF_EVERY_TURN", "1")],
        );
        node.wait_serving(Duration::from_secs(60));
        for seed in 0..seeds {
            run_random_pipeline(&node, sync, seed);
        }
        // One request at a time: each is a turn of its own (the node cannot
        // read ahead of a client waiting for the reply), so the connection
        // changes shards after every one.
        let mut stream = std::net::TcpStream::connect(std::net::SocketAddr::new(node.ip, node.redis_port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        for round in 0..50 {
            let (key, value) = (format!("moving-{}", round % 7), format!("value-{round}"));
            let request = format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n",
                key.len(),
                value.len(),
                key.len()
            );
            stream.write_all(request.as_bytes()).unwrap();
            let expected = format!("+OK\r\n${}\r\n{value}\r\n", value.len());
            let mut got = vec![0; expected.len()];
            stream.read_exact(&mut got).unwrap();
            assert_eq!(String::from_utf8_lossy(&got), expected, "sync {sync}, round {round}");
        }
        // Each shard handed the connection over (at least after every
        // other round), and every hand-over arrived. The last one may still
        // be on its way when the last reply is read: wait for it.
        let counts = |status: &str, what: &str| -> Vec<u64> {
            status
                .split(what)
                .skip(1)
                .map(|rest| rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap())
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, status, err) = cli(&["admin", "status", "--node", &node.client_address().to_string()]);
            assert!(ok, "{err}");
            let (handed, taken) = (counts(&status, "handed to other shards"), counts(&status, "taken from them"));
            assert_eq!(handed.len(), 2, "{status}");
            assert!(handed.iter().all(|&n| n >= 25), "every shard handed the connection over: {status}");
            if handed.iter().sum::<u64>() == taken.iter().sum::<u64>() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "a hand-over never arrived: {status}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One pipeline of `a_redis_pipeline_behaves_as_if_its_commands_ran_one_after_another`.
fn run_random_pipeline(node: &Node, sync: &str, seed: u64) {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    let mut model: HashMap<String, String> = HashMap::new();
    let mut request = Vec::new();
    let mut expected = Vec::new();
    let command = |out: &mut Vec<u8>, args: &[&str]| {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    };
    let bulk = |out: &mut Vec<u8>, v: Option<&String>| match v {
        Some(v) => out.extend_from_slice(format!("${}\r\n{v}\r\n", v.len()).as_bytes()),
        None => out.extend_from_slice(b"$-1\r\n"),
    };
    let mut state = 0x9e37_79b9_u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut next = |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    for i in 0..2000 {
        let key = format!("s{seed}-hot{}", next(6));
        match next(10) {
            0..=3 => {
                let value = format!("v{i}");
                command(&mut request, &["SET", &key, &value]);
                expected.extend_from_slice(b"+OK\r\n");
                model.insert(key, value);
            }
            4..=6 => {
                command(&mut request, &["GET", &key]);
                bulk(&mut expected, model.get(&key));
            }
            7 => {
                command(&mut request, &["DEL", &key]);
                let deleted = model.remove(&key).is_some();
                expected.extend_from_slice(format!(":{}\r\n", u8::from(deleted)).as_bytes());
            }
            8 => {
                command(&mut request, &["EXISTS", &key]);
                expected.extend_from_slice(format!(":{}\r\n", u8::from(model.contains_key(&key))).as_bytes());
            }
            _ => {
                let other = format!("s{seed}-hot{}", next(6));
                command(&mut request, &["MGET", &key, &other]);
                expected.extend_from_slice(b"*2\r\n");
                bulk(&mut expected, model.get(&key));
                bulk(&mut expected, model.get(&other));
            }
        }
    }
    let r = std::net::SocketAddr::new(node.ip, node.redis_port);
    let mut stream = std::net::TcpStream::connect(r).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.set_nodelay(true).unwrap();
    if seed.is_multiple_of(2) {
        stream.write_all(&request).unwrap();
    } else {
        // Pieces of 1 to 300 bytes: commands and their arguments
        // arrive cut at every kind of place. The replies are read only
        // after the last piece; the kernel buffers hold them.
        let mut at = 0;
        while at < request.len() {
            let piece = (1 + next(300) as usize).min(request.len() - at);
            stream.write_all(&request[at..at + piece]).unwrap();
            at += piece;
        }
    }
    let mut got = vec![0; expected.len()];
    stream.read_exact(&mut got).unwrap();
    if got != expected {
        let at = got.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(0);
        let from = at.saturating_sub(40);
        panic!(
            "sync {sync}, seed {seed}: replies differ at byte {at}: got {:?}, expected {:?}",
            String::from_utf8_lossy(&got[from..(at + 40).min(got.len())]),
            String::from_utf8_lossy(&expected[from..(at + 40).min(expected.len())])
        );
    }
}

/// A read sent on a connection while an earlier write on it waits for its
/// fdatasync is answered without waiting for that sync. The node's
/// commit-log syncs are held (fault injection, debug builds) until the test
/// has the read's reply, so the order is forced, not timed.
#[test]
fn a_read_is_not_held_behind_an_earlier_write_waiting_for_its_sync() {
    use ringkv::protocol::frame::{self, Opcode, Status};
    use ringkv::protocol::messages::{encode_request, Request};
    use std::io::{Read, Write};

    let dir = scratch("e2e-inflight-");
    let hold = dir.path().join("hold-sync");
    let reached = dir.path().join("hold-sync.reached");
    let mut node = Node::spawn_with_env(
        &dir.path().join("data"),
        "127.0.0.26",
        &["--shards", "1", "--sync", "group"],
        &[("RINGKV_FAULT_HOLD_SYNC", hold.to_str().unwrap())],
    );
    node.wait_serving(Duration::from_secs(60));
    block_on(node.client().put(b"present", b"before", None)).unwrap();
    std::fs::write(&hold, b"").unwrap();
    let mut stream = std::net::TcpStream::connect(node.client_address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let encode = |id: u64, opcode: Opcode, request: &Request<'_>| {
        let mut body = Vec::new();
        encode_request(&mut body, request);
        let mut wire = Vec::new();
        frame::encode(&mut wire, opcode as u8, 0, 0, id, &body);
        wire
    };
    stream.write_all(&encode(1, Opcode::Overwrite, &Request::Overwrite { key: b"written", value: b"v" })).unwrap();
    // The write's turn is now waiting for a held commit-log sync.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !reached.exists() {
        assert!(std::time::Instant::now() < deadline, "the write never reached its fdatasync");
        std::thread::yield_now();
    }
    stream.write_all(&encode(2, Opcode::Get, &Request::Get { key: b"present" })).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut next_reply = |stream: &mut std::net::TcpStream, buf: &mut Vec<u8>| loop {
        if let Some((h, _, used)) = frame::decode(buf, 1 << 20).unwrap() {
            buf.drain(..used);
            return (h.request_id, Status::from_u8(h.status).unwrap());
        }
        let n = stream.read(&mut chunk).expect("a reply before the deadline");
        assert!(n > 0, "the node closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert_eq!(next_reply(&mut stream, &mut buf), (2, Status::Ok), "the read waited for the write's sync");
    std::fs::remove_file(&hold).unwrap();
    assert_eq!(next_reply(&mut stream, &mut buf), (1, Status::Ok));
    let got = block_on(node.client().get(b"written")).unwrap().unwrap();
    assert_eq!(got.siblings, vec![b"v".to_vec()]);
}

/// `ringkv verify` on a stopped node's directory: intact after a clean stop;
/// refused (exit 2) while a node holds the directory; after one flipped
/// bit in a segment, exit 1 naming the file and the record's offset.
#[test]
fn verify_reports_an_intact_directory_and_names_a_damaged_record() {
    let dir = scratch("e2e-verify-");
    let data = dir.path().join("data");
    let data_arg = data.display().to_string();
    let mut node = Node::start(&data, "127.0.0.27", &["--shards", "2"]);
    let client = node.client();
    for i in 0..200 {
        block_on(client.put(format!("key-{i}").as_bytes(), format!("value-{i}").as_bytes(), None)).unwrap();
    }
    let (ok, _, err) = cli(&["verify", "--data-dir", &data_arg]);
    assert!(!ok && err.contains("in use by another process"), "a running node's directory was not refused: {err}");
    assert!(node.terminate(Duration::from_secs(30)).success(), "{}", node.log());

    let run = || {
        let out = std::process::Command::new(support::BIN).args(["verify", "--data-dir", &data_arg]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, report) = run();
    assert_eq!(code, Some(0), "{report}");
    let keys: u64 =
        report.lines().filter_map(|l| l.split_once(" keys;")?.0.rsplit(' ').next()?.parse::<u64>().ok()).sum();
    assert_eq!(keys, 200, "{report}");
    assert!(report.contains("verdict: intact"), "{report}");

    // One bit of the first record of one segment.
    let segment = std::fs::read_dir(data.join("partitions"))
        .unwrap()
        .flat_map(|p| std::fs::read_dir(p.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    let record_byte = 4096 + 40;
    bytes[record_byte] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();
    let (code, report) = run();
    assert_eq!(code, Some(1), "{report}");
    let name = segment.file_name().unwrap().to_string_lossy().into_owned();
    assert!(report.contains(&name) && report.contains("at offset 4096"), "{report}");
    assert!(report.contains("verdict: 1 damaged record;"), "{report}");
}
