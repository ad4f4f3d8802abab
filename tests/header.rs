//! `include/lra.h` must equal what cbindgen generates from the source.
//! Regenerate with `LRA_UPDATE_HEADER=1 cargo test --test header`.

use std::path::PathBuf;

#[test]
fn header_matches_cbindgen_output() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    // Only src/ffi.rs is the C ABI: generating from that file alone keeps
    // every other public Rust item out of the header.
    cbindgen::Builder::new()
        .with_src(root.join("src/ffi.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen failed")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = root.join("include/lra.h");
    if std::env::var_os("LRA_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/lra.h differs from cbindgen's output; run LRA_UPDATE_HEADER=1 cargo test --test header"
    );
}
