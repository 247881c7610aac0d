//! `tandem trace` and `tandem plan` as a user runs them.

use std::process::Command;

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("run tandem")
}

/// `tandem trace` of 60 workloads over 2 days, seed 4, to `out`.
fn generate(out: &std::path::Path) {
    let done = tandem(&[
        "trace",
        "--workloads",
        "60",
        "--days",
        "2",
        "--seed",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// `tandem plan --trace TRACE --format json EXTRA...`, which must succeed.
fn plan_json(trace: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "plan",
        "--trace",
        trace.to_str().unwrap(),
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = tandem(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn plan_prints_every_policy_as_json_for_a_generated_trace() {
    let dir = std::env::temp_dir().join(format!("tandem-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.csv.gz");
    generate(&trace);
    let plan = plan_json(&trace, &[]);
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
    // Placement: each workload Function or AlwaysOn, AlwaysOn exactly when
    // its cold starts as a Function pass the budget or a Function would
    // save under 10% of the replica's cost, and no placement dearer than
    // all AlwaysOn.
    let with = plan_json(&trace, &["--placement", "--cold-start-budget", "2%"]);
    let placement = &with["placement"];
    let workloads = placement["workloads"].as_array().unwrap();
    assert_eq!(workloads.len() as u64, plan["workloads"].as_u64().unwrap());
    for w in workloads {
        let cold = w["cold_pct"].as_f64().unwrap();
        let saving =
            1.0 - w["function_cost"].as_f64().unwrap() / w["always_on_cost"].as_f64().unwrap();
        let wanted = if cold > 2.0 || saving < 0.1 {
            "AlwaysOn"
        } else {
            "Function"
        };
        assert_eq!(w["placement"], wanted, "{w}");
        assert!(
            w["function_cost"].as_f64() <= w["always_on_cost"].as_f64(),
            "{w}"
        );
    }
    assert!(placement["cost"].as_f64() <= placement["allAlwaysOnCost"].as_f64());
    assert!(placement["cost"].as_f64() >= placement["allFunctionsCost"].as_f64());
    let bad = tandem(&[
        "plan",
        "--trace",
        trace.to_str().unwrap(),
        "--placement",
        "--cold-start-budget",
        "150%",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("between 0% and 100%"));
    // The same trace, uncompressed, as text: the same numbers.
    let plain = dir.join("trace.csv");
    generate(&plain);
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
