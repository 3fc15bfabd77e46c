//! The qemu runner: boots one kernel with the initramfs and reads the guest's `RESULT`
//! lines from the serial console, killing a guest that outlives its limit.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::host::HostTools;

impl HostTools {
    /// Boots one kernel; a guest that has not powered off by `limit` is killed.
    pub(super) fn boot(
        &self,
        vmlinuz: &Path,
        initramfs: &Path,
        rounds: u32,
        limit: Duration,
        log: &Path,
    ) -> Result<Guest> {
        let mut command = Command::new(&self.qemu);
        command
            .env("LD_LIBRARY_PATH", &self.library_path)
            .args(["-cpu", "max", "-smp", "2", "-m", "1024"])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet loglevel=4 rounds={rounds}"
            ));
        for dir in &self.firmware {
            command.arg("-L").arg(dir);
        }
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", self.qemu.display()))?;
        let stdout = child.stdout.take().context("qemu has no stdout")?;
        let mut stderr = child.stderr.take().context("qemu has no stderr")?;
        let (sender, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).replace('\r', "");
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut console = String::new();
        let mut results = BTreeMap::new();
        let mut hung = false;
        loop {
            let left = limit.saturating_sub(started.elapsed());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(result) = line.find("RESULT ").map(|at| &line[at + 7..])
                        && let Some((key, value)) = result.split_once('=')
                    {
                        results.insert(key.trim().to_owned(), value.trim().to_owned());
                    }
                    console.push_str(&line);
                    console.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    hung = true;
                    let _ = child.kill();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let exit = child.wait().context("qemu did not finish")?;
        let _ = reader.join();
        let mut errors = String::new();
        let _ = stderr.read_to_string(&mut errors);
        console.push_str(&errors);
        fs::write(log, &console).with_context(|| format!("cannot write {}", log.display()))?;
        Ok(Guest {
            results,
            hung,
            exit: exit.to_string(),
            seconds: started.elapsed().as_secs_f64(),
            qemu_errors: errors.trim().lines().last().unwrap_or_default().to_owned(),
        })
    }
}

/// What one guest reported.
pub(super) struct Guest {
    pub(super) results: BTreeMap<String, String>,
    pub(super) hung: bool,
    pub(super) exit: String,
    pub(super) seconds: f64,
    pub(super) qemu_errors: String,
}
