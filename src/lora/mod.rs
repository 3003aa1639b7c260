//! LoRA: low-rank weight deltas merged into the text encoders and the UNet as they load,
//! `W' = W + weight * alpha / rank * up @ down`, from kohya / AUTOMATIC1111 and diffusers /
//! PEFT files, named on the command line or by `<lora:NAME:WEIGHT>` tags in prompts.
//!
//! The merge happens when a component's tensors are read from its mapped file, so the base
//! weights always come from the file: switching to another set of LoRAs reloads the affected
//! components, and no amount of switching drifts from what a fresh load gives.
mod file;
mod names;
mod patch;
pub mod tags;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use file::{Layer, LoraFile};
pub use names::{Component, ModuleIndex};
pub use patch::{Fingerprint, Patches};
pub use tags::{LoraTag, Tagged};

use crate::{Error, Result, Setting};

/// File extension of LoRA files found by name.
const EXTENSION: &str = "safetensors";

/// How deep folders under the LoRA folder are searched for a name (AUTOMATIC1111 lists its
/// LoRA folder recursively).
const SEARCH_DEPTH: usize = 4;

/// One LoRA to apply: its file and multipliers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// Multiplier of its text-encoder layers (and of its UNet layers unless `unet_weight`).
    pub weight: f64,
    /// Multiplier of its UNet layers when it differs from `weight`.
    pub unet_weight: Option<f64>,
}

impl LoraSpec {
    /// `path` with one multiplier for all its layers.
    pub fn new(path: impl Into<PathBuf>, weight: f64) -> Self {
        Self {
            path: path.into(),
            weight,
            unet_weight: None,
        }
    }

    /// Multiplier of the layers of `component`.
    pub fn multiplier(&self, component: Component) -> f64 {
        match component {
            Component::UNet => self.unet_weight.unwrap_or(self.weight),
            Component::TextEncoder(_) => self.weight,
        }
    }

    /// The name a prompt tag would use: the file name without `.safetensors`.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Reads `FILE[:WEIGHT]` (the weight is what follows the last `:` when it is a number,
    /// so `C:\loras\x.safetensors` is a file). A name without a folder or extension is looked
    /// up in `dir` like a prompt tag's.
    pub fn parse(spec: &str, dir: Option<&Path>) -> Result<Self> {
        let bad = |reason: String| Error::setting(Setting::Lora, spec, reason);
        let (file, weight) = match spec.rsplit_once(':') {
            Some((file, w)) if !file.is_empty() && w.trim().parse::<f64>().is_ok() => {
                let w: f64 = w.trim().parse().unwrap_or(1.0);
                if !w.is_finite() {
                    return Err(bad("the weight must be a finite number".into()));
                }
                (file, w)
            }
            _ => (spec, 1.0),
        };
        if file.is_empty() {
            return Err(bad("names no file".into()));
        }
        let path = Path::new(file);
        let plain_name = path.components().count() == 1 && path.extension().is_none();
        if plain_name && !path.exists() {
            if let Some(dir) = dir {
                return Ok(Self::new(find(dir, file)?, weight));
            }
        }
        if !path.is_file() {
            return Err(bad("no such file".into()));
        }
        Ok(Self::new(path, weight))
    }
}

/// The file `NAME.safetensors` in `dir` or a folder below it (AUTOMATIC1111's lookup of a
/// `<lora:NAME>` tag); an error names the name and the folder.
pub fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    let bad = |reason: String| Error::setting(Setting::Lora, name, reason);
    if name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(bad(
            "a LoRA name is a file name without .safetensors, not a path".into(),
        ));
    }
    let file = format!("{name}.{EXTENSION}");
    let direct = dir.join(&file);
    if direct.is_file() {
        return Ok(direct);
    }
    if !dir.is_dir() {
        return Err(Error::setting(
            Setting::LoraDir,
            dir.display(),
            "is not a folder",
        ));
    }
    let mut found = Vec::new();
    search(dir, &file, SEARCH_DEPTH, &mut found);
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(bad(format!(
            "no LoRA of that name: {file} is not in {}",
            dir.display()
        ))),
        [a, b, ..] => Err(bad(format!(
            "the name is ambiguous: {} and {}",
            a.display(),
            b.display()
        ))),
    }
}

fn search(dir: &Path, file: &str, depth: usize, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && depth > 0 {
            search(&path, file, depth - 1, found);
        } else if path.file_name().is_some_and(|n| n == file) && path.is_file() {
            found.push(path);
        }
    }
}

/// The LoRAs a prompt asks for: the `<lora:...>` tags (looked up in `dir`), then each of
/// `base` whose file no tag names (a tag overrides the same LoRA given for every prompt, as
/// AUTOMATIC1111's default LoRA yields to one in the prompt). Returns the prompt's text
/// without its tags and the set, sorted.
pub fn for_prompt(
    prompt: &str,
    dir: Option<&Path>,
    base: &[LoraSpec],
) -> Result<(String, Vec<LoraSpec>)> {
    let tagged = tags::extract(Setting::Prompt, prompt)?;
    let mut specs = Vec::with_capacity(tagged.tags.len() + base.len());
    for tag in &tagged.tags {
        let Some(dir) = dir else {
            return Err(Error::setting(
                Setting::Lora,
                &tag.name,
                "a prompt names this LoRA, but no LoRA folder is set",
            ));
        };
        specs.push(LoraSpec {
            path: find(dir, &tag.name)?,
            weight: tag.text_weight,
            unet_weight: (tag.unet_weight != tag.text_weight).then_some(tag.unet_weight),
        });
    }
    for b in base {
        if !specs.iter().any(|s| s.path == b.path) {
            specs.push(b.clone());
        }
    }
    sort(&mut specs);
    Ok((tagged.text, specs))
}

/// Sorts a set of LoRAs into one order, so the same set in another order is the same set.
fn sort(specs: &mut [LoraSpec]) {
    specs.sort_by(|a, b| {
        a.path.cmp(&b.path).then(
            a.weight.total_cmp(&b.weight).then(
                a.unet_weight
                    .unwrap_or(a.weight)
                    .total_cmp(&b.unet_weight.unwrap_or(b.weight)),
            ),
        )
    });
}

/// Whether two prompts name the same LoRA tags (in any order): items that can share a UNet
/// batch. Prompts whose tags do not parse are only equal to themselves.
pub fn same_tags(a: &str, b: &str) -> bool {
    let key = |p: &str| {
        tags::extract(Setting::Prompt, p).map(|t| {
            let mut k: Vec<(String, u64, u64)> = t
                .tags
                .into_iter()
                .map(|t| (t.name, t.text_weight.to_bits(), t.unet_weight.to_bits()))
                .collect();
            k.sort();
            k
        })
    };
    match (key(a), key(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Which components a change of LoRAs touched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// Some text encoder's patches changed.
    pub text: bool,
    /// The UNet's patches changed.
    pub unet: bool,
}

/// The LoRAs in use by a model, their patches per component, and the files read so far.
#[derive(Default)]
pub struct Active {
    specs: Vec<LoraSpec>,
    files: HashMap<PathBuf, Arc<LoraFile>>,
    indexes: Option<Arc<Vec<(Component, ModuleIndex)>>>,
    text: Vec<Option<Arc<Patches>>>,
    unet: Option<Arc<Patches>>,
}

impl Active {
    /// The LoRAs in use.
    pub fn specs(&self) -> &[LoraSpec] {
        &self.specs
    }

    /// Patches of text encoder `i`.
    pub fn text_patches(&self, i: usize) -> Option<Arc<Patches>> {
        self.text.get(i).cloned().flatten()
    }

    /// Patches of the UNet.
    pub fn unet_patches(&self) -> Option<Arc<Patches>> {
        self.unet.clone()
    }

    /// The file at `path`, read and checked against the model (once; later calls reuse it).
    /// `indexes` builds the model's module index the first time one is needed.
    pub fn file(
        &mut self,
        path: &Path,
        indexes: &dyn Fn() -> Result<Vec<(Component, ModuleIndex)>>,
    ) -> Result<Arc<LoraFile>> {
        if let Some(f) = self.files.get(path) {
            return Ok(Arc::clone(f));
        }
        let index = match &self.indexes {
            Some(i) => Arc::clone(i),
            None => {
                let i = Arc::new(indexes()?);
                self.indexes = Some(Arc::clone(&i));
                i
            }
        };
        let file = Arc::new(LoraFile::open(path, &index)?);
        self.files.insert(path.to_path_buf(), Arc::clone(&file));
        Ok(file)
    }

    /// Switches to `specs` (sorted, see [`for_prompt`]) for a model with `encoders` text
    /// encoders; says which components' patches changed (those must be loaded again).
    /// Layers with multiplier 0 change nothing and are left out.
    pub fn switch(
        &mut self,
        specs: &[LoraSpec],
        encoders: usize,
        indexes: &dyn Fn() -> Result<Vec<(Component, ModuleIndex)>>,
    ) -> Result<Changed> {
        if specs == self.specs.as_slice() && self.text.len() == encoders {
            return Ok(Changed::default());
        }
        let mut text = vec![Patches::default(); encoders];
        let mut unet = Patches::default();
        for spec in specs {
            let file = self.file(&spec.path, indexes)?;
            for (i, layer) in file.layers().iter().enumerate() {
                let m = spec.multiplier(layer.component);
                if m == 0.0 {
                    continue;
                }
                match layer.component {
                    Component::UNet => unet.add(&file, i, m),
                    Component::TextEncoder(e) => match text.get_mut(e) {
                        Some(p) => p.add(&file, i, m),
                        None => {
                            return Err(Error::Lora {
                                path: spec.path.clone(),
                                message: format!(
                                    "has layers for {}, which this model lacks",
                                    layer.component
                                ),
                            })
                        }
                    },
                }
            }
        }
        let wrap = |p: Patches| (!p.is_empty()).then(|| Arc::new(p));
        let print =
            |p: &Option<Arc<Patches>>| p.as_ref().map(|p| p.fingerprint()).unwrap_or_default();
        let text: Vec<Option<Arc<Patches>>> = text.into_iter().map(wrap).collect();
        let unet = wrap(unet);
        let changed = Changed {
            text: text
                .iter()
                .enumerate()
                .any(|(i, t)| print(self.text.get(i).unwrap_or(&None)) != print(t)),
            unet: print(&self.unet) != print(&unet),
        };
        self.specs = specs.to_vec();
        self.text = text;
        self.unet = unet;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_read_file_weight_and_names_in_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir(d.join("styles")).unwrap();
        let ink = d.join("styles").join("ink.safetensors");
        std::fs::write(&ink, b"").unwrap();
        let file = ink.display().to_string();
        assert_eq!(
            LoraSpec::parse(&format!("{file}:0.5"), None).unwrap(),
            LoraSpec::new(&ink, 0.5)
        );
        assert_eq!(
            LoraSpec::parse(&file, None).unwrap(),
            LoraSpec::new(&ink, 1.0)
        );
        // A bare name is found in the folder or below it.
        assert_eq!(
            LoraSpec::parse("ink:-0.25", Some(d)).unwrap(),
            LoraSpec::new(&ink, -0.25)
        );
        for (spec, words) in [
            ("missing.safetensors:1", "no such file"),
            ("ink:nan", "finite"),
            ("", "names no file"),
        ] {
            let e = LoraSpec::parse(spec, Some(d)).unwrap_err().to_string();
            assert!(e.contains(words), "{spec}: {e}");
        }
        let e = find(d, "nope").unwrap_err().to_string();
        assert!(e.contains("nope.safetensors is not in"), "{e}");
        let e = find(d, "../ink").unwrap_err().to_string();
        assert!(e.contains("not a path"), "{e}");
    }

    #[test]
    fn tags_override_the_base_set_and_the_set_is_sorted() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for n in ["a", "b"] {
            std::fs::write(d.join(format!("{n}.safetensors")), b"").unwrap();
        }
        let base = [LoraSpec::new(d.join("b.safetensors"), 1.0)];
        let (text, specs) = for_prompt("x <lora:b:0.5><lora:a:2:0.1>", Some(d), &base).unwrap();
        assert_eq!(text, "x ");
        assert_eq!(
            specs,
            [
                LoraSpec {
                    path: d.join("a.safetensors"),
                    weight: 2.0,
                    unet_weight: Some(0.1)
                },
                LoraSpec::new(d.join("b.safetensors"), 0.5)
            ]
        );
        let (_, specs) = for_prompt("x", Some(d), &base).unwrap();
        assert_eq!(specs, base);
        let e = for_prompt("<lora:a>", None, &[]).unwrap_err().to_string();
        assert!(e.contains("no LoRA folder"), "{e}");
        assert!(same_tags("<lora:a:1><lora:b>", "x<lora:b:1> <lora:a>"));
        assert!(!same_tags("<lora:a:1>", "<lora:a:0.5>"));
    }
}
