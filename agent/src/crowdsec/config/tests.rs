//! `[crowdsec]` validation: defaults, secrets from files, `${VAR}`, and every bad value.
use super::*;

fn file(toml: &str) -> CrowdsecFile {
    toml::from_str(toml).unwrap()
}

fn err(toml: &str) -> String {
    file(toml).validate().unwrap_err().to_string()
}

#[test]
fn defaults() {
    let c = file("api_url = \"http://127.0.0.1:8080/\"\napi_key = \"k\"")
        .validate()
        .unwrap();
    assert_eq!(
        (c.url.host.as_str(), c.url.port, c.url.prefix.as_str()),
        ("127.0.0.1", 8080, "")
    );
    assert_eq!(c.update_frequency, Duration::from_secs(10));
    assert_eq!(c.scopes, ["ip", "range"]);
    assert!(!c.push && c.machine.is_none());
    let c = file(
        "api_url = \"https://[fd00::1]/lapi/\"\napi_key = \"k\"\nmachine_id = \"n1\"\npassword = \"p\"",
    )
    .validate()
    .unwrap();
    assert_eq!(
        (c.url.host.as_str(), c.url.port, c.url.prefix.as_str()),
        ("fd00::1", 443, "/lapi")
    );
    assert!(c.push, "push defaults to on with machine credentials");
    assert!(!format!("{c:?}").contains("\"k\""), "key printed: {c:?}");
}

#[test]
fn secrets_from_files() {
    let d = tempfile::tempdir().unwrap();
    let k = d.path().join("key");
    std::fs::write(&k, "abc123\n").unwrap();
    let p = d.path().join("pw");
    std::fs::write(&p, "secret\n").unwrap();
    let c = file(&format!(
        "api_url = \"http://h/\"\napi_key_file = {k:?}\nmachine_id = \"m\"\npassword_file = {p:?}\npush = false"
    ))
    .validate()
    .unwrap();
    assert_eq!(c.api_key.as_deref(), Some("abc123"));
    assert_eq!(c.machine.unwrap().password.as_deref(), Some("secret"));
    assert!(!c.push);
    std::fs::write(&k, "\n").unwrap();
    let e = err(&format!("api_url = \"http://h/\"\napi_key_file = {k:?}"));
    assert!(
        e.contains("crowdsec.api_key_file") && e.contains("empty"),
        "{e}"
    );
}

#[test]
fn environment_variables_in_ids_and_paths() {
    let d = tempfile::tempdir().unwrap();
    // SAFETY: this test's own variable, read only below.
    unsafe { std::env::set_var("WSGUARD_TEST_NODE", "node-7") };
    std::fs::write(d.path().join("node-7.key"), "k7\n").unwrap();
    let c = file(&format!(
        "api_url = \"http://h/\"\napi_key_file = \"{}/${{WSGUARD_TEST_NODE}}.key\"\nmachine_id = \"wsguard-${{WSGUARD_TEST_NODE}}\"\npassword = \"p\"",
        d.path().display()
    ))
    .validate()
    .unwrap();
    assert_eq!(c.api_key.as_deref(), Some("k7"));
    assert_eq!(c.machine.unwrap().id, "wsguard-node-7");
    let e = err(
        "api_url = \"http://h/\"\napi_key = \"k\"\nmachine_id = \"${WSGUARD_UNSET_VAR}\"\npassword = \"p\"",
    );
    assert!(
        e.contains("crowdsec.machine_id") && e.contains("WSGUARD_UNSET_VAR is not set"),
        "{e}"
    );
}

#[test]
fn bad_values_name_key_and_value() {
    for (toml, want) in [
        ("api_key = \"k\"", "crowdsec.api_url"),
        ("api_url = \"ftp://h/\"\napi_key = \"k\"", "\"ftp://h/\""),
        (
            "api_url = \"http://h:0/\"\napi_key = \"k\"",
            "crowdsec.api_url",
        ),
        (
            "api_url = \"http://h:99999/\"\napi_key = \"k\"",
            "\"99999\"",
        ),
        ("api_url = \"http://u:p@h/\"\napi_key = \"k\"", "user info"),
        (
            "api_url = \"http://h/\"",
            "bouncer credentials are required",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\nupdate_frequency = \"soon\"",
            "crowdsec.update_frequency: \"soon\"",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\nupdate_frequency = \"0s\"",
            "at least 100ms",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\nscopes = [\"country\"]",
            "crowdsec.scopes: \"country\"",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\norigins = [\"a,b\"]",
            "crowdsec.origins: \"a,b\"",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\npush = true",
            "crowdsec.push",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\nmachine_id = \"m\"",
            "crowdsec.password",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\npassword = \"p\"",
            "crowdsec.machine_id",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"",
            "crowdsec.cert_file: \"/nonexistent/c.pem\"",
        ),
        (
            "api_url = \"http://h/\"\napi_key = \"k\"\nmax_response_bytes = 10",
            "crowdsec.max_response_bytes: \"10\"",
        ),
    ] {
        let e = err(toml);
        assert!(e.contains(want), "{toml}: {e}");
    }
    let e = toml::from_str::<CrowdsecFile>("api_urll = \"x\"").unwrap_err();
    assert!(e.to_string().contains("api_urll"), "{e}");
}
