//! Grouping items that can share a UNet batch.
use crate::pipeline::Sampling;

use super::plan::Job;

/// Whether images with these settings can share one UNet batch: same size, steps, scheduler,
/// Karras, guidance (the same guidance also means the same CFG doubling), generator and init
/// image. Prompts, negative prompts and seeds may differ.
pub fn same_batch(a: &Sampling, b: &Sampling) -> bool {
    let same_image = match (&a.image, &b.image) {
        (None, None) => true,
        (Some(x), Some(y)) => x.same(y),
        _ => false,
    };
    same_image
        && a.width == b.width
        && a.height == b.height
        && a.steps == b.steps
        && a.scheduler == b.scheduler
        && a.karras == b.karras
        && a.guidance.to_bits() == b.guidance.to_bits()
        && a.rng == b.rng
}

/// Jobs that can run together, in item order.
#[derive(Debug, Clone)]
pub struct Group<'a> {
    pub jobs: Vec<&'a Job>,
}

impl<'a> Group<'a> {
    /// The group's shared settings.
    pub fn sampling(&self) -> &'a Sampling {
        &self.jobs[0].sampling
    }

    /// The UNet batches: consecutive runs of at most `batch_size` jobs (`batch_size` >= 1).
    pub fn batches(&self, batch_size: usize) -> std::slice::Chunks<'_, &'a Job> {
        self.jobs.chunks(batch_size.max(1))
    }
}

/// Whether two jobs can share one UNet batch: [`same_batch`] settings and the same
/// `<lora:...>` tags (the UNet's weights depend on them).
pub fn same_group(a: &Job, b: &Job) -> bool {
    same_batch(&a.sampling, &b.sampling) && crate::lora::same_tags(&a.prompt, &b.prompt)
}

/// Groups jobs by [`same_group`]: groups in the order their first job comes, jobs in order.
/// Jobs with the same LoRAs are together, so a run switches LoRAs once per set.
pub fn group_jobs<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Vec<Group<'a>> {
    let mut groups: Vec<Group<'a>> = Vec::new();
    for job in jobs {
        match groups.iter_mut().find(|g| same_group(g.jobs[0], job)) {
            Some(g) => g.jobs.push(job),
            None => groups.push(Group { jobs: vec![job] }),
        }
    }
    groups
}
