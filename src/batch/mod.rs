//! `latent batch`: prompt files in, one folder of PNGs and a manifest out. The folder follows
//! the run: prompt files are parsed ([`prompt_file`]) and resolved into items ([`plan`]),
//! grouped into UNet batches ([`group`]) and rendered ([`render`]) under their file names
//! ([`naming`]), each recorded in the manifest ([`manifest`]) so a stopped run resumes. The run
//! loop itself is [`Batch`] ([`run`]); `--check` is [`Batch::check`]; shards and their merge
//! are in [`shard`].
mod check;
mod group;
mod manifest;
mod naming;
mod plan;
mod prompt_file;
mod render;
mod run;
mod shard;
#[cfg(test)]
mod tests;

pub use check::{CheckGroup, CheckItem, CheckReport};
pub use group::*;
pub use manifest::*;
pub use naming::*;
pub use plan::*;
pub use prompt_file::*;
pub use render::*;
pub use run::{Access, Batch, BatchConfig, BatchEvent, Stop, Summary};
pub use shard::{
    manifest_files, merge, read_all, MergeReport, Shard, K8S_INDEX_ENV, SHARD_COUNT_ENV,
    SLURM_COUNT_ENV, SLURM_ID_ENV, SLURM_MIN_ENV,
};
