//! The text encoders of an LDM checkpoint: OpenAI's CLIP, stored in transformers' layout
//! (`cond_stage_model.transformer.*`, `conditioner.embedders.0.transformer.*`), and
//! OpenCLIP (`cond_stage_model.model.*`, `conditioner.embedders.1.model.*`) with its fused
//! attention projection and `x @ P` text projection.
use serde_json::{json, Map, Value};

use super::header::{NameMap, Sub};
use crate::model::weights::Reshape;
use crate::Result;

/// What a text encoder is read as.
pub(super) struct Encoder {
    pub config: Map<String, Value>,
    pub names: NameMap,
}

/// OpenAI's CLIP in transformers' layout, with or without the `text_model.` level.
pub(super) fn convert_clip(sub: &Sub, template: &str) -> Result<Encoder> {
    let inner = if sub.any("text_model.") {
        "text_model."
    } else {
        ""
    };
    let mut names = NameMap::default();
    for name in sub.names() {
        let Some(rest) = name.strip_prefix(inner) else {
            continue;
        };
        if rest.ends_with("position_ids") {
            continue;
        }
        let here = match rest.strip_prefix("text_projection.") {
            Some(_) => rest.to_string(),
            None => format!("text_model.{rest}"),
        };
        names.add(here, format!("{}{name}", sub.prefix), Reshape::Same);
    }
    let at = |n: &str| format!("{inner}{n}");
    let (vocab, hidden) = matrix(sub, &at("embeddings.token_embedding.weight"))?;
    let layers = sub.count(&at("encoder.layers."));
    let intermediate = sub.dim(&at("encoder.layers.0.mlp.fc1.weight"), 0)?;
    let positions = sub.dim(&at("embeddings.position_embedding.weight"), 0)?;
    let config = config(
        sub,
        template,
        [vocab, hidden, layers, intermediate, positions],
    )?;
    Ok(Encoder { config, names })
}

/// OpenCLIP, keeping its first `keep(resblocks)` layers (SD 2.x reads the penultimate
/// layer through the final norm, which is a model one layer shorter), with the projection
/// when `projection`.
pub(super) fn convert_open_clip(
    sub: &Sub,
    template: &str,
    drop_last: bool,
    projection: bool,
) -> Result<Encoder> {
    let blocks = sub.count("transformer.resblocks.");
    let layers = if drop_last {
        blocks.saturating_sub(1)
    } else {
        blocks
    };
    if layers == 0 {
        return Err(sub.layout_error("no transformer.resblocks"));
    }
    let mut names = NameMap::default();
    let full = |n: &str| format!("{}{n}", sub.prefix);
    let embeddings = [
        (
            "token_embedding.weight",
            "text_model.embeddings.token_embedding.weight",
        ),
        (
            "positional_embedding",
            "text_model.embeddings.position_embedding.weight",
        ),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
        ("ln_final.bias", "text_model.final_layer_norm.bias"),
    ];
    for (there, here) in embeddings {
        sub.need(there)?;
        names.add(here.into(), full(there), Reshape::Same);
    }
    if projection {
        sub.need("text_projection")?;
        names.add(
            "text_projection.weight".into(),
            full("text_projection"),
            Reshape::Transpose,
        );
    }
    let renames = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    for l in 0..layers {
        let block = format!("transformer.resblocks.{l}.");
        let here = format!("text_model.encoder.layers.{l}.");
        for name in sub.names().into_iter().filter(|n| n.starts_with(&block)) {
            let rest = &name[block.len()..];
            if let Some(kind) = rest.strip_prefix("attn.in_proj_") {
                for (index, qkv) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    let target = format!("{here}self_attn.{qkv}.{kind}");
                    names.add(target, full(name), Reshape::Rows { index, count: 3 });
                }
                continue;
            }
            let Some((from, to)) = renames.iter().find(|(from, _)| rest.starts_with(from)) else {
                return Err(sub.layout_error(format!("unknown tensor {name}")));
            };
            names.add(
                format!("{here}{to}{}", &rest[from.len()..]),
                full(name),
                Reshape::Same,
            );
        }
    }
    let (vocab, hidden) = matrix(sub, "token_embedding.weight")?;
    let intermediate = sub.dim("transformer.resblocks.0.mlp.c_fc.weight", 0)?;
    let positions = sub.dim("positional_embedding", 0)?;
    let mut config = config(
        sub,
        template,
        [vocab, hidden, layers, intermediate, positions],
    )?;
    if projection {
        config.insert(
            "projection_dim".into(),
            json!(sub.dim("text_projection", 1)?),
        );
    }
    Ok(Encoder { config, names })
}

fn matrix(sub: &Sub, name: &str) -> Result<(usize, usize)> {
    Ok((sub.dim(name, 0)?, sub.dim(name, 1)?))
}

/// The template with the numbers the shapes tell; heads of 64, as every SD text encoder has.
fn config(sub: &Sub, template: &str, numbers: [usize; 5]) -> Result<Map<String, Value>> {
    let [vocab, hidden, layers, intermediate, positions] = numbers;
    let mut c: Map<String, Value> =
        serde_json::from_str(template).map_err(|e| sub.layout_error(format!("template: {e}")))?;
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("intermediate_size".into(), json!(intermediate));
    c.insert("max_position_embeddings".into(), json!(positions));
    c.insert("num_attention_heads".into(), json!((hidden / 64).max(1)));
    Ok(c)
}
