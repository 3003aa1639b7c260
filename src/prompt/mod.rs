//! AUTOMATIC1111's prompt syntax, parsed and encoded exactly as AUTOMATIC1111 does: emphasis and
//! `BREAK` ([`attention`]), prompt editing and alternation ([`schedule`]), chunks of 75 tokens
//! ([`chunks`]) and their encoding with the emphasis applied ([`encode`]).
pub mod attention;
pub mod chunks;
pub mod embeddings;
pub mod encode;
pub mod schedule;

pub use attention::{parse_attention, Run};
pub use schedule::{schedule, Scheduled};

/// How a prompt's text is read.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    /// AUTOMATIC1111's: emphasis, `BREAK`, chunks of 75 tokens, prompt editing, alternation.
    #[default]
    A1111,
    /// The text as diffusers reads it: literal, cut at the tokenizer's length.
    Plain,
}

impl PromptSyntax {
    /// The name on the command line and in parameters.
    pub fn name(self) -> &'static str {
        match self {
            PromptSyntax::A1111 => "a1111",
            PromptSyntax::Plain => "plain",
        }
    }
}

/// How prompts are turned into conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextOptions {
    pub syntax: PromptSyntax,
    /// AUTOMATIC1111's "clip skip": 1 reads the last layer, 2 the penultimate (through the final
    /// layer norm). Applies to SD 1.x models, as in AUTOMATIC1111; 1 elsewhere.
    pub clip_skip: usize,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self {
            syntax: PromptSyntax::A1111,
            clip_skip: 1,
        }
    }
}

/// Checks that AUTOMATIC1111's syntax can read `prompt` and `negative_prompt` (an emphasis
/// weight such as `(a:1.2.3)` that is not a number is the one thing it refuses), before any
/// work; plain text always reads.
pub fn check_prompts(
    prompt: &str,
    negative_prompt: &str,
    text: &TextOptions,
    steps: usize,
) -> crate::Result<()> {
    if text.syntax == PromptSyntax::Plain {
        return Ok(());
    }
    for (setting, p) in [
        (crate::Setting::Prompt, prompt),
        (crate::Setting::NegativePrompt, negative_prompt),
    ] {
        for entry in schedule(p, steps.max(1)) {
            if let Err(reason) = parse_attention(&entry.text) {
                return Err(crate::Error::setting(
                    setting,
                    crate::text::excerpt(p, 60),
                    reason,
                ));
            }
        }
    }
    Ok(())
}
