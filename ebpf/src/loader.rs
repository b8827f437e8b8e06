//! Loading the probes in a short-lived child process. CO-RE needs the kernel's BTF, and parsing
//! it costs tens of MiB for a moment (aya builds the whole type graph); an agent that runs for
//! months should not carry that peak, nor the heap it leaves fragmented. The child (the same
//! binary, started with a hidden subcommand that calls [`serve`]) loads and attaches exactly as
//! [`Probes::load`] does, passes the map and link fds back over a socket (`SCM_RIGHTS`) with the
//! outcome, and exits. The parent then holds the very kernel objects it would have created
//! itself. A failure of the child process itself is an error for the caller, who can load
//! in-process instead; what the kernel refuses is not a failure but part of the outcome.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData};
use serde::{Deserialize, Serialize};

use crate::probes::{
    Attach, AttachAttempt, Kernel, OBJECTS, Options, Probes, ProgramStatus, REQUEST_LATENCY,
    RUNQUEUE_DELAY, log_outcome,
};

/// Most fds one hand-off carries: three maps and one link per hook (six today).
const MAX_FDS: usize = 32;
/// Largest outcome message; refusal reasons are capped at a few hundred bytes each.
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("starting the eBPF loader process {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("eBPF loader process: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("eBPF loader process sent no outcome within {0:?}")]
    Timeout(Duration),
    #[error("eBPF loader process exited without an outcome ({0})")]
    Exited(std::process::ExitStatus),
    #[error("eBPF loader process: malformed hand-off: {0}")]
    Protocol(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> LoaderError {
    move |source| LoaderError::Io { what, source }
}

/// What the child reports next to the fds: maps first (`req_hist`, `runq_hist`, `dropped`)
/// when `maps` is true, then `links` link fds.
#[derive(Serialize, Deserialize)]
struct Outcome {
    object: Option<String>,
    status: Vec<WireStatus>,
    programs: Vec<(String, u32)>,
    maps: bool,
    links: usize,
}

#[derive(Serialize, Deserialize)]
struct WireStatus {
    program: String,
    attached: Option<Attach>,
    attempts: Vec<AttachAttempt>,
}

/// Runs `command` (which must end up calling [`serve`]), hands it `opts`, and returns the probes
/// it loaded, owned by this process. Logs the outcome as [`Probes::load`] does.
pub fn load_in_child(
    mut command: Command,
    opts: &Options,
    timeout: Duration,
) -> Result<Probes, LoaderError> {
    let (ours, theirs) = seqpacket_pair().map_err(io_err("socketpair"))?;
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|source| LoaderError::Spawn {
            command: shown,
            source,
        })?;
    let outcome = exchange(&ours, opts, timeout, &mut child);
    if outcome.is_err() {
        let _ = child.kill();
    }
    reap(&mut child);
    let probes = outcome?;
    log_outcome(probes.object, &probes.status);
    Ok(probes)
}

fn exchange(
    sock: &OwnedFd,
    opts: &Options,
    timeout: Duration,
    child: &mut Child,
) -> Result<Probes, LoaderError> {
    let request = serde_json::to_vec(opts).map_err(|e| LoaderError::Protocol(e.to_string()))?;
    send(sock.as_fd(), &request, &[]).map_err(io_err("sending options"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if wait_readable(sock.as_fd(), Duration::from_millis(100))
            .map_err(io_err("waiting for the outcome"))?
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            // It may have sent just before exiting.
            if wait_readable(sock.as_fd(), Duration::ZERO).unwrap_or(false) {
                break;
            }
            return Err(LoaderError::Exited(status));
        }
        if Instant::now() >= deadline {
            return Err(LoaderError::Timeout(timeout));
        }
    }
    let (bytes, fds) = recv(sock.as_fd()).map_err(io_err("receiving the outcome"))?;
    if bytes.is_empty() {
        let status = child.wait().map_err(io_err("waiting for exit"))?;
        return Err(LoaderError::Exited(status));
    }
    let outcome: Outcome =
        serde_json::from_slice(&bytes).map_err(|e| LoaderError::Protocol(e.to_string()))?;
    probes_from(outcome, fds)
}

fn probes_from(outcome: Outcome, fds: Vec<OwnedFd>) -> Result<Probes, LoaderError> {
    let bad = |what: String| LoaderError::Protocol(what);
    let object = match outcome.object.as_deref() {
        None => None,
        Some(name) => Some(
            OBJECTS
                .iter()
                .map(|(n, _)| *n)
                .find(|n| *n == name)
                .ok_or_else(|| bad(format!("unknown object {name:?}")))?,
        ),
    };
    let status = outcome
        .status
        .into_iter()
        .map(|s| {
            let program = match s.program.as_str() {
                REQUEST_LATENCY => REQUEST_LATENCY,
                RUNQUEUE_DELAY => RUNQUEUE_DELAY,
                other => return Err(bad(format!("unknown program group {other:?}"))),
            };
            Ok(ProgramStatus {
                program,
                attached: s.attached,
                attempts: s.attempts,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let expected = if outcome.maps { 3 } else { 0 } + outcome.links;
    if fds.len() != expected {
        return Err(bad(format!("{} fds for {} expected", fds.len(), expected)));
    }
    let kernel = if outcome.maps {
        let mut fds = fds.into_iter();
        let mut map = |name: &'static str| {
            let fd = fds.next().ok_or_else(|| bad(format!("no fd for {name}")))?;
            MapData::from_fd(fd)
                .and_then(Map::from_map_data)
                .map_err(|e| bad(format!("map {name}: {e}")))
        };
        let req_hist = map("req_hist")?;
        let runq_hist = map("runq_hist")?;
        let dropped = map("dropped")?;
        Some(Kernel {
            req_hist,
            runq_hist,
            dropped,
            links: fds.collect(),
            programs: outcome.programs,
        })
    } else {
        None
    };
    Ok(Probes {
        kernel,
        object,
        status,
    })
}

/// The child's side: reads the options from the socket on stdin, loads, sends the outcome and
/// the fds back. The caller exits right after; the parent's copies keep everything attached.
pub fn serve() -> Result<(), LoaderError> {
    let sock = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err("stdin"))?;
    let (request, _) = recv(sock.as_fd()).map_err(io_err("receiving options"))?;
    let opts: Options =
        serde_json::from_slice(&request).map_err(|e| LoaderError::Protocol(e.to_string()))?;
    let probes = Probes::load_quietly(&opts);
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    let mut programs = Vec::new();
    let mut links = 0;
    if let Some(kernel) = &probes.kernel {
        for map in [&kernel.req_hist, &kernel.runq_hist, &kernel.dropped] {
            fds.push(map_fd(map).ok_or_else(|| {
                LoaderError::Protocol("a histogram map has an unexpected type".into())
            })?);
        }
        fds.extend(kernel.links.iter().map(|l| l.as_fd()));
        links = kernel.links.len();
        programs.clone_from(&kernel.programs);
    }
    let outcome = Outcome {
        object: probes.object.map(str::to_string),
        status: probes
            .status
            .iter()
            .map(|s| WireStatus {
                program: s.program.to_string(),
                attached: s.attached,
                attempts: s.attempts.clone(),
            })
            .collect(),
        programs,
        maps: probes.kernel.is_some(),
        links,
    };
    let bytes = serde_json::to_vec(&outcome).map_err(|e| LoaderError::Protocol(e.to_string()))?;
    send(sock.as_fd(), &bytes, &fds).map_err(io_err("sending the outcome"))
}

fn map_fd(map: &Map) -> Option<BorrowedFd<'_>> {
    let data: &MapData = match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) => d,
        Map::PerCpuHashMap(d) | Map::PerCpuArray(d) | Map::PerCpuLruHashMap(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd())
}

/// Waits up to a few seconds for the child to exit after its hand-off, then kills it.
fn reap(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two fds socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn wait_readable(sock: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0)
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fds * size_of::<libc::c_int>()) as u32) as usize }
}

fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds, at most {MAX_FDS}", fds.len()),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call, and the
    // control buffer is large enough for one SCM_RIGHTS header with `fds.len()` fds.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(fds.len()) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<libc::c_int>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One message and the fds that came with it (close-on-exec). Empty bytes: the peer hung up.
fn recv(sock: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
    let mut fds = Vec::new();
    // SAFETY: as in `send`; the kernel writes at most `msg_controllen` control bytes and every
    // fd it delivers in SCM_RIGHTS is new and ours, so each is wrapped exactly once.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = (control.len() * 8) as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize - header) / size_of::<libc::c_int>();
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message or fds truncated",
            ));
        }
        n as usize
    };
    buf.truncate(n);
    Ok((buf, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_and_bytes_cross_a_socket_pair() {
        let (a, b) = seqpacket_pair().unwrap();
        let (r, w) = std::io::pipe().unwrap();
        send(a.as_fd(), b"hello", &[w.as_fd()]).unwrap();
        drop(w);
        let (bytes, fds) = recv(b.as_fd()).unwrap();
        assert_eq!(bytes, b"hello");
        assert_eq!(fds.len(), 1);
        // The received fd is the pipe's write end: writing through it reaches the read end.
        let mut w2 = std::fs::File::from(fds.into_iter().next().unwrap());
        std::io::Write::write_all(&mut w2, b"x").unwrap();
        drop(w2);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(OwnedFd::from(r)), &mut got)
            .unwrap();
        assert_eq!(got, "x");
    }

    #[test]
    fn a_hand_off_with_the_wrong_fd_count_is_refused() {
        let outcome = Outcome {
            object: Some("compat".into()),
            status: vec![],
            programs: vec![],
            maps: true,
            links: 2,
        };
        let err = probes_from(outcome, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("0 fds for 5 expected"), "{err}");
    }

    #[test]
    fn an_unknown_program_group_is_refused() {
        let outcome = Outcome {
            object: None,
            status: vec![WireStatus {
                program: "nope".into(),
                attached: None,
                attempts: vec![],
            }],
            programs: vec![],
            maps: false,
            links: 0,
        };
        let err = probes_from(outcome, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }

    #[test]
    fn a_child_that_exits_without_an_outcome_is_an_error() {
        let err = load_in_child(
            Command::new("true"),
            &Options::default(),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, LoaderError::Exited(_)), "{err}");
    }
}
