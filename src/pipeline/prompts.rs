//! Stage 1 with a prompt syntax: plain text as diffusers reads it, or AUTOMATIC1111's syntax
//! (emphasis, chunks of 75 tokens, clip skip, prompt editing and alternation per step).
use candle_core::Tensor;

use super::{Event, StableDiffusion};
use crate::conditioning::{PromptEmbeddings, StepSchedule, TextConditioning};
use crate::prompt::encode::encode_texts;
use crate::prompt::{schedule, PromptSyntax, TextOptions};
use crate::text::{ClipActivation, ClipOutput, ClipTextModel};
use crate::{Error, Result, Setting};

impl StableDiffusion {
    /// Width of each text encoder's token embeddings, in the model's order.
    pub fn text_hidden_sizes(&self) -> Vec<usize> {
        self.text.iter().map(|t| t.config.hidden_size).collect()
    }

    /// Reads the textual-inversion embeddings in `dir` (every `.safetensors` file; the stem is
    /// the name a prompt uses) and keeps them for every later prompt; returns their names.
    pub fn load_embeddings(&mut self, dir: &std::path::Path) -> Result<Vec<String>> {
        let found = crate::prompt::embeddings::load_dir(dir, &self.text_hidden_sizes())?;
        let names = found.iter().map(|e| e.name.clone()).collect();
        self.embeddings = found;
        Ok(names)
    }

    /// The loaded embeddings.
    pub fn embeddings(&self) -> &[crate::prompt::embeddings::Embedding] {
        &self.embeddings
    }

    /// Whether AUTOMATIC1111 applies clip skip to this model: SD 1.x's OpenAI CLIP encoder
    /// (not OpenCLIP, not SDXL, where the option leaves the conditioning as it is).
    pub fn supports_clip_skip(&self) -> bool {
        matches!(self.text.as_slice(), [one] if one.output == ClipOutput::LastHidden
            && one.config.hidden_act == ClipActivation::QuickGelu)
    }

    /// Checks `text` against the model before any work: clip skip from 1 to the encoder's
    /// layers + 1.
    pub fn check_text_options(&self, text: &TextOptions) -> Result<()> {
        let layers = self.text.first().map_or(0, |t| t.config.num_hidden_layers);
        if text.clip_skip == 0 || text.clip_skip > layers.max(1) {
            return Err(Error::setting(
                Setting::ClipSkip,
                text.clip_skip,
                format!("must be between 1 and {} for this model", layers.max(1)),
            ));
        }
        Ok(())
    }

    /// Stage 1 for `text`'s syntax over `steps` sampling steps. Plain text is
    /// [`Self::encode_prompt`] (with clip skip where it applies); AUTOMATIC1111's syntax
    /// encodes each prompt's schedule as AUTOMATIC1111 does and returns the conditioning of
    /// every step.
    pub fn encode_prompt_with(
        &self,
        prompt: &str,
        negative_prompt: &str,
        guidance: f64,
        text: &TextOptions,
        steps: usize,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<PromptEmbeddings> {
        self.check_text_options(text)?;
        // `<lora:...>` tags are taken out of the prompt and switch the model to its LoRAs.
        let (prompt, loras) = self.prompt_loras(prompt)?;
        self.use_loras(&loras)?;
        let prompt = prompt.as_str();
        let skip = if text.clip_skip > 1 && !self.supports_clip_skip() {
            on_event(Event::Warning(format!(
                "clip skip {} has no effect on this model (AUTOMATIC1111 applies it to SD 1.x \
                 models only)",
                text.clip_skip
            )));
            1
        } else {
            text.clip_skip
        };
        if text.syntax == PromptSyntax::Plain && skip == 1 && self.embeddings.is_empty() {
            return self.encode_prompt(prompt, negative_prompt, guidance, on_event);
        }
        let encoders = self.text_encoder(on_event)?;
        let cond = self.encode_schedule(&encoders, prompt, text.syntax, skip, steps)?;
        let uncond = if !self.uses_cfg(guidance) {
            None
        } else if negative_prompt.is_empty() && self.force_zeros_for_empty_prompt {
            // AUTOMATIC1111 (like diffusers) zeroes SDXL's empty negative prompt: the
            // conditioning of an empty prompt, one chunk long, all zeros.
            let first = &cond[0].1;
            let tokens = first.tokens()?.min(crate::prompt::chunks::CHUNK_TOKENS + 2);
            Some(vec![(
                steps as i64,
                TextConditioning {
                    context: first.context.narrow(1, 0, tokens)?.zeros_like()?,
                    pooled: first.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
                },
            )])
        } else {
            Some(self.encode_schedule(&encoders, negative_prompt, text.syntax, skip, steps)?)
        };
        let first_cond = cond[0].1.clone();
        let first_uncond = uncond.as_ref().map(|u| u[0].1.clone());
        let changes = cond.len() > 1 || uncond.as_ref().is_some_and(|u| u.len() > 1);
        Ok(PromptEmbeddings {
            cond: first_cond,
            uncond: first_uncond,
            schedule: changes.then(|| StepSchedule {
                cond,
                uncond: uncond.unwrap_or_default(),
            }),
        })
    }

    /// One prompt's schedule, each entry's text encoded by every encoder (hidden states side
    /// by side, the pooled embedding from the projecting encoder).
    fn encode_schedule(
        &self,
        encoders: &[ClipTextModel],
        prompt: &str,
        syntax: PromptSyntax,
        clip_skip: usize,
        steps: usize,
    ) -> Result<Vec<(i64, TextConditioning)>> {
        let entries = match syntax {
            PromptSyntax::A1111 => schedule(prompt, steps),
            PromptSyntax::Plain => vec![crate::prompt::Scheduled {
                until: steps as i64,
                text: prompt.to_string(),
            }],
        };
        let texts: Vec<String> = entries.iter().map(|e| e.text.clone()).collect();
        let mut hidden: Vec<Vec<Tensor>> = vec![Vec::new(); texts.len()];
        let mut pooled: Vec<Option<Tensor>> = vec![None; texts.len()];
        for (k, (files, encoder)) in self.text.iter().zip(encoders).enumerate() {
            let output = if clip_skip > 1 {
                ClipOutput::Skip(clip_skip)
            } else {
                files.output
            };
            let encoded = encode_texts(
                &files.tokenizer,
                encoder,
                k,
                output,
                &texts,
                syntax,
                &self.embeddings,
                &self.device,
            )?;
            for (i, e) in encoded.into_iter().enumerate() {
                hidden[i].push(e.hidden);
                if files.projection {
                    pooled[i] = e.pooled;
                }
            }
        }
        entries
            .iter()
            .zip(hidden.into_iter().zip(pooled))
            .map(|(entry, (mut parts, pooled))| {
                let context = if parts.len() == 1 {
                    parts.remove(0)
                } else {
                    Tensor::cat(&parts, 2)?
                };
                Ok((entry.until, TextConditioning { context, pooled }))
            })
            .collect()
    }
}
