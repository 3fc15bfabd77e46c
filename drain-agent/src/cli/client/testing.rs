//! Servers the clients' tests talk to: a fake agent on loopback, and a listener of another
//! user (`nobody`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex, mpsc},
};

/// The uid of `nobody`, whose sockets are another user's to the clients.
pub(super) const NOBODY: u32 = 65_534;

/// A listener on `bind` (port 0: a free one) whose sockets are `nobody`'s (made on a thread
/// whose fsuid is that user's), and the means to accept one connection there as it: until
/// then, each connection waits in its listen queue.
pub(super) fn nobodys_listener(bind: SocketAddr) -> (SocketAddr, mpsc::Sender<()>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (accept_tx, accept_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        // SAFETY: setfsuid is per thread; it changes whose sockets this thread makes.
        unsafe { libc::setfsuid(NOBODY) };
        let listener = TcpListener::bind(bind).expect("bind");
        ready_tx
            .send(listener.local_addr().expect("addr"))
            .expect("ready");
        let mut held = Vec::new();
        while accept_rx.recv().is_ok() {
            held.push(listener.accept().expect("accept"));
        }
    });
    (ready_rx.recv().expect("ready"), accept_tx)
}

/// A fake agent: answers each request on its listener, and keeps each request line.
pub(super) struct FakeAgent {
    /// Its URL (`http://127.0.0.1:PORT`).
    pub agent: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeAgent {
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

/// A fake agent on loopback that answers every request with `status` (its status line
/// after `HTTP/1.1`, with any extra header lines) and `body`.
pub(super) fn fake_agent(status: &'static str, body: &'static str) -> FakeAgent {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    fake_agent_on(listener, move |_| (status.to_owned(), body.to_owned()))
}

/// A fake agent on `listener` that answers each request with what `answer` gives for its
/// target (the path and query): the status line after `HTTP/1.1` (with any extra header
/// lines), and the body.
pub(super) fn fake_agent_on(
    listener: TcpListener,
    answer: impl Fn(&str) -> (String, String) + Send + 'static,
) -> FakeAgent {
    let port = listener.local_addr().expect("addr").port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    std::thread::spawn({
        let requests = Arc::clone(&requests);
        move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut request = [0_u8; 2048];
                let read = stream.read(&mut request).unwrap_or(0);
                let text = String::from_utf8_lossy(&request[..read]);
                let line = text.lines().next().unwrap_or_default().to_owned();
                let target = line.split(' ').nth(1).unwrap_or_default().to_owned();
                requests.lock().expect("requests").push(line);
                let (status, body) = answer(&target);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        }
    });
    FakeAgent {
        agent: format!("http://127.0.0.1:{port}"),
        requests,
    }
}
