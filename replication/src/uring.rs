//! Who executes an io_uring SQE for a replica: see [`snapshot::uring`].
pub use snapshot::uring::*;
