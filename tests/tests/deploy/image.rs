//! The Containerfile. No container engine runs on the development machines or in CI (`docker`
//! is only a client there), so the image is not built by the tests: the build is checked
//! against the repository it builds from (toolchain, workspace members, bootstrap, a runtime
//! stage holding the binary alone), and the cached bootstrap layer is replayed far enough for
//! cargo to load the workspace from it.

use std::{fs, process::Command};

use crate::kube::{agent_container, daemonset, read, rendered, root};

struct Instr {
    op: String,
    args: String,
}

fn containerfile() -> Vec<Vec<Instr>> {
    let text = read(&root().join("deploy/Containerfile"));
    let mut joined = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(rest) => {
                cur.push_str(rest);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                joined.push(std::mem::take(&mut cur));
            }
        }
    }
    // Stage 0 holds the global ARGs before the first FROM.
    let mut stages = vec![Vec::new()];
    for l in joined.into_iter().filter(|l| !l.trim().is_empty()) {
        let (op, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let i = Instr {
            op: op.to_uppercase(),
            args: args.trim().to_owned(),
        };
        if i.op == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().unwrap().push(i);
    }
    stages
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: not exec form: {e}"))
}

#[test]
fn containerfile_builds_with_the_readme_bootstrap_and_ships_only_the_binary() {
    let stages = containerfile();
    let global = &stages[0];
    let from =
        |s: &[Instr]| -> Vec<String> { s[0].args.split_whitespace().map(str::to_owned).collect() };
    assert_eq!(
        stages.len(),
        4,
        "global ARGs + toolchain, build, runtime stages"
    );
    let runs = |s: &[Instr]| {
        s.iter()
            .filter(|i| i.op == "RUN")
            .map(|i| i.args.clone())
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Toolchain: the Rust release rust-toolchain.toml pins, on Debian bookworm (where LLVM 22
    // comes from), bootstrapped by `cargo xtask` itself.
    let toolchain = read(&root().join("rust-toolchain.toml"));
    let channel: toml::Table = toml::from_str(&toolchain).unwrap();
    let channel = channel["toolchain"]["channel"].as_str().unwrap();
    assert!(
        global
            .iter()
            .any(|i| i.op == "ARG" && i.args == format!("RUST_VERSION={channel}")),
        "ARG RUST_VERSION={channel} (rust-toolchain.toml)"
    );
    let t = &stages[1];
    assert_eq!(
        from(t),
        [
            "docker.io/library/rust:${RUST_VERSION}-bookworm",
            "AS",
            "toolchain"
        ]
    );
    let t_runs = runs(t);
    assert!(
        t_runs.contains("cargo xtask bootstrap"),
        "the README's bootstrap"
    );
    // Cargo loads every workspace member: each one's manifest is copied into the bootstrap
    // layer, or the bootstrap fails once a member is added.
    let ws: toml::Table = toml::from_str(&read(&root().join("Cargo.toml"))).unwrap();
    let copies: Vec<&str> = t
        .iter()
        .filter(|i| i.op == "COPY")
        .map(|i| i.args.as_str())
        .collect();
    for m in ws["workspace"]["members"].as_array().unwrap() {
        let m = m.as_str().unwrap();
        assert!(
            copies
                .iter()
                .any(|c| c.starts_with(&format!("{m}/Cargo.toml "))
                    || c.starts_with(&format!("{m}/ "))),
            "toolchain stage does not copy {m}/Cargo.toml"
        );
    }
    for f in ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml"] {
        assert!(
            copies.iter().any(|c| c.split_whitespace().any(|w| w == f)),
            "COPY {f}"
        );
    }

    let b = &stages[2];
    assert_eq!(from(b), ["toolchain", "AS", "build"]);
    assert!(runs(b).contains("cargo build --release --locked -p wsguard"));

    let r = &stages[3];
    let base = &from(r)[0];
    assert!(
        base.starts_with("gcr.io/distroless/cc-debian12")
            || base.starts_with("debian:bookworm-slim")
            || base.starts_with("docker.io/library/debian:bookworm-slim"),
        "small runtime base on the build's Debian release, got {base}"
    );
    assert_eq!(
        from(r)[2],
        "runtime",
        "the final stage is the runtime image"
    );
    let copies: Vec<&Instr> = r
        .iter()
        .filter(|i| i.op == "COPY" || i.op == "ADD")
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "the runtime image gets the binary and nothing else"
    );
    assert_eq!(copies[0].op, "COPY");
    let words: Vec<&str> = copies[0].args.split_whitespace().collect();
    assert_eq!(
        words,
        ["--from=build", "/out/wsguard", "/usr/local/bin/wsguard"]
    );
    assert!(
        !r.iter().any(|i| i.op == "RUN"),
        "nothing runs in the runtime stage"
    );
    let last = |op: &str| {
        r.iter()
            .rfind(|i| i.op == op)
            .unwrap_or_else(|| panic!("no {op}"))
    };
    assert_eq!(last("USER").args, "0:0");
    assert_eq!(
        exec_form(&last("ENTRYPOINT").args),
        ["/usr/local/bin/wsguard"]
    );
    let cmd = exec_form(&last("CMD").args);
    assert_eq!(cmd, ["agent"], "`wsguard agent` by default");
    let ds_args = rendered("base");
    assert_eq!(
        agent_container(daemonset(&ds_args))["args"][0],
        cmd[0].as_str()
    );
    let labels = r
        .iter()
        .filter(|i| i.op == "LABEL")
        .map(|i| i.args.as_str())
        .collect::<String>();
    for l in [
        "org.opencontainers.image.title=\"wsguard\"",
        "org.opencontainers.image.version",
        "org.opencontainers.image.source",
    ] {
        assert!(labels.contains(l), "LABEL {l}");
    }
    let license = ws["workspace"]["package"]["license"].as_str().unwrap();
    assert!(labels.contains(&format!("org.opencontainers.image.licenses=\"{license}\"")));

    let ignore = read(&root().join("deploy/Containerfile.dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "target/ stays out of the context"
    );
}

/// The toolchain stage's cached layer is built from the manifests alone, with stub sources: a
/// workspace member or target added later can break it without any source change showing it.
/// Replays the stage's COPY lines and the stub-making part of its RUN in a scratch directory,
/// then asks cargo to load the workspace there as `cargo xtask bootstrap` would (offline and
/// locked: the lockfile must not need to change).
#[test]
fn containerfile_bootstrap_layer_loads_the_workspace() {
    let stages = containerfile();
    let t = &stages[1];
    let scratch = tempfile::tempdir().unwrap();
    let workdir = t
        .iter()
        .find(|i| i.op == "WORKDIR")
        .map(|i| i.args.clone())
        .expect("WORKDIR in the toolchain stage");
    let ctx = scratch.path().join(workdir.trim_start_matches('/'));
    fs::create_dir_all(&ctx).unwrap();
    let mut bootstrap_seen = false;
    for i in t {
        match i.op.as_str() {
            "COPY" => {
                let words: Vec<&str> = i.args.split_whitespace().collect();
                assert!(
                    !words[0].starts_with("--"),
                    "toolchain stage COPY {}: copies from the context only",
                    i.args
                );
                let (dest, srcs) = words.split_last().expect("COPY SRC… DEST");
                let dest = ctx.join(dest);
                fs::create_dir_all(&dest).unwrap();
                for src in srcs {
                    let from = root().join(src);
                    assert!(from.exists(), "COPY {src}: not in the repository");
                    // A directory's contents go into DEST, as COPY does.
                    let from = if from.is_dir() { from.join(".") } else { from };
                    let st = Command::new("cp")
                        .arg("-a")
                        .arg(&from)
                        .arg(&dest)
                        .status()
                        .unwrap();
                    assert!(st.success(), "cp {}", from.display());
                }
            }
            "RUN" if i.args.contains("cargo xtask bootstrap") => {
                for step in i.args.split("&&").map(str::trim) {
                    if step.starts_with("cargo xtask bootstrap") {
                        bootstrap_seen = true;
                        break;
                    }
                    let st = Command::new("sh")
                        .args(["-ec", step])
                        .current_dir(&ctx)
                        .status()
                        .unwrap();
                    assert!(st.success(), "RUN step `{step}` failed");
                }
            }
            _ => {}
        }
    }
    assert!(
        bootstrap_seen,
        "the toolchain stage runs `cargo xtask bootstrap`"
    );
    // xtask itself must build from this layer: its sources are copied whole.
    assert!(
        ctx.join("xtask/src/main.rs").is_file(),
        "xtask sources copied"
    );
    let cargo = || {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(&ctx);
        c
    };
    let out = cargo()
        // --no-deps: full metadata would need every platform's crates (Windows ones too) in
        // the local registry cache, which a Linux machine that only built never downloads.
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--locked",
            "--offline",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo cannot load the workspace in the bootstrap layer:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members = meta["workspace_members"].as_array().unwrap().len();
    let ws: toml::Table = toml::from_str(&read(&root().join("Cargo.toml"))).unwrap();
    assert_eq!(
        members,
        ws["workspace"]["members"].as_array().unwrap().len(),
        "every member loads"
    );
    // `cargo xtask` compiles xtask in that layer. Checked, not built, against the shared target
    // directory: the registry crates are reused, and no binary there is replaced.
    let out = cargo()
        .args(["check", "-q", "-p", "xtask", "--locked", "--offline"])
        .env("CARGO_TARGET_DIR", root().join("target"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xtask does not compile in the bootstrap layer:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
