//! The text-to-image pipeline, in diffusers' stage order: check inputs, encode prompt, set
//! timesteps, prepare latents, denoise, decode. Walks and batches reuse these stages.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::model::{ModelFiles, UNet, UNetConfig, VaeConfig, VaeDecoder, Weights};
use crate::noise::{NoiseSource, RngKind};
use crate::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::text::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::{Error, Result};

/// Something the pipeline reports while it works; the library never prints.
#[derive(Debug, Clone)]
pub enum Event {
    /// A component is being loaded.
    Loading { component: &'static str },
    /// A denoising step finished for the batch starting at image `first_image`.
    Step {
        first_image: usize,
        batch: usize,
        step: usize,
        steps: usize,
    },
    /// The batch starting at `first_image` is being decoded.
    Decoding { first_image: usize, batch: usize },
    /// Something the user should know (prompt truncated, f16 decode fell back to f32, ...).
    Warning(String),
}

/// When the three large components (text encoder, UNet, VAE) are in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    /// All three are loaded by [`StableDiffusion::load_with`] and kept: for many images
    /// (batches, walks, a long-lived library user).
    #[default]
    Resident,
    /// Each is loaded when its stage starts and the others are dropped first, so at most one
    /// is in memory: for one-shot generation, where peak memory is then about the UNet's
    /// weights instead of all three. Load reads every file's header and checks the VAE (then
    /// drops it) and loads the text encoder; a stage that finds its component dropped loads
    /// it again (from the page cache: cheap, but not free).
    Staged,
}

/// The stage a component serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Prompt encoding: the text encoder.
    TextEncode,
    /// The denoising loop: the UNet.
    Denoise,
    /// Latents to pixels: the VAE decoder.
    Decode,
}

impl Stage {
    fn component(self) -> &'static str {
        match self {
            Stage::TextEncode => "text encoder",
            Stage::Denoise => "unet",
            Stage::Decode => "vae",
        }
    }
}

/// The VAE decoder, and (for reduced precision) its weights for an f32 redo.
struct Vae {
    decoder: VaeDecoder,
    redo_weights: Option<Weights>,
}

/// The components in memory now, and the time spent loading them so far.
#[derive(Default)]
struct Loaded {
    text_encoder: Option<Arc<ClipTextModel>>,
    unet: Option<Arc<UNet>>,
    vae: Option<Arc<Vae>>,
    load_time: Duration,
}

impl Loaded {
    fn has(&self, stage: Stage) -> bool {
        match stage {
            Stage::TextEncode => self.text_encoder.is_some(),
            Stage::Denoise => self.unet.is_some(),
            Stage::Decode => self.vae.is_some(),
        }
    }

    /// Drops every component but the one of `keep`; true when something was dropped.
    fn release_all_but(&mut self, keep: Stage) -> bool {
        let mut released = false;
        if keep != Stage::TextEncode {
            released |= self.text_encoder.take().is_some();
        }
        if keep != Stage::Denoise {
            released |= self.unet.take().is_some();
        }
        if keep != Stage::Decode {
            released |= self.vae.take().is_some();
        }
        released
    }
}

/// A Stable Diffusion model: tokenizer, text encoder, UNet, VAE decoder and the scheduler
/// settings from the model's own files. Components are in memory according to its
/// [`Residency`].
pub struct StableDiffusion {
    name: String,
    tokenizer: ClipTokenizer,
    text_config: ClipTextConfig,
    unet_config: UNetConfig,
    vae_config: VaeConfig,
    /// Weight files of the text encoder, UNet and VAE.
    text_path: PathBuf,
    unet_path: PathBuf,
    vae_path: PathBuf,
    residency: Residency,
    loaded: Mutex<Loaded>,
    scheduler_config: SchedulerConfig,
    scheduler_path: PathBuf,
    device: Device,
    dtype: DType,
    /// dtype of activations: `dtype`, except f32 for bf16 on the CPU (bf16 products only).
    act_dtype: DType,
}

/// Files of a tokenizer folder (a tokenizer.json, or vocab.json + merges.txt, plus configs).
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Pipeline classes whose `model_index.json` we can run.
const PIPELINE_CLASSES: &[&str] = &["StableDiffusionPipeline"];

impl StableDiffusion {
    /// Loads every component of the model in `files` onto `device` in `dtype`, to stay in
    /// memory ([`Residency::Resident`]).
    pub fn load(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Self> {
        Self::load_with(files, device, dtype, Residency::Resident, on_event)
    }

    /// Reads the model's configs, tokenizer and weight-file headers (every file problem shows
    /// here, before any work) and, when `residency` is [`Residency::Resident`], loads the
    /// text encoder, UNet and VAE.
    pub fn load_with(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        residency: Residency,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Self> {
        let started = Instant::now();
        let index = crate::model::ConfigFile::open(&files.get("model_index.json")?)?;
        let class: String = index.req("_class_name")?;
        if !PIPELINE_CLASSES.contains(&class.as_str()) {
            return Err(index.error(
                "_class_name",
                format!("{class} is not supported (latent runs StableDiffusionPipeline models: SD 1.x and 2.x)"),
            ));
        }
        let prefer_fp16 = dtype == DType::F16;
        let act_dtype = if device.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };

        on_event(Event::Loading {
            component: "tokenizer",
        });
        let mut tokenizer_dir = None;
        for f in TOKENIZER_FILES {
            let rel = format!("tokenizer/{f}");
            if files.has(&rel) {
                let path = files.get(&rel)?;
                tokenizer_dir = path.parent().map(Path::to_path_buf);
            }
        }
        let tokenizer_dir = match tokenizer_dir {
            Some(d) => d,
            // Nothing there: let the error name the file a CLIP tokenizer needs.
            None => files.get("tokenizer/vocab.json")?,
        };
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;

        let text_config = ClipTextConfig::from_file(&files.get("text_encoder/config.json")?)?;
        let text_path = files.weights("text_encoder", "model", prefer_fp16)?;
        let unet_config = UNetConfig::from_file(&files.get("unet/config.json")?)?;
        let unet_path = files.weights("unet", "diffusion_pytorch_model", prefer_fp16)?;
        let vae_config = VaeConfig::from_file(&files.get("vae/config.json")?)?;
        let vae_path = files.weights("vae", "diffusion_pytorch_model", prefer_fp16)?;
        let scheduler_path = files.get("scheduler/scheduler_config.json")?;
        let scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;

        if text_config.hidden_size != unet_config.cross_attention_dim {
            return Err(Error::config(
                files.get("unet/config.json")?,
                "cross_attention_dim",
                format!(
                    "is {}, but the text encoder's hidden_size is {}",
                    unet_config.cross_attention_dim, text_config.hidden_size
                ),
            ));
        }
        let model = Self {
            name: files.name().to_string(),
            tokenizer,
            text_config,
            unet_config,
            vae_config,
            text_path,
            unet_path,
            vae_path,
            residency,
            loaded: Mutex::new(Loaded::default()),
            scheduler_config,
            scheduler_path,
            device: device.clone(),
            dtype,
            act_dtype,
        };
        match residency {
            Residency::Resident => {
                for stage in [Stage::TextEncode, Stage::Denoise, Stage::Decode] {
                    model.ensure_loaded(stage, on_event)?;
                }
            }
            Residency::Staged => {
                // Every file problem shows now, not after minutes of denoising: the UNet's
                // header is read (its tensors are checked when its stage starts, seconds
                // later), the VAE is loaded and checked against its config, then dropped for
                // the text encoder, which the first stage needs.
                Weights::open(&model.unet_path, device, dtype)?;
                model.ensure_loaded(Stage::Decode, on_event)?;
                model.ensure_loaded(Stage::TextEncode, on_event)?;
            }
        }
        model.lock().load_time = started.elapsed();
        Ok(model)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        // A panic elsewhere cannot leave `Loaded` half-updated (each field is one assignment).
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the component of `stage` resident (when it is not already), dropping the others
    /// first under [`Residency::Staged`].
    pub fn ensure_loaded(&self, stage: Stage, on_event: &mut dyn FnMut(Event)) -> Result<()> {
        self.load_into(&mut self.lock(), stage, on_event)
    }

    fn load_into(
        &self,
        loaded: &mut Loaded,
        stage: Stage,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<()> {
        if loaded.has(stage) {
            return Ok(());
        }
        if self.residency == Residency::Staged && loaded.release_all_but(stage) {
            // Give the dropped component's heap memory back before the next one arrives.
            crate::kernels::release_freed_memory();
        }
        on_event(Event::Loading {
            component: stage.component(),
        });
        let started = Instant::now();
        match stage {
            Stage::TextEncode => {
                // The text encoder runs once per prompt; on the CPU it stays f32 even for bf16.
                let w = Weights::open(&self.text_path, &self.device, self.act_dtype)?;
                loaded.text_encoder = Some(Arc::new(ClipTextModel::load(&w, &self.text_config)?));
            }
            Stage::Denoise => {
                let w = Weights::open(&self.unet_path, &self.device, self.dtype)?;
                loaded.unet = Some(Arc::new(UNet::load(&w, &self.unet_config)?));
            }
            Stage::Decode => {
                let w = Weights::open(&self.vae_path, &self.device, self.dtype)?;
                let decoder = VaeDecoder::load(&w, &self.vae_config)?;
                loaded.vae = Some(Arc::new(Vae {
                    decoder,
                    redo_weights: (self.dtype != DType::F32).then_some(w),
                }));
            }
        }
        loaded.load_time += started.elapsed();
        Ok(())
    }

    /// Time spent loading so far: configs, tokenizer and every component load (a staged model
    /// adds each component's load as its stage first runs).
    pub fn load_time(&self) -> Duration {
        self.lock().load_time
    }

    /// How the components are kept in memory.
    pub fn residency(&self) -> Residency {
        self.residency
    }

    // The getters load and take their component under one lock, so another thread's stage
    // cannot drop it in between.
    fn text_encoder(&self, on_event: &mut dyn FnMut(Event)) -> Result<Arc<ClipTextModel>> {
        let mut loaded = self.lock();
        self.load_into(&mut loaded, Stage::TextEncode, on_event)?;
        loaded.text_encoder.clone().ok_or_else(not_loaded)
    }

    fn unet(&self, on_event: &mut dyn FnMut(Event)) -> Result<Arc<UNet>> {
        let mut loaded = self.lock();
        self.load_into(&mut loaded, Stage::Denoise, on_event)?;
        loaded.unet.clone().ok_or_else(not_loaded)
    }

    fn vae(&self, on_event: &mut dyn FnMut(Event)) -> Result<Arc<Vae>> {
        let mut loaded = self.lock();
        self.load_into(&mut loaded, Stage::Decode, on_event)?;
        loaded.vae.clone().ok_or_else(not_loaded)
    }

    /// Model name recorded in image metadata.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The scheduler named by the model's `scheduler_config.json` (an error when latent does
    /// not implement that class; `--scheduler` then still works).
    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        self.scheduler_config.default_kind(&self.scheduler_path)
    }

    /// Default image size in pixels: the UNet's sample_size times the VAE's downscaling.
    pub fn default_size(&self) -> usize {
        self.unet_config.sample_size * self.vae_config.scale_factor()
    }

    /// Spatial factor between pixels and latents.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    /// Latent channels the UNet works on.
    pub fn latent_channels(&self) -> usize {
        self.unet_config.in_channels
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Builds a scheduler of `kind` from the model's scheduler settings for `steps` steps.
    pub fn scheduler(
        &self,
        kind: SchedulerKind,
        steps: usize,
        karras: bool,
    ) -> Result<Box<dyn Scheduler>> {
        schedulers::build(kind, &self.scheduler_config, steps, karras)
    }

    /// Stage 1: encodes the prompt and, with guidance, the negative prompt.
    ///
    /// Returns (1, tokens, hidden) embeddings; text lost to the 77-token limit is reported as
    /// a warning event.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: &str,
        guidance: f64,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<PromptEmbeddings> {
        let encoder = self.text_encoder(on_event)?;
        let cond = self.encode_text(&encoder, prompt, "prompt", on_event)?;
        let uncond = if guidance > 1.0 {
            Some(self.encode_text(&encoder, negative_prompt, "negative prompt", on_event)?)
        } else {
            None
        };
        Ok(PromptEmbeddings { cond, uncond })
    }

    fn encode_text(
        &self,
        encoder: &ClipTextModel,
        text: &str,
        what: &str,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Tensor> {
        let tokens = self.tokenizer.encode(text)?;
        if let Some(dropped) = &tokens.dropped {
            on_event(Event::Warning(format!(
                "the {what} is longer than {} tokens; this part was dropped: {dropped:?}",
                self.tokenizer.max_length()
            )));
        }
        let n = tokens.ids.len();
        let ids = Tensor::from_vec(tokens.ids, (1, n), &self.device)?;
        Ok(encoder.forward(&ids)?.to_dtype(DType::F32)?)
    }

    /// Stage 4: initial latents for one batch: fresh noise from `noise` (row i from image i's
    /// generator) or the given latents, times the scheduler's initial sigma.
    pub fn prepare_latents(
        &self,
        batch: usize,
        width: usize,
        height: usize,
        scheduler: &dyn Scheduler,
        noise: &mut dyn NoiseSource,
        given: Option<&Tensor>,
    ) -> Result<Tensor> {
        let f = self.vae_scale_factor();
        let shape = [batch, self.latent_channels(), height / f, width / f];
        let latents = match given {
            Some(t) => {
                if t.dims() != shape {
                    return Err(Error::InvalidInput(format!(
                        "--latents: expected shape {shape:?} for this batch, found {:?}",
                        t.dims()
                    )));
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            None => noise.randn(&shape, &self.device)?,
        };
        Ok((latents * scheduler.init_noise_sigma())?)
    }

    /// Stage 5: the denoising loop with classifier-free guidance (when `embeddings` has an
    /// unconditional part). `latents` is (b, c, h, w) f32; returns the final latents in f32.
    /// Loads the UNet first when it is not resident (without a loading event: call
    /// [`Self::ensure_loaded`] first to see one).
    pub fn denoise(
        &self,
        latents: Tensor,
        embeddings: &PromptEmbeddings,
        guidance: f64,
        scheduler: &mut dyn Scheduler,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let unet = self.unet(&mut |_| {})?;
        let b = latents.dim(0)?;
        let context = embeddings.batched(b)?.to_dtype(self.act_dtype)?;
        let cfg = embeddings.uncond.is_some();
        let timesteps = scheduler.timesteps().to_vec();
        let mut latents = latents;
        for (i, &t) in timesteps.iter().enumerate() {
            let model_input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_input = scheduler
                .scale_model_input(&model_input, i)?
                .to_dtype(self.act_dtype)?;
            let pred = unet
                .forward(&model_input, t, &context)?
                .to_dtype(DType::F32)?;
            let pred = if cfg {
                let uncond = pred.narrow(0, 0, b)?;
                let text = pred.narrow(0, b, b)?;
                (&uncond + ((text - &uncond)? * guidance)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, noise)?;
            on_step(i + 1, timesteps.len());
        }
        Ok(latents)
    }

    /// Stage 6: decodes final latents into images in [0, 1], (b, 3, H, W) f32.
    ///
    /// A decode in f16 that overflows to NaN/inf (a known SD VAE weakness) is redone in f32,
    /// with a warning.
    pub fn decode(&self, latents: &Tensor, on_event: &mut dyn FnMut(Event)) -> Result<Tensor> {
        let vae = self.vae(on_event)?;
        let images = vae
            .decoder
            .decode(&latents.to_dtype(self.act_dtype)?)?
            .to_dtype(DType::F32)?;
        // Only a reduced-precision decode keeps the weights for a redo; f32 never checks.
        let redo = match &vae.redo_weights {
            Some(w) if !all_finite(&images)? => Some(w),
            _ => None,
        };
        let images = if let Some(vae_weights) = redo {
            on_event(Event::Warning(format!(
                "the VAE decode in {:?} produced NaN/inf values; decoding again in f32",
                self.dtype
            )));
            let vae32 = VaeDecoder::load(&vae_weights.with_dtype(DType::F32), &self.vae_config)?;
            vae32.decode(&latents.to_dtype(DType::F32)?)?
        } else {
            images
        };
        Ok(((images / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Runs the whole pipeline for `req`: encodes the prompt, denoises every batch, then
    /// decodes them all (so a staged model loads each component once).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        self.check_inputs(req)?;
        let mut timings = Timings::default();

        self.ensure_loaded(Stage::TextEncode, on_event)?;
        let start = Instant::now();
        let embeddings = self.encode_prompt(
            &req.prompt,
            &req.negative_prompt,
            req.sampling.guidance,
            on_event,
        )?;
        timings.text_encode = start.elapsed();

        let mut denoised = Vec::new();
        for (chunk_index, seeds) in req.seeds.chunks(req.batch_size).enumerate() {
            let first = chunk_index * req.batch_size;
            let given = match &req.latents {
                Some(all) => Some(all.narrow(0, first, seeds.len())?),
                None => None,
            };
            let latents = self.denoise_batch(
                &embeddings,
                seeds,
                given.as_ref(),
                &req.sampling,
                first,
                &mut timings,
                on_event,
            )?;
            denoised.push((first, seeds, latents));
        }
        let mut images = Vec::with_capacity(req.seeds.len());
        for (first, seeds, latents) in denoised {
            images.extend(self.decode_batch(
                &latents,
                seeds,
                &req.sampling,
                first,
                &mut timings,
                on_event,
            )?);
        }
        Ok(Generation { images, timings })
    }

    /// Stages 3 to 6 for one batch of images: [`Self::denoise_batch`] then
    /// [`Self::decode_batch`].
    ///
    /// `embeddings` has batch 1 (shared by every image) or one row per image (walks).
    /// `first_image` only labels progress events. Stage timings are added to `timings`.
    #[allow(clippy::too_many_arguments)]
    pub fn render_batch(
        &self,
        embeddings: &PromptEmbeddings,
        seeds: &[u64],
        given: Option<&Tensor>,
        s: &Sampling,
        first_image: usize,
        timings: &mut Timings,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Vec<GeneratedImage>> {
        let latents =
            self.denoise_batch(embeddings, seeds, given, s, first_image, timings, on_event)?;
        self.decode_batch(&latents, seeds, s, first_image, timings, on_event)
    }

    /// Stages 3 to 5 for one batch: a fresh scheduler, starting latents from `seeds` (one
    /// generator per image) or `given`, the denoising loop. Returns the final latents.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_batch(
        &self,
        embeddings: &PromptEmbeddings,
        seeds: &[u64],
        given: Option<&Tensor>,
        s: &Sampling,
        first_image: usize,
        timings: &mut Timings,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Tensor> {
        let b = seeds.len();
        self.ensure_loaded(Stage::Denoise, on_event)?;
        let mut scheduler = self.scheduler(s.scheduler, s.steps, s.karras)?;
        let mut noise = s.rng.noise_source(seeds.iter().copied());
        let latents = self.prepare_latents(
            b,
            s.width,
            s.height,
            scheduler.as_ref(),
            noise.as_mut(),
            given,
        )?;
        let start = Instant::now();
        let latents = self.denoise(
            latents,
            embeddings,
            s.guidance,
            scheduler.as_mut(),
            noise.as_mut(),
            &mut |step, steps| {
                on_event(Event::Step {
                    first_image,
                    batch: b,
                    step,
                    steps,
                })
            },
        )?;
        timings.denoise += start.elapsed();
        timings.unet_steps += scheduler.timesteps().len();
        Ok(latents)
    }

    /// Stage 6 for one batch: decodes `latents` (one row per seed) into images.
    pub fn decode_batch(
        &self,
        latents: &Tensor,
        seeds: &[u64],
        s: &Sampling,
        first_image: usize,
        timings: &mut Timings,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Vec<GeneratedImage>> {
        self.ensure_loaded(Stage::Decode, on_event)?;
        on_event(Event::Decoding {
            first_image,
            batch: seeds.len(),
        });
        let start = Instant::now();
        let decoded = self.decode(latents, on_event)?;
        timings.decode += start.elapsed();
        seeds
            .iter()
            .enumerate()
            .map(|(i, &seed)| {
                Ok(GeneratedImage {
                    seed,
                    width: s.width,
                    height: s.height,
                    rgb: to_rgb8(&decoded.get(i)?)?,
                    latents: latents.get(i)?,
                })
            })
            .collect()
    }

    /// Stage 0: rejects settings the model cannot run, before any work.
    pub fn check_inputs(&self, req: &GenerateRequest) -> Result<()> {
        let f = self.vae_scale_factor();
        let s = &req.sampling;
        for (flag, v) in [("--width", s.width), ("--height", s.height)] {
            if v == 0 || v % f != 0 {
                return Err(Error::InvalidInput(format!(
                    "{flag} {v}: must be a positive multiple of {f}"
                )));
            }
        }
        if req.prompt.trim().is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        if s.steps == 0 {
            return Err(Error::InvalidInput("--steps must be at least 1".into()));
        }
        if req.seeds.is_empty() {
            return Err(Error::InvalidInput(
                "--num-images must be at least 1".into(),
            ));
        }
        if req.batch_size == 0 {
            return Err(Error::InvalidInput(
                "--batch-size must be at least 1".into(),
            ));
        }
        if !s.guidance.is_finite() {
            return Err(Error::InvalidInput(
                "--guidance must be a finite number".into(),
            ));
        }
        if let Some(l) = &req.latents {
            let want = [
                req.seeds.len(),
                self.latent_channels(),
                s.height / f,
                s.width / f,
            ];
            if l.dims() != want {
                return Err(Error::InvalidInput(format!(
                    "--latents has shape {:?}, expected {want:?} for {} image(s) of {}x{}",
                    l.dims(),
                    req.seeds.len(),
                    s.width,
                    s.height
                )));
            }
        }
        Ok(())
    }
}

/// Unreachable: a getter loads its component under the same lock it reads it with.
fn not_loaded() -> Error {
    Error::InvalidInput("internal error: a model component was not loaded".into())
}

fn all_finite(t: &Tensor) -> Result<bool> {
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

/// (3, H, W) in [0, 1] -> HxWx3 bytes, rounding like diffusers' `numpy_to_pil`.
pub fn to_rgb8(image: &Tensor) -> Result<Vec<u8>> {
    let hwc = (image.permute((1, 2, 0))? * 255.0)?.round()?;
    let v: Vec<f32> = hwc.flatten_all()?.to_vec1()?;
    Ok(v.into_iter().map(|x| x as u8).collect())
}

/// Prompt embeddings: conditional, and unconditional when guidance is on.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// (1, tokens, hidden), f32.
    pub cond: Tensor,
    /// (1, tokens, hidden), f32; `None` when guidance <= 1.
    pub uncond: Option<Tensor>,
}

impl PromptEmbeddings {
    /// The UNet's context for a batch of `b`: [uncond x b, cond x b] with guidance (diffusers'
    /// order), else cond x b. Embeddings of batch 1 are repeated; others must have `b` rows.
    pub fn batched(&self, b: usize) -> Result<Tensor> {
        let rows = |t: &Tensor| -> Result<Tensor> {
            match t.dim(0)? {
                1 => Ok(t.repeat((b, 1, 1))?),
                n if n == b => Ok(t.clone()),
                n => Err(Error::InvalidInput(format!(
                    "prompt embeddings have {n} rows for a batch of {b}"
                ))),
            }
        };
        let cond = rows(&self.cond)?;
        Ok(match &self.uncond {
            Some(u) => Tensor::cat(&[&rows(u)?, &cond], 0)?,
            None => cond,
        })
    }

    /// Stacks per-image embeddings (each of batch 1) into one of batch n.
    pub fn stack(items: &[PromptEmbeddings]) -> Result<Self> {
        let conds: Vec<&Tensor> = items.iter().map(|e| &e.cond).collect();
        let uncond = if items.iter().all(|e| e.uncond.is_some()) && !items.is_empty() {
            let u: Vec<&Tensor> = items.iter().filter_map(|e| e.uncond.as_ref()).collect();
            Some(Tensor::cat(&u, 0)?)
        } else {
            None
        };
        Ok(Self {
            cond: Tensor::cat(&conds, 0)?,
            uncond,
        })
    }
}

/// How to sample: everything but the prompt and the seeds.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    pub karras: bool,
    /// Generator of the noise.
    pub rng: RngKind,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub sampling: Sampling,
    /// One seed per image; image i of a run uses seed + i.
    pub seeds: Vec<u64>,
    /// Images per UNet call.
    pub batch_size: usize,
    /// Starting latents (n, c, h/8, w/8) instead of seeded noise.
    pub latents: Option<Tensor>,
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// HxWx3 bytes.
    pub rgb: Vec<u8>,
    /// Final latents (c, h/8, w/8) before decoding, f32.
    pub latents: Tensor,
}

/// Wall time of each stage.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text_encode: Duration,
    pub denoise: Duration,
    pub unet_steps: usize,
    pub decode: Duration,
}

impl Timings {
    /// Seconds per scheduler step (UNet call with guidance batch).
    pub fn seconds_per_step(&self) -> f64 {
        if self.unet_steps == 0 {
            0.0
        } else {
            self.denoise.as_secs_f64() / self.unet_steps as f64
        }
    }
}

/// The images of one `generate` call and how long it took.
#[derive(Debug, Clone)]
pub struct Generation {
    pub images: Vec<GeneratedImage>,
    pub timings: Timings,
}

/// Reads starting latents from a `.safetensors` (a tensor named `latents`, or the only one) or
/// `.npy` file, as f32 with a batch dimension.
pub fn load_latents(path: &Path) -> Result<Tensor> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let t = match ext.as_str() {
        "npy" => Tensor::read_npy(path).map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            message: format!("cannot read .npy latents: {e}"),
        })?,
        "safetensors" => {
            let map =
                candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Weights {
                    path: path.to_path_buf(),
                    message: format!("cannot read safetensors latents: {e}"),
                })?;
            match map.get("latents") {
                Some(t) => t.clone(),
                None if map.len() == 1 => {
                    map.into_values().next().ok_or_else(|| Error::Weights {
                        path: path.to_path_buf(),
                        message: "no tensor".into(),
                    })?
                }
                None => {
                    return Err(Error::Weights {
                        path: path.to_path_buf(),
                        message: format!("{} tensors and none named `latents`", map.len()),
                    })
                }
            }
        }
        _ => {
            return Err(Error::InvalidInput(format!(
                "--latents {}: expected a .safetensors or .npy file",
                path.display()
            )))
        }
    };
    let t = t.to_dtype(DType::F32)?;
    match t.rank() {
        3 => Ok(t.unsqueeze(0)?),
        4 => Ok(t),
        r => Err(Error::InvalidInput(format!(
            "--latents {}: expected a 3- or 4-dimensional tensor, found rank {r}",
            path.display()
        ))),
    }
}
