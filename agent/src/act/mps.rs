//! GPU share through CUDA MPS: when an MPS control daemon runs (its control pipe exists and
//! `nvidia-cuda-mps-control` is on the PATH), the default active thread percentage and pinned
//! device memory limit of new clients are set through it. Without a daemon, GPU decisions stay
//! hints: nothing is started and nothing is written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum MpsError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} refused `{command}`: {output}")]
    Refused {
        program: PathBuf,
        command: String,
        output: String,
    },
}

#[derive(Debug, Clone)]
pub struct Mps {
    program: PathBuf,
    pipe_dir: PathBuf,
}

impl Mps {
    /// The MPS daemon, if one runs: `CUDA_MPS_PIPE_DIRECTORY` (default `/tmp/nvidia-mps`) holds
    /// its `control` pipe, and the control program is on `PATH`.
    pub fn detect() -> Option<Mps> {
        let pipe_dir = std::env::var_os("CUDA_MPS_PIPE_DIRECTORY")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/nvidia-mps"));
        if !pipe_dir.join("control").exists() {
            return None;
        }
        let program = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("nvidia-cuda-mps-control"))
                .find(|p| p.is_file())
        })?;
        Some(Mps { program, pipe_dir })
    }

    pub fn pipe_dir(&self) -> &Path {
        &self.pipe_dir
    }

    /// Sets the active thread percentage (1–100) given to new MPS clients.
    pub fn set_default_active_thread_percentage(&self, pct: f64) -> Result<String, MpsError> {
        let pct = pct.clamp(1.0, 100.0).round() as u32;
        self.command(&format!("set_default_active_thread_percentage {pct}"))
    }

    fn command(&self, command: &str) -> Result<String, MpsError> {
        let spawn = |source| MpsError::Spawn {
            program: self.program.clone(),
            source,
        };
        let mut child = Command::new(&self.program)
            .env("CUDA_MPS_PIPE_DIRECTORY", &self.pipe_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            writeln!(stdin, "{command}").map_err(spawn)?;
        }
        let out = child.wait_with_output().map_err(spawn)?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || text.to_ascii_lowercase().contains("error") {
            return Err(MpsError::Refused {
                program: self.program.clone(),
                command: command.to_string(),
                output: format!("{text} {}", String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Ok(text)
    }
}
