//! Finds libmoert for the linker, with no crates: MOERT_LIB_DIR when set (the directory holding
//! libmoert.so), otherwise `pkg-config --libs moert` (PKG_CONFIG names another pkg-config; set
//! PKG_CONFIG_PATH to the directory of moert.pc, or of moert-uninstalled.pc in a build tree).
//!
//! The directory reaches dependents' build scripts as DEP_MOERT_LIB_DIR, with DEP_MOERT_RPATH
//! when the library is to be found there at run time (moert.pc's `-Wl,-rpath,DIR`, or
//! MOERT_LIB_DIR). Cargo applies a library's linker arguments to no program that uses it
//! (rust-lang/cargo#9554), so a program sets that run path in its own build script; the `moert`
//! crate passes it on as DEP_MOERT_RS_RPATH (see examples/rust/build.rs).

use std::env;
use std::process::Command;

fn main() {
    for var in [
        "MOERT_LIB_DIR",
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    if let Some(dir) = env::var_os("MOERT_LIB_DIR").filter(|d| !d.is_empty()) {
        let dir = dir.to_string_lossy();
        println!("cargo:rustc-link-search=native={dir}");
        println!("cargo:rustc-link-lib=dylib=moert");
        println!("cargo:lib_dir={dir}");
        rpath(&dir);
        return;
    }

    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let output = Command::new(&pkg_config).args(["--libs", "moert"]).output();
    let flags = match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => fail(&format!(
            "`{pkg_config} --libs moert` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(err) => fail(&format!("cannot run `{pkg_config}`: {err}")),
    };

    let mut linked = false;
    for flag in flags.split_whitespace() {
        if let Some(dir) = flag.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={dir}");
            println!("cargo:lib_dir={dir}");
        } else if let Some(lib) = flag.strip_prefix("-l") {
            println!("cargo:rustc-link-lib=dylib={lib}");
            linked |= lib == "moert";
        } else if let Some(dirs) = flag
            .strip_prefix("-Wl,-rpath,")
            .or_else(|| flag.strip_prefix("-Wl,-rpath="))
        {
            for dir in dirs.split(',') {
                rpath(dir);
            }
        }
    }
    if !linked {
        fail(&format!(
            "`{pkg_config} --libs moert` names no -lmoert: {flags}"
        ));
    }
}

/// A run path: for this crate's own tests, and for dependents to apply to their programs.
fn rpath(dir: &str) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    println!("cargo:rpath={dir}");
}

fn fail(why: &str) -> ! {
    eprintln!(
        "moert-sys: libmoert not found: {why}\n\
         Set MOERT_LIB_DIR to the directory of libmoert.so, or PKG_CONFIG_PATH to the directory \
         of moert.pc (after `cmake --install`, <prefix>/lib/pkgconfig)."
    );
    std::process::exit(1);
}
