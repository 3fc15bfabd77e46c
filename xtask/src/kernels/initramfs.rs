//! The initramfs: busybox, the in-guest test as /init, the agent with its libraries, and
//! per kernel an archive of its socket-diagnostics modules.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use super::{cpio::Cpio, output};

/// The in-guest test, PID 1 of the initramfs.
const GUEST_INIT: &str = include_str!("../../guest/init.sh");

/// Writes the initramfs: busybox, the in-guest test as /init, the agent and the shared
/// libraries `ldd` says it loads (the agent is a dynamic binary), and /dev/console (without
/// it the kernel gives init no console). Written here as a newc cpio archive, so the host
/// needs no cpio.
pub(super) fn build_initramfs(agent: &Path, busybox: &Path, out: &Path) -> Result<()> {
    let mut archive = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run"] {
        archive.directory(dir);
    }
    archive.device("dev/console", 0o600, 5, 1);
    archive.file("init", 0o755, GUEST_INIT.as_bytes());
    archive.file(
        "bin/busybox",
        0o755,
        &fs::read(busybox).with_context(|| format!("cannot read {}", busybox.display()))?,
    );
    archive.file(
        "drain-agent",
        0o755,
        &fs::read(agent).with_context(|| format!("cannot read {}", agent.display()))?,
    );
    let ldd = output(Command::new("ldd").arg(agent))?;
    for library in ldd
        .lines()
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')))
    {
        let inside = library.trim_start_matches('/');
        let mut parent = Path::new(inside).parent();
        let mut parents = Vec::new();
        while let Some(dir) = parent.filter(|dir| !dir.as_os_str().is_empty()) {
            parents.push(dir.display().to_string());
            parent = dir.parent();
        }
        for dir in parents.iter().rev() {
            archive.directory(dir);
        }
        let bytes = fs::read(library).with_context(|| format!("cannot read {library}"))?;
        archive.file(inside, 0o755, &bytes);
    }
    fs::write(out, archive.finish()).with_context(|| format!("cannot write {}", out.display()))
}

/// A cpio archive of `modules/NAME.ko` (the guest loads them in name order: inet_diag,
/// then tcp_diag).
pub(super) fn modules_archive(modules: &[PathBuf]) -> Result<Vec<u8>> {
    let mut archive = Cpio::default();
    archive.directory("modules");
    for (i, module) in modules.iter().enumerate() {
        let name = module
            .file_name()
            .and_then(|name| name.to_str())
            .context("module file name")?;
        let bytes =
            fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
        archive.file(&format!("modules/{i}-{name}"), 0o644, &bytes);
    }
    Ok(archive.finish())
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, process::Stdio};

    use super::GUEST_INIT;

    /// The guest's init parses: a syntax error (a quote inside the in-pod check's quoted
    /// script once ended it) would only show after a kernel had booted, on every kernel.
    #[test]
    fn the_guest_init_parses() {
        let mut sh = std::process::Command::new("sh")
            .arg("-n")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        sh.stdin
            .take()
            .expect("stdin")
            .write_all(GUEST_INIT.as_bytes())
            .expect("write the script");
        let out = sh.wait_with_output().expect("sh -n");
        assert!(
            out.status.success(),
            "sh -n xtask/guest/init.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
