//! Builds every plugin under `plugins/` and `tests/plugins/` for `wasm32-wasip2`, so that tests run the real
//! components built from source (never a checked-in `.wasm`). The nested cargo uses
//! its own target directory, so it never waits on the outer build's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: put plugins beside <profile>.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|t| t.join("wasm-plugins"))
        .unwrap_or_else(|| out_dir.join("wasm-plugins"));

    for dir in ["plugins", "tests/plugins", "sdk-guest", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    // The example plugins and the test plugins (hostile, passthrough).
    let mut packages = Vec::new();
    for dir in ["plugins", "tests/plugins"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let manifest = entry.unwrap().path().join("Cargo.toml");
            if manifest.exists() {
                packages.push(package_name(&manifest));
            }
        }
    }
    packages.sort();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--target", "wasm32-wasip2", "--profile", "plugin"])
        .arg("--target-dir")
        .arg(&target_dir);
    for p in &packages {
        cmd.args(["-p", p]);
    }
    // Do not inherit the outer build's flags or wrappers (e.g. clippy's).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the plugins for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`)"
        );
    }
    let artifacts = target_dir.join("wasm32-wasip2").join("plugin");
    println!("cargo:rustc-env=WEIR_PLUGIN_DIR={}", artifacts.display());
}

fn package_name(manifest: &Path) -> String {
    let text = std::fs::read_to_string(manifest).unwrap();
    text.lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("name").map(|rest| {
                rest.trim_start_matches([' ', '='])
                    .trim_matches('"')
                    .to_owned()
            })
        })
        .expect("plugin manifest has a package name")
}
