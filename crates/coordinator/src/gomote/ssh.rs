//! Placeholder until the SSH server lands.

/// The OpenSSH SHA256 fingerprint of a public key line.
pub fn fingerprint_of_openssh_line(line: &str) -> Result<String, String> {
    Err(format!("SSH keys are not supported yet: {}", line.len()))
}
