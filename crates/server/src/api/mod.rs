//! The OpenAI-compatible API: wire types (`openai`), request checks (`validate`, `messages`,
//! `structured`, `fields`),
//! errors, request ids, the middleware layers, and the handlers (`routes`, `chat`).

pub mod chat;
pub mod decompress;
pub mod error;
pub mod extract;
pub mod fields;
pub mod messages;
pub mod middleware;
pub mod openai;
pub mod request_id;
pub mod routes;
pub mod structured;
pub mod tools;
pub mod validate;
