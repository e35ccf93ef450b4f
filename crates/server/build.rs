//! Records the git commit the server is built from, for the `build_info` metric: a scrape then
//! says which code is running without anyone having to match versions by hand.
//!
//! Sets `INTERNVL_GIT_COMMIT` to the build environment's `INTERNVL_GIT_COMMIT` if given, else
//! `git rev-parse --short HEAD`, else "unknown" (a source tarball).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    // A container build has no `.git`: it passes the commit in as a build argument instead.
    println!("cargo:rerun-if-env-changed=INTERNVL_GIT_COMMIT");
    let commit = std::env::var("INTERNVL_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&manifest_dir, &["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=INTERNVL_GIT_COMMIT={commit}");

    // Without any rerun-if-changed line cargo reruns this on every change to the package;
    // with one, only when a named file changes. A named file that does not exist makes cargo
    // rerun it on every build, so only existing files are named: HEAD (branch switches) and
    // the ref it points at (commits), plus packed-refs where refs get packed.
    println!("cargo:rerun-if-changed=build.rs");
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&manifest_dir, &["symbolic-ref", "-q", "HEAD"]));
    for name in &watched {
        // --git-path resolves refs into the common directory of a linked worktree too.
        let args = ["rev-parse", "--path-format=absolute", "--git-path", name];
        if let Some(path) = git(&manifest_dir, &args).filter(|p| Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// The trimmed standard output of a successful git command run in `dir`, if any.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}
