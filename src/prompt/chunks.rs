//! A weighted prompt as the text encoder sees it in AUTOMATIC1111: chunks of 75 tokens, each
//! wrapped in its own start and end token (77 in all), with one emphasis weight per token.
//!
//! As `tokenize_line` in AUTOMATIC1111's `modules/sd_hijack_clip.py`: each run of equal weight
//! is tokenized alone (no start/end tokens); `BREAK` closes the chunk; a chunk that is full when
//! a token (other than a comma) arrives moves the words after its last comma into the next
//! chunk when that comma is at most 20 tokens back (the `comma_padding_backtrack` default); a
//! short chunk is filled with end tokens. A prompt always gives at least one chunk.
use super::attention::Run;
use crate::Result;

/// Prompt tokens per chunk, between the start and end tokens.
pub const CHUNK_TOKENS: usize = 75;
/// AUTOMATIC1111's `comma_padding_backtrack` default.
const COMMA_BACKTRACK: usize = 20;

/// The token ids a chunk is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTokens {
    pub start: u32,
    pub end: u32,
    /// The padding after the first end token (`end` for SD 1.x, `!` 0 for OpenCLIP models).
    pub pad: u32,
    /// `,</w>`, when the vocabulary has it.
    pub comma: Option<u32>,
}

/// One chunk: `CHUNK_TOKENS + 2` ids and their emphasis weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// Textual-inversion vectors to place: (position in `ids`, embedding index).
    pub fixes: Vec<(usize, usize)>,
}

/// An embedding as the chunker finds it: the token ids of its name and the slots it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub ids: Vec<u32>,
    pub vectors: usize,
    /// The embedding's index, reported in [`Chunk::fixes`].
    pub index: usize,
}

/// The embedding whose name's ids start `tokens` (the longest such name), as AUTOMATIC1111's
/// `find_embedding_at_position`.
fn slot_at<'a>(slots: &'a [Slot], tokens: &[u32]) -> Option<&'a Slot> {
    slots
        .iter()
        .filter(|s| !s.ids.is_empty() && tokens.starts_with(&s.ids))
        .max_by_key(|s| s.ids.len())
}

impl Chunk {
    /// The chunk of an empty prompt: start, then end tokens (then padding).
    pub fn empty(t: ChunkTokens) -> Chunk {
        Builder::new(t).close(Vec::new(), Vec::new(), Vec::new())
    }
}

/// Collects one chunk's tokens.
struct Builder {
    t: ChunkTokens,
}

impl Builder {
    fn new(t: ChunkTokens) -> Self {
        Self { t }
    }

    /// Fills `ids` up to 75 with end tokens, wraps them in start/end, and pads after the
    /// first end token (AUTOMATIC1111 does this last step when it encodes the chunk).
    fn close(&self, mut ids: Vec<u32>, mut weights: Vec<f32>, fixes: Vec<(usize, usize)>) -> Chunk {
        ids.resize(CHUNK_TOKENS, self.t.end);
        weights.resize(CHUNK_TOKENS, 1.0);
        let mut all = Vec::with_capacity(CHUNK_TOKENS + 2);
        all.push(self.t.start);
        all.extend(ids);
        all.push(self.t.end);
        if self.t.pad != self.t.end {
            if let Some(first_end) = all.iter().position(|&id| id == self.t.end) {
                for id in &mut all[first_end + 1..] {
                    *id = self.t.pad;
                }
            }
        }
        let mut w = Vec::with_capacity(CHUNK_TOKENS + 2);
        w.push(1.0);
        w.extend(weights);
        w.push(1.0);
        // Positions count the start token.
        let fixes = fixes.into_iter().map(|(at, i)| (at + 1, i)).collect();
        Chunk {
            ids: all,
            weights: w,
            fixes,
        }
    }
}

/// The chunks of a parsed prompt; `tokenize` gives a text's ids without start/end tokens;
/// `slots` are the embeddings a prompt may name (a name takes its vectors' slots, filled with
/// id 0 and the run's weight, in one chunk; AUTOMATIC1111 leaves the vectors of an embedding
/// that the comma rule moves to the next chunk where they were, and so does this).
pub fn chunk_prompt(
    runs: &[Run],
    t: ChunkTokens,
    slots: &[Slot],
    mut tokenize: impl FnMut(&str) -> Result<Vec<u32>>,
) -> Result<Vec<Chunk>> {
    let b = Builder::new(t);
    let mut chunks = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut weights: Vec<f32> = Vec::new();
    let mut fixes: Vec<(usize, usize)> = Vec::new();
    // Position of the last comma in the current chunk.
    let mut last_comma: Option<usize> = None;
    macro_rules! next_chunk {
        () => {{
            chunks.push(b.close(
                std::mem::take(&mut ids),
                std::mem::take(&mut weights),
                std::mem::take(&mut fixes),
            ));
            last_comma = None;
        }};
    }
    for run in runs {
        if run.is_break() {
            next_chunk!();
            continue;
        }
        let weight = run.weight as f32;
        let tokens = tokenize(&run.text)?;
        let mut position = 0;
        while position < tokens.len() {
            let token = tokens[position];
            if Some(token) == t.comma {
                last_comma = Some(ids.len());
            } else if ids.len() == CHUNK_TOKENS {
                if let Some(comma) = last_comma.filter(|&c| ids.len() - c <= COMMA_BACKTRACK) {
                    let moved_ids = ids.split_off(comma + 1);
                    let moved_weights = weights.split_off(comma + 1);
                    next_chunk!();
                    ids = moved_ids;
                    weights = moved_weights;
                }
            }
            if ids.len() == CHUNK_TOKENS {
                next_chunk!();
            }
            match slot_at(slots, &tokens[position..]) {
                None => {
                    ids.push(token);
                    weights.push(weight);
                    position += 1;
                }
                Some(slot) => {
                    if ids.len() + slot.vectors > CHUNK_TOKENS {
                        next_chunk!();
                    }
                    fixes.push((ids.len(), slot.index));
                    ids.extend(std::iter::repeat_n(0, slot.vectors));
                    weights.extend(std::iter::repeat_n(weight, slot.vectors));
                    position += slot.ids.len();
                }
            }
        }
    }
    if !ids.is_empty() || chunks.is_empty() {
        chunks.push(b.close(ids, weights, fixes));
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::parse_attention;

    const T: ChunkTokens = ChunkTokens {
        start: 1000,
        end: 1001,
        pad: 1001,
        comma: Some(44),
    };

    /// Each character is a token: `,` is the comma, letters their code.
    fn chunks(prompt: &str) -> Vec<Chunk> {
        chunk_prompt(&parse_attention(prompt).unwrap(), T, &[], |s| {
            Ok(s.chars()
                .filter(|c| !c.is_whitespace())
                .map(|c| c as u32)
                .collect())
        })
        .unwrap()
    }

    #[test]
    fn short_prompt_is_one_padded_chunk() {
        let c = chunks("ab");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ids.len(), 77);
        assert_eq!(&c[0].ids[..4], &[1000, 97, 98, 1001]);
        assert!(c[0].ids[3..].iter().all(|&i| i == 1001));
        assert_eq!(chunks("").len(), 1);
    }

    #[test]
    fn weights_follow_tokens_and_break_closes_a_chunk() {
        let c = chunks("a (b:1.5) BREAK c");
        assert_eq!(c.len(), 2);
        assert_eq!(&c[0].weights[..4], &[1.0, 1.0, 1.5, 1.0]);
        assert_eq!(c[1].ids[1], 'c' as u32);
    }

    #[test]
    fn long_prompt_moves_words_after_a_near_comma() {
        // 70 letters, a comma, 10 letters: the comma is 4 back from the 75th token when the
        // 76th arrives, so the 4 letters after it move to chunk 2.
        let prompt = format!("{},{}", "a".repeat(70), "b".repeat(10));
        let c = chunks(&prompt);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids[71], 44);
        assert_eq!(c[0].ids[72], 1001);
        assert_eq!(&c[1].ids[1..11], &[98; 10]);
        // Without a comma: a hard cut at 75.
        let c = chunks(&"a".repeat(80));
        assert_eq!(c[0].ids[75], 97);
        assert_eq!(&c[1].ids[1..6], &[97; 5]);
    }

    #[test]
    fn open_clip_pads_after_the_first_end_token() {
        let t = ChunkTokens { pad: 0, ..T };
        let c = chunk_prompt(&parse_attention("a").unwrap(), t, &[], |_| Ok(vec![5])).unwrap();
        assert_eq!(&c[0].ids[..4], &[1000, 5, 1001, 0]);
        assert_eq!(c[0].ids[76], 0);
    }
}
