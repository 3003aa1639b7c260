//! Encoding prompts in AUTOMATIC1111's way: the texts of one prompt's schedule are chunked,
//! chunk k of every text goes through the text encoder as one batch, each token's hidden state
//! is multiplied by its emphasis weight, and the batch is scaled back to its original mean (the
//! "Original" emphasis of `modules/sd_emphasis.py`); a text's chunks are concatenated.
use candle_core::{DType, Device, Tensor};

use super::attention::{parse_attention, Run};
use super::chunks::{chunk_prompt, Chunk, Slot, CHUNK_TOKENS};
use super::embeddings::Embedding;
use super::PromptSyntax;
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

/// The embeddings of `embeddings` that have vectors for encoder `encoder`, as the chunker
/// finds them by their names' ids.
pub fn slots(
    tokenizer: &ClipTokenizer,
    embeddings: &[Embedding],
    encoder: usize,
) -> Result<Vec<Slot>> {
    embeddings
        .iter()
        .enumerate()
        .filter_map(|(index, e)| {
            let v = e.vectors.get(encoder)?.as_ref()?;
            Some((index, e, v.dims()[0]))
        })
        .map(|(index, e, vectors)| {
            Ok(Slot {
                ids: tokenizer.ids_of(&e.name)?,
                vectors,
                index,
            })
        })
        .collect()
}

/// The chunks of `text` for `tokenizer`: AUTOMATIC1111's, or for plain text one chunk of the
/// first 75 tokens as diffusers cuts them (embedding names take their vectors' slots in both).
pub fn chunks_of(
    tokenizer: &ClipTokenizer,
    text: &str,
    syntax: PromptSyntax,
    slots: &[Slot],
) -> Result<Vec<Chunk>> {
    let runs = match syntax {
        PromptSyntax::A1111 => parse_attention(text).map_err(Error::InvalidInput)?,
        PromptSyntax::Plain => vec![Run::new(text, 1.0)],
    };
    let mut chunks = chunk_prompt(&runs, tokenizer.chunk_tokens(), slots, |s| {
        let mut ids = tokenizer.ids_of(s)?;
        if syntax == PromptSyntax::Plain {
            // Diffusers cuts at the tokenizer's length: one chunk, never full when a token
            // arrives, so the comma rule never applies (an embedding that would cross the cut
            // is left out).
            ids.truncate(CHUNK_TOKENS);
        }
        Ok(ids)
    })?;
    if syntax == PromptSyntax::Plain {
        chunks.truncate(1);
    }
    Ok(chunks)
}

/// Encodes `texts` together with encoder number `index` of the model, as AUTOMATIC1111 encodes
/// the texts of one prompt's schedule: texts with fewer chunks are filled with empty chunks for
/// the batch (and keep only their own chunks in the result); textual-inversion vectors replace
/// their slots' token embeddings.
#[allow(clippy::too_many_arguments)]
pub fn encode_texts(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextModel,
    index: usize,
    output: ClipOutput,
    texts: &[String],
    syntax: PromptSyntax,
    embeddings: &[Embedding],
    device: &Device,
) -> Result<Vec<Encoded>> {
    let slots = slots(tokenizer, embeddings, index)?;
    let chunked = texts
        .iter()
        .map(|t| chunks_of(tokenizer, t, syntax, &slots))
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
        let fixes: Vec<Vec<(usize, Tensor)>> = batch
            .iter()
            .map(|c| {
                c.fixes
                    .iter()
                    .filter_map(|&(at, e)| {
                        let v = embeddings.get(e)?.vectors.get(index)?.as_ref()?;
                        Some((at, v.clone()))
                    })
                    .collect()
            })
            .collect();
        let ids = Tensor::from_vec(ids, (batch.len(), width), device)?;
        let weights = Tensor::from_vec(weights, (batch.len(), width, 1), device)?;
        // Diffusers gives each embedding vector a new token id past the vocabulary, in load
        // order, and transformers' legacy pooling reads the highest id: pool at those ids.
        let pool_ids: Option<Vec<Vec<u32>>> = (syntax == PromptSyntax::Plain
            && batch.iter().any(|c| !c.fixes.is_empty()))
        .then(|| {
            batch
                .iter()
                .map(|c| {
                    let mut row = c.ids.clone();
                    for &(at, e) in &c.fixes {
                        let first = added_id(tokenizer, embeddings, e, index);
                        for (j, id) in row
                            .iter_mut()
                            .skip(at)
                            .take(embeddings[e].len())
                            .enumerate()
                        {
                            *id = first + j as u32;
                        }
                    }
                    row
                })
                .collect()
        });
        let out = encoder.encode_fixed(&ids, &fixes, pool_ids.as_deref(), output)?;
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

/// The token id diffusers' `load_textual_inversion` gives the first vector of embedding `e`
/// when the embeddings are loaded in order: the first id past the tokenizer's, then on.
fn added_id(tokenizer: &ClipTokenizer, embeddings: &[Embedding], e: usize, encoder: usize) -> u32 {
    let before: usize = embeddings[..e]
        .iter()
        .filter(|x| x.vectors.get(encoder).is_some_and(Option::is_some))
        .map(Embedding::len)
        .sum();
    tokenizer.largest_id().map_or(0, |m| m + 1) + before as u32
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
