//! The text-to-image pipeline, in diffusers' stage order: check inputs, encode prompt, set
//! timesteps, prepare latents, denoise, decode. Walks and batches reuse these stages.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::model::autoencoder::{Autoencoder, AutoencoderConfig, AutoencoderFiles, ImageEncoder};
use crate::model::config::TIME_IDS;
use crate::model::weights::WeightsPath;
use crate::model::{
    guidance_scale_embedding, AddedConditioning, ModelFiles, UNet, UNetConfig, Weights,
};
use crate::noise::{NoiseSource, RngKind};
use crate::preview::{latents_to_rgb, PreviewImage, PreviewMap};
use crate::prompt::TextOptions;
use crate::resources::{self, RunShape, WeightBytes, MAX_IMAGES, MAX_PIXELS, MAX_SIDE};
use crate::schedulers::{self, DenoisedEstimate, Scheduler, SchedulerConfig, SchedulerKind};
use crate::text::{ClipOutput, ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::{Cancel, Error, Result, Setting};

pub use crate::conditioning::{PromptEmbeddings, SizeConditioning, TextConditioning, TimeIds};
pub use crate::model::family::Family;

mod image;
mod loras;
mod parts;
mod prompts;
pub use image::{decode_image, mask_luma, read_image, ImageInput, MaskedContent};
pub use loras::LoraSettings;

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
    /// An in-progress picture of the batch starting at `first_image` after `step` of `steps`
    /// ([`Sampling::preview_every`]): the clean image the model's output implies, decoded by
    /// the tiny VAE when the model decodes with one, else by a fixed linear latent-to-RGB map
    /// (then blocky: one colour per latent pixel). One image per batch row, at image size.
    Preview {
        first_image: usize,
        step: usize,
        steps: usize,
        images: Vec<PreviewImage>,
    },
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
    decoder: Autoencoder,
    redo_weights: Option<Weights>,
}

/// The components in memory now, and the time spent loading them so far.
#[derive(Default)]
struct Loaded {
    /// The text encoders, in the order of [`StableDiffusion`]'s `text` entries.
    text_encoder: Option<Arc<Vec<ClipTextModel>>>,
    unet: Option<Arc<UNet>>,
    vae: Option<Arc<Vae>>,
    load_time: Duration,
    /// The LoRAs merged into the text encoders and UNet as they load.
    lora: crate::lora::Active,
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

/// One text encoder of a model: its tokenizer, config and weight file, and what the pipeline
/// reads from it.
struct TextEncoderFiles {
    tokenizer: ClipTokenizer,
    config: ClipTextConfig,
    path: WeightsPath,
    output: ClipOutput,
    projection: bool,
}

/// A Stable Diffusion model (SD 1.x/2.x, SDXL, their Turbo and LCM variants): tokenizers, text
/// encoders, UNet, VAE decoder and the scheduler settings from the model's own files.
/// Components are in memory according to its [`Residency`].
pub struct StableDiffusion {
    name: String,
    /// For a single-file checkpoint: what it was read as, and how that was decided.
    detected: Option<String>,
    family: Family,
    text: Vec<TextEncoderFiles>,
    /// SDXL's `force_zeros_for_empty_prompt`: an empty negative prompt is all zeros.
    force_zeros_for_empty_prompt: bool,
    unet_config: UNetConfig,
    unet_path: WeightsPath,
    /// The decoder: the model's VAE, or the one given in [`LoadOptions::vae`].
    vae: AutoencoderFiles,
    /// Name of a replacement VAE (folder name or repo id), recorded in image metadata.
    vae_name: Option<String>,
    /// A tiny VAE's decoder kept for previews, loaded on the first one.
    preview_vae: Mutex<Option<Arc<Autoencoder>>>,
    /// The VAE's encoder for img2img, loaded on the first init image.
    image_encoder: Mutex<Option<Arc<ImageEncoder>>>,
    /// dtype of the VAE: f32 when the model's dtype is f16 and the VAE config says
    /// `force_upcast` in an SDXL pipeline (diffusers' rule), else the model's dtype.
    vae_dtype: DType,
    residency: Residency,
    loaded: Mutex<Loaded>,
    scheduler_config: SchedulerConfig,
    scheduler_path: PathBuf,
    device: Device,
    dtype: DType,
    /// dtype of activations: `dtype`, except f32 for bf16 on the CPU (bf16 products only).
    act_dtype: DType,
    /// Parameters of each component's weight file (from the headers), for the memory estimate.
    parameters: WeightBytes,
    /// Textual-inversion embeddings a prompt may name.
    embeddings: Vec<crate::prompt::embeddings::Embedding>,
    /// The LoRA folder and the LoRAs every prompt gets.
    lora: LoraSettings,
}

/// Characters of dropped prompt text a truncation warning shows: enough to recognise the
/// cut, never a whole pasted megabyte.
const DROPPED_SHOWN: usize = 60;

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
        let options = LoadOptions {
            residency,
            ..LoadOptions::default()
        };
        Self::load_opts(files, device, dtype, &options, on_event)
    }

    /// [`Self::load_with`] with every load option: residency and a replacement VAE (the
    /// model's own VAE is then neither read nor downloaded).
    pub fn load_opts(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        options: &LoadOptions,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Self> {
        let residency = options.residency;
        let started = Instant::now();
        let prefer_fp16 = dtype == DType::F16;
        let act_dtype = if device.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        if let Some(advice) = crate::device::dtype_advice(device, dtype) {
            on_event(Event::Warning(advice));
        }
        on_event(Event::Loading {
            component: "tokenizer",
        });
        let parts = match files.single_file() {
            Some(path) => parts::from_single_file(path, options, prefer_fp16)?,
            None => {
                if options.model_config.is_some() || options.model_type.is_some() {
                    return Err(Error::setting(
                        if options.model_type.is_some() {
                            Setting::ModelType
                        } else {
                            Setting::ModelConfig
                        },
                        "",
                        format!(
                            "only applies to single-file checkpoints; {} is a diffusers model \
                             with configs of its own",
                            files.name()
                        ),
                    ));
                }
                parts::from_folder(files, options, prefer_fp16)?
            }
        };
        let parts::ModelParts {
            family,
            force_zeros_for_empty_prompt,
            text,
            unet_config,
            unet_config_path,
            unet_path,
            vae,
            own_vae,
            scheduler_config,
            scheduler_path,
            detected,
        } = parts;
        if text
            .windows(2)
            .any(|w| w[0].tokenizer.max_length() != w[1].tokenizer.max_length())
        {
            return Err(Error::InvalidInput(format!(
                "{}: the tokenizers' model_max_length differ; their embeddings cannot be joined",
                files.name()
            )));
        }
        check_unet_fits_encoders(&unet_config_path, &unet_config, family, &text)?;
        check_vae_fits(&vae, &unet_config, files.name(), own_vae.as_ref())?;
        // diffusers' SDXL pipeline decodes in f32 when the VAE is f16 and says `force_upcast`
        // (the stock SDXL VAE overflows in f16). bf16 has f32's exponent range, so it cannot
        // overflow there, and diffusers does not upcast it either.
        let vae_dtype = if family == Family::StableDiffusionXl
            && dtype == DType::F16
            && vae.config.force_upcast()
        {
            DType::F32
        } else {
            dtype
        };
        // Counted from the headers now, so every request can be sized before work.
        let mut parameters = WeightBytes {
            unet: crate::model::weights::parameter_count(&unet_path)?,
            vae: crate::model::weights::parameter_count(&vae.weights)?,
            ..WeightBytes::default()
        };
        for t in &text {
            parameters.text_encoders += crate::model::weights::parameter_count(&t.path)?;
        }
        let model = Self {
            name: files.name().to_string(),
            detected,
            family,
            text,
            force_zeros_for_empty_prompt,
            embeddings: Vec::new(),
            lora: options.lora.clone(),
            unet_config,
            unet_path,
            vae,
            vae_name: options.vae.map(|v| v.name().to_string()),
            preview_vae: Mutex::new(None),
            image_encoder: Mutex::new(None),
            vae_dtype,
            residency,
            loaded: Mutex::new(Loaded::default()),
            scheduler_config,
            scheduler_path,
            device: device.clone(),
            dtype,
            act_dtype,
            parameters,
        };
        // The LoRAs every prompt gets are checked now and merged as the components load.
        if !model.lora.base.is_empty() {
            let (_, specs) = crate::lora::for_prompt("", None, &model.lora.base)?;
            model.use_loras(&specs)?;
        }
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
                Weights::open_at(&model.unet_path, device, dtype)?;
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
                // The text encoders run once per prompt; on the CPU they stay f32 even for bf16.
                let encoders = self
                    .text
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let w = Weights::open_at(&t.path, &self.device, self.act_dtype)?
                            .with_patches(loaded.lora.text_patches(i));
                        ClipTextModel::load_with(&w, &t.config, t.projection)
                    })
                    .collect::<Result<Vec<_>>>()?;
                loaded.text_encoder = Some(Arc::new(encoders));
            }
            Stage::Denoise => {
                let w = Weights::open_at(&self.unet_path, &self.device, self.dtype)?
                    .with_patches(loaded.lora.unet_patches());
                loaded.unet = Some(Arc::new(UNet::load(&w, &self.unet_config)?));
            }
            Stage::Decode => {
                let w = Weights::open_at(&self.vae.weights, &self.device, self.vae_dtype)?;
                let decoder = self.vae.load_from(&w)?;
                loaded.vae = Some(Arc::new(Vae {
                    decoder,
                    redo_weights: (self.vae_dtype != DType::F32).then_some(w),
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
    fn text_encoder(&self, on_event: &mut dyn FnMut(Event)) -> Result<Arc<Vec<ClipTextModel>>> {
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

    /// dtype of the VAE's activations: as the UNet's, unless the VAE was upcast to f32.
    fn vae_act_dtype(&self) -> DType {
        if self.vae_dtype == DType::F32 {
            DType::F32
        } else {
            self.act_dtype
        }
    }

    /// Model name recorded in image metadata.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// For a single-file checkpoint, what it was read as and how that was decided (e.g. "SD
    /// 2.x checkpoint, v-prediction (its modelspec metadata)").
    pub fn detected(&self) -> Option<&str> {
        self.detected.as_deref()
    }

    /// The scheduler named by the model's `scheduler_config.json` (an error when latent does
    /// not implement that class; `--scheduler` then still works).
    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        self.scheduler_config.default_kind(&self.scheduler_path)
    }

    /// Default image size in pixels: the UNet's sample_size times the VAE's downscaling.
    pub fn default_size(&self) -> usize {
        self.unet_config.sample_size * self.vae.config.scale_factor()
    }

    /// Spatial factor between pixels and latents.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config.scale_factor()
    }

    /// The name of the replacement VAE, when one was given (for image metadata).
    pub fn vae_name(&self) -> Option<&str> {
        self.vae_name.as_deref()
    }

    /// The decoder's architecture (the model's VAE or the replacement).
    pub fn vae_config(&self) -> &AutoencoderConfig {
        &self.vae.config
    }

    /// Latent channels the UNet works on (its output; an inpainting UNet reads more).
    pub fn latent_channels(&self) -> usize {
        self.unet_config.out_channels
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

    /// Whether `guidance` runs classifier-free guidance (an unconditional pass) on this model:
    /// above 1, unless the UNet takes LCM's guidance embedding instead (diffusers' rule).
    pub fn uses_cfg(&self, guidance: f64) -> bool {
        guidance > 1.0 && self.unet_config.time_cond_proj_dim.is_none()
    }

    /// The model's pipeline family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Stage 1: encodes the prompt and, when [`Self::uses_cfg`], the negative prompt.
    ///
    /// Returns (1, tokens, hidden) embeddings (SDXL: both encoders' side by side, and the
    /// pooled embedding); text lost to the 77-token limit is reported as a warning event. In
    /// SDXL models with `force_zeros_for_empty_prompt` an empty negative prompt is all zeros,
    /// as diffusers does when no negative prompt is given.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: &str,
        guidance: f64,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<PromptEmbeddings> {
        let encoders = self.text_encoder(on_event)?;
        let cond = self.encode_text(&encoders, prompt, "prompt", on_event)?;
        let uncond = if !self.uses_cfg(guidance) {
            None
        } else if negative_prompt.is_empty() && self.force_zeros_for_empty_prompt {
            Some(TextConditioning {
                context: cond.context.zeros_like()?,
                pooled: cond.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
            })
        } else {
            Some(self.encode_text(&encoders, negative_prompt, "negative prompt", on_event)?)
        };
        Ok(PromptEmbeddings::fixed(cond, uncond))
    }

    fn encode_text(
        &self,
        encoders: &[ClipTextModel],
        text: &str,
        what: &str,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<TextConditioning> {
        let mut hidden = Vec::with_capacity(encoders.len());
        let mut pooled = None;
        for (i, (files, encoder)) in self.text.iter().zip(encoders).enumerate() {
            let tokens = files.tokenizer.encode(text)?;
            // Both SDXL tokenizers split the same text the same way: warn once.
            if let (0, Some(dropped)) = (i, &tokens.dropped) {
                on_event(Event::Warning(format!(
                    "the {what} is longer than {} tokens; this part was dropped: {}",
                    files.tokenizer.max_length(),
                    crate::text::excerpt(dropped, DROPPED_SHOWN)
                )));
            }
            let n = tokens.ids.len();
            let ids = Tensor::from_vec(tokens.ids, (1, n), &self.device)?;
            let out = encoder.encode(&ids, files.output)?;
            hidden.push(out.hidden);
            if files.projection {
                pooled = out.pooled;
            }
        }
        let context = if hidden.len() == 1 {
            hidden.remove(0)
        } else {
            Tensor::cat(&hidden, 2)?
        };
        Ok(TextConditioning { context, pooled })
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
                    return Err(Error::setting(
                        Setting::Latents,
                        format!("{:?}", t.dims()),
                        format!("expected shape {shape:?} for this batch"),
                    ));
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            None => noise.randn(&shape, &self.device)?,
        };
        Ok((latents * scheduler.init_noise_sigma())?)
    }

    /// Stage 5: the denoising loop with classifier-free guidance (when `embeddings` has an
    /// unconditional part). `latents` is (b, c, h, w) f32; `time_ids` are SDXL's size ids for
    /// this batch ([`Self::time_ids`]); returns the final latents in f32. Loads the UNet first
    /// when it is not resident (without a loading event: call [`Self::ensure_loaded`] first to
    /// see one).
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        latents: Tensor,
        embeddings: &PromptEmbeddings,
        guidance: f64,
        time_ids: Option<&TimeIds>,
        scheduler: &mut dyn Scheduler,
        noise: &mut dyn NoiseSource,
        preview_every: Option<usize>,
        on_step: &mut dyn FnMut(usize, usize, Option<Tensor>) -> Result<()>,
    ) -> Result<Tensor> {
        self.denoise_from(
            latents,
            LoopStart::default(),
            embeddings,
            guidance,
            time_ids,
            scheduler,
            noise,
            preview_every,
            on_step,
        )
    }

    /// [`Self::denoise`] from loop position `start.index` (img2img), with inpainting's mask.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn denoise_from(
        &self,
        latents: Tensor,
        start: LoopStart,
        embeddings: &PromptEmbeddings,
        guidance: f64,
        time_ids: Option<&TimeIds>,
        scheduler: &mut dyn Scheduler,
        noise: &mut dyn NoiseSource,
        preview_every: Option<usize>,
        on_step: &mut dyn FnMut(usize, usize, Option<Tensor>) -> Result<()>,
    ) -> Result<Tensor> {
        let unet = self.unet(&mut |_| {})?;
        let b = latents.dim(0)?;
        let cfg = embeddings.uncond.is_some();
        let rows = if cfg { 2 * b } else { b };
        // The UNet's text inputs of the step's conditioning (prompt editing changes them).
        let mut inputs = StepInputs::new(self, &embeddings.at_step(0), b, time_ids)?;
        let mut selection = embeddings.selection(0);
        // LCM: the guidance scale enters as an embedding of w = guidance - 1 (no CFG pass).
        let timestep_cond = match self.unet_config.time_cond_proj_dim {
            Some(dim) => Some(guidance_scale_embedding(
                &vec![(guidance - 1.0) as f32; rows],
                dim,
                &self.device,
            )?),
            None => None,
        };
        let timesteps = scheduler.timesteps().to_vec();
        let first = start.index;
        let steps = timesteps.len().saturating_sub(first);
        // Previews: every n steps, x̂₀ from the scaled input and the guided output.
        let preview = match preview_every {
            Some(n) => Some((n, DenoisedEstimate::new(&self.scheduler_config)?)),
            None => None,
        };
        let mut latents = latents;
        for (i, &t) in timesteps.iter().enumerate().skip(first) {
            // Prompt editing counts the steps that run.
            let done = i - first;
            if embeddings.selection(done) != selection {
                selection = embeddings.selection(done);
                inputs = StepInputs::new(self, &embeddings.at_step(done), b, time_ids)?;
            }
            // Scaled once, then doubled for the guidance batch (the scaling is per element).
            let scaled = scheduler.scale_model_input(&latents, i)?;
            let unet_input = match &start.inpaint {
                Some(inpaint) => inpaint.unet_input(&scaled)?,
                None => scaled.clone(),
            };
            let pred = inputs.predict(
                &unet,
                &unet_input,
                t,
                timestep_cond.as_ref(),
                self.act_dtype,
            )?;
            let pred = if cfg {
                let uncond = pred.narrow(0, 0, b)?;
                let text = pred.narrow(0, b, b)?;
                (&uncond + ((text - &uncond)? * guidance)?)?
            } else {
                pred
            };
            // None after the last step: the image itself follows.
            let denoised = match &preview {
                Some((n, estimate)) if (done + 1).is_multiple_of(*n) && i + 1 < timesteps.len() => {
                    Some(estimate.estimate(&scaled, &pred, t)?)
                }
                _ => None,
            };
            latents = scheduler.step(&pred, i, &latents, noise)?;
            if let Some(inpaint) = &start.inpaint {
                latents = inpaint.after_step(latents, scheduler, i)?;
            }
            // One reduction over the small latent tensor per step: a NaN or inf (an overflowed
            // guidance scale, a broken checkpoint) stops the run here, naming the step,
            // instead of decoding into a black image.
            if !all_finite(&latents)? {
                return Err(Error::NonFinite(format!(
                    "denoising step {} of {steps}",
                    done + 1
                )));
            }
            on_step(done + 1, steps, denoised)?;
        }
        Ok(latents)
    }

    /// SDXL's size ids for an image of `width` x `height` under `size` (diffusers'
    /// `_get_add_time_ids`); `None` for models without size conditioning.
    pub fn time_ids(
        &self,
        width: usize,
        height: usize,
        size: &SizeConditioning,
    ) -> Option<TimeIds> {
        self.unet_config.text_time.as_ref()?;
        Some(size.time_ids(width, height))
    }

    /// Quick pictures of latents (b, c, h, w) at `width` x `height`: the tiny VAE's decode when
    /// the model decodes with one, else the family's linear latent-to-RGB map, upscaled.
    pub fn preview(
        &self,
        latents: &Tensor,
        width: usize,
        height: usize,
    ) -> Result<Vec<PreviewImage>> {
        if matches!(self.vae.config, AutoencoderConfig::Tiny(_)) {
            // The tiny VAE (a few MB) is kept for previews apart from the staged components,
            // so a preview never evicts the UNet.
            let decoder = {
                let mut slot = self.preview_vae.lock().unwrap_or_else(|e| e.into_inner());
                match &*slot {
                    Some(d) => Arc::clone(d),
                    None => {
                        let d = Arc::new(self.vae.load(&self.device, self.vae_dtype)?);
                        *slot = Some(Arc::clone(&d));
                        d
                    }
                }
            };
            let images = decoder
                .decode(&latents.to_dtype(self.vae_act_dtype())?)?
                .to_dtype(DType::F32)?;
            let images = ((images / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            let (b, _, h, w) = images.dims4()?;
            return (0..b)
                .map(|i| {
                    Ok(PreviewImage {
                        width: w,
                        height: h,
                        rgb: to_rgb8(&images.get(i)?)?,
                    })
                })
                .collect();
        }
        let map = match self.family {
            Family::StableDiffusion => PreviewMap::Sd,
            Family::StableDiffusionXl => PreviewMap::Sdxl,
        };
        latents_to_rgb(latents, map)?
            .iter()
            .map(|p| p.resize_nearest(width, height))
            .collect()
    }

    /// Stage 6: decodes final latents into images in [0, 1], (b, 3, H, W) f32.
    ///
    /// A decode in f16 that overflows to NaN/inf (a known SD VAE weakness) is redone in f32,
    /// with a warning; NaN/inf from an f32 decode is an error.
    pub fn decode(&self, latents: &Tensor, on_event: &mut dyn FnMut(Event)) -> Result<Tensor> {
        let vae = self.vae(on_event)?;
        let images = vae
            .decoder
            .decode(&latents.to_dtype(self.vae_act_dtype())?)?
            .to_dtype(DType::F32)?;
        // Only a reduced-precision decode keeps the weights for a redo; f32 never checks.
        let redo = match &vae.redo_weights {
            Some(w) if !all_finite(&images)? => Some(w),
            _ => None,
        };
        let images = if let Some(vae_weights) = redo {
            on_event(Event::Warning(format!(
                "the VAE decode in {:?} produced NaN/inf values; decoding again in f32",
                self.vae_dtype
            )));
            let vae32 = self.vae.load_from(&vae_weights.with_dtype(DType::F32))?;
            vae32.decode(&latents.to_dtype(DType::F32)?)?
        } else {
            images
        };
        if !all_finite(&images)? {
            return Err(Error::NonFinite("the VAE decode".into()));
        }
        Ok(((images / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Runs the whole pipeline for `req`: encodes the prompt, denoises every batch, then
    /// decodes them all (so a staged model loads each component once). `cancel` is checked
    /// between denoising steps ([`Cancel::check_step`]).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        cancel: &Cancel,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        self.check_inputs(req)?;
        let mut timings = Timings::default();

        // The prompt's LoRAs first, so the text encoder loads once, with them.
        self.use_loras(&self.prompt_loras(&req.prompt)?.1)?;
        self.ensure_loaded(Stage::TextEncode, on_event)?;
        let start = Instant::now();
        let embeddings = self.encode_prompt_with(
            &req.prompt,
            &req.negative_prompt,
            req.sampling.guidance,
            &req.sampling.text,
            req.sampling.steps,
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
                cancel,
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
        cancel: &Cancel,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Vec<GeneratedImage>> {
        let latents = self.denoise_batch(
            embeddings,
            seeds,
            given,
            s,
            first_image,
            timings,
            cancel,
            on_event,
        )?;
        self.decode_batch(&latents, seeds, s, first_image, timings, on_event)
    }

    /// Stages 3 to 5 for one batch: a fresh scheduler, starting latents from `seeds` (one
    /// generator per image) or `given`, the denoising loop. Returns the final latents, or
    /// [`Error::Interrupted`] / [`Error::Skipped`] when `cancel` says so between two steps.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_batch(
        &self,
        embeddings: &PromptEmbeddings,
        seeds: &[u64],
        given: Option<&Tensor>,
        s: &Sampling,
        first_image: usize,
        timings: &mut Timings,
        cancel: &Cancel,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Tensor> {
        let b = seeds.len();
        let mut noise = s.rng.noise_source(seeds.iter().copied());
        let (mut scheduler, latents, loop_start) = match &s.image {
            Some(input) => {
                let (scheduler, index) = self.image_schedule(s, input)?;
                let (latents, inpaint) = self.prepare_image_latents(
                    input,
                    b,
                    s,
                    scheduler.as_ref(),
                    index,
                    noise.as_mut(),
                    on_event,
                )?;
                (scheduler, latents, LoopStart { index, inpaint })
            }
            None => {
                let scheduler = self.scheduler(s.scheduler, s.steps, s.karras)?;
                let latents = self.prepare_latents(
                    b,
                    s.width,
                    s.height,
                    scheduler.as_ref(),
                    noise.as_mut(),
                    given,
                )?;
                (scheduler, latents, LoopStart::default())
            }
        };
        self.ensure_loaded(Stage::Denoise, on_event)?;
        let first_step = loop_start.index;
        let start = Instant::now();
        let time_ids = self.time_ids(s.width, s.height, &s.size_conditioning);
        let latents = self.denoise_from(
            latents,
            loop_start,
            embeddings,
            s.guidance,
            time_ids.as_ref(),
            scheduler.as_mut(),
            noise.as_mut(),
            s.preview_every,
            &mut |step, steps, denoised| {
                if let Some(x0) = denoised {
                    let images = self.preview(&x0, s.width, s.height)?;
                    on_event(Event::Preview {
                        first_image,
                        step,
                        steps,
                        images,
                    });
                }
                on_event(Event::Step {
                    first_image,
                    batch: b,
                    step,
                    steps,
                });
                cancel.check_step()
            },
        )?;
        timings.denoise += start.elapsed();
        timings.unet_steps += scheduler.timesteps().len() - first_step;
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

    /// Stage 0: rejects a request the model cannot run, before any work: the prompt, the image
    /// count and batch size, the starting latents, and the sampling settings
    /// ([`Self::check_sampling`]).
    pub fn check_inputs(&self, req: &GenerateRequest) -> Result<()> {
        check_request(
            &req.prompt,
            &req.negative_prompt,
            req.seeds.len(),
            req.batch_size,
        )?;
        let s = &req.sampling;
        self.check_sampling(s, req.batch_size.min(req.seeds.len()))?;
        crate::prompt::check_prompts(&req.prompt, &req.negative_prompt, &s.text, s.steps)?;
        if let (Some(_), Some(_)) = (&req.latents, &s.image) {
            return Err(Error::setting(
                Setting::Latents,
                "",
                "starting latents and an init image cannot be used together",
            ));
        }
        self.prompt_loras(&req.prompt)?;
        if let Some(l) = &req.latents {
            let f = self.vae_scale_factor();
            let want = [
                req.seeds.len(),
                self.latent_channels(),
                s.height / f,
                s.width / f,
            ];
            if l.dims() != want {
                return Err(Error::setting(
                    Setting::Latents,
                    format!("{:?}", l.dims()),
                    format!(
                        "expected shape {want:?} for {} image(s) of {}x{}",
                        req.seeds.len(),
                        s.width,
                        s.height
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Rejects sampling settings the model cannot run for batches of up to `batch` images:
    /// the size (a positive multiple of the VAE's factor, within [`MAX_SIDE`] and
    /// [`MAX_PIXELS`]), steps, guidance, previews, size conditioning only for SDXL, a
    /// scheduler that can be built with these steps, and, on the CPU, the memory the run needs
    /// ([`Self::check_memory`]). Every run (generate, batch lines, walks) checks its settings
    /// here, once, before work.
    pub fn check_sampling(&self, s: &Sampling, batch: usize) -> Result<()> {
        self.check_text_options(&s.text)?;
        self.check_image(s)?;
        let f = self.vae_scale_factor();
        for (setting, v) in [(Setting::Width, s.width), (Setting::Height, s.height)] {
            if v == 0 || v % f != 0 {
                return Err(Error::setting(
                    setting,
                    v,
                    format!("must be a positive multiple of {f}"),
                ));
            }
            if v > MAX_SIDE {
                return Err(Error::setting(
                    setting,
                    v,
                    format!("is larger than the limit of {MAX_SIDE} pixels"),
                ));
            }
        }
        if s.width * s.height > MAX_PIXELS {
            return Err(Error::setting(
                Setting::Width,
                format!("{}x{}", s.width, s.height),
                format!(
                    "has {} pixels, more than the limit of {MAX_PIXELS} (8192x8192); lower \
                     the width or height",
                    s.width * s.height
                ),
            ));
        }
        if !s.size_conditioning.is_default() && self.unet_config.text_time.is_none() {
            return Err(Error::setting(
                Setting::SizeConditioning,
                "(set)",
                format!(
                    "size conditioning needs an SDXL model; {} is a {} model",
                    self.name,
                    self.family.name()
                ),
            ));
        }
        if s.preview_every == Some(0) {
            return Err(Error::setting(
                Setting::PreviewEvery,
                0,
                "must be at least 1",
            ));
        }
        if s.steps == 0 {
            return Err(Error::setting(Setting::Steps, 0, "must be at least 1"));
        }
        if !s.guidance.is_finite() {
            return Err(Error::setting(
                Setting::Guidance,
                s.guidance,
                "must be a finite number",
            ));
        }
        if batch == 0 {
            return Err(Error::setting(Setting::BatchSize, 0, "must be at least 1"));
        }
        self.scheduler(s.scheduler, s.steps, s.karras)?;
        // Only host memory is measured: on a GPU the limits above still hold, and the device
        // reports its own out-of-memory error.
        if self.device.is_cpu() {
            self.check_memory(s, batch, resources::available_memory())?;
        }
        Ok(())
    }

    /// The memory a run of `s` in batches of `batch` needs, by [`resources::estimate`]:
    /// weights of the components not in memory yet plus the largest working set.
    pub fn memory_estimate(&self, s: &Sampling, batch: usize) -> resources::Estimate {
        let shape = RunShape {
            width: s.width,
            height: s.height,
            batch,
            cfg: self.uses_cfg(s.guidance),
            act_bytes: self.act_dtype.size_in_bytes() as u64,
            vae_act_bytes: self.vae_act_dtype().size_in_bytes() as u64,
            blocked_attention: self.device.is_cpu() && self.act_dtype == DType::F32,
            threads: rayon::current_num_threads(),
        };
        let loaded = self.lock();
        let bytes = |params: u64, dtype: DType, resident: bool| {
            if resident {
                0
            } else {
                params.saturating_mul(dtype.size_in_bytes() as u64)
            }
        };
        let p = &self.parameters;
        let to_load = WeightBytes {
            text_encoders: bytes(p.text_encoders, self.dtype, loaded.text_encoder.is_some()),
            unet: bytes(p.unet, self.dtype, loaded.unet.is_some()),
            vae: bytes(p.vae, self.vae_dtype, loaded.vae.is_some()),
        };
        drop(loaded);
        resources::estimate(
            &self.unet_config,
            &self.vae.config,
            &shape,
            &to_load,
            self.residency == Residency::Staged,
        )
    }

    /// Refuses `s` in batches of `batch` when its [`Self::memory_estimate`] exceeds
    /// `available` bytes (`None`: unknown, nothing is refused).
    pub fn check_memory(&self, s: &Sampling, batch: usize, available: Option<u64>) -> Result<()> {
        let Some(available) = available else {
            return Ok(());
        };
        let needed = self.memory_estimate(s, batch).total;
        if needed <= available {
            return Ok(());
        }
        let (what, advice) = if batch > 1 {
            (
                format!("{batch} images of {}x{} per batch", s.width, s.height),
                "lower batch_size, width or height",
            )
        } else {
            (
                format!("an image of {}x{}", s.width, s.height),
                "lower width or height",
            )
        };
        Err(Error::Memory {
            what,
            needed,
            available,
            advice: advice.into(),
        })
    }
}

/// The cheap checks of a request, before any model is loaded: the prompt, the image count (1
/// to [`MAX_IMAGES`]) and the batch size. [`StableDiffusion::check_inputs`] runs them too.
pub fn check_request(
    prompt: &str,
    negative_prompt: &str,
    num_images: usize,
    batch_size: usize,
) -> Result<()> {
    check_prompts(prompt, negative_prompt)?;
    if num_images == 0 {
        return Err(Error::setting(Setting::NumImages, 0, "must be at least 1"));
    }
    if num_images > MAX_IMAGES {
        return Err(Error::setting(
            Setting::NumImages,
            num_images,
            format!("is more than the limit of {MAX_IMAGES} images per run"),
        ));
    }
    if batch_size == 0 {
        return Err(Error::setting(Setting::BatchSize, 0, "must be at least 1"));
    }
    Ok(())
}

/// A prompt must have something to draw, and both prompts only characters a PNG's text chunk
/// can carry (see [`check_text`]).
pub fn check_prompts(prompt: &str, negative_prompt: &str) -> Result<()> {
    if prompt.trim().is_empty() {
        return Err(Error::setting(
            Setting::Prompt,
            "\"\"",
            "is empty: give a text to draw",
        ));
    }
    check_text(Setting::Prompt, prompt)?;
    check_text(Setting::NegativePrompt, negative_prompt)
}

/// Refuses control characters other than tab and newline: a NUL is forbidden in a PNG text
/// chunk, and the others are invisible in every tool that shows the parameters.
pub fn check_text(setting: Setting, text: &str) -> Result<()> {
    match text
        .char_indices()
        .find(|&(_, c)| c.is_control() && c != '\t' && c != '\n')
    {
        None => Ok(()),
        Some((at, c)) => Err(Error::setting(
            setting,
            "",
            format!(
                "holds the control character U+{:04X} at byte {at}; prompts may hold tabs and \
                 newlines but no other control characters",
                u32::from(c)
            ),
        )),
    }
}

/// The UNet's text inputs must be what the family's encoders produce: the cross-attention
/// width, and for SDXL the pooled width inside `projection_class_embeddings_input_dim`.
fn check_unet_fits_encoders(
    unet_path: &Path,
    unet: &UNetConfig,
    family: Family,
    text: &[TextEncoderFiles],
) -> Result<()> {
    let widths: Vec<String> = text
        .iter()
        .map(|t| t.config.hidden_size.to_string())
        .collect();
    let context: usize = text.iter().map(|t| t.config.hidden_size).sum();
    if unet.cross_attention_dim != context {
        return Err(Error::config(
            unet_path,
            "cross_attention_dim",
            format!(
                "is {}, but the text encoder{} give{} {}",
                unet.cross_attention_dim,
                if text.len() > 1 { "s" } else { "" },
                if text.len() > 1 { "" } else { "s" },
                if text.len() > 1 {
                    format!("{} = {context}", widths.join(" + "))
                } else {
                    context.to_string()
                }
            ),
        ));
    }
    match (family, &unet.text_time) {
        (Family::StableDiffusion, None) => Ok(()),
        (Family::StableDiffusion, Some(_)) => Err(Error::config(
            unet_path,
            "addition_embed_type",
            "is \"text_time\" (an SDXL UNet), but model_index.json names a single-encoder \
             pipeline",
        )),
        (Family::StableDiffusionXl, None) => Err(Error::config(
            unet_path,
            "addition_embed_type",
            "must be \"text_time\" in an SDXL pipeline (pooled text and size conditioning)",
        )),
        (Family::StableDiffusionXl, Some(tt)) => {
            let pooled = text
                .iter()
                .find(|t| t.projection)
                .map(|t| t.config.projection_dim)
                .unwrap_or(0);
            if tt.pooled_dim() != pooled {
                return Err(Error::config(
                    unet_path,
                    "projection_class_embeddings_input_dim",
                    format!(
                        "is {}, but 6 size ids of {} plus text_encoder_2's projection_dim {pooled} \
                         make {}",
                        tt.input_dim,
                        tt.time_embed_dim,
                        TIME_IDS * tt.time_embed_dim + pooled
                    ),
                ));
            }
            Ok(())
        }
    }
}

/// A decoder must read the UNet's latents: same channels. A replacement must also keep the
/// model VAE's pixel grid (an 8x tiny VAE for an 8x model), which sizes the default image.
fn check_vae_fits(
    vae: &AutoencoderFiles,
    unet: &UNetConfig,
    name: &str,
    own: Option<&AutoencoderConfig>,
) -> Result<()> {
    let channels = vae.config.latent_channels();
    if channels != unet.out_channels {
        return Err(Error::config(
            &vae.config_path,
            "latent_channels",
            format!(
                "is {channels}, but the UNet of {name} works on {} channels: this {} belongs to \
                 another model family",
                unet.out_channels,
                vae.config.class_name()
            ),
        ));
    }
    // The latents, or (inpainting UNets) the latents, the mask and the masked image's latents.
    if unet.in_channels != channels && unet.in_channels != 2 * channels + 1 {
        return Err(Error::InvalidInput(format!(
            "{name}: the UNet reads {} channels, but its VAE gives {channels} (an inpainting UNet \
             reads {})",
            unet.in_channels,
            2 * channels + 1
        )));
    }
    if let Some(own) = own {
        if own.scale_factor() != vae.config.scale_factor() {
            return Err(Error::config(
                &vae.config_path,
                "block_out_channels",
                format!(
                    "this VAE scales latents by {}, the model's own VAE by {}",
                    vae.config.scale_factor(),
                    own.scale_factor()
                ),
            ));
        }
    }
    Ok(())
}

/// How [`StableDiffusion::load_opts`] loads a model.
#[derive(Default)]
pub struct LoadOptions<'a> {
    /// When the large components are in memory.
    pub residency: Residency,
    /// A VAE to decode with instead of the model's own: an `AutoencoderTiny` (TAESD,
    /// TAESDXL) or an `AutoencoderKL` (e.g. the SDXL fp16-fix VAE), in a folder or hub repo
    /// with `config.json` at its top, or a model with a `vae/` folder.
    pub vae: Option<&'a ModelFiles>,
    /// The LoRA folder for `<lora:NAME>` tags and the LoRAs every prompt gets (checked at
    /// load, merged as the components load).
    pub lora: LoraSettings,
    /// What a single-file checkpoint is, when its file does not say (SD 2.x's prediction
    /// type) or to override what detection found.
    pub model_type: Option<crate::model::single_file::ModelType>,
    /// A diffusers folder or repo whose configs and tokenizers describe a single-file
    /// checkpoint (diffusers' `from_single_file(config=...)`), instead of the inferred ones.
    pub model_config: Option<&'a ModelFiles>,
}

/// Unreachable: a getter loads its component under the same lock it reads it with.
fn not_loaded() -> Error {
    Error::InvalidInput("internal error: a model component was not loaded".into())
}

/// True when every value of `t` is finite: `x - x` is 0 for finite x and NaN otherwise, so
/// one sum (on the tensor's own device, any dtype) answers without copying the tensor out.
fn all_finite(t: &Tensor) -> Result<bool> {
    let zeros = t.sub(t)?.to_dtype(DType::F32)?;
    let sum: f32 = zeros.sum_all()?.to_scalar()?;
    Ok(sum == 0.0)
}

/// (3, H, W) in [0, 1] -> HxWx3 bytes, rounding like diffusers' `numpy_to_pil`.
pub fn to_rgb8(image: &Tensor) -> Result<Vec<u8>> {
    let hwc = (image.permute((1, 2, 0))? * 255.0)?.round()?;
    let v: Vec<f32> = hwc.flatten_all()?.to_vec1()?;
    Ok(v.into_iter().map(|x| x as u8).collect())
}

/// The UNet's text inputs for one conditioning: the context rows ([uncond x b, cond x b] with
/// guidance) and SDXL's pooled embeddings with size ids. A prompt and negative prompt of
/// different lengths (AUTOMATIC1111's chunks) run as two UNet batches, as AUTOMATIC1111 does.
/// Where the denoising loop starts: loop position 0 and no mask for text to image.
#[derive(Default)]
pub(crate) struct LoopStart {
    index: usize,
    inpaint: Option<image::Inpaint>,
}

struct StepInputs {
    /// One context for all rows, or (uncond, cond) when their lengths differ.
    context: Vec<Tensor>,
    /// Per context: SDXL's pooled embeddings and size ids for its rows.
    text_time: Vec<Option<(Tensor, Tensor)>>,
    b: usize,
}

impl StepInputs {
    fn new(
        model: &StableDiffusion,
        e: &PromptEmbeddings,
        b: usize,
        time_ids: Option<&TimeIds>,
    ) -> Result<Self> {
        let cfg = e.uncond.is_some();
        // SDXL: pooled text embeddings and size ids, [uncond x b, cond x b] like the context.
        let text_time = match (&model.unet_config.text_time, e.batched_pooled(b)?) {
            (Some(_), Some(pooled)) => {
                let ids = time_ids.ok_or_else(|| {
                    Error::InvalidInput("internal error: SDXL size ids are missing".into())
                })?;
                Some((pooled, ids.batched(b, cfg, &model.device)?))
            }
            (None, None) => None,
            _ => {
                return Err(Error::InvalidInput(
                    "internal error: pooled embeddings do not match the UNet".into(),
                ))
            }
        };
        let act = model.act_dtype;
        if !e.lengths_differ()? {
            return Ok(Self {
                context: vec![e.batched(b)?.to_dtype(act)?],
                text_time: vec![text_time],
                b,
            });
        }
        let half =
            |t: &Option<(Tensor, Tensor)>, from: usize| -> Result<Option<(Tensor, Tensor)>> {
                t.as_ref()
                    .map(|(p, ids)| Ok((p.narrow(0, from, b)?, ids.narrow(0, from, b)?)))
                    .transpose()
            };
        let uncond = PromptEmbeddings::fixed(
            e.uncond
                .clone()
                .ok_or_else(|| Error::InvalidInput("internal error: no negative prompt".into()))?,
            None,
        );
        let cond = PromptEmbeddings::fixed(e.cond.clone(), None);
        Ok(Self {
            context: vec![
                uncond.batched(b)?.to_dtype(act)?,
                cond.batched(b)?.to_dtype(act)?,
            ],
            text_time: vec![half(&text_time, 0)?, half(&text_time, b)?],
            b,
        })
    }

    /// The UNet's prediction for `scaled` latents (b rows) at timestep `t`: 2b rows with
    /// guidance ([uncond, cond]), else b; f32.
    fn predict(
        &self,
        unet: &UNet,
        scaled: &Tensor,
        t: f64,
        timestep_cond: Option<&Tensor>,
        act: DType,
    ) -> Result<Tensor> {
        let run = |input: &Tensor, context: &Tensor, text_time: &Option<(Tensor, Tensor)>| {
            let added = AddedConditioning {
                text_time: text_time.as_ref().map(|(p, t)| (p, t)),
                timestep_cond,
            };
            Ok::<_, Error>(
                unet.forward_with(input, t, context, &added)?
                    .to_dtype(DType::F32)?,
            )
        };
        let input = scaled.to_dtype(act)?;
        match self.context.as_slice() {
            [context] => {
                let rows = context.dim(0)?;
                let model_input = if rows == 2 * self.b {
                    Tensor::cat(&[&input, &input], 0)?
                } else {
                    input
                };
                run(&model_input, context, &self.text_time[0])
            }
            [uncond, cond] => Ok(Tensor::cat(
                &[
                    &run(&input, uncond, &self.text_time[0])?,
                    &run(&input, cond, &self.text_time[1])?,
                ],
                0,
            )?),
            _ => Err(Error::InvalidInput(
                "internal error: no UNet context".into(),
            )),
        }
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
    /// SDXL's size conditioning (ignored by other models).
    pub size_conditioning: SizeConditioning,
    /// Report an [`Event::Preview`] every this many steps (`None`: never). Changes no pixel.
    pub preview_every: Option<usize>,
    /// How prompts are read and encoded.
    pub text: TextOptions,
    /// img2img / inpainting: the picture (and mask) to start from; `None`: text to image.
    pub image: Option<Arc<ImageInput>>,
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
/// `.npy` file, as f32 with a batch dimension. Headers are checked against the file's size
/// before anything is allocated, and latents holding NaN or inf are refused.
pub fn load_latents(path: &Path) -> Result<Tensor> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let unreadable = |message: String| Error::Weights {
        path: path.to_path_buf(),
        message,
    };
    let t = match ext.as_str() {
        "npy" => {
            crate::npy::check_file(path)?;
            Tensor::read_npy(path)
                .map_err(|e| unreadable(format!("cannot read .npy latents: {e}")))?
        }
        "safetensors" => {
            // safetensors checks each tensor's byte range against the mapped file's length
            // before a tensor is copied out (tests/limits.rs holds a crafted file).
            let map = candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| unreadable(format!("cannot read safetensors latents: {e}")))?;
            match map.get("latents") {
                Some(t) => t.clone(),
                None if map.len() == 1 => map
                    .into_values()
                    .next()
                    .ok_or_else(|| unreadable("no tensor".into()))?,
                None => {
                    return Err(unreadable(format!(
                        "{} tensors and none named `latents`",
                        map.len()
                    )))
                }
            }
        }
        _ => {
            return Err(Error::setting(
                Setting::Latents,
                path.display(),
                "expected a .safetensors or .npy file",
            ))
        }
    };
    let t = t.to_dtype(DType::F32)?;
    let t = match t.rank() {
        3 => t.unsqueeze(0)?,
        4 => t,
        r => {
            return Err(Error::setting(
                Setting::Latents,
                path.display(),
                format!("expected a 3- or 4-dimensional tensor, found rank {r}"),
            ))
        }
    };
    check_finite_latents(path, &t)?;
    Ok(t)
}

/// Latents with NaN or inf would denoise into a black image: refuse them, saying how many
/// values are bad and where the first one is.
fn check_finite_latents(path: &Path, t: &Tensor) -> Result<()> {
    let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    let Some(first) = values.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    // The flat index as a (n, c, h, w) position.
    let mut index = Vec::with_capacity(t.rank());
    let mut rest = first;
    for &d in t.dims().iter().rev() {
        index.push(rest % d.max(1));
        rest /= d.max(1);
    }
    index.reverse();
    Err(Error::setting(
        Setting::Latents,
        path.display(),
        format!(
            "holds {bad} NaN or infinite value{} (the first, {}, at {index:?})",
            if bad == 1 { "" } else { "s" },
            values[first]
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_refuse_control_characters_but_keep_tabs_and_newlines() {
        check_prompts("a cat\tin a hat\non a mat", "").unwrap();
        let nul = check_prompts("a c\0at", "").unwrap_err().to_string();
        assert!(
            nul.starts_with("prompt: ") && nul.contains("U+0000 at byte 3"),
            "{nul}"
        );
        let neg = check_prompts("a cat", "blur\u{1b}[31m")
            .unwrap_err()
            .to_string();
        assert!(
            neg.starts_with("negative_prompt: ") && neg.contains("U+001B"),
            "{neg}"
        );
        let empty = check_prompts(" \n", "").unwrap_err().to_string();
        assert!(empty.contains("is empty"), "{empty}");
    }
}
