//! The caller's cancel token (Ctrl-C for the command line, a second signal for
//! the station) and the one error a step it stopped returns. Every layer asks
//! [`is_interrupted`] rather than matching a type of its own.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

/// A step stopped by the cancel token, and when, where the step knows.
#[derive(Debug, Clone, thiserror::Error)]
#[error("interrupted{}", .when.as_ref().map(|w| format!(" {w}")).unwrap_or_default())]
pub struct Interrupted {
    when: Option<Cow<'static, str>>,
}

impl Interrupted {
    pub fn new() -> Self {
        Self { when: None }
    }

    /// Interrupted `when`: "while the image was read".
    pub fn when(when: impl Into<Cow<'static, str>>) -> Self {
        Self {
            when: Some(when.into()),
        }
    }
}

impl Default for Interrupted {
    fn default() -> Self {
        Self::new()
    }
}

/// An [`Interrupted`] error once the token is set.
pub fn check(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(Interrupted::new().into());
    }
    Ok(())
}

/// Whether `e`, or any cause under it, is an interrupt.
pub fn is_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.is::<Interrupted>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn an_interrupt_is_found_under_context_and_a_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("card left blank")]
        struct Left(#[source] anyhow::Error);
        let cancel = AtomicBool::new(true);
        let e = check(&cancel).context("writing /dev/sdb").unwrap_err();
        assert!(is_interrupted(&e));
        let wrapped = anyhow::Error::new(Left(e)).context("card 1");
        assert!(is_interrupted(&wrapped), "{wrapped:#}");
        assert!(!is_interrupted(&anyhow::anyhow!("interrupted")));
        assert_eq!(
            Interrupted::when("while verifying").to_string(),
            "interrupted while verifying"
        );
    }
}
