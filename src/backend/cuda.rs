//! CUDA backend (issue 3). Until the PTX backend lands, creating a CUDA
//! handle reports that this build has no CUDA backend.

use super::Backend;
use crate::error::Result;
use crate::fail;
use crate::optim::OptimizerKind;

pub fn create(_kind: OptimizerKind, ordinal: i32) -> Result<Box<dyn Backend>> {
    fail!(
        Unsupported,
        "device = 1 (CUDA, ordinal {ordinal}): this build has no CUDA backend yet"
    )
}
