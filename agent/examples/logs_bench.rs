//! Log parser throughput on one core (issue 7 asks for at least 200k lines/s).
//!
//! `cargo run --release -p wsguard --example logs_bench -- [--lines N] [--min-rate R]`
//!
//! Measures each format's parse + rule match + burst detection (`Pipeline::line`, what a source
//! thread does per line) over generated lines: mostly 200s from many clients, some 4xx on the
//! WebSocket path, a few 5xx with upstream lists. Prints one line per format with lines/s;
//! exits 1 if any format is below `--min-rate`.

use std::{hint::black_box, net::Ipv4Addr, process::ExitCode, sync::Arc, time::Instant};

use wsguard::logs::{LogDefaults, LogsFile, Pipeline, metrics::SourceMetrics};

fn line(format: &str, i: u32) -> String {
    let addr = Ipv4Addr::from(0xC633_6400 + (i % 251)); // 198.51.100.x
    let (path, status) = match i % 10 {
        0..=6 => ("/api/v1/items?page=3", 200),
        7 | 8 => ("/ws/chat", 426),
        _ => ("/ws/chat", 502),
    };
    let ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36";
    match format {
        "combined" => format!(
            r#"{addr} - - [10/Oct/2024:13:55:36 +0000] "GET {path} HTTP/1.1" {status} 512 "https://example.com/" "{ua}""#
        ),
        "ingress-nginx" => {
            let up = if status == 502 {
                "10.244.1.5:8080, 10.244.2.9:8080 0, 0 0.5, 0.5 502, 502"
            } else {
                "10.244.1.5:8080 512 0.002 200"
            };
            format!(
                r#"{addr} - - [10/Oct/2024:13:55:36 +0000] "GET {path} HTTP/1.1" {status} 512 "https://example.com/" "{ua}" 432 0.002 [default-chat-8080] [] {up} 6f1c7c0e0bfcd1a0b4b2b9e3c9d5f4a1"#
            )
        }
        "json" => format!(
            r#"{{"time":"2024-10-10T13:55:36+00:00","remote_addr":"{addr}","request":"GET {path} HTTP/1.1","request_uri":"{path}","status":{status},"body_bytes_sent":512,"http_referer":"https://example.com/","http_user_agent":"{ua}","upstream_addr":"10.244.1.5:8080"}}"#
        ),
        _ => {
            if status == 426 {
                format!(
                    "2024-10-10 13:55:36.123 ERROR 1 --- [nio-8080-exec-1] o.s.w.s.s.s.DefaultHandshakeHandler : Handshake failed due to invalid Upgrade header: null client={addr}"
                )
            } else {
                format!(
                    "2024-10-10 13:55:36.123  INFO 1 --- [nio-8080-exec-1] c.e.app.Controller : GET {path} served in 3ms for {addr}"
                )
            }
        }
    }
}

fn arg(args: &[String], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--lines").unwrap_or(1_000_000) as u32;
    let min_rate = arg(&args, "--min-rate").unwrap_or(0) as f64;
    let mut ok = true;
    for format in ["ingress-nginx", "combined", "json", "text"] {
        let rule = if format == "text" {
            "[[rules]]\nname = \"spring\"\npattern = 'invalid Upgrade header: null.*client=(?P<client>\\S+)'\n"
        } else {
            "[[rules]]\nname = \"ws\"\nstatuses = [400, 403, 426]\npaths = [\"/ws\"]\n"
        };
        let text = format!(
            "trusted_proxies = [\"10.0.0.0/8\"]\n[[sources]]\nname = \"bench\"\npaths = [\"/bench.log\"]\nformat = \"{format}\"\n{rule}"
        );
        let file: LogsFile = toml::from_str(&text).expect("bench config");
        let cfg = file
            .validate(&LogDefaults::default())
            .expect("bench config");
        let metrics = Arc::new(SourceMetrics::default());
        let mut p = Pipeline::new(&cfg.sources[0], &cfg, metrics.clone()).expect("pipeline");
        // A pool of distinct lines, reused: generating them is not what is measured.
        let pool: Vec<String> = (0..4096).map(|i| line(format, i)).collect();
        let bytes: usize = pool.iter().map(String::len).sum::<usize>() / pool.len();
        let mut out = Vec::new();
        let start = Instant::now();
        for i in 0..n {
            p.line(
                black_box(pool[i as usize % pool.len()].as_bytes()),
                start,
                &mut out,
            );
            out.clear();
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = f64::from(n) / secs;
        let s = metrics.snapshot("bench");
        assert_eq!(
            s.parse_errors_total(),
            0,
            "{format}: the generated lines must parse"
        );
        assert!(
            s.lines_matched > 0,
            "{format}: the rules must match some lines"
        );
        println!(
            "logs_bench format={format} lines={n} avg_line_bytes={bytes} secs={secs:.3} lines_per_s={rate:.0} matched={}",
            s.lines_matched
        );
        if rate < min_rate {
            eprintln!(
                "logs_bench: {format}: {rate:.0} lines/s is below the required {min_rate:.0}"
            );
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
