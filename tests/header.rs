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
        // Written, so there is nothing to compare: say so rather than pass
        // a comparison of the header with itself.
        eprintln!("include/lra.h regenerated (LRA_UPDATE_HEADER); run without it to check");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/lra.h differs from cbindgen's output; run LRA_UPDATE_HEADER=1 cargo test --test header"
    );
}

/// The names lra's messages give optimizers and dtypes ("… for bf16",
/// "this handle runs 5 (adam)") are the header's own enumerators, lowercased
/// and without their prefix, each with its value.
#[test]
fn names_in_messages_are_the_header_enumerators() {
    use lra::optim::{DType, OptimizerKind};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/lra.h")).unwrap();
    let kinds = OptimizerKind::ALL.map(|k| ("OPTIMIZER", k.name(), k as u32));
    let dtypes = (0..)
        .map_while(DType::from_u32)
        .map(|d| ("DTYPE", d.name(), d as u32));
    let mut seen = 0;
    for (prefix, name, value) in kinds.into_iter().chain(dtypes) {
        let define = format!("#define LRA_{prefix}_{} {value}\n", name.to_uppercase());
        assert!(header.contains(&define), "lra.h lacks {define:?}");
        seen += 1;
    }
    assert_eq!(seen, 10, "7 optimizers and 3 dtypes");
}
