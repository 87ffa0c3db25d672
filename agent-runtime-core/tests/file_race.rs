//! The file tools against a process that swaps a directory for a symlink to the outside in a tight
//! loop while they work: nothing outside the project is ever read or written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent_runtime_core::tools::{RuntimeExecutor, ToolContext, ToolExecutor};
use rustix::fs::{CWD, RenameFlags, renameat_with};
use serde_json::json;

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

    // Swaps `d` (the real directory) and `swap` (the symlink to the outside) atomically, endlessly.
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, a, b) = (stop.clone(), root.join("d"), root.join("swap"));
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                renameat_with(CWD, &a, CWD, &b, RenameFlags::EXCHANGE).unwrap();
                flips += 1;
            }
            flips
        })
    };

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
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();

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
