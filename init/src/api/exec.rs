//! Streaming an exec'd process's output, then its exit code; with `stdin` or `tty`, feeding
//! it the client's input lines meanwhile.

use keel_api::ExecInput;
use keel_supervisor::ExecOutput;

use super::*;

/// Input bytes held for the process before the client's lines stop being read (the
/// client's writes then wait: flow control).
const MAX_PENDING_INPUT: usize = 1 << 20;

impl<'a> Session<'a> {
    /// Streams an exec'd process's output, then its exit code. Anything arriving from the
    /// client meanwhile that is not input for the process (see [`ExecInput`]) ends the
    /// stream: on the port that is the next client's request (the previous one went away),
    /// and a closed connection leaves nobody to stream to.
    pub(super) async fn exec(&mut self, id: Option<u64>, handle: ExecHandle) -> Result<(), Gone> {
        let ExecHandle {
            output,
            stdin,
            interactive,
            mut exit,
        } = handle;
        let internal =
            |what: &str, e: io::Error| Response::Error(ApiError::internal(format!("{what}: {e}")));
        let (out, err, terminal) = match output {
            ExecOutput::Pipes { stdout, stderr } => {
                match (pipe_reader(stdout), pipe_reader(stderr)) {
                    (Ok(out), Ok(err)) => (out, Some(err), false),
                    (Err(e), _) | (_, Err(e)) => {
                        let error = internal("cannot read the process's output", e);
                        return self.send(id, &error).await;
                    }
                }
            }
            // Sent by the process once it has opened the terminal in the container; if it
            // failed first, the socket only closes, and its exit status says why.
            ExecOutput::Terminal { socket } => match receive_terminal(socket).await {
                Ok(Some(master)) => (master, None, true),
                Ok(None) => {
                    let code = (&mut exit).await.unwrap_or(127);
                    return self.send(id, &Response::Exit(code)).await;
                }
                Err(e) => {
                    let error = internal("cannot receive the exec's terminal", e);
                    return self.send(id, &error).await;
                }
            },
        };
        // Where the client's input goes: the stdin pipe, or the terminal's master.
        let mut pipe = match stdin.map(|fd| register(fd, tokio::io::Interest::WRITABLE)) {
            Some(Ok(pipe)) => Some(pipe),
            Some(Err(e)) => return self.send(id, &internal("the process's stdin", e)).await,
            None => None,
        };
        let conn = self.conn;
        let (mut out_open, mut err_open) = (true, err.is_some());
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        let mut input = [0u8; 4096];
        let mut watching = true;
        // Input for the process not written yet; the client's partial line.
        let mut pending: Vec<u8> = Vec::new();
        let mut line: Vec<u8> = Vec::new();
        let mut input_ended = false;
        if interactive {
            // Input the client sent right behind its request came in with it.
            line = std::mem::take(&mut self.input);
            match take_input(&mut line, &mut pending, terminal.then_some(&out)) {
                InputLines::More { ended } => input_ended = ended,
                InputLines::Other => self.input = std::mem::take(&mut line),
            }
        }
        let code = loop {
            // A pipe whose input has ended and is all written is closed: the process reads
            // its end of file.
            if input_ended && pending.is_empty() {
                pipe = None;
            }
            let sink = if terminal { Some(&out) } else { pipe.as_ref() };
            let writing = !pending.is_empty() && sink.is_some();
            tokio::select! {
                read = read_pipe(&out, &mut out_buf), if out_open => match read {
                    Ok(n @ 1..) => {
                        let data = out_buf.get(..n).unwrap_or_default();
                        self.send(id, &Response::Out(Output::new(Stream::Stdout, data))).await?;
                    }
                    // A terminal's master reads EIO once no process has the terminal open.
                    _ => out_open = false,
                },
                read = read_optional(err.as_ref(), &mut err_buf), if err_open => match read {
                    Ok(n @ 1..) => {
                        let data = err_buf.get(..n).unwrap_or_default();
                        self.send(id, &Response::Out(Output::new(Stream::Stderr, data))).await?;
                    }
                    _ => err_open = false,
                },
                code = &mut exit => break code,
                written = write_some(sink, &pending), if writing => match written {
                    Ok(n) => {
                        pending.drain(..n.min(pending.len()));
                    }
                    // The process closed its input: what the client sends goes nowhere.
                    Err(_) => {
                        pending.clear();
                        input_ended = true;
                    }
                },
                read = conn.read(&mut input), if watching && pending.len() < MAX_PENDING_INPUT => {
                    match read {
                        Ok(n @ 1..) => {
                            let data = input.get(..n).unwrap_or_default();
                            if !interactive {
                                self.input.extend_from_slice(data);
                                return Ok(());
                            }
                            line.extend_from_slice(data);
                            match take_input(&mut line, &mut pending, terminal.then_some(&out)) {
                                InputLines::More { ended } => input_ended |= ended,
                                // Not input: a new request, kept for the session to read.
                                InputLines::Other => {
                                    self.input.append(&mut line);
                                    return Ok(());
                                }
                            }
                        }
                        // A unix socket client may have only shut down its sending side (as
                        // socat does): it still wants the answer, and a write will tell if it
                        // is gone. On the port the end of input is the host end closing.
                        Ok(0) if matches!(conn, Conn::Unix(_)) => {
                            watching = false;
                            input_ended = true;
                        }
                        _ => return Err(Gone),
                    }
                }
            }
        };
        let code = match code {
            Ok(code) => code,
            Err(_) => {
                let error = ApiError::internal("the process's exit status was lost");
                return self.send(id, &Response::Error(error)).await;
            }
        };
        // Its output is all in the pipes (or the terminal) by now; what processes it left
        // behind may still write is not waited for.
        let streams = [
            (Some(&out), out_open, Stream::Stdout),
            (err.as_ref(), err_open, Stream::Stderr),
        ];
        for (fd, open, stream) in streams {
            let Some(fd) = fd.filter(|_| open) else {
                continue;
            };
            let mut drained = 0;
            while drained < MAX_EXEC_DRAIN {
                match rustix::io::read(fd.get_ref(), &mut out_buf[..]) {
                    Ok(n @ 1..) => {
                        drained += n;
                        let data = out_buf.get(..n).unwrap_or_default();
                        self.send(id, &Response::Out(Output::new(stream, data)))
                            .await?;
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    _ => break,
                }
            }
        }
        self.send(id, &Response::Exit(code)).await
    }
}

/// What the client's complete lines were.
enum InputLines {
    /// All input (`ended`: one said the input ends); a partial line may be left.
    More { ended: bool },
    /// A line that is not input: `line` holds it and what follows.
    Other,
}

/// Takes the complete input lines off `line`: their bytes onto `pending`, a new size onto
/// the terminal `master`.
fn take_input(
    line: &mut Vec<u8>,
    pending: &mut Vec<u8>,
    master: Option<&AsyncFd<OwnedFd>>,
) -> InputLines {
    let mut ended = false;
    while let Some(end) = line.iter().position(|&b| b == b'\n') {
        let text = line.get(..end).unwrap_or_default();
        if text.iter().all(u8::is_ascii_whitespace) {
            line.drain(..=end);
            continue;
        }
        let Some(input) = ExecInput::from_line(text) else {
            return InputLines::Other;
        };
        if input.stdin.is_some() {
            match input.bytes() {
                Some(bytes) => pending.extend_from_slice(&bytes),
                None => return InputLines::Other,
            }
        }
        if let (Some(size), Some(master)) = (input.resize, master) {
            set_window_size(master.get_ref(), size.rows, size.cols);
        }
        ended |= input.eof;
        line.drain(..=end);
    }
    if line.len() > MAX_REQUEST_LINE {
        return InputLines::Other;
    }
    InputLines::More { ended }
}

/// Sets a terminal's size; the process gets SIGWINCH. A failure is only logged: the
/// session goes on at the old size.
fn set_window_size(master: &OwnedFd, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
        log::warn!(
            "exec: resizing the terminal: {}",
            io::Error::last_os_error()
        );
    }
}

/// Waits for the exec's terminal master on `socket`; None if the socket closed without one.
async fn receive_terminal(socket: OwnedFd) -> io::Result<Option<AsyncFd<OwnedFd>>> {
    let socket = register(socket, tokio::io::Interest::READABLE)?;
    loop {
        let mut guard = socket.readable().await?;
        match guard.try_io(|s| receive_fd(s.get_ref())) {
            Ok(Ok(Some(master))) => {
                let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
                return register(master, interest).map(Some);
            }
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
}

/// One message of `socket` and the descriptor it carries (SCM_RIGHTS); None at its end.
fn receive_fd(socket: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let received = recvmsg(
        socket,
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )?;
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok(Some(fd));
        }
    }
    if received.bytes == 0 {
        return Ok(None);
    }
    Err(io::Error::other(
        "the terminal message carried no descriptor",
    ))
}

/// Writes some of `data` to `fd` when it takes it.
async fn write_some(fd: Option<&AsyncFd<OwnedFd>>, data: &[u8]) -> io::Result<usize> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = fd.writable().await?;
        match guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), data)?)) {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(result) => return result,
            Err(_would_block) => {}
        }
    }
}

/// [`read_pipe`] on a pipe that may not be there (it then never reads).
async fn read_optional(fd: Option<&AsyncFd<OwnedFd>>, buf: &mut [u8]) -> io::Result<usize> {
    match fd {
        Some(fd) => read_pipe(fd, buf).await,
        None => std::future::pending().await,
    }
}

pub(super) fn pipe_reader(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    register(fd, tokio::io::Interest::READABLE)
}

/// `fd`, made non-blocking, with the runtime for `interest`.
fn register(fd: OwnedFd, interest: tokio::io::Interest) -> io::Result<AsyncFd<OwnedFd>> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    // SAFETY: as in serve_port, the OwnedFd stays open and unchanged while the AsyncFd owns
    // it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// Some bytes, 0 at the end.
pub(super) async fn read_pipe(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut *buf)?)) {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(result) => return result,
            Err(_) => {}
        }
    }
}
