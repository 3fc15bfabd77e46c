//! Empty library target: drain-agent's build.rs depends on this crate so that cargo
//! rebuilds the agent when it changes; the programs themselves are in `main.rs`.
#![no_std]
