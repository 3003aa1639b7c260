//! The prompt side: the CLIP tokenizer and text encoder that turn a prompt into embeddings.
//!
//! [`ClipTokenizer`] reproduces what diffusers' `StableDiffusionPipeline` gets from
//! transformers' `CLIPTokenizer`: ids padded to `model_max_length` with the model's pad token,
//! truncated to bos + 75 tokens + eos, and the text lost to truncation for a warning.
//! [`ClipTextModel`] is transformers' `CLIPTextModel` up to `last_hidden_state`, driven by
//! `text_encoder/config.json` (any size, `quick_gelu` or exact `gelu`).
use std::path::{Path, PathBuf};

use candle_core::{DType, Module, Tensor};
use candle_nn::Embedding;
use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::model::layers::{layer_norm, linear, LayerNorm, Linear};
use crate::model::{ConfigFile, Weights};
use crate::{Error, Result, Setting};

/// CLIP's pre-tokenization pattern (as in transformers' CLIPTokenizer): special tokens,
/// contractions, runs of letters, single digits, runs of other non-space characters.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// CLIPTokenizer's defaults, used when the tokenizer config names no such token.
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// The BPE end-of-word marker; transformers replaces it by a space when decoding.
const END_OF_WORD: &str = "</w>";

/// A prompt as token ids for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Exactly `max_length` ids: bos, the prompt's tokens, eos, then the pad id.
    pub ids: Vec<u32>,
    /// The text lost to truncation, decoded as diffusers' warning reports it (lowercased, tokens
    /// separated by spaces); `None` when the prompt fits.
    pub dropped: Option<String>,
}

/// A special token from `tokenizer_config.json` / `special_tokens_map.json`: either a plain
/// string or an AddedToken object.
#[derive(Debug, Clone)]
struct SpecialToken {
    content: String,
    /// Whether the token is matched after normalization (lowercasing); plain strings are not.
    normalized: bool,
}

impl SpecialToken {
    fn plain(content: &str) -> Self {
        Self {
            content: content.to_string(),
            normalized: false,
        }
    }

    fn added(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), true).normalized(self.normalized)
    }
}

/// The CLIP BPE tokenizer of a Stable Diffusion model's `tokenizer/` folder.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer in `dir` (a model's `tokenizer/` folder): `tokenizer.json` when
    /// present, else `vocab.json` + `merges.txt` configured as transformers' CLIPTokenizer. The
    /// pad token and `model_max_length` come from `tokenizer_config.json` (then
    /// `special_tokens_map.json`); bos/eos/unk default to CLIP's `<|startoftext|>` and
    /// `<|endoftext|>` like transformers'.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_optional_json(&config_path)?;
        let map = read_optional_json(&map_path)?;
        if config.is_none() {
            return Err(Error::MissingFile {
                path: config_path,
                hint: " (the tokenizer folder needs tokenizer_config.json for model_max_length)"
                    .into(),
            });
        }
        let json_path = dir.join("tokenizer.json");
        let bpe = if json_path.is_file() {
            BpeSource::Json(json_path)
        } else {
            const HINT: &str =
                " (the tokenizer folder needs tokenizer.json, or vocab.json and merges.txt)";
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            BpeSource::Texts {
                vocab: required_file(&vocab_path, HINT)?,
                merges: required_file(&merges_path, HINT)?,
                vocab_path,
                merges_path,
            }
        };
        Self::build(dir, (&config_path, config), (&map_path, map), bpe)
    }

    /// CLIP's tokenizer as Stable Diffusion's checkpoints use it, from the vocabulary and
    /// merges compiled into the binary (every SD text encoder shares them): 77 ids a prompt,
    /// padded with `pad` (`<|endoftext|>` for OpenAI's CLIP, `!` for OpenCLIP's).
    pub fn builtin(pad: &str) -> Result<Self> {
        let file = |name: &str| {
            crate::demo::FILES
                .iter()
                .find(|(path, _)| *path == name)
                .map(|(_, bytes)| String::from_utf8_lossy(bytes).into_owned())
                .unwrap_or_default()
        };
        let label = Path::new("<built-in CLIP tokenizer>");
        let config = serde_json::json!({ "model_max_length": 77, "pad_token": pad });
        let bpe = BpeSource::Texts {
            vocab: file("tokenizer/vocab.json"),
            merges: file("tokenizer/merges.txt"),
            vocab_path: label.join("vocab.json"),
            merges_path: label.join("merges.txt"),
        };
        Self::build(label, (label, Some(config)), (label, None), bpe)
    }

    /// The tokenizer from its two config files' contents (`tokenizer_config.json` then
    /// `special_tokens_map.json`, each with the path its messages name) and its BPE.
    fn build(
        dir: &Path,
        (config_path, config): (&Path, Option<Value>),
        (map_path, map): (&Path, Option<Value>),
        bpe: BpeSource,
    ) -> Result<Self> {
        let special = |key: &str, default: &str| -> Result<SpecialToken> {
            for (path, json) in [(config_path, &config), (map_path, &map)] {
                if let Some(v) = json.as_ref().and_then(|j| j.get(key)) {
                    if !v.is_null() {
                        return special_token(path, key, v);
                    }
                }
            }
            Ok(SpecialToken::plain(default))
        };
        let bos = special("bos_token", DEFAULT_BOS)?;
        let eos = special("eos_token", DEFAULT_EOS)?;
        let unk = special("unk_token", DEFAULT_EOS)?;
        let pad = special("pad_token", DEFAULT_EOS)?;
        let max_length = match config.as_ref().and_then(|c| c.get("model_max_length")) {
            Some(v) => v
                .as_u64()
                .filter(|&n| (2..=1 << 20).contains(&n))
                .ok_or_else(|| {
                    Error::config(
                        config_path,
                        "model_max_length",
                        format!("expected an integer between 2 and 2^20, found {v}"),
                    )
                })? as usize,
            None => return Err(Error::config(config_path, "model_max_length", "missing")),
        };

        let mut tokenizer = match bpe {
            BpeSource::Json(json_path) => Tokenizer::from_file(&json_path)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", json_path.display())))?,
            BpeSource::Texts {
                vocab,
                merges,
                vocab_path,
                merges_path,
            } => build_clip_tokenizer(
                dir,
                (&vocab_path, &vocab),
                (&merges_path, &merges),
                [&bos, &eos, &unk],
            )?,
        };
        // Padding and truncation are done in `encode`, whatever the file says.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        // transformers registers every special token as an added token, so a literal pad token
        // in a prompt (SD 2.x's `!`) becomes its own token, never part of a BPE word.
        tokenizer
            .add_special_tokens([bos.added(), eos.added(), unk.added(), pad.added()])
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?;

        let id = |t: &SpecialToken, key: &str| {
            tokenizer.token_to_id(&t.content).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: {key} `{}` is not in the vocabulary",
                    dir.display(),
                    t.content
                ))
            })
        };
        Ok(Self {
            bos_id: id(&bos, "bos_token")?,
            eos_id: id(&eos, "eos_token")?,
            pad_id: id(&pad, "pad_token")?,
            max_length,
            tokenizer,
        })
    }

    /// Number of ids per prompt (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The largest id this tokenizer can produce (vocabulary and added tokens), if any.
    pub fn largest_id(&self) -> Option<u32> {
        let n = self.tokenizer.get_vocab_size(true);
        (n > 0).then(|| n as u32 - 1)
    }

    /// Id of the pad token (`<|endoftext|>` 49407 for SD 1.x, `!` 0 for SD 2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The ids of `text` without start and end tokens, however many (AUTOMATIC1111 tokenizes
    /// each weighted run of a prompt this way).
    pub fn ids_of(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The start (bos), end (eos) and pad ids, and the id of `,</w>` when there is one.
    pub fn chunk_tokens(&self) -> crate::prompt::chunks::ChunkTokens {
        crate::prompt::chunks::ChunkTokens {
            start: self.bos_id,
            end: self.eos_id,
            pad: self.pad_id,
            comma: self.tokenizer.token_to_id(",</w>"),
        }
    }

    /// Tokenizes `prompt` into exactly `max_length` ids, reporting what truncation dropped.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::Tokenizer(format!("encoding {prompt:?}: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() < 2 || ids[0] != self.bos_id || ids[ids.len() - 1] != self.eos_id {
            return Err(Error::Tokenizer(
                "the tokenizer does not wrap prompts in bos/eos tokens (tokenizer.json without \
                 CLIP's post_processor?)"
                    .into(),
            ));
        }
        let max = self.max_length;
        let mut dropped = None;
        if ids.len() > max {
            // diffusers decodes the untruncated ids [max - 1 .. len - 1] (all but the final eos).
            let lost = &ids[max - 1..ids.len() - 1];
            let text = self
                .tokenizer
                .decode(lost, false)
                .map_err(|e| Error::Tokenizer(format!("decoding truncated tokens: {e}")))?;
            dropped = Some(text.replace(END_OF_WORD, " ").trim().to_string());
            ids.truncate(max - 1);
            ids.push(self.eos_id);
        }
        ids.resize(max, self.pad_id);
        Ok(TokenizedPrompt { ids, dropped })
    }
}

/// Where a tokenizer's BPE comes from.
enum BpeSource {
    /// A `tokenizer.json`.
    Json(PathBuf),
    /// The texts of `vocab.json` and `merges.txt`, with the paths messages name.
    Texts {
        vocab: String,
        merges: String,
        vocab_path: PathBuf,
        merges_path: PathBuf,
    },
}

/// Reads `path` as JSON if it exists.
fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Json {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn special_token(path: &Path, key: &str, v: &Value) -> Result<SpecialToken> {
    match v {
        Value::String(s) => Ok(SpecialToken::plain(s)),
        Value::Object(o) => match o.get("content").and_then(Value::as_str) {
            Some(content) => Ok(SpecialToken {
                content: content.to_string(),
                normalized: o
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }),
            None => Err(Error::config(path, key, "token object without `content`")),
        },
        other => Err(Error::config(
            path,
            key,
            format!("expected a string or a token object, found {other}"),
        )),
    }
}

fn required_file(path: &Path, hint: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
                hint: hint.to_string(),
            }
        } else {
            Error::io(path, e)
        }
    })
}

/// A tokenizer from `vocab.json` + `merges.txt`, configured as transformers' CLIPTokenizer:
/// NFC, whitespace runs to one space, lowercase; CLIP's split pattern then byte-level
/// characters; BPE with `</w>` marking word ends; bos ... eos around every prompt.
fn build_clip_tokenizer(
    dir: &Path,
    (vocab_path, vocab_text): (&Path, &str),
    (merges_path, merges_text): (&Path, &str),
    [bos, eos, unk]: [&SpecialToken; 3],
) -> Result<Tokenizer> {
    let vocab: std::collections::HashMap<String, u32> =
        serde_json::from_str(vocab_text).map_err(|e| Error::Json {
            path: vocab_path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut merges = Vec::new();
    for (i, line) in merges_text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let (a, b) = line.split_once(' ').ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}:{}: expected two space-separated tokens, found {line:?}",
                merges_path.display(),
                i + 1
            ))
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let tok_err = |e: tokenizers::Error| Error::Tokenizer(format!("{}: {e}", dir.display()));
    let vocab: Vocab = vocab.into_iter().collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.content.clone())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD.to_string())
        .fuse_unk(false)
        .build()
        .map_err(tok_err)?;
    let (bos_id, eos_id) = match (bpe_id(&bpe, &bos.content), bpe_id(&bpe, &eos.content)) {
        (Some(b), Some(e)) => (b, e),
        _ => {
            return Err(Error::Tokenizer(format!(
                "{}: `{}` or `{}` is not in the vocabulary",
                vocab_path.display(),
                bos.content,
                eos.content
            )))
        }
    };
    let normalizer = NormSeq::new(vec![
        NFC.into(),
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(tok_err)?
            .into(),
        Lowercase.into(),
    ]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(tok_err)?;
    let pre_tokenizer = PreSeq::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    let post = RobertaProcessing::new((eos.content.clone(), eos_id), (bos.content.clone(), bos_id))
        .trim_offsets(false)
        .add_prefix_space(false);
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(tok_err)?
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_post_processor(Some(post))
        .with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

fn bpe_id(bpe: &BPE, token: &str) -> Option<u32> {
    use tokenizers::Model;
    bpe.token_to_id(token)
}

/// The activation of the text encoder's MLP (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `quick_gelu`: x * sigmoid(1.702 x) (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// `gelu`: exact, erf-based GELU (OpenCLIP, SD 2.x).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
}

impl ClipActivation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            ClipActivation::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
            ClipActivation::Gelu => xs.gelu_erf()?,
            ClipActivation::GeluTanh => xs.gelu()?,
        })
    }
}

/// The text encoder's architecture, from `text_encoder/config.json` (transformers'
/// `CLIPTextConfig`; keys not listed here are ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    /// transformers' default 1e-5 when the file has none.
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`); transformers' default 512.
    pub projection_dim: usize,
    /// Where the pooled output is read: the first position of this id, or, for the legacy
    /// value 2 that SD-era configs carry, the position of the highest id (CLIP's eos).
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    /// Reads `path` (a `text_encoder/config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_config(&ConfigFile::open(path)?)
    }

    /// The config in `f`.
    pub fn from_config(f: &ConfigFile) -> Result<Self> {
        let positive = |key: &str| -> Result<usize> {
            let n: usize = f.req(key)?;
            if n == 0 {
                return Err(f.error(key, "must be positive"));
            }
            Ok(n)
        };
        let act: String = f.req("hidden_act")?;
        let hidden_act = match act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => ClipActivation::GeluTanh,
            other => {
                return Err(f.error(
                    "hidden_act",
                    format!(
                        "unsupported activation {other:?} (supported: quick_gelu, gelu, gelu_new, \
                         gelu_pytorch_tanh)"
                    ),
                ))
            }
        };
        let config = Self {
            vocab_size: positive("vocab_size")?,
            hidden_size: positive("hidden_size")?,
            intermediate_size: positive("intermediate_size")?,
            num_hidden_layers: positive("num_hidden_layers")?,
            num_attention_heads: positive("num_attention_heads")?,
            max_position_embeddings: positive("max_position_embeddings")?,
            hidden_act,
            layer_norm_eps: f.opt("layer_norm_eps", 1e-5)?,
            projection_dim: f.opt("projection_dim", 512)?,
            eos_token_id: f.opt("eos_token_id", 49407)?,
        };
        // Sane ranges (CLIP ViT-bigG, SDXL's second encoder, has 1280 wide, 32 layers, 20
        // heads, 5120 intermediate, 49408 tokens): these numbers size the weights allocated.
        for (key, value, max) in [
            ("vocab_size", config.vocab_size, 1_000_000),
            ("hidden_size", config.hidden_size, 16384),
            ("intermediate_size", config.intermediate_size, 65536),
            ("num_hidden_layers", config.num_hidden_layers, 256),
            ("num_attention_heads", config.num_attention_heads, 1024),
            (
                "max_position_embeddings",
                config.max_position_embeddings,
                16384,
            ),
            ("projection_dim", config.projection_dim, 16384),
        ] {
            f.check_at_most(key, value, max)?;
        }
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(f.error(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    config.num_attention_heads, config.hidden_size
                ),
            ));
        }
        if config.layer_norm_eps.is_nan() || config.layer_norm_eps <= 0.0 {
            return Err(f.error("layer_norm_eps", "must be positive"));
        }
        Ok(config)
    }
}

/// Causal multi-head self-attention (`self_attn.{q,k,v,out}_proj`).
#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn load(w: &Weights, c: &ClipTextConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: linear(&w.pp("q_proj"), h, h, true)?,
            k_proj: linear(&w.pp("k_proj"), h, h, true)?,
            v_proj: linear(&w.pp("v_proj"), h, h, true)?,
            out_proj: linear(&w.pp("out_proj"), h, h, true)?,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    /// (b, seq, hidden) -> (b, seq, hidden); `mask` is (seq, seq) f32, -inf above the diagonal.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, seq, hidden) = xs.dims3()?;
        let dtype = xs.dtype();
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, seq, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)?)
        };
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Scores, softmax and the weighted sum in f32 whatever the model dtype.
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, seq, hidden))?
            .to_dtype(dtype)?;
        self.out_proj.forward(&out)
    }
}

/// One pre-norm encoder layer: x + attn(ln1(x)), then x + mlp(ln2(x)).
#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipEncoderLayer {
    fn load(w: &Weights, c: &ClipTextConfig) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let f32w = w.with_dtype(DType::F32);
        Ok(Self {
            layer_norm1: layer_norm(&f32w.pp("layer_norm1"), h, c.layer_norm_eps)?,
            self_attn: ClipAttention::load(&w.pp("self_attn"), c)?,
            layer_norm2: layer_norm(&f32w.pp("layer_norm2"), h, c.layer_norm_eps)?,
            fc1: linear(&w.pp("mlp.fc1"), h, i, true)?,
            fc2: linear(&w.pp("mlp.fc2"), i, h, true)?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&norm_f32(&self.layer_norm1, xs)?, mask)?;
        let xs = (xs + h)?;
        let h = self.fc1.forward(&norm_f32(&self.layer_norm2, &xs)?)?;
        let h = self.fc2.forward(&self.act.apply(&h)?)?;
        Ok((xs + h)?)
    }
}

/// Layer norm computed in f32 (weights are kept in f32), result in the input dtype.
fn norm_f32(ln: &LayerNorm, xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    Ok(ln.forward(&xs.to_dtype(DType::F32)?)?.to_dtype(dtype)?)
}

/// What a pipeline reads from the text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipOutput {
    /// `last_hidden_state`: the last layer's output after the final layer norm (SD 1.x/2.x).
    LastHidden,
    /// `hidden_states[-2]`: the penultimate layer's output, without the final layer norm
    /// (SDXL, both encoders).
    Penultimate,
    /// `hidden_states[-n]` through the final layer norm: AUTOMATIC1111's "clip skip" n (1 is
    /// [`ClipOutput::LastHidden`], 2 the penultimate layer).
    Skip(usize),
}

/// The text encoder's outputs for a batch of token ids.
#[derive(Debug, Clone)]
pub struct ClipEncoding {
    /// (b, seq, hidden), as [`ClipOutput`] asked.
    pub hidden: Tensor,
    /// (b, projection_dim): the final-normed hidden state at the eos position through
    /// `text_projection` (`CLIPTextModelWithProjection`'s `text_embeds`); present when the
    /// model was loaded with its projection.
    pub pooled: Option<Tensor>,
}

/// transformers' `CLIPTextModel` (and `CLIPTextModelWithProjection` when loaded with its
/// projection): token + position embeddings, causal pre-norm encoder layers, final layer norm.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads the encoder from `weights` (rooted at the file; tensors under `text_model.`, or
    /// at the top as transformers >= 5.6 saves them), in the weights' dtype on their device.
    /// Layer norms are kept in f32.
    pub fn load(weights: &Weights, config: &ClipTextConfig) -> Result<Self> {
        Self::load_with(weights, config, false)
    }

    /// [`Self::load`], also loading `text_projection.weight` (no bias) when `projection` is set,
    /// as `CLIPTextModelWithProjection` (SDXL's second encoder) has it. The projection stays
    /// in f32: it runs once per prompt.
    pub fn load_with(weights: &Weights, config: &ClipTextConfig, projection: bool) -> Result<Self> {
        let text_projection = if projection {
            Some(linear(
                &weights.with_dtype(DType::F32).pp("text_projection"),
                config.hidden_size,
                config.projection_dim,
                false,
            )?)
        } else {
            None
        };
        // transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` level.
        let flat = !weights.contains("text_model.embeddings.token_embedding.weight")
            && weights.contains("embeddings.token_embedding.weight");
        let w = if flat {
            weights.clone()
        } else {
            weights.pp("text_model")
        };
        let c = config;
        let emb = w.pp("embeddings");
        let token_embedding = Embedding::new(
            emb.get(&[c.vocab_size, c.hidden_size], "token_embedding.weight")?,
            c.hidden_size,
        );
        let position_embedding = emb.get(
            &[c.max_position_embeddings, c.hidden_size],
            "position_embedding.weight",
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(&w.pp(format!("encoder.layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(
            &w.with_dtype(DType::F32).pp("final_layer_norm"),
            c.hidden_size,
            c.layer_norm_eps,
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: c.clone(),
        })
    }

    /// The config the model was loaded with.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids` (b, seq) u32 -> `last_hidden_state` (b, seq, hidden) in f32 (computed in
    /// the model's dtype), after the final layer norm. No padding mask: Stable Diffusion attends over the pad
    /// tokens too (only the causal mask applies).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.encode(input_ids, ClipOutput::LastHidden)?.hidden)
    }

    /// `input_ids` (b, seq) u32 -> the hidden states `output` names (b, seq, hidden) and,
    /// with a projection, the pooled `text_embeds` (b, projection_dim), both f32.
    pub fn encode(&self, input_ids: &Tensor, output: ClipOutput) -> Result<ClipEncoding> {
        self.encode_fixed(input_ids, &[], None, output)
    }

    /// [`Self::encode`] with token embeddings replaced before the position embeddings are
    /// added: `fixes[row]` holds (position, vectors (n, hidden)) pairs, each overwriting the
    /// embeddings from `position` on (cut at the end of the row), as AUTOMATIC1111 places
    /// textual-inversion vectors. `pool_ids`, when given, are the ids the pooled position is
    /// read from instead of `input_ids` (diffusers' added tokens have ids past the vocabulary).
    pub fn encode_fixed(
        &self,
        input_ids: &Tensor,
        fixes: &[Vec<(usize, Tensor)>],
        pool_ids: Option<&[Vec<u32>]>,
        output: ClipOutput,
    ) -> Result<ClipEncoding> {
        let (b, seq) = input_ids.dims2()?;
        let c = &self.config;
        if seq == 0 || seq > c.max_position_embeddings {
            return Err(Error::InvalidInput(format!(
                "text encoder input has {seq} tokens; this encoder takes 1 to {}",
                c.max_position_embeddings
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= c.vocab_size {
            return Err(Error::InvalidInput(format!(
                "token id {max_id} is outside the text encoder's vocabulary of {}",
                c.vocab_size
            )));
        }
        let layers = self.layers.len();
        // hidden_states[k] is the output of the first k layers; hidden_states[-n] is
        // hidden_states[layers + 1 - n].
        let (wanted, normed) = match output {
            ClipOutput::LastHidden => (layers, true),
            ClipOutput::Penultimate => (layers.saturating_sub(1), false),
            ClipOutput::Skip(n) if n >= 1 && n <= layers + 1 => (layers + 1 - n, true),
            ClipOutput::Skip(n) => {
                return Err(Error::setting(
                    Setting::ClipSkip,
                    n,
                    format!(
                        "this text encoder has {layers} layers: at most {}",
                        layers + 1
                    ),
                ))
            }
        };
        let mut tokens = self.token_embedding.forward(&ids)?;
        if fixes.iter().any(|f| !f.is_empty()) {
            let rows = (0..b)
                .map(|i| {
                    let mut row = tokens.get(i)?;
                    for (at, vectors) in fixes.get(i).map_or(&[][..], |f| f.as_slice()) {
                        let n = vectors.dim(0)?.min(seq.saturating_sub(*at));
                        if n == 0 {
                            continue;
                        }
                        let v = vectors.narrow(0, 0, n)?.to_dtype(row.dtype())?;
                        let mut parts = Vec::with_capacity(3);
                        if *at > 0 {
                            parts.push(row.narrow(0, 0, *at)?);
                        }
                        parts.push(v);
                        if at + n < seq {
                            parts.push(row.narrow(0, at + n, seq - at - n)?);
                        }
                        row = Tensor::cat(&parts, 0)?;
                    }
                    Ok(row)
                })
                .collect::<Result<Vec<_>>>()?;
            tokens = Tensor::stack(&rows, 0)?;
        }
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut xs = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(seq, xs.device())?;
        // Layers run only as far as an output needs them: the one asked for, and the last one
        // when the pooled embedding (read from the final-normed last layer) is wanted.
        let run_all = wanted == layers || self.text_projection.is_some();
        let mut picked = None;
        for (k, layer) in self.layers.iter().enumerate() {
            if k == wanted {
                picked = Some(xs.clone());
                if !run_all {
                    break;
                }
            }
            xs = layer.forward(&xs, &mask)?;
        }
        let last = if run_all {
            Some(norm_f32(&self.final_layer_norm, &xs)?.to_dtype(DType::F32)?)
        } else {
            None
        };
        let penultimate = match picked {
            Some(h) if normed => Some(norm_f32(&self.final_layer_norm, &h)?.to_dtype(DType::F32)?),
            Some(h) => Some(h.to_dtype(DType::F32)?),
            None if wanted == layers && !normed => Some(xs.to_dtype(DType::F32)?),
            None => None,
        };
        let pooled = match (&self.text_projection, &last) {
            (Some(proj), Some(last)) => {
                let rows = match pool_ids {
                    Some(p) => p.to_vec(),
                    None => ids.to_vec2::<u32>()?,
                };
                let picked = rows
                    .iter()
                    .enumerate()
                    .map(|(i, row)| last.get(i)?.get(pooled_position(row, c.eos_token_id)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::stack(&picked, 0)?)?)
            }
            _ => None,
        };
        let hidden = penultimate.or(last).ok_or_else(|| {
            Error::InvalidInput("internal error: no text encoder output was computed".into())
        })?;
        debug_assert_eq!(hidden.dims(), &[b, seq, c.hidden_size]);
        Ok(ClipEncoding { hidden, pooled })
    }
}

/// transformers' pooling position: the first occurrence of `eos_token_id`, or of the highest
/// id when the config carries the legacy `eos_token_id` 2 (CLIP's eos is its highest id).
fn pooled_position(ids: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&i| i == max).unwrap_or(0)
    } else {
        ids.iter().position(|&i| i == eos_token_id).unwrap_or(0)
    }
}

/// (seq, seq) f32: 0 on and below the diagonal, -inf above (token i sees tokens 0..=i).
fn causal_mask(seq: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (seq, seq), device)?)
}

/// `text` quoted, cut to its first `max_chars` characters with the count of the rest
/// (`"a b c" … (1234 more characters)`), for warnings that quote user text.
pub fn excerpt(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => format!("{text:?}"),
        Some((cut, _)) => {
            let rest = text[cut..].chars().count();
            format!("{:?} … ({rest} more characters)", &text[..cut])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_the_future() {
        let m = causal_mask(3, &candle_core::Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0], vec![0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
        assert_eq!(m[2], vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn quick_gelu_matches_formula() {
        let x = Tensor::new(&[-2.0f32, 0.0, 1.5], &candle_core::Device::Cpu).unwrap();
        let y = ClipActivation::QuickGelu
            .apply(&x)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (xi, yi) in [-2.0f32, 0.0, 1.5].iter().zip(y) {
            let want = xi / (1.0 + (-1.702 * xi).exp());
            assert!((yi - want).abs() < 1e-6, "{xi}: {yi} vs {want}");
        }
    }

    #[test]
    fn excerpt_caps_long_text() {
        assert_eq!(excerpt("short", 60), "\"short\"");
        let long = "é".repeat(1_000_000);
        let e = excerpt(&long, 60);
        assert!(e.ends_with("… (999940 more characters)"), "{e}");
        assert!(e.chars().count() < 100, "{e}");
    }
}
