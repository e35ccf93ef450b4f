//! The `internvl` server: the engine behind an OpenAI-compatible API, and the command line.
//!
//! [`service`] builds the model and its engine one way for every command and test;
//! [`serve`] puts it behind [`api`] (handlers over the shared [`state`]), with [`connections`]
//! guarding the sockets, [`images`] resolving image URLs, [`metrics`] for Prometheus and
//! [`settings`] for every flag, variable and config key.

pub mod api;
pub mod connections;
pub mod device;
pub mod host_memory;
pub mod images;
pub mod loading;
pub mod metrics;
pub mod runner;
pub mod serve;
pub mod service;
pub mod settings;
pub mod state;
