//! Which pipeline a model folder is for (`model_index.json`'s `_class_name`), and what that
//! family reads from its text encoders.
use crate::text::ClipOutput;

/// The pipeline families `latent` runs, from `model_index.json`'s `_class_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionPipeline` (SD 1.x, 2.x, SD-Turbo) and
    /// `LatentConsistencyModelPipeline` (LCM-distilled SD 1.x): one CLIP text encoder, its
    /// last hidden state.
    StableDiffusion,
    /// `StableDiffusionXLPipeline` (SDXL, SDXL-Turbo, SSD-1B, Vega, LCM-SDXL): two text
    /// encoders' penultimate hidden states side by side, the second's pooled projection and
    /// the size ids as added conditioning.
    StableDiffusionXl,
}

impl Family {
    /// The family of a diffusers pipeline class, if `latent` runs it.
    pub fn from_pipeline_class(class: &str) -> Option<Self> {
        match class {
            "StableDiffusionPipeline" | "LatentConsistencyModelPipeline" => {
                Some(Family::StableDiffusion)
            }
            "StableDiffusionXLPipeline" => Some(Family::StableDiffusionXl),
            _ => None,
        }
    }

    /// Short name for metadata and messages ("SD", "SDXL").
    pub fn name(self) -> &'static str {
        match self {
            Family::StableDiffusion => "SD",
            Family::StableDiffusionXl => "SDXL",
        }
    }

    /// The text encoder folders of the family and what the pipeline reads from each:
    /// (folder, tokenizer folder, hidden states, pooled projection).
    pub(crate) fn encoders(self) -> &'static [(&'static str, &'static str, ClipOutput, bool)] {
        match self {
            Family::StableDiffusion => {
                &[("text_encoder", "tokenizer", ClipOutput::LastHidden, false)]
            }
            Family::StableDiffusionXl => &[
                ("text_encoder", "tokenizer", ClipOutput::Penultimate, false),
                (
                    "text_encoder_2",
                    "tokenizer_2",
                    ClipOutput::Penultimate,
                    true,
                ),
            ],
        }
    }
}

/// Pipeline classes whose `model_index.json` we can run (for messages).
pub(crate) const PIPELINE_CLASSES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "LatentConsistencyModelPipeline",
];
