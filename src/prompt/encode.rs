//! Encoding prompts in AUTOMATIC1111's way: the texts of one prompt's schedule are chunked,
//! chunk k of every text goes through the text encoder as one batch, each token's hidden state
//! is multiplied by its emphasis weight, and the batch is scaled back to its original mean (the
//! "Original" emphasis of `modules/sd_emphasis.py`); a text's chunks are concatenated.
use candle_core::{DType, Device, Tensor};

use super::attention::parse_attention;
use super::chunks::{chunk_prompt, Chunk, CHUNK_TOKENS};
use crate::text::{ClipOutput, ClipTextModel, ClipTokenizer};
use crate::{Error, Result};

/// One text's encoding by one text encoder.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// (1, 77 * chunks, hidden), f32.
    pub hidden: Tensor,
    /// (1, projection_dim) from the first chunk, when the encoder has a projection.
    pub pooled: Option<Tensor>,
}

/// The chunks of `text` for `tokenizer`; a malformed emphasis weight is an error naming it.
pub fn chunks_of(tokenizer: &ClipTokenizer, text: &str) -> Result<Vec<Chunk>> {
    let runs = parse_attention(text).map_err(Error::InvalidInput)?;
    chunk_prompt(&runs, tokenizer.chunk_tokens(), |s| tokenizer.ids_of(s))
}

/// Encodes `texts` together with one encoder, as AUTOMATIC1111 encodes the texts of one
/// prompt's schedule: texts with fewer chunks are filled with empty chunks for the batch (and
/// keep only their own chunks in the result).
pub fn encode_texts(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextModel,
    output: ClipOutput,
    texts: &[String],
    device: &Device,
) -> Result<Vec<Encoded>> {
    let chunked = texts
        .iter()
        .map(|t| chunks_of(tokenizer, t))
        .collect::<Result<Vec<_>>>()?;
    let count = chunked.iter().map(Vec::len).max().unwrap_or(0);
    let empty = Chunk::empty(tokenizer.chunk_tokens());
    let width = CHUNK_TOKENS + 2;
    let mut hidden: Vec<Vec<Tensor>> = vec![Vec::new(); texts.len()];
    let mut pooled: Vec<Option<Tensor>> = vec![None; texts.len()];
    for k in 0..count {
        let batch: Vec<&Chunk> = chunked.iter().map(|c| c.get(k).unwrap_or(&empty)).collect();
        let ids: Vec<u32> = batch.iter().flat_map(|c| c.ids.iter().copied()).collect();
        let weights: Vec<f32> = batch
            .iter()
            .flat_map(|c| c.weights.iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, (batch.len(), width), device)?;
        let weights = Tensor::from_vec(weights, (batch.len(), width, 1), device)?;
        let out = encoder.encode(&ids, output)?;
        let z = emphasize(&out.hidden.to_dtype(DType::F32)?, &weights)?;
        for (i, chunks) in chunked.iter().enumerate() {
            if k < chunks.len() {
                hidden[i].push(z.narrow(0, i, 1)?);
            }
            if k == 0 {
                pooled[i] = out.pooled.as_ref().map(|p| p.narrow(0, i, 1)).transpose()?;
            }
        }
    }
    hidden
        .into_iter()
        .zip(pooled)
        .map(|(parts, pooled)| {
            Ok(Encoded {
                hidden: Tensor::cat(&parts, 1)?,
                pooled,
            })
        })
        .collect()
}

/// `z * weights`, scaled so that its mean over the whole batch is the mean of `z`. Weights of 1
/// leave `z` exactly as it was.
fn emphasize(z: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let original = z.mean_all()?.to_scalar::<f32>()?;
    let weighted = z.broadcast_mul(weights)?;
    let new = weighted.mean_all()?.to_scalar::<f32>()?;
    if original == new {
        return Ok(weighted);
    }
    Ok((weighted * f64::from(original / new))?)
}
