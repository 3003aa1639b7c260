//! Which tensor of the model a LoRA layer changes: kohya / AUTOMATIC1111 names
//! (`lora_unet_down_blocks_0_attentions_0_proj_in`, SDXL's `lora_te1_`/`lora_te2_`, and the
//! original SGM UNet names `lora_unet_input_blocks_4_1_...` of SDXL files made by sd-scripts)
//! and diffusers / PEFT names (`unet.down_blocks.0.attentions.0.proj_in`,
//! `text_encoder.text_model...`, `text_encoder_2...`), matched against the tensors of the
//! model's own files.
//!
//! kohya names are diffusers module paths with `.` replaced by `_`, which cannot be undone by
//! rule (`to_out_0`, `ff_net_0_proj`), so the lookup goes the other way: every module of the
//! model's files is written in kohya form, and in SGM form for the UNet.
use std::collections::HashMap;

/// A model component a LoRA layer can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// Text encoder `i`, in the model's order (SDXL: 0 = CLIP-L, 1 = OpenCLIP-bigG).
    TextEncoder(usize),
    /// The UNet.
    UNet,
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Component::TextEncoder(0) => f.write_str("text_encoder"),
            Component::TextEncoder(i) => write!(f, "text_encoder_{}", i + 1),
            Component::UNet => f.write_str("unet"),
        }
    }
}

/// What a LoRA tensor is, from the end of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `lora_down` / `lora_A`: (rank, in[, kh, kw]).
    Down,
    /// `lora_up` / `lora_B`: (out, rank[, 1, 1]).
    Up,
    /// `alpha`: a scalar; the layer's scale is alpha / rank.
    Alpha,
}

/// Key endings of the supported kinds.
const ROLES: &[(&str, Role)] = &[
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

/// A LoRA key split into its module and role, or the kind it has when it is not supported
/// (`hada_w1_a`, `lora_mid.weight`, `dora_scale`, ...).
pub fn split_key(key: &str) -> Result<(&str, Role), String> {
    for (end, role) in ROLES {
        if let Some(module) = key.strip_suffix(end) {
            if !module.is_empty() {
                return Ok((module, *role));
            }
        }
    }
    // kohya keys: the module has no dots, the kind is everything after the first one.
    if key.starts_with("lora_") {
        if let Some((_, kind)) = key.split_once('.') {
            return Err(kind.to_string());
        }
    }
    let mut parts = key.rsplit('.');
    let last = parts.next().unwrap_or(key);
    Err(match (last, parts.next()) {
        ("weight" | "bias", Some(before)) => format!("{before}.{last}"),
        _ => last.to_string(),
    })
}

/// How a LoRA module names its component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// kohya: underscores.
    Kohya,
    /// diffusers / PEFT: the module path itself.
    Dotted,
}

/// The component a module belongs to and the rest of its name, from its prefix; `None` for an
/// unknown prefix.
fn component_of(module: &str) -> Option<(Component, Style, &str)> {
    const PREFIXES: &[(&str, Component, Style)] = &[
        ("lora_unet_", Component::UNet, Style::Kohya),
        ("lora_te1_", Component::TextEncoder(0), Style::Kohya),
        ("lora_te2_", Component::TextEncoder(1), Style::Kohya),
        ("lora_te_", Component::TextEncoder(0), Style::Kohya),
        ("unet.", Component::UNet, Style::Dotted),
        ("text_encoder.", Component::TextEncoder(0), Style::Dotted),
        ("text_encoder_2.", Component::TextEncoder(1), Style::Dotted),
    ];
    PREFIXES.iter().find_map(|(prefix, component, style)| {
        module
            .strip_prefix(prefix)
            .map(|rest| (*component, *style, rest))
    })
}

/// The modules of one component's weight file, and their kohya (and SGM) spellings.
pub struct ModuleIndex {
    /// Module path -> shape of its `.weight`.
    modules: HashMap<String, Vec<usize>>,
    /// kohya spelling -> module path (`None` when two modules share a spelling).
    kohya: HashMap<String, Option<String>>,
}

impl ModuleIndex {
    /// Indexes the `.weight` tensors of a component's file (`tensors`: name and shape); for the
    /// UNet also under their SGM names.
    pub fn new<'a>(
        component: Component,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Self {
        let modules: HashMap<String, Vec<usize>> = tensors
            .into_iter()
            .filter_map(|(name, shape)| {
                let module = name.strip_suffix(".weight")?;
                Some((module.to_string(), shape.to_vec()))
            })
            .collect();
        let sgm = (component == Component::UNet).then(|| SgmLayout::of(modules.keys()));
        let mut kohya: HashMap<String, Option<String>> = HashMap::new();
        let mut add = |spelling: String, module: &String| {
            kohya
                .entry(spelling)
                .and_modify(|m| {
                    if m.as_ref() != Some(module) {
                        *m = None;
                    }
                })
                .or_insert_with(|| Some(module.clone()));
        };
        for module in modules.keys() {
            add(module.replace('.', "_"), module);
            if let Some(sgm) = sgm.as_ref().and_then(|l| l.name(module)) {
                add(sgm.replace('.', "_"), module);
            }
        }
        Self { modules, kohya }
    }

    /// The module path a LoRA names (in `style`), with the shape of its weight.
    fn find(&self, style: Style, name: &str) -> Option<(&str, &[usize])> {
        let module = match style {
            // transformers 5 names CLIP modules without `text_model.` (`encoder.layers.0...`),
            // so PEFT files made with it do too; the model's files have it.
            Style::Dotted if !self.modules.contains_key(name) => {
                return self
                    .modules
                    .get_key_value(&format!("text_model.{name}"))
                    .map(|(k, s)| (k.as_str(), s.as_slice()));
            }
            Style::Dotted => name,
            Style::Kohya => self.kohya.get(name)?.as_deref()?,
        };
        let (key, shape) = self.modules.get_key_value(module)?;
        Some((key.as_str(), shape.as_slice()))
    }
}

/// Where a LoRA module lands in the model.
#[derive(Debug, PartialEq)]
pub enum Resolved<'a> {
    /// The module of `component` with this path and weight shape.
    Found {
        component: Component,
        module: &'a str,
        shape: &'a [usize],
    },
    /// A component the model lacks (an SDXL file's second text encoder on an SD 1.x model).
    NoComponent(Component),
    /// The prefix is none of the known ones.
    UnknownPrefix,
    /// The component exists but has no such module.
    NoModule(Component),
}

/// Resolves a LoRA module name against the model's components (`indexes[i]` for component
/// `components[i]`).
pub fn resolve<'a>(module: &str, indexes: &'a [(Component, ModuleIndex)]) -> Resolved<'a> {
    let Some((component, style, rest)) = component_of(module) else {
        return Resolved::UnknownPrefix;
    };
    let Some((_, index)) = indexes.iter().find(|(c, _)| *c == component) else {
        return Resolved::NoComponent(component);
    };
    match index.find(style, rest) {
        Some((module, shape)) => Resolved::Found {
            component,
            module,
            shape,
        },
        None => Resolved::NoModule(component),
    }
}

/// The shape of a diffusers UNet, enough to name its modules as the original (SGM / LDM) UNet
/// does: `input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`.
struct SgmLayout {
    /// Resnets per down block (`layers_per_block`); up blocks have one more.
    layers: usize,
    /// Up blocks that have attentions (their upsampler is then the block's third entry).
    up_with_attention: Vec<usize>,
}

impl SgmLayout {
    fn of<'a>(modules: impl Iterator<Item = &'a String>) -> Self {
        let mut layers = 0;
        let mut up_with_attention = Vec::new();
        for m in modules {
            let p: Vec<&str> = m.split('.').collect();
            if let ["down_blocks", "0", "resnets", j, ..] = p.as_slice() {
                if let Ok(j) = j.parse::<usize>() {
                    layers = layers.max(j + 1);
                }
            }
            if let ["up_blocks", i, "attentions", ..] = p.as_slice() {
                if let Ok(i) = i.parse::<usize>() {
                    if !up_with_attention.contains(&i) {
                        up_with_attention.push(i);
                    }
                }
            }
        }
        Self {
            layers,
            up_with_attention,
        }
    }

    /// The SGM name of diffusers module `module`, or `None` when it has none.
    fn name(&self, module: &str) -> Option<String> {
        let p: Vec<&str> = module.split('.').collect();
        let n = |s: &str| s.parse::<usize>().ok();
        let stride = self.layers + 1;
        let join = |head: String, rest: &[&str]| {
            if rest.is_empty() {
                head
            } else {
                format!("{head}.{}", rest.join("."))
            }
        };
        Some(match p.as_slice() {
            ["conv_in"] => "input_blocks.0.0".into(),
            ["time_embedding", "linear_1"] => "time_embed.0".into(),
            ["time_embedding", "linear_2"] => "time_embed.2".into(),
            ["add_embedding", "linear_1"] => "label_emb.0.0".into(),
            ["add_embedding", "linear_2"] => "label_emb.0.2".into(),
            ["conv_norm_out"] => "out.0".into(),
            ["conv_out"] => "out.2".into(),
            ["down_blocks", i, "resnets", j, rest @ ..] => join(
                format!("input_blocks.{}.0", 1 + n(i)? * stride + n(j)?),
                &[resnet_part(rest)?],
            ),
            ["down_blocks", i, "attentions", j, rest @ ..] => join(
                format!("input_blocks.{}.1", 1 + n(i)? * stride + n(j)?),
                rest,
            ),
            ["down_blocks", i, "downsamplers", "0", "conv"] => {
                format!("input_blocks.{}.0.op", 1 + n(i)? * stride + self.layers)
            }
            ["mid_block", "resnets", j, rest @ ..] => {
                join(format!("middle_block.{}", 2 * n(j)?), &[resnet_part(rest)?])
            }
            ["mid_block", "attentions", "0", rest @ ..] => join("middle_block.1".into(), rest),
            ["up_blocks", i, "resnets", j, rest @ ..] => join(
                format!("output_blocks.{}.0", n(i)? * stride + n(j)?),
                &[resnet_part(rest)?],
            ),
            ["up_blocks", i, "attentions", j, rest @ ..] => {
                join(format!("output_blocks.{}.1", n(i)? * stride + n(j)?), rest)
            }
            ["up_blocks", i, "upsamplers", "0", "conv"] => {
                let i = n(i)?;
                let at = if self.up_with_attention.contains(&i) {
                    2
                } else {
                    1
                };
                format!("output_blocks.{}.{at}.conv", i * stride + self.layers)
            }
            _ => return None,
        })
    }
}

/// A resnet's layer in SGM names.
fn resnet_part(rest: &[&str]) -> Option<&'static str> {
    Some(match rest {
        ["norm1"] => "in_layers.0",
        ["conv1"] => "in_layers.2",
        ["time_emb_proj"] => "emb_layers.1",
        ["norm2"] => "out_layers.0",
        ["conv2"] => "out_layers.3",
        ["conv_shortcut"] => "skip_connection",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The modules of an SDXL-shaped UNet (3 blocks, 2 layers, attention in down blocks 1-2
    /// and up blocks 0-1).
    fn sdxl_unet() -> ModuleIndex {
        let names = [
            "conv_in",
            "down_blocks.0.resnets.0.conv1",
            "down_blocks.0.resnets.1.conv2",
            "down_blocks.0.downsamplers.0.conv",
            "down_blocks.1.resnets.0.conv_shortcut",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
            "down_blocks.2.attentions.0.proj_in",
            "mid_block.resnets.1.time_emb_proj",
            "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
            "up_blocks.0.resnets.2.conv1",
            "up_blocks.0.attentions.2.proj_out",
            "up_blocks.0.upsamplers.0.conv",
            "up_blocks.1.attentions.0.proj_in",
            "up_blocks.2.resnets.0.conv1",
            "add_embedding.linear_2",
        ];
        let shape = [4usize, 4];
        let tensors: Vec<(String, &[usize])> = names
            .iter()
            .map(|n| (format!("{n}.weight"), &shape[..]))
            .collect();
        ModuleIndex::new(
            Component::UNet,
            tensors.iter().map(|(n, s)| (n.as_str(), *s)),
        )
    }

    #[test]
    fn kohya_and_sgm_names_find_the_diffusers_module() {
        let idx = [(Component::UNet, sdxl_unet())];
        let found = |m: &str| match resolve(m, &idx) {
            Resolved::Found { module, .. } => module.to_string(),
            other => panic!("{m}: {other:?}"),
        };
        for (lora, module) in [
            (
                "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0",
                "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
            ),
            (
                "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_out_0",
                "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
            ),
            ("lora_unet_input_blocks_0_0", "conv_in"),
            (
                "lora_unet_input_blocks_1_0_in_layers_2",
                "down_blocks.0.resnets.0.conv1",
            ),
            (
                "lora_unet_input_blocks_2_0_out_layers_3",
                "down_blocks.0.resnets.1.conv2",
            ),
            (
                "lora_unet_input_blocks_3_0_op",
                "down_blocks.0.downsamplers.0.conv",
            ),
            (
                "lora_unet_input_blocks_4_0_skip_connection",
                "down_blocks.1.resnets.0.conv_shortcut",
            ),
            (
                "lora_unet_input_blocks_7_1_proj_in",
                "down_blocks.2.attentions.0.proj_in",
            ),
            (
                "lora_unet_middle_block_2_emb_layers_1",
                "mid_block.resnets.1.time_emb_proj",
            ),
            (
                "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj",
                "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
            ),
            (
                "lora_unet_output_blocks_2_0_in_layers_2",
                "up_blocks.0.resnets.2.conv1",
            ),
            (
                "lora_unet_output_blocks_2_1_proj_out",
                "up_blocks.0.attentions.2.proj_out",
            ),
            (
                "lora_unet_output_blocks_2_2_conv",
                "up_blocks.0.upsamplers.0.conv",
            ),
            (
                "lora_unet_output_blocks_3_1_proj_in",
                "up_blocks.1.attentions.0.proj_in",
            ),
            (
                "lora_unet_output_blocks_6_0_in_layers_2",
                "up_blocks.2.resnets.0.conv1",
            ),
            ("lora_unet_label_emb_0_2", "add_embedding.linear_2"),
            (
                "unet.up_blocks.0.upsamplers.0.conv",
                "up_blocks.0.upsamplers.0.conv",
            ),
        ] {
            assert_eq!(found(lora), module, "{lora}");
        }
        assert_eq!(
            resolve("lora_unet_input_blocks_9_1_proj_in", &idx),
            Resolved::NoModule(Component::UNet)
        );
        assert_eq!(
            resolve("lora_te2_text_model_final_layer_norm", &idx),
            Resolved::NoComponent(Component::TextEncoder(1))
        );
        assert_eq!(
            resolve("model.diffusion_model.x", &idx),
            Resolved::UnknownPrefix
        );
    }

    #[test]
    fn keys_split_into_module_and_role_or_an_unknown_kind() {
        assert_eq!(
            split_key("lora_unet_a_b.lora_down.weight"),
            Ok(("lora_unet_a_b", Role::Down))
        );
        assert_eq!(split_key("lora_te_x.alpha"), Ok(("lora_te_x", Role::Alpha)));
        assert_eq!(
            split_key("unet.a.b.to_q.lora_B.weight"),
            Ok(("unet.a.b.to_q", Role::Up))
        );
        assert_eq!(split_key("lora_unet_a.hada_w1_a"), Err("hada_w1_a".into()));
        assert_eq!(
            split_key("lora_unet_a.lora_mid.weight"),
            Err("lora_mid.weight".into())
        );
        assert_eq!(
            split_key("unet.a.to_q.lora_magnitude_vector"),
            Err("lora_magnitude_vector".into())
        );
        assert_eq!(
            split_key("unet.a.to_q.diff.weight"),
            Err("diff.weight".into())
        );
    }
}
