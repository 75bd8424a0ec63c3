//! Builds the preload library (`crates/ustad-preload`) into `OUT_DIR`, for `src/preload.rs` to
//! embed in a section of the executable file that is not loaded (`.incbin`): `cargo build`,
//! `cargo install --path crates/ustad-cli` and a copy of the one `ustad` file then carry it.
//!
//! The library has no dependencies, so `rustc` alone builds it, for the same target as the
//! binary: no nested cargo, no second lock or target directory, nothing to fetch. It is built
//! optimized, with `panic=abort` and stripped, whatever the profile: it runs inside every
//! worker. On targets it does not support (not Linux with glibc on x86, ARM or RISC-V: the
//! library would be loaded into glibc programs, and its constants are those architectures'),
//! an empty file stands in for it and `ustad` runs without it.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SUPPORTED_ARCHES: &[&str] = &["x86_64", "x86", "aarch64", "arm", "riscv64"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ustad_preload)");
    order_hot_code();
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let source = manifest.join("../ustad-preload/src");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("libustad_preload.so");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed=build.rs");

    let var = |name: &str| env::var(name).unwrap_or_default();
    let target = var("TARGET");
    let supported = var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && SUPPORTED_ARCHES.contains(&var("CARGO_CFG_TARGET_ARCH").as_str());
    if !supported {
        println!(
            "cargo:warning=ustad: no preload library for {target}: programs that bind their own port will not get ustad's sockets (they can take fd 3)"
        );
        std::fs::write(&out, b"").expect("writing an empty preload library");
        println!("cargo:rustc-env=USTAD_PRELOAD_LEN=0");
        println!("cargo:rustc-env=USTAD_PRELOAD_FNV=0");
        return;
    }

    // The linker cargo would use for this target, when it is given in the environment.
    let linker_var = format!(
        "CARGO_TARGET_{}_LINKER",
        target.to_uppercase().replace(['-', '.'], "_")
    );
    println!("cargo:rerun-if-env-changed={linker_var}");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut command = Command::new(rustc);
    command
        .args(["--crate-name", "ustad_preload", "--crate-type", "cdylib"])
        .args(["--edition", "2024", "--target", &target])
        .args(["-C", "opt-level=2", "-C", "codegen-units=1"])
        .args(["-C", "panic=abort", "-C", "strip=symbols"])
        .arg("-o")
        .arg(&out)
        .arg(source.join("lib.rs"));
    if let Ok(linker) = env::var(&linker_var) {
        command.arg("-C").arg(format!("linker={linker}"));
    }
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run rustc to build the preload library: {error}"));
    if !output.status.success() {
        panic!(
            "building the preload library failed ({:?}):\n{}",
            command,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Its length and hash, for src/preload.rs to find and check its copy in the executable file.
    let library = std::fs::read(&out).expect("reading the preload library");
    println!("cargo:rustc-env=USTAD_PRELOAD_LEN={}", library.len());
    println!("cargo:rustc-env=USTAD_PRELOAD_FNV={}", fnv1a(&library));
    // src/preload.rs puts it in a section of its own with the assembler's `.incbin "<path>"`.
    assert!(
        !out.to_string_lossy().contains(['"', '\\', '\n']),
        "the preload library's path cannot be quoted for the assembler: {}",
        out.display()
    );
    println!("cargo:rustc-cfg=ustad_preload");
}

/// The functions a primary runs (`hot-symbols.txt`, made by `bench/hot_symbols.sh`), placed
/// together at the start of the program's code, in a release build whose linker can.
///
/// The kernel maps a program's code 64 KiB around each page it faults in (fault-around), or a
/// whole page-cache folio, so what the primary keeps resident is every window holding a
/// function it ever ran: in the linker's own order, the ~1.4 MiB of functions a primary runs
/// are spread over nearly all of the ~2.7 MiB of code (client commands, the demo worker,
/// `ustad check`, error paths), and nearly all of it stays resident. Placed together, 1 MiB
/// less is (docs/benchmarks.md, "Scale").
///
/// The file names symbols as this toolchain mangles them: after a toolchain or dependency
/// update, names that are no longer there are skipped (`--no-warn-symbol-ordering`) and the
/// layout falls back towards the linker's own, until the file is made again. The option is
/// LLD's (rustc's own linker for this target since 1.90) and mold's, not GNU ld's: it is given
/// only when a probe program links with it, with the same rustc, linker and flags.
fn order_hot_code() {
    println!("cargo:rerun-if-changed=hot-symbols.txt");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let var = |name: &str| env::var(name).unwrap_or_default();
    if var("PROFILE") != "release" || var("CARGO_CFG_TARGET_OS") != "linux" {
        return;
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let order = manifest.join("hot-symbols.txt");
    if !order.is_file() || order.to_string_lossy().contains([',', ' ']) {
        return;
    }
    let args = [
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        "-Wl,--no-warn-symbol-ordering".to_owned(),
    ];
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let probe = out.join("order_probe.rs");
    std::fs::write(&probe, "fn main() {}\n").expect("writing the link probe");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut command = Command::new(rustc);
    command
        .args(["--target", &var("TARGET"), "-o"])
        .arg(out.join("order_probe"))
        .arg(&probe);
    for arg in &args {
        command.arg("-C").arg(format!("link-arg={arg}"));
    }
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        command.arg("-C").arg(format!("linker={linker}"));
    }
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    command.args(flags.split('\x1f').filter(|flag| !flag.is_empty()));
    let links = command.output().is_ok_and(|output| output.status.success());
    if links {
        for arg in args {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
}

/// FNV-1a, 64 bits (the same as src/preload.rs's).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
