//! The UNet of an LDM checkpoint (`model.diffusion_model.*`): its geometry read from the
//! tensor shapes, and the diffusers names of its tensors.
use serde_json::{json, Map, Value};

use super::detect::Kind;
use super::header::{map_by_prefix, norm_groups, unknown_error, NameMap, Sub, Tail};
use crate::Result;

/// Where the UNet's tensors start in a checkpoint.
pub(super) const PREFIX: &str = "model.diffusion_model.";

/// One down block of the UNet as the checkpoint lays it out.
struct DownBlock {
    /// `input_blocks` indexes of its residual blocks.
    resnets: Vec<usize>,
    /// The `input_blocks` index of its downsampler (all but the last block).
    downsample: Option<usize>,
    /// Transformer layers after each residual block (0: no attention).
    depth: usize,
    channels: usize,
}

/// The UNet's diffusers config (over the family's template) and its names.
pub(super) fn convert(
    sub: &Sub,
    kind: Kind,
    template: &str,
) -> Result<(Map<String, Value>, NameMap)> {
    let blocks = down_blocks(sub)?;
    let layers = blocks[0].resnets.len();
    if blocks.iter().any(|b| b.resnets.len() != layers) {
        return Err(sub.layout_error("down blocks with different numbers of residual blocks"));
    }
    let mut rules: Vec<(String, String, Tail)> = vec![
        ("input_blocks.0.0.".into(), "conv_in.".into(), Tail::Same),
        (
            "time_embed.0.".into(),
            "time_embedding.linear_1.".into(),
            Tail::Same,
        ),
        (
            "time_embed.2.".into(),
            "time_embedding.linear_2.".into(),
            Tail::Same,
        ),
        (
            "label_emb.0.0.".into(),
            "add_embedding.linear_1.".into(),
            Tail::Same,
        ),
        (
            "label_emb.0.2.".into(),
            "add_embedding.linear_2.".into(),
            Tail::Same,
        ),
        ("out.0.".into(), "conv_norm_out.".into(), Tail::Same),
        ("out.2.".into(), "conv_out.".into(), Tail::Same),
        (
            "middle_block.0.".into(),
            "mid_block.resnets.0.".into(),
            Tail::UnetResnet,
        ),
        (
            "middle_block.1.".into(),
            "mid_block.attentions.0.".into(),
            Tail::Same,
        ),
        (
            "middle_block.2.".into(),
            "mid_block.resnets.1.".into(),
            Tail::UnetResnet,
        ),
    ];
    for (b, block) in blocks.iter().enumerate() {
        for (j, &i) in block.resnets.iter().enumerate() {
            let resnet = format!("down_blocks.{b}.resnets.{j}.");
            rules.push((format!("input_blocks.{i}.0."), resnet, Tail::UnetResnet));
            if block.depth > 0 {
                let attention = format!("down_blocks.{b}.attentions.{j}.");
                rules.push((format!("input_blocks.{i}.1."), attention, Tail::Same));
            }
        }
        if let Some(i) = block.downsample {
            let conv = format!("down_blocks.{b}.downsamplers.0.conv.");
            rules.push((format!("input_blocks.{i}.0.op."), conv, Tail::Same));
        }
    }
    let n = blocks.len();
    for (u, down) in blocks.iter().rev().enumerate() {
        for j in 0..=layers {
            let i = u * (layers + 1) + j;
            let resnet = format!("up_blocks.{u}.resnets.{j}.");
            rules.push((format!("output_blocks.{i}.0."), resnet, Tail::UnetResnet));
            let mut next = 1;
            if down.depth > 0 {
                let attention = format!("up_blocks.{u}.attentions.{j}.");
                rules.push((format!("output_blocks.{i}.1."), attention, Tail::Same));
                next = 2;
            }
            if j == layers && u + 1 < n {
                let conv = format!("up_blocks.{u}.upsamplers.0.conv.");
                rules.push((format!("output_blocks.{i}.{next}.conv."), conv, Tail::Same));
            }
        }
    }
    let mut names = NameMap::default();
    let unknown = map_by_prefix(sub, &rules, &mut names, "");
    if !unknown.is_empty() {
        return Err(unknown_error(sub, &unknown));
    }
    Ok((config(sub, kind, template, &blocks)?, names))
}

/// The down blocks, read from `input_blocks`: residual blocks (with attention after them
/// when `.1.` is a transformer) until a downsampler closes the block.
fn down_blocks(sub: &Sub) -> Result<Vec<DownBlock>> {
    let mut blocks = Vec::new();
    let mut current = Vec::new();
    let last = sub.indexes("input_blocks.").last().copied().unwrap_or(0);
    let close = |resnets: Vec<usize>, downsample| -> Result<DownBlock> {
        let first = *resnets
            .first()
            .ok_or_else(|| sub.layout_error("a down block without residual blocks"))?;
        let depth = sub.count(&format!("input_blocks.{first}.1.transformer_blocks."));
        let channels = sub.dim(&format!("input_blocks.{first}.0.out_layers.3.weight"), 0)?;
        Ok(DownBlock {
            resnets,
            downsample,
            depth,
            channels,
        })
    };
    for i in 1..=last {
        if sub
            .shape(&format!("input_blocks.{i}.0.op.weight"))
            .is_some()
        {
            blocks.push(close(std::mem::take(&mut current), Some(i))?);
        } else if sub
            .shape(&format!("input_blocks.{i}.0.in_layers.0.weight"))
            .is_some()
        {
            current.push(i);
        } else {
            return Err(sub.layout_error(format!(
                "input_blocks.{i} is neither a residual block nor a downsampler"
            )));
        }
    }
    blocks.push(close(current, None)?);
    Ok(blocks)
}

/// The diffusers config: the family's template with every number the shapes tell.
fn config(
    sub: &Sub,
    kind: Kind,
    template: &str,
    blocks: &[DownBlock],
) -> Result<Map<String, Value>> {
    let mut c: Map<String, Value> =
        serde_json::from_str(template).map_err(|e| sub.layout_error(format!("template: {e}")))?;
    let channels: Vec<usize> = blocks.iter().map(|b| b.channels).collect();
    let attention = |b: &DownBlock| b.depth > 0;
    let down: Vec<&str> = blocks
        .iter()
        .map(|b| {
            if attention(b) {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = blocks
        .iter()
        .rev()
        .map(|b| {
            if attention(b) {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let depths: Vec<usize> = blocks.iter().map(|b| b.depth.max(1)).collect();
    let mid_depth = sub.count("middle_block.1.transformer_blocks.");
    if mid_depth == 0 {
        return Err(sub.layout_error("a middle block without attention"));
    }
    if Some(&mid_depth) != depths.last() {
        return Err(sub.layout_error(format!(
            "the middle block has {mid_depth} transformer layers, the last down block {}",
            depths.last().unwrap_or(&0)
        )));
    }
    let attn = blocks
        .iter()
        .position(attention)
        .ok_or_else(|| sub.layout_error("no cross-attention in any down block"))?;
    let first_attn = format!("input_blocks.{}.1.", blocks[attn].resnets[0]);
    let cross = sub.dim(
        &format!("{first_attn}transformer_blocks.0.attn2.to_k.weight"),
        1,
    )?;
    let linear = sub.need(&format!("{first_attn}proj_in.weight"))?.len() == 2;
    // The head count is not in the weights: SD 1.x has 8 heads, SD 2.x and SDXL heads of 64.
    let heads = match kind {
        Kind::Sd1 => json!(8),
        Kind::Sd2 | Kind::Sdxl => {
            json!(channels.iter().map(|c| (c / 64).max(1)).collect::<Vec<_>>())
        }
    };
    let set = |c: &mut Map<String, Value>, k: &str, v: Value| {
        c.insert(k.to_string(), v);
    };
    set(
        &mut c,
        "in_channels",
        json!(sub.dim("input_blocks.0.0.weight", 1)?),
    );
    set(&mut c, "out_channels", json!(sub.dim("out.2.weight", 0)?));
    set(&mut c, "norm_num_groups", json!(norm_groups(&channels)));
    set(&mut c, "block_out_channels", json!(channels));
    set(&mut c, "layers_per_block", json!(blocks[0].resnets.len()));
    set(&mut c, "down_block_types", json!(down));
    set(&mut c, "up_block_types", json!(up));
    set(&mut c, "cross_attention_dim", json!(cross));
    set(&mut c, "use_linear_projection", json!(linear));
    set(&mut c, "attention_head_dim", heads);
    if depths.iter().any(|&d| d != 1) || mid_depth != 1 {
        set(&mut c, "transformer_layers_per_block", json!(depths));
    }
    if let Some(shape) = sub.shape("label_emb.0.0.weight") {
        set(
            &mut c,
            "projection_class_embeddings_input_dim",
            json!(shape.get(1)),
        );
    }
    Ok(c)
}
