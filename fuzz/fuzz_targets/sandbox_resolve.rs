//! Fuzzes path confinement (`tools::sandbox::resolve`) in a project whose symlinks point outside,
//! in, in a loop and nowhere: an accepted path and what exists of it are always inside the root.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use agent_runtime_core::tools::sandbox;
use libfuzzer_sys::fuzz_target;

/// The project root (canonical), beside an `outside` directory, kept for the whole run.
fn root() -> &'static Path {
    static ROOT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &ROOT
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temp dir");
            let root = dir.path().join("root");
            let outside = dir.path().join("outside");
            std::fs::create_dir_all(root.join("sub/deeper")).expect("dirs");
            std::fs::create_dir_all(&outside).expect("outside");
            std::fs::write(outside.join("secret"), "s").expect("secret");
            std::fs::write(root.join("sub/file"), "f").expect("file");
            let link = |to: &Path, at: &str| std::os::unix::fs::symlink(to, root.join(at)).expect("link");
            link(&outside, "out");
            link(&outside.join("secret"), "sub/secret");
            link(&outside.join("missing"), "dangling");
            link(Path::new("../.."), "sub/deeper/up");
            link(Path::new("sub"), "in");
            link(Path::new("loop"), "loop");
            link(Path::new("/"), "slash");
            let root = root.canonicalize().expect("canonical root");
            (dir, root)
        })
        .1
}

fuzz_target!(|input: &[u8]| {
    let Ok(path) = std::str::from_utf8(input) else {
        return;
    };
    let root = root();
    // `@` stands for the root's own absolute path, which models often echo.
    let path = path.replace('@', &root.display().to_string());
    let Ok(resolved) = sandbox::resolve(root, &path) else {
        return;
    };
    assert!(resolved.starts_with(root), "{path:?} -> {resolved:?}");
    assert!(!path.is_empty() && !path.contains('\0'), "{path:?} accepted");
    let mut existing: &Path = &resolved;
    while !existing.exists() {
        existing = existing.parent().expect("the root exists");
    }
    let real = existing.canonicalize().expect("an existing path canonicalizes");
    assert!(
        real.starts_with(root),
        "{path:?} -> {resolved:?} is really {real:?}"
    );
});
