//! Command-line definitions (clap), their conversion into library settings, and the mapping
//! back from the library's setting names to flags for error messages. Range checks that clap
//! can do live here; checks that need the model live in the library, once.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use latent::device::{DeviceSpec, Precision};
use latent::noise::RngKind;
use latent::pipeline::MaskedContent;
use latent::schedulers::SchedulerKind;
use latent::{Error, Setting};

/// Text-to-image generation with latent diffusion (Stable Diffusion 1.x/2.x, SDXL, Turbo, LCM), in Rust.
#[derive(Debug, Parser)]
#[command(name = "latent", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a text prompt.
    Generate(Box<GenerateArgs>),
    /// Generate images from prompt files (plain, AUTOMATIC1111 option lines, or JSONL); resumable.
    Batch(Box<BatchArgs>),
    /// Animate between keyframes (prompts and seeds) by interpolating noise and text; resumable.
    Walk(Box<WalkArgs>),
    /// Time each stage of one generation (load, text encode, UNet step, decode) and peak memory.
    Bench(Box<BenchArgs>),
    /// Serve AUTOMATIC1111's HTTP API (/sdapi/v1) and a web page, keeping the model loaded.
    Serve(Box<ServeArgs>),
    /// Print the generation parameters stored in a PNG made by latent (or AUTOMATIC1111).
    Info {
        /// PNG file(s) to read, or single-file checkpoints (.safetensors) to describe.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Flags that choose and place the model; shared by every command that runs one.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Model: a diffusers folder or a single-file .safetensors checkpoint (any path that
    /// exists; relative to the current folder) or, when no such path exists, a Hugging Face hub
    /// repo id (owner/name). A path starting with ./, ../, / or ~/ is never a hub id. Default:
    /// $LATENT_MODEL, else the bundled model.
    #[arg(short, long)]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) for a hub model.
    #[arg(long)]
    pub revision: Option<String>,
    /// What a single-file checkpoint is: sd1, sd2, sd2-v, sdxl or sdxl-v. Needed for an SD 2.x
    /// file that does not say whether it predicts noise (2.x-base, 512 px) or v (2.1, 768
    /// px); otherwise the family comes from the file's tensor names.
    #[arg(long, value_name = "TYPE")]
    pub model_type: Option<String>,
    /// A diffusers folder or hub repo whose configs and tokenizers describe a single-file
    /// checkpoint, instead of the ones latent infers from its tensors (as diffusers'
    /// from_single_file(config=...)): for checkpoints of unusual shapes.
    #[arg(long, value_name = "PATH_OR_REPO")]
    pub model_config: Option<String>,
    /// Device: auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Precision: auto (f16 on a GPU, f32 on the CPU), f32, f16 or bf16. On a CPU use f32, or
    /// bf16 for half the memory (fastest with AMX or AVX512-BF16); f16 on a CPU is about 4x
    /// slower than f32 (it warns). On a GPU f16, or bf16 where the GPU supports it.
    #[arg(long, default_value = "auto")]
    pub dtype: Precision,
    /// Decode with this VAE instead of the model's: a tiny VAE (AutoencoderTiny: TAESD for
    /// SD 1.x/2.x, TAESDXL for SDXL) or another AutoencoderKL (e.g. the SDXL fp16-fix VAE); a
    /// local folder or hub repo id with config.json and diffusion_pytorch_model.safetensors,
    /// or a single .safetensors VAE file (LDM or diffusers layout).
    #[arg(long, value_name = "PATH_OR_REPO")]
    pub vae: Option<String>,
    /// Textual-inversion embeddings: a folder of .safetensors files (AUTOMATIC1111's or
    /// diffusers' format); a file's name without .safetensors, written in a prompt, stands for
    /// its vectors. Default: $LATENT_EMBEDDINGS_DIR when set.
    #[arg(long, value_name = "DIR", env = "LATENT_EMBEDDINGS_DIR")]
    pub embeddings: Option<std::path::PathBuf>,
    /// A LoRA to merge into the model for every prompt: a .safetensors file (kohya /
    /// AUTOMATIC1111 or diffusers / PEFT format), or a name in --lora-dir, with an optional
    /// weight (default 1). Repeatable. A <lora:NAME:WEIGHT> tag in a prompt overrides the
    /// weight of the same LoRA.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    pub lora: Vec<String>,
    /// Where <lora:NAME:WEIGHT> tags in prompts find NAME.safetensors (or in a folder below).
    /// Default: $LATENT_LORA_DIR when set.
    #[arg(long, value_name = "DIR", env = "LATENT_LORA_DIR")]
    pub lora_dir: Option<std::path::PathBuf>,
}

/// Flags of one sampling run; shared by generate, walk and batch.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// What to leave out of the image.
    #[arg(long = "negative-prompt", visible_alias = "neg", default_value = "")]
    pub negative_prompt: String,
    /// Image width in pixels: a multiple of the model's VAE factor (8 for SD 1.x/2.x/SDXL, 4
    /// for the bundled demo model). Default: the model's native size.
    #[arg(short = 'W', long)]
    pub width: Option<usize>,
    /// Image height in pixels: a multiple of the model's VAE factor (8 for SD 1.x/2.x/SDXL, 4
    /// for the bundled demo model). Default: the model's native size.
    #[arg(short = 'H', long)]
    pub height: Option<usize>,
    /// Denoising steps.
    #[arg(short, long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 skips the unconditional pass.
    #[arg(short, long, visible_alias = "cfg", default_value_t = 7.5)]
    pub guidance: f64,
    /// Scheduler: ddim, pndm, euler, euler-a, dpm++2m, lcm. Default: the model's own
    /// scheduler_config.json (Turbo repos: euler-a or euler, trailing; LCM repos: lcm).
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Use Karras sigmas (euler and dpm++2m, as diffusers; not euler-a).
    #[arg(long)]
    pub karras: bool,
    /// Noise generator: torch reproduces torch.Generator("cpu").manual_seed(seed) + randn.
    #[arg(long, default_value = "torch")]
    pub rng: RngKind,
    /// How prompts are read: a1111 (AUTOMATIC1111's syntax: (word:1.2), [word], BREAK,
    /// [from:to:when], [a|b], prompts longer than 75 tokens in chunks) or plain (the text as
    /// diffusers reads it, cut at 77 tokens).
    #[arg(long, value_name = "SYNTAX", default_value = "a1111", value_parser = parse_syntax)]
    pub prompt_syntax: latent::prompt::PromptSyntax,
    /// AUTOMATIC1111's clip skip: 2 conditions on the text encoder's penultimate layer (SD 1.x
    /// models; others ignore it, as in AUTOMATIC1111).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub clip_skip: usize,
    /// SDXL size conditioning: the size the image should look as if it came from
    /// [default: the image size].
    #[arg(long, value_name = "W,H", help_heading = "SDXL size conditioning")]
    pub original_size: Option<Pair>,
    /// SDXL size conditioning: top-left corner of the crop it should look cut at [default: 0,0].
    #[arg(long, value_name = "X,Y", help_heading = "SDXL size conditioning")]
    pub crop_top_left: Option<Pair>,
    /// SDXL size conditioning: the size it should look made for [default: the image size].
    #[arg(long, value_name = "W,H", help_heading = "SDXL size conditioning")]
    pub target_size: Option<Pair>,
    /// SDXL: --original-size for the negative prompt [default: the prompt's].
    #[arg(long, value_name = "W,H", help_heading = "SDXL size conditioning")]
    pub negative_original_size: Option<Pair>,
    /// SDXL: --crop-top-left for the negative prompt [default: the prompt's].
    #[arg(long, value_name = "X,Y", help_heading = "SDXL size conditioning")]
    pub negative_crop_top_left: Option<Pair>,
    /// SDXL: --target-size for the negative prompt [default: the prompt's].
    #[arg(long, value_name = "W,H", help_heading = "SDXL size conditioning")]
    pub negative_target_size: Option<Pair>,
}

fn parse_syntax(s: &str) -> Result<latent::prompt::PromptSyntax, String> {
    match s {
        "a1111" => Ok(latent::prompt::PromptSyntax::A1111),
        "plain" => Ok(latent::prompt::PromptSyntax::Plain),
        _ => Err(format!("`{s}`: expected a1111 or plain")),
    }
}

/// Two numbers written `A,B` (or `AxB`): a width and height, or an x and y.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair(pub usize, pub usize);

impl std::str::FromStr for Pair {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once(',')
            .or_else(|| s.split_once('x'))
            .ok_or_else(|| format!("`{s}`: expected two numbers as A,B"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}`: `{}` is not a whole number", v.trim()))
        };
        Ok(Pair(num(a)?, num(b)?))
    }
}

impl SamplingArgs {
    /// How prompts are read and encoded.
    pub fn text_options(&self) -> latent::prompt::TextOptions {
        latent::prompt::TextOptions {
            syntax: self.prompt_syntax,
            clip_skip: self.clip_skip,
        }
    }

    /// The SDXL size conditioning these flags ask for.
    pub fn size_conditioning(&self) -> latent::pipeline::SizeConditioning {
        let pair = |p: Option<Pair>| p.map(|Pair(a, b)| (a, b));
        latent::pipeline::SizeConditioning {
            original_size: pair(self.original_size),
            crop_top_left: pair(self.crop_top_left),
            target_size: pair(self.target_size),
            negative_original_size: pair(self.negative_original_size),
            negative_crop_top_left: pair(self.negative_crop_top_left),
            negative_target_size: pair(self.negative_target_size),
        }
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The text prompt.
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Seed of the first image (image i uses seed + i). Random when absent; always recorded.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images.
    #[arg(short = 'n', long = "num-images", default_value_t = 1)]
    pub num_images: usize,
    /// Images per UNet call.
    #[arg(long = "batch-size", default_value_t = 1)]
    pub batch_size: usize,
    /// Every N steps, write the picture so far to one preview file beside the output
    /// (NAME.preview.png, or preview.png in the output folder), replaced atomically so an image
    /// viewer can watch it. Decoded by --vae when that is a tiny VAE, else by a fast
    /// approximation (one colour per latent pixel).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub preview_every: Option<u64>,
    /// Start from these latents instead of noise: .safetensors or .npy of shape
    /// (n, channels, h/f, w/f), f the VAE factor (SD: 4 channels, f = 8).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// img2img: start from this picture (PNG, JPEG or WebP) instead of noise. The size
    /// defaults to the picture's (rounded down to the VAE factor); a picture of another size
    /// than -W/-H is resized.
    #[arg(long, value_name = "FILE", conflicts_with = "latents")]
    pub init_image: Option<PathBuf>,
    /// How much of the init image is redrawn, in (0, 1]: the last strength x steps steps run
    /// (1: from pure noise). Default 0.8, with --mask 1.0 (diffusers' defaults).
    #[arg(long, value_name = "S", requires = "init_image")]
    pub strength: Option<f64>,
    /// Inpainting: redraw the init image where this picture is white (luma of at least half)
    /// and keep it where black. Works with any model; inpainting models (9-channel UNets)
    /// need it.
    #[arg(long, value_name = "FILE", requires = "init_image")]
    pub mask: Option<PathBuf>,
    /// Inpainting: what the masked area starts from (AUTOMATIC1111's "Masked content"): the
    /// picture as it is (original, diffusers' way), the colours around the mask blurred into
    /// it (fill), the initial noise (latent-noise) or zeros (latent-nothing) in the latents.
    #[arg(
        long,
        value_name = "fill|original|latent-noise|latent-nothing",
        default_value = "original",
        requires = "mask"
    )]
    pub masked_content: MaskedContent,
    /// Output PNG file, or folder (default: outputs/).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Replace existing files.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bars or summary.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print one JSON object per image on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Prompt files: .txt (one prompt, or one line of AUTOMATIC1111 options, per line) or .jsonl
    /// (one JSON object per line). `#` comments and blank lines are skipped.
    #[arg(required_unless_present = "merge")]
    pub files: Vec<PathBuf>,
    /// Read every file in this format instead of the one its extension names: text or jsonl.
    #[arg(long)]
    pub format: Option<latent::batch::Format>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Defaults for every line; a line's own options override them.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Run seed: an item without its own seed uses run seed + item index. Default: the one
    /// recorded in the output folder's manifest, else random; always recorded.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images per line, unless the line gives batch_size or n_iter.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub repeat: usize,
    /// Images per UNet call; items with equal width, height, steps, scheduler, Karras flag,
    /// guidance and generator (--rng) share batches (prompts and seeds may differ).
    #[arg(long = "batch-size", default_value_t = 1)]
    pub batch_size: usize,
    /// Output folder (with manifest.jsonl). Default: outputs/<first prompt file's name>.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// File name template; fields: {index}, {seed}, {prompt_slug}, {file}, {line}, {width},
    /// {height}, {steps}; {index:05} pads with zeros.
    #[arg(long, default_value = latent::batch::DEFAULT_TEMPLATE)]
    pub filename: String,
    /// Replace files in the way of unfinished items (normally a clash is an error).
    #[arg(long)]
    pub overwrite: bool,
    /// Validate every line and print the plan (items, groups, estimated time); generate nothing.
    #[arg(long)]
    pub check: bool,
    /// Make at most this many new images, then stop; a later run resumes with the rest.
    #[arg(long, value_name = "N")]
    pub max_images: Option<usize>,
    /// No progress bars, per-image lines or summary (line errors are still printed).
    #[arg(short, long)]
    pub quiet: bool,
    /// Print one JSON object per finished image on stdout (its manifest record plus `path`);
    /// with --check or --merge, their report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// When another latent run holds the output folder, wait for it to end instead of
    /// stopping at once.
    #[arg(long)]
    pub wait: bool,
    /// Make only shard I of N (I from 1): the items whose index is I-1 modulo N, into the
    /// shared output folder with their own manifest. `auto` reads $JOB_COMPLETION_INDEX with
    /// N from `auto/N` or $LATENT_SHARD_COUNT (Kubernetes Indexed Job), or
    /// $SLURM_ARRAY_TASK_ID, $SLURM_ARRAY_TASK_MIN and $SLURM_ARRAY_TASK_COUNT (Slurm array).
    /// Needs --seed unless the folder's manifest records one.
    #[arg(long, value_name = "I/N|auto|auto/N")]
    pub shard: Option<String>,
    /// Merge the shards' manifests in FOLDER into one manifest.jsonl (after all shards ended).
    #[arg(long, value_name = "FOLDER", conflicts_with_all = ["files", "shard", "check"])]
    pub merge: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WalkArgs {
    /// Keyframe file (TOML with [[keyframe]] tables: prompt, seed, frames, optional
    /// negative_prompt and guidance), instead of --prompt/--seed.
    #[arg(conflicts_with_all = ["prompts", "seeds"])]
    pub keyframes: Option<PathBuf>,
    /// Prompt of a keyframe; repeat to walk between prompts.
    #[arg(short = 'p', long = "prompt", value_name = "PROMPT")]
    pub prompts: Vec<String>,
    /// Seed of a keyframe; repeat to walk between seeds. One prompt with several seeds walks the
    /// noise, several prompts with one seed walk the text, equal counts pair up. Default: one
    /// random seed (reused when the same walk is run again).
    #[arg(long = "seed", value_name = "SEED")]
    pub seeds: Vec<u64>,
    /// Frames from each keyframe to the next [default: 24; a keyframe file's own counts win].
    #[arg(long)]
    pub frames: Option<usize>,
    /// Return to the first keyframe, so the animation cycles seamlessly.
    #[arg(long = "loop")]
    pub looped: bool,
    /// Timing within each segment: linear, or smooth (slow at keyframes, fast between).
    #[arg(long, default_value = "linear")]
    pub ease: latent::walk::Ease,
    /// Text embedding interpolation: lerp or slerp (the noise always uses slerp).
    #[arg(long = "text-interp", default_value = "lerp")]
    pub text_interp: latent::walk::Interp,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Frames per UNet call.
    #[arg(long = "batch-size", default_value_t = 1)]
    pub batch_size: usize,
    /// Frames per second of the animations.
    #[arg(long, default_value_t = 12.0)]
    pub fps: f64,
    /// Animation formats besides walk.gif (always written): webp, apng, mp4 (needs ffmpeg).
    /// Repeat or separate with commas.
    #[arg(long = "format", value_delimiter = ',', value_name = "FORMAT")]
    pub formats: Vec<latent::walk::AnimationFormat>,
    /// Walk folder. Default: the newest outputs/walk-N holding this same walk (to resume it),
    /// else a new outputs/walk-N.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Replace a walk folder holding a different walk (or files in the way).
    #[arg(long)]
    pub overwrite: bool,
    /// Wait for another run using the walk folder to finish instead of failing at once.
    #[arg(long)]
    pub wait: bool,
    /// Render a quick draft into <folder>/preview/ (same size, a quarter of the steps, at least
    /// 4) and stop; run again without --preview for the full walk.
    #[arg(long)]
    pub preview: bool,
    /// No progress bar or summary.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print one JSON object per rendered frame, then a summary object, on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Prompt to encode.
    #[arg(default_value = "a photo of an astronaut riding a horse on mars")]
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Seed of the starting noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads (RAYON_NUM_THREADS); default: all cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also time each kind of operation (convolutions, linears, attention, norms, ...) over
    /// the UNet steps and over the decode, with their GFLOP/s (CPU kernels count FLOPs).
    #[arg(long)]
    pub profile: bool,
    /// Keep the text encoder, UNet and VAE loaded together, as `latent batch` and `latent walk`
    /// do (default: one at a time, as `latent generate` does).
    #[arg(long)]
    pub resident: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on. The default answers only this machine; 0.0.0.0:PORT
    /// answers the network (then set --api-auth).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7860")]
    pub listen: std::net::SocketAddr,
    /// Folder of models that clients may switch to with sd_model_checkpoint, besides the
    /// starting model (--model): diffusers folders (with model_index.json) and single-file
    /// .safetensors checkpoints.
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// Require HTTP Basic authentication with user:password (several separated by commas),
    /// as AUTOMATIC1111's flag of the same name.
    #[arg(
        long,
        value_name = "USER:PASS",
        env = "LATENT_API_AUTH",
        hide_env_values = true
    )]
    pub api_auth: Option<String>,
    /// Largest request body in bytes; a larger one is answered 413.
    #[arg(long, value_name = "BYTES", default_value_t = 50 * 1024 * 1024)]
    pub max_body: usize,
    /// Requests that may wait behind the one being generated; more are answered 503.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue: u32,
    /// Folder for the images of requests with save_images: one subfolder per request, with its
    /// manifest.jsonl, as `latent batch` writes.
    #[arg(
        short,
        long,
        value_name = "DIR",
        default_value = "outputs/txt2img-images"
    )]
    pub output: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The flag that sets `setting` on the command line.
pub fn flag(setting: Setting) -> &'static str {
    match setting {
        Setting::Prompt => "the prompt",
        Setting::NegativePrompt => "--negative-prompt",
        Setting::Width => "-W/--width",
        Setting::Height => "-H/--height",
        Setting::Steps => "--steps",
        Setting::Guidance => "--guidance",
        Setting::Scheduler => "--scheduler",
        Setting::Karras => "--karras",
        Setting::Seed => "--seed",
        Setting::NumImages => "-n/--num-images",
        Setting::BatchSize => "--batch-size",
        Setting::Repeat => "-n/--repeat",
        Setting::MaxImages => "--max-images",
        Setting::Latents => "--latents",
        Setting::PreviewEvery => "--preview-every",
        Setting::SizeConditioning => "--original-size/--crop-top-left/--target-size",
        Setting::Frames => "--frames",
        Setting::Fps => "--fps",
        Setting::Format => "--format",
        Setting::FileName => "--filename",
        Setting::Shard => "--shard",
        Setting::Output => "-o/--output",
        Setting::Vae => "--vae",
        Setting::Device => "--device",
        Setting::Model => "--model",
        Setting::Revision => "--revision",
        Setting::Merge => "--merge",
        Setting::PromptSyntax => "--prompt-syntax",
        Setting::ClipSkip => "--clip-skip",
        Setting::Embeddings => "--embeddings",
        Setting::InitImage => "--init-image",
        Setting::Strength => "--strength",
        Setting::Mask => "--mask",
        Setting::Lora => "--lora",
        Setting::LoraDir => "--lora-dir",
        Setting::ModelType => "--model-type",
        Setting::ModelConfig => "--model-config",
        _ => "an option",
    }
}

/// A library error as the command line says it: settings by their flags, with a hint where
/// a flag fixes the problem.
pub fn describe(e: &Error) -> String {
    match e {
        Error::Setting {
            setting,
            value,
            reason,
        } => latent::error::setting_message(flag(*setting), value, reason),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
            format!("{e}; pass --overwrite to replace it")
        }
        Error::InUse { .. } => format!("{e}; pass --wait to wait for it"),
        Error::Occupied { path, reason } => format!(
            "{}: {reason}; pass --overwrite to replace it, or choose another folder with -o",
            path.display()
        ),
        other => other.to_string(),
    }
}
