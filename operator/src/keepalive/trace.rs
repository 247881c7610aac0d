//! Invocation traces: the file format `tandem plan` reads, and a seeded
//! generator of synthetic traces shaped like the Azure Functions trace.
//!
//! # Format
//! CSV, UTF-8, optionally gzip-compressed (recognised by its magic bytes,
//! whatever the file is called). The first line is the header
//! `workload,start_s,duration_s`; then one invocation per line: the
//! workload's name (no commas), the arrival time in seconds (any origin,
//! fractions allowed) and the execution time in seconds. Lines are sorted
//! by `start_s`. Blank lines are skipped. Anything else is an error that
//! names the line.
//!
//! # Generator
//! [`generate`] draws each workload from the distributions published by
//! Shahrad et al. (USENIX ATC 2020) for Azure Functions: 45% of
//! applications are invoked at most once an hour on average and 81% at
//! most once a minute (rates here log-uniform within those bands, capped at
//! one call every 30 s to keep traces small); about 30% are timer-like
//! (a fixed period, snapped to the usual cron periods, with sub-second
//! jitter and an occasional skipped beat); 40% are bursty (sessions of
//! several calls a few seconds apart, sessions arriving at random), whose
//! inter-arrival CV is above 1; the rest arrive at random, half of them
//! with a daily cycle. Execution times are log-normal per workload around a
//! log-normal median. Names say the kind (`timer-0003`), for reading
//! results; policies never see them.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, bail};

use super::rng::Rng;

/// One invocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Invocation {
    /// Arrival, seconds.
    pub start_s: f64,
    /// Execution time, seconds.
    pub duration_s: f64,
}

/// A workload's name and its invocations in arrival order.
pub type Workload = (String, Vec<Invocation>);

/// A trace: each workload's invocations in arrival order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Workloads in the order they first appear.
    pub workloads: Vec<Workload>,
    /// First arrival.
    pub start_s: f64,
    /// Last arrival.
    pub end_s: f64,
}

impl Trace {
    /// Invocations in all.
    pub fn invocations(&self) -> usize {
        self.workloads.iter().map(|(_, calls)| calls.len()).sum()
    }
}

/// The header line.
pub const HEADER: &str = "workload,start_s,duration_s";

/// Reads a trace file (plain or gzip).
pub fn read(path: &Path) -> anyhow::Result<Trace> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let parsed = if gzip {
        parse(std::io::BufReader::new(
            flate2::bufread::MultiGzDecoder::new(reader),
        ))
    } else {
        parse(reader)
    };
    parsed.with_context(|| format!("read the trace {}", path.display()))
}

/// Parses a trace.
pub fn parse(reader: impl BufRead) -> anyhow::Result<Trace> {
    let mut index: std::collections::HashMap<String, usize> = Default::default();
    let mut trace = Trace::default();
    let mut last_start = f64::NEG_INFINITY;
    let mut header = false;
    for (number, line) in reader.lines().enumerate() {
        let number = number + 1;
        let line = line.with_context(|| format!("line {number}"))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !header {
            if line != HEADER {
                bail!("line {number}: the header must be `{HEADER}`, found `{line}`");
            }
            header = true;
            continue;
        }
        let mut fields = line.split(',');
        let (Some(name), Some(start), Some(duration), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            bail!("line {number}: expected 3 fields `workload,start_s,duration_s`, found `{line}`");
        };
        if name.is_empty() {
            bail!("line {number}: the workload name is empty");
        }
        let number_field = |what: &str, text: &str| -> anyhow::Result<f64> {
            let value: f64 = text
                .trim()
                .parse()
                .with_context(|| format!("line {number}: {what} `{text}` is not a number"))?;
            if !value.is_finite() {
                bail!("line {number}: {what} `{text}` is not finite");
            }
            Ok(value)
        };
        let start = number_field("start_s", start)?;
        let duration = number_field("duration_s", duration)?;
        if duration < 0.0 {
            bail!("line {number}: duration_s `{duration}` is negative");
        }
        if start < last_start {
            bail!(
                "line {number}: start_s {start} is before the previous line's {last_start}; the trace must be sorted by start_s"
            );
        }
        last_start = start;
        let slot = *index.entry(name.to_string()).or_insert_with(|| {
            trace.workloads.push((name.to_string(), Vec::new()));
            trace.workloads.len() - 1
        });
        trace.workloads[slot].1.push(Invocation {
            start_s: start,
            duration_s: duration,
        });
    }
    if !header {
        bail!("the trace is empty: expected the header `{HEADER}`");
    }
    if trace.workloads.is_empty() {
        bail!("the trace has no invocations");
    }
    trace.start_s = trace
        .workloads
        .iter()
        .filter_map(|(_, calls)| calls.first().map(|c| c.start_s))
        .fold(f64::INFINITY, f64::min);
    trace.end_s = last_start;
    Ok(trace)
}

/// Writes `trace` in the file format (gzip when `path` ends in `.gz`).
pub fn write(trace: &Trace, path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let out = std::io::BufWriter::new(file);
    if path.extension().is_some_and(|e| e == "gz") {
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
        write_to(trace, &mut gz)?;
        gz.finish()?.flush()?;
    } else {
        let mut out = out;
        write_to(trace, &mut out)?;
        out.flush()?;
    }
    Ok(())
}

/// Writes `trace` as CSV, lines merged into arrival order.
pub fn write_to(trace: &Trace, out: &mut impl Write) -> anyhow::Result<()> {
    let mut all: Vec<(f64, usize, f64)> = trace
        .workloads
        .iter()
        .enumerate()
        .flat_map(|(w, (_, calls))| calls.iter().map(move |c| (c.start_s, w, c.duration_s)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    writeln!(out, "{HEADER}")?;
    for (start, w, duration) in all {
        writeln!(out, "{},{start:.3},{duration:.3}", trace.workloads[w].0)?;
    }
    Ok(())
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Generator {
    /// Workloads (those drawn with no invocation in the span are left out).
    pub workloads: usize,
    /// Span, days.
    pub days: f64,
    /// Seed: the same seed gives the same trace.
    pub seed: u64,
}

const DAY: f64 = 86_400.0;
/// Usual timer periods, seconds.
const TIMER_PERIODS: [f64; 15] = [
    30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0, 14400.0, 21600.0,
    28800.0, 43200.0, 86400.0,
];

/// Generates a trace.
pub fn generate(config: &Generator) -> Trace {
    let span = config.days * DAY;
    let mut trace = Trace {
        start_s: 0.0,
        end_s: 0.0,
        ..Trace::default()
    };
    for w in 0..config.workloads {
        let mut rng = Rng::new(
            config
                .seed
                .wrapping_mul(0x2545_f491_4f6c_dd1d)
                .wrapping_add(w as u64),
        );
        // Calls per day: 45% at most hourly, 36% more but at most once a
        // minute, 19% more often (capped at one per 30 s).
        let band = rng.uniform();
        let per_day = if band < 0.45 {
            rng.log_between(0.5, 24.0)
        } else if band < 0.81 {
            rng.log_between(24.0, 1440.0)
        } else {
            rng.log_between(1440.0, 2880.0)
        };
        let kind = rng.uniform();
        let median = rng.log_normal(0.5, 1.2).clamp(0.01, 300.0);
        let (name, starts) = if kind < 0.30 {
            ("timer", timer(&mut rng, per_day, span))
        } else if kind < 0.70 {
            ("bursty", bursty(&mut rng, per_day, span))
        } else if kind < 0.85 {
            ("random", random(&mut rng, per_day, span, false))
        } else {
            ("daily", random(&mut rng, per_day, span, true))
        };
        if starts.is_empty() {
            continue;
        }
        let calls = starts
            .into_iter()
            .map(|start_s| Invocation {
                start_s,
                duration_s: rng.log_normal(median, 0.6).clamp(0.001, 600.0),
            })
            .collect();
        trace.workloads.push((format!("{name}-{w:04}"), calls));
    }
    trace.end_s = trace
        .workloads
        .iter()
        .filter_map(|(_, calls)| calls.last().map(|c| c.start_s))
        .fold(0.0, f64::max);
    trace
}

fn timer(rng: &mut Rng, per_day: f64, span: f64) -> Vec<f64> {
    let wanted = DAY / per_day;
    let period = TIMER_PERIODS
        .iter()
        .copied()
        .min_by(|a, b| {
            (a.ln() - wanted.ln())
                .abs()
                .total_cmp(&(b.ln() - wanted.ln()).abs())
        })
        .unwrap_or(3600.0);
    let phase = rng.between(0.0, period);
    let mut starts = Vec::new();
    let mut beat = 0.0;
    while phase + beat * period < span {
        // One beat in fifty skipped; jitter of a fraction of a second.
        if rng.uniform() >= 0.02 {
            let at = phase + beat * period + (0.2 * rng.normal()).abs();
            starts.push(at.min(span));
        }
        beat += 1.0;
    }
    starts
}

fn bursty(rng: &mut Rng, per_day: f64, span: f64) -> Vec<f64> {
    let size = rng.log_between(2.0, 40.0);
    let gap = rng.log_between(0.5, 30.0);
    let sessions_per_day = (per_day / size).max(0.2);
    let mut starts = Vec::new();
    let mut t = rng.exponential(DAY / sessions_per_day);
    while t < span {
        // Geometric number of calls with mean `size`.
        let mut at = t;
        loop {
            starts.push(at);
            if rng.uniform() < 1.0 / size {
                break;
            }
            at += rng.exponential(gap);
            if at >= span {
                break;
            }
        }
        t = at + rng.exponential(DAY / sessions_per_day);
    }
    starts
}

fn random(rng: &mut Rng, per_day: f64, span: f64, daily: bool) -> Vec<f64> {
    // Thinning: draw at the peak rate, keep by the rate of the moment.
    let peak = if daily { 1.9 * per_day } else { per_day };
    let phase = rng.uniform();
    let mut starts = Vec::new();
    let mut t = rng.exponential(DAY / peak);
    while t < span {
        let rate = if daily {
            per_day * (1.0 + 0.9 * (2.0 * std::f64::consts::PI * (t / DAY - phase)).sin())
        } else {
            per_day
        };
        if rng.uniform() * peak < rate {
            starts.push(t);
        }
        t += rng.exponential(DAY / peak);
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_reads_back_as_written() {
        let trace = generate(&Generator {
            workloads: 30,
            days: 1.0,
            seed: 3,
        });
        let mut text = Vec::new();
        write_to(&trace, &mut text).unwrap();
        let back = parse(std::io::Cursor::new(&text)).unwrap();
        assert_eq!(back.workloads.len(), trace.workloads.len());
        assert_eq!(back.invocations(), trace.invocations());
        let dir = std::env::temp_dir().join(format!("tandem-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gz = dir.join("t.csv.gz");
        write(&trace, &gz).unwrap();
        assert_eq!(read(&gz).unwrap(), back, "gzip reads the same");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_lines_are_errors_that_name_the_line() {
        let cases = [
            ("", "empty"),
            ("workload,start\n", "header"),
            (
                "workload,start_s,duration_s\na,1,0.1\nb,0.5,0.1\n",
                "line 3: start_s 0.5 is before",
            ),
            (
                "workload,start_s,duration_s\na,x,0.1\n",
                "line 2: start_s `x`",
            ),
            (
                "workload,start_s,duration_s\na,1\n",
                "line 2: expected 3 fields",
            ),
            (
                "workload,start_s,duration_s\na,1,-2\n",
                "line 2: duration_s",
            ),
            ("workload,start_s,duration_s\n", "no invocations"),
        ];
        for (text, wanted) in cases {
            let error = parse(std::io::Cursor::new(text)).unwrap_err();
            assert!(format!("{error:#}").contains(wanted), "{text:?}: {error:#}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
        let g = |seed| {
            generate(&Generator {
                workloads: 50,
                days: 2.0,
                seed,
            })
        };
        assert_eq!(g(1), g(1));
        assert_ne!(g(1), g(2));
    }

    #[test]
    fn the_generated_mix_follows_the_published_shares() {
        let trace = generate(&Generator {
            workloads: 1000,
            days: 7.0,
            seed: 11,
        });
        let n = trace.workloads.len() as f64;
        let share = |f: &dyn Fn(&Workload) -> bool| {
            trace.workloads.iter().filter(|w| f(w)).count() as f64 / n
        };
        let per_day = |w: &Workload| w.1.len() as f64 / 7.0;
        let hourly = share(&|w| per_day(w) <= 24.0);
        let minutely = share(&|w| per_day(w) <= 1440.0);
        assert!((0.38..0.52).contains(&hourly), "{hourly}");
        assert!((0.75..0.87).contains(&minutely), "{minutely}");
        let timers = share(&|w| w.0.starts_with("timer"));
        assert!((0.25..0.35).contains(&timers), "{timers}");
        // Inter-arrival CV above 1 for about 40%.
        let cv_above_1 = share(&|w| {
            let gaps: Vec<f64> =
                w.1.windows(2)
                    .map(|p| p[1].start_s - p[0].start_s)
                    .collect();
            if gaps.len() < 3 {
                return false;
            }
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            var.sqrt() / mean > 1.0
        });
        assert!((0.33..0.55).contains(&cv_above_1), "{cv_above_1}");
    }
}
