//! Which TCP ports a container listens on, and the address the agent reaches each one at.
//!
//! The container's processes come from its `cgroup.procs`; their sockets from
//! `<proc_root>/<pid>/fd` (`socket:[inode]` links); listening sockets from
//! `<proc_root>/<pid>/net/tcp{,6}` (state `0A`), which shows the socket table of the process's
//! own network namespace. A socket counts when its inode is one of the container's. Reaching it
//! (the agent is a non-privileged process and never enters another namespace):
//! - the socket is in the agent's own network namespace (its inode is in
//!   `<proc_root>/self/net/tcp{,6}`): the loopback address, or the address it is bound to;
//! - it is in another namespace (a pod's): the pod IP from the Kubernetes API, else the
//!   namespace's first non-loopback local IPv4 address (`<proc_root>/<pid>/net/fib_trie`);
//!   a socket bound to loopback there cannot be reached and is reported as such.
//!
//! Reading another user's `/proc/<pid>/fd` needs the same uid or `CAP_SYS_PTRACE`; where the
//! links cannot be read and the sockets live in a namespace of their own (a pod's), every
//! listening socket of that namespace is the container's.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// Most processes of one container whose sockets are looked at.
const MAX_PIDS: usize = 64;
/// Most file descriptors read per process.
const MAX_FDS: usize = 4096;

/// One listening socket of a container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub port: u16,
    /// Where the agent connects, or why it cannot.
    pub connect: Result<SocketAddr, String>,
    pub inode: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Socket {
    addr: IpAddr,
    port: u16,
    inode: u64,
}

/// Listening sockets in one `/proc/net/tcp` or `tcp6` table.
fn listening(text: &str, v6: bool) -> Vec<Socket> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), f[9].parse::<u64>()) else {
            continue;
        };
        let Some(addr) = parse_addr(addr, v6) else {
            continue;
        };
        out.push(Socket { addr, port, inode });
    }
    out
}

/// The kernel prints addresses as 32-bit words in host byte order.
fn parse_addr(hex: &str, v6: bool) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    if !v6 {
        (hex.len() == 8).then_some(())?;
        return Some(IpAddr::V4(Ipv4Addr::from(word(hex)?)));
    }
    (hex.len() == 32).then_some(())?;
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
    }
    let v6 = Ipv6Addr::from(bytes);
    Some(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

fn tables(proc_root: &Path, pid: &str) -> Option<Vec<Socket>> {
    let dir = proc_root.join(pid).join("net");
    let v4 = std::fs::read_to_string(dir.join("tcp")).ok();
    let v6 = std::fs::read_to_string(dir.join("tcp6")).ok();
    if v4.is_none() && v6.is_none() {
        return None;
    }
    let mut out = listening(v4.as_deref().unwrap_or(""), false);
    out.extend(listening(v6.as_deref().unwrap_or(""), true));
    Some(out)
}

/// Socket inodes among `pid`'s open files; `None` when the links cannot be read.
fn socket_inodes(proc_root: &Path, pid: &str, into: &mut HashSet<u64>) -> Option<()> {
    let dir = std::fs::read_dir(proc_root.join(pid).join("fd")).ok()?;
    for entry in dir.take(MAX_FDS).flatten() {
        if let Ok(target) = std::fs::read_link(entry.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
        {
            into.insert(inode);
        }
    }
    Some(())
}

/// First non-loopback local IPv4 address in a `/proc/net/fib_trie` (`/32 host LOCAL` entries).
fn local_address(fib_trie: &str) -> Option<Ipv4Addr> {
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let t = line.trim_start_matches([' ', '|', '+', '-', '`']).trim();
        if let Ok(a) = t.parse::<Ipv4Addr>() {
            last = Some(a);
        } else if t.contains("host LOCAL")
            && let Some(a) = last
            && !a.is_loopback()
        {
            return Some(a);
        }
    }
    None
}

/// What the discovery of one container needs to know beyond procfs.
pub struct Context<'a> {
    pub proc_root: &'a Path,
    /// Inodes of the listening sockets in the agent's own network namespace.
    pub own: &'a HashSet<u64>,
    /// The pod's IP, where the Kubernetes API gave it.
    pub pod_ip: Option<IpAddr>,
}

/// Listening sockets of the agent's own network namespace.
pub fn own_listeners(proc_root: &Path) -> HashSet<u64> {
    tables(proc_root, "self")
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.inode)
        .collect()
}

/// The listening sockets of the processes `pids` (one container), with where to reach each.
pub fn listeners(ctx: &Context, pids: &[String]) -> Vec<Listener> {
    let pids = &pids[..pids.len().min(MAX_PIDS)];
    let mut inodes = HashSet::new();
    let mut fds_readable = false;
    for pid in pids {
        fds_readable |= socket_inodes(ctx.proc_root, pid, &mut inodes).is_some();
    }
    // Processes of one container normally share a network namespace; a table is read once per
    // distinct content's first pid, which covers containers whose processes differ.
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for pid in pids {
        let Some(sockets) = tables(ctx.proc_root, pid) else {
            continue;
        };
        let key: Vec<u64> = sockets.iter().map(|s| s.inode).collect();
        if !seen.insert(key) {
            continue;
        }
        let foreign = sockets.iter().any(|s| !ctx.own.contains(&s.inode));
        for s in sockets {
            let own_ns = ctx.own.contains(&s.inode);
            let ours = if fds_readable {
                inodes.contains(&s.inode)
            } else {
                // Without the fd links only a namespace of the container's own says whose a
                // socket is.
                !own_ns && foreign
            };
            if !ours {
                continue;
            }
            let connect = if own_ns {
                Ok(SocketAddr::new(
                    match s.addr {
                        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                        a => a,
                    },
                    s.port,
                ))
            } else if s.addr.is_loopback() {
                Err(format!(
                    "listens on {}:{} inside its own network namespace, which the agent does not enter",
                    s.addr, s.port
                ))
            } else if !s.addr.is_unspecified() {
                Ok(SocketAddr::new(s.addr, s.port))
            } else if let Some(ip) = ctx.pod_ip {
                Ok(SocketAddr::new(ip, s.port))
            } else {
                std::fs::read_to_string(ctx.proc_root.join(pid).join("net/fib_trie"))
                    .ok()
                    .as_deref()
                    .and_then(local_address)
                    .map(|a| SocketAddr::new(IpAddr::V4(a), s.port))
                    .ok_or_else(|| {
                        format!(
                            "port {}: no address of its network namespace is known",
                            s.port
                        )
                    })
            };
            out.push(Listener {
                port: s.port,
                connect,
                inode: s.inode,
            });
        }
    }
    out.sort();
    // A port bound on both families is one endpoint: keep the first reachable one.
    out.dedup_by_key(|l| l.port);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 00000000:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D3C2 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 100 0 0 10 0
   3: 0500000A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
";

    fn fake(root: &Path, pid: &str, tcp: &str, tcp6: &str, sockets: &[u64]) {
        let net = root.join(pid).join("net");
        std::fs::create_dir_all(&net).expect("mkdir");
        std::fs::write(net.join("tcp"), tcp).expect("tcp");
        std::fs::write(net.join("tcp6"), tcp6).expect("tcp6");
        let fd = root.join(pid).join("fd");
        std::fs::create_dir_all(&fd).expect("mkdir");
        for (i, s) in sockets.iter().enumerate() {
            std::os::unix::fs::symlink(format!("socket:[{s}]"), fd.join(i.to_string()))
                .expect("link");
        }
        std::fs::write(
            net.join("fib_trie"),
            "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.0.0.5\n        /32 host LOCAL\n     |-- 127.0.0.1\n        /32 host LOCAL\nLocal:\n",
        )
        .expect("fib");
    }

    #[test]
    fn tables_parse() {
        let s = listening(TCP, false);
        assert_eq!(s.len(), 3, "the established socket is not listening");
        assert_eq!(s[0].addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(s[0].port, 8080);
        assert_eq!(s[1].addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(s[1].port, 9090);
        assert_eq!(s[2].addr, "10.0.0.5".parse::<IpAddr>().expect("ip"));
        let s6 = listening(TCP6, true);
        assert_eq!(s6[0].addr, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(s6[0].port, 8081);
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100007F", true),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[test]
    fn own_namespace_uses_loopback_and_only_the_containers_sockets() {
        let root = tempfile::tempdir().expect("tmp");
        fake(root.path(), "self", TCP, TCP6, &[]);
        fake(root.path(), "42", TCP, TCP6, &[1001, 2001]);
        let own = own_listeners(root.path());
        let ctx = Context {
            proc_root: root.path(),
            own: &own,
            pod_ip: None,
        };
        let l = listeners(&ctx, &["42".into()]);
        assert_eq!(
            l.iter()
                .map(|l| (l.port, l.connect.clone()))
                .collect::<Vec<_>>(),
            vec![
                (8080, Ok("127.0.0.1:8080".parse().expect("addr"))),
                (8081, Ok("[::1]:8081".parse().expect("addr"))),
            ]
        );
    }

    #[test]
    fn pod_namespace_uses_the_pod_ip_and_reports_loopback() {
        let root = tempfile::tempdir().expect("tmp");
        fake(root.path(), "self", "", "", &[]);
        fake(root.path(), "7", TCP, "", &[1001, 1002, 1004]);
        let own = own_listeners(root.path());
        let mut ctx = Context {
            proc_root: root.path(),
            own: &own,
            pod_ip: Some("10.1.2.3".parse().expect("ip")),
        };
        let l = listeners(&ctx, &["7".into()]);
        assert_eq!(l.len(), 3);
        assert!(l[0].connect.is_ok() && l[0].port == 80, "{l:?}");
        assert_eq!(l[0].connect, Ok("10.0.0.5:80".parse().expect("addr")));
        assert!(
            l[1].connect
                .as_ref()
                .is_err_and(|e| e.contains("127.0.0.1:8080"))
        );
        assert_eq!(l[2].connect, Ok("10.1.2.3:9090".parse().expect("addr")));
        ctx.pod_ip = None;
        let l = listeners(&ctx, &["7".into()]);
        assert_eq!(
            l[2].connect,
            Ok("10.0.0.5:9090".parse().expect("addr")),
            "from fib_trie"
        );
    }

    #[test]
    fn unreadable_fds_take_a_foreign_namespace_whole() {
        let root = tempfile::tempdir().expect("tmp");
        fake(root.path(), "self", "", "", &[]);
        fake(root.path(), "7", TCP, "", &[]);
        std::fs::remove_dir(root.path().join("7/fd")).expect("rm");
        let own = own_listeners(root.path());
        let ctx = Context {
            proc_root: root.path(),
            own: &own,
            pod_ip: None,
        };
        assert_eq!(listeners(&ctx, &["7".into()]).len(), 3);
        // In the agent's own namespace, nothing can be attributed without the links.
        fake(root.path(), "self2", TCP, "", &[]);
        let own = tables(root.path(), "self2")
            .expect("tables")
            .into_iter()
            .map(|s| s.inode)
            .collect();
        let ctx = Context {
            proc_root: root.path(),
            own: &own,
            pod_ip: None,
        };
        assert!(listeners(&ctx, &["7".into()]).is_empty());
    }
}
