//! LoRAs on a model: the set given for every prompt, `<lora:NAME:WEIGHT>` tags in a prompt,
//! and switching the loaded text encoders and UNet to a set (they load again, from their files,
//! with the set's deltas merged; see `crate::lora`).
use std::path::{Path, PathBuf};

use super::StableDiffusion;
use crate::lora::{self, Component, LoraSpec, ModuleIndex};
use crate::model::Weights;
use crate::Result;

/// The LoRA settings of a model: the folder tags are looked up in and the LoRAs every prompt
/// gets.
#[derive(Debug, Clone, Default)]
pub struct LoraSettings {
    /// Where `<lora:NAME>` finds `NAME.safetensors`.
    pub dir: Option<PathBuf>,
    /// LoRAs for every prompt (a tag naming the same file overrides its weight).
    pub base: Vec<LoraSpec>,
}

impl StableDiffusion {
    /// The modules of the model's text encoders and UNet, from their files' headers.
    fn lora_indexes(&self) -> Result<Vec<(Component, ModuleIndex)>> {
        let cpu = candle_core::Device::Cpu;
        let mut out = Vec::with_capacity(self.text.len() + 1);
        for (i, t) in self.text.iter().enumerate() {
            let w = Weights::open_at(&t.path, &cpu, candle_core::DType::F32)?;
            out.push((
                Component::TextEncoder(i),
                ModuleIndex::new(Component::TextEncoder(i), w.tensors()),
            ));
        }
        let w = Weights::open_at(&self.unet_path, &cpu, candle_core::DType::F32)?;
        out.push((
            Component::UNet,
            ModuleIndex::new(Component::UNet, w.tensors()),
        ));
        Ok(out)
    }

    /// Sets the folder `<lora:NAME>` tags are looked up in (`NAME.safetensors` there or in a
    /// folder below).
    pub fn set_lora_dir(&mut self, dir: Option<PathBuf>) {
        self.lora.dir = dir;
    }

    /// The folder `<lora:NAME>` tags are looked up in.
    pub fn lora_dir(&self) -> Option<&Path> {
        self.lora.dir.as_deref()
    }

    /// Sets the LoRAs every prompt gets, checks each file against the model now, and switches
    /// to them (the text encoders and UNet load again where their deltas changed).
    pub fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<()> {
        for spec in loras {
            self.lora_file(&spec.path)?;
        }
        self.lora.base = loras.to_vec();
        let (_, specs) = lora::for_prompt("", None, &self.lora.base)?;
        self.use_loras(&specs)
    }

    /// The LoRAs every prompt gets.
    pub fn base_loras(&self) -> &[LoraSpec] {
        &self.lora.base
    }

    /// The LoRAs merged into the components now (sorted).
    pub fn active_loras(&self) -> Vec<LoraSpec> {
        self.lock().lora.specs().to_vec()
    }

    /// Reads (once) and checks the LoRA at `path` against this model.
    pub fn lora_file(&self, path: &Path) -> Result<std::sync::Arc<lora::LoraFile>> {
        self.lock().lora.file(path, &|| self.lora_indexes())
    }

    /// The text of `prompt` without its `<lora:...>` tags, and the LoRAs it asks for (its tags
    /// and the model's base set), each file read and checked against the model: what a run
    /// checks before work.
    pub fn prompt_loras(&self, prompt: &str) -> Result<(String, Vec<LoraSpec>)> {
        let (text, specs) = lora::for_prompt(prompt, self.lora.dir.as_deref(), &self.lora.base)?;
        for spec in &specs {
            self.lora_file(&spec.path)?;
        }
        Ok((text, specs))
    }

    /// `prompt` as image metadata records it: with a `<lora:NAME:WEIGHT>` tag appended for
    /// each LoRA given for every prompt that the prompt's own tags do not name (AUTOMATIC1111
    /// appends its default LoRA to the prompt the same way), so the parameters name every
    /// LoRA that made the image.
    pub fn recorded_prompt(&self, prompt: &str) -> String {
        let named: Vec<String> = lora::tags::extract(crate::Setting::Prompt, prompt)
            .map(|t| t.tags.into_iter().map(|t| t.name).collect())
            .unwrap_or_default();
        let mut out = prompt.to_string();
        for b in &self.lora.base {
            let name = b.name();
            if named.contains(&name) {
                continue;
            }
            match b.unet_weight {
                Some(u) => out.push_str(&format!("<lora:{name}:{}:{u}>", b.weight)),
                None => out.push_str(&format!("<lora:{name}:{}>", b.weight)),
            }
        }
        out
    }

    /// Switches the model to the LoRAs `specs` (sorted, as [`Self::prompt_loras`] gives them):
    /// the text encoders and the UNet are dropped where their deltas change, and load again,
    /// with the new deltas, when next needed. The same set again does nothing.
    pub fn use_loras(&self, specs: &[LoraSpec]) -> Result<()> {
        let mut loaded = self.lock();
        let changed = loaded
            .lora
            .switch(specs, self.text.len(), &|| self.lora_indexes())?;
        if changed.text {
            loaded.text_encoder = None;
        }
        if changed.unet {
            loaded.unet = None;
        }
        if changed.text || changed.unet {
            crate::kernels::release_freed_memory();
        }
        Ok(())
    }
}
