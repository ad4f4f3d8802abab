//! Gives the shared library an ABI name (ELF SONAME), so that programs record
//! `liblra.so.<abi>` instead of the bare `liblra.so` and an incompatible
//! lra can be installed beside the old one.
//!
//! The rule is cargo-c's: `<major>` from 1.0 on, `0.<minor>` before
//! (0.1 → 0.2 may break the ABI). `scripts/install.sh` installs the real
//! file as `liblra.so.<version>` with the links `liblra.so.<abi>` and
//! `liblra.so`; the `bindings` test stage checks that the two agree.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let major = env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets the version");
    let minor = env::var("CARGO_PKG_VERSION_MINOR").expect("cargo sets the version");
    let abi = if major == "0" {
        format!("0.{minor}")
    } else {
        major
    };
    let soname = format!("liblra.so.{abi}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");

    link_beside_the_library(&soname);
}

/// Programs linked with `-L target/release -llra` now need
/// `liblra.so.<abi>` at run time; put that name beside the library cargo
/// writes (OUT_DIR is <target>/<profile>/build/lra-<hash>/out), so the
/// build tree works like an installed prefix. Outside OUT_DIR, which cargo
/// reserves for build scripts: a convenience for in-tree linking only,
/// degrading to a warning; `scripts/install.sh` is the supported layout.
#[cfg(unix)]
fn link_beside_the_library(soname: &str) {
    let out_dir = env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let profile_dir = Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .filter(|dir| dir.join("build").is_dir());
    let Some(profile_dir) = profile_dir else {
        println!("cargo:warning=lra: unexpected OUT_DIR layout; no {soname} link made");
        return;
    };
    let link = profile_dir.join(soname);
    if std::fs::read_link(&link).is_ok_and(|target| target == Path::new("liblra.so")) {
        return;
    }
    let _ = std::fs::remove_file(&link);
    if let Err(err) = std::os::unix::fs::symlink("liblra.so", &link) {
        println!(
            "cargo:warning=lra: could not link {} -> liblra.so: {err}",
            link.display()
        );
    }
}

#[cfg(not(unix))]
fn link_beside_the_library(_soname: &str) {}
