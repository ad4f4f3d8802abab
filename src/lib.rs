//! lra: automatic learning-rate adaptation (de Roos, Jidling, Wills, Schön,
//! Hennig 2021, Algorithm 1) for any training code that can call C.
//!
//! Layers, top to bottom (`../shared/DESIGN.md`): [`ffi`] (the C ABI),
//! [`engine`] (one handle: call order, layout, reductions),
//! [`controller`] (the scalar algorithm), [`optim`] (per-element optimizer
//! math), [`backend`] (bulk passes on the host or a CUDA device).

pub mod backend;
pub mod config;
pub mod controller;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod optim;

pub use config::{Config, Device, ReevalSchedule};
pub use engine::{Counters, Engine};
pub use error::{Error, Result, Status};
pub use optim::{DType, Hyper, OptimizerKind};
