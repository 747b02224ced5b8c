//! `forget`, `protect`, `prune` and `stats` through the real binary on real images.

mod common;
use common::*;

use serde_json::Value;

/// Four points of an image that changes a little each time (they share most blocks).
fn four_points(e: &Env) -> Vec<(String, std::path::PathBuf)> {
    e.init();
    let mut out = Vec::new();
    for i in 0..4u64 {
        let img = e.path(&format!("img-{i}.raw"));
        if i == 0 {
            make_image(&img, 24 * MIB, 7);
        } else {
            std::fs::copy(e.path(&format!("img-{}.raw", i - 1)), &img).unwrap();
            scatter_writes(&img, 40, 100 + i);
        }
        let p = e.backup(&img, "web", &[]);
        out.push((p["id"].as_str().unwrap().to_string(), img));
    }
    out
}

fn ids(e: &Env) -> Vec<String> {
    e.json(&["points"]).as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect()
}

fn restores_exactly(e: &Env, id: &str, img: &std::path::Path) {
    let out = e.path("check.raw");
    let _ = std::fs::remove_file(&out);
    e.restore(&format!("web@{}", &id[..12]), &out, &[]);
    assert!(same_content(&out, img), "point {} does not restore to its image", &id[..8]);
}

fn stored_bytes(e: &Env) -> u64 {
    e.files("packs").iter().map(|p| p.metadata().unwrap().len()).sum()
}

#[test]
fn forget_then_prune_reclaims_space_and_every_kept_point_restores() {
    let e = Env::new();
    let pts = four_points(&e);
    // A dry run lists every point with its fate and changes nothing.
    let plan = e.json(&["forget", "--keep-last", "2", "--dry-run"]);
    let fates: Vec<Value> =
        plan["groups"][0]["points"].as_array().unwrap().iter().map(|p| p["kept_by"].clone()).collect();
    assert_eq!(fates, [Value::from("last"), Value::from("last"), Value::Null, Value::Null], "{plan}");
    assert_eq!(ids(&e).len(), 4);
    let before = stored_bytes(&e);

    let done = e.json(&["forget", "--keep-last", "2", "--prune", "--grace", "0", "--max-unused", "0"]);
    assert_eq!(done["removed"]["points"].as_array().unwrap().len(), 2, "{done}");
    let prune = &done["prune"];
    assert!(prune["deleted"]["packs"].as_u64().unwrap() > 0, "{prune}");
    assert!(prune["pending"].as_array().unwrap().is_empty(), "{prune}");
    let after = stored_bytes(&e);
    assert!(after < before, "prune reclaimed nothing: {before} -> {after}");
    assert_eq!(ids(&e), [pts[2].0.clone(), pts[3].0.clone()]);
    for (id, img) in &pts[2..] {
        restores_exactly(&e, id, img);
    }
    let v = e.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["unindexed_packs"].as_array().is_none_or(|u| u.is_empty()), "{v}");
    // Converged: a second prune finds nothing to do.
    let again = e.json(&["prune", "--grace", "0"]);
    assert_eq!(
        (again["deleted"]["packs"].as_u64(), again["newly_marked"]["packs"].as_u64()),
        (Some(0), Some(0)),
        "{again}"
    );
}

#[test]
fn a_protected_point_outlives_every_policy_until_unprotected() {
    let e = Env::new();
    let pts = four_points(&e);
    let oldest = format!("web@{}", &pts[0].0[..12]);
    let p = e.json(&["protect", &oldest]);
    assert_eq!(p["changed"], true, "{p}");
    let listed = e.json(&["points"]);
    assert_eq!(listed[0]["protected"], true, "{listed}");
    // Explicit removal of a protected point is refused, saying how to release it.
    let err = e.fails(&["forget", &oldest], 1);
    assert!(err.contains("protected") && err.contains("--unprotect"), "{err}");
    let done = e.json(&["forget", "--keep-last", "1", "--prune", "--grace", "0"]);
    let kept: Vec<&str> = done["groups"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["kept_by"].is_null())
        .map(|p| p["kept_by"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["last", "protected"], "{done}");
    assert_eq!(ids(&e), [pts[0].0.clone(), pts[3].0.clone()]);
    restores_exactly(&e, &pts[0].0, &pts[0].1);
    restores_exactly(&e, &pts[3].0, &pts[3].1);
    e.ok(&["protect", &oldest, "--unprotect"]);
    e.ok(&["forget", "--keep-last", "1"]);
    assert_eq!(ids(&e), [pts[3].0.clone()]);
}

#[test]
fn forget_refuses_what_would_remove_by_accident() {
    let e = Env::new();
    four_points(&e);
    let err = e.fails(&["forget"], 1);
    assert!(err.contains("--keep-"), "{err}");
    let err = e.fails(&["forget", "nosuchvm", "--keep-last", "1"], 1);
    assert!(err.contains("nosuchvm"), "{err}");
    let err = e.fails(&["forget", "web@latest", "--keep-last", "1"], 1);
    assert!(err.contains("NAME@POINT"), "{err}");
    assert_eq!(ids(&e).len(), 4);
}

#[test]
fn stats_show_deduplication_and_what_a_prune_would_reclaim() {
    let e = Env::new();
    let pts = four_points(&e);
    let s = e.json(&["stats"]);
    assert_eq!(s["points"], 4);
    let logical = s["logical_nonzero_bytes"].as_u64().unwrap();
    let unique = s["unique_raw_bytes"].as_u64().unwrap();
    // Four near-identical images: the data is stored about once.
    assert!(logical * 2 > 5 * unique, "logical {logical} vs unique {unique}: no deduplication seen");
    assert!(s["unique_stored_bytes"].as_u64().unwrap() < unique, "texty blocks must compress: {s}");
    assert_eq!(s["reclaimable_bytes"], 0, "{s}");
    e.ok(&["forget", &format!("web@{}", &pts[0].0[..12])]);
    e.ok(&["forget", &format!("web@{}", &pts[1].0[..12])]);
    let s = e.json(&["stats"]);
    assert_eq!(s["points"], 2);
    let would = s["repository"]["newly_marked"]["packs"].as_u64().unwrap()
        + s["repository"]["repacked"]["packs"].as_u64().unwrap();
    assert!(would > 0, "stats must see what a prune would reclaim: {s}");
    // Stats changed nothing.
    let p = e.json(&["prune", "--dry-run", "--grace", "0"]);
    assert_eq!(p["dry_run"], true);
    assert_eq!(ids(&e).len(), 2);
}
