//! Listening sockets of this network namespace and the processes holding them,
//! from `/proc/net/{tcp,tcp6,udp,udp6}` and `/proc/PID/fd`.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::types::Proto;

/// TCP_LISTEN in /proc/net/tcp's `st` column; UDP sockets bound to a port show 07 (CLOSE).
const TCP_LISTEN: u8 = 0x0A;
const UDP_UNCONNECTED: u8 = 0x07;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
    /// Processes holding the socket (several after fork, or none when it is orphaned).
    pub pids: Vec<u32>,
}

/// Every listening TCP socket and bound UDP socket, with their holders.
pub fn listeners() -> Vec<Listener> {
    let mut out = Vec::new();
    for (file, proto, want) in [
        ("/proc/net/tcp", Proto::Tcp, TCP_LISTEN),
        ("/proc/net/tcp6", Proto::Tcp, TCP_LISTEN),
        ("/proc/net/udp", Proto::Udp, UDP_UNCONNECTED),
        ("/proc/net/udp6", Proto::Udp, UDP_UNCONNECTED),
    ] {
        if let Ok(text) = fs::read_to_string(file) {
            out.extend(parse_table(&text, proto, want));
        }
    }
    let holders = socket_holders();
    for l in &mut out {
        l.pids = holders.get(&l.inode).cloned().unwrap_or_default();
    }
    out
}

/// Parses one /proc/net table, keeping sockets in state `want`.
pub fn parse_table(text: &str, proto: Proto, want: u8) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr_hex, port_hex) = f.get(1)?.split_once(':')?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            if state != want {
                return None;
            }
            Some(Listener {
                proto,
                addr: parse_addr(addr_hex)?,
                port: u16::from_str_radix(port_hex, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
                pids: Vec::new(),
            })
        })
        .collect()
}

/// The kernel prints addresses as host-order 32-bit words in hex.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
            .ok()
            .map(u32::to_ne_bytes)
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// socket inode → pids holding it, from every process's fd table.
fn socket_holders() -> HashMap<u64, Vec<u32>> {
    let mut map: HashMap<u64, Vec<u32>> = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return map;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode {
                let pids = map.entry(inode).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn parses_v4_listeners_only() {
        let l = parse_table(TCP, Proto::Tcp, TCP_LISTEN);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(l[0].port, 8080);
        assert_eq!(l[0].inode, 12345);
    }

    #[test]
    fn parses_v6() {
        let l = parse_table(TCP6, Proto::Tcp, TCP_LISTEN);
        assert_eq!(l[0].addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(l[0].port, 443);
    }

    #[test]
    fn finds_own_listener_and_holder() {
        let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let found = listeners()
            .into_iter()
            .find(|l| l.port == port && l.proto == Proto::Tcp)
            .expect("own listener");
        assert_eq!(found.pids, [std::process::id()]);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(
            parse_table(
                "header\nnot a socket line\n   0: zz:zz",
                Proto::Tcp,
                TCP_LISTEN
            )
            .is_empty()
        );
    }
}
