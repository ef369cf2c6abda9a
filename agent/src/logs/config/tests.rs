use super::*;

fn parse(toml_text: &str) -> Result<LogsConfig, LogsConfigError> {
    #[derive(Deserialize)]
    struct Wrap {
        logs: LogsFile,
    }
    let w: Wrap = toml::from_str(toml_text).expect("valid TOML");
    w.logs.validate(&LogDefaults::default())
}

fn err_key(toml_text: &str) -> (String, String, String) {
    match parse(toml_text) {
        Err(LogsConfigError::Invalid { key, value, why }) => (key, value, why),
        Ok(c) => panic!("accepted: {c:?}"),
    }
}

#[test]
fn full_example() {
    let c = parse(
        r#"
        [logs]
        trusted_proxies = ["10.0.0.0/8", "fd00::/8"]
        max_line_len = 4096
        poll_interval = "100ms"
        upstream_error_threshold = 50
        upstream_error_window = "30s"

        [[logs.sources]]
        name = "ingress"
        paths = ["/var/log/ingress/*.log"]
        format = "ingress-nginx"

        [[logs.sources]]
        name = "ingress-json"
        syslog = "127.0.0.1:5140"
        format = "json"
        fields = { client = "addr", path = "uri" }

        [[logs.sources]]
        name = "app"
        paths = ["/var/log/app.log"]
        format = "text"
        start_at = "beginning"

        [[logs.rules]]
        name = "ws_4xx"
        statuses = [400, "403", "426"]
        paths = ["/ws"]
        threshold = 5
        window = "1m"
        reason = "bad handshakes at ingress"

        [[logs.rules]]
        name = "client_errors"
        statuses = ["4xx", "500-503"]
        ban_on_5xx = true

        [[logs.rules]]
        name = "spring"
        pattern = 'invalid Upgrade header: null.*client=(?P<client>\S+)'
        "#,
    )
    .unwrap();
    assert_eq!(c.sources.len(), 3);
    assert_eq!(c.sources[0].rules, vec![0, 1]);
    assert_eq!(
        c.sources[1].input,
        Input::Syslog("127.0.0.1:5140".parse().unwrap())
    );
    let Format::Json(f) = &c.sources[1].format else {
        panic!()
    };
    assert_eq!(
        (f.client.as_str(), f.path.as_str(), f.status.as_str()),
        ("addr", "uri", "status")
    );
    assert_eq!(c.sources[2].rules, vec![2]);
    assert_eq!(c.sources[2].start_at, StartAt::Beginning);
    assert_eq!(c.sources[0].start_at, StartAt::End);
    let RuleKind::Status(s) = &c.rules[0].kind else {
        panic!()
    };
    assert_eq!(s.statuses, vec![(400, 400), (403, 403), (426, 426)]);
    assert_eq!(s.path_prefixes, vec!["/ws".to_string()]);
    assert_eq!(c.rules[0].threshold.count, 5);
    assert_eq!(c.rules[0].threshold.window, Duration::from_secs(60));
    let RuleKind::Status(s) = &c.rules[1].kind else {
        panic!()
    };
    assert_eq!(s.statuses, vec![(400, 499), (500, 503)]);
    // Unset thresholds default to the kernel detector's.
    assert_eq!(
        c.rules[1].threshold,
        Threshold {
            count: 20,
            window: Duration::from_secs(10)
        }
    );
    assert_eq!(
        c.upstream,
        Threshold {
            count: 50,
            window: Duration::from_secs(30)
        }
    );
    assert_eq!(c.max_line_len, 4096);
    assert_eq!(c.poll_interval, Duration::from_millis(100));
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/wsguard/logs"));
    assert_eq!(c.trusted_proxies.len(), 2);
}

#[test]
fn defaults_follow_the_agent() {
    let d = LogDefaults {
        threshold: 7,
        window: Duration::from_secs(3),
        ws_paths: vec!["/socket".into()],
        state_dir: "/tmp/x".into(),
        proxy_protocol_from: Vec::new(),
    };
    let file = LogsFile {
        sources: vec![SourceFile {
            name: "a".into(),
            paths: Some(vec!["/a.log".into()]),
            format: "combined".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let c = file.validate(&d).unwrap();
    assert_eq!(c.rules.len(), 1);
    let r = &c.rules[0];
    assert_eq!(r.name, "bad_handshake");
    assert_eq!(
        r.threshold,
        Threshold {
            count: 7,
            window: Duration::from_secs(3)
        }
    );
    let RuleKind::Status(s) = &r.kind else {
        panic!()
    };
    assert_eq!(s.path_prefixes, vec!["/socket".to_string()]);
    assert!(s.statuses.iter().all(|(lo, hi)| lo == hi && *hi < 500));
    assert_eq!(
        c.upstream,
        Threshold {
            count: 7,
            window: Duration::from_secs(3)
        }
    );
    assert_eq!(c.state_dir, PathBuf::from("/tmp/x/logs"));
    assert_eq!(c.sources[0].rules, vec![0]);
}

/// The load balancers the data plane trusts for PROXY headers are trusted for forwarded
/// headers too unless `[logs]` names its own list; an explicit `[]` trusts nobody.
#[test]
fn trusted_proxies_default_to_proxy_protocol_from() {
    let lb: Cidr = "198.18.0.5".parse().unwrap();
    let d = LogDefaults {
        proxy_protocol_from: vec![lb],
        ..Default::default()
    };
    let parse = |toml: &str| {
        let f: LogsFile = toml::from_str(toml).unwrap();
        f.validate(&d).unwrap().trusted_proxies
    };
    assert_eq!(parse(""), vec![lb]);
    assert_eq!(parse("trusted_proxies = []"), Vec::<Cidr>::new());
    assert_eq!(
        parse("trusted_proxies = [\"10.0.0.0/8\"]"),
        vec!["10.0.0.0/8".parse::<Cidr>().unwrap()]
    );
    let none = LogDefaults::default();
    let f: LogsFile = toml::from_str("").unwrap();
    assert!(f.validate(&none).unwrap().trusted_proxies.is_empty());
}

#[test]
fn five_xx_must_be_explicit() {
    let (key, value, why) = err_key(
        r#"
        [logs]
        [[logs.rules]]
        name = "r"
        statuses = [400, 502]
        "#,
    );
    assert_eq!(
        (key.as_str(), value.as_str()),
        ("logs.rules[0].statuses", "502")
    );
    assert!(why.contains("ban_on_5xx"), "{why}");
    let (key, value, _) = err_key(
        r#"
        [logs]
        [[logs.rules]]
        name = "r"
        statuses = ["400-599"]
        "#,
    );
    assert_eq!(
        (key.as_str(), value.as_str()),
        ("logs.rules[0].statuses", "500-599")
    );
}

#[test]
fn errors_name_the_key_and_value() {
    let src = |extra: &str| {
        format!("[logs]\n[[logs.sources]]\nname = \"s\"\nformat = \"combined\"\n{extra}\n")
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (src("paths = [\"rel.log\"]"), "logs.sources[0].paths", "rel.log"),
        (src("paths = []"), "logs.sources[0].paths", "[]"),
        (src("syslog = \"0.0.0.0:5140\""), "logs.sources[0].syslog", "0.0.0.0:5140"),
        (src("syslog = \"localhost\""), "logs.sources[0].syslog", "localhost"),
        (src("paths = [\"/a\"]\nsyslog = \"127.0.0.1:1\""), "logs.sources[0].paths", "s"),
        (src("paths = [\"/a\"]\nstart_at = \"middle\""), "logs.sources[0].start_at", "middle"),
        (src("paths = [\"/a\"]\nrules = [\"nope\"]"), "logs.sources[0].rules", "nope"),
        (src("paths = [\"/a\"]\nfields = { client = \"x\" }"), "logs.sources[0].fields", "combined"),
        (
            "[logs]\n[[logs.sources]]\nname = \"s\"\nformat = \"xml\"\npaths = [\"/a\"]".into(),
            "logs.sources[0].format",
            "xml",
        ),
        (
            "[logs]\n[[logs.sources]]\nname = \"bad name\"\nformat = \"text\"\npaths = [\"/a\"]".into(),
            "logs.sources[0].name",
            "bad name",
        ),
        (
            "[logs]\n[[logs.sources]]\nname = \"t\"\nformat = \"text\"\npaths = [\"/a\"]".into(),
            "logs.sources[0].rules",
            "text",
        ),
        (
            "[logs]\n[[logs.sources]]\nname = \"j\"\nformat = \"json\"\npaths = [\"/a\"]\nfields = { client = \"\" }".into(),
            "logs.sources[0].fields.client",
            "",
        ),
        ("[logs]\ntrusted_proxies = [\"10.0.0.1/8\"]".into(), "logs.trusted_proxies[0]", "10.0.0.1/8"),
        ("[logs]\nmax_line_len = 10".into(), "logs.max_line_len", "10"),
        ("[logs]\npoll_interval = \"1ms\"".into(), "logs.poll_interval", "1ms"),
        ("[logs]\npoll_interval = \"1m\"".into(), "logs.poll_interval", "1m"),
        ("[logs]\nupstream_error_threshold = 0".into(), "logs.upstream_error_threshold", "0"),
        ("[logs]\nupstream_error_window = \"soon\"".into(), "logs.upstream_error_window", "soon"),
        ("[logs]\nmax_tracked_sources = 0".into(), "logs.max_tracked_sources", "0"),
    ];
    for (text, key, value) in cases {
        let (k, v, _) = err_key(&text);
        assert_eq!((k.as_str(), v.as_str()), (key, value), "{text}");
    }
    let rule = |body: &str| format!("[logs]\n[[logs.rules]]\nname = \"r\"\n{body}\n");
    let rule_cases: &[(&str, &str, &str)] = &[
        ("statuses = [99]", "logs.rules[0].statuses", "99"),
        ("statuses = [\"6xx\"]", "logs.rules[0].statuses", "6xx"),
        (
            "statuses = [\"450-420\"]",
            "logs.rules[0].statuses",
            "450-420",
        ),
        ("statuses = [\"abc\"]", "logs.rules[0].statuses", "abc"),
        ("statuses = []", "logs.rules[0].statuses", "[]"),
        (
            "statuses = [400]\npaths = [\"ws\"]",
            "logs.rules[0].paths",
            "ws",
        ),
        (
            "statuses = [400]\nthreshold = 0",
            "logs.rules[0].threshold",
            "0",
        ),
        (
            "statuses = [400]\nwindow = \"0s\"",
            "logs.rules[0].window",
            "0s",
        ),
        (
            "statuses = [400]\nwindow = \"ten\"",
            "logs.rules[0].window",
            "ten",
        ),
        (
            "statuses = [400]\nreason = \" \"",
            "logs.rules[0].reason",
            " ",
        ),
        (
            "pattern = \"no capture\"",
            "logs.rules[0].pattern",
            "no capture",
        ),
        (
            "pattern = \"(?P<client>\"",
            "logs.rules[0].pattern",
            "(?P<client>",
        ),
        (
            "pattern = \"(?P<client>x)\"\npaths = [\"/ws\"]",
            "logs.rules[0].paths",
            "[..]",
        ),
        (
            "pattern = \"(?P<client>x)\"\nstatuses = [400]",
            "logs.rules[0].pattern",
            "(?P<client>x)",
        ),
        ("threshold = 3", "logs.rules[0].statuses", ""),
    ];
    for (body, key, value) in rule_cases {
        let (k, v, _) = err_key(&rule(body));
        assert_eq!((k.as_str(), v.as_str()), (*key, *value), "{body}");
    }
    // Duplicates.
    let (k, v, _) = err_key(
        "[logs]\n[[logs.rules]]\nname = \"r\"\nstatuses = [400]\n[[logs.rules]]\nname = \"r\"\nstatuses = [403]",
    );
    assert_eq!((k.as_str(), v.as_str()), ("logs.rules[1].name", "r"));
    let (k, v, _) = err_key(
        "[logs]\n[[logs.sources]]\nname = \"a\"\nformat = \"json\"\nsyslog = \"127.0.0.1:5140\"\n[[logs.sources]]\nname = \"b\"\nformat = \"json\"\nsyslog = \"127.0.0.1:5140\"",
    );
    assert_eq!(
        (k.as_str(), v.as_str()),
        ("logs.sources[1].syslog", "127.0.0.1:5140")
    );
}

#[test]
fn unknown_keys_are_refused() {
    let r: Result<LogsFile, _> =
        toml::from_str("[[sources]]\nname = \"a\"\nformat = \"json\"\npath = \"/a\"");
    let e = r.unwrap_err().to_string();
    assert!(e.contains("path"), "{e}");
}
