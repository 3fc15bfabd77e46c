//! Rebuild the eBPF object when the linker changes, and pick the BPF instruction set.
use std::{env, path::PathBuf};

fn main() {
    // bpf-linker does the code generation (rustc hands it bitcode), so a new linker can
    // change the object: rebuild when it does.
    let linker = env::var_os("PATH")
        .and_then(|paths| {
            env::split_paths(&paths)
                .map(|dir| dir.join("bpf-linker"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("bpf-linker"));
    println!("cargo:rerun-if-changed={}", linker.display());
    // bpf-linker internalises every symbol it is not told to export, extern declarations
    // included, and LLVM then drops the arguments of the "internal" kfunc `bpf_sock_destroy`
    // (dead-argument elimination: the call lost its socket). Exported, it stays an extern
    // call with its C signature, relocated against the undefined symbol, which the agent
    // links to the kernel's BTF id at load time (drain-agent/src/kernel/destroy.rs).
    println!("cargo:rustc-link-arg-bins=--export=bpf_sock_destroy");
}
