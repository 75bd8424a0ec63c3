//! Exit codes: 0 when everything stopped cleanly, 1 when something failed at run time (a
//! socket could not be bound…), 2 for usage and configuration errors.

use std::process::ExitCode;

/// Exit code for runtime failures.
pub(crate) const RUNTIME: u8 = 1;
/// Exit code for usage and configuration errors (as clap uses).
pub(crate) const USAGE: u8 = 2;

/// A failure that ends the command with a message and an exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: USAGE,
            message: message.into(),
        }
    }

    pub(crate) fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: RUNTIME,
            message: message.into(),
        }
    }

    /// Prints the message and gives the exit code.
    pub(crate) fn report(self) -> ExitCode {
        eprintln!("ustad: error: {}", self.message);
        ExitCode::from(self.code)
    }
}
