//! img2img and inpainting: an init image (and a mask) turned into the latents the denoising
//! loop starts from, and the mask applied on every step, as diffusers'
//! `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` do (their SDXL
//! counterparts alike; `LatentConsistencyModelImg2ImgPipeline` for LCM models).
//!
//! img2img: the schedule is cut by the strength (the last ⌊steps · strength⌋ steps run), the
//! encoded image is noised to the first of them and denoised from there. Inpainting with a
//! 4-channel UNet ("legacy" inpainting) blends the image back outside the mask after every
//! step, noised to the next step's level; a 9-channel inpainting UNet reads the mask and the
//! encoded masked image beside the latents instead. What the masked area starts from follows
//! AUTOMATIC1111's "Masked content" ([`MaskedContent`]; diffusers' way is `Original`).
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};

use super::{Event, Sampling, StableDiffusion};
use crate::model::autoencoder::ImageEncoder;
use crate::model::Weights;
use crate::noise::NoiseSource;
use crate::schedulers::Scheduler;
use crate::{Error, Result, Setting};

mod fill;
mod masked_content;
use masked_content::masked_latent_content;
pub use masked_content::MaskedContent;

/// Largest init image or mask file read, in pixels (decoding a bigger one could take all
/// memory before its size is checked against the run's).
const MAX_INPUT_PIXELS: u64 = 8192 * 8192;

/// The picture img2img starts from, an optional inpainting mask, and the strength.
#[derive(Debug, Clone)]
pub struct ImageInput {
    image: RgbImage,
    mask: Option<GrayImage>,
    strength: f64,
    masked_content: MaskedContent,
    fingerprint: String,
}

impl ImageInput {
    /// An img2img (no `mask`) or inpainting input. The mask is the luma of the given picture
    /// (white = redrawn, black = kept; values are split at one half as diffusers binarizes);
    /// both are resized to the run's size when they differ from it.
    pub fn new(image: RgbImage, mask: Option<GrayImage>, strength: f64) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        image.dimensions().hash(&mut h);
        image.as_raw().hash(&mut h);
        if let Some(m) = &mask {
            m.dimensions().hash(&mut h);
            m.as_raw().hash(&mut h);
        }
        let fingerprint = format!("{:016x}", h.finish());
        Self {
            image,
            mask,
            strength,
            masked_content: MaskedContent::Original,
            fingerprint,
        }
    }

    /// The same input with the masked area starting from `content` (default
    /// [`MaskedContent::Original`]); without a mask there is no masked area and it stays
    /// `Original`.
    pub fn with_masked_content(mut self, content: MaskedContent) -> Self {
        if content != self.masked_content && self.mask.is_some() {
            // Inputs that make other pictures have other fingerprints.
            let pixels = self.fingerprint.get(..16).unwrap_or_default();
            self.fingerprint = match content {
                MaskedContent::Original => pixels.to_string(),
                other => format!("{pixels}-{other}"),
            };
            self.masked_content = content;
        }
        self
    }

    /// What the masked area starts from.
    pub fn masked_content(&self) -> MaskedContent {
        self.masked_content
    }

    /// The init image.
    pub fn image(&self) -> &RgbImage {
        &self.image
    }

    /// The inpainting mask, if any.
    pub fn mask(&self) -> Option<&GrayImage> {
        self.mask.as_ref()
    }

    /// How much is redrawn: 1 starts from pure noise, 0.5 runs the last half of the steps.
    pub fn strength(&self) -> f64 {
        self.strength
    }

    /// A short hash of the pixels of image and mask (not the strength), with the masked
    /// content when it is not the original, which tells inputs apart in batch keys and
    /// manifests.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether two inputs make the same pictures (same pixels, strength and masked content).
    pub fn same(&self, other: &ImageInput) -> bool {
        self.strength.to_bits() == other.strength.to_bits()
            && self.masked_content == other.masked_content
            && self.image == other.image
            && self.mask == other.mask
    }
}

impl PartialEq for ImageInput {
    fn eq(&self, other: &Self) -> bool {
        self.same(other)
    }
}

/// Reads a PNG, JPEG or WebP picture as RGB (alpha is dropped).
pub fn read_image(path: &Path, setting: Setting) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, setting, &path.display().to_string())
}

/// Decodes a PNG, JPEG or WebP picture from memory as RGB; `what` names it in errors.
pub fn decode_image(bytes: &[u8], setting: Setting, what: &str) -> Result<RgbImage> {
    let bad = |reason: String| Error::setting(setting, what, reason);
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot be read ({e})")))?;
    if reader.format().is_none() {
        return Err(bad("is not a PNG, JPEG or WebP picture".into()));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad(format!("is not a readable picture ({e})")))?;
    if u64::from(w) * u64::from(h) > MAX_INPUT_PIXELS || w == 0 || h == 0 {
        return Err(bad(format!(
            "is {w}x{h} pixels; at most 8192x8192 are read"
        )));
    }
    let decoded = image::load_from_memory(bytes)
        .map_err(|e| bad(format!("is not a readable picture ({e})")))?;
    Ok(decoded.to_rgb8())
}

/// The luma of an RGB mask as PIL's `convert("L")` computes it (ITU-R 601-2 with its integer
/// rounding), which diffusers' mask processor reads.
pub fn mask_luma(rgb: &RgbImage) -> GrayImage {
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        let l = (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16;
        image::Luma([l as u8])
    })
}

/// The per-step inpainting state of one batch.
pub(crate) struct Inpaint {
    /// (b, 1, h, w): 1 where the picture is redrawn.
    mask: Tensor,
    /// 1 - `mask`: where the picture is kept.
    keep: Tensor,
    /// Legacy (4-channel) inpainting: the encoded image and the noise it is re-noised with.
    blend: Option<(Tensor, Tensor)>,
    /// 9-channel UNets: the mask and the encoded masked image, (b, 1 + c, h, w), appended to
    /// the scaled latents.
    unet_extra: Option<Tensor>,
}

impl Inpaint {
    /// The UNet's input for `scaled` latents: the latents, then (9-channel UNets) the mask and
    /// the masked image's latents.
    pub(crate) fn unet_input(&self, scaled: &Tensor) -> Result<Tensor> {
        match &self.unet_extra {
            Some(extra) => Ok(Tensor::cat(&[scaled, extra], 1)?),
            None => Ok(scaled.clone()),
        }
    }

    /// Legacy inpainting after the step at loop position `index`: outside the mask, the
    /// image noised to the next position's level (clean after the last step).
    pub(crate) fn after_step(
        &self,
        latents: Tensor,
        scheduler: &dyn Scheduler,
        index: usize,
    ) -> Result<Tensor> {
        let Some((image_latents, noise)) = &self.blend else {
            return Ok(latents);
        };
        let proper = if index + 1 < scheduler.timesteps().len() {
            scheduler.add_noise(image_latents, noise, index + 1)?
        } else {
            image_latents.clone()
        };
        Ok((proper.broadcast_mul(&self.keep)? + latents.broadcast_mul(&self.mask)?)?)
    }
}

/// Pixels of `image` resized to `width` x `height` (Lanczos, as diffusers' image processor)
/// when they differ.
fn fit<P: image::Pixel<Subpixel = u8> + 'static>(
    image: &image::ImageBuffer<P, Vec<u8>>,
    width: usize,
    height: usize,
) -> image::ImageBuffer<P, Vec<u8>> {
    if image.dimensions() == (width as u32, height as u32) {
        image.clone()
    } else {
        image::imageops::resize(image, width as u32, height as u32, FilterType::Lanczos3)
    }
}

/// (1, 3, H, W) f32 in [-1, 1], as diffusers normalises: x / 255 · 2 − 1 in float32.
fn image_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| 2.0 * (f32::from(v) / 255.0) - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (1, h, w, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// (1, 1, H, W) f32 of 0 and 1: diffusers' binarized mask (1 where luma / 255 ≥ 0.5).
fn mask_tensor(mask: &GrayImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let data: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&v| if f32::from(v) / 255.0 < 0.5 { 0.0 } else { 1.0 })
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, h, w), device)?)
}

/// The mask at latent size by nearest-neighbour sampling (torch's `interpolate` default: the
/// pixel at (i·f, j·f)).
fn mask_latents(mask: &Tensor, f: usize) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let rows: Vec<u32> = (0..h / f).map(|i| (i * f) as u32).collect();
    let cols: Vec<u32> = (0..w / f).map(|j| (j * f) as u32).collect();
    let dev = mask.device();
    let m = mask.index_select(&Tensor::new(rows.as_slice(), dev)?, 2)?;
    Ok(m.index_select(&Tensor::new(cols.as_slice(), dev)?, 3)?)
}

impl StableDiffusion {
    /// The size a run takes when none is given: the init image's, rounded down to the VAE
    /// factor (diffusers' default), else the model's native size.
    pub fn default_size_for(&self, image: Option<&ImageInput>) -> (usize, usize) {
        match image {
            Some(input) => {
                let f = self.vae_scale_factor();
                let (w, h) = input.image.dimensions();
                let round = |v: u32| v as usize - v as usize % f;
                (round(w), round(h))
            }
            None => (self.default_size(), self.default_size()),
        }
    }

    /// Whether the UNet is an inpainting UNet (reads a mask and a masked image beside the
    /// latents: 9 input channels for a 4-channel VAE).
    pub fn is_inpainting_model(&self) -> bool {
        self.unet_config.in_channels == 2 * self.latent_channels() + 1
    }

    /// The checks of an image input for a run of `s`, before any work: strength within
    /// (0, 1] and leaving at least one step, a mask for an inpainting UNet.
    pub(crate) fn check_image(&self, s: &Sampling) -> Result<()> {
        let Some(input) = &s.image else {
            if self.is_inpainting_model() {
                return Err(Error::setting(
                    Setting::Mask,
                    "",
                    format!(
                        "{} is an inpainting model: it needs an init image and a mask",
                        self.name()
                    ),
                ));
            }
            return Ok(());
        };
        let strength = input.strength;
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::setting(
                Setting::Strength,
                strength,
                "must be more than 0 and at most 1",
            ));
        }
        if input.mask.is_none() && self.is_inpainting_model() {
            return Err(Error::setting(
                Setting::Mask,
                "",
                format!("{} is an inpainting model: it needs a mask", self.name()),
            ));
        }
        self.image_schedule(s, input)?;
        Ok(())
    }

    /// The scheduler of an image-to-image run and the loop position it starts at: the last
    /// ⌊steps · strength⌋ of the schedule (diffusers' `get_timesteps`), or for an LCM model with
    /// the LCM scheduler, the distillation schedule shortened by the strength (diffusers'
    /// `LatentConsistencyModelImg2ImgPipeline`), from its start.
    pub(crate) fn image_schedule(
        &self,
        s: &Sampling,
        input: &ImageInput,
    ) -> Result<(Box<dyn Scheduler>, usize)> {
        let lcm_model = self.unet_config.time_cond_proj_dim.is_some()
            && s.scheduler == crate::schedulers::SchedulerKind::Lcm
            && input.mask.is_none();
        if lcm_model {
            let scheduler = crate::schedulers::build_with_strength(
                s.scheduler,
                &self.scheduler_config,
                s.steps,
                s.karras,
                input.strength,
            )
            .map_err(|e| match e {
                Error::InvalidInput(reason) => {
                    Error::setting(Setting::Strength, input.strength, reason)
                }
                other => other,
            })?;
            return Ok((scheduler, 0));
        }
        let scheduler = self.scheduler(s.scheduler, s.steps, s.karras)?;
        // Python's int() of the float product, as diffusers computes it.
        let init = ((s.steps as f64 * input.strength) as usize).min(s.steps);
        if init == 0 {
            return Err(Error::setting(
                Setting::Strength,
                input.strength,
                format!(
                    "leaves no step of {} to run (at least 1 / steps is needed)",
                    s.steps
                ),
            ));
        }
        let start = s.steps - init;
        Ok((scheduler, start))
    }

    /// Denoising steps one batch of `s` runs: the scheduler's loop (PNDM adds one), cut by
    /// img2img's strength.
    pub fn loop_steps(&self, s: &Sampling) -> Result<usize> {
        Ok(match &s.image {
            Some(input) => {
                let (scheduler, start) = self.image_schedule(s, input)?;
                scheduler.timesteps().len() - start
            }
            None => self
                .scheduler(s.scheduler, s.steps, s.karras)?
                .timesteps()
                .len(),
        })
    }

    /// The image encoder (the VAE's encoder half), loaded on first use; kept while the model
    /// is resident.
    fn image_encoder(&self, on_event: &mut dyn FnMut(Event)) -> Result<Arc<ImageEncoder>> {
        let mut slot = self.image_encoder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &*slot {
            return Ok(Arc::clone(e));
        }
        on_event(Event::Loading {
            component: "vae encoder",
        });
        let w = Weights::open_at(&self.vae.weights, &self.device, self.vae_dtype)?;
        let encoder = Arc::new(self.vae.load_encoder_from(&w)?);
        if self.residency == super::Residency::Resident {
            *slot = Some(Arc::clone(&encoder));
        }
        Ok(encoder)
    }

    /// Stage 4 of an image-to-image batch of `b` images: the starting latents (the encoded
    /// image noised to loop position `start`, or pure noise at full strength when inpainting)
    /// and, with a mask, the per-step inpainting state. Draws from `noise` in diffusers'
    /// order: the image's latent sample, the noise, then the masked image's latent sample.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prepare_image_latents(
        &self,
        input: &ImageInput,
        b: usize,
        s: &Sampling,
        scheduler: &dyn Scheduler,
        start: usize,
        noise: &mut dyn NoiseSource,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(Tensor, Option<Inpaint>)> {
        let encoder = self.image_encoder(on_event)?;
        let dev = &self.device;
        let act = self.vae_act_dtype();
        let pixels = fit(&input.image, s.width, s.height);
        let pixels = match (&input.mask, input.masked_content) {
            (Some(mask), MaskedContent::Fill) => fill::fill(&pixels, &fit(mask, s.width, s.height)),
            _ => pixels,
        };
        let image = image_tensor(&pixels, dev)?;
        let encode = |pixels: &Tensor, noise: &mut dyn NoiseSource| -> Result<Tensor> {
            let batch = pixels.repeat((b, 1, 1, 1))?.to_dtype(act)?;
            encoder.encode(&batch, noise)
        };
        let f = self.vae_scale_factor();
        let shape = [b, self.latent_channels(), s.height / f, s.width / f];
        let Some(mask) = &input.mask else {
            let init = encode(&image, noise)?;
            let fresh = noise.randn(&shape, dev)?;
            return Ok((scheduler.add_noise(&init, &fresh, start)?, None));
        };
        let mask = mask_tensor(&fit(mask, s.width, s.height), dev)?;
        let legacy = !self.is_inpainting_model();
        let full = input.strength == 1.0;
        let image_latents = if legacy || !full {
            Some(encode(&image, noise)?)
        } else {
            None
        };
        let fresh = noise.randn(&shape, dev)?;
        let mask_small = mask_latents(&mask, f)?.repeat((b, 1, 1, 1))?;
        let keep = mask_small.affine(-1.0, 1.0)?;
        let image_latents = match image_latents {
            Some(init) => Some(masked_latent_content(
                init,
                input.masked_content,
                &fresh,
                &mask_small,
                &keep,
            )?),
            None => None,
        };
        let latents = match (&image_latents, full) {
            (Some(init), false) => scheduler.add_noise(init, &fresh, start)?,
            _ => (&fresh * scheduler.init_noise_sigma())?,
        };
        let masked = image.broadcast_mul(&mask.affine(-1.0, 1.0)?)?;
        let masked_latents = encode(&masked, noise)?;
        let inpaint = if legacy {
            Inpaint {
                mask: mask_small,
                keep,
                blend: image_latents.map(|l| (l, fresh)),
                unet_extra: None,
            }
        } else {
            let extra = Tensor::cat(&[&mask_small, &masked_latents], 1)?;
            Inpaint {
                mask: mask_small,
                keep,
                blend: None,
                unet_extra: Some(extra.to_dtype(DType::F32)?),
            }
        };
        Ok((latents, Some(inpaint)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_content_tells_inputs_apart_only_with_a_mask() {
        let img = RgbImage::new(8, 8);
        let mask = Some(GrayImage::new(8, 8));
        let a = ImageInput::new(img.clone(), mask.clone(), 0.5);
        let b = a.clone().with_masked_content(MaskedContent::Fill);
        assert!(!a.same(&b));
        assert_ne!(a.fingerprint(), b.fingerprint());
        let plain = ImageInput::new(img, None, 0.5);
        let plain_fill = plain.clone().with_masked_content(MaskedContent::Fill);
        assert_eq!(plain_fill.masked_content(), MaskedContent::Original);
        assert!(plain.same(&plain_fill));
        assert_eq!(plain.fingerprint(), plain_fill.fingerprint());
        let back = b.with_masked_content(MaskedContent::Original);
        assert!(a.same(&back) && a.fingerprint() == back.fingerprint());
    }
}
