//! Pseudonyms: a sticky key or user id written anywhere (the audit trail) is written as
//! `h:` and the first 128 bits of its HMAC-SHA256 under a secret, in hex. The same
//! value always gets the same pseudonym under one secret, so a user's records can be
//! followed, but the value cannot be recovered, nor guessed from a list of candidates
//! without the secret (a plain hash could be).
//!
//! The secret comes from a file the operator provides (`[audit] hmac_key_file`, e.g.
//! a Kubernetes Secret) or, without one, is generated once into the trail's folder
//! (`hmac.key`, readable by its owner only) so pseudonyms stay stable across restarts.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::GatewayError;

/// The generated secret's file name, in the trail's folder.
pub const GENERATED_KEY_FILE: &str = "hmac.key";

/// The shortest secret accepted, in bytes.
const MIN_SECRET_BYTES: usize = 16;

/// Makes pseudonyms under one secret.
#[derive(Clone)]
pub struct Pseudonyms {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Pseudonyms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.write_str("Pseudonyms(..)")
    }
}

impl Pseudonyms {
    /// Pseudonyms under `secret`.
    pub fn with_secret(secret: Vec<u8>) -> Pseudonyms {
        Pseudonyms { secret }
    }

    /// The secret in `key_file`, or the one generated in `dir` (made on first use).
    pub fn open(key_file: Option<&Path>, dir: &Path) -> Result<Pseudonyms, GatewayError> {
        let (path, field) = match key_file {
            Some(path) => (path.to_owned(), "audit.hmac_key_file"),
            None => (dir.join(GENERATED_KEY_FILE), "audit.dir"),
        };
        let problem = |message: String| GatewayError::Config {
            path: field.into(),
            message: format!("{}: {message}", path.display()),
        };
        if key_file.is_none() && !path.exists() {
            generate(&path).map_err(|e| problem(format!("cannot write a new secret: {e}")))?;
            tracing::info!(file = %path.display(), "audit trail: generated the pseudonym secret");
        }
        let text = std::fs::read(&path).map_err(|e| problem(e.to_string()))?;
        let secret = text.trim_ascii().to_vec();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(problem(format!(
                "the secret is {} bytes; at least {MIN_SECRET_BYTES} are needed",
                secret.len()
            )));
        }
        Ok(Pseudonyms { secret })
    }

    /// The pseudonym of `value`.
    pub fn of(&self, value: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret)
            .expect("HMAC accepts keys of every length");
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(34);
        out.push_str("h:");
        for byte in &digest[..16] {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }
}

/// Writes 32 random bytes, hex-encoded, to a new file only its owner can read.
fn generate(path: &Path) -> std::io::Result<()> {
    use rand::RngCore;
    use std::io::Write;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(hex.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_under_one_secret_and_differ_under_another() {
        let one = Pseudonyms::with_secret(b"first secret, 16+ bytes".to_vec());
        let other = Pseudonyms::with_secret(b"second secret, 16+ bytes".to_vec());
        assert_eq!(one.of("alice"), one.of("alice"));
        assert_ne!(one.of("alice"), one.of("bob"));
        assert_ne!(one.of("alice"), other.of("alice"));
        let pseudonym = one.of("alice");
        assert!(
            pseudonym.starts_with("h:") && pseudonym.len() == 34,
            "{pseudonym}"
        );
        assert!(!pseudonym.contains("alice"));
    }

    #[test]
    fn matches_the_rfc_4231_hmac_sha256_test_vector() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let pseudonyms = Pseudonyms::with_secret(b"Jefe".to_vec());
        assert_eq!(
            pseudonyms.of("what do ya want for nothing?"),
            "h:5bdcc146bf60754e6a042426089575c7"
        );
    }

    #[test]
    fn a_generated_secret_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = Pseudonyms::open(None, dir.path()).expect("generated");
        let again = Pseudonyms::open(None, dir.path()).expect("read back");
        assert_eq!(first.of("alice"), again.of("alice"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(GENERATED_KEY_FILE))
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_short_or_missing_secret_file_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().expect("temp dir");
        let short = dir.path().join("short.key");
        std::fs::write(&short, "abc").expect("write");
        let error = Pseudonyms::open(Some(&short), dir.path()).expect_err("too short");
        assert!(error.to_string().contains("audit.hmac_key_file"), "{error}");
        let missing =
            Pseudonyms::open(Some(&dir.path().join("none")), dir.path()).expect_err("missing");
        assert!(
            missing.to_string().contains("audit.hmac_key_file"),
            "{missing}"
        );
    }
}
