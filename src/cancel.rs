//! Cancellation of a run, one mechanism for every caller: the command line's Ctrl-C, a
//! server's interrupt. A request asks the run to stop at the next safe point (after the batch
//! in flight); [`Cancel::writing`] marks the moments a caller that must quit at once (a second
//! Ctrl-C) has to wait for, so an image is never left without its record.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A shared cancel flag; clones refer to the same flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    requests: AtomicUsize,
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

    /// Held by the run while it writes one finished output and its record; whoever must end
    /// the process at once takes it first.
    pub fn writing(&self) -> MutexGuard<'_, ()> {
        self.0
            .writing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
