//! Output file names: the `--filename` template and its fields.
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use crate::{Error, Result};

use super::plan::Job;

/// The default output file name template.
pub const DEFAULT_TEMPLATE: &str = "{index:05}-{seed}-{prompt_slug}.png";

/// Longest prompt slug, in bytes (file names stay well under the usual 255-byte limit).
pub const SLUG_MAX_BYTES: usize = 48;

/// A fields a file name template can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Index,
    Seed,
    PromptSlug,
    File,
    Line,
    Width,
    Height,
    Steps,
}

impl Field {
    const ALL: [(&'static str, Field); 8] = [
        ("index", Field::Index),
        ("seed", Field::Seed),
        ("prompt_slug", Field::PromptSlug),
        ("file", Field::File),
        ("line", Field::Line),
        ("width", Field::Width),
        ("height", Field::Height),
        ("steps", Field::Steps),
    ];

    fn is_number(self) -> bool {
        !matches!(self, Field::PromptSlug | Field::File)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field { field: Field, zero_pad: usize },
}

/// An output file name template: text with `{field}` or `{field:0N}` (zero-padded to N digits)
/// placeholders, relative to the output folder and ending in `.png`. Fields: `index`, `seed`,
/// `prompt_slug`, `file` (the prompt file's stem, slugged), `line`, `width`, `height`, `steps`.
/// `{{` and `}}` are literal braces; `/` makes subfolders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    parts: Vec<Part>,
}

impl FromStr for NameTemplate {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::InvalidInput(format!("--filename `{s}`: {why}"));
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => {
                    return Err(bad(
                        "a `}` without `{` (write `}}` for a literal one)".into()
                    ))
                }
                '{' => {
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => inner.push(c),
                            None => return Err(bad("a `{` is never closed".into())),
                        }
                    }
                    let (name, spec) = match inner.split_once(':') {
                        Some((n, sp)) => (n, Some(sp)),
                        None => (inner.as_str(), None),
                    };
                    let Some(&(_, field)) = Field::ALL.iter().find(|(n, _)| *n == name) else {
                        let known: Vec<&str> = Field::ALL.iter().map(|(n, _)| *n).collect();
                        return Err(bad(format!(
                            "unknown field {{{name}}}; known: {}",
                            known.join(", ")
                        )));
                    };
                    let zero_pad = match spec {
                        None => 0,
                        Some(sp) => {
                            let digits = sp.strip_prefix('0').filter(|_| field.is_number());
                            match digits.and_then(|d| d.parse::<usize>().ok()) {
                                Some(n) if (1..=20).contains(&n) => n,
                                _ => {
                                    return Err(bad(format!(
                                        "{{{inner}}}: the only format is zero padding of a \
                                         number field, like {{index:05}}"
                                    )))
                                }
                            }
                        }
                    };
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field { field, zero_pad });
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        let template = NameTemplate { parts };
        // Fields never hold separators, so the shape of the path shows with placeholders.
        let skeleton = template.render_with(&|_| "x".to_string());
        if !skeleton.to_ascii_lowercase().ends_with(".png") {
            return Err(bad("must end in .png".into()));
        }
        if skeleton.contains('\\') {
            return Err(bad("use / for subfolders".into()));
        }
        let path = Path::new(&skeleton);
        if !path.components().all(|c| matches!(c, Component::Normal(_)))
            || skeleton.split('/').any(|part| part.is_empty())
        {
            return Err(bad(
                "must be a relative path inside the output folder (no leading /, no . or .., \
                 no empty parts)"
                    .into(),
            ));
        }
        Ok(template)
    }
}

impl NameTemplate {
    /// The file for `job`, relative to the output folder.
    pub fn render(&self, job: &Job) -> PathBuf {
        PathBuf::from(self.render_with(&|field| {
            match field {
                Field::Index => job.index.to_string(),
                Field::Seed => job.seed.to_string(),
                Field::PromptSlug => prompt_slug(&job.prompt),
                Field::File => prompt_slug(
                    &job.path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                Field::Line => job.line.to_string(),
                Field::Width => job.sampling.width.to_string(),
                Field::Height => job.sampling.height.to_string(),
                Field::Steps => job.sampling.steps.to_string(),
            }
        }))
    }

    fn render_with(&self, value: &dyn Fn(Field) -> String) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field { field, zero_pad } => {
                    let v = value(*field);
                    out.push_str(&format!("{v:0>zero_pad$}"));
                }
            }
        }
        out
    }

    /// The file of every job, relative to the output folder; an error names two items that
    /// would share a name (the template needs `{index}` or `{seed}`).
    pub fn assign(&self, jobs: &[Job]) -> Result<Vec<PathBuf>> {
        let mut seen: HashMap<PathBuf, &Job> = HashMap::new();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let name = self.render(job);
            if let Some(other) = seen.insert(name.clone(), job) {
                return Err(Error::InvalidInput(format!(
                    "--filename gives items {} ({}) and {} ({}) the same file {}; add {{index}} \
                     to the template",
                    other.index,
                    other.source(),
                    job.index,
                    job.source(),
                    name.display()
                )));
            }
            out.push(name);
        }
        Ok(out)
    }
}

/// A short, filesystem-safe form of a prompt for file names: lowercase letters and digits (any
/// script), other characters turned into single `_`, at most [`SLUG_MAX_BYTES`] bytes cut at a
/// word boundary when there is one; `prompt` when nothing is left. Names Windows reserves
/// (`con`, `nul`, `com1`, ...) get a trailing `_`.
pub fn prompt_slug(prompt: &str) -> String {
    let mut slug = String::new();
    let mut gap = false;
    for c in prompt.chars().flat_map(char::to_lowercase) {
        if !c.is_alphanumeric() {
            gap = true;
            continue;
        }
        let sep = gap && !slug.is_empty();
        if slug.len() + usize::from(sep) + c.len_utf8() > SLUG_MAX_BYTES {
            // Prefer ending at a word boundary over a cut word.
            if !sep {
                if let Some(cut) = slug.rfind('_') {
                    slug.truncate(cut);
                }
            }
            break;
        }
        if sep {
            slug.push('_');
        }
        slug.push(c);
        gap = false;
    }
    if slug.is_empty() {
        slug.push_str("prompt");
    }
    const RESERVED: &[&str] = &["con", "prn", "aux", "nul"];
    let reserved_numbered = (slug.starts_with("com") || slug.starts_with("lpt"))
        && slug.len() == 4
        && slug.as_bytes()[3].is_ascii_digit();
    if RESERVED.contains(&slug.as_str()) || reserved_numbered {
        slug.push('_');
    }
    slug
}
