//! The VAE of an LDM checkpoint (`first_stage_model.*`, or a VAE file of its own in the
//! LDM or the diffusers layout): its geometry from the tensor shapes and the diffusers names.
use serde_json::{json, Map, Value};

use super::header::{map_by_prefix, norm_groups, unknown_error, NameMap, Sub, Tail};
use crate::Result;

/// Where a checkpoint's VAE starts.
pub(super) const PREFIX: &str = "first_stage_model.";

/// Whether `sub` holds a VAE in the LDM layout (`encoder.down.0.…`).
pub(super) fn is_ldm(sub: &Sub) -> bool {
    sub.any("encoder.down.") || sub.any("decoder.up.")
}

/// Whether `sub` holds a VAE in the diffusers layout (`encoder.down_blocks.0.…`).
pub(super) fn is_diffusers(sub: &Sub) -> bool {
    sub.any("decoder.up_blocks.")
}

/// The VAE's config (over the template) and names, from the LDM layout.
pub(super) fn convert_ldm(sub: &Sub, template: &str) -> Result<(Map<String, Value>, NameMap)> {
    let levels = sub.count("encoder.down.");
    let layers = sub.count("encoder.down.0.block.");
    if levels == 0 || layers == 0 {
        return Err(sub.layout_error("no encoder.down.0.block.0 (is this a VAE?)"));
    }
    let mut rules: Vec<(String, String, Tail)> = vec![
        ("quant_conv.".into(), "quant_conv.".into(), Tail::Same),
        (
            "post_quant_conv.".into(),
            "post_quant_conv.".into(),
            Tail::Same,
        ),
    ];
    for coder in ["encoder", "decoder"] {
        for (from, to) in [("conv_in.", "conv_in."), ("conv_out.", "conv_out.")] {
            rules.push((
                format!("{coder}.{from}"),
                format!("{coder}.{to}"),
                Tail::Same,
            ));
        }
        let norm = (
            format!("{coder}.norm_out."),
            format!("{coder}.conv_norm_out."),
        );
        rules.push((norm.0, norm.1, Tail::Same));
        for (from, to) in [("block_1.", "resnets.0."), ("block_2.", "resnets.1.")] {
            let rule = (
                format!("{coder}.mid.{from}"),
                format!("{coder}.mid_block.{to}"),
            );
            rules.push((rule.0, rule.1, Tail::VaeResnet));
        }
        let attention = (
            format!("{coder}.mid.attn_1."),
            format!("{coder}.mid_block.attentions.0."),
        );
        rules.push((attention.0, attention.1, Tail::VaeAttention));
    }
    for i in 0..levels {
        let block = (
            format!("encoder.down.{i}.block."),
            format!("encoder.down_blocks.{i}.resnets."),
        );
        for j in 0..layers {
            let rule = (format!("{}{j}.", block.0), format!("{}{j}.", block.1));
            rules.push((rule.0, rule.1, Tail::VaeResnet));
        }
        let down = (
            format!("encoder.down.{i}.downsample.conv."),
            format!("encoder.down_blocks.{i}.downsamplers.0.conv."),
        );
        rules.push((down.0, down.1, Tail::Same));
        // The decoder's levels are stored deepest first in the LDM layout.
        let u = levels - 1 - i;
        for j in 0..=layers {
            let rule = (
                format!("decoder.up.{i}.block.{j}."),
                format!("decoder.up_blocks.{u}.resnets.{j}."),
            );
            rules.push((rule.0, rule.1, Tail::VaeResnet));
        }
        let up = (
            format!("decoder.up.{i}.upsample.conv."),
            format!("decoder.up_blocks.{u}.upsamplers.0.conv."),
        );
        rules.push((up.0, up.1, Tail::Same));
    }
    let mut names = NameMap::default();
    let unknown = map_by_prefix(sub, &rules, &mut names, "");
    if !unknown.is_empty() {
        return Err(unknown_error(sub, &unknown));
    }
    let channels: Vec<usize> = (0..levels)
        .map(|i| sub.dim(&format!("encoder.down.{i}.block.0.conv1.weight"), 0))
        .collect::<Result<_>>()?;
    Ok((config(sub, template, &channels, layers)?, names))
}

/// The VAE's config (over the template) and names, from the diffusers layout.
pub(super) fn convert_diffusers(
    sub: &Sub,
    template: &str,
) -> Result<(Map<String, Value>, NameMap)> {
    let levels = sub.count("encoder.down_blocks.");
    let layers = sub.count("encoder.down_blocks.0.resnets.");
    if levels == 0 || layers == 0 {
        return Err(sub.layout_error("no encoder.down_blocks.0.resnets.0 (is this a VAE?)"));
    }
    let mut names = NameMap::default();
    let unknown = map_by_prefix(
        sub,
        &[(String::new(), String::new(), Tail::Same)],
        &mut names,
        "",
    );
    debug_assert!(unknown.is_empty());
    let channels: Vec<usize> = (0..levels)
        .map(|i| {
            sub.dim(
                &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                0,
            )
        })
        .collect::<Result<_>>()?;
    Ok((config(sub, template, &channels, layers)?, names))
}

/// The template with the numbers both layouts share.
fn config(
    sub: &Sub,
    template: &str,
    channels: &[usize],
    layers: usize,
) -> Result<Map<String, Value>> {
    let mut c: Map<String, Value> =
        serde_json::from_str(template).map_err(|e| sub.layout_error(format!("template: {e}")))?;
    let n = channels.len();
    c.insert("block_out_channels".into(), json!(channels));
    c.insert("layers_per_block".into(), json!(layers));
    c.insert("norm_num_groups".into(), json!(norm_groups(channels)));
    c.insert(
        "down_block_types".into(),
        json!(vec!["DownEncoderBlock2D"; n]),
    );
    c.insert("up_block_types".into(), json!(vec!["UpDecoderBlock2D"; n]));
    c.insert(
        "in_channels".into(),
        json!(sub.dim("encoder.conv_in.weight", 1)?),
    );
    c.insert(
        "out_channels".into(),
        json!(sub.dim("decoder.conv_out.weight", 0)?),
    );
    c.insert(
        "latent_channels".into(),
        json!(sub.dim("decoder.conv_in.weight", 1)?),
    );
    c.insert(
        "use_quant_conv".into(),
        json!(sub.shape("quant_conv.weight").is_some()),
    );
    c.insert(
        "use_post_quant_conv".into(),
        json!(sub.shape("post_quant_conv.weight").is_some()),
    );
    Ok(c)
}
