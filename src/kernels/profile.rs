//! Where the time goes: wall time, calls and FLOPs per kind of operation, collected only when
//! switched on (`latent bench --profile`), by a guard around each layer's forward pass.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Kinds of operation, as reported in the profile table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Conv3x3,
    Conv1x1,
    Linear,
    Attention,
    GroupNorm,
    LayerNorm,
    Geglu,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Conv3x3,
        Op::Conv1x1,
        Op::Linear,
        Op::Attention,
        Op::GroupNorm,
        Op::LayerNorm,
        Op::Geglu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Conv3x3 => "conv 3x3",
            Op::Conv1x1 => "conv 1x1",
            Op::Linear => "linear",
            Op::Attention => "attention",
            Op::GroupNorm => "group norm (+SiLU)",
            Op::LayerNorm => "layer norm",
            Op::Geglu => "GEGLU gate",
        }
    }
}

const N: usize = Op::ALL.len();
static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static CALLS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static FLOPS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

/// Starts (and clears) or stops collecting.
pub fn enable(on: bool) {
    reset();
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears the counters.
pub fn reset() {
    for i in 0..N {
        NANOS[i].store(0, Ordering::Relaxed);
        CALLS[i].store(0, Ordering::Relaxed);
        FLOPS[i].store(0, Ordering::Relaxed);
    }
}

/// One row of the profile.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub op: Op,
    pub seconds: f64,
    pub calls: u64,
    pub flops: u64,
}

/// The counters so far.
pub fn snapshot() -> Vec<Entry> {
    Op::ALL
        .iter()
        .enumerate()
        .map(|(i, &op)| Entry {
            op,
            seconds: NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
            calls: CALLS[i].load(Ordering::Relaxed),
            flops: FLOPS[i].load(Ordering::Relaxed),
        })
        .collect()
}

/// Times the rest of the enclosing scope as `op` doing `flops` floating-point operations.
pub fn scope(op: Op, flops: usize) -> Scope {
    Scope {
        start: ENABLED.load(Ordering::Relaxed).then(Instant::now),
        op,
        flops,
    }
}

/// Guard returned by [`scope`].
pub struct Scope {
    start: Option<Instant>,
    op: Op,
    flops: usize,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            let i = self.op as usize;
            NANOS[i].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            CALLS[i].fetch_add(1, Ordering::Relaxed);
            FLOPS[i].fetch_add(self.flops as u64, Ordering::Relaxed);
        }
    }
}
