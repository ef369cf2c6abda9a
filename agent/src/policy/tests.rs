use super::*;
use time::macros::datetime;

const T0: OffsetDateTime = datetime!(2030-01-01 00:00:00 UTC);
const MIN: Duration = Duration::from_secs(60);

fn cfg() -> PolicyConfig {
    PolicyConfig {
        ban_ttl: 10 * MIN,
        ban_max_ttl: 24 * 60 * MIN,
        max_bans: 1000,
        mode: Mode::Enforce,
        breaker: BreakerConfig {
            limit: 3,
            window: Duration::from_secs(10),
            hard_limit: 5,
        },
        offense_memory: Duration::from_secs(7 * 86400),
    }
}

fn policy() -> Policy {
    Policy::new(cfg(), &[c("192.0.2.10")], &[c("203.0.113.0/24")])
}

fn c(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn req(addr: &str, source: BanSource) -> BanRequest {
    BanRequest {
        cidr: c(addr),
        source,
        reason: "test".into(),
        ttl: Ttl::Default,
        observe: false,
        hard: false,
    }
}

fn secs(n: i64) -> time::Duration {
    time::Duration::seconds(n)
}

fn refused(p: &Policy, r: RefuseReason) -> u64 {
    p.counters().refused[RefuseReason::ALL.iter().position(|x| *x == r).unwrap()]
}

#[test]
fn first_ban_gets_ban_ttl_and_counts_created() {
    let mut p = policy();
    let a = p.ban(req("198.51.100.7", BanSource::Kernel), T0).unwrap();
    assert_eq!(a.change, Change::Created);
    assert_eq!(a.ban.expires_at, Some(T0 + secs(600)));
    assert_eq!((a.ban.offenses, a.ban.mode), (1, Mode::Enforce));
    assert_eq!(p.counters().created, [1, 0, 0, 0, 0]);
    assert_eq!(p.active_by_source(), [1, 0, 0, 0, 0]);
}

#[test]
fn builtin_config_and_node_allowlist_refuse_bans() {
    let mut p = policy();
    for a in [
        "127.0.0.1",
        "::1",
        "169.254.1.1",
        "fe80::1",
        "192.0.2.10",
        "203.0.113.9",
    ] {
        let e = p.ban(req(a, BanSource::Manual), T0).unwrap_err();
        assert!(matches!(e, Refusal::Allowlisted { .. }), "{a}: {e}");
    }
    // A network that merely contains an allowlisted address is refused too.
    let e = p
        .ban(req("192.0.2.0/24", BanSource::Manual), T0)
        .unwrap_err();
    assert!(
        e.to_string().contains("192.0.2.10 (builtin: node address)"),
        "{e}"
    );
    assert_eq!(refused(&p, RefuseReason::Allowlisted), 7);
    assert!(p.is_empty());
}

#[test]
fn slash_zero_is_refused_in_both_families() {
    let mut p = policy();
    for a in ["0.0.0.0/0", "::/0"] {
        assert!(matches!(
            p.ban(req(a, BanSource::Manual), T0),
            Err(Refusal::Everything(_))
        ));
    }
    assert_eq!(refused(&p, RefuseReason::Allowlisted), 2);
}

#[test]
fn repeat_offences_escalate_times_four_up_to_the_max() {
    let mut p = policy();
    let mut now = T0;
    let mut ttls = Vec::new();
    for _ in 0..6 {
        let b = p
            .ban(req("198.51.100.7", BanSource::Kernel), now)
            .unwrap()
            .ban;
        ttls.push((b.expires_at.unwrap() - now).whole_minutes());
        now = b.expires_at.unwrap();
        assert_eq!(p.expire(now).len(), 1);
    }
    assert_eq!(ttls, [10, 40, 160, 640, 1440, 1440]);
    assert_eq!(p.offenses()[&c("198.51.100.7")].count, 6);
    assert_eq!(escalate(MIN, 10 * MIN, 100), 10 * MIN, "no overflow");
}

#[test]
fn explicit_ttl_wins_over_escalation_but_counts_as_offence() {
    let mut p = policy();
    p.restore_offense(c("198.51.100.7"), Offense { count: 3, last: T0 });
    let mut r = req("198.51.100.7", BanSource::Manual);
    r.ttl = Ttl::For(Duration::from_secs(30));
    let b = p.ban(r, T0).unwrap().ban;
    assert_eq!((b.expires_at, b.offenses), (Some(T0 + secs(30)), 4));
}

#[test]
fn rebanning_extends_never_shortens() {
    let mut p = policy();
    let mut r = req("198.51.100.7", BanSource::Manual);
    r.ttl = Ttl::For(Duration::from_secs(3600));
    p.ban(r.clone(), T0).unwrap();
    r.ttl = Ttl::For(Duration::from_secs(60));
    let a = p.ban(r.clone(), T0 + secs(10)).unwrap();
    assert_eq!(a.change, Change::Unchanged);
    assert_eq!(a.ban.expires_at, Some(T0 + secs(3600)));
    r.ttl = Ttl::For(Duration::from_secs(7200));
    let a = p.ban(r, T0 + secs(10)).unwrap();
    assert_eq!(
        (a.change, a.ban.expires_at),
        (Change::Updated, Some(T0 + secs(7210)))
    );
    assert_eq!(a.ban.offenses, 1, "an extension is not a new offence");
    assert_eq!(p.counters().created_total(), 1);
}

#[test]
fn permanent_stays_permanent_and_a_ttl_can_become_permanent() {
    let mut p = policy();
    let mut r = req("198.51.100.7", BanSource::Manual);
    r.ttl = Ttl::Permanent;
    p.ban(r.clone(), T0).unwrap();
    r.ttl = Ttl::For(Duration::from_secs(5));
    assert_eq!(p.ban(r, T0).unwrap().ban.expires_at, None);
    assert!(p.expire(T0 + secs(1_000_000)).is_empty());

    p.ban(req("198.51.100.8", BanSource::Kernel), T0).unwrap();
    let mut r = req("198.51.100.8", BanSource::Manual);
    r.ttl = Ttl::Permanent;
    let a = p.ban(r, T0).unwrap();
    assert_eq!(
        (a.change, a.ban.expires_at, a.ban.source),
        (Change::Updated, None, BanSource::Manual)
    );
    assert_eq!(p.active_by_source(), [0, 0, 2, 0, 0]);
}

#[test]
fn rebanning_only_strengthens_mode_and_hardness() {
    let mut p = policy();
    let mut r = req("198.51.100.7", BanSource::Manual);
    r.hard = true;
    p.ban(r, T0).unwrap();
    let mut r = req("198.51.100.7", BanSource::Manual);
    r.observe = true;
    let b = p.ban(r, T0).unwrap().ban;
    assert!(b.hard && b.mode == Mode::Enforce);
}

#[test]
fn adding_an_allow_entry_lifts_overlapping_bans() {
    let mut p = policy();
    for a in [
        "198.51.100.7",
        "198.51.100.0/28",
        "198.51.101.1",
        "2001:db8::1",
    ] {
        p.ban(req(a, BanSource::Kernel), T0).unwrap();
    }
    let (e, lifted) = p.allow_add(c("198.51.100.0/24"), "partner".into()).unwrap();
    assert_eq!(e.source, AllowSource::Manual);
    let mut lifted: Vec<String> = lifted.iter().map(|b| b.cidr.to_string()).collect();
    lifted.sort();
    assert_eq!(lifted, ["198.51.100.0/28", "198.51.100.7"]);
    assert_eq!(p.len(), 2);
    assert!(p.ban(req("198.51.100.99", BanSource::Kernel), T0).is_err());
    assert_eq!(
        p.allow_rm(&c("198.51.100.0/24")).unwrap().unwrap().reason,
        "partner"
    );
    assert!(p.ban(req("198.51.100.99", BanSource::Kernel), T0).is_ok());
}

#[test]
fn builtin_and_config_entries_cannot_be_removed() {
    let mut p = policy();
    for (a, kind) in [
        ("127.0.0.0/8", AllowSource::Builtin),
        ("192.0.2.10", AllowSource::Builtin),
        ("203.0.113.0/24", AllowSource::Config),
    ] {
        assert_eq!(
            p.allow_rm(&c(a)),
            Err(AllowError::Protected { cidr: c(a), kind })
        );
    }
    assert_eq!(p.allow_rm(&c("10.0.0.0/8")), Ok(None));
    assert!(matches!(
        p.allow_add(c("::/0"), String::new()),
        Err(AllowError::Everything(_))
    ));
    let n = p.allow_entries().count();
    assert_eq!(
        p.allow_add(c("127.0.0.0/8"), "x".into()).unwrap().0.source,
        AllowSource::Builtin
    );
    assert_eq!(p.allow_entries().count(), n, "no duplicate");
}

#[test]
fn new_node_address_lifts_bans() {
    let mut p = policy();
    p.ban(req("198.51.100.7", BanSource::Kernel), T0).unwrap();
    let lifted = p.set_node_addrs(&[c("192.0.2.10"), c("198.51.100.7")]);
    assert_eq!(lifted.len(), 1);
    assert!(p.ban(req("198.51.100.7", BanSource::Kernel), T0).is_err());
}

#[test]
fn full_map_refuses_and_never_evicts() {
    let mut p = Policy::new(
        PolicyConfig {
            max_bans: 2,
            ..cfg()
        },
        &[],
        &[],
    );
    p.ban(req("198.51.100.1", BanSource::Manual), T0).unwrap();
    p.ban(req("198.51.100.2", BanSource::Manual), T0).unwrap();
    let e = p
        .ban(req("198.51.100.3", BanSource::Manual), T0)
        .unwrap_err();
    assert!(matches!(e, Refusal::Full { max: 2, .. }), "{e}");
    assert_eq!(refused(&p, RefuseReason::Full), 1);
    let mut kept: Vec<String> = p.bans().map(|b| b.cidr.to_string()).collect();
    kept.sort();
    assert_eq!(kept, ["198.51.100.1", "198.51.100.2"]);
    // Extending an existing ban is still fine at the cap.
    let mut r = req("198.51.100.1", BanSource::Manual);
    r.ttl = Ttl::Permanent;
    assert_eq!(p.ban(r, T0).unwrap().change, Change::Updated);
}

#[test]
fn preflight_lists_every_bad_entry_and_applies_nothing() {
    let mut p = Policy::new(
        PolicyConfig {
            max_bans: 3,
            ..cfg()
        },
        &[],
        &[],
    );
    let batch = vec![
        req("198.51.100.1", BanSource::Import),
        req("127.0.0.1", BanSource::Import),
        req("::/0", BanSource::Import),
    ];
    let bad = p.preflight(&batch).unwrap_err();
    assert_eq!(bad.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2]);
    assert!(p.is_empty());
    let batch: Vec<BanRequest> = (1..=4)
        .map(|i| req(&format!("198.51.100.{i}"), BanSource::Import))
        .collect();
    let bad = p.preflight(&batch).unwrap_err();
    assert!(bad.iter().all(|(_, e)| e.reason() == RefuseReason::Full));
    assert!(p.preflight(&batch[..3]).is_ok());
    assert_eq!(refused(&p, RefuseReason::Allowlisted), 2);
}

#[test]
fn breaker_opens_on_a_storm_switches_auto_bans_to_observe_then_refuses() {
    let mut p = policy();
    let modes: Vec<_> = (1..=7)
        .map(|i| {
            p.ban(req(&format!("198.51.100.{i}"), BanSource::Kernel), T0)
                .map(|a| a.ban.mode)
        })
        .collect();
    use Mode::*;
    assert_eq!(
        modes[..5],
        [
            Ok(Enforce),
            Ok(Enforce),
            Ok(Enforce),
            Ok(Observe),
            Ok(Observe)
        ]
    );
    assert!(matches!(modes[5], Err(Refusal::RateLimited { .. })));
    assert!(p.breaker_open(T0));
    assert_eq!(refused(&p, RefuseReason::RateLimited), 2);
    // Manual bans are not limited.
    assert_eq!(
        p.ban(req("198.51.100.50", BanSource::Manual), T0)
            .unwrap()
            .ban
            .mode,
        Enforce
    );
    // Still open within the window, closed after a quiet one.
    assert!(p.breaker_open(T0 + secs(9)));
    assert!(!p.breaker_open(T0 + secs(10)));
    let b = p
        .ban(req("198.51.100.60", BanSource::Log), T0 + secs(10))
        .unwrap()
        .ban;
    assert_eq!(b.mode, Enforce);
}

#[test]
fn sustained_storm_keeps_the_breaker_open() {
    let mut p = policy();
    let mut n = 0;
    for s in 0..30 {
        for _ in 0..4 {
            n += 1;
            let _ = p.ban(
                req(
                    &format!("10.0.{}.{}", n / 250, n % 250 + 1),
                    BanSource::Kernel,
                ),
                T0 + secs(s),
            );
        }
        assert!(p.breaker_open(T0 + secs(s)), "second {s}");
    }
    assert!(!p.breaker_open(T0 + secs(40)));
}

#[test]
fn global_observe_mode_records_observe_bans() {
    let mut p = Policy::new(
        PolicyConfig {
            mode: Mode::Observe,
            ..cfg()
        },
        &[],
        &[],
    );
    assert_eq!(
        p.ban(req("198.51.100.7", BanSource::Manual), T0)
            .unwrap()
            .ban
            .mode,
        Mode::Observe
    );
    let mut r = req("198.51.100.8", BanSource::Manual);
    r.observe = true;
    let mut q = Policy::new(cfg(), &[], &[]);
    assert_eq!(q.ban(r, T0).unwrap().ban.mode, Mode::Observe);
}

#[test]
fn expire_removes_only_due_bans_and_counts_them() {
    let mut p = policy();
    let mut r = req("198.51.100.1", BanSource::Manual);
    r.ttl = Ttl::For(Duration::from_secs(5));
    p.ban(r, T0).unwrap();
    p.ban(req("198.51.100.2", BanSource::Kernel), T0).unwrap();
    let mut r = req("198.51.100.3", BanSource::Manual);
    r.ttl = Ttl::Permanent;
    p.ban(r, T0).unwrap();
    assert!(p.expire(T0 + secs(4)).is_empty());
    assert_eq!(p.expire(T0 + secs(5)).len(), 1);
    assert_eq!(p.expire(T0 + secs(600))[0].cidr, c("198.51.100.2"));
    assert_eq!((p.len(), p.counters().expired), (1, 2));
    assert_eq!(p.active_by_source(), [0, 0, 1, 0, 0]);
}

#[test]
fn offence_history_is_forgotten_after_offense_memory() {
    let mut p = policy();
    p.ban(req("198.51.100.7", BanSource::Kernel), T0).unwrap();
    p.expire(T0 + secs(600));
    assert!(p.offenses().contains_key(&c("198.51.100.7")));
    p.expire(T0 + secs(8 * 86400));
    assert!(p.offenses().is_empty());
}

#[test]
fn restore_keeps_metadata_and_respects_a_grown_allowlist() {
    let mut p = policy();
    let ban = p
        .ban(req("198.51.100.7", BanSource::Kernel), T0)
        .unwrap()
        .ban;
    let mut q = policy();
    q.restore(ban.clone()).unwrap();
    assert_eq!(q.get(&ban.cidr), Some(ban.clone()));
    assert_eq!(q.counters().created_total(), 0);
    let mut allowed = Policy::new(cfg(), &[], &[c("198.51.100.0/24")]);
    assert!(allowed.restore(ban).is_err());
}
