//! Bad input through the real CLI: the documented exit code (2 invalid, 3 refused, 1 runtime),
//! a message naming the bad value and the fix, and the ban list unchanged. A non-root user
//! cannot change anything through the socket.

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use std::{
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
};
use wsguard_tests::agent::wsguard_bin;

mod cli_support;
use cli_support::*;

#[test]
fn bad_input_gives_the_documented_exit_code_and_changes_nothing() -> Result<()> {
    let s = Setup::new()?;
    let _agent = s.start("a", &[])?;
    let r = s.cli(&["ban", "add", "198.19.0.1", "fd00:77::1", "--ttl", "1h"])?;
    ensure!(r.code == 0, "{r:?}");
    let before = s.ban_set()?;
    ensure!(before.len() == 2);
    let lines = s.write("bad-lines.txt", "198.19.3.1\n198.19.3.300\n198.19.3.2\n")?;
    let allowed = s.write("allowed.txt", "198.19.3.1\n127.0.0.1\n")?;
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (
            vec!["ban", "add", "198.19.0.300"],
            2,
            vec!["\"198.19.0.300\""],
        ),
        (
            vec!["ban", "add", "198.19.0.0/33"],
            2,
            vec!["198.19.0.0/33", "prefix length"],
        ),
        (
            vec!["ban", "add", "198.19.0.9/24"],
            2,
            vec!["did you mean 198.19.0.0/24"],
        ),
        (
            vec!["ban", "add", "198.19.5.5", "nope"],
            2,
            vec!["\"nope\""],
        ),
        (
            vec!["ban", "add", "0.0.0.0/0"],
            3,
            vec!["0.0.0.0/0", "every address"],
        ),
        (vec!["ban", "add", "::/0"], 3, vec!["::/0"]),
        (
            vec!["ban", "add", "127.0.0.1"],
            3,
            vec!["127.0.0.1", "allowlist"],
        ),
        // The node's own address; the good address before it is not banned either.
        (
            vec!["ban", "add", "198.19.5.5", "198.18.0.1"],
            3,
            vec!["198.18.0.1", "allowlist"],
        ),
        (
            vec!["ban", "add", "198.19.5.5", "--ttl", "10x"],
            2,
            vec!["\"10x\""],
        ),
        (
            vec!["ban", "add", "198.19.5.5", "--ttl", "0s"],
            2,
            vec!["--ttl"],
        ),
        (
            vec!["ban", "add", "198.19.5.5", "--ttl", "1h", "--permanent"],
            2,
            vec!["--permanent"],
        ),
        (
            vec!["ban", "rm", "198.19.7.7"],
            1,
            vec!["not banned: 198.19.7.7", "--ignore-missing"],
        ),
        (vec!["ban", "rm", "bogus"], 2, vec!["\"bogus\""]),
        (vec!["ban", "list", "--source", "nope"], 2, vec!["nope"]),
        (vec!["flows", "--addr", "1.2.3"], 2, vec!["\"1.2.3\""]),
        (vec!["allow", "add", "10.0.0.0/99"], 2, vec!["10.0.0.0/99"]),
        (vec!["allow", "rm", "127.0.0.0/8"], 3, vec!["127.0.0.0/8"]),
        (
            vec!["import", lines.to_str().unwrap()],
            2,
            vec!["line 2", "198.19.3.300", "nothing imported"],
        ),
        (
            vec!["import", allowed.to_str().unwrap()],
            3,
            vec!["line 2", "127.0.0.1", "nothing imported"],
        ),
        (
            vec!["import", "/nonexistent/file"],
            2,
            vec!["/nonexistent/file"],
        ),
        (
            vec!["import", lines.to_str().unwrap(), "--ttl", "1y"],
            2,
            vec!["\"1y\""],
        ),
        (vec!["ban", "frobnicate"], 2, vec!["frobnicate"]),
        (
            vec!["explain", "/nonexistent/req"],
            2,
            vec!["/nonexistent/req"],
        ),
    ];
    for (args, code, needles) in &cases {
        let r = s.cli(args)?;
        expect(&r, *code, needles).with_context(|| format!("wsguard {}", args.join(" ")))?;
        ensure!(
            s.ban_set()? == before,
            "wsguard {} changed the ban list",
            args.join(" ")
        );
    }
    // --ignore-missing: says so, exits 0, and removes what was there.
    let r = s.cli(&["ban", "rm", "198.19.7.7", "198.19.0.1", "--ignore-missing"])?;
    ensure!(
        r.code == 0 && r.stdout.contains("198.19.7.7") && r.stdout.contains("removed 198.19.0.1"),
        "{r:?}"
    );
    ensure!(s.ban_set()?.len() == 1);

    // Agent unreachable: names the socket and how to start the agent.
    let missing = s.dir.path().join("nope.sock");
    let mut c = Command::new(wsguard_bin()?);
    c.args(["ban", "list"]).env("WSGUARD_SOCKET", &missing);
    let r = run(&mut c, s.dir.path())?;
    expect(
        &r,
        1,
        &[
            missing.to_str().unwrap(),
            "is the agent running? start it with `wsguard agent",
        ],
    )?;
    let mut c = Command::new(wsguard_bin()?);
    c.args([
        "--socket",
        missing.to_str().unwrap(),
        "ban",
        "add",
        "198.19.0.2",
    ]);
    let r = run(&mut c, s.dir.path())?;
    expect(&r, 1, &[missing.to_str().unwrap(), "is the agent running?"])?;
    Ok(())
}

/// uid 65534 through `setpriv`: kept out by the socket's 0600 mode, and by the agent's peer
/// credential check once the socket is opened up.
#[test]
fn a_non_root_user_cannot_change_anything() -> Result<()> {
    let s = Setup::new()?;
    let agent = s.start("a", &[])?;
    ensure!(s.cli(&["ban", "add", "198.19.0.1", "--ttl", "1h"])?.code == 0);
    let before = s.ban_set()?;
    let nobody = |args: &[&str]| -> Result<Run> {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(wsguard_bin()?)
            .args(args)
            .env("WSGUARD_SOCKET", s.socket())
            .stdin(Stdio::null());
        run(&mut c, s.dir.path())
    };
    let file = s.write("one.txt", "198.19.0.8\n")?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let mutations: Vec<Vec<&str>> = vec![
        vec!["ban", "add", "198.19.0.2"],
        vec!["ban", "rm", "198.19.0.1"],
        vec!["allow", "add", "198.19.0.0/24"],
        vec!["allow", "rm", "127.0.0.0/8"],
        vec!["import", file.to_str().unwrap()],
        vec!["detach", "--yes"],
    ];
    // The socket as the agent makes it: 0600 root.
    for m in &mutations {
        let r = nobody(m)?;
        expect(&r, 1, &["permission denied", "run as root"]).with_context(|| m.join(" "))?;
    }
    // Opened up to everyone (as an operator might for a group): reads work, mutations are
    // refused by the agent's SO_PEERCRED check.
    std::fs::set_permissions(s.socket(), std::fs::Permissions::from_mode(0o666))?;
    let r = nobody(&["ban", "list", "-o", "json"])?;
    ensure!(
        r.code == 0 && r.json()?.as_array().map(Vec::len) == Some(1),
        "{r:?}"
    );
    for m in &mutations {
        let r = nobody(m)?;
        expect(&r, 1, &["permission denied", "uid 65534", "run as root"])
            .with_context(|| m.join(" "))?;
    }
    ensure!(s.ban_set()? == before, "ban list changed");
    ensure!(
        agent.log_text().contains("refused a mutation"),
        "refusals are logged: {}",
        agent.log_text()
    );
    ensure!(
        s.cli(&["status"])?.code == 0,
        "agent still serving: {}",
        agent.log_text()
    );
    ensure!(
        std::fs::read_dir(s.pin_dir("a"))?.count() > 0,
        "pins still in place"
    );
    let audit_log = s.dir.path().join("state-a/audit.log");
    let audit = std::fs::read_to_string(&audit_log)
        .with_context(|| format!("read {}: {}", audit_log.display(), agent.log_text()))?;
    let first: Value = serde_json::from_str(audit.lines().next().context("empty audit log")?)?;
    ensure!(
        first["verb"] == "ban add"
            && first["uid"] == 0
            && first["addrs"] == serde_json::json!(["198.19.0.1"])
            && first["ttl"] == "1h",
        "root's ban is audited with who, what and TTL: {audit}"
    );
    ensure!(
        !audit.contains("65534"),
        "refused requests are not audited as done: {audit}"
    );
    // An import is audited with every address it applied.
    let two = s.write("two.txt", "198.19.0.9\nfd00:5f::9\n")?;
    ensure!(s.cli(&["import", two.to_str().unwrap()])?.code == 0);
    let audit = std::fs::read_to_string(&audit_log)?;
    let last: Value = serde_json::from_str(audit.lines().last().context("empty audit log")?)?;
    ensure!(
        last["verb"] == "import"
            && last["addrs"] == serde_json::json!(["198.19.0.9", "fd00:5f::9"]),
        "the import is audited with its addresses: {audit}"
    );
    Ok(())
}
