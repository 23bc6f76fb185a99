//! Unit tests of the metrics endpoint: the request parser, the text
//! format, and snapshots shared by concurrent scrapers.

use super::http::{parse, Request, Verdict};
use super::{prom, Snapshots};
use crate::config::Config;
use crate::state::ServerState;
use crate::status::Status;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn a_request_head_is_judged_once_complete_and_within_its_bound() {
    let get = |r: &str| parse(r.as_bytes(), 8192, false);
    assert_eq!(
        get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
        Some(Verdict::Request(Request::Metrics))
    );
    assert_eq!(
        get("GET /metrics?x=1 HTTP/1.0\n\n"),
        Some(Verdict::Request(Request::Metrics))
    );
    assert_eq!(
        get("GET / HTTP/1.1\r\n\r\n"),
        Some(Verdict::Request(Request::Report))
    );
    assert_eq!(
        get("GET /x HTTP/1.1\r\n\r\n"),
        Some(Verdict::Request(Request::NotFound))
    );
    assert_eq!(
        get("POST /metrics HTTP/1.1\r\n\r\n"),
        Some(Verdict::Request(Request::NotGet))
    );
    assert_eq!(get("GET /metrics HTTP/1.1\r\nHost"), None, "incomplete");
    assert_eq!(get("hello\r\n\r\n"), Some(Verdict::Malformed));
    assert_eq!(
        parse(b"GET /metrics HTTP/1.1\r\nHo", 8192, true),
        Some(Verdict::Malformed)
    );
    assert_eq!(parse(b"", 8192, true), Some(Verdict::Closed));
    let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
    assert_eq!(parse(long.as_bytes(), 64, false), Some(Verdict::TooLarge));
    assert_eq!(parse(&[b'a'; 64], 64, false), Some(Verdict::TooLarge));
}

fn server() -> ServerState {
    ServerState::new(Config::default(), b"token".to_vec())
}

#[test]
fn every_family_has_help_and_type_and_label_values_are_escaped() {
    let text = prom::render(&Status::collect(&server()));
    let mut helped = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helped.contains(name), "TYPE before HELP: {line}");
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(helped.contains(name), "a sample without HELP: {line}");
        }
    }
    for name in ["saps_upgrades_total", "saps_connections_total", "saps_info"] {
        assert!(helped.contains(name), "{name} missing:\n{text}");
    }
    assert_eq!(prom::escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapers_share_one_snapshot_until_it_is_older_than_the_interval() {
    let server = Arc::new(server());
    let snaps = Arc::new(Snapshots::new(Duration::from_secs(3600)));
    let scrapes: Vec<_> = (0..8)
        .map(|_| {
            let (server, snaps) = (server.clone(), snaps.clone());
            tokio::spawn(async move { snaps.current(&server, Duration::from_secs(5)).await })
        })
        .collect();
    let mut got = Vec::new();
    for s in scrapes {
        got.push(s.await.unwrap());
    }
    assert!(got.iter().all(|s| Arc::ptr_eq(s, &got[0])), "one snapshot");
    let stale = Snapshots::new(Duration::ZERO);
    let a = stale.current(&server, Duration::from_secs(5)).await;
    let b = stale.current(&server, Duration::from_secs(5)).await;
    assert!(
        !Arc::ptr_eq(&a, &b),
        "--metrics-interval 0: a new one each time"
    );
}
