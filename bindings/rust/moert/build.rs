//! Passes on the run path to libmoert that moert-sys found (DEP_MOERT_RPATH), so that a program
//! depending on this crate reads it as DEP_MOERT_RS_RPATH in its own build script: Cargo gives
//! DEP_* values to direct dependents only, and applies no library's linker arguments to the
//! programs that use it (rust-lang/cargo#9554). examples/rust/build.rs shows the two lines a
//! program needs.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MOERT_RPATH");
    if let Ok(dir) = std::env::var("DEP_MOERT_RPATH") {
        println!("cargo:rpath={dir}");
        // This crate's own tests.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
