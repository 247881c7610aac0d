//! `tandem trace` and `tandem plan` as a user runs them.

use std::process::Command;

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("run tandem")
}

#[test]
fn plan_prints_every_policy_as_json_for_a_generated_trace() {
    let dir = std::env::temp_dir().join(format!("tandem-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.csv.gz");
    let out = tandem(&[
        "trace",
        "--workloads",
        "60",
        "--days",
        "2",
        "--seed",
        "4",
        "--out",
        trace.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tandem(&[
        "plan",
        "--trace",
        trace.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let policies = plan["policies"].as_array().expect("policies");
    let names: Vec<&str> = policies
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "fixed-1m",
            "fixed-10m",
            "fixed-60m",
            "hybrid-histogram",
            "tandem-adaptive"
        ]
    );
    for policy in policies {
        for field in [
            "p50_cold_pct",
            "p75_cold_pct",
            "p90_cold_pct",
            "all_cold_pct",
            "waste_vs_fixed_10m",
        ] {
            let value = policy[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field}: {policy}"));
            assert!(value >= 0.0, "{field}: {policy}");
        }
    }
    assert_eq!(policies[1]["waste_vs_fixed_10m"], 1.0);
    // The same trace, uncompressed, as text: the same numbers.
    let plain = dir.join("trace.csv");
    let text = tandem(&[
        "trace",
        "--workloads",
        "60",
        "--days",
        "2",
        "--seed",
        "4",
        "--out",
        plain.to_str().unwrap(),
    ]);
    assert!(text.status.success());
    let table = tandem(&["plan", "--trace", plain.to_str().unwrap()]);
    let table = String::from_utf8(table.stdout).unwrap();
    let adaptive = &policies[4];
    assert!(
        table.contains(&format!(
            "{:.2}",
            adaptive["p75_cold_pct"].as_f64().unwrap()
        )),
        "{table}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plan_rejects_a_bad_trace_naming_the_line() {
    let dir = std::env::temp_dir().join(format!("tandem-plan-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("bad.csv");
    std::fs::write(&trace, "workload,start_s,duration_s\na,10,1\na,5,1\n").unwrap();
    let out = tandem(&["plan", "--trace", trace.to_str().unwrap()]);
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("line 3") && error.contains("sorted"),
        "{error}"
    );
    let out = tandem(&["plan", "--trace", dir.join("missing.csv").to_str().unwrap()]);
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}
