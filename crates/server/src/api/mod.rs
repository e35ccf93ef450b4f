//! The OpenAI-compatible API: wire types, validation, errors and handlers.

pub mod chat;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod openai;
pub mod request_id;
pub mod routes;
pub mod validate;
