//! Two-tier aggregation of flag evaluations into rows.
//!
//! An [`Evaluation`] (what the calling thread captured) becomes a
//! [`RowKey`] here, on the worker: privacy is applied (without consent the
//! targeting key is `sha256_<hex>`, no context is kept and the error
//! message is the error code), the context is pruned and canonically
//! encoded ([`super::context`]). [`Aggregate`] then counts it in a row:
//!
//! - full rows (every identity field) up to [`MAX_FULL_ROWS`] in total and
//!   [`MAX_ROWS_PER_FLAG`] per flag;
//! - past either cap, a degraded row (flag, variant, allocation, runtime
//!   default, error: no targeting key, no context) up to
//!   [`MAX_DEGRADED_ROWS`];
//! - past that, the evaluation is dropped ([`Landed::Dropped`]; the caller
//!   counts it).
//!
//! The caps count rows created during a flush window: taking the rows out
//! for an early flush does not reset them, only [`Aggregate::end_window`]
//! does. Every evaluation lands in exactly one row or is reported dropped.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::context::{prune, Canonical, Captured};

/// Full rows per flush window, all flags together.
pub const MAX_FULL_ROWS: usize = 131_072;
/// Full rows per flag per flush window.
pub const MAX_ROWS_PER_FLAG: usize = 10_000;
/// Degraded rows per flush window.
pub const MAX_DEGRADED_ROWS: usize = 32_768;
/// The error message sent without consent when only a message was given.
pub const GENERAL_ERROR: &str = "GENERAL";

/// One flag evaluation as captured on the calling thread.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub flag: String,
    /// `None` means no variant was resolved: the runtime default was used.
    pub variant: Option<String>,
    pub allocation: Option<String>,
    pub targeting_key: Option<String>,
    /// Captured only with consent (`full_data`).
    pub context: Vec<(String, Captured)>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub timestamp_ms: i64,
    /// Consent to send the raw targeting key, context and error message.
    pub full_data: bool,
}

/// What identifies a row. A degraded row has no targeting key and an
/// empty context. The runtime default is `variant.is_none()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RowKey {
    pub flag: String,
    pub variant: Option<String>,
    pub allocation: Option<String>,
    pub error: Option<String>,
    pub targeting_key: Option<String>,
    pub context: Canonical,
}

/// `"sha256_"` and the hex SHA-256 of `key`.
pub fn hashed_targeting_key(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256_");
    // Two digits per byte from a table (`write!` per byte cost more than
    // the digest itself).
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

fn present(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

impl RowKey {
    /// The full-tier key of an evaluation, privacy applied; and its time.
    pub fn of(e: Evaluation) -> (RowKey, i64) {
        let code = present(e.error_code);
        let message = present(e.error_message);
        let (error, targeting_key, context) = if e.full_data {
            let context = if e.context.is_empty() {
                Canonical::default()
            } else {
                Canonical::encode(&prune(e.context))
            };
            (message.or(code), e.targeting_key, context)
        } else {
            let error = code.or_else(|| message.map(|_| GENERAL_ERROR.to_owned()));
            let key = e.targeting_key.map(|k| hashed_targeting_key(&k));
            (error, key, Canonical::default())
        };
        let key = RowKey {
            flag: e.flag,
            variant: e.variant,
            allocation: present(e.allocation),
            error,
            targeting_key,
            context,
        };
        (key, e.timestamp_ms)
    }

    /// The same row, degraded: no targeting key, no context.
    pub fn degrade(&mut self) {
        self.targeting_key = None;
        self.context = Canonical::default();
    }

    pub fn is_degraded(&self) -> bool {
        self.targeting_key.is_none() && self.context.is_empty()
    }
}

/// Evaluations counted in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Earliest evaluation, ms since the epoch.
    pub first: i64,
    /// Latest evaluation, ms since the epoch.
    pub last: i64,
    pub count: u64,
}

impl Counts {
    pub fn one(at_ms: i64) -> Counts {
        Counts {
            first: at_ms,
            last: at_ms,
            count: 1,
        }
    }

    fn merge(&mut self, other: Counts) {
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.count += other.count;
    }
}

/// Which tier a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Full,
    Degraded,
}

/// A row taken out to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: RowKey,
    pub counts: Counts,
    pub tier: Tier,
}

/// Where [`Aggregate::add`] put evaluations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Landed {
    Full,
    Degraded,
    /// Both tiers are at their caps: the caller counts them.
    Dropped,
}

#[derive(Debug, Default)]
struct Window {
    full_rows: usize,
    per_flag: HashMap<String, usize>,
    degraded_rows: usize,
}

/// The rows of the current flush window.
#[derive(Debug, Default)]
pub struct Aggregate {
    full: HashMap<RowKey, Counts>,
    degraded: HashMap<RowKey, Counts>,
    window: Window,
    /// Evaluations held in rows.
    evaluations: u64,
}

impl Aggregate {
    pub fn new() -> Aggregate {
        Aggregate::default()
    }

    /// Evaluations held in rows.
    pub fn evaluations(&self) -> u64 {
        self.evaluations
    }

    pub fn rows(&self) -> usize {
        self.full.len() + self.degraded.len()
    }

    /// Counts `counts` in the row of `key` (a full-tier key, or one of a
    /// degraded row when `tier` is `Degraded`), creating it if the caps
    /// allow, else in its degraded row, else reports them dropped.
    pub fn add(&mut self, mut key: RowKey, counts: Counts, tier: Tier) -> Landed {
        if tier == Tier::Full {
            if let Some(c) = self.full.get_mut(&key) {
                c.merge(counts);
                self.evaluations += counts.count;
                return Landed::Full;
            }
            let w = &mut self.window;
            let per_flag = w.per_flag.get(&key.flag).copied().unwrap_or(0);
            if w.full_rows < MAX_FULL_ROWS && per_flag < MAX_ROWS_PER_FLAG {
                w.full_rows += 1;
                *w.per_flag.entry(key.flag.clone()).or_insert(0) += 1;
                self.full.insert(key, counts);
                self.evaluations += counts.count;
                return Landed::Full;
            }
            key.degrade();
        }
        if let Some(c) = self.degraded.get_mut(&key) {
            c.merge(counts);
        } else if self.window.degraded_rows < MAX_DEGRADED_ROWS {
            self.window.degraded_rows += 1;
            self.degraded.insert(key, counts);
        } else {
            return Landed::Dropped;
        }
        self.evaluations += counts.count;
        Landed::Degraded
    }

    /// Takes every row out (to be sent). The caps keep counting until
    /// [`Aggregate::end_window`].
    pub fn take_rows(&mut self) -> Vec<Row> {
        let mut rows = Vec::with_capacity(self.rows());
        for (tier, map) in [
            (Tier::Full, &mut self.full),
            (Tier::Degraded, &mut self.degraded),
        ] {
            rows.extend(map.drain().map(|(key, counts)| Row { key, counts, tier }));
        }
        self.evaluations = 0;
        rows
    }

    /// Starts a new flush window: the caps count from zero again.
    pub fn end_window(&mut self) {
        self.window = Window::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(flag: &str, tk: &str) -> Evaluation {
        Evaluation {
            flag: flag.into(),
            variant: Some("on".into()),
            targeting_key: Some(tk.into()),
            timestamp_ms: 1_760_000_000_000,
            ..Default::default()
        }
    }

    fn add(a: &mut Aggregate, e: Evaluation) -> Landed {
        let (key, at) = RowKey::of(e);
        a.add(key, Counts::one(at), Tier::Full)
    }

    #[test]
    fn counts_and_min_max_times_in_one_row() {
        let mut a = Aggregate::new();
        for t in [5, 1, 9, 3] {
            let mut e = eval("f", "u");
            e.timestamp_ms = 1_760_000_000_000 + t;
            assert_eq!(add(&mut a, e), Landed::Full);
        }
        let rows = a.take_rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].counts,
            Counts {
                first: 1_760_000_000_001,
                last: 1_760_000_000_009,
                count: 4
            }
        );
        assert_eq!(a.evaluations(), 0);
    }

    #[test]
    fn privacy_without_consent_and_raw_data_with_it() {
        let mut e = eval("f", "user-1");
        e.context = vec![("plan".into(), Captured::Str("pro".into()))];
        e.error_code = Some("FLAG_NOT_FOUND".into());
        e.error_message = Some("no flag named f".into());
        let (k, _) = RowKey::of(e.clone());
        assert_eq!(k.targeting_key, Some(hashed_targeting_key("user-1")));
        assert!(k.targeting_key.as_deref().unwrap().starts_with("sha256_"));
        assert_eq!(k.targeting_key.as_deref().unwrap().len(), 7 + 64);
        assert!(k.context.is_empty());
        assert_eq!(k.error.as_deref(), Some("FLAG_NOT_FOUND"));

        e.full_data = true;
        let (k, _) = RowKey::of(e.clone());
        assert_eq!(k.targeting_key.as_deref(), Some("user-1"));
        assert_eq!(k.context.fields().count(), 1);
        assert_eq!(k.error.as_deref(), Some("no flag named f"));

        // A message without a code, without consent: a generic code.
        e.full_data = false;
        e.error_code = None;
        assert_eq!(RowKey::of(e).0.error.as_deref(), Some(GENERAL_ERROR));
    }

    #[test]
    fn sha256_matches_a_known_digest() {
        assert_eq!(
            hashed_targeting_key("abc"),
            "sha256_ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn per_flag_cap_degrades_and_every_evaluation_is_counted() {
        let mut a = Aggregate::new();
        for i in 0..MAX_ROWS_PER_FLAG + 5 {
            add(&mut a, eval("f", &i.to_string()));
        }
        // Another flag still gets full rows.
        assert_eq!(add(&mut a, eval("g", "x")), Landed::Full);
        // A further evaluation of an existing full row stays full.
        assert_eq!(add(&mut a, eval("f", "0")), Landed::Full);
        assert_eq!(a.evaluations(), MAX_ROWS_PER_FLAG as u64 + 7);
        let rows = a.take_rows();
        let degraded: Vec<_> = rows.iter().filter(|r| r.tier == Tier::Degraded).collect();
        assert_eq!(degraded.len(), 1);
        assert_eq!(degraded[0].counts.count, 5);
        assert!(degraded[0].key.is_degraded());
        assert_eq!(rows.len(), MAX_ROWS_PER_FLAG + 2);
        let total: u64 = rows.iter().map(|r| r.counts.count).sum();
        assert_eq!(total, MAX_ROWS_PER_FLAG as u64 + 7);
    }

    #[test]
    fn caps_hold_for_the_window_and_degraded_overflow_is_dropped() {
        let mut a = Aggregate::new();
        let mut landed = HashMap::new();
        // 14 flags x 10,000 rows: the total cap (131,072) is reached
        // first; then distinct degraded rows up to 32,768; then dropped.
        for f in 0..14 {
            for i in 0..MAX_ROWS_PER_FLAG {
                *landed
                    .entry(add(&mut a, eval(&format!("f{f}"), &i.to_string())))
                    .or_insert(0) += 1;
            }
        }
        assert_eq!(landed[&Landed::Full], MAX_FULL_ROWS);
        assert_eq!(landed[&Landed::Degraded], 140_000 - MAX_FULL_ROWS);
        for v in 0..MAX_DEGRADED_ROWS {
            let mut e = eval("f0", "new");
            e.variant = Some(format!("v{v}"));
            *landed.entry(add(&mut a, e)).or_insert(0) += 1;
        }
        // f13's overflow already made one degraded row: 32,767 more fit.
        assert_eq!(landed[&Landed::Dropped], 1);
        assert_eq!(
            landed[&Landed::Degraded],
            140_000 - MAX_FULL_ROWS + MAX_DEGRADED_ROWS - 1
        );
        let rows_before = a.rows();
        // An early flush does not reset the caps...
        let taken = a.take_rows();
        assert_eq!(taken.len(), rows_before);
        let mut e = eval("f0", "fresh");
        e.variant = Some("brand-new".into());
        assert_eq!(add(&mut a, e.clone()), Landed::Dropped);
        // ...the end of the window does.
        a.end_window();
        assert_eq!(add(&mut a, e), Landed::Full);
    }
}
