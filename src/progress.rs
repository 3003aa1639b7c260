//! Terminal progress for the binary: indicatif bars wired to the library's events.
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use latent::pipeline::Event;

/// Draws a spinner while loading and a bar over all denoising steps; prints warnings.
///
/// In items mode ([`Progress::start_items`], for runs over many items) it draws a bar over the
/// items with an ETA above a bar over the current batch's steps.
pub struct Progress {
    quiet: bool,
    spinner: Option<ProgressBar>,
    bar: Option<ProgressBar>,
    total_steps: u64,
    multi: Option<MultiProgress>,
    items: Option<ProgressBar>,
}

impl Progress {
    /// `quiet` hides bars (warnings still go to stderr).
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            spinner: None,
            bar: None,
            total_steps: 0,
            multi: None,
            items: None,
        }
    }

    /// Switches to items mode: a bar over `total` items (with ETA) above a bar over the
    /// current batch's steps.
    pub fn start_items(&mut self, total: u64) {
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
        }
        if self.quiet {
            return;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let items = multi.add(ProgressBar::new(total));
        items.set_style(
            ProgressStyle::with_template(
                "items [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        // Length 1 until the first step reports the real one (0 would draw as complete).
        let steps = multi.add(ProgressBar::new(1));
        steps.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        items.tick();
        self.items = Some(items);
        self.bar = Some(steps);
        self.multi = Some(multi);
    }

    /// Items mode: a new batch starts; `label` names it on the steps bar.
    pub fn start_batch(&mut self, label: &str) {
        if let (Some(_), Some(bar)) = (&self.items, &self.bar) {
            bar.set_position(0);
            bar.set_message(label.to_string());
        }
    }

    /// Items mode: `n` more items are finished (or failed).
    pub fn items_done(&mut self, n: u64) {
        if let Some(items) = &self.items {
            items.inc(n);
        }
    }

    /// Sets the length of the step bar (steps per batch x batches).
    pub fn set_total_steps(&mut self, total: u64) {
        self.total_steps = total;
    }

    /// Handles one library event.
    pub fn event(&mut self, event: Event) {
        match event {
            Event::Loading { component } => {
                if self.quiet {
                    return;
                }
                let spinner = self.spinner.get_or_insert_with(|| {
                    let s = ProgressBar::new_spinner();
                    s.set_draw_target(ProgressDrawTarget::stderr());
                    s.enable_steady_tick(Duration::from_millis(100));
                    s
                });
                spinner.set_message(format!("loading {component}"));
            }
            Event::Step {
                step,
                steps,
                first_image,
                batch,
            } => {
                if let Some(s) = self.spinner.take() {
                    s.finish_and_clear();
                }
                if self.quiet {
                    return;
                }
                if let (Some(_), Some(bar)) = (&self.items, &self.bar) {
                    bar.set_length(steps as u64);
                    bar.set_position(step as u64);
                    return;
                }
                let total = self.total_steps.max(steps as u64);
                let bar = self.bar.get_or_insert_with(|| {
                    let b =
                        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                    b.set_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} ETA {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b
                });
                bar.set_message(if batch > 1 {
                    format!("images {}-{}", first_image + 1, first_image + batch)
                } else {
                    format!("image {}", first_image + 1)
                });
                let _ = step;
                bar.inc(1);
            }
            // Preview files are the command's business (see `generate`).
            Event::Decoding { .. } | Event::Preview { .. } => {}
            Event::Warning(w) => self.println(&format!("warning: {w}")),
        }
    }

    /// Prints a line without tearing the bars.
    pub fn println(&self, line: &str) {
        if let Some(multi) = &self.multi {
            multi.suspend(|| eprintln!("{line}"));
            return;
        }
        match &self.bar {
            Some(b) if !b.is_finished() => b.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    /// Removes the bars.
    pub fn finish(&mut self) {
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if let Some(b) = self.items.take() {
            b.finish_and_clear();
        }
        if let Some(m) = self.multi.take() {
            let _ = m.clear();
        }
    }
}

/// One bar over every frame x step still to render, with an ETA.
pub struct FrameBar {
    quiet: bool,
    bar: Option<ProgressBar>,
    total: usize,
}

impl FrameBar {
    /// `quiet` draws nothing (warnings still go to stderr).
    pub fn new(quiet: bool) -> Self {
        FrameBar {
            quiet,
            bar: None,
            total: 0,
        }
    }

    /// `frames` to render at `steps` each, out of `total` frames in the walk.
    pub fn start(&mut self, frames: usize, steps: usize, total: usize) {
        self.total = total;
        if self.quiet {
            return;
        }
        let bar = ProgressBar::with_draw_target(
            Some((frames * steps) as u64),
            ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} frame-steps {elapsed_precise} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.bar = Some(bar);
    }

    /// Names the frames of the batch in flight.
    pub fn label(&self, batch: &[usize]) {
        let Some(bar) = &self.bar else { return };
        let (first, last) = match (batch.first(), batch.last()) {
            (Some(&f), Some(&l)) => (f + 1, l + 1),
            _ => return,
        };
        bar.set_message(if first == last {
            format!("frame {first} of {}", self.total)
        } else if last - first + 1 == batch.len() {
            format!("frames {first}-{last} of {}", self.total)
        } else {
            format!("{} frames of {} from {first}", batch.len(), self.total)
        });
    }

    /// Advances on pipeline steps; prints warnings above the bar.
    pub fn event(&mut self, event: Event) {
        match event {
            // One step of a batch advances every frame in it.
            Event::Step { batch, .. } => {
                if let Some(bar) = &self.bar {
                    bar.inc(batch as u64);
                }
            }
            Event::Warning(w) => match &self.bar {
                Some(bar) => bar.suspend(|| eprintln!("warning: {w}")),
                None => eprintln!("warning: {w}"),
            },
            _ => {}
        }
    }

    /// Clears the bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
