//! PTX text → a checked, pre-decoded program. Everything outside the
//! supported subset is a load error (fail closed).

use crate::{err, Error, ErrorKind, Result, Ty, TyKind};
use std::collections::HashMap;

// ---------------------------------------------------------------- lexer

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// Identifiers, directives, opcodes with their modifiers, registers.
    Word(String),
    Num(String),
    Str(String),
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: u32,
}

fn lex(src: &str) -> Result<Vec<Token>> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0usize, 1u32);
    let is_start =
        |c: u8| c.is_ascii_alphabetic() || c == b'_' || c == b'$' || c == b'%' || c == b'.';
    let is_cont = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'.';
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            if i + 1 >= b.len() {
                return err(
                    ErrorKind::Load,
                    format!("line {line}: unterminated comment"),
                );
            }
            i += 2;
        } else if c == b'"' {
            let s = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                i += 1;
            }
            if i >= b.len() || b[i] != b'"' {
                return err(ErrorKind::Load, format!("line {line}: unterminated string"));
            }
            out.push(Token {
                tok: Tok::Str(src[s..i].to_string()),
                line,
            });
            i += 1;
        } else if c.is_ascii_digit() {
            let s = i;
            let prefixed = c == b'0'
                && matches!(
                    b.get(i + 1),
                    Some(b'x' | b'X' | b'f' | b'F' | b'd' | b'D' | b'b' | b'B')
                );
            while i < b.len() {
                let d = b[i];
                let exponent_sign =
                    (d == b'+' || d == b'-') && !prefixed && matches!(b[i - 1], b'e' | b'E');
                if d.is_ascii_alphanumeric() || d == b'.' || d == b'_' || exponent_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(Token {
                tok: Tok::Num(src[s..i].to_string()),
                line,
            });
        } else if is_start(c) {
            let s = i;
            i += 1;
            while i < b.len() && is_cont(b[i]) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Word(src[s..i].to_string()),
                line,
            });
        } else if b",;:{}[]()<>+-!@|=".contains(&c) {
            out.push(Token {
                tok: Tok::Punct(c as char),
                line,
            });
            i += 1;
        } else {
            return err(
                ErrorKind::Load,
                format!("line {line}: unexpected character {:?}", c as char),
            );
        }
    }
    Ok(out)
}

/// A numeric literal as written.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lit {
    Int(i128),
    /// `0fXXXXXXXX`
    F32Bits(u32),
    /// `0dXXXXXXXXXXXXXXXX`
    F64Bits(u64),
    /// decimal floating literal (an f64 value)
    Dec(f64),
}

fn parse_lit(s: &str, line: u32) -> Result<Lit> {
    let bad = || -> Result<Lit> { err(ErrorKind::Load, format!("line {line}: bad number {s:?}")) };
    let lower = s.to_ascii_lowercase();
    let body = lower.strip_suffix('u').unwrap_or(&lower);
    let r = if let Some(h) = lower.strip_prefix("0f") {
        if h.len() != 8 {
            return bad();
        }
        u32::from_str_radix(h, 16).ok().map(Lit::F32Bits)
    } else if let Some(h) = lower.strip_prefix("0d") {
        if h.len() != 16 {
            return bad();
        }
        u64::from_str_radix(h, 16).ok().map(Lit::F64Bits)
    } else if let Some(h) = body.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok().map(|v| Lit::Int(v as i128))
    } else if let Some(h) = body.strip_prefix("0b") {
        u64::from_str_radix(h, 2).ok().map(|v| Lit::Int(v as i128))
    } else if lower.contains('.') || lower.contains('e') {
        lower.parse::<f64>().ok().map(Lit::Dec)
    } else if body.len() > 1 && body.starts_with('0') {
        u64::from_str_radix(&body[1..], 8)
            .ok()
            .map(|v| Lit::Int(v as i128))
    } else {
        body.parse::<u64>().ok().map(|v| Lit::Int(v as i128))
    };
    match r {
        Some(l) => Ok(l),
        None => bad(),
    }
}

// ---------------------------------------------------------------- program

/// Special registers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Sreg {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    Laneid,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Src {
    Reg(u16),
    Imm(u64),
    Sreg(Sreg),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Param,
}

/// The threads a fence or an atomic can synchronise with (PTX ISA 8.5,
/// "Scope"). `.gpu` and `.sys` are one here: a launch is one grid on one
/// device. `.cta` reaches only the own block, which barriers order already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SyncScope {
    Cta,
    Gpu,
}

impl SyncScope {
    /// The scope named by a `.cta`/`.gpu`/`.sys` (`membar`: `.cta`/`.gl`/`.sys`)
    /// modifier; `None` (no modifier) is `.gpu`, the default of `atom`/`red`.
    fn parse(m: Option<&str>) -> SyncScope {
        match m {
            Some("cta") => SyncScope::Cta,
            _ => SyncScope::Gpu,
        }
    }
}

/// `[base + off]`; symbols are resolved into `off` (offset in their space).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Addr {
    pub base: Option<u16>,
    pub off: i64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum IntOp {
    Add,
    Sub,
    MulLo,
    MulHi,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum FOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum FUnOp {
    Neg,
    Abs,
    Sqrt,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum TestKind {
    Finite,
    Infinite,
    Number,
    NotANumber,
    Normal,
    Subnormal,
}

/// Float-to-integer rounding of `cvt`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum IRnd {
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum AtomOp {
    Add,
    Inc,
    Cas,
    Exch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Debug)]
pub(crate) enum Op {
    Mov {
        d: u16,
        a: Src,
    },
    /// `mov.b64 d, {a, b}` (low part first).
    Pack {
        d: u16,
        parts: Vec<Src>,
        part_bits: u32,
    },
    /// `mov.b64 {a, b}, s`.
    Unpack {
        ds: Vec<u16>,
        a: Src,
        part_bits: u32,
    },
    Int {
        op: IntOp,
        ty: Ty,
        d: u16,
        a: Src,
        b: Src,
    },
    /// `mul.wide` / `mad.wide` (c = None for mul): 2×width result.
    Wide {
        ty: Ty,
        d: u16,
        a: Src,
        b: Src,
        c: Option<Src>,
    },
    /// `mad.lo` / `mad.hi`.
    Mad {
        hi: bool,
        ty: Ty,
        d: u16,
        a: Src,
        b: Src,
        c: Src,
    },
    Float {
        op: FOp,
        ty: Ty,
        d: u16,
        a: Src,
        b: Src,
    },
    Fma {
        ty: Ty,
        d: u16,
        a: Src,
        b: Src,
        c: Src,
    },
    FUn {
        op: FUnOp,
        ty: Ty,
        d: u16,
        a: Src,
    },
    Cvt {
        dty: Ty,
        sty: Ty,
        irnd: Option<IRnd>,
        d: u16,
        a: Src,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        p: u16,
        a: Src,
        b: Src,
    },
    Selp {
        d: u16,
        a: Src,
        b: Src,
        c: u16,
    },
    Testp {
        kind: TestKind,
        ty: Ty,
        p: u16,
        a: Src,
    },
    Ld {
        space: Space,
        ty: Ty,
        ds: Vec<u16>,
        addr: Addr,
    },
    St {
        space: Space,
        ty: Ty,
        srcs: Vec<Src>,
        addr: Addr,
    },
    /// `atom` (`d` is the old value) or `red` (`d` is `None`).
    /// Global memory only.
    Atom {
        op: AtomOp,
        ty: Ty,
        d: Option<u16>,
        addr: Addr,
        b: Src,
        c: Option<Src>,
        /// `.acquire` or `.acq_rel`.
        acquire: bool,
        /// `.release` or `.acq_rel`.
        release: bool,
        scope: SyncScope,
    },
    Bra {
        target: usize,
    },
    Bar {
        id: Src,
    },
    BarWarp {
        mask: Src,
    },
    Shfl {
        mode: ShflMode,
        d: u16,
        p: Option<u16>,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    /// `membar` or `fence.{sc,acq_rel}`; both kinds are modelled alike
    /// (crate docs, "Global races").
    Fence {
        scope: SyncScope,
    },
    Exit,
}

#[derive(Clone, Debug)]
pub(crate) struct Inst {
    pub op: Op,
    /// `@p` / `@!p`: (predicate register, negated)
    pub guard: Option<(u16, bool)>,
    pub line: u32,
    /// Registers the instruction reads (guard excluded). A result computed
    /// from a never-written register is itself undefined (like Valgrind's
    /// memcheck: moving garbage around is fine, using it is not).
    pub reads: Vec<u16>,
    /// The subset that must be defined: addresses, stored values, atomic
    /// and collective operands, barrier operands.
    pub strict: Vec<u16>,
}

impl Op {
    /// The registers whose undefined value would escape into memory,
    /// control flow or another thread.
    fn strict_reads(&self) -> Vec<u16> {
        match self {
            Op::Ld { .. }
            | Op::St { .. }
            | Op::Atom { .. }
            | Op::Bar { .. }
            | Op::BarWarp { .. }
            | Op::Shfl { .. } => self.reads(),
            _ => Vec::new(),
        }
    }

    /// The registers this operation reads.
    fn reads(&self) -> Vec<u16> {
        let mut v = Vec::new();
        let mut src = |s: &Src| {
            if let Src::Reg(r) = s {
                v.push(*r);
            }
        };
        match self {
            Op::Mov { a, .. }
            | Op::Unpack { a, .. }
            | Op::FUn { a, .. }
            | Op::Cvt { a, .. }
            | Op::Testp { a, .. } => src(a),
            Op::Pack { parts, .. } => parts.iter().for_each(src),
            Op::Int { a, b, .. } | Op::Float { a, b, .. } => {
                src(a);
                src(b);
            }
            Op::Wide { a, b, c, .. } => {
                src(a);
                src(b);
                if let Some(c) = c {
                    src(c);
                }
            }
            Op::Mad { a, b, c, .. } | Op::Fma { a, b, c, .. } => {
                src(a);
                src(b);
                src(c);
            }
            Op::Setp { a, b, .. } => {
                src(a);
                src(b);
            }
            Op::Selp { a, b, c, .. } => {
                src(a);
                src(b);
                src(&Src::Reg(*c));
            }
            Op::Ld { addr, .. } => {
                if let Some(r) = addr.base {
                    src(&Src::Reg(r));
                }
            }
            Op::St { srcs, addr, .. } => {
                srcs.iter().for_each(&mut src);
                if let Some(r) = addr.base {
                    src(&Src::Reg(r));
                }
            }
            Op::Atom { addr, b, c, .. } => {
                src(b);
                if let Some(c) = c {
                    src(c);
                }
                if let Some(r) = addr.base {
                    src(&Src::Reg(r));
                }
            }
            Op::Bar { id } => src(id),
            Op::BarWarp { mask } => src(mask),
            Op::Shfl { a, b, c, mask, .. } => {
                src(a);
                src(b);
                src(c);
                src(mask);
            }
            Op::Bra { .. } | Op::Fence { .. } | Op::Exit => {}
        }
        v
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Param {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    pub param_bytes: usize,
    /// Bit width of every register (1 for predicates).
    pub reg_bits: Vec<u32>,
    pub reg_names: Vec<String>,
    pub shared_static: usize,
    /// Offset of the `.extern .shared` array, if declared.
    pub dyn_shared_align: Option<usize>,
    pub insts: Vec<Inst>,
    pub reqntid: Option<[u32; 3]>,
    pub maxntid: Option<[u32; 3]>,
    pub lines: Vec<String>,
}

/// How strict loading is.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Accept approximate or contractible float instructions (`.approx`,
    /// `.full`, f32/f64 `add`/`sub`/`mul`/`fma`-less forms without a rounding
    /// modifier); they execute with IEEE round-to-nearest semantics and are
    /// counted in [`Module::inexact_report`]. Off by default: rejected.
    pub allow_inexact: bool,
}

/// A loaded PTX module.
#[derive(Clone, Debug)]
pub struct Module {
    pub(crate) kernels: Vec<Kernel>,
    inexact: Vec<(String, u32)>,
}

impl Module {
    /// Loads PTX text with the default (strict) options.
    pub fn load(src: &str) -> Result<Module> {
        Module::load_with(src, &LoadOptions::default())
    }

    pub fn load_with(src: &str, opts: &LoadOptions) -> Result<Module> {
        let toks = lex(src)?;
        let mut p = Parser {
            t: toks,
            i: 0,
            opts: opts.clone(),
            inexact: Vec::new(),
        };
        let kernels = p.module(src)?;
        Ok(Module {
            kernels,
            inexact: p.inexact,
        })
    }

    pub fn kernel_names(&self) -> Vec<&str> {
        self.kernels.iter().map(|k| k.name.as_str()).collect()
    }

    /// Parameter (name, size in bytes) of a kernel, in order.
    pub fn kernel_params(&self, kernel: &str) -> Option<Vec<(String, usize)>> {
        self.kernel(kernel)
            .map(|k| k.params.iter().map(|p| (p.name.clone(), p.size)).collect())
    }

    /// Inexact instructions accepted under [`LoadOptions::allow_inexact`]:
    /// (opcode as written, source line).
    pub fn inexact_report(&self) -> &[(String, u32)] {
        &self.inexact
    }

    pub(crate) fn kernel(&self, name: &str) -> Option<&Kernel> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

// ---------------------------------------------------------------- parser

/// An operand before decoding.
#[derive(Clone, Debug)]
enum Raw {
    Name(String),
    Lit(Lit, bool),
    Vec(Vec<Raw>),
    Addr(Option<String>, i64),
    Pair(String, String),
}

/// An instruction before decoding: (guard, opcode, operands, line).
type RawInst = (Option<(String, bool)>, String, Vec<Raw>, u32);

struct Parser {
    t: Vec<Token>,
    i: usize,
    opts: LoadOptions,
    inexact: Vec<(String, u32)>,
}

fn load_err<T>(line: u32, msg: impl AsRef<str>) -> Result<T> {
    err(ErrorKind::Load, format!("line {line}: {}", msg.as_ref()))
}

struct Scope {
    regs: HashMap<String, u16>,
    reg_bits: Vec<u32>,
    reg_tys: Vec<Ty>,
    reg_names: Vec<String>,
    /// name → offset
    shared: HashMap<String, usize>,
    shared_size: usize,
    dyn_name: Option<(String, usize)>,
    params: HashMap<String, usize>,
}

impl Parser {
    fn line(&self) -> u32 {
        self.t.get(self.i).or(self.t.last()).map_or(0, |t| t.line)
    }
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i).map(|t| &t.tok)
    }
    fn next(&mut self) -> Result<Tok> {
        let l = self.line();
        let t = self.t.get(self.i).map(|t| t.tok.clone());
        self.i += 1;
        t.ok_or_else(|| Error {
            kind: ErrorKind::Load,
            message: format!("line {l}: unexpected end of input"),
        })
    }
    fn punct(&mut self, c: char) -> Result<()> {
        let l = self.line();
        match self.next()? {
            Tok::Punct(x) if x == c => Ok(()),
            t => load_err(l, format!("expected {c:?}, found {t:?}")),
        }
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn word(&mut self) -> Result<String> {
        let l = self.line();
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => load_err(l, format!("expected a name, found {t:?}")),
        }
    }
    fn uint(&mut self) -> Result<u64> {
        let l = self.line();
        match self.next()? {
            Tok::Num(n) => match parse_lit(&n, l)? {
                Lit::Int(v) if v >= 0 => Ok(v as u64),
                _ => load_err(l, format!("expected an unsigned integer, found {n}")),
            },
            t => load_err(l, format!("expected a number, found {t:?}")),
        }
    }

    fn module(&mut self, src: &str) -> Result<Vec<Kernel>> {
        let mut kernels = Vec::new();
        let lines: Vec<String> = src.lines().map(|s| s.trim().to_string()).collect();
        while self.i < self.t.len() {
            let l = self.line();
            let w = self.word()?;
            match w.as_str() {
                ".version" | ".target" | ".address_size" => {
                    // values are informational; consume until the next directive
                    while let Some(Tok::Num(_) | Tok::Punct(',')) = self.peek() {
                        self.next()?;
                    }
                    if w == ".target" {
                        self.word()?;
                        while self.is_punct(',') {
                            self.next()?;
                            self.word()?;
                        }
                    }
                }
                ".visible" | ".weak" => continue,
                ".entry" => kernels.push(self.entry(&lines)?),
                _ => return load_err(l, format!("unsupported module directive {w}")),
            }
        }
        Ok(kernels)
    }

    /// `[.align N] .type name[size];` after `.shared`. Returns (name, align, bytes, extern).
    fn var_decl(&mut self, l: u32, is_extern: bool) -> Result<(String, usize, usize, bool)> {
        let mut align = 0usize;
        let mut w = self.word()?;
        if w == ".align" {
            align = self.uint()? as usize;
            w = self.word()?;
        }
        let ty = w
            .strip_prefix('.')
            .and_then(Ty::parse)
            .filter(|t| *t != Ty::Pred)
            .ok_or_else(|| Error {
                kind: ErrorKind::Load,
                message: format!("line {l}: unsupported variable type {w}"),
            })?;
        let name = self.word()?;
        let mut count = 1usize;
        let mut unsized_array = false;
        if self.is_punct('[') {
            self.next()?;
            if self.is_punct(']') {
                unsized_array = true;
            } else {
                count = self.uint()? as usize;
            }
            self.punct(']')?;
        }
        if self.is_punct('=') {
            return load_err(l, "initialisers are not supported");
        }
        self.punct(';')?;
        if unsized_array != is_extern {
            return load_err(
                l,
                "only `.extern .shared` arrays may be unsized, and they must be",
            );
        }
        let align = if align == 0 {
            ty.bytes() as usize
        } else {
            align
        };
        if !align.is_power_of_two() {
            return load_err(l, "alignment must be a power of two");
        }
        Ok((name, align, count * ty.bytes() as usize, is_extern))
    }

    fn entry(&mut self, lines: &[String]) -> Result<Kernel> {
        let name = self.word()?;
        let mut sc = Scope {
            regs: HashMap::new(),
            reg_bits: Vec::new(),
            reg_tys: Vec::new(),
            reg_names: Vec::new(),
            shared: HashMap::new(),
            shared_size: SHARED_BASE,
            dyn_name: None,
            params: HashMap::new(),
        };
        // parameters
        let mut params = Vec::new();
        let mut off = 0usize;
        self.punct('(')?;
        while !self.is_punct(')') {
            let l = self.line();
            if self.word()? != ".param" {
                return load_err(l, "expected .param");
            }
            let mut align = 0usize;
            let mut ty = None;
            let pname;
            loop {
                let w = self.word()?;
                match w.as_str() {
                    ".align" => align = self.uint()? as usize,
                    _ if w.starts_with('.') => {
                        if ty.is_some() {
                            return load_err(l, format!("unsupported parameter attribute {w}"));
                        }
                        ty = Some(Ty::parse(&w[1..]).filter(|t| *t != Ty::Pred).ok_or_else(
                            || Error {
                                kind: ErrorKind::Load,
                                message: format!("line {l}: unsupported parameter type {w}"),
                            },
                        )?);
                    }
                    _ => {
                        pname = w;
                        break;
                    }
                }
            }
            let ty = ty.ok_or_else(|| Error {
                kind: ErrorKind::Load,
                message: format!("line {l}: parameter without a type"),
            })?;
            let mut count = 1;
            if self.is_punct('[') {
                self.next()?;
                count = self.uint()? as usize;
                self.punct(']')?;
            }
            let align = if align == 0 {
                ty.bytes() as usize
            } else {
                align
            };
            off = off.div_ceil(align) * align;
            let size = count * ty.bytes() as usize;
            sc.params.insert(pname.clone(), off);
            params.push(Param {
                name: pname,
                offset: off,
                size,
            });
            off += size;
            if self.is_punct(',') {
                self.next()?;
            }
        }
        self.punct(')')?;
        let mut reqntid = None;
        let mut maxntid = None;
        while let Some(Tok::Word(w)) = self.peek().cloned() {
            let l = self.line();
            self.next()?;
            let mut dims = vec![self.uint()? as u32];
            while self.is_punct(',') {
                self.next()?;
                dims.push(self.uint()? as u32);
            }
            let d3 = [
                dims[0],
                *dims.get(1).unwrap_or(&1),
                *dims.get(2).unwrap_or(&1),
            ];
            match w.as_str() {
                ".reqntid" => reqntid = Some(d3),
                ".maxntid" => maxntid = Some(d3),
                ".minnctapersm" | ".maxnreg" => {}
                _ => return load_err(l, format!("unsupported performance directive {w}")),
            }
        }
        self.punct('{')?;
        // body: collect labels and raw instructions first, then decode
        let mut raw: Vec<RawInst> = Vec::new();
        let mut labels: HashMap<String, usize> = HashMap::new();
        loop {
            let l = self.line();
            match self.next()? {
                // lra's kernels declare everything at the top: no scopes
                Tok::Punct('{') => return load_err(l, "nested blocks are outside the subset"),
                Tok::Punct('}') => break,
                Tok::Punct('@') => {
                    let neg = if self.is_punct('!') {
                        self.next()?;
                        true
                    } else {
                        false
                    };
                    let p = self.word()?;
                    let op = self.word()?;
                    let ops = self.operands()?;
                    raw.push((Some((p, neg)), op, ops, l));
                }
                Tok::Word(w) if self.is_punct(':') => {
                    self.next()?;
                    if labels.insert(w.clone(), raw.len()).is_some() {
                        return load_err(l, format!("label {w} defined twice"));
                    }
                }
                Tok::Word(w) if w == ".reg" => self.reg_decl(&mut sc, l)?,
                Tok::Word(w) if w == ".shared" => {
                    let (n, a, s, e) = self.var_decl(l, false)?;
                    add_shared(&mut sc, n, a, s, e, l)?;
                }
                Tok::Word(w) if w == ".extern" => {
                    if self.word()? != ".shared" {
                        return load_err(l, "only .extern .shared is supported");
                    }
                    let (n, a, s, e) = self.var_decl(l, true)?;
                    add_shared(&mut sc, n, a, s, e, l)?;
                }
                Tok::Word(w) if w == ".pragma" => {
                    match self.next()? {
                        Tok::Str(s) if s == "nounroll" => {}
                        t => return load_err(l, format!("unsupported .pragma {t:?}")),
                    }
                    self.punct(';')?;
                }
                Tok::Word(w) if w.starts_with('.') => {
                    return load_err(l, format!("unsupported directive or state space {w}"))
                }
                Tok::Word(op) => {
                    let ops = self.operands()?;
                    raw.push((None, op, ops, l));
                }
                t => return load_err(l, format!("unexpected {t:?}")),
            }
        }
        // the dynamic shared array sits after the static ones
        let mut dyn_shared_align = None;
        if let Some((n, a)) = sc.dyn_name.clone() {
            let off = sc.shared_size.div_ceil(a) * a;
            sc.shared.insert(n, off);
            sc.shared_size = off;
            dyn_shared_align = Some(a);
        }
        let mut insts = Vec::with_capacity(raw.len());
        for (guard, op, ops, l) in raw {
            let guard = match guard {
                None => None,
                Some((p, neg)) => Some((self.pred_reg(&sc, &p, l)?, neg)),
            };
            let op = self.decode(&sc, &labels, &op, &ops, l)?;
            let (reads, strict) = (op.reads(), op.strict_reads());
            insts.push(Inst {
                op,
                guard,
                line: l,
                reads,
                strict,
            });
        }
        Ok(Kernel {
            name,
            params,
            param_bytes: off,
            reg_bits: sc.reg_bits,
            reg_names: sc.reg_names,
            shared_static: sc.shared_size - SHARED_BASE,
            dyn_shared_align,
            insts,
            reqntid,
            maxntid,
            lines: lines.to_vec(),
        })
    }

    fn reg_decl(&mut self, sc: &mut Scope, l: u32) -> Result<()> {
        let mut w = self.word()?;
        let ty = w
            .strip_prefix('.')
            .and_then(Ty::parse)
            .ok_or_else(|| Error {
                kind: ErrorKind::Load,
                message: format!("line {l}: unsupported register type {w}"),
            })?;
        loop {
            w = self.word()?;
            if self.is_punct('<') {
                self.next()?;
                let n = self.uint()?;
                self.punct('>')?;
                for k in 0..n {
                    add_reg(sc, format!("{w}{k}"), ty, l)?;
                }
            } else {
                add_reg(sc, w, ty, l)?;
            }
            if self.is_punct(',') {
                self.next()?;
                continue;
            }
            self.punct(';')?;
            return Ok(());
        }
    }

    fn operands(&mut self) -> Result<Vec<Raw>> {
        let mut v = Vec::new();
        if self.is_punct(';') {
            self.next()?;
            return Ok(v);
        }
        loop {
            v.push(self.operand()?);
            let l = self.line();
            match self.next()? {
                Tok::Punct(',') => continue,
                Tok::Punct(';') => return Ok(v),
                t => return load_err(l, format!("expected ',' or ';', found {t:?}")),
            }
        }
    }

    fn operand(&mut self) -> Result<Raw> {
        let l = self.line();
        match self.next()? {
            Tok::Punct('[') => {
                let mut base = None;
                let mut off = 0i64;
                match self.next()? {
                    Tok::Word(w) => base = Some(w),
                    Tok::Num(n) => off = lit_int(parse_lit(&n, l)?, l)?,
                    t => return load_err(l, format!("bad address {t:?}")),
                }
                while !self.is_punct(']') {
                    let neg = match self.next()? {
                        Tok::Punct('+') => {
                            if self.is_punct('-') {
                                self.next()?;
                                true
                            } else {
                                false
                            }
                        }
                        Tok::Punct('-') => true,
                        t => return load_err(l, format!("bad address {t:?}")),
                    };
                    let n = match self.next()? {
                        Tok::Num(n) => lit_int(parse_lit(&n, l)?, l)?,
                        t => return load_err(l, format!("bad address offset {t:?}")),
                    };
                    off += if neg { -n } else { n };
                }
                self.next()?;
                Ok(Raw::Addr(base, off))
            }
            Tok::Punct('{') => {
                let mut v = Vec::new();
                loop {
                    v.push(self.operand()?);
                    match self.next()? {
                        Tok::Punct(',') => continue,
                        Tok::Punct('}') => return Ok(Raw::Vec(v)),
                        t => return load_err(l, format!("bad vector operand {t:?}")),
                    }
                }
            }
            // only a guard (`@!%p`) negates in the subset
            Tok::Punct('!') => load_err(l, "a negated predicate operand is outside the subset"),
            Tok::Punct('-') => match self.next()? {
                Tok::Num(n) => Ok(Raw::Lit(parse_lit(&n, l)?, true)),
                t => load_err(l, format!("bad negative operand {t:?}")),
            },
            Tok::Num(n) => Ok(Raw::Lit(parse_lit(&n, l)?, false)),
            Tok::Word(w) => {
                if self.is_punct('|') {
                    self.next()?;
                    let q = self.word()?;
                    return Ok(Raw::Pair(w, q));
                }
                Ok(Raw::Name(w))
            }
            t => load_err(l, format!("unexpected operand {t:?}")),
        }
    }

    fn pred_reg(&self, sc: &Scope, name: &str, l: u32) -> Result<u16> {
        match sc.regs.get(name) {
            Some(&r) if sc.reg_tys[r as usize] == Ty::Pred => Ok(r),
            Some(_) => load_err(l, format!("{name} is not a predicate register")),
            None => load_err(l, format!("unknown register {name}")),
        }
    }
}

fn lit_int(l: Lit, line: u32) -> Result<i64> {
    match l {
        Lit::Int(v) => Ok(v as i64),
        _ => load_err(line, "expected an integer"),
    }
}

fn add_reg(sc: &mut Scope, name: String, ty: Ty, l: u32) -> Result<()> {
    if sc.regs.contains_key(&name) {
        return load_err(l, format!("register {name} declared twice"));
    }
    if sc.reg_bits.len() >= u16::MAX as usize {
        return load_err(l, "too many registers");
    }
    sc.regs.insert(name.clone(), sc.reg_bits.len() as u16);
    sc.reg_bits.push(ty.bits());
    sc.reg_tys.push(ty);
    sc.reg_names.push(name);
    Ok(())
}

/// Where a block's first shared variable starts. PTX promises no shared
/// variable any address: starting them past 0 makes an address computed
/// without its variable's base (an offset used as an address) fall below
/// every variable, which is out of bounds, instead of landing on the first
/// one. The bytes below are not shared memory the kernel has.
pub const SHARED_BASE: usize = 1024;

fn add_shared(
    sc: &mut Scope,
    name: String,
    align: usize,
    size: usize,
    ext: bool,
    l: u32,
) -> Result<()> {
    if sc.shared.contains_key(&name) || sc.dyn_name.as_ref().is_some_and(|d| d.0 == name) {
        return load_err(l, format!("shared variable {name} declared twice"));
    }
    if ext {
        if sc.dyn_name.is_some() {
            return load_err(l, "more than one .extern .shared array");
        }
        sc.dyn_name = Some((name, align));
        return Ok(());
    }
    let off = sc.shared_size.div_ceil(align) * align;
    sc.shared.insert(name, off);
    sc.shared_size = off + size;
    Ok(())
}

// ---------------------------------------------------------------- decoder

/// Splits `ld.global.v4.f32` into ("ld", [".global", ".v4", ".f32"]) as
/// modifier names without dots.
fn split_op(op: &str) -> (&str, Vec<&str>) {
    let mut it = op.split('.');
    let base = it.next().unwrap_or("");
    (base, it.collect())
}

/// Modifiers of one instruction, consumed as they are recognised; anything
/// left over at the end is a load error.
struct Mods<'a> {
    m: Vec<&'a str>,
    op: String,
    line: u32,
}

impl<'a> Mods<'a> {
    fn take(&mut self, names: &[&str]) -> Option<&'a str> {
        let pos = self.m.iter().position(|x| names.contains(x))?;
        Some(self.m.remove(pos))
    }
    fn has(&mut self, name: &str) -> bool {
        self.take(&[name]).is_some()
    }
    /// The (single) type modifier.
    fn ty(&mut self) -> Result<Ty> {
        let tys: Vec<usize> = (0..self.m.len())
            .filter(|&i| Ty::parse(self.m[i]).is_some())
            .collect();
        if tys.len() != 1 {
            return load_err(
                self.line,
                format!("`{}`: expected exactly one type", self.op),
            );
        }
        Ok(Ty::parse(self.m.remove(tys[0])).unwrap())
    }
    /// Two type modifiers in order (cvt d-type, s-type).
    fn two_tys(&mut self) -> Result<(Ty, Ty)> {
        let tys: Vec<usize> = (0..self.m.len())
            .filter(|&i| Ty::parse(self.m[i]).is_some())
            .collect();
        if tys.len() != 2 {
            return load_err(self.line, format!("`{}`: expected two types", self.op));
        }
        let a = Ty::parse(self.m[tys[0]]).unwrap();
        let b = Ty::parse(self.m[tys[1]]).unwrap();
        self.m.remove(tys[1]);
        self.m.remove(tys[0]);
        Ok((a, b))
    }
    fn done(&self) -> Result<()> {
        if let Some(x) = self.m.first() {
            return load_err(
                self.line,
                format!("`{}`: unsupported modifier .{x}", self.op),
            );
        }
        Ok(())
    }
}

/// How an operand register may relate to the instruction type.
#[derive(Clone, Copy, PartialEq)]
enum Fit {
    /// Same size (and compatible kind).
    Exact,
    /// Integer/bit types: the register may be wider (ld/st/cvt).
    Wider,
}

impl Parser {
    fn reg_of(&self, sc: &Scope, name: &str, ty: Ty, fit: Fit, l: u32) -> Result<u16> {
        let &r = sc.regs.get(name).ok_or_else(|| Error {
            kind: ErrorKind::Load,
            message: format!("line {l}: unknown register or symbol {name}"),
        })?;
        let rt = sc.reg_tys[r as usize];
        let ok_kind = match (rt.kind(), ty.kind()) {
            (TyKind::Pred, TyKind::Pred) => true,
            (TyKind::Pred, _) | (_, TyKind::Pred) => false,
            (TyKind::Bit, _) | (_, TyKind::Bit) => true,
            (TyKind::Float, TyKind::Float) => true,
            (TyKind::Float, _) | (_, TyKind::Float) => false,
            _ => true, // signed/unsigned integers of any signedness
        };
        let ok_size = rt.bits() == ty.bits()
            || (fit == Fit::Wider && ty.kind() != TyKind::Float && rt.bits() > ty.bits())
            // f16/bf16 values live in 16-bit registers of either float kind
            || (matches!(ty, Ty::F16 | Ty::Bf16) && rt.bits() == 16);
        if !ok_kind || !ok_size {
            return load_err(
                l,
                format!("register {name} (.{rt:?}) does not fit type .{ty:?}"),
            );
        }
        Ok(r)
    }

    fn dst(&self, sc: &Scope, o: &Raw, ty: Ty, fit: Fit, l: u32) -> Result<u16> {
        match o {
            Raw::Name(n) => self.reg_of(sc, n, ty, fit, l),
            _ => load_err(l, format!("destination must be a register, found {o:?}")),
        }
    }

    fn src(&self, sc: &Scope, o: &Raw, ty: Ty, fit: Fit, l: u32) -> Result<Src> {
        match o {
            Raw::Name(n) => {
                if let Some(s) = sreg(n) {
                    if ty.bits() != 32 || ty.kind() == TyKind::Float {
                        return load_err(l, format!("special register {n} is 32-bit integer"));
                    }
                    return Ok(Src::Sreg(s));
                }
                if sc.regs.contains_key(n.as_str()) {
                    return Ok(Src::Reg(self.reg_of(sc, n, ty, fit, l)?));
                }
                load_err(l, format!("unknown register {n}"))
            }
            Raw::Lit(lit, neg) => Ok(Src::Imm(imm(*lit, *neg, ty, l)?)),
            _ => load_err(l, format!("unsupported source operand {o:?}")),
        }
    }

    fn addr(&self, sc: &Scope, o: &Raw, space: Space, l: u32) -> Result<Addr> {
        let Raw::Addr(base, off) = o else {
            return load_err(l, format!("expected an address [..], found {o:?}"));
        };
        let Some(b) = base else {
            return Ok(Addr {
                base: None,
                off: *off,
            });
        };
        if let Some(&r) = sc.regs.get(b.as_str()) {
            if space == Space::Param {
                return load_err(l, "a .param address must name a parameter");
            }
            let bits = sc.reg_bits[r as usize];
            let k = sc.reg_tys[r as usize].kind();
            // lra's kernels address shared memory with 64-bit registers too
            if bits != 64 || matches!(k, TyKind::Float | TyKind::Pred) {
                return load_err(l, format!("address register {b} must be a 64-bit integer"));
            }
            return Ok(Addr {
                base: Some(r),
                off: *off,
            });
        }
        match space {
            Space::Param => match sc.params.get(b.as_str()) {
                Some(&p) => Ok(Addr {
                    base: None,
                    off: p as i64 + off,
                }),
                None => load_err(l, format!("unknown parameter {b}")),
            },
            Space::Shared => match sc.shared.get(b.as_str()) {
                Some(&s) => Ok(Addr {
                    base: None,
                    off: s as i64 + off,
                }),
                None => load_err(l, format!("unknown shared variable {b}")),
            },
            _ => load_err(
                l,
                format!("symbol {b} cannot be addressed in this state space"),
            ),
        }
    }

    fn inexact(&mut self, op: &str, l: u32, why: &str) -> Result<()> {
        if self.opts.allow_inexact {
            self.inexact.push((op.to_string(), l));
            Ok(())
        } else {
            load_err(
                l,
                format!("`{op}` is {why}; only exactly rounded instructions are accepted"),
            )
        }
    }

    fn decode(
        &mut self,
        sc: &Scope,
        labels: &HashMap<String, usize>,
        opname: &str,
        o: &[Raw],
        l: u32,
    ) -> Result<Op> {
        let (base, mods) = split_op(opname);
        let mut m = Mods {
            m: mods,
            op: opname.to_string(),
            line: l,
        };
        let argc = |n: usize| -> Result<()> {
            if o.len() != n {
                return load_err(
                    l,
                    format!("`{opname}` takes {n} operands, found {}", o.len()),
                );
            }
            Ok(())
        };
        let op = match base {
            "mov" => {
                let ty = m.ty()?;
                argc(2)?;
                match (&o[0], &o[1]) {
                    (Raw::Vec(parts), _) => {
                        let pb = vec_part_bits(ty, parts.len(), l)?;
                        let pty = bits_ty(pb);
                        let ds = parts
                            .iter()
                            .map(|p| self.dst(sc, p, pty, Fit::Exact, l))
                            .collect::<Result<_>>()?;
                        Op::Unpack {
                            ds,
                            a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                            part_bits: pb,
                        }
                    }
                    (_, Raw::Vec(parts)) => {
                        let pb = vec_part_bits(ty, parts.len(), l)?;
                        let pty = bits_ty(pb);
                        let parts = parts
                            .iter()
                            .map(|p| self.src(sc, p, pty, Fit::Exact, l))
                            .collect::<Result<_>>()?;
                        Op::Pack {
                            d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                            parts,
                            part_bits: pb,
                        }
                    }
                    (_, Raw::Name(n)) if sc.shared.contains_key(n.as_str()) => {
                        if !matches!(ty, Ty::U64 | Ty::B64 | Ty::U32 | Ty::B32 | Ty::S64) {
                            return load_err(
                                l,
                                "address of a shared variable needs an integer type",
                            );
                        }
                        Op::Mov {
                            d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                            a: Src::Imm(sc.shared[n.as_str()] as u64),
                        }
                    }
                    _ if ty == Ty::Pred => {
                        return load_err(l, "mov.pred is outside the subset (setp sets predicates)")
                    }
                    _ => Op::Mov {
                        d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                        a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                    },
                }
            }
            "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor"
            | "shl" | "shr" => {
                let ty = m.ty()?;
                if ty.kind() == TyKind::Float {
                    if !matches!(ty, Ty::F32 | Ty::F64) {
                        return load_err(
                            l,
                            format!("`{opname}`: only f32/f64 arithmetic is supported"),
                        );
                    }
                    let fop = match base {
                        "add" => FOp::Add,
                        "sub" => FOp::Sub,
                        "mul" => FOp::Mul,
                        "div" => FOp::Div,
                        "min" => FOp::Min,
                        "max" => FOp::Max,
                        _ => return load_err(l, format!("`{opname}` is not a float instruction")),
                    };
                    if m.has("ftz") || m.has("sat") {
                        return load_err(
                            l,
                            format!(
                                "`{opname}`: .ftz/.sat are not supported (IEEE subnormals only)"
                            ),
                        );
                    }
                    if matches!(fop, FOp::Min | FOp::Max) {
                        if m.has("NaN") || m.has("xorsign") || m.has("abs") {
                            return load_err(
                                l,
                                format!("`{opname}`: unsupported min/max modifier"),
                            );
                        }
                    } else if m.has("rn") {
                    } else if m.take(&["rz", "rm", "rp"]).is_some() {
                        return load_err(
                            l,
                            format!("`{opname}`: only round-to-nearest (.rn) is supported"),
                        );
                    } else if fop == FOp::Div && (m.has("approx") || m.has("full")) {
                        self.inexact(opname, l, "approximate")?;
                    } else if fop == FOp::Div {
                        return load_err(l, format!("`{opname}`: div on floats needs .rn"));
                    } else {
                        self.inexact(
                            opname,
                            l,
                            "without a rounding modifier (ptxas may contract it into an FMA)",
                        )?;
                    }
                    m.done()?;
                    argc(3)?;
                    Op::Float {
                        op: fop,
                        ty,
                        d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                        a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                        b: self.src(sc, &o[2], ty, Fit::Exact, l)?,
                    }
                } else if ty == Ty::Pred {
                    return load_err(
                        l,
                        format!("`{opname}`: predicate logic is outside the subset"),
                    );
                } else {
                    let iop = match base {
                        "add" => IntOp::Add,
                        "sub" => IntOp::Sub,
                        "mul" => {
                            if m.has("wide") {
                                if !matches!(ty, Ty::U16 | Ty::U32 | Ty::S16 | Ty::S32) {
                                    return load_err(
                                        l,
                                        format!("`{opname}`: .wide needs u16/u32/s16/s32"),
                                    );
                                }
                                m.done()?;
                                argc(3)?;
                                let dty = bits_ty(ty.bits() * 2);
                                return Ok(Op::Wide {
                                    ty,
                                    d: self.dst(sc, &o[0], dty, Fit::Exact, l)?,
                                    a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                                    b: self.src(sc, &o[2], ty, Fit::Exact, l)?,
                                    c: None,
                                });
                            } else if m.has("lo") {
                                IntOp::MulLo
                            } else if m.has("hi") {
                                IntOp::MulHi
                            } else {
                                return load_err(
                                    l,
                                    format!("`{opname}`: integer mul needs .lo/.hi/.wide"),
                                );
                            }
                        }
                        "div" => IntOp::Div,
                        "rem" => IntOp::Rem,
                        "min" => IntOp::Min,
                        "max" => IntOp::Max,
                        "and" => IntOp::And,
                        "or" => IntOp::Or,
                        "xor" => IntOp::Xor,
                        "shl" => IntOp::Shl,
                        "shr" => IntOp::Shr,
                        _ => unreachable!(),
                    };
                    let bitwise = matches!(iop, IntOp::And | IntOp::Or | IntOp::Xor | IntOp::Shl);
                    if bitwise != (ty.kind() == TyKind::Bit) && !(iop == IntOp::Shr) {
                        return load_err(l, format!("`{opname}`: type .{ty:?} not allowed"));
                    }
                    if ty.kind() == TyKind::Bit && matches!(iop, IntOp::Shr) && ty == Ty::B8 {
                        return load_err(l, format!("`{opname}`: type not allowed"));
                    }
                    if m.has("sat") || m.has("cc") {
                        return load_err(l, format!("`{opname}`: .sat/.cc are not supported"));
                    }
                    m.done()?;
                    argc(3)?;
                    let bty = if matches!(iop, IntOp::Shl | IntOp::Shr) {
                        Ty::U32
                    } else {
                        ty
                    };
                    Op::Int {
                        op: iop,
                        ty,
                        d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                        a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                        b: self.src(sc, &o[2], bty, Fit::Exact, l)?,
                    }
                }
            }
            "mad" | "fma" => {
                let ty = m.ty()?;
                argc(4)?;
                if ty.kind() == TyKind::Float {
                    if !matches!(ty, Ty::F32 | Ty::F64) {
                        return load_err(l, format!("`{opname}`: only f32/f64"));
                    }
                    if m.has("ftz") || m.has("sat") {
                        return load_err(l, format!("`{opname}`: .ftz/.sat are not supported"));
                    }
                    if !m.has("rn") {
                        return load_err(l, format!("`{opname}`: only .rn rounding is supported"));
                    }
                    m.done()?;
                    Op::Fma {
                        ty,
                        d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                        a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                        b: self.src(sc, &o[2], ty, Fit::Exact, l)?,
                        c: self.src(sc, &o[3], ty, Fit::Exact, l)?,
                    }
                } else if base == "mad" && matches!(ty.kind(), TyKind::Uint | TyKind::Sint) {
                    if m.has("wide") {
                        if !matches!(ty, Ty::U16 | Ty::U32 | Ty::S16 | Ty::S32) {
                            return load_err(
                                l,
                                format!("`{opname}`: .wide needs 16/32-bit integers"),
                            );
                        }
                        m.done()?;
                        let dty = bits_ty(ty.bits() * 2);
                        Op::Wide {
                            ty,
                            d: self.dst(sc, &o[0], dty, Fit::Exact, l)?,
                            a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                            b: self.src(sc, &o[2], ty, Fit::Exact, l)?,
                            c: Some(self.src(sc, &o[3], dty, Fit::Exact, l)?),
                        }
                    } else {
                        let hi = if m.has("lo") {
                            false
                        } else if m.has("hi") {
                            true
                        } else {
                            return load_err(
                                l,
                                format!("`{opname}`: integer mad needs .lo/.hi/.wide"),
                            );
                        };
                        m.done()?;
                        Op::Mad {
                            hi,
                            ty,
                            d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                            a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                            b: self.src(sc, &o[2], ty, Fit::Exact, l)?,
                            c: self.src(sc, &o[3], ty, Fit::Exact, l)?,
                        }
                    }
                } else {
                    return load_err(l, format!("`{opname}`: unsupported type"));
                }
            }
            "neg" | "abs" | "sqrt" | "rsqrt" | "ex2" | "lg2" | "sin" | "cos" | "tanh" => {
                let ty = m.ty()?;
                argc(2)?;
                if !matches!(ty, Ty::F32 | Ty::F64) {
                    return load_err(
                        l,
                        format!("`{opname}`: only f32/f64 (integer and predicate unary operations are outside the subset)"),
                    );
                }
                if m.has("ftz") {
                    return load_err(l, format!("`{opname}`: .ftz is not supported"));
                }
                let fop = match base {
                    "neg" => FUnOp::Neg,
                    "abs" => FUnOp::Abs,
                    "sqrt" => {
                        if m.has("rn") {
                        } else if m.has("approx") {
                            self.inexact(opname, l, "approximate")?;
                        } else {
                            return load_err(l, format!("`{opname}`: needs .rn"));
                        }
                        FUnOp::Sqrt
                    }
                    _ => {
                        return load_err(
                            l,
                            format!("`{opname}`: transcendental approximations are not supported"),
                        )
                    }
                };
                m.done()?;
                Op::FUn {
                    op: fop,
                    ty,
                    d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                    a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                }
            }
            "cvt" => {
                let (dty, sty) = m.two_tys()?;
                argc(2)?;
                if m.has("ftz") || m.has("sat") || m.has("relu") || m.has("satfinite") {
                    return load_err(l, format!("`{opname}`: .ftz/.sat/.relu are not supported"));
                }
                let frnd = m.take(&["rn", "rz", "rm", "rp", "rna"]);
                let irnd = m.take(&["rni", "rzi", "rmi", "rpi"]);
                let (df, sf) = (dty.kind() == TyKind::Float, sty.kind() == TyKind::Float);
                if dty == Ty::Pred || sty == Ty::Pred {
                    return load_err(l, "cvt on predicates");
                }
                if dty.kind() == TyKind::Bit || sty.kind() == TyKind::Bit {
                    return load_err(l, format!("`{opname}`: cvt takes no .b types"));
                }
                if df
                    && sf
                    && !matches!(
                        (dty, sty),
                        (Ty::F32, Ty::F16 | Ty::Bf16 | Ty::F64)
                            | (Ty::F64, Ty::F32 | Ty::F16)
                            | (Ty::F16 | Ty::Bf16, Ty::F32)
                    )
                {
                    return load_err(
                        l,
                        format!("`{opname}`: this float conversion is not supported"),
                    );
                }
                let irnd = match (df, sf) {
                    (true, true) => {
                        // the pairs above: f16/bf16 never convert to each other
                        // and no type to itself
                        let narrowing = dty.bits() < sty.bits();
                        match (narrowing, frnd, irnd) {
                            (true, Some("rn"), None) | (false, None, None) => None,
                            (true, Some(r), None) if r != "rn" => return load_err(l, format!("`{opname}`: only .rn is supported")),
                            _ => return load_err(l, format!("`{opname}`: a narrowing float conversion needs .rn, a widening one takes no rounding")),
                        }
                    }
                    (true, false) => {
                        if frnd != Some("rn") || irnd.is_some() {
                            return load_err(
                                l,
                                format!("`{opname}`: integer-to-float conversion needs .rn"),
                            );
                        }
                        if !matches!(dty, Ty::F32 | Ty::F64) {
                            return load_err(
                                l,
                                format!("`{opname}`: integer to f16/bf16 is not supported"),
                            );
                        }
                        None
                    }
                    (false, true) => {
                        if frnd.is_some() || !matches!(sty, Ty::F32 | Ty::F64) {
                            return load_err(l, format!("`{opname}`: float-to-integer needs .rni/.rzi/.rmi/.rpi from f32/f64"));
                        }
                        match irnd {
                            Some("rni") => Some(IRnd::Rni),
                            Some("rzi") => Some(IRnd::Rzi),
                            Some("rmi") => Some(IRnd::Rmi),
                            Some("rpi") => Some(IRnd::Rpi),
                            _ => {
                                return load_err(
                                    l,
                                    format!(
                                        "`{opname}`: float-to-integer needs .rni/.rzi/.rmi/.rpi"
                                    ),
                                )
                            }
                        }
                    }
                    (false, false) => {
                        if frnd.is_some() || irnd.is_some() {
                            return load_err(
                                l,
                                format!("`{opname}`: integer conversions take no rounding"),
                            );
                        }
                        None
                    }
                };
                m.done()?;
                Op::Cvt {
                    dty,
                    sty,
                    irnd,
                    d: self.dst(sc, &o[0], dty, Fit::Wider, l)?,
                    a: self.src(sc, &o[1], sty, Fit::Wider, l)?,
                }
            }
            "setp" => {
                let cmp = match m.take(&[
                    "eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs", "equ", "neu",
                    "ltu", "leu", "gtu", "geu", "num", "nan",
                ]) {
                    Some(c) => c,
                    None => return load_err(l, format!("`{opname}`: missing comparison")),
                };
                if m.take(&["and", "or", "xor"]).is_some() {
                    return load_err(
                        l,
                        format!("`{opname}`: predicate logic is outside the subset"),
                    );
                }
                let ty = m.ty()?;
                if m.has("ftz") {
                    return load_err(l, format!("`{opname}`: .ftz is not supported"));
                }
                m.done()?;
                let is_f = ty.kind() == TyKind::Float;
                if is_f && !matches!(ty, Ty::F32 | Ty::F64) || ty == Ty::Pred {
                    return load_err(l, format!("`{opname}`: unsupported type"));
                }
                let cmp = match cmp {
                    "eq" => Cmp::Eq,
                    "ne" => Cmp::Ne,
                    "lt" | "lo" => Cmp::Lt,
                    "le" | "ls" => Cmp::Le,
                    "gt" | "hi" => Cmp::Gt,
                    "ge" | "hs" => Cmp::Ge,
                    "equ" => Cmp::Equ,
                    "neu" => Cmp::Neu,
                    "ltu" => Cmp::Ltu,
                    "leu" => Cmp::Leu,
                    "gtu" => Cmp::Gtu,
                    "geu" => Cmp::Geu,
                    "num" => Cmp::Num,
                    _ => Cmp::Nan,
                };
                let unsigned_names = m_op_has(opname, &["lo", "ls", "hi", "hs"]);
                if (!is_f
                    && matches!(
                        cmp,
                        Cmp::Equ
                            | Cmp::Neu
                            | Cmp::Ltu
                            | Cmp::Leu
                            | Cmp::Gtu
                            | Cmp::Geu
                            | Cmp::Num
                            | Cmp::Nan
                    ))
                    || (ty.kind() == TyKind::Bit && !matches!(cmp, Cmp::Eq | Cmp::Ne))
                    || (unsigned_names && ty.kind() != TyKind::Uint)
                {
                    return load_err(
                        l,
                        format!("`{opname}`: comparison not allowed for this type"),
                    );
                }
                if o.len() != 3 {
                    return load_err(l, format!("`{opname}`: wrong operand count"));
                }
                // one destination: lra's kernels never write `p|q`
                let p = match &o[0] {
                    Raw::Name(n) => self.pred_reg(sc, n, l)?,
                    _ => return load_err(l, "setp destination must be one predicate"),
                };
                Op::Setp {
                    cmp,
                    ty,
                    p,
                    a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                    b: self.src(sc, &o[2], ty, Fit::Exact, l)?,
                }
            }
            "selp" => {
                let ty = m.ty()?;
                m.done()?;
                argc(4)?;
                if ty == Ty::Pred {
                    return load_err(l, "selp on predicates");
                }
                let c = match &o[3] {
                    Raw::Name(n) => self.pred_reg(sc, n, l)?,
                    _ => return load_err(l, "selp selector must be a predicate register"),
                };
                Op::Selp {
                    d: self.dst(sc, &o[0], ty, Fit::Exact, l)?,
                    a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                    b: self.src(sc, &o[2], ty, Fit::Exact, l)?,
                    c,
                }
            }
            "testp" => {
                let kind = match m.take(&[
                    "finite",
                    "infinite",
                    "number",
                    "notanumber",
                    "normal",
                    "subnormal",
                ]) {
                    Some("finite") => TestKind::Finite,
                    Some("infinite") => TestKind::Infinite,
                    Some("number") => TestKind::Number,
                    Some("notanumber") => TestKind::NotANumber,
                    Some("normal") => TestKind::Normal,
                    Some("subnormal") => TestKind::Subnormal,
                    _ => return load_err(l, format!("`{opname}`: missing test")),
                };
                let ty = m.ty()?;
                m.done()?;
                if !matches!(ty, Ty::F32 | Ty::F64) {
                    return load_err(l, "testp needs f32/f64");
                }
                argc(2)?;
                Op::Testp {
                    kind,
                    ty,
                    p: self.dst(sc, &o[0], Ty::Pred, Fit::Exact, l)?,
                    a: self.src(sc, &o[1], ty, Fit::Exact, l)?,
                }
            }
            "ld" | "st" => {
                // plain accesses only: lra's kernels order memory with
                // barriers, fences and atomics, never with `.volatile`,
                // `.relaxed` or cache operators (all refused by `done`)
                let space = take_space(&mut m)?;
                let vec = match m.take(&["v2", "v4"]) {
                    Some("v2") => 2,
                    Some("v4") => 4,
                    _ => 1,
                };
                let ty = m.ty()?;
                m.done()?;
                if ty == Ty::Pred || (vec > 1 && ty.bits() * vec > 128) {
                    return load_err(l, format!("`{opname}`: unsupported type/vector size"));
                }
                argc(2)?;
                let fit = if ty.kind() == TyKind::Float {
                    Fit::Exact
                } else {
                    Fit::Wider
                };
                let regs: Vec<&Raw> = match (vec, if base == "ld" { &o[0] } else { &o[1] }) {
                    (1, r) => vec![r],
                    (n, Raw::Vec(v)) if v.len() == n as usize => v.iter().collect(),
                    _ => {
                        return load_err(
                            l,
                            format!("`{opname}`: vector operand must have {vec} elements"),
                        )
                    }
                };
                if base == "ld" {
                    let ds = regs
                        .iter()
                        .map(|r| self.dst(sc, r, ty, fit, l))
                        .collect::<Result<_>>()?;
                    Op::Ld {
                        space,
                        ty,
                        ds,
                        addr: self.addr(sc, &o[1], space, l)?,
                    }
                } else {
                    if space == Space::Param {
                        return load_err(
                            l,
                            "st.param is not supported (kernel parameters are read-only)",
                        );
                    }
                    let srcs = regs
                        .iter()
                        .map(|r| self.src(sc, r, ty, fit, l))
                        .collect::<Result<_>>()?;
                    Op::St {
                        space,
                        ty,
                        srcs,
                        addr: self.addr(sc, &o[0], space, l)?,
                    }
                }
            }
            "atom" | "red" => {
                let space = take_space(&mut m)?;
                if space != Space::Global {
                    return load_err(
                        l,
                        format!("`{opname}`: atomics outside .global are outside the subset"),
                    );
                }
                let sem = m.take(&["relaxed", "acquire", "release", "acq_rel"]);
                let scope = SyncScope::parse(m.take(&["cta", "gpu", "sys"]));
                let aop = match m.take(&["add", "inc", "cas", "exch"]) {
                    Some("add") => AtomOp::Add,
                    Some("inc") => AtomOp::Inc,
                    Some("cas") => AtomOp::Cas,
                    Some("exch") => AtomOp::Exch,
                    _ => {
                        return load_err(l, format!("`{opname}`: missing or unsupported operation"))
                    }
                };
                let ty = m.ty()?;
                m.done()?;
                let ok = match aop {
                    AtomOp::Add => matches!(ty, Ty::U32 | Ty::F32),
                    AtomOp::Inc => ty == Ty::U32,
                    AtomOp::Cas | AtomOp::Exch => matches!(ty, Ty::B32 | Ty::B64),
                };
                if !ok || (base == "red" && aop == AtomOp::Cas) {
                    return load_err(l, format!("`{opname}`: type not allowed"));
                }
                let is_atom = base == "atom";
                let n = 2 + is_atom as usize + (aop == AtomOp::Cas) as usize;
                argc(n)?;
                let k = is_atom as usize;
                Op::Atom {
                    op: aop,
                    ty,
                    d: if is_atom {
                        Some(self.dst(sc, &o[0], ty, Fit::Exact, l)?)
                    } else {
                        None
                    },
                    addr: self.addr(sc, &o[k], space, l)?,
                    b: self.src(sc, &o[k + 1], ty, Fit::Exact, l)?,
                    c: if aop == AtomOp::Cas {
                        Some(self.src(sc, &o[k + 2], ty, Fit::Exact, l)?)
                    } else {
                        None
                    },
                    acquire: matches!(sem, Some("acquire" | "acq_rel")),
                    release: matches!(sem, Some("release" | "acq_rel")),
                    scope,
                }
            }
            "bra" => {
                m.take(&["uni"]);
                m.done()?;
                argc(1)?;
                match &o[0] {
                    Raw::Name(n) => match labels.get(n.as_str()) {
                        Some(&t) => Op::Bra { target: t },
                        None => return load_err(l, format!("unknown label {n}")),
                    },
                    _ => return load_err(l, "bra needs a label"),
                }
            }
            "bar" | "barrier" => {
                if m.has("warp") {
                    if base != "bar" || !m.has("sync") {
                        return load_err(l, format!("`{opname}` not supported"));
                    }
                    m.done()?;
                    argc(1)?;
                    return Ok(Op::BarWarp {
                        mask: self.src(sc, &o[0], Ty::B32, Fit::Exact, l)?,
                    });
                }
                m.take(&["cta"]);
                if !m.has("sync") {
                    return load_err(
                        l,
                        format!("`{opname}`: only bar.sync / barrier.sync are supported"),
                    );
                }
                m.take(&["aligned"]);
                m.done()?;
                // A thread count is outside the subset: the hardware counts
                // it in whole warps, which a partial warp makes differ from
                // a count of threads, and lra's kernels never give one.
                if o.len() == 2 {
                    return load_err(l, "bar.sync with a thread count is not supported");
                }
                if o.len() != 1 {
                    return load_err(l, "bar.sync takes a barrier id");
                }
                Op::Bar {
                    id: self.src(sc, &o[0], Ty::U32, Fit::Exact, l)?,
                }
            }
            "shfl" => {
                if !m.has("sync") {
                    return load_err(l, "only shfl.sync is supported");
                }
                let mode = match m.take(&["up", "down", "bfly", "idx"]) {
                    Some("up") => ShflMode::Up,
                    Some("down") => ShflMode::Down,
                    Some("bfly") => ShflMode::Bfly,
                    Some("idx") => ShflMode::Idx,
                    _ => return load_err(l, "shfl.sync needs a mode"),
                };
                if !m.has("b32") {
                    return load_err(l, "shfl.sync needs .b32");
                }
                m.done()?;
                argc(5)?;
                let (d, p) = match &o[0] {
                    Raw::Name(n) => (self.reg_of(sc, n, Ty::B32, Fit::Exact, l)?, None),
                    Raw::Pair(a, b) => (
                        self.reg_of(sc, a, Ty::B32, Fit::Exact, l)?,
                        Some(self.pred_reg(sc, b, l)?),
                    ),
                    _ => return load_err(l, "bad shfl destination"),
                };
                Op::Shfl {
                    mode,
                    d,
                    p,
                    a: self.src(sc, &o[1], Ty::B32, Fit::Exact, l)?,
                    b: self.src(sc, &o[2], Ty::B32, Fit::Exact, l)?,
                    c: self.src(sc, &o[3], Ty::B32, Fit::Exact, l)?,
                    mask: self.src(sc, &o[4], Ty::B32, Fit::Exact, l)?,
                }
            }
            "membar" => {
                let level = m.take(&["cta", "gl", "sys"]).ok_or_else(|| Error {
                    kind: ErrorKind::Load,
                    message: format!("line {l}: membar needs .cta/.gl/.sys"),
                })?;
                m.done()?;
                argc(0)?;
                Op::Fence {
                    scope: SyncScope::parse(Some(level)),
                }
            }
            "fence" => {
                m.take(&["sc", "acq_rel"]).ok_or_else(|| Error {
                    kind: ErrorKind::Load,
                    message: format!("line {l}: fence needs .sc/.acq_rel"),
                })?;
                let scope = m.take(&["cta", "gpu", "sys"]).ok_or_else(|| Error {
                    kind: ErrorKind::Load,
                    message: format!("line {l}: fence needs a scope"),
                })?;
                m.done()?;
                argc(0)?;
                Op::Fence {
                    scope: SyncScope::parse(Some(scope)),
                }
            }
            "ret" | "exit" => {
                m.take(&["uni"]);
                m.done()?;
                argc(0)?;
                Op::Exit
            }
            _ => return load_err(l, format!("unsupported instruction `{opname}`")),
        };
        Ok(op)
    }
}

fn m_op_has(opname: &str, mods: &[&str]) -> bool {
    opname.split('.').skip(1).any(|x| mods.contains(&x))
}

fn take_space(m: &mut Mods) -> Result<Space> {
    let s = match m.take(&["global", "shared", "param", "local", "const"]) {
        Some("global") => Space::Global,
        Some("shared") => Space::Shared,
        Some("param") => Space::Param,
        // lra's kernels name every space; generic addresses are not modelled
        None => {
            return load_err(
                m.line,
                format!(
                    "`{}`: needs a state space (.global, .shared or .param)",
                    m.op
                ),
            )
        }
        Some(x) => {
            return load_err(
                m.line,
                format!("`{}`: state space .{x} is not supported", m.op),
            )
        }
    };
    // `.shared::cta` etc. never reach here: the lexer splits on dots only,
    // so `shared::cta` would leave `:` tokens and fail to parse.
    Ok(s)
}

fn vec_part_bits(ty: Ty, n: usize, l: u32) -> Result<u32> {
    if !matches!(ty, Ty::B32 | Ty::B64) || !(n == 2 || (n == 4 && ty == Ty::B64)) {
        return load_err(
            l,
            "vector mov supports b32 {b16,b16}, b64 {b32,b32} / {b16 x4}",
        );
    }
    Ok(ty.bits() / n as u32)
}

fn bits_ty(bits: u32) -> Ty {
    match bits {
        16 => Ty::B16,
        32 => Ty::B32,
        _ => Ty::B64,
    }
}

fn sreg(n: &str) -> Option<Sreg> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    if let Some((a, b)) = n.split_once('.') {
        let d = dim(b)?;
        return Some(match a {
            "%tid" => Sreg::Tid(d),
            "%ntid" => Sreg::Ntid(d),
            "%ctaid" => Sreg::Ctaid(d),
            "%nctaid" => Sreg::Nctaid(d),
            _ => return None,
        });
    }
    Some(match n {
        "%laneid" => Sreg::Laneid,
        _ => return None,
    })
}

/// A literal as bits of `ty`.
fn imm(lit: Lit, neg: bool, ty: Ty, l: u32) -> Result<u64> {
    let bits = match (ty.kind(), lit) {
        (TyKind::Float, Lit::F32Bits(b)) if ty == Ty::F32 => {
            (if neg { b ^ 0x8000_0000 } else { b }) as u64
        }
        (TyKind::Float, Lit::F64Bits(b)) if ty == Ty::F64 => {
            if neg {
                b ^ (1 << 63)
            } else {
                b
            }
        }
        (TyKind::Float, Lit::Dec(v)) => {
            let v = if neg { -v } else { v };
            match ty {
                Ty::F32 => (v as f32).to_bits() as u64,
                Ty::F64 => v.to_bits(),
                _ => return load_err(l, "f16/bf16 literals are not supported"),
            }
        }
        (TyKind::Float, Lit::Int(_)) => {
            return load_err(l, "integer literal for a float operand (write 0f.../1.0)")
        }
        (TyKind::Bit, Lit::F32Bits(b)) if ty.bits() == 32 && !neg => b as u64,
        (TyKind::Bit, Lit::F64Bits(b)) if ty.bits() == 64 && !neg => b,
        (TyKind::Bit | TyKind::Uint | TyKind::Sint | TyKind::Pred, Lit::Int(v)) => {
            let v = if neg { -v } else { v };
            let (lo, hi) = (-(1i128 << (ty.bits() - 1)), (1i128 << ty.bits()) - 1);
            if ty != Ty::Pred && (v < lo || v > hi) {
                return load_err(l, format!("literal {v} does not fit .{ty:?}"));
            }
            (v as u64) & ty.mask()
        }
        _ => return load_err(l, format!("literal {lit:?} does not fit type .{ty:?}")),
    };
    Ok(bits)
}
