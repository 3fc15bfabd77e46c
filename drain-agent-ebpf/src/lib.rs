//! Empty library target: drain-agent's build.rs depends on this crate so that cargo
//! rebuilds the agent when it changes; the programs themselves are in the binary's modules (`main.rs` lists them).
#![no_std]
