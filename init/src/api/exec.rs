//! Streaming an exec'd process's output, then its exit code.

use super::*;

impl<'a> Session<'a> {
    /// Streams an exec'd process's output, then its exit code. Anything arriving from the
    /// client meanwhile ends the stream: on the port that is the next client's request (the
    /// previous one went away), and a closed connection leaves nobody to stream to.
    pub(super) async fn exec(&mut self, id: Option<u64>, handle: ExecHandle) -> Result<(), Gone> {
        let ExecHandle {
            stdout,
            stderr,
            mut exit,
        } = handle;
        let (out, err) = match (pipe_reader(stdout), pipe_reader(stderr)) {
            (Ok(out), Ok(err)) => (out, err),
            (Err(e), _) | (_, Err(e)) => {
                let error = ApiError::internal(format!("cannot read the process's output: {e}"));
                return self.send(id, &Response::Error(error)).await;
            }
        };
        let conn = self.conn;
        let (mut out_open, mut err_open) = (true, true);
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        let mut input = [0u8; 4096];
        let mut watching = true;
        let code = loop {
            tokio::select! {
                read = read_pipe(&out, &mut out_buf), if out_open => match read {
                    Ok(n @ 1..) => {
                        let data = out_buf.get(..n).unwrap_or_default();
                        self.send(id, &Response::Out(Output::new(Stream::Stdout, data))).await?;
                    }
                    _ => out_open = false,
                },
                read = read_pipe(&err, &mut err_buf), if err_open => match read {
                    Ok(n @ 1..) => {
                        let data = err_buf.get(..n).unwrap_or_default();
                        self.send(id, &Response::Out(Output::new(Stream::Stderr, data))).await?;
                    }
                    _ => err_open = false,
                },
                code = &mut exit => break code,
                read = conn.read(&mut input), if watching => match read {
                    Ok(n @ 1..) => {
                        self.input.extend_from_slice(input.get(..n).unwrap_or_default());
                        return Ok(());
                    }
                    // A unix socket client may have only shut down its sending side (as
                    // socat does): it still wants the answer, and a write will tell if it
                    // is gone. On the port the end of input is the host end closing.
                    Ok(0) if matches!(conn, Conn::Unix(_)) => watching = false,
                    _ => return Err(Gone),
                },
            }
        };
        let code = match code {
            Ok(code) => code,
            Err(_) => {
                let error = ApiError::internal("the process's exit status was lost");
                return self.send(id, &Response::Error(error)).await;
            }
        };
        // Its output is all in the pipes by now; what processes it left behind may still
        // write is not waited for.
        for (fd, open, stream) in [
            (&out, out_open, Stream::Stdout),
            (&err, err_open, Stream::Stderr),
        ] {
            let mut drained = 0;
            while open && drained < MAX_EXEC_DRAIN {
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

pub(super) fn pipe_reader(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    // SAFETY: as in serve_port, the OwnedFd stays open and unchanged while the AsyncFd owns
    // it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
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
