//! The dead-letter queue's Redis sink against a real `redis-server` (installed by
//! `scripts/setup.sh`), through the real `aviary` binary: failed requests arrive in the
//! stream as fields any consumer can read, the stream stays bounded, and a Redis that
//! is down or hung costs the request path nothing: its letters are kept on disk,
//! counted as not sent, and Redis gets later letters again once it is back.

mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aviary::pb::inference::ModelInferRequest;
use prost::Message;
use redis::{
    Commands,
    streams::{StreamId, StreamRangeReply},
};
use serde_json::Value;
use support::{redis_server::*, *};
use tonic::Code;

/// The stream the tests' gateways write to.
const STREAM: &str = "test:dead-letters";

/// Every entry of [`STREAM`], oldest first.
fn stream_entries(redis: &RedisServer) -> Vec<StreamId> {
    let reply: StreamRangeReply = redis
        .connection()
        .xrange_all(STREAM)
        .expect("XRANGE of the stream");
    reply.ids
}

/// The demo deployment with version 2 failing every request, dead letters on, kept in
/// `{dir}/dead`, and the Redis sink at `url` keeping about `max_len` entries.
fn config(url: &str, max_len: u64) -> String {
    let failing = demo_config().replace(
        "{ version = \"2\", weight = 10 }",
        "{ version = \"2\", weight = 10, fault = { error_rate = 1.0 } }",
    );
    // The breaker stays closed: every request fails as injected, not fast.
    format!(
        "{failing}dead_letters = true\n\n[routes.demo.limits]\nbreaker_failures = 100000\n\n\
         [dead_letters]\nfolder = \"{{dir}}/dead\"\n\
         redis = {{ url = \"{url}\", stream = \"{STREAM}\", max_len = {max_len} }}\n"
    )
}

/// A demo request pinned to `version`, told apart by its id.
fn request(version: &str, n: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_version: version.into(),
        id: format!("r{n}"),
        ..demo_request()
    }
}

/// Sends `request` through `addr`; its status code (OK for an answer) and how long
/// the answer took.
fn send(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    request: ModelInferRequest,
) -> (Code, Duration) {
    runtime.block_on(async {
        let mut client = client(connect(addr).await);
        let started = Instant::now();
        // Hang protection only: every call here must end by itself.
        match tokio::time::timeout(COMMAND_DEADLINE, client.model_infer(request)).await {
            Ok(Ok(_)) => (Code::Ok, started.elapsed()),
            Ok(Err(status)) => (status.code(), started.elapsed()),
            Err(_) => panic!("a call hung"),
        }
    })
}

/// A field of a stream entry, as bytes.
fn field(entry: &StreamId, name: &str) -> Vec<u8> {
    entry
        .get::<Vec<u8>>(name)
        .unwrap_or_else(|| panic!("entry {} has no field {name}: {entry:?}", entry.id))
}

fn text(entry: &StreamId, name: &str) -> String {
    String::from_utf8(field(entry, name)).expect("a text field")
}

fn listed(served: &Served) -> Value {
    served.ctl(&["dlq", "list", "--json"]).json()
}

fn kept(served: &Served) -> usize {
    listed(served)["letters"].as_array().map_or(0, Vec::len)
}

fn dropped_redis(served: &Served) -> u64 {
    listed(served)["dropped_redis"].as_u64().unwrap_or(0)
}

#[test]
fn failed_requests_reach_the_redis_stream_as_readable_fields() {
    let redis = RedisServer::start(None);
    let served = Served::start(&config(&redis.url, 10), &[]);
    let runtime = runtime();
    let sent: Vec<ModelInferRequest> = (0..3).map(|n| request("2", n)).collect();
    for request in &sent {
        assert_eq!(
            send(&runtime, &served.addr, request.clone()).0,
            Code::Internal
        );
    }
    assert_eq!(send(&runtime, &served.addr, request("1", 99)).0, Code::Ok);

    assert!(
        eventually(CONFIG_DEADLINE, || stream_entries(&redis).len() == 3),
        "the three failed requests reach the stream: {:?}",
        stream_entries(&redis)
    );
    // Redis may have them before the disk writer has synced them all.
    assert!(
        eventually(CONFIG_DEADLINE, || kept(&served) == 3),
        "the folder keeps them too: {:#}",
        listed(&served)
    );
    let entries = stream_entries(&redis);
    let on_disk = listed(&served);
    for (i, (entry, request)) in entries.iter().zip(&sent).enumerate() {
        assert_eq!(text(entry, "model"), "demo", "{entry:?}");
        assert_eq!(text(entry, "version"), "2", "{entry:?}");
        assert_eq!(text(entry, "code"), (Code::Internal as i32).to_string());
        assert!(text(entry, "error").contains("injected fault"), "{entry:?}");
        assert_eq!(
            text(entry, "id"),
            on_disk["letters"][i]["id"].to_string(),
            "the same id as `ctl dlq list`: {on_disk:#}"
        );
        let time_ms: u64 = text(entry, "time_ms").parse().expect("time_ms is a number");
        assert_eq!(Some(time_ms), on_disk["letters"][i]["at_ms"].as_u64());
        let decoded = ModelInferRequest::decode(field(entry, "request").as_slice())
            .expect("`request` is an encoded ModelInferRequest");
        assert_eq!(&decoded, request, "the request as the client sent it");
    }
    let list = served.ctl(&["dlq", "list"]).ok().stdout;
    assert!(
        list.contains(&format!("; 0 not sent to Redis stream {STREAM}")),
        "{list}"
    );

    // Bounded: with max_len 10 the stream keeps about the newest ten.
    for n in 3..40 {
        assert_eq!(
            send(&runtime, &served.addr, request("2", n)).0,
            Code::Internal
        );
    }
    let newest = |redis: &RedisServer| {
        stream_entries(redis)
            .last()
            .map(|e| ModelInferRequest::decode(field(e, "request").as_slice()))
            .and_then(Result::ok)
            .map(|r| r.id)
    };
    assert!(
        eventually(CONFIG_DEADLINE, || newest(&redis).as_deref() == Some("r39")),
        "the last letter arrives: {:?}",
        newest(&redis)
    );
    let length = stream_entries(&redis).len();
    assert!(
        (10..=20).contains(&length),
        "MAXLEN ~ 10 keeps the stream near ten entries: {length}"
    );
    assert_eq!(dropped_redis(&served), 0, "{:#}", listed(&served));
}

#[test]
fn a_redis_that_is_down_or_hung_costs_requests_nothing_and_gets_letters_again_once_back() {
    assert!(
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok(),
        "redis-server is not installed; run scripts/setup.sh (it installs Debian's redis-server package)"
    );
    // Nothing listens on the port yet.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let mut served = Served::start(&config(&url, 1000), &[]);
    let runtime = runtime();
    for n in 0..20 {
        let (code, took) = send(&runtime, &served.addr, request("2", n));
        assert_eq!(code, Code::Internal, "the client gets its usual answer");
        assert!(
            took < Duration::from_secs(1),
            "request {n} took {took:?}: the request path never waits for Redis"
        );
    }
    let (code, _) = send(&runtime, &served.addr, request("1", 99));
    assert_eq!(code, Code::Ok);
    assert!(
        eventually(CONFIG_DEADLINE, || kept(&served) == 20
            && dropped_redis(&served) == 20),
        "every letter is kept on disk and counted as not sent to Redis: {:#}",
        listed(&served)
    );
    let list = served.ctl(&["dlq", "list"]).ok().stdout;
    assert!(
        list.starts_with(&format!(
            "20 kept (0 dropped by the size cap, 0 while the writer was busy); 20 not sent to \
             Redis stream {STREAM}"
        )),
        "{list}"
    );

    // Redis comes up: later letters reach it (within the sink's retry pause).
    let redis = RedisServer::start(Some(port));
    let mut n = 100;
    let arrived = eventually(CONFIG_DEADLINE, || {
        n += 1;
        assert_eq!(
            send(&runtime, &served.addr, request("2", n)).0,
            Code::Internal
        );
        !stream_entries(&redis).is_empty()
    });
    assert!(
        arrived,
        "letters reach Redis once it is up: {:#}",
        listed(&served)
    );
    let first = ModelInferRequest::decode(field(&stream_entries(&redis)[0], "request").as_slice())
        .expect("a request");
    assert!(first.id.starts_with('r'), "{first:?}");

    // Lost while connected (a restart, a failover): the same again.
    drop(redis);
    let before = dropped_redis(&served);
    let lost = eventually(CONFIG_DEADLINE, || {
        n += 1;
        assert_eq!(
            send(&runtime, &served.addr, request("2", n)).0,
            Code::Internal
        );
        dropped_redis(&served) > before
    });
    assert!(
        lost,
        "letters are counted once Redis is gone: {:#}",
        listed(&served)
    );
    let redis = RedisServer::start(Some(port));
    let arrived = eventually(CONFIG_DEADLINE, || {
        n += 1;
        assert_eq!(
            send(&runtime, &served.addr, request("2", n)).0,
            Code::Internal
        );
        !stream_entries(&redis).is_empty()
    });
    assert!(
        arrived,
        "and reach it again once it is back: {:#}",
        listed(&served)
    );

    // Hung (it takes connections, answers nothing): requests still do not wait, and
    // the letters it does not take in time are counted.
    redis.signal("-STOP");
    let before = dropped_redis(&served);
    for _ in 0..10 {
        n += 1;
        let (code, took) = send(&runtime, &served.addr, request("2", n));
        assert_eq!(code, Code::Internal);
        assert!(took < Duration::from_secs(1), "{took:?} with Redis hung");
    }
    assert!(
        eventually(CONFIG_DEADLINE, || dropped_redis(&served) >= before + 10),
        "letters for a hung Redis are counted: {:#}",
        listed(&served)
    );
    redis.signal("-CONT");

    // One warning each time Redis went away, not one per letter.
    sigterm(&served.server);
    served.server.wait_exit(Duration::from_secs(30));
    let stderr = served.server.take_stderr();
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("cannot add a dead letter to Redis"))
        .count();
    assert_eq!(warnings, 3, "{stderr}");
    assert!(
        stderr.contains("Redis takes dead letters again"),
        "its return is logged: {stderr}"
    );
}
