//! Drops the unwind tables from the release binary of aarch64-musl (the
//! static build that ships to boards and has a 4 MiB budget): with
//! panic=abort nothing unwinds. Only the `skiff` binary gets it; tests and
//! benches unwind, and the other targets keep their tables for debuggers.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cross/no-unwind-tables.ld");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let musl = std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|e| e == "musl");
    // Only where .cargo/config.toml links with rust-lld: GNU ld refuses
    // the script for crtbeginS.o, whose code refers to its `.eh_frame`
    // (an x86_64-musl release build failed to link).
    let lld = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "aarch64");
    // Cargo's CARGO_CFG_PANIC reports the target's default, not the
    // profile's `panic = "abort"`, so the release profile is the test.
    if release && musl && lld {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-T{dir}/cross/no-unwind-tables.ld");
    }
}
