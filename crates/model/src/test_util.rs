//! Helpers shared by the crate's unit tests.

use candle_core::Tensor;

/// max |a − b| over all elements.
pub fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}
