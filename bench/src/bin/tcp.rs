//! keel-bench-tcp: a TCP throughput probe for the container-networking benchmark.
//!
//! ```text
//! keel-bench-tcp serve PORT            accept forever; per connection, read to EOF into a
//!                                      1 MiB buffer, discard, reply "<bytes>\n", close
//! keel-bench-tcp send HOST PORT BYTES  connect, write BYTES (128 KiB writes), shut the
//!                                      write side, read the reply; print
//!                                      `tcp: bytes=N ns=T from=LOCAL_ADDRESS`
//! keel-bench-tcp agent SOCKET          serve `send`s asked for on a unix socket, one at a
//!                                      time, from this process's network namespace
//! keel-bench-tcp ask SOCKET HOST PORT BYTES
//!                                      have the agent on SOCKET do `send HOST PORT BYTES`;
//!                                      print its result line
//! ```
//!
//! The agent is the sending container's main process: keel-bench `exec`s `ask` next to it,
//! and the transfer starts from the container's own network namespace whatever namespaces
//! an exec'd process joins (the socket is a file in the container's root, which every
//! process of the container sees).
//!
//! T is CLOCK_MONOTONIC (std's `Instant` on Linux) from just before `connect` to the end of
//! the reply, so it includes the handshake and the server having counted every byte. HOST is
//! an IP address or a name from /etc/hosts (static glibc has no NSS). BYTES takes K, M, G.
//! Static and std-only, so it runs in any image.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use keel_bench::tcp::{self, Transfer};

/// A transfer that stalls this long is an error, not a measurement.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", port] => port
            .parse()
            .map_err(|_| format!("bad port {port:?}"))
            .and_then(serve),
        ["send", host, port, bytes] => {
            send(host, port, bytes).map(|t| println!("{}", t.line()))
        }
        ["agent", socket] => agent(socket),
        ["ask", socket, host, port, bytes] => ask(socket, host, port, bytes),
        _ => Err("usage: keel-bench-tcp serve PORT | send HOST PORT BYTES | agent SOCKET | ask SOCKET HOST PORT BYTES".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-bench-tcp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(port: u16) -> Result<(), String> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    println!("tcp: listening port={port}");
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("keel-bench-tcp: accept: {e}");
                continue;
            }
        };
        // One thread per connection: a stalled client must not hold up the next run.
        std::thread::spawn(move || {
            if let Err(e) = drain_and_reply(stream) {
                eprintln!("keel-bench-tcp: {peer}: {e}");
            }
        });
    }
}

fn drain_and_reply(mut stream: TcpStream) -> Result<(), String> {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; tcp::RECEIVE_BUFFER];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read after {total} bytes: {e}")),
        }
    }
    stream
        .write_all(format!("{total}\n").as_bytes())
        .map_err(|e| format!("reply: {e}"))
}

fn agent(socket: &str) -> Result<(), String> {
    // A socket file left by an earlier run of the container would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| format!("bind {socket}: {e}"))?;
    println!("tcp: agent listening on {socket}");
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("keel-bench-tcp: accept on {socket}: {e}");
                continue;
            }
        };
        // One request at a time: transfers never overlap.
        let mut request = String::new();
        let answer = match BufReader::new(&stream).read_line(&mut request) {
            Ok(_) => match request.split_whitespace().collect::<Vec<_>>().as_slice() {
                [host, port, bytes] => match send(host, port, bytes) {
                    Ok(t) => t.line(),
                    Err(e) => format!("tcp: error {e}"),
                },
                _ => format!("tcp: error bad request {request:?}"),
            },
            Err(e) => format!("tcp: error reading the request: {e}"),
        };
        if let Err(e) = stream.write_all(format!("{answer}\n").as_bytes()) {
            eprintln!("keel-bench-tcp: answering on {socket}: {e}");
        }
    }
}

fn ask(socket: &str, host: &str, port: &str, bytes: &str) -> Result<(), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    stream
        .write_all(format!("{host} {port} {bytes}\n").as_bytes())
        .map_err(|e| format!("asking the agent on {socket}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("reading the agent's answer on {socket}: {e}"))?;
    let answer = answer.trim();
    if Transfer::parse(answer).is_none() {
        return Err(format!("the agent on {socket} answered: {answer}"));
    }
    println!("{answer}");
    Ok(())
}

fn send(host: &str, port: &str, bytes: &str) -> Result<Transfer, String> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let bytes = tcp::parse_bytes(bytes).ok_or(format!("bad byte count {bytes:?}"))?;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let ip = tcp::resolve(host, &hosts)
        .ok_or(format!("{host}: not an IP address and not in /etc/hosts"))?;
    let addr = SocketAddr::new(ip, port);
    let buf = vec![0x5au8; tcp::SEND_BUFFER];

    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream
            .write_all(&buf[..n])
            .map_err(|e| format!("write to {addr} with {left} bytes left: {e}"))?;
        left -= n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .map_err(|e| format!("reading the reply from {addr}: {e}"))?;
    let elapsed = start.elapsed();
    let from = stream.local_addr().ok().map(|a| a.ip());

    let counted = tcp::parse_reply(&reply).ok_or(format!(
        "{addr} replied {:?}, not a byte count",
        String::from_utf8_lossy(&reply)
    ))?;
    if counted != bytes {
        return Err(format!("{addr} counted {counted} bytes, {bytes} were sent"));
    }
    Ok(Transfer {
        bytes,
        ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        from,
    })
}
