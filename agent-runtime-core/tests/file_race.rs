//! The file tools against a process that swaps a directory for a symlink to the outside in a tight
//! loop while they work: nothing outside the project is ever read, written, listed or searched.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent_runtime_core::tools::{RuntimeExecutor, ToolContext, ToolExecutor};
use rustix::fs::{CWD, RenameFlags, renameat_with};
use serde_json::{Value, json};

/// Swaps `<root>/d` (the real directory) and `<root>/swap` (the symlink to the outside) atomically,
/// endlessly, until stopped.
struct Flipper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Flipper {
    fn start(root: &Path) -> Flipper {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, a, b) = (stop.clone(), root.join("d"), root.join("swap"));
        let thread = std::thread::spawn(move || {
            let mut flips = 0u64;
            while !flag.load(Ordering::Relaxed) {
                renameat_with(CWD, &a, CWD, &b, RenameFlags::EXCHANGE).unwrap();
                flips += 1;
            }
            flips
        });
        Flipper { stop, thread }
    }

    /// Stops the flipping and says how many swaps were made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_flipped_to_a_symlink_never_leads_reads_or_writes_outside() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("project");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("d/f.txt"), "inside\n").unwrap();
    std::fs::write(outside.join("f.txt"), "SECRET\n").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("swap")).unwrap();

    let flipper = Flipper::start(&root);

    let exec = RuntimeExecutor::default();
    let ctx = ToolContext::new(&root);
    let (mut reads_inside, mut writes) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if let Ok(v) = exec.execute(&ctx, "read_file", json!({"path": "d/f.txt"})).await {
            assert!(!v.to_string().contains("SECRET"), "read outside: {v}");
            reads_inside += 1;
        }
        if exec
            .execute(&ctx, "write_file", json!({"path": "d/w.txt", "content": "w"}))
            .await
            .is_ok()
        {
            writes += 1;
        }
        let _ = exec
            .execute(&ctx, "delete_file", json!({"path": "d/w.txt"}))
            .await;
    }
    let flips = flipper.stop();

    let mut left: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        (left, std::fs::read_to_string(outside.join("f.txt")).unwrap()),
        (vec!["f.txt".to_string()], "SECRET\n".to_string()),
        "the outside folder changed"
    );
    assert!(flips > 1000, "the flipper ran ({flips} flips)");
    assert!(
        reads_inside > 0 && writes > 0,
        "the tools worked in between ({reads_inside} reads, {writes} writes)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_flipped_to_a_symlink_never_leads_listings_or_searches_outside() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("project");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("d/f.txt"), "inside\n").unwrap();
    std::fs::write(outside.join("f.txt"), "SECRET\n").unwrap();
    std::fs::write(outside.join("only-outside.txt"), "SECRET\n").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("swap")).unwrap();
    let flipper = Flipper::start(&root);

    // Whatever the timing, a listing holds only these names and a search only these lines; a call
    // that meets the symlink fails instead.
    let names: BTreeSet<&str> = ["d", "d/", "d/f.txt", "swap", "swap/", "swap/f.txt"].into();
    let lines: BTreeSet<&str> = ["d/f.txt:1: inside", "swap/f.txt:1: inside"].into();
    let strings = |v: &Value, key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("no `{key}` in {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let exec = RuntimeExecutor::default();
    let ctx = ToolContext::new(&root);
    let (mut listed_inside, mut found_inside) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        for args in [json!({"path": "d"}), json!({"recursive": true})] {
            if let Ok(v) = exec.execute(&ctx, "list_files", args).await {
                let got = strings(&v, "entries");
                assert!(
                    got.iter().all(|n| names.contains(n.as_str())),
                    "listed outside: {v}"
                );
                listed_inside += usize::from(got.iter().any(|n| n.ends_with("f.txt")));
            }
        }
        for args in [
            json!({"query": "SECRET|inside", "path": "d"}),
            json!({"query": "SECRET|inside"}),
        ] {
            if let Ok(v) = exec.execute(&ctx, "search_in_code", args).await {
                let got = strings(&v, "matches");
                assert!(
                    got.iter().all(|l| lines.contains(l.as_str())),
                    "searched outside: {v}"
                );
                found_inside += usize::from(!got.is_empty());
            }
        }
    }
    let flips = flipper.stop();
    assert!(flips > 1000, "the flipper ran ({flips} flips)");
    assert!(
        listed_inside > 0 && found_inside > 0,
        "the tools worked in between ({listed_inside} listings, {found_inside} searches)"
    );
}
