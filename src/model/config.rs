//! Model configs read from the model's own JSON files (diffusers' `config.json` layout).
//!
//! Every architecture number comes from these files. A key the file lacks takes diffusers'
//! default for that class; a key we do not know, or a value we cannot run (Kandinsky's
//! embedding types, say), is an error naming the file and the field, so nothing is silently
//! ignored.
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// A parsed JSON config file that remembers its path for error messages.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    path: PathBuf,
    map: Map<String, Value>,
}

impl ConfigFile {
    /// A config made in memory (a single-file checkpoint's); `path` is what messages name.
    pub fn from_map(path: PathBuf, map: Map<String, Value>) -> Self {
        Self { path, map }
    }

    /// Reads and parses `path` as a JSON object.
    pub fn open(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    path: path.to_path_buf(),
                    hint: String::new(),
                }
            } else {
                Error::io(path, e)
            }
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        match value {
            Value::Object(map) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            _ => Err(Error::Json {
                path: path.to_path_buf(),
                message: "expected a JSON object".into(),
            }),
        }
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Errors on the first key that is neither metadata (`_`-prefixed) nor in `known`.
    pub fn check_known(&self, known: &[&str]) -> Result<()> {
        let mut keys: Vec<&String> = self.map.keys().collect();
        keys.sort();
        for key in keys {
            if !key.starts_with('_') && !known.contains(&key.as_str()) {
                return Err(Error::config(
                    &self.path,
                    key.as_str(),
                    "unknown field: this model uses a feature latent does not implement",
                ));
            }
        }
        Ok(())
    }

    /// A required field.
    pub fn req<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        match self.map.get(key) {
            None | Some(Value::Null) => Err(Error::config(&self.path, key, "missing")),
            Some(v) => self.parse(key, v),
        }
    }

    /// An optional field: `default` when absent or null.
    pub fn opt<T: DeserializeOwned>(&self, key: &str, default: T) -> Result<T> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => self.parse(key, v),
        }
    }

    /// An optional field without default.
    pub fn maybe<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.parse(key, v).map(Some),
        }
    }

    /// Requires a field to be absent or to hold one of `supported` (JSON values).
    pub fn expect_one_of(&self, key: &str, supported: &[Value]) -> Result<()> {
        match self.map.get(key) {
            None => Ok(()),
            Some(v) if supported.contains(v) => Ok(()),
            Some(v) => Err(Error::config(
                &self.path,
                key,
                format!("unsupported value {v}"),
            )),
        }
    }

    /// Refuses an architecture number above `max`: numbers in a config size allocations, so a
    /// corrupt or hostile file must fail here, naming the field, instead of in the allocator.
    pub fn check_at_most(&self, key: &str, value: usize, max: usize) -> Result<()> {
        if value > max {
            return Err(self.error(
                key,
                format!("{value} is larger than the limit of {max} (a corrupt config?)"),
            ));
        }
        Ok(())
    }

    /// An error about `key`, for checks done by the caller.
    pub fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(&self.path, key, message)
    }

    fn parse<T: DeserializeOwned>(&self, key: &str, v: &Value) -> Result<T> {
        T::deserialize(v)
            .map_err(|e| Error::config(&self.path, key, format!("invalid value {v}: {e}")))
    }
}

/// A field that is one number for every block or one per block (diffusers allows both).
fn per_block(file: &ConfigFile, key: &str, default: usize, n: usize) -> Result<Vec<usize>> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(usize),
        Many(Vec<usize>),
    }
    let v = match file.maybe::<OneOrMany>(key)? {
        None => vec![default; n],
        Some(OneOrMany::One(x)) => vec![x; n],
        Some(OneOrMany::Many(v)) => v,
    };
    if v.len() != n {
        return Err(file.error(key, format!("has {} entries for {n} blocks", v.len())));
    }
    Ok(v)
}

/// Transformer depths per layer: (down block i -> one per resnet layer, up block j -> one per
/// resnet layer), from `transformer_layers_per_block` (a number, one per block, or one list per
/// block for asymmetric UNets) and `reverse_transformer_layers_per_block` (the up blocks' lists,
/// which asymmetric UNets must give; else the down blocks' values reversed), as diffusers.
#[allow(clippy::type_complexity)]
fn transformer_depths(
    f: &ConfigFile,
    n: usize,
    layers_per_block: usize,
) -> Result<(Vec<Vec<usize>>, Vec<Vec<usize>>)> {
    #[derive(serde::Deserialize, Clone)]
    #[serde(untagged)]
    enum Depth {
        One(usize),
        PerLayer(Vec<usize>),
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Depths {
        One(usize),
        PerBlock(Vec<Depth>),
    }
    let expand = |key: &str, d: &Depth, layers: usize| -> Result<Vec<usize>> {
        match d {
            Depth::One(x) => Ok(vec![*x; layers]),
            Depth::PerLayer(v) if v.len() == layers => Ok(v.clone()),
            Depth::PerLayer(v) => Err(f.error(
                key,
                format!("a block lists {} depths for {layers} layers", v.len()),
            )),
        }
    };
    let down: Vec<Depth> = match f.maybe::<Depths>("transformer_layers_per_block")? {
        None => vec![Depth::One(1); n],
        Some(Depths::One(x)) => vec![Depth::One(x); n],
        Some(Depths::PerBlock(v)) => v,
    };
    if down.len() != n {
        return Err(f.error(
            "transformer_layers_per_block",
            format!("has {} entries for {n} blocks", down.len()),
        ));
    }
    let asymmetric = down.iter().any(|d| matches!(d, Depth::PerLayer(_)));
    let up: Vec<Depth> = match f.maybe::<Vec<Depth>>("reverse_transformer_layers_per_block")? {
        Some(v) if v.len() == n => v,
        Some(v) => {
            return Err(f.error(
                "reverse_transformer_layers_per_block",
                format!("has {} entries for {n} blocks", v.len()),
            ))
        }
        None if asymmetric => {
            return Err(f.error(
                "reverse_transformer_layers_per_block",
                "is required when transformer_layers_per_block lists depths per layer",
            ))
        }
        None => down.iter().rev().cloned().collect(),
    };
    let down = down
        .iter()
        .map(|d| expand("transformer_layers_per_block", d, layers_per_block))
        .collect::<Result<Vec<_>>>()?;
    let up = up
        .iter()
        .map(|d| {
            expand(
                "reverse_transformer_layers_per_block",
                d,
                layers_per_block + 1,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((down, up))
}

/// One down block of the UNet (its mirror up block shares the numbers).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetBlockConfig {
    /// Output channels of the block.
    pub channels: usize,
    /// Whether the block has cross-attention transformers.
    pub cross_attention: bool,
    /// Attention heads in the block's transformers (diffusers' legacy `attention_head_dim`).
    pub heads: usize,
    /// Transformer depth of each attention layer of this down block (one per resnet).
    pub transformer_layers: Vec<usize>,
    /// Transformer depth of each attention layer of the up block that mirrors this one (one
    /// per resnet: `layers_per_block + 1`).
    pub up_transformer_layers: Vec<usize>,
}

/// The UNet's middle block (`mid_block_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidBlockKind {
    /// `UNetMidBlock2DCrossAttn`: resnet, transformer of this depth, resnet.
    CrossAttn { transformer_layers: usize },
    /// `UNetMidBlock2D` without attention, as UNet2DConditionModel builds it: one resnet.
    Resnet,
    /// No mid block (`mid_block_type: null`).
    None,
}

/// Architecture of a `UNet2DConditionModel`, from `unet/config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub sample_size: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub blocks: Vec<UNetBlockConfig>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    /// SDXL's pooled-text and size conditioning, when `addition_embed_type` is "text_time".
    pub text_time: Option<TextTimeConfig>,
    /// Width of the guidance embedding of LCM-distilled UNets (`time_cond_proj_dim`).
    pub time_cond_proj_dim: Option<usize>,
    /// The middle block.
    pub mid_block: MidBlockKind,
}

const UNET_KEYS: &[&str] = &[
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "dropout",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "dual_cross_attention",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
    "time_embedding_type",
    "time_embedding_dim",
    "time_embedding_act_fn",
    "timestep_post_act",
    "time_cond_proj_dim",
    "conv_in_kernel",
    "conv_out_kernel",
    "projection_class_embeddings_input_dim",
    "attention_type",
    "class_embeddings_concat",
    "mid_block_only_cross_attention",
    "cross_attention_norm",
    "addition_embed_type_num_heads",
];

impl UNetConfig {
    /// Reads `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_config(&ConfigFile::open(path)?)
    }

    /// Builds the config from a parsed file, refusing features we do not implement.
    pub fn from_config(f: &ConfigFile) -> Result<Self> {
        f.check_known(UNET_KEYS)?;
        let null = Value::Null;
        let f_false = Value::Bool(false);
        for key in [
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "class_embed_type",
            "num_class_embeds",
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "cross_attention_norm",
            "mid_block_only_cross_attention",
        ] {
            f.expect_one_of(key, std::slice::from_ref(&null))?;
        }
        // diffusers' UNet2DConditionModel itself refuses `num_attention_heads` (its heads come
        // from the legacy `attention_head_dim`), so no loadable checkpoint sets it.
        if f.maybe::<Value>("num_attention_heads")?.is_some() {
            return Err(f.error(
                "num_attention_heads",
                "is not supported by diffusers' UNet2DConditionModel either (the number of heads \
                 comes from `attention_head_dim`)",
            ));
        }
        let text_time = match f.maybe::<String>("addition_embed_type")?.as_deref() {
            None => {
                f.expect_one_of("projection_class_embeddings_input_dim", &[Value::Null])?;
                None
            }
            Some("text_time") => {
                let time_embed_dim: usize = f.req("addition_time_embed_dim")?;
                let input_dim: usize = f.req("projection_class_embeddings_input_dim")?;
                if time_embed_dim == 0 || time_embed_dim % 2 == 1 {
                    return Err(
                        f.error("addition_time_embed_dim", "must be a positive even number")
                    );
                }
                if input_dim <= TIME_IDS * time_embed_dim {
                    return Err(f.error(
                        "projection_class_embeddings_input_dim",
                        format!(
                            "{input_dim} leaves no room for the pooled text embedding after \
                             {TIME_IDS} time ids of {time_embed_dim}"
                        ),
                    ));
                }
                Some(TextTimeConfig {
                    time_embed_dim,
                    input_dim,
                })
            }
            Some(other) => {
                return Err(f.error(
                    "addition_embed_type",
                    format!("`{other}` is not supported (latent implements \"text_time\", SDXL's)"),
                ))
            }
        };
        let time_cond_proj_dim: Option<usize> = f.maybe("time_cond_proj_dim")?;
        if time_cond_proj_dim == Some(0) {
            return Err(f.error("time_cond_proj_dim", "must be positive"));
        }
        for key in [
            "only_cross_attention",
            "dual_cross_attention",
            "resnet_skip_time_act",
            "class_embeddings_concat",
        ] {
            f.expect_one_of(key, std::slice::from_ref(&f_false))?;
        }
        f.expect_one_of("act_fn", &["silu".into()])?;
        f.expect_one_of("resnet_time_scale_shift", &["default".into()])?;
        f.expect_one_of("time_embedding_type", &["positional".into()])?;
        f.expect_one_of("attention_type", &["default".into()])?;
        if f.opt::<f64>("resnet_out_scale_factor", 1.0)? != 1.0 {
            return Err(f.error("resnet_out_scale_factor", "only 1.0 is supported"));
        }

        let channels: Vec<usize> = f.opt("block_out_channels", vec![320, 640, 1280, 1280])?;
        let n = channels.len();
        if n == 0 {
            return Err(f.error("block_out_channels", "is empty"));
        }
        let down: Vec<String> = f.opt(
            "down_block_types",
            vec![
                "CrossAttnDownBlock2D".to_string(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
        )?;
        let up: Vec<String> = f.opt(
            "up_block_types",
            vec![
                "UpBlock2D".to_string(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
        )?;
        if down.len() != n {
            return Err(f.error(
                "down_block_types",
                format!("has {} entries for {n} blocks", down.len()),
            ));
        }
        if up.len() != n {
            return Err(f.error(
                "up_block_types",
                format!("has {} entries for {n} blocks", up.len()),
            ));
        }
        let mut cross = Vec::with_capacity(n);
        for (i, d) in down.iter().enumerate() {
            let is_cross = match d.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(f.error(
                        "down_block_types",
                        format!("unsupported block type {other:?}"),
                    ))
                }
            };
            // Up blocks mirror the down blocks; diffusers allows other pairings but no SD
            // checkpoint uses them, and the skip-connection layout assumes the mirror.
            let expected = if is_cross {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            };
            if up[n - 1 - i] != expected {
                return Err(f.error(
                    "up_block_types",
                    format!(
                        "entry {} is {:?}, expected {expected:?} to mirror down block {i}",
                        n - 1 - i,
                        up[n - 1 - i]
                    ),
                ));
            }
            cross.push(is_cross);
        }
        let heads = per_block(f, "attention_head_dim", 8, n)?;
        // Checked before the per-layer lists are built from them.
        f.check_at_most("block_out_channels", n, MAX_LEVELS)?;
        let layers_per_block: usize = f.opt("layers_per_block", 2)?;
        f.check_at_most("layers_per_block", layers_per_block, MAX_LAYERS)?;
        let (transformer_layers, up_transformer_layers) =
            transformer_depths(f, n, layers_per_block)?;
        let mid_block = match f.maybe::<Value>("mid_block_type")? {
            None => MidBlockKind::CrossAttn {
                transformer_layers: transformer_layers[n - 1][0],
            },
            Some(Value::Null) => MidBlockKind::None,
            Some(Value::String(t)) if t == "UNetMidBlock2DCrossAttn" => MidBlockKind::CrossAttn {
                // diffusers gives the mid block `transformer_layers_per_block[-1]`, of which
                // its single attention layer takes the first entry.
                transformer_layers: transformer_layers[n - 1][0],
            },
            Some(Value::String(t)) if t == "UNetMidBlock2D" => MidBlockKind::Resnet,
            Some(other) => {
                return Err(f.error("mid_block_type", format!("unsupported value {other}")))
            }
        };
        let blocks = (0..n)
            .map(|i| UNetBlockConfig {
                channels: channels[i],
                cross_attention: cross[i],
                heads: heads[i],
                transformer_layers: transformer_layers[i].clone(),
                up_transformer_layers: up_transformer_layers[n - 1 - i].clone(),
            })
            .collect::<Vec<_>>();
        let norm_num_groups: usize = f.opt("norm_num_groups", 32)?;
        for b in &blocks {
            if norm_num_groups == 0 || b.channels % norm_num_groups != 0 {
                return Err(f.error(
                    "norm_num_groups",
                    format!(
                        "{norm_num_groups} does not divide block channels {}",
                        b.channels
                    ),
                ));
            }
            if b.heads == 0 || b.channels % b.heads != 0 {
                return Err(f.error(
                    "attention_head_dim",
                    format!(
                        "{} heads do not divide block channels {}",
                        b.heads, b.channels
                    ),
                ));
            }
        }
        let cross_attention_dim = match f.maybe::<Value>("cross_attention_dim")? {
            None => 1280,
            Some(Value::Number(x)) => x
                .as_u64()
                .ok_or_else(|| f.error("cross_attention_dim", "not a positive integer"))?
                as usize,
            Some(_) => {
                return Err(f.error("cross_attention_dim", "per-block values are not supported"))
            }
        };
        let conv_in_kernel: usize = f.opt("conv_in_kernel", 3)?;
        let conv_out_kernel: usize = f.opt("conv_out_kernel", 3)?;
        if conv_in_kernel.is_multiple_of(2) {
            return Err(f.error("conv_in_kernel", "must be odd"));
        }
        if conv_out_kernel.is_multiple_of(2) {
            return Err(f.error("conv_out_kernel", "must be odd"));
        }
        let config = Self {
            in_channels: f.opt("in_channels", 4)?,
            out_channels: f.opt("out_channels", 4)?,
            sample_size: f.req("sample_size")?,
            center_input_sample: f.opt("center_input_sample", false)?,
            flip_sin_to_cos: f.opt("flip_sin_to_cos", true)?,
            freq_shift: f.opt("freq_shift", 0.0)?,
            blocks,
            layers_per_block: f.opt("layers_per_block", 2)?,
            downsample_padding: f.opt("downsample_padding", 1)?,
            mid_block_scale_factor: f.opt("mid_block_scale_factor", 1.0)?,
            norm_num_groups,
            norm_eps: f.opt("norm_eps", 1e-5)?,
            cross_attention_dim,
            use_linear_projection: f.opt("use_linear_projection", false)?,
            upcast_attention: f.opt("upcast_attention", false)?,
            conv_in_kernel,
            conv_out_kernel,
            text_time,
            time_cond_proj_dim,
            mid_block,
        };
        config.check_ranges(f)?;
        Ok(config)
    }

    /// Sane ranges of the numbers that size weights and activations (a few times the largest
    /// released models'; SDXL has 1280 channels, 20 heads, 10 layers, 2048 context).
    fn check_ranges(&self, f: &ConfigFile) -> Result<()> {
        f.check_at_most("sample_size", self.sample_size, MAX_LATENT_SIDE)?;
        f.check_at_most("in_channels", self.in_channels, MAX_IO_CHANNELS)?;
        f.check_at_most("out_channels", self.out_channels, MAX_IO_CHANNELS)?;
        f.check_at_most("block_out_channels", self.blocks.len(), MAX_LEVELS)?;
        f.check_at_most("layers_per_block", self.layers_per_block, MAX_LAYERS)?;
        f.check_at_most("cross_attention_dim", self.cross_attention_dim, MAX_WIDTH)?;
        f.check_at_most("conv_in_kernel", self.conv_in_kernel, MAX_KERNEL)?;
        f.check_at_most("conv_out_kernel", self.conv_out_kernel, MAX_KERNEL)?;
        for b in &self.blocks {
            f.check_at_most("block_out_channels", b.channels, MAX_WIDTH)?;
            f.check_at_most("attention_head_dim", b.heads, MAX_HEADS)?;
            for &n in b.transformer_layers.iter().chain(&b.up_transformer_layers) {
                f.check_at_most("transformer_layers_per_block", n, MAX_LAYERS)?;
            }
        }
        if let Some(d) = self.time_cond_proj_dim {
            f.check_at_most("time_cond_proj_dim", d, MAX_WIDTH)?;
        }
        if let Some(tt) = &self.text_time {
            f.check_at_most("addition_time_embed_dim", tt.time_embed_dim, MAX_WIDTH)?;
            f.check_at_most(
                "projection_class_embeddings_input_dim",
                tt.input_dim,
                MAX_WIDTH * 4,
            )?;
        }
        Ok(())
    }

    /// Width of the time embedding (4x the first block's channels, as diffusers).
    pub fn time_embed_dim(&self) -> usize {
        self.blocks[0].channels * 4
    }
}

/// Size conditioning ids of SDXL: original (h, w), crop (top, left), target (h, w).
pub const TIME_IDS: usize = 6;

/// Limits on architecture numbers read from configs (see [`ConfigFile::check_at_most`]).
/// Largest latent side: [`crate::resources::MAX_SIDE`] over the VAE's factor 8.
pub const MAX_LATENT_SIDE: usize = crate::resources::MAX_SIDE / 8;
/// Channels of any layer, and widths of embeddings (SDXL's largest is 2816).
pub const MAX_WIDTH: usize = 16384;
/// Image or latent channels at a model's ends (RGB, 4 or 16 latents).
pub const MAX_IO_CHANNELS: usize = 1024;
/// Resolution levels of a UNet or VAE.
pub const MAX_LEVELS: usize = 8;
/// Layers of one kind in one block.
pub const MAX_LAYERS: usize = 64;
/// Attention heads.
pub const MAX_HEADS: usize = 1024;
/// Convolution kernel side.
pub const MAX_KERNEL: usize = 15;

/// SDXL's added conditioning (`addition_embed_type: "text_time"`): the pooled text embedding
/// and sinusoidal embeddings of the six size ids, projected into the time embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct TextTimeConfig {
    /// Sinusoidal width of each time id (`addition_time_embed_dim`).
    pub time_embed_dim: usize,
    /// Input width of `add_embedding` (`projection_class_embeddings_input_dim`): the pooled
    /// text embedding's width plus 6 x `time_embed_dim`.
    pub input_dim: usize,
}

impl TextTimeConfig {
    /// Width of the pooled text embedding this UNet expects.
    pub fn pooled_dim(&self) -> usize {
        self.input_dim - TIME_IDS * self.time_embed_dim
    }
}

/// Architecture of an `AutoencoderKL`, from `vae/config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub force_upcast: bool,
}

const VAE_KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
];

impl VaeConfig {
    /// Reads `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_config(&ConfigFile::open(path)?)
    }

    /// Builds the config from a parsed file.
    pub fn from_config(f: &ConfigFile) -> Result<Self> {
        f.check_known(VAE_KEYS)?;
        f.expect_one_of("act_fn", &["silu".into()])?;
        f.expect_one_of("latents_mean", &[Value::Null])?;
        f.expect_one_of("latents_std", &[Value::Null])?;
        let block_out_channels: Vec<usize> = f.opt("block_out_channels", vec![64])?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(f.error("block_out_channels", "is empty"));
        }
        for (key, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            let types: Vec<String> = f.opt(key, vec![want.to_string()])?;
            if types.len() != n {
                return Err(f.error(key, format!("has {} entries for {n} blocks", types.len())));
            }
            if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                return Err(f.error(key, format!("unsupported block type {t:?}")));
            }
        }
        let norm_num_groups: usize = f.opt("norm_num_groups", 32)?;
        if let Some(c) = block_out_channels
            .iter()
            .find(|c| norm_num_groups == 0 || **c % norm_num_groups != 0)
        {
            return Err(f.error(
                "norm_num_groups",
                format!("{norm_num_groups} does not divide block channels {c}"),
            ));
        }
        let config = Self {
            in_channels: f.opt("in_channels", 3)?,
            out_channels: f.opt("out_channels", 3)?,
            block_out_channels,
            layers_per_block: f.opt("layers_per_block", 1)?,
            latent_channels: f.opt("latent_channels", 4)?,
            norm_num_groups,
            sample_size: f.opt("sample_size", 32)?,
            // Hub files older than diffusers 0.10 (SD 1.4/1.5) lack the key; diffusers then
            // uses AutoencoderKL's default, which is SD 1.x's factor. We do the same.
            scaling_factor: f.opt("scaling_factor", 0.18215)?,
            shift_factor: f.opt("shift_factor", 0.0)?,
            use_quant_conv: f.opt("use_quant_conv", true)?,
            use_post_quant_conv: f.opt("use_post_quant_conv", true)?,
            mid_block_add_attention: f.opt("mid_block_add_attention", true)?,
            force_upcast: f.opt("force_upcast", true)?,
        };
        f.check_at_most("block_out_channels", n, MAX_LEVELS)?;
        for &c in &config.block_out_channels {
            f.check_at_most("block_out_channels", c, MAX_WIDTH)?;
        }
        f.check_at_most("in_channels", config.in_channels, MAX_IO_CHANNELS)?;
        f.check_at_most("out_channels", config.out_channels, MAX_IO_CHANNELS)?;
        f.check_at_most("latent_channels", config.latent_channels, MAX_IO_CHANNELS)?;
        f.check_at_most("layers_per_block", config.layers_per_block, MAX_LAYERS)?;
        f.check_at_most(
            "sample_size",
            config.sample_size,
            crate::resources::MAX_SIDE,
        )?;
        Ok(config)
    }

    /// Spatial downscaling between image and latents (2^(blocks-1), diffusers' vae_scale_factor).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
