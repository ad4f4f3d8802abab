//! The library's error: a status code (the C ABI's `lra_status`) plus a
//! message for humans.

use std::fmt;

/// Status codes. Values are part of the C ABI and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NullPointer = 1,
    InvalidArgument = 2,
    InvalidConfig = 3,
    CallOrder = 4,
    SizeMismatch = 5,
    NoCuda = 6,
    Cuda = 7,
    BadCheckpoint = 8,
    BufferTooSmall = 9,
    Panic = 10,
    Unsupported = 11,
    ReductionFailed = 12,
    OutOfMemory = 13,
}

impl Status {
    pub const ALL: [Status; 14] = [
        Status::Ok,
        Status::NullPointer,
        Status::InvalidArgument,
        Status::InvalidConfig,
        Status::CallOrder,
        Status::SizeMismatch,
        Status::NoCuda,
        Status::Cuda,
        Status::BadCheckpoint,
        Status::BufferTooSmall,
        Status::Panic,
        Status::Unsupported,
        Status::ReductionFailed,
        Status::OutOfMemory,
    ];

    pub fn from_u32(v: u32) -> Option<Status> {
        Status::ALL.get(v as usize).copied()
    }

    /// Static description, NUL-terminated for the C ABI.
    pub fn description(self) -> &'static str {
        match self {
            Status::Ok => "ok\0",
            Status::NullPointer => "null pointer argument\0",
            Status::InvalidArgument => "invalid argument\0",
            Status::InvalidConfig => "invalid configuration\0",
            Status::CallOrder => "call out of order\0",
            Status::SizeMismatch => "tensor count or size differs from the first step\0",
            Status::NoCuda => "CUDA is not available (no driver or no device)\0",
            Status::Cuda => "CUDA error\0",
            Status::BadCheckpoint => "checkpoint buffer is invalid or from another configuration\0",
            Status::BufferTooSmall => "buffer too small\0",
            Status::Panic => "internal error (a panic was caught)\0",
            Status::Unsupported => "not supported by this build or backend\0",
            Status::ReductionFailed => "the registered cross-rank reduction reported failure\0",
            Status::OutOfMemory => "out of memory for lra's own buffers (the optimizer state)\0",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.status.description();
        write!(f, "{}: {}", &d[..d.len() - 1], self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error)` with a formatted message.
#[macro_export]
macro_rules! fail {
    ($status:ident, $($fmt:tt)*) => {
        return Err($crate::error::Error::new($crate::error::Status::$status, format!($($fmt)*)))
    };
}
