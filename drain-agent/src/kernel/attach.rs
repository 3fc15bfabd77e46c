//! How the state-change handler is attached: the three ways, tried in order, and what
//! each needs from the kernel (tracefs and its record layout for the classic tracepoint).

use std::{fmt, fs, os::fd::OwnedFd, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{BtfTracePoint, RawTracePoint, TracePoint, links::FdLink},
};
use log::info;

pub(super) const TRACEPOINT_CATEGORY: &str = "sock";
pub(super) const TRACEPOINT_NAME: &str = "inet_sock_set_state";
const TRACEFS: &str = "/sys/kernel/tracing";

/// How the state-change handler is attached, in the order the agent tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMethod {
    /// BTF-enabled tracepoint (`tp_btf`): cheapest; needs no tracefs.
    TpBtf,
    /// Classic tracepoint through tracefs (mounted by the agent if absent). Last: before
    /// Linux 6.7 the kernel skips it without counting the skip (`trace_call_bpf()`), so the
    /// agent confirms every answer with the socket tables there (`Doubt::SkipsUnseen`).
    Tracepoint,
    /// Raw tracepoint: needs no tracefs; for kernels that refuse tp_btf.
    RawTracepoint,
}

impl AttachMethod {
    /// The order the agent tries them in. Only this matters about it: a pinned layout
    /// holds one handler, whichever method attached it (`pin`).
    pub const ALL: [Self; 3] = [Self::TpBtf, Self::RawTracepoint, Self::Tracepoint];

    /// The name used in logs and in the `attach` metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TpBtf => "tp_btf",
            Self::Tracepoint => "tracepoint",
            Self::RawTracepoint => "raw_tracepoint",
        }
    }

    pub(super) const fn program(self) -> &'static str {
        match self {
            Self::TpBtf => "inet_sock_set_state_btf",
            Self::Tracepoint => "inet_sock_set_state_tp",
            Self::RawTracepoint => "inet_sock_set_state_raw",
        }
    }
}

impl fmt::Display for AttachMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Loads and attaches the handler `method` names. Returns the link as an fd of the agent's
/// own when it is a BPF link, which can be pinned (`pin`): the handler stays attached while
/// that fd or a pin holds it. `tp_btf` and the raw tracepoint always have one; the classic
/// tracepoint has one where the kernel links BPF to perf events (`BPF_LINK_TYPE_PERF_EVENT`,
/// Linux 5.15: the link holds the perf event, so it outlives the agent's fd of that event).
/// Before that, its attachment is the perf event itself, which aya keeps inside the program:
/// `None`, it cannot be pinned.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    method: AttachMethod,
) -> Result<Option<OwnedFd>> {
    let program = ebpf
        .program_mut(method.program())
        .with_context(|| format!("the eBPF object has no program {}", method.program()))?;
    match method {
        AttachMethod::TpBtf => {
            let program: &mut BtfTracePoint = program.try_into()?;
            program.load(TRACEPOINT_NAME, btf)?;
            let id = program.attach()?;
            own_link(program.take_link(id)?.into()).map(Some)
        }
        AttachMethod::Tracepoint => {
            ensure_tracefs()?;
            check_tracepoint_format()?;
            let program: &mut TracePoint = program.try_into()?;
            program.load()?;
            let id = program.attach(TRACEPOINT_CATEGORY, TRACEPOINT_NAME)?;
            match FdLink::try_from(program.take_link(id)?) {
                Ok(link) => own_link(link).map(Some),
                Err(_) => {
                    // No BPF link on this kernel: the perf event went with the refused
                    // conversion, so attach again and leave it with the program. Nothing was
                    // counted yet (the walk that seeds the counts runs after the attach).
                    program.attach(TRACEPOINT_CATEGORY, TRACEPOINT_NAME)?;
                    Ok(None)
                }
            }
        }
        AttachMethod::RawTracepoint => {
            let program: &mut RawTracePoint = program.try_into()?;
            program.load()?;
            let id = program.attach(TRACEPOINT_NAME)?;
            own_link(program.take_link(id)?.into()).map(Some)
        }
    }
}

/// An fd of the agent's own on `link` (aya 0.14's `FdLink` does not lend its fd): the link
/// stays attached while that fd or a pin of it exists, and detaches when the last goes.
fn own_link(link: FdLink) -> Result<OwnedFd> {
    let id = link.info().context("cannot read the handler's link")?.id();
    super::pin::link_fd_by_id(id).context("cannot open the handler's link")
}

/// Mounts tracefs at /sys/kernel/tracing when nothing is there (the classic tracepoint
/// needs it to find the tracepoint's id).
fn ensure_tracefs() -> Result<()> {
    let events = Path::new(TRACEFS).join("events");
    if events.exists() {
        return Ok(());
    }
    if Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    info!("tracefs is not mounted; mounting it at {TRACEFS}");
    rustix::mount::mount(
        "nodev",
        TRACEFS,
        "tracefs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)
    .with_context(|| format!("cannot mount tracefs at {TRACEFS}"))
}

/// The classic tracepoint program reads `skaddr`, `oldstate` and `newstate` at fixed
/// offsets; refuse to attach if this kernel lays the record out differently.
fn check_tracepoint_format() -> Result<()> {
    let path = [TRACEFS, "/sys/kernel/debug/tracing"]
        .iter()
        .map(|root| {
            Path::new(root)
                .join("events")
                .join(TRACEPOINT_CATEGORY)
                .join(TRACEPOINT_NAME)
                .join("format")
        })
        .find(|path| path.exists())
        .context("tracefs has no sock/inet_sock_set_state (Linux >= 4.16 needed)")?;
    let format =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    check_record_offsets(&format)
}

fn check_record_offsets(format: &str) -> Result<()> {
    for (field, expected) in [("skaddr", 8), ("oldstate", 16), ("newstate", 20)] {
        let offset = format
            .lines()
            .find(|line| {
                line.split(';')
                    .next()
                    .is_some_and(|decl| decl.trim_end().ends_with(&format!(" {field}")))
            })
            .and_then(|line| line.split("offset:").nth(1))
            .and_then(|rest| rest.split(';').next())
            .and_then(|number| number.trim().parse::<usize>().ok())
            .with_context(|| format!("tracepoint format has no field {field}"))?;
        if offset != expected {
            bail!("tracepoint field {field} is at offset {offset}, the program expects {expected}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state
ID: 1470
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
";

    /// Found by an audit: before Linux 6.7 the classic tracepoint's skipped runs are not
    /// counted (`trace_call_bpf()`), the raw tracepoint's are not skipped that way at all:
    /// when tp_btf cannot attach, the raw tracepoint comes first.
    #[test]
    fn the_raw_tracepoint_is_tried_before_the_classic_one() {
        let position = |method| AttachMethod::ALL.iter().position(|tried| *tried == method);
        assert_eq!(position(AttachMethod::TpBtf), Some(0));
        assert!(
            position(AttachMethod::RawTracepoint) < position(AttachMethod::Tracepoint),
            "{:?}",
            AttachMethod::ALL
        );
    }

    #[test]
    fn accepts_the_known_tracepoint_layout() {
        check_record_offsets(FORMAT).expect("known layout");
    }

    #[test]
    fn refuses_a_moved_field() {
        let moved = FORMAT.replace("int newstate;\toffset:20", "int newstate;\toffset:24");
        let error = check_record_offsets(&moved).expect_err("moved field");
        assert!(
            error.to_string().contains("newstate is at offset 24"),
            "{error}"
        );
        let error = check_record_offsets("format:\n").expect_err("no fields");
        assert!(error.to_string().contains("no field skaddr"), "{error}");
    }
}
