//! What the repository's layout promises: it explains itself, and the
//! process has one async runtime.

use std::path::Path;
use std::process::Command;

fn tracked_files() -> Vec<String> {
    let files = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(files.status.success(), "git ls-files failed");
    String::from_utf8(files.stdout)
        .unwrap()
        .split('\0')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// The repository explains itself: no tracked file sends the reader to a
/// design document outside it.
#[test]
fn no_file_cites_a_document_outside_the_repository() {
    let root = env!("CARGO_MANIFEST_DIR");
    let outside = ["DESIGN", ".md"].concat();
    let shared = ["../", "shared/"].concat();
    for name in tracked_files() {
        let Ok(text) = std::fs::read_to_string(Path::new(root).join(&name)) else {
            continue;
        };
        assert!(
            !text.contains(&outside) && !text.contains(&shared),
            "{name} points outside the repository"
        );
    }
    let architecture = std::fs::read_to_string(format!("{root}/docs/architecture.md")).unwrap();
    for part in [
        "## Layers",
        "## What `flash` does",
        "## The card's boot sequence",
    ] {
        assert!(
            architecture.contains(part),
            "docs/architecture.md lacks {part}"
        );
    }
}

/// The AWS SDK, the broker's database and its server share one tokio runtime
/// (src/runtime.rs): nothing else in the program builds one.
#[test]
fn one_async_runtime_is_built_in_one_place() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let builds = ["runtime::", "Builder"].concat();
    let places: Vec<String> = tracked_files()
        .into_iter()
        .filter(|name| name.starts_with("src/") && name.ends_with(".rs"))
        .filter(|name| {
            std::fs::read_to_string(root.join(name)).is_ok_and(|text| text.contains(&builds))
        })
        .collect();
    assert_eq!(places, ["src/runtime.rs"]);
}

/// A command's settings are written once: as clap types in src/cmdline/,
/// handed whole to the function that does the work. No clap attribute lives
/// anywhere else.
#[test]
fn clap_types_live_in_cmdline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let marks = [["#[", "arg("].concat(), ["#[", "command("].concat()];
    let elsewhere: Vec<String> = tracked_files()
        .into_iter()
        .filter(|name| {
            name.starts_with("src/") && name.ends_with(".rs") && !name.starts_with("src/cmdline/")
        })
        .filter(|name| {
            std::fs::read_to_string(root.join(name))
                .is_ok_and(|text| marks.iter().any(|mark| text.contains(mark.as_str())))
        })
        .collect();
    assert!(
        elsewhere.is_empty(),
        "clap attributes outside src/cmdline: {elsewhere:?}"
    );
}
