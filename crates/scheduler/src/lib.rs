//! The engine that drives the model: sampling today; continuous batching over a paged KV
//! cache next.
