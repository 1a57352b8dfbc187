//! The crate graph docs/ARCHITECTURE.md documents (its `text` block under "Code map") is the
//! one `cargo metadata` sees: a dependency added or dropped without the map changing fails here.

use std::collections::BTreeMap;

type Graph = BTreeMap<String, Vec<String>>;

/// The block of `name: dep dep ...` lines that follows "Exactly, as `cargo metadata`".
fn documented() -> Graph {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ARCHITECTURE.md");
    let text = std::fs::read_to_string(path).expect("docs/ARCHITECTURE.md");
    let after = text
        .split_once("Exactly, as `cargo metadata` must see it")
        .expect("ARCHITECTURE.md documents the crate graph")
        .1;
    let block = after
        .split_once("```text\n")
        .expect("a text block after the sentence")
        .1
        .split_once("```")
        .expect("the block ends")
        .0;
    block
        .lines()
        .map(|l| {
            let (name, deps) = l.split_once(':').expect("`name: deps`");
            let mut deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            deps.sort();
            (name.trim().to_string(), deps)
        })
        .collect()
}

fn actual() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let mut graph = Graph::new();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().expect("name").to_string();
        let mut deps: Vec<String> = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].is_null()) // normal dependencies only
            .filter_map(|d| d["name"].as_str())
            .filter(|n| n.starts_with("keel-"))
            .map(str::to_string)
            .collect();
        deps.sort();
        deps.dedup();
        graph.insert(name, deps);
    }
    graph
}

#[test]
fn the_documented_crate_graph_is_the_real_one() {
    let (doc, real) = (documented(), actual());
    assert!(
        doc == real,
        "docs/ARCHITECTURE.md's crate graph differs from cargo metadata:\ndocumented: {doc:#?}\ncargo:      {real:#?}"
    );
}
