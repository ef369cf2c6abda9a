//! Valid handshakes in every spelling RFC 6455 and HTTP allow. Each must be answered 101 and
//! none may count against the client: a false positive here would ban real browsers.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::{sync::watch, task::JoinSet};
use wsguard_tests::lab::summary::SpellingsSummary;

use crate::{
    SpellingsArgs,
    attack::KEY,
    net::{Outcome, exchange, host_header, stopped},
};

/// A named spelling: the request as the segments it is sent in.
pub struct Spelling {
    pub name: &'static str,
    pub pieces: Vec<Vec<u8>>,
}

pub fn all(target: SocketAddr, path: &str) -> Vec<Spelling> {
    let host = host_header(target);
    let line = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
    let whole = |name, headers: &str| Spelling {
        name,
        pieces: vec![format!("{line}{headers}\r\n").into_bytes()],
    };
    let canonical = format!(
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
         Sec-WebSocket-Version: 13\r\n"
    );
    let full = format!("{line}{canonical}\r\n");
    let (a, b) = full.split_at(
        full.find("grade: websocket")
            .expect("canonical has Upgrade"),
    );
    vec![
        whole("canonical", &canonical),
        whole(
            "lower_case",
            &canonical
                .to_ascii_lowercase()
                .replace(&KEY.to_ascii_lowercase(), KEY),
        ),
        whole(
            "upper_case",
            &format!(
                "UPGRADE: WEBSOCKET\r\nCONNECTION: UPGRADE\r\nSEC-WEBSOCKET-KEY: {KEY}\r\n\
                 SEC-WEBSOCKET-VERSION: 13\r\n"
            ),
        ),
        whole(
            "mixed_case",
            &format!(
                "uPgRaDe: WebSocket\r\ncOnNeCtIoN: uPGrade\r\nsec-WebSocket-KEY: {KEY}\r\n\
                 SEC-websocket-Version: 13\r\n"
            ),
        ),
        whole(
            "keep_alive_upgrade",
            &canonical.replace("Connection: Upgrade", "Connection: keep-alive, Upgrade"),
        ),
        whole(
            "keep_alive_upgrade_no_space",
            &canonical.replace("Connection: Upgrade", "Connection: keep-alive,Upgrade"),
        ),
        whole(
            "extra_white_space",
            &format!(
                "Upgrade:    websocket   \r\nConnection:\tUpgrade \t\r\n\
                 Sec-WebSocket-Key:  {KEY}  \r\nSec-WebSocket-Version:\t13\r\n"
            ),
        ),
        whole(
            "no_space_after_colon",
            &format!(
                "Upgrade:websocket\r\nConnection:Upgrade\r\nSec-WebSocket-Key:{KEY}\r\n\
                 Sec-WebSocket-Version:13\r\n"
            ),
        ),
        whole(
            "browser_headers_first",
            &format!(
                "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0\r\n\
                 Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\n\
                 Accept-Encoding: gzip, deflate\r\nOrigin: http://{host}\r\n\
                 Sec-WebSocket-Extensions: permessage-deflate\r\nPragma: no-cache\r\n\
                 Cache-Control: no-cache\r\nCookie: session=0123456789abcdef\r\n{canonical}"
            ),
        ),
        whole(
            "key_first",
            &format!(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\
                 Connection: Upgrade\r\nUpgrade: websocket\r\n"
            ),
        ),
        Spelling {
            name: "split_after_request_line",
            pieces: vec![
                format!("GET {path} HTTP/1.1\r\n").into_bytes(),
                format!("Host: {host}\r\n{canonical}\r\n").into_bytes(),
            ],
        },
        Spelling {
            name: "split_in_header_name",
            pieces: vec![a.as_bytes().to_vec(), b.as_bytes().to_vec()],
        },
        Spelling {
            name: "split_in_three",
            pieces: vec![
                line.clone().into_bytes(),
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n".to_vec(),
                format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                    .into_bytes(),
            ],
        },
    ]
}

pub async fn run(
    args: SpellingsArgs,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SpellingsSummary> {
    anyhow::ensure!(
        (1..=256).contains(&args.concurrency),
        "--concurrency must be 1..=256"
    );
    let start = Instant::now();
    let deadline = start + args.duration;
    let spellings = Arc::new(all(args.target, &args.path));
    let mut out = SpellingsSummary::default();
    let mut by: BTreeMap<String, [u64; 2]> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    for i in 0..args.count {
        if Instant::now() >= deadline || *stop.borrow() {
            break;
        }
        while tasks.len() >= args.concurrency {
            tokio::select! {
                Some(Ok((name, outcome))) = tasks.join_next() => tally(&mut out, &mut by, name, outcome),
                _ = tokio::time::sleep_until(deadline.into()) => break,
                _ = stopped(&mut stop) => break,
            }
        }
        out.attempts += 1;
        let (s, a) = (spellings.clone(), args.clone());
        tasks.spawn(async move {
            let sp = &s[(i % s.len() as u64) as usize];
            let outcome = exchange(a.target, a.bind, &sp.pieces, a.split_delay, a.timeout).await;
            (sp.name, outcome)
        });
    }
    let _ = tokio::time::timeout(args.timeout * 2 + Duration::from_secs(1), async {
        while let Some(r) = tasks.join_next().await {
            if let Ok((name, outcome)) = r {
                tally(&mut out, &mut by, name, outcome);
            }
        }
    })
    .await;
    tasks.abort_all();
    out.by_spelling = by;
    out.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(out)
}

fn tally(
    out: &mut SpellingsSummary,
    by: &mut BTreeMap<String, [u64; 2]>,
    name: &str,
    outcome: Outcome,
) {
    let ok = matches!(outcome, Outcome::Status(101));
    if let Outcome::Status(code) = outcome {
        *out.statuses.entry(code.to_string()).or_default() += 1;
    }
    let slot = by.entry(name.to_owned()).or_default();
    if ok {
        out.ok += 1;
        slot[0] += 1;
    } else {
        out.failures += 1;
        slot[1] += 1;
    }
}
