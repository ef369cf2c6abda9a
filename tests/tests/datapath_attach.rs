//! TC egress attached for real, both ways the agent knows: TCX (preferred, kernel 6.6+) and
//! the clsact fallback. Real TCP connections across a veth pair reach a real server whose
//! answers (101, 503, 403) must be read by the attached egress program exactly as in the
//! BPF_PROG_TEST_RUN tests.

use anyhow::{Context as _, Result, ensure};
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, TcpListener, TcpStream},
    time::Duration,
};
use wsguard::datapath::{DataPath, DataPathOptions, OpenHooks, XdpMode};
use wsguard_common::{
    BadReason, Verdict,
    maps::{Counter, FLOW_ANSWERED, FLOW_ESTABLISHED},
};
use wsguard_tests::{
    dataplane::addr16,
    netns::{BpfFs, VethLab},
    packet::ws_request,
};

const PORT: u16 = 8080;
const ANSWERS: [&str; 3] = [
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
];
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Read until the end of a header block (or EOF), bounded by the socket's timeout.
fn read_head(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = s.read(&mut chunk).context("read")?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// One server connection per answer, in order; the connections stay open until the client
/// side has been checked.
fn serve(listener: TcpListener) -> Result<Vec<TcpStream>> {
    let mut open = Vec::new();
    for answer in ANSWERS {
        let (mut s, _) = listener.accept().context("accept")?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        read_head(&mut s)?;
        s.write_all(answer.as_bytes())?;
        open.push(s);
    }
    Ok(open)
}

fn egress_reads_answers(force_clsact: bool) -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let opts = DataPathOptions {
        pin_dir: bpffs.path().join("wsguard"),
        interfaces: vec![lab.if_a.clone()],
        xdp_mode: XdpMode::Auto,
        max_bans: 1000,
    };
    let hooks = OpenHooks {
        force_clsact,
        ..Default::default()
    };
    let mut dp = lab.a.run(|| DataPath::open_with(&opts, &hooks))??;
    let want = if force_clsact { "clsact" } else { "tcx" };
    let ifs = dp.interfaces();
    ensure!(
        ifs.len() == 1 && ifs[0].tc_egress == want,
        "want {want}: {ifs:?}"
    );
    let progs = lab.a.tc_egress_programs(&lab.if_a)?;
    ensure!(progs.len() == 1, "one egress program expected: {progs:?}");
    dp.set_ports(&[PORT])?;

    // Sockets keep the namespace they were created in.
    let ip_a = lab.ip_a;
    let listener = lab.a.run(move || TcpListener::bind((ip_a, PORT)))??;
    let server = std::thread::spawn(move || serve(listener));
    let (mut sports, mut open) = (Vec::new(), Vec::new());
    for expected in ANSWERS {
        let mut s = lab.b.run(move || {
            TcpStream::connect_timeout(&(IpAddr::V4(ip_a), PORT).into(), IO_TIMEOUT)
        })??;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.write_all(&ws_request("/chat"))?;
        let head = read_head(&mut s)?;
        ensure!(
            head.starts_with(&expected.as_bytes()[..12]),
            "answer {:?}",
            String::from_utf8_lossy(&head)
        );
        sports.push(s.local_addr()?.port());
        // Kept open: a FIN would end the flow before we look at it.
        open.push(s);
    }
    let server_side = server.join().expect("server thread")?;

    let flows = dp.flows()?;
    let state = |sport: u16| {
        flows
            .iter()
            .find(|(k, _)| {
                k.client == addr16(&lab.ip_b.to_string()) && k.client_port == sport.to_be()
            })
            .map(|(_, v)| (Verdict::from_u8(v.verdict), v.state))
    };
    let valid = Some(Verdict::Valid);
    ensure!(
        state(sports[0]) == Some((valid, FLOW_ESTABLISHED)),
        "101: {flows:?}"
    );
    ensure!(
        state(sports[1]) == Some((valid, FLOW_ANSWERED)),
        "503: {flows:?}"
    );
    ensure!(
        state(sports[2]) == Some((valid, FLOW_ANSWERED)),
        "403: {flows:?}"
    );
    let c = dp.counters()?;
    let rejected = Counter::BadReason0 as usize + BadReason::ServerRejected as usize;
    ensure!(
        (
            c[Counter::HsValid as usize],
            c[Counter::UpstreamErrors as usize]
        ) == (3, 1),
        "{c:?}"
    );
    ensure!(
        (c[Counter::HsBad as usize], c[rejected]) == (1, 1),
        "only the 403 counts against the client: {c:?}"
    );
    drop((open, server_side));
    Ok(())
}

#[test]
fn tcx_egress_reads_real_answers() -> Result<()> {
    egress_reads_answers(false)
}

#[test]
fn clsact_fallback_egress_reads_real_answers() -> Result<()> {
    egress_reads_answers(true)
}
