//! What the fuzz targets share: the demo checkpoint, loaded once per process, and an allocator
//! that measures the peak memory of one call.

pub mod counting_alloc;
pub mod demo;
pub mod input;
