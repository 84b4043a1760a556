//! Receiving an `upgrade`: the main loop accepts the bundle (signature, version, slots),
//! then the client's [`UpgradeData`] lines are written to the staging directory, hashed as
//! they come; only when both files match the signed digests does the main loop start the
//! install. A client that goes away, or data that does not match, abandons the update before
//! anything outside the staging directory changed.

use std::io::Write;

use keel_api::UpgradeData;
use sha2::{Digest, Sha256};

use super::*;
use crate::update::{Accepted, STAGED_ROOT, STAGED_UKI};

impl<'a> Session<'a> {
    pub(super) async fn upgrade(
        &mut self,
        id: Option<u64>,
        manifest: String,
        signature: String,
        reboot: bool,
    ) -> Result<(), Gone> {
        let accepted = match self
            .call(Command::UpgradeBegin {
                manifest,
                signature,
            })
            .await
            .and_then(ok_value)
            .and_then(|value| {
                serde_json::from_value::<Accepted>(value)
                    .map_err(|e| ApiError::internal(format!("the accepted update: {e}")))
            }) {
            Ok(a) => a,
            Err(error) => return self.send(id, &Response::Error(error)).await,
        };
        let progress =
            serde_json::json!({"accepted": {"slot": accepted.slot, "version": accepted.version}});
        self.send(id, &Response::Progress(progress)).await?;
        let received = self.receive(&accepted).await;
        if let Err(why) = received {
            let _ = self.call(Command::UpgradeAbort { why: why.clone() }).await;
            return match why.as_str() {
                GONE => Err(Gone),
                _ => {
                    let error = ApiError::bad_request(format!("update refused: {why}"));
                    self.send(id, &Response::Error(error)).await
                }
            };
        }
        let response = match self
            .call(Command::UpgradeInstall { reboot })
            .await
            .and_then(ok_value)
        {
            Ok(value) => Response::Ok(value),
            Err(error) => Response::Error(error),
        };
        self.send(id, &response).await
    }

    /// Receives the UKI and the root image into the staging directory, checking sizes and
    /// digests. `Err(GONE)` when the client went away.
    async fn receive(&mut self, accepted: &Accepted) -> Result<(), String> {
        for (file, size, sha256, what) in [
            (STAGED_UKI, accepted.uki_bytes, &accepted.uki_sha256, "UKI"),
            (
                STAGED_ROOT,
                accepted.root_image_bytes,
                &accepted.root_image_sha256,
                "root image",
            ),
        ] {
            let path = accepted.staging.join(file);
            let mut out =
                std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut hasher = Sha256::new();
            let mut left = size;
            while left > 0 {
                let line = match tokio::time::timeout(IDLE, self.next_line()).await {
                    Ok(Incoming::Line(line)) => line,
                    Ok(Incoming::TooLong) => return Err("a data line is too long".into()),
                    Ok(Incoming::Closed) => return Err(GONE.into()),
                    Err(_) => {
                        return Err(format!("the client sent nothing for {} s", IDLE.as_secs()));
                    }
                };
                let data = serde_json::from_slice::<UpgradeData>(&line)
                    .ok()
                    .and_then(|d| keel_api::base64_decode(&d.data))
                    .ok_or("a line that is not upgrade data")?;
                if data.len() as u64 > left {
                    return Err(format!("more {what} bytes than the signed {size}"));
                }
                hasher.update(&data);
                out.write_all(&data)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                left -= data.len() as u64;
                // Other clients and the main loop get their turn between chunks.
                tokio::task::yield_now().await;
            }
            // No fsync here, on PID 1's loop: the install helper reads the files back and
            // checks them again, and staging a power cut interrupted is removed at boot.
            let got: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if &got != sha256 {
                return Err(format!(
                    "the {what} received has sha256 {got}, the signed manifest says {sha256}; the slot was not touched"
                ));
            }
        }
        Ok(())
    }
}

/// A client that sends nothing this long has its update abandoned: it would hold every
/// later update off.
const IDLE: std::time::Duration = std::time::Duration::from_secs(120);

/// The reason [`Session::receive`] gives when the client went away.
const GONE: &str = "the client went away";
