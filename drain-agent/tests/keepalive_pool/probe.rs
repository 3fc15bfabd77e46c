//! The node's probes: every `interval`, `GET /health` straight to the backend's port, from
//! another local address (the "node", 127.0.0.2), on a new connection each time — what a
//! kubelet or a load balancer's health checker does while the backend drains. They are
//! arrivals the drain must not wait for (`--ignore 127.0.0.2/32`).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// One probe: when it started, and whether it got `200`.
#[derive(Clone, Copy, Debug)]
pub struct ProbeRecord {
    pub at: Instant,
    pub ok: bool,
}

pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<ProbeRecord>>>,
}

impl Probe {
    pub fn start(source: Ipv4Addr, target: SocketAddrV4, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                let mut records = Vec::new();
                while !flag.load(Ordering::SeqCst) {
                    let at = Instant::now();
                    records.push(ProbeRecord {
                        at,
                        ok: probe_once(source, target),
                    });
                    while at.elapsed() < interval && !flag.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                records
            })
            .expect("start the probe thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops probing; every probe made.
    pub fn finish(mut self) -> Vec<ProbeRecord> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("probe running")
            .join()
            .expect("probe thread")
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn probe_once(source: Ipv4Addr, target: SocketAddrV4) -> bool {
    let Ok(mut stream) = crate::common::connect_from(source, target) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).is_ok() && answer.starts_with(b"HTTP/1.1 200")
}
