//! Resource checks before work: hard limits on sizes and counts, and an estimate of the memory
//! a request needs, compared with what the machine has available.
//!
//! The estimate is deliberately rough but errs high only where it matters little: it counts
//! the weights of the components that must be loaded plus the largest working set of one
//! stage (the UNet's at the first attention level, or the VAE decoder's at full resolution).
//! Its purpose is to refuse a request that cannot fit (a 100000 x 100000 image, a batch of a
//! thousand) with a clear message instead of an abort from the allocator, never to refuse a
//! size that runs.
use crate::model::autoencoder::AutoencoderConfig;
use crate::model::tiny_vae::TinyVaeConfig;
use crate::model::{UNetConfig, VaeConfig};

/// Longest image side in pixels. Sixteen times SD's 1024-pixel training size; beyond it no
/// Stable Diffusion model produces anything useful, and the latents alone would be large.
pub const MAX_SIDE: usize = 16384;

/// Most pixels in one image (8192 x 8192): 64 Mpx, far past what a UNet trained at 1 Mpx
/// draws coherently, and a 768 MiB f32 RGB buffer per image after decoding.
pub const MAX_PIXELS: usize = 8192 * 8192;

/// Most images one request makes. Seeds, output paths and metadata are planned up front for
/// every image, so the count must be bounded before they are allocated; batch files and walks
/// reach larger totals as many requests.
pub const MAX_IMAGES: usize = 100_000;

/// Scores per block of the CPU attention kernel, in floats (`kernels::attention`): each worker
/// thread holds one block, never a tokens x tokens matrix.
const CPU_ATTENTION_BLOCK_FLOATS: u64 = 1 << 20;

/// How the pipeline will run a request: the facts the estimate depends on.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    /// Image size in pixels.
    pub width: usize,
    pub height: usize,
    /// Images per UNet call.
    pub batch: usize,
    /// Classifier-free guidance doubles the UNet's batch.
    pub cfg: bool,
    /// Bytes per element of the UNet's activations.
    pub act_bytes: u64,
    /// Bytes per element of the VAE decoder's activations.
    pub vae_act_bytes: u64,
    /// Whether attention runs on the project's blocked CPU kernel (f32 activations on the CPU),
    /// or as candle's full `softmax(q kᵀ) v`, which materialises the score matrix.
    pub blocked_attention: bool,
    /// Worker threads (each holds one attention block on the CPU path).
    pub threads: usize,
}

/// Bytes of weights of each component, as they are held in memory (parameters x dtype size).
#[derive(Debug, Clone, Copy, Default)]
pub struct WeightBytes {
    pub text_encoders: u64,
    pub unet: u64,
    pub vae: u64,
}

/// The memory a request needs, by stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Largest working set of one UNet call.
    pub unet_activations: u64,
    /// Largest working set of one decode.
    pub vae_activations: u64,
    /// The peak: weights that must be in memory together plus the larger working set.
    pub total: u64,
}

/// Bytes per attention score at the peak of candle's `softmax(q kᵀ) v` (`layers::attention`):
/// the scores in the activation dtype, their f32 copy and the f32 probabilities; in f32 the
/// copy is the scores themselves.
fn full_attention_bytes(act_bytes: u64) -> u64 {
    if act_bytes == 4 {
        8
    } else {
        act_bytes + 8
    }
}

/// The largest working set of one UNet call at `shape`.
///
/// Terms, all in activation elements of `rows = batch x (2 with CFG)` images on a latent grid
/// of `h x w` (image / `scale`):
/// - skip connections: diffusers' down path keeps every resnet and downsample output for the
///   up path, `Σ_l (layers_per_block + 1) · c_l · h·w / 4^l`;
/// - the working tensors at level 0: input, norm, conv output and residual (4 · c_0 · h·w);
/// - the transformer at the first attention level l: its feed-forward GEGLU projection
///   (8c) and product (4c) over `tokens = h·w / 4^l`, i.e. `12 · c_l · tokens`;
/// - the self-attention scores: `rows · heads_l · tokens²` in the activation dtype plus the
///   f32 copy and f32 softmax candle makes ([`full_attention_bytes`]), or, on the blocked CPU
///   kernel, one 4 MB block per thread.
pub fn unet_activation_bytes(unet: &UNetConfig, scale: usize, shape: &RunShape) -> u64 {
    let rows = (shape.batch as u64) * if shape.cfg { 2 } else { 1 };
    let pixels = ((shape.height / scale.max(1)) as u64) * ((shape.width / scale.max(1)) as u64);
    let level_pixels = |l: usize| pixels >> (2 * l as u32).min(63);
    let c0 = unet.blocks.first().map_or(0, |b| b.channels as u64);
    let skips: u64 = unet
        .blocks
        .iter()
        .enumerate()
        .map(|(l, b)| (unet.layers_per_block as u64 + 1) * b.channels as u64 * level_pixels(l))
        .sum();
    let working = 4 * c0 * pixels;
    let (transformer, scores) = match unet.blocks.iter().position(|b| b.cross_attention) {
        Some(l) => {
            let b = &unet.blocks[l];
            let tokens = level_pixels(l);
            let ff = 12 * b.channels as u64 * tokens;
            let scores = if shape.blocked_attention {
                shape.threads as u64 * CPU_ATTENTION_BLOCK_FLOATS * 4
            } else {
                rows.saturating_mul(b.heads as u64)
                    .saturating_mul(tokens.saturating_mul(tokens))
                    .saturating_mul(full_attention_bytes(shape.act_bytes))
            };
            (ff, scores)
        }
        None => (0, 0),
    };
    rows.saturating_mul(skips + working + transformer)
        .saturating_mul(shape.act_bytes)
        .saturating_add(scores)
}

/// The largest working set of one decode at `shape`.
///
/// An `AutoencoderKL` decoder's up block i runs at `h·w·4^i` latent pixels with channels
/// `c_in -> c_out` (the reversed `block_out_channels`); its working set is its input, two
/// resnet tensors and the upsampled output (`c_in + 2·c_out` at its size, `4·c_out` after
/// upsampling). The mid block's single-head attention over all `h·w` latent pixels holds
/// `(h·w)²` scores unless the blocked CPU kernel runs it. A tiny VAE keeps its (few) channels
/// at full resolution: three tensors of the widest stage.
pub fn vae_activation_bytes(vae: &AutoencoderConfig, shape: &RunShape) -> u64 {
    let b = shape.batch as u64;
    let bytes = shape.vae_act_bytes;
    match vae {
        AutoencoderConfig::Kl(c) => kl_decoder_bytes(c, shape),
        AutoencoderConfig::Tiny(c) => {
            let width = tiny_width(c);
            let pixels = shape.width as u64 * shape.height as u64;
            b.saturating_mul(3 * width * pixels).saturating_mul(bytes)
        }
    }
}

fn tiny_width(c: &TinyVaeConfig) -> u64 {
    c.decoder_block_out_channels
        .iter()
        .copied()
        .max()
        .unwrap_or(64) as u64
}

fn kl_decoder_bytes(c: &VaeConfig, shape: &RunShape) -> u64 {
    let b = shape.batch as u64;
    let scale = c.scale_factor().max(1);
    let latent = ((shape.height / scale) as u64) * ((shape.width / scale) as u64);
    let channels: Vec<u64> = c
        .block_out_channels
        .iter()
        .rev()
        .map(|&ch| ch as u64)
        .collect();
    let mut peak = 0u64;
    let mut c_in = channels.first().copied().unwrap_or(0);
    for (i, &c_out) in channels.iter().enumerate() {
        let pixels = latent.saturating_mul(1 << (2 * i as u32).min(62));
        let upsampled = if i + 1 < channels.len() {
            4 * c_out * pixels
        } else {
            0
        };
        peak = peak.max((c_in + 2 * c_out) * pixels + upsampled);
        c_in = c_out;
    }
    let mut total = b.saturating_mul(peak).saturating_mul(shape.vae_act_bytes);
    if c.mid_block_add_attention && !shape.blocked_attention {
        let scores = b
            .saturating_mul(latent.saturating_mul(latent))
            .saturating_mul(full_attention_bytes(shape.vae_act_bytes));
        total =
            total.max(scores.saturating_add(b * 3 * c_in.max(1) * latent * shape.vae_act_bytes));
    }
    total
}

/// The memory a request needs: the weights of the components not yet in memory (`to_load`)
/// and the larger of the two working sets. With staged residency only one large component is
/// in memory at a time, so the peak is the larger of (UNet weights + its working set) and
/// (VAE weights + its working set); resident models hold everything together.
pub fn estimate(
    unet: &UNetConfig,
    vae: &AutoencoderConfig,
    shape: &RunShape,
    to_load: &WeightBytes,
    staged: bool,
) -> Estimate {
    let unet_activations = unet_activation_bytes(unet, vae.scale_factor(), shape);
    let vae_activations = vae_activation_bytes(vae, shape);
    let total = if staged {
        (to_load.unet.saturating_add(unet_activations))
            .max(to_load.vae.saturating_add(vae_activations))
            .max(to_load.text_encoders)
    } else {
        to_load
            .text_encoders
            .saturating_add(to_load.unet)
            .saturating_add(to_load.vae)
            .saturating_add(unet_activations.max(vae_activations))
    };
    Estimate {
        unet_activations,
        vae_activations,
        total,
    }
}

/// Bytes of memory available to this process now: Linux's `MemAvailable`, lowered to the
/// cgroup's `memory.max - memory.current` when a limit is set. `None` elsewhere, or when
/// neither can be read: the caller then skips the comparison rather than guess.
pub fn available_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let host = meminfo.as_deref().and_then(mem_available);
        let cgroup = cgroup_room(
            std::fs::read_to_string("/sys/fs/cgroup/memory.max")
                .ok()
                .as_deref(),
            std::fs::read_to_string("/sys/fs/cgroup/memory.current")
                .ok()
                .as_deref(),
        );
        match (host, cgroup) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Room left under a cgroup v2 limit: `memory.max - memory.current`; `None` when unlimited
/// (`max`) or unreadable.
pub fn cgroup_room(max: Option<&str>, current: Option<&str>) -> Option<u64> {
    let max: u64 = max?.trim().parse().ok()?;
    let current: u64 = current?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ConfigFile;

    const GIB: u64 = 1 << 30;

    fn config_file(name: &str, json: &str) -> ConfigFile {
        // A folder per call: the tests run in parallel. The file is read at once.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, json).unwrap();
        ConfigFile::open(&path).unwrap()
    }

    /// SD 1.5's UNet: diffusers' defaults (320/640/1280/1280, 8 heads, 768 context).
    fn sd15_unet() -> UNetConfig {
        let f = config_file(
            "sd15-unet.json",
            r#"{"sample_size": 64, "cross_attention_dim": 768}"#,
        );
        UNetConfig::from_config(&f).unwrap()
    }

    /// SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, abridged).
    fn sdxl_unet() -> UNetConfig {
        let f = config_file(
            "sdxl-unet.json",
            r#"{"sample_size": 128, "cross_attention_dim": 2048,
                "block_out_channels": [320, 640, 1280],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
                "use_linear_projection": true, "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}"#,
        );
        UNetConfig::from_config(&f).unwrap()
    }

    /// The SD/SDXL VAE (128/256/512/512).
    fn kl_vae() -> AutoencoderConfig {
        let f = config_file(
            "vae.json",
            r#"{"block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                "layers_per_block": 2, "sample_size": 512}"#,
        );
        AutoencoderConfig::Kl(VaeConfig::from_config(&f).unwrap())
    }

    fn shape(side: usize, act_bytes: u64, blocked: bool) -> RunShape {
        RunShape {
            width: side,
            height: side,
            batch: 1,
            cfg: true,
            act_bytes,
            vae_act_bytes: act_bytes,
            blocked_attention: blocked,
            threads: 16,
        }
    }

    /// Parameter counts of the real checkpoints (safetensors headers): SD 1.5 text encoder
    /// 123.1M, UNet 859.5M, VAE 83.7M; SDXL encoders 123.1M + 694.7M, UNet 2567.5M.
    fn weights(text: u64, unet: u64, vae: u64, bytes: u64) -> WeightBytes {
        WeightBytes {
            text_encoders: text * bytes,
            unet: unet * bytes,
            vae: vae * bytes,
        }
    }

    #[test]
    fn sd15_512_fits_well_under_8_gib() {
        // CPU f32 (blocked attention), and GPU-style full attention in f32 and f16, all
        // resident (every weight counted).
        for (blocked, bytes) in [(true, 4), (false, 4), (false, 2)] {
            let w = weights(123_100_000, 859_500_000, 83_700_000, bytes);
            let e = estimate(
                &sd15_unet(),
                &kl_vae(),
                &shape(512, bytes, blocked),
                &w,
                false,
            );
            eprintln!("SD 1.5 512² {bytes}-byte dtype, blocked attention {blocked}: {e:?}");
            assert!(e.total < 7 * GIB, "SD 1.5 512²: {e:?}");
        }
    }

    #[test]
    fn sdxl_1024_fits_a_24_gib_machine() {
        for bytes in [4, 2] {
            let w = weights(817_800_000, 2_567_500_000, 83_700_000, bytes);
            let e = estimate(&sdxl_unet(), &kl_vae(), &shape(1024, bytes, true), &w, true);
            eprintln!("SDXL 1024² staged, {bytes}-byte dtype: {e:?}");
            assert!(
                e.total < 20 * GIB,
                "SDXL 1024² staged, {bytes} bytes: {e:?}"
            );
            let e = estimate(
                &sdxl_unet(),
                &kl_vae(),
                &shape(1024, bytes, true),
                &w,
                false,
            );
            eprintln!("SDXL 1024² resident, {bytes}-byte dtype: {e:?}");
            assert!(
                e.total < 20 * GIB,
                "SDXL 1024² resident, {bytes} bytes: {e:?}"
            );
        }
    }

    #[test]
    fn huge_images_and_batches_are_far_over() {
        let w = weights(123_100_000, 859_500_000, 83_700_000, 4);
        let e = estimate(&sd15_unet(), &kl_vae(), &shape(16384, 4, true), &w, true);
        assert!(e.total > 100 * GIB, "{e:?}");
        let mut big = shape(512, 4, true);
        big.batch = 1000;
        let e = estimate(&sd15_unet(), &kl_vae(), &big, &w, true);
        assert!(e.total > 100 * GIB, "{e:?}");
    }

    #[test]
    fn full_attention_grows_with_tokens_squared() {
        let small = unet_activation_bytes(&sd15_unet(), 8, &shape(512, 4, false));
        let large = unet_activation_bytes(&sd15_unet(), 8, &shape(1024, 4, false));
        // 4x the tokens: the score matrix (the largest term) grows 16x.
        assert!(large > 10 * small, "{small} -> {large}");
    }

    #[test]
    fn reads_meminfo_and_cgroup_numbers() {
        let text = "MemTotal: 24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(mem_available(text), Some(1000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(cgroup_room(Some("max\n"), Some("5\n")), None);
        assert_eq!(cgroup_room(Some("100\n"), Some("30\n")), Some(70));
        assert_eq!(cgroup_room(Some("10\n"), Some("30\n")), Some(0));
    }
}
