//! The loader's text handling: comments, literals, and the line numbers
//! its errors name (a kernel author goes to that line).

use ptx_interp::{Arg, Device, ErrorKind, LaunchConfig, Module};

const HEAD: &str = ".version 7.0\n.target sm_80\n.address_size 64\n";

/// The load error of `src` (after HEAD's three lines).
fn load_error(src: &str) -> String {
    match Module::load(&format!("{HEAD}{src}")) {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::Load, "{e}");
            e.message
        }
    }
}

/// `src` fails to load with a message that begins with `prefix` (the
/// line it names, and what it found there).
fn error_starts(src: &str, prefix: &str) {
    let msg = load_error(src);
    assert!(msg.starts_with(prefix), "{prefix:?} does not begin {msg}");
}

#[test]
fn errors_name_the_line_after_comments_of_every_kind() {
    // the bad instruction is on line 4 + 8 = 12 of the module
    let src = "\
.visible .entry k()
{
    // a line comment with /* inside
    .reg .b32 %v; // a trailing comment
    /* a block comment
       over three lines, with // inside */
    mov.u32 %v, 1; /* and one
    that ends mid-line */ mov.u32 %v, 2;
    bogus.u32 %v, %v;
    ret;
}
";
    error_starts(src, "line 12:");
    // a block comment's lines count even when it is the last thing before
    // the error, and a carriage return is whitespace, not a line
    error_starts(
        ".visible .entry k()\r\n{\r\n/*\n\n*/ bogus;\n}\n",
        "line 8:",
    );
    // the lexer's own errors
    error_starts(
        ".visible .entry k()\n{\n/* never closed\n",
        "line 6: unterminated comment",
    );
    let msg = load_error(".visible .entry k()\n{\n/*/\n");
    assert!(
        msg.contains("unterminated comment"),
        "a `/*/` opens a comment only: {msg}"
    );
    error_starts("\n.pragma \"nounroll\n;\n", "line 5: unterminated string");
    error_starts("\n\n#include\n", "line 6: unexpected character '#'");
    error_starts("\n/ 2\n", "line 5: unexpected character '/'");
    // the text may end inside a line comment or a string
    Module::load(&format!("{HEAD}// no newline at the end")).unwrap();
    error_starts(".pragma \"nounroll", "line 4: unterminated string");
    error_starts(
        ".visible .entry k()\n{\n    .reg .b32 %v;\n    mov.u32 %v, 1",
        "line 7: unexpected end of input",
    );
}

#[test]
fn pragma_nounroll_is_the_one_string() {
    let ok = ".visible .entry k()\n{\n.pragma \"nounroll\";\n    ret;\n}\n";
    Module::load(&format!("{HEAD}{ok}")).unwrap();
    let msg = load_error(".visible .entry k()\n{\n.pragma \"unroll\";\n    ret;\n}\n");
    assert!(msg.contains("unsupported .pragma"), "{msg}");
}

/// Stores each literal through a register of its type: `cases` are
/// (type, literal) pairs; returns the stored words (64-bit ones as two).
fn literals(cases: &[(&str, &str)]) -> Vec<u64> {
    let mut body = String::new();
    for (k, (ty, lit)) in cases.iter().enumerate() {
        let (reg, size) = if ty.ends_with("64") {
            ("%d", 8)
        } else {
            ("%w", 4)
        };
        body += &format!(
            "    mov.{ty} {reg}, {lit};\n    st.global.b{} [%o+{}], {reg};\n",
            8 * size,
            8 * k
        );
    }
    let src = format!(
        "{HEAD}.visible .entry k(.param .u64 out)\n{{\n    .reg .b32 %w;\n    .reg .b64 %o, %d;\n    ld.param.u64 %o, [out];\n{body}    ret;\n}}\n"
    );
    let m = Module::load(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let mut dev = Device::new();
    let out = dev.alloc_zeroed(8 * cases.len());
    dev.launch(&m, "k", &LaunchConfig::linear(1, 1), &[Arg::U64(out)])
        .unwrap();
    dev.read(out, 8 * cases.len())
        .unwrap()
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn every_literal_form_has_its_value() {
    let cases = [
        ("u32", "42"),
        ("u32", "42U"),
        ("u32", "0x1F"),
        ("u32", "0X1f"),
        ("u32", "0x1e"),
        ("u32", "0b101"),
        ("u32", "017"),
        ("s32", "-7"),
        ("u32", "0"),
        ("f32", "0f3F800000"),
        ("f32", "-0f3F800000"),
        ("f64", "0d3FF8000000000000"),
        ("f32", "1.5"),
        ("f32", "2.5e-1"),
        ("f64", "1e+2"),
        ("f64", "0.5e-1"),
        ("f64", "-0.5"),
        ("f32", "0.1"),
        ("b32", "0f40490FDB"),
        ("f64", "-0d3FF8000000000000"),
        ("f32", "-0fBF800000"),
        ("f64", "-0dBFF8000000000000"),
        ("f32", "-1.5"),
        ("b64", "0d3FF8000000000000"),
        ("s32", "-2147483648"),
        ("u32", "4294967295"),
    ];
    let want: [u64; 26] = [
        42,
        42,
        31,
        31,
        30,
        5,
        15,
        (-7i32) as u32 as u64,
        0,
        1f32.to_bits() as u64,
        (-1f32).to_bits() as u64,
        1.5f64.to_bits(),
        1.5f32.to_bits() as u64,
        0.25f32.to_bits() as u64,
        100f64.to_bits(),
        0.05f64.to_bits(),
        (-0.5f64).to_bits(),
        // a decimal literal is an f64 value, rounded once to f32
        (0.1f64 as f32).to_bits() as u64,
        0x4049_0FDB,
        (-1.5f64).to_bits(),
        1f32.to_bits() as u64,
        1.5f64.to_bits(),
        (-1.5f32).to_bits() as u64,
        1.5f64.to_bits(),
        0x8000_0000,
        0xffff_ffff,
    ];
    assert_eq!(literals(&cases), want);
    for (ty, lit, needle) in [
        ("f32", "0f3F80", "bad number"),
        ("f64", "0d3FF8", "bad number"),
        ("u32", "0x", "bad number"),
        ("u32", "09", "bad number"),
        ("u32", "0x100000000", "literal"),
        ("s32", "-0x80000001", "literal"),
        ("f32", "1", "integer literal"),
        ("f32", "0d3FF8000000000000", "literal"),
        ("b32", "-0f3F800000", "literal"),
        ("f64", "0f3F800000", "literal"),
        ("b32", "0d3FF8000000000000", "literal"),
        ("b64", "-0d3FF8000000000000", "literal"),
        ("s32", "-2147483649", "literal"),
        ("u32", "4294967296", "literal"),
    ] {
        let src = format!(".visible .entry k()\n{{\n    .reg .b32 %w;\n    .reg .f32 %f;\n    .reg .f64 %d;\n    mov.{ty} {}, {lit};\n    ret;\n}}\n",
            match ty { "f32" => "%f", "f64" | "b64" => "%d", _ => "%w" });
        let msg = load_error(&src);
        assert!(msg.contains(needle), "{ty} {lit}: {needle:?} not in {msg}");
    }
}

#[test]
fn parse_errors_name_the_token_s_line_or_the_last_one() {
    // a missing `;`: the parser stops at the next token, on line 7
    error_starts(
        ".visible .entry k()\n{\n    .reg .b32 %v\n    ret;\n}\n",
        "line 7:",
    );
    // the text ends inside the kernel: the last token's line
    error_starts(".visible .entry k()\n{\n\n    ret;\n\n", "line 7:");
    // a type outside the subset (of the 8-bit types only .b8, for byte
    // arrays, is known)
    error_starts(".visible .entry k(.param .u64 out)\n{\n    .reg .b16 %h;\n    .reg .b64 %o;\n    ld.global.u8 %h, [%o];\n    ret;\n}\n", "line 8:");
}

#[test]
fn a_module_lists_its_kernels_and_their_parameters() {
    let src = format!(
        "{HEAD}.visible .entry first(.param .u64 a, .param .u32 n, .param .align 4 .b8 blob[12])\n{{\n    ret;\n}}\n.visible .entry second()\n{{\n    ret;\n}}\n"
    );
    let m = Module::load(&src).unwrap();
    assert_eq!(m.kernel_names(), ["first", "second"]);
    let params = m.kernel_params("first").unwrap();
    assert_eq!(
        params,
        [
            ("a".to_string(), 8),
            ("n".to_string(), 4),
            ("blob".to_string(), 12)
        ]
    );
    assert_eq!(m.kernel_params("second").unwrap(), []);
    assert_eq!(m.kernel_params("third"), None);
    // an error prints as its kind and message
    let e = Module::load(&format!("{HEAD}bogus")).unwrap_err();
    assert_eq!(e.to_string(), format!("Load: {}", e.message));
}

#[test]
fn registers_must_fit_their_operands() {
    for (line, needle) in [
        ("    add.u32 %v, %p, 1;", "does not fit"),
        ("    add.u32 %o, %v, %v;", "does not fit"),
        ("    add.rn.f32 %f, %h, %f;", "does not fit"),
        ("    cvt.f32.f16 %f, %v;", "does not fit"),
        (
            "    selp.u32 %v, 1, 0, %v;",
            "%v is not a predicate register",
        ),
        (
            "    .shared .u32 s;\n    .shared .u32 s;",
            "shared variable s declared twice",
        ),
        (
            "    .extern .shared .b8 s[];\n    .shared .u32 s;",
            "shared variable s declared twice",
        ),
        ("    {\n    ret;\n    }", "nested blocks"),
    ] {
        let src = format!(
            ".visible .entry k()\n{{\n    .reg .pred %p;\n    .reg .b16 %h;\n    .reg .b32 %v;\n    .reg .f32 %f;\n    .reg .b64 %o;\n{line}\n    ret;\n}}\n"
        );
        let msg = load_error(&src);
        assert!(msg.contains(needle), "{line}: {needle:?} not in {msg}");
    }
    // what does fit: f16 in a 16-bit register, a 16-bit load into a wider one
    let ok = ".visible .entry k(.param .u64 p)\n{\n    .reg .b16 %h;\n    .reg .b32 %v;\n    .reg .f32 %f;\n    .reg .b64 %o;\n    ld.param.u64 %o, [p];\n    ld.global.b16 %v, [%o];\n    mov.b16 %h, 0;\n    cvt.f32.f16 %f, %h;\n    ret;\n}\n";
    Module::load(&format!("{HEAD}{ok}")).unwrap_or_else(|e| panic!("{e}"));
    // a parameter is a type and a name, with an optional alignment
    let msg = load_error(".visible .entry k(.param .u64 .ptr .global p)\n{\n    ret;\n}\n");
    assert!(
        msg.contains("unsupported parameter attribute .ptr"),
        "{msg}"
    );
}

#[test]
fn modifiers_and_forms_outside_the_subset_are_refused() {
    for (line, needle) in [
        (
            "    mov.u64 %o, %tid.x;",
            "special register %tid.x is 32-bit integer",
        ),
        (
            "    mov.f32 %f, %tid.x;",
            "special register %tid.x is 32-bit integer",
        ),
        ("    mov.pred %p, 1;", "mov.pred"),
        ("    .reg .b32 %x]", "expected ';', found Punct(']')"),
        (
            "    setp.eq.u32 %p|%q, %v, 1;",
            "setp destination must be one predicate",
        ),
        ("    mov.b32 {%h, _}, %v;", "unknown register or symbol _"),
        (
            "    ld.global.u32 %v, [%v];",
            "address register %v must be a 64-bit integer",
        ),
        (
            "    ld.global.u32 %v, [%d];",
            "address register %d must be a 64-bit integer",
        ),
        (
            "    ld.shared.u32 %v, [%f];",
            "address register %f must be a 64-bit integer",
        ),
        (
            "    add.rn.sat.f32 %f, %f, %f;",
            ".ftz/.sat are not supported",
        ),
        ("    add.rn.ftz.f32 %f, %f, %f;", ".ftz"),
        (
            "    min.NaN.f32 %f, %f, %f;",
            "unsupported min/max modifier",
        ),
        (
            "    max.xorsign.abs.f32 %f, %f, %f;",
            "unsupported min/max modifier",
        ),
        (
            "    max.abs.f32 %f, %f, %f;",
            "unsupported min/max modifier",
        ),
        (
            "    min.xorsign.f32 %f, %f, %f;",
            "unsupported min/max modifier",
        ),
        ("    shr.b8 %h, %h, 1;", "type not allowed"),
        ("    fma.lo.u32 %v, %v, %v, %v;", "unsupported type"),
        (
            "    ld.shared.u32 %v, [%v];",
            "address register %v must be a 64-bit integer",
        ),
        ("    and.u32 %v, %v, 1;", "type .U32 not allowed"),
        ("    add.b32 %v, %v, 1;", "type .B32 not allowed"),
        ("    add.sat.s32 %v, %v, 1;", ".sat/.cc are not supported"),
        ("    add.cc.u32 %v, %v, 1;", ".sat/.cc are not supported"),
        (
            "    fma.rn.sat.f32 %f, %f, %f, %f;",
            ".ftz/.sat are not supported",
        ),
        ("    fma.rz.f32 %f, %f, %f, %f;", "only .rn rounding"),
        (
            "    mad.wide.u64 %o, %o, %o, %o;",
            ".wide needs 16/32-bit integers",
        ),
        (
            "    mad.u32 %v, %v, %v, %v;",
            "integer mad needs .lo/.hi/.wide",
        ),
        (
            "    cvt.rn.sat.f32.f64 %f, %d;",
            ".ftz/.sat/.relu are not supported",
        ),
        (
            "    cvt.rn.relu.f16.f32 %h, %f;",
            ".ftz/.sat/.relu are not supported",
        ),
        (
            "    cvt.rn.satfinite.f16.f32 %h, %f;",
            ".ftz/.sat/.relu are not supported",
        ),
        ("    cvt.u32.pred %v, %p;", "cvt on predicates"),
        ("    cvt.b32.u16 %v, %h;", "cvt takes no .b types"),
        ("    cvt.u32.b16 %v, %h;", "cvt takes no .b types"),
        (
            "    cvt.rn.f16.bf16 %h, %h;",
            "this float conversion is not supported",
        ),
        (
            "    cvt.rni.f32.f32 %f, %f;",
            "this float conversion is not supported",
        ),
        (
            "    cvt.f16.f32 %h, %f;",
            "a narrowing float conversion needs .rn, a widening one takes no rounding",
        ),
        (
            "    cvt.rni.f16.f32 %h, %f;",
            "a narrowing float conversion needs .rn",
        ),
        (
            "    cvt.rn.f32.f16 %f, %h;",
            "a widening one takes no rounding",
        ),
        ("    cvt.rz.f32.f64 %f, %d;", "only .rn is supported"),
        (
            "    cvt.f32.u32 %f, %v;",
            "integer-to-float conversion needs .rn",
        ),
        (
            "    cvt.rn.rni.f32.u32 %f, %v;",
            "integer-to-float conversion needs .rn",
        ),
        (
            "    cvt.rn.f16.u32 %h, %v;",
            "integer to f16/bf16 is not supported",
        ),
        (
            "    cvt.rn.s32.f32 %v, %f;",
            "float-to-integer needs .rni/.rzi/.rmi/.rpi from f32/f64",
        ),
        (
            "    cvt.rzi.s16.f16 %h, %h;",
            "float-to-integer needs .rni/.rzi/.rmi/.rpi from f32/f64",
        ),
        (
            "    cvt.s32.f32 %v, %f;",
            "float-to-integer needs .rni/.rzi/.rmi/.rpi",
        ),
        (
            "    cvt.rn.u32.u16 %v, %h;",
            "integer conversions take no rounding",
        ),
        (
            "    cvt.rzi.u32.u16 %v, %h;",
            "integer conversions take no rounding",
        ),
        ("    setp.eq.f16 %p, %h, %h;", "unsupported type"),
        ("    setp.ne.pred %p, %p, %q;", "unsupported type"),
        (
            "    setp.lt.b32 %p, %v, %v;",
            "comparison not allowed for this type",
        ),
        (
            "    setp.lo.s32 %p, %v, %v;",
            "comparison not allowed for this type",
        ),
        (
            "    setp.equ.u32 %p, %v, %v;",
            "comparison not allowed for this type",
        ),
        ("    ld.global.nc.u32 %v, [%o];", "unsupported modifier"),
        (
            "    ld.volatile.global.u32 %v, [%o];",
            "unsupported modifier",
        ),
        (
            "    st.relaxed.gpu.global.u32 [%o], %v;",
            "unsupported modifier",
        ),
        ("    ld.global.cg.u32 %v, [%o];", "unsupported modifier"),
        (
            "    ld.global.v4.f64 {%d, %d, %d, %d}, [%o];",
            "unsupported type/vector size",
        ),
        (
            "    ld.global.v2.pred {%p, %q}, [%o];",
            "unsupported type/vector size",
        ),
        (
            "    ld.global.v4.u32 {%v, %v}, [%o];",
            "vector operand must have 4 elements",
        ),
        ("    barrier.warp.sync -1;", "not supported"),
        ("    bar.warp -1;", "not supported"),
        ("    mov.b32 {%h, %h, %h, %h}, %v;", "vector mov supports"),
        ("    mov.u32 {%h, %h}, %v;", "vector mov supports"),
        ("    mov.b64 %o, {%v, %v, %v};", "vector mov supports"),
    ] {
        let src = format!(
            ".visible .entry k()\n{{\n    .reg .pred %p, %q;\n    .reg .b16 %h;\n    .reg .b32 %v;\n    .reg .f32 %f;\n    .reg .f64 %d;\n    .reg .b64 %o;\n{line}\n    ret;\n}}\n"
        );
        let msg = load_error(&src);
        assert!(msg.starts_with("line 12:"), "{line}: {msg}");
        assert!(msg.contains(needle), "{line}: {needle:?} not in {msg}");
    }
}

#[test]
fn a_parameter_array_is_read_at_an_offset() {
    // `[name+off]` on a .param: lra.ptx reads its scale constants this way
    let src = format!(
        "{HEAD}.visible .entry k(.param .u64 out, .param .align 4 .b8 blob[12])\n{{\n    .reg .b32 %v;\n    .reg .b64 %o;\n    ld.param.u64 %o, [out];\n    ld.param.u32 %v, [blob+8];\n    st.global.u32 [%o], %v;\n    ld.param.u32 %v, [blob+4];\n    st.global.u32 [%o+4], %v;\n    ret;\n}}\n"
    );
    let m = Module::load(&src).unwrap_or_else(|e| panic!("{e}"));
    let mut dev = Device::new();
    let out = dev.alloc(8);
    let blob: Vec<u8> = [7u32, 8, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
    dev.launch(
        &m,
        "k",
        &LaunchConfig::linear(1, 1),
        &[Arg::U64(out), Arg::Bytes(blob)],
    )
    .unwrap();
    assert_eq!(dev.read(out, 8).unwrap(), [9, 0, 0, 0, 8, 0, 0, 0]);
}
