//! A checkpoint's header seen under one component's key prefix, and the list of names a
//! component's loader reads, built from it.
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use safetensors::tensor::TensorInfo;

use crate::model::weights::Reshape;
use crate::{Error, Result, Setting};

/// The tensors of a checkpoint whose names start with `prefix` (given without it).
pub(super) struct Sub<'a> {
    pub path: &'a Path,
    pub header: &'a HashMap<String, TensorInfo>,
    pub prefix: String,
}

impl<'a> Sub<'a> {
    pub fn new(path: &'a Path, header: &'a HashMap<String, TensorInfo>, prefix: &str) -> Self {
        Self {
            path,
            header,
            prefix: prefix.to_string(),
        }
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&'a [usize]> {
        self.header
            .get(&format!("{}{name}", self.prefix))
            .map(|i| i.shape.as_slice())
    }

    /// The shape of `name`, which the layout requires.
    pub fn need(&self, name: &str) -> Result<&'a [usize]> {
        self.shape(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.to_path_buf(),
            name: format!("{}{name}", self.prefix),
        })
    }

    /// Dimension `dim` of `name`'s shape, which must have at least `dim + 1` dimensions.
    pub fn dim(&self, name: &str, dim: usize) -> Result<usize> {
        let shape = self.need(name)?;
        shape.get(dim).copied().ok_or_else(|| Error::Weights {
            path: self.path.to_path_buf(),
            message: format!(
                "tensor `{}{name}` has shape {shape:?}, expected at least {} dimensions",
                self.prefix,
                dim + 1
            ),
        })
    }

    /// Whether any tensor starts with `start` (under the prefix).
    pub fn any(&self, start: &str) -> bool {
        let full = format!("{}{start}", self.prefix);
        self.header.keys().any(|k| k.starts_with(&full))
    }

    /// The names under the prefix, without it, in order.
    pub fn names(&self) -> BTreeSet<&'a str> {
        self.header
            .keys()
            .filter_map(|k| k.strip_prefix(self.prefix.as_str()))
            .collect()
    }

    /// The distinct integers `n` of names `{start}{n}.…`, ascending.
    pub fn indexes(&self, start: &str) -> Vec<usize> {
        let mut found: Vec<usize> = self
            .names()
            .into_iter()
            .filter_map(|n| n.strip_prefix(start))
            .filter_map(|rest| rest.split('.').next()?.parse().ok())
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }

    /// The number of entries `{start}0.`, `{start}1.`, … (consecutive from 0).
    pub fn count(&self, start: &str) -> usize {
        let found = self.indexes(start);
        found
            .iter()
            .enumerate()
            .take_while(|(i, n)| i == *n)
            .count()
    }

    /// An error about the layout of this part of the file.
    pub fn layout_error(&self, message: impl std::fmt::Display) -> Error {
        Error::setting(
            Setting::Model,
            self.path.display().to_string(),
            format!("unexpected layout under `{}`: {message}", self.prefix),
        )
    }
}

/// Names a loader reads, each with the name in the file and how its shape changes.
#[derive(Default)]
pub(super) struct NameMap {
    pub entries: Vec<(String, String, Reshape)>,
}

impl NameMap {
    /// Adds `here` read from `there` (both full names).
    pub fn add(&mut self, here: String, there: String, reshape: Reshape) {
        self.entries.push((here, there, reshape));
    }
}

/// Maps every name under `sub`'s prefix through `rules`, a list of (start in the file, start
/// here, how to rename what follows), longest start first; names no rule takes are returned.
pub(super) fn map_by_prefix(
    sub: &Sub,
    rules: &[(String, String, Tail)],
    out: &mut NameMap,
    here_prefix: &str,
) -> Vec<String> {
    let mut rules: Vec<&(String, String, Tail)> = rules.iter().collect();
    rules.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    let mut unknown = Vec::new();
    for name in sub.names() {
        let Some((from, to, tail)) = rules.iter().find(|r| name.starts_with(r.0.as_str())) else {
            unknown.push(name.to_string());
            continue;
        };
        let rest = &name[from.len()..];
        let Some((rest, reshape)) = tail.map(rest, sub.shape(name).unwrap_or(&[])) else {
            unknown.push(name.to_string());
            continue;
        };
        out.add(
            format!("{here_prefix}{to}{rest}"),
            format!("{}{name}", sub.prefix),
            reshape,
        );
    }
    unknown
}

/// How the part of a name after a block's start is renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tail {
    /// Kept as it is.
    Same,
    /// An LDM UNet residual block (`in_layers.0` -> `norm1`, …).
    UnetResnet,
    /// An LDM VAE residual block (`nin_shortcut` -> `conv_shortcut`).
    VaeResnet,
    /// An LDM VAE attention block (`q` -> `to_q`, 1x1 convolutions read as matrices).
    VaeAttention,
}

impl Tail {
    /// The renamed rest and its reshape, or `None` for a name this block does not have.
    fn map(self, rest: &str, shape: &[usize]) -> Option<(String, Reshape)> {
        let table: &[(&str, &str)] = match self {
            Tail::Same => return Some((rest.to_string(), Reshape::Same)),
            Tail::UnetResnet => &[
                ("in_layers.0.", "norm1."),
                ("in_layers.2.", "conv1."),
                ("emb_layers.1.", "time_emb_proj."),
                ("out_layers.0.", "norm2."),
                ("out_layers.3.", "conv2."),
                ("skip_connection.", "conv_shortcut."),
            ],
            Tail::VaeResnet => &[
                ("norm1.", "norm1."),
                ("conv1.", "conv1."),
                ("norm2.", "norm2."),
                ("conv2.", "conv2."),
                ("nin_shortcut.", "conv_shortcut."),
            ],
            Tail::VaeAttention => &[
                ("norm.", "group_norm."),
                ("q.", "to_q."),
                ("k.", "to_k."),
                ("v.", "to_v."),
                ("proj_out.", "to_out.0."),
            ],
        };
        let (from, to) = table.iter().find(|(from, _)| rest.starts_with(from))?;
        let reshape = if self == Tail::VaeAttention && shape.len() == 4 {
            Reshape::Squeeze
        } else {
            Reshape::Same
        };
        Some((format!("{to}{}", &rest[from.len()..]), reshape))
    }
}

/// An error listing the first few names of a part that nothing reads.
pub(super) fn unknown_error(sub: &Sub, unknown: &[String]) -> Error {
    let shown: Vec<&str> = unknown.iter().take(3).map(String::as_str).collect();
    sub.layout_error(format!(
        "{} tensor{} of no known layer ({}{})",
        unknown.len(),
        if unknown.len() == 1 { "" } else { "s" },
        shown.join(", "),
        if unknown.len() > 3 { ", ..." } else { "" }
    ))
}

/// Group norms' group count, which the weights do not hold: 32, as in every SD model, or the
/// largest power of two dividing every width when 32 does not (a toy model's).
pub(super) fn norm_groups(channels: &[usize]) -> usize {
    let mut groups = 32;
    while groups > 1 && channels.iter().any(|c| c % groups != 0) {
        groups /= 2;
    }
    groups
}
