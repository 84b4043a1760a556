//! Fetching and storing blobs: verified against their descriptors, resumed with `Range`,
//! renamed into place only once complete, under the layout's lock.

use super::*;

pub(super) struct Puller<'a> {
    pub(super) client: Client,
    pub(super) reference: &'a Reference,
    pub(super) blobs: PathBuf,
    pub(super) progress: Option<ProgressFn>,
}

impl Puller<'_> {
    pub(super) fn report(&mut self, desc: &BlobDesc, kind: BlobKind, done: u64, state: BlobState) {
        if let Some(cb) = self.progress.as_mut() {
            cb(Progress {
                digest: desc.digest.clone(),
                kind,
                done,
                total: desc.size,
                state,
            });
        }
    }

    /// GETs a manifest by tag or digest; returns its bytes and media type.
    pub(super) fn fetch_manifest(
        &mut self,
        reference: &str,
    ) -> Result<(Vec<u8>, String), RegistryError> {
        let url = self.client.url(&format!(
            "/v2/{}/manifests/{reference}",
            self.reference.repository
        ));
        let mut resp = self.client.get(&url, Some(MANIFEST_ACCEPT), 0)?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::ManifestUnknown {
                reference: if reference.starts_with("sha256:") {
                    format!("{}@{reference}", self.reference.repository)
                } else {
                    format!("{}:{reference}", self.reference.repository)
                },
            });
        }
        if status != StatusCode::OK {
            return Err(self.client.status_error(&url, resp));
        }
        let content_type = header(&resp, "content-type")
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_owned())
            .unwrap_or_default();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON)
            .read_to_vec()
            .map_err(|e| transport_error(&url, e))?;
        let doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::Json {
                what: format!("manifest {}", self.reference.short()),
                source: e,
            })?;
        let media_type = match doc.get("mediaType").and_then(|m| m.as_str()) {
            Some(m) => m.to_owned(),
            None if !content_type.is_empty() && content_type != "application/json" => content_type,
            None if doc.get("manifests").is_some() => MEDIA_TYPE_INDEX.to_owned(),
            None => MEDIA_TYPE_MANIFEST.to_owned(),
        };
        Ok((bytes, media_type))
    }

    /// Writes a small verified blob (the manifest) into place.
    pub(super) fn store_blob(&mut self, bytes: &[u8], digest: &str) -> Result<(), RegistryError> {
        let hex_part = digest.strip_prefix("sha256:").unwrap_or(digest);
        let final_path = self.blobs.join(hex_part);
        let partial = self.blobs.join(format!("{hex_part}.partial"));
        let ctx = |e| RegistryError::io(format!("writing {}", partial.display()), e);
        let mut f = File::create(&partial).map_err(ctx)?;
        f.write_all(bytes).map_err(ctx)?;
        f.sync_all().map_err(ctx)?;
        fs::rename(&partial, &final_path)
            .map_err(|e| RegistryError::io(format!("renaming {}", partial.display()), e))?;
        sync_dir(&self.blobs)
    }

    /// Downloads one blob into the layout, resuming interrupted transfers, unless it is
    /// already there.
    pub(super) fn fetch_blob(
        &mut self,
        desc: &BlobDesc,
        kind: BlobKind,
    ) -> Result<(), RegistryError> {
        let final_path = self.blobs.join(desc.hex());
        if final_path.exists() {
            if file_matches(&final_path, desc)? {
                self.report(desc, kind, desc.size, BlobState::Present);
                return Ok(());
            }
            fs::remove_file(&final_path)
                .map_err(|e| RegistryError::io(format!("removing {}", final_path.display()), e))?;
        }
        let partial = self.blobs.join(format!("{}.partial", desc.hex()));
        let io_err = |what: &str, e| RegistryError::io(format!("{what} {}", partial.display()), e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(|e| io_err("opening", e))?;
        let mut have = file.metadata().map_err(|e| io_err("reading", e))?.len();
        if have > desc.size {
            file.set_len(0).map_err(|e| io_err("truncating", e))?;
            have = 0;
        }
        // A prefix left by an earlier (crashed) pull is hashed and continued; the final
        // digest check covers it.
        let mut hasher = Sha256::new();
        if have > 0 {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| io_err("reading", e))?;
            let copied = io::copy(&mut (&mut file).take(have), &mut HashWriter(&mut hasher))
                .map_err(|e| io_err("reading", e))?;
            if copied != have {
                return Err(io_err(
                    "reading",
                    io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"),
                ));
            }
        }
        file.seek(SeekFrom::Start(have))
            .map_err(|e| io_err("seeking", e))?;

        let url = self.client.url(&format!(
            "/v2/{}/blobs/{}",
            self.reference.repository, desc.digest
        ));
        let restart = |file: &mut File, hasher: &mut Sha256| -> Result<(), RegistryError> {
            file.set_len(0).map_err(|e| io_err("truncating", e))?;
            file.seek(SeekFrom::Start(0))
                .map_err(|e| io_err("seeking", e))?;
            *hasher = Sha256::new();
            Ok(())
        };
        let mut failures = 0u32;
        let mut restarts = 0u32;
        // Bytes left by an earlier pull: if the result does not verify, they are the likely
        // culprit, and the download is done once more from scratch.
        let mut inherited = have > 0;
        self.report(desc, kind, have, BlobState::Downloading);
        loop {
            while have < desc.size {
                let resp = self.client.get(&url, None, have)?;
                let status = resp.status();
                match status {
                    StatusCode::PARTIAL_CONTENT if have > 0 => {
                        let start = header(&resp, "content-range").and_then(content_range_start);
                        if start != Some(have) {
                            return Err(RegistryError::Protocol {
                                url,
                                reason: format!(
                                    "asked for bytes {have}- but got Content-Range {:?}",
                                    header(&resp, "content-range")
                                ),
                            });
                        }
                    }
                    StatusCode::OK => {
                        if have > 0 {
                            restart(&mut file, &mut hasher)?;
                            have = 0;
                        }
                    }
                    StatusCode::RANGE_NOT_SATISFIABLE if have > 0 && restarts < 2 => {
                        restarts += 1;
                        restart(&mut file, &mut hasher)?;
                        have = 0;
                        continue;
                    }
                    StatusCode::NOT_FOUND => {
                        let _ = fs::remove_file(&partial);
                        return Err(RegistryError::BlobUnknown {
                            repository: self.reference.repository.clone(),
                            digest: desc.digest.clone(),
                        });
                    }
                    _ => return Err(self.client.status_error(&url, resp)),
                }

                let before = have;
                let mut reader = resp.into_body().into_reader();
                let mut buf = vec![0u8; 64 << 10];
                let mut last_report = Instant::now();
                let outcome: Result<(), String> = loop {
                    match reader.read(&mut buf) {
                        Ok(0) => {
                            if have < desc.size {
                                break Err(format!(
                                    "connection closed after {have} of {} bytes",
                                    desc.size
                                ));
                            }
                            break Ok(());
                        }
                        Ok(n) => {
                            let n64 = n as u64;
                            if have + n64 > desc.size {
                                drop(file);
                                let _ = fs::remove_file(&partial);
                                return Err(crate::ImageError::SizeMismatch {
                                    what: format!("blob {}", desc.digest),
                                    expected: desc.size,
                                    actual: have + n64,
                                }
                                .into());
                            }
                            file.write_all(&buf[..n])
                                .map_err(|e| io_err("writing", e))?;
                            hasher.update(&buf[..n]);
                            have += n64;
                            if last_report.elapsed() >= PROGRESS_INTERVAL {
                                last_report = Instant::now();
                                self.report(desc, kind, have, BlobState::Downloading);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e.to_string()),
                    }
                };
                if let Err(reason) = outcome {
                    if have > before {
                        // Progress was made: the server is alive, keep the retry budget.
                        failures = 0;
                    }
                    if failures >= self.client.retries {
                        return Err(RegistryError::Transport {
                            url,
                            source: reason.into(),
                        });
                    }
                    failures += 1;
                    self.report(
                        desc,
                        kind,
                        have,
                        BlobState::Retrying {
                            attempt: failures,
                            reason,
                        },
                    );
                    std::thread::sleep(backoff_delay(failures - 1));
                }
            }
            let actual = format!("sha256:{}", hex(&hasher.clone().finalize()));
            if actual == desc.digest {
                break;
            }
            if inherited {
                inherited = false;
                restart(&mut file, &mut hasher)?;
                have = 0;
                continue;
            }
            drop(file);
            let _ = fs::remove_file(&partial);
            return Err(crate::ImageError::DigestMismatch {
                what: format!("blob {}", desc.digest),
                expected: desc.digest.clone(),
                actual,
            }
            .into());
        }
        file.sync_all().map_err(|e| io_err("syncing", e))?;
        drop(file);
        fs::rename(&partial, &final_path).map_err(|e| io_err("renaming", e))?;
        sync_dir(&self.blobs)?;
        self.report(desc, kind, desc.size, BlobState::Done);
        Ok(())
    }
}

pub(super) struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether a file has the descriptor's size and digest.
pub(super) fn file_matches(path: &Path, desc: &BlobDesc) -> Result<bool, RegistryError> {
    let ctx = |e| RegistryError::io(format!("reading {}", path.display()), e);
    let file = File::open(path).map_err(ctx)?;
    if file.metadata().map_err(ctx)?.len() != desc.size {
        return Ok(false);
    }
    let mut hasher = Sha256::new();
    io::copy(&mut io::BufReader::new(file), &mut HashWriter(&mut hasher)).map_err(ctx)?;
    Ok(hex(&hasher.finalize()) == desc.hex())
}

/// `bytes START-END/TOTAL` → START.
pub(super) fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), RegistryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RegistryError::io(format!("syncing {}", dir.display()), e))
}

/// Holds an exclusive `flock` on the layout directory while a pull writes into it.
pub(super) fn lock_dir(dir: &Path) -> Result<File, RegistryError> {
    let ctx = |e: io::Error| RegistryError::io(format!("locking {}", dir.display()), e);
    let f = File::open(dir).map_err(ctx)?;
    rustix::fs::flock(f.as_fd(), rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| ctx(e.into()))?;
    Ok(f)
}
