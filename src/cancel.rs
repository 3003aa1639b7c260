//! Cancellation of a run, one mechanism for every caller: the command line's Ctrl-C, a
//! server's interrupt and skip. A request asks the run to stop at the next safe point (after
//! the batch in flight); an interrupt stops it between two denoising steps; a skip abandons
//! only the batch in flight. [`Cancel::writing`] marks the moments a caller that must quit at
//! once (a second Ctrl-C) has to wait for, so an image is never left without its record.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Error, Result};

/// A shared cancel flag; clones refer to the same flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    requests: AtomicUsize,
    interrupted: AtomicBool,
    skipped: AtomicBool,
    writing: Mutex<()>,
}

impl Cancel {
    /// A flag nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop; returns how many requests there have been, this one included.
    pub fn request(&self) -> usize {
        self.0.requests.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// True once a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.0.requests.load(Ordering::SeqCst) > 0
    }

    /// Stops the run at once: between two denoising steps, with [`Error::Interrupted`] from
    /// the batch in flight (no image of it is written), and no later batch starts.
    pub fn interrupt(&self) {
        self.0.interrupted.store(true, Ordering::SeqCst);
        self.request();
    }

    /// True once [`Self::interrupt`] was called.
    pub fn is_interrupted(&self) -> bool {
        self.0.interrupted.load(Ordering::SeqCst)
    }

    /// Abandons the batch in flight between two denoising steps ([`Error::Skipped`]); the run
    /// goes on with the next one. A skip that arrives between batches applies to the next.
    pub fn skip(&self) {
        self.0.skipped.store(true, Ordering::SeqCst);
    }

    /// What the denoising loop calls between steps: [`Error::Interrupted`] after an interrupt,
    /// [`Error::Skipped`] (once per skip) after a skip, else nothing.
    pub fn check_step(&self) -> Result<()> {
        if self.is_interrupted() {
            return Err(Error::Interrupted);
        }
        if self.0.skipped.swap(false, Ordering::SeqCst) {
            return Err(Error::Skipped);
        }
        Ok(())
    }

    /// True when `other` is a clone of this flag (a server finds a queued job's flag by it).
    pub fn same_as(&self, other: &Cancel) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Held by the run while it writes one finished output and its record; whoever must end
    /// the process at once takes it first.
    pub fn writing(&self) -> MutexGuard<'_, ()> {
        self.0
            .writing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_is_taken_once_and_interrupt_stays() {
        let c = Cancel::new();
        assert!(c.check_step().is_ok());
        c.skip();
        assert!(matches!(c.check_step(), Err(Error::Skipped)));
        assert!(c.check_step().is_ok(), "a skip abandons one batch only");
        assert!(!c.is_requested());
        c.interrupt();
        assert!(c.is_requested(), "an interrupt also stops the run loop");
        assert!(matches!(c.check_step(), Err(Error::Interrupted)));
        assert!(matches!(c.check_step(), Err(Error::Interrupted)));
    }
}
