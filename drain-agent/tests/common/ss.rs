//! `ss`, the socket tables' own view: the ground truth the tests compare the agent with.
//! One runner ([`ss`]) and the readings the tests take from it.

use std::process::Command;

/// The rows of `ss <args>` (run in the named network namespace when given, through
/// `ip netns exec`), as text.
pub fn ss(netns: Option<&str>, args: &[&str]) -> String {
    let mut command = match netns {
        Some(name) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", name, "ss"]);
            command
        }
        None => Command::new("ss"),
    };
    let output = command.args(args).output().expect("run ss");
    assert!(output.status.success(), "ss failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Established connections with local port `port`, counted by `ss` (ground truth); with
/// those in CLOSE_WAIT, which the agent counts too.
pub fn ss_count(port: u16, netns: Option<&str>) -> u64 {
    ["established", "close-wait"]
        .into_iter()
        .map(|state| rows_in_state(port, state, netns))
        .sum()
}

/// Connections with local port `port` in TCP state `state` (as `ss` names it, e.g.
/// `close-wait`) in this namespace.
pub fn ss_count_in_state(port: u16, state: &str) -> u64 {
    rows_in_state(port, state, None)
}

fn rows_in_state(port: u16, state: &str, netns: Option<&str>) -> u64 {
    let filter = format!("( sport = :{port} )");
    ss(netns, &["-Htn", "state", state, &filter])
        .lines()
        .count() as u64
}

/// Connections waiting in the accept queues of the listeners on `port` (a listener's
/// Recv-Q), summed.
pub fn accept_queue_len(port: u16) -> u64 {
    second_column(&ss(None, &["-Htln", &format!("( sport = :{port} )")])).sum()
}

/// The most bytes queued towards a peer (Send-Q) on an established connection with local
/// port `port`; 0 without any.
pub fn send_queue_max(port: u16) -> u64 {
    let filter = format!("( sport = :{port} )");
    second_column(&ss(None, &["-Htn", "state", "established", &filter]))
        .max()
        .unwrap_or(0)
}

/// The numbers in the second column of `ss -H` rows: Recv-Q after a listener's State,
/// Send-Q where one state is asked for (ss leaves the State column out then).
fn second_column(rows: &str) -> impl Iterator<Item = u64> + '_ {
    rows.lines()
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
}
