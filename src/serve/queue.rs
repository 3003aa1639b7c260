//! The one worker: a dedicated thread that owns the loaded model and takes jobs from a bounded
//! FIFO queue, one at a time, publishing their progress for `/sdapi/v1/progress`. Generation
//! is CPU-bound and long, so it never runs on the async runtime's threads.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::api::{ImagesResponse, State};
use super::job::{run_txt2img, timestamp, JobError, JobSettings};
use super::models::ModelEntry;
use super::request::Txt2Img;
use crate::batch::BatchEvent;
use crate::pipeline::{Event, StableDiffusion};
use crate::preview::PreviewImage;
use crate::{Cancel, Result};

/// Loads a model given its entry's `spec` (the command line's way: device, precision, VAE,
/// embeddings).
pub type Loader = dyn Fn(&str) -> Result<StableDiffusion> + Send;

/// What the worker does for one queued request.
pub enum Work {
    /// A txt2img request with `model`, `seed` (first image) and the options of its time.
    Txt2Img {
        request: Box<Txt2Img>,
        model: ModelEntry,
        seed: u64,
        settings: JobSettings,
        reply: oneshot::Sender<std::result::Result<ImagesResponse, JobError>>,
    },
    /// Make `model` the loaded one (`POST /sdapi/v1/options`).
    Load {
        model: ModelEntry,
        reply: oneshot::Sender<std::result::Result<(), JobError>>,
    },
}

/// A queued request and the flag that cancels it (its client left, or the server stops).
pub struct Queued {
    pub work: Work,
    pub cancel: Cancel,
}

/// The progress of the job in flight, as `/sdapi/v1/progress` shows it.
#[derive(Debug, Default)]
pub struct Progress {
    pub state: State,
    /// When the job started.
    pub started: Option<Instant>,
    /// The newest preview of its batch in flight.
    pub preview: Option<PreviewImage>,
}

/// The server's settings that `/sdapi/v1/options` reads and writes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Title of the selected model (`sd_model_checkpoint`).
    pub model: String,
    /// `CLIP_stop_at_last_layers`.
    pub clip_skip: usize,
    /// `show_progress_every_n_steps`; 0 for no previews.
    pub preview_every: usize,
    /// Other options set by clients, kept and shown back.
    pub other: Map<String, Value>,
}

/// What the server lists about the starting model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The model's name: its title among the models.
    pub name: String,
    /// The replacement VAE's name.
    pub vae: Option<String>,
    /// Textual-inversion embeddings: (name, vector width, vectors).
    pub embeddings: Vec<(String, usize, usize)>,
}

impl ModelInfo {
    fn of(model: &StableDiffusion) -> ModelInfo {
        ModelInfo {
            name: model.name().into(),
            vae: model.vae_name().map(str::to_string),
            embeddings: model
                .embeddings()
                .iter()
                .map(|e| {
                    let width = e
                        .vectors
                        .iter()
                        .flatten()
                        .next()
                        .and_then(|t| t.dims().last().copied())
                        .unwrap_or(0);
                    (e.name.clone(), width, e.len())
                })
                .collect(),
        }
    }
}

/// What the worker and the request handlers share.
pub struct Shared {
    progress: Mutex<Progress>,
    options: Mutex<Options>,
    /// The cancel flag of the job in flight.
    current: Mutex<Option<Cancel>>,
    /// Cancel flags of queued jobs, so a stopping server can refuse them at once.
    waiting: Mutex<Vec<Cancel>>,
    queued: AtomicUsize,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a few assignments; a panic cannot leave one half done that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The progress of the job in flight.
    pub fn progress(&self) -> MutexGuard<'_, Progress> {
        lock(&self.progress)
    }

    /// The options.
    pub fn options(&self) -> MutexGuard<'_, Options> {
        lock(&self.options)
    }

    /// Requests waiting behind the job in flight.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// `/sdapi/v1/interrupt`: stops the job in flight between two steps.
    pub fn interrupt(&self) {
        if let Some(c) = lock(&self.current).as_ref() {
            c.interrupt();
            self.progress().state.interrupted = true;
        }
    }

    /// `/sdapi/v1/skip`: abandons the batch in flight; the job goes on with the next.
    pub fn skip(&self) {
        if let Some(c) = lock(&self.current).as_ref() {
            c.skip();
            self.progress().state.skipped = true;
        }
    }

    /// Stops taking jobs: the one in flight is interrupted, the queued ones are refused.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for c in lock(&self.waiting).iter() {
            c.interrupt();
        }
        if let Some(c) = lock(&self.current).as_ref() {
            c.interrupt();
        }
    }

    /// True once [`Self::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// The queue's sending side, held by the request handlers.
#[derive(Clone)]
pub struct Queue {
    sender: SyncSender<Queued>,
    capacity: usize,
    shared: Arc<Shared>,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum Refused {
    /// `capacity` jobs are waiting already.
    Full { capacity: usize },
    /// The server is stopping.
    Stopping,
}

impl Queue {
    /// Starts the worker: it loads the starting model with `loader` first and answers with what
    /// the server lists about it (or the load's error), then serves jobs in order, up to
    /// `capacity` of them waiting.
    pub fn start(
        loader: Box<Loader>,
        start_spec: String,
        capacity: usize,
        options: Options,
    ) -> Result<(Queue, ModelInfo, JoinHandle<()>)> {
        let (sender, receiver) = mpsc::sync_channel::<Queued>(capacity);
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress::default()),
            options: Mutex::new(options),
            current: Mutex::new(None),
            waiting: Mutex::new(Vec::new()),
            queued: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let (loaded_tx, loaded_rx) = mpsc::channel();
        let worker_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("latent-worker".into())
            .spawn(move || {
                let model = match loader(&start_spec) {
                    Ok(model) => {
                        let _ = loaded_tx.send(Ok(ModelInfo::of(&model)));
                        model
                    }
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                let mut worker = Worker {
                    loader,
                    loaded: Some((model.name().to_string(), model)),
                    shared: worker_shared,
                };
                worker.serve(receiver);
            })
            .map_err(|e| crate::Error::InvalidInput(format!("cannot start the worker: {e}")))?;
        let info = loaded_rx.recv().map_err(|_| {
            crate::Error::InvalidInput("the worker stopped while loading the model".into())
        })??;
        let queue = Queue {
            sender,
            capacity,
            shared,
        };
        Ok((queue, info, handle))
    }

    /// The state shared with the worker.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Queues `work` behind the others, or refuses it when `capacity` are waiting.
    pub fn submit(&self, work: Work, cancel: Cancel) -> std::result::Result<(), Refused> {
        if self.shared.is_stopping() {
            return Err(Refused::Stopping);
        }
        // Counted before sending, so the worker never sees a count below zero.
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        lock(&self.shared.waiting).push(cancel.clone());
        match self.sender.try_send(Queued { work, cancel }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                let queued = match e {
                    TrySendError::Full(q) | TrySendError::Disconnected(q) => q,
                };
                forget(&self.shared, &queued.cancel);
                if self.shared.is_stopping() {
                    Err(Refused::Stopping)
                } else {
                    Err(Refused::Full {
                        capacity: self.capacity,
                    })
                }
            }
        }
    }
}

/// Removes `cancel` from the waiting list (it refers to the same flag as a clone there).
fn forget(shared: &Shared, cancel: &Cancel) {
    let mut waiting = lock(&shared.waiting);
    if let Some(at) = waiting.iter().position(|c| c.same_as(cancel)) {
        waiting.remove(at);
    }
}

struct Worker {
    loader: Box<Loader>,
    /// The loaded model and its catalog title (the starting model's is its own name).
    loaded: Option<(String, StableDiffusion)>,
    shared: Arc<Shared>,
}

impl Worker {
    fn serve(&mut self, receiver: Receiver<Queued>) {
        while let Ok(Queued { work, cancel }) = receiver.recv() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            forget(&self.shared, &cancel);
            if self.shared.is_stopping() {
                refuse(work, "the server is shutting down");
                continue;
            }
            if cancel.is_interrupted() {
                refuse(work, "the client left before the job started");
                continue;
            }
            *lock(&self.shared.current) = Some(cancel.clone());
            let outcome = catch_unwind(AssertUnwindSafe(|| self.run(work, &cancel)));
            *lock(&self.shared.current) = None;
            *self.shared.progress() = Progress::default();
            if outcome.is_err() {
                // The model may be half-way through anything: load it again for the next job.
                self.loaded = None;
            }
        }
    }

    /// Makes `model` the loaded one, dropping the old one first (two models rarely fit).
    fn ensure(&mut self, model: &ModelEntry) -> std::result::Result<(), JobError> {
        match &mut self.loaded {
            Some((title, _)) if title == &model.title => return Ok(()),
            _ => {}
        }
        self.loaded = None;
        {
            let mut p = self.shared.progress();
            p.state.job = format!("loading {}", model.title);
            p.started = Some(Instant::now());
        }
        let started = Instant::now();
        match (self.loader)(&model.spec) {
            Ok(m) => {
                eprintln!(
                    "loaded model {} in {:.1}s",
                    model.title,
                    started.elapsed().as_secs_f64()
                );
                self.loaded = Some((model.title.clone(), m));
                Ok(())
            }
            Err(e) => Err(JobError::Failed(format!(
                "cannot load model {}: {e}",
                model.title
            ))),
        }
    }

    fn run(&mut self, work: Work, cancel: &Cancel) {
        match work {
            Work::Load { model, reply } => {
                let _ = reply.send(self.ensure(&model));
            }
            Work::Txt2Img {
                request,
                model,
                seed,
                settings,
                reply,
            } => {
                let result = self.ensure(&model).and_then(|()| {
                    let Some((_, m)) = &self.loaded else {
                        return Err(JobError::Failed("no model is loaded".into()));
                    };
                    begin(&self.shared, "txt2img");
                    let shared = &self.shared;
                    run_txt2img(m, &request, seed, &settings, cancel, &mut |event| {
                        observe(shared, event)
                    })
                });
                let _ = reply.send(result);
            }
        }
    }
}

/// Answers a job that will not run.
fn refuse(work: Work, why: &str) {
    match work {
        Work::Txt2Img { reply, .. } => {
            let _ = reply.send(Err(JobError::Unavailable(why.into())));
        }
        Work::Load { reply, .. } => {
            let _ = reply.send(Err(JobError::Unavailable(why.into())));
        }
    }
}

fn begin(shared: &Shared, job: &str) {
    let mut p = shared.progress();
    *p = Progress::default();
    p.state.job = job.into();
    p.state.job_timestamp = timestamp(SystemTime::now());
    p.started = Some(Instant::now());
}

/// Progress of a batch run into the shared state.
fn observe(shared: &Shared, event: &BatchEvent) {
    let mut p = shared.progress();
    match event {
        BatchEvent::Started { batches, .. } => p.state.job_count = *batches,
        BatchEvent::BatchStarted { number, .. } => {
            p.state.job_no = number.saturating_sub(1);
            p.state.sampling_step = 0;
            p.state.skipped = false;
        }
        BatchEvent::Pipeline(Event::Step { step, steps, .. }) => {
            p.state.sampling_step = *step;
            p.state.sampling_steps = *steps;
        }
        BatchEvent::Pipeline(Event::Preview { images, .. }) => {
            if let Some(first) = images.first() {
                p.preview = Some(first.clone());
            }
        }
        _ => {}
    }
}
