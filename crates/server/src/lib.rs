//! The `internvl` server: the engine behind an OpenAI-compatible API, and the command line.

pub mod api;
pub mod connections;
pub mod device;
pub mod images;
pub mod loading;
pub mod metrics;
pub mod runner;
pub mod serve;
pub mod service;
pub mod settings;
pub mod state;
