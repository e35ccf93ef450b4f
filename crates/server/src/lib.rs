//! The `internvl` server: the engine behind an OpenAI-compatible API, and the command line.

pub mod runner;
