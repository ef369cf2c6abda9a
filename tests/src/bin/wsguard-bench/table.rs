//! From samples to the printed tables: medians with min–max, work over the floor, the two
//! ratios and their targets (printed MET/MISSED, never asserted).

/// Below this much work over the floor a ratio says nothing (the floor itself moves by about
/// this much between rounds).
const MIN_WORK_NS: f64 = 0.5;

/// One program on one case, over every round.
#[derive(Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Median over rounds of (this program − the floor measured next to it in the same round).
    pub work: f64,
}

impl Stat {
    pub fn of(samples: &[f64], floor: &[f64]) -> Self {
        let work: Vec<f64> = samples.iter().zip(floor).map(|(s, f)| s - f).collect();
        Self {
            median: median(samples),
            min: samples.iter().copied().fold(f64::INFINITY, f64::min),
            max: samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            work: median(&work),
        }
    }

    fn cell(&self) -> String {
        format!("{:.1} ({:.1}–{:.1})", self.median, self.min, self.max)
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A row of the comparison table: one packet at one ban count, one wsguard program.
pub struct Row {
    pub bans: String,
    pub path: String,
    pub floor: Stat,
    pub reference: Stat,
    pub wsguard: Stat,
    pub xdp_filter: Stat,
    /// wsguard ÷ reference, in work over the floor, at most this.
    pub target: f64,
    /// Set when xdp-filter holds fewer entries than the others (its maps have a fixed size).
    pub xdp_filter_entries: Option<u32>,
}

/// wsguard ÷ reference, xdp-filter ÷ wsguard.
pub const PEER_TARGET: f64 = 2.0;

fn ratio(num: f64, den: f64) -> Option<f64> {
    (den >= MIN_WORK_NS).then(|| num.max(0.0) / den)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

pub fn print_comparison(rows: &[Row]) {
    println!(
        "\n| bans | packet | floor ns | reference ns | wsguard ns | xdp-filter ns | work over \
         floor ns: ref / wsguard / xdp-filter | wsguard ÷ ref | target | xdp-filter ÷ wsguard | \
         target |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |");
    for r in rows {
        let ws_ref = ratio(r.wsguard.work, r.reference.work);
        let xf_ws = ratio(r.xdp_filter.work, r.wsguard.work);
        let (ws_ref_s, ws_ref_t) = match ws_ref {
            Some(x) => (
                format!("{x:.2}"),
                format!("≤ {} {}", r.target, verdict(x <= r.target)),
            ),
            None => ("—".into(), format!("≤ {} n/a", r.target)),
        };
        let (xf_ws_s, xf_ws_t) = match xf_ws {
            Some(x) => (
                format!("{x:.2}"),
                format!("≥ {PEER_TARGET} {}", verdict(x >= PEER_TARGET)),
            ),
            // wsguard doing no measurable work over the floor beats any peer.
            None => ("∞".into(), format!("≥ {PEER_TARGET} MET")),
        };
        let xf_mark = if r.xdp_filter_entries.is_some() {
            " †"
        } else {
            ""
        };
        println!(
            "| {} | {} | {} | {} | {} | {}{xf_mark} | {:.1} / {:.1} / {:.1} | {ws_ref_s} \
             | {ws_ref_t} | {xf_ws_s} | {xf_ws_t} |",
            r.bans,
            r.path,
            r.floor.cell(),
            r.reference.cell(),
            r.wsguard.cell(),
            r.xdp_filter.cell(),
            r.reference.work,
            r.wsguard.work,
            r.xdp_filter.work,
        );
    }
    if let Some(n) = rows.iter().find_map(|r| r.xdp_filter_entries) {
        println!(
            "\n† xdp-filter holds {n} entries here, all its filter_ipv4 map can hold (a fixed \
             size, set when xdp-tools is built); wsguard and the reference hold the row's count."
        );
    }
}

/// A row of wsguard's own paths (no peer has them): work over the floor and the ratio to it.
pub struct OwnRow {
    pub path: String,
    pub program: &'static str,
    pub floor: Stat,
    pub stat: Stat,
}

/// A table of one program per row; nothing for no rows (a part the run skipped).
pub fn print_own(title: &str, rows: &[OwnRow]) {
    if rows.is_empty() {
        return;
    }
    println!("\n{title}\n");
    println!("| path | program | floor ns | ns | work over floor ns | × floor |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.2} |",
            r.path,
            r.program,
            r.floor.cell(),
            r.stat.cell(),
            r.stat.work,
            r.stat.median / r.floor.median
        );
    }
}
