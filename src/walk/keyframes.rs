//! Keyframes of a walk, from command-line lists or a TOML keyframe file (errors name the file
//! and line).
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::MAX_FRAMES;
use crate::{Error, Result, Setting};

/// One stop of a walk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyframe {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (empty for none).
    #[serde(default)]
    pub negative_prompt: String,
    /// Seed of the starting noise.
    pub seed: u64,
    /// Frames from this keyframe to the next (this keyframe's own frame included, the next
    /// one's not). `None` only for the last keyframe of a walk that does not loop.
    #[serde(default)]
    pub frames: Option<usize>,
    /// Classifier-free guidance scale at this keyframe.
    pub guidance: f64,
}

/// Keyframes from `--prompt` and `--seed` lists.
///
/// Equal counts pair up; one prompt with several seeds walks the noise only; several prompts
/// with one seed walk the text only. Every keyframe gets `frames` frames to the next, the given
/// negative prompt and guidance.
pub fn keyframes_from_flags(
    prompts: &[String],
    seeds: &[u64],
    frames: usize,
    negative_prompt: &str,
    guidance: f64,
) -> Result<Vec<Keyframe>> {
    let pairs: Vec<(&String, u64)> = match (prompts.len(), seeds.len()) {
        (0, _) => {
            return Err(Error::InvalidInput(
                "no prompt: a walk needs prompts (several to walk the text) or a keyframe file"
                    .into(),
            ))
        }
        (_, 0) => return Err(Error::InvalidInput("no seed given".into())),
        (p, s) if p == s => prompts.iter().zip(seeds.iter().copied()).collect(),
        (1, _) => seeds.iter().map(|&s| (&prompts[0], s)).collect(),
        (_, 1) => prompts.iter().map(|p| (p, seeds[0])).collect(),
        (p, s) => {
            return Err(Error::InvalidInput(format!(
                "{p} prompts and {s} seeds cannot be paired: give one prompt (walk the noise), \
                 one seed (walk the text) or as many seeds as prompts"
            )))
        }
    };
    if pairs.len() < 2 {
        return Err(Error::InvalidInput(
            "a walk needs at least two keyframes: give several prompts or several seeds".into(),
        ));
    }
    if frames == 0 {
        return Err(Error::setting(Setting::Frames, 0, "must be at least 1"));
    }
    Ok(pairs
        .into_iter()
        .map(|(prompt, seed)| Keyframe {
            prompt: prompt.clone(),
            negative_prompt: negative_prompt.to_string(),
            seed,
            frames: Some(frames),
            guidance,
        })
        .collect())
}

/// A keyframe file problem: the file, the 1-based line, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyframeFileError {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for KeyframeFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

impl std::error::Error for KeyframeFileError {}

impl From<KeyframeFileError> for Error {
    fn from(e: KeyframeFileError) -> Self {
        Error::InvalidInput(e.to_string())
    }
}

/// Values a keyframe file falls back to when neither the keyframe nor the file's top level sets
/// them (the command-line flags).
#[derive(Debug, Clone, PartialEq)]
pub struct FileDefaults {
    /// `--frames`, if given.
    pub frames: Option<usize>,
    /// `--negative-prompt`.
    pub negative_prompt: String,
    /// `--guidance`.
    pub guidance: f64,
}

/// The file as written: top-level defaults and `[[keyframe]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    frames: Option<Spanned<usize>>,
    seed: Option<u64>,
    negative_prompt: Option<String>,
    guidance: Option<Spanned<f64>>,
    #[serde(default)]
    keyframe: Vec<Spanned<FileKeyframe>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyframe {
    prompt: Spanned<String>,
    negative_prompt: Option<String>,
    seed: Option<u64>,
    frames: Option<Spanned<usize>>,
    guidance: Option<Spanned<f64>>,
}

/// Reads and parses a keyframe file; see [`parse_keyframes`].
pub fn read_keyframe_file(
    path: &Path,
    defaults: &FileDefaults,
    looped: bool,
) -> Result<Vec<Keyframe>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(parse_keyframes(&text, path, defaults, looped)?)
}

/// Parses a TOML keyframe file:
///
/// ```toml
/// frames = 24             # optional defaults for every keyframe
/// negative_prompt = "blurry"
/// guidance = 7.5
/// seed = 1
///
/// [[keyframe]]
/// prompt = "a red apple on a table"
/// seed = 42               # keyframe values win over the defaults above
/// frames = 12             # frames from here to the next keyframe
///
/// [[keyframe]]
/// prompt = "a green pear on a table"
/// guidance = 5
/// ```
///
/// A value missing from a keyframe comes from the top level, then from `defaults` (the flags).
/// `frames` is needed for every keyframe that starts a segment (all but the last unless
/// `looped`); `seed` for every keyframe. Errors carry `path`, the line and the reason.
pub fn parse_keyframes(
    text: &str,
    path: &Path,
    defaults: &FileDefaults,
    looped: bool,
) -> std::result::Result<Vec<Keyframe>, KeyframeFileError> {
    let error = |span: Option<Range<usize>>, message: String| KeyframeFileError {
        path: path.to_path_buf(),
        line: span.map_or(1, |s| line_of(text, s.start)),
        message,
    };
    let doc: FileDoc =
        toml::from_str(text).map_err(|e| error(e.span(), e.message().to_string()))?;

    let check_frames = |f: &Spanned<usize>| {
        if *f.get_ref() == 0 {
            Err(error(
                Some(f.span()),
                "frames must be at least 1".to_string(),
            ))
        } else if *f.get_ref() > MAX_FRAMES {
            Err(error(
                Some(f.span()),
                format!(
                    "frames = {}: a walk has at most {MAX_FRAMES} frames in all",
                    f.get_ref()
                ),
            ))
        } else {
            Ok(*f.get_ref())
        }
    };
    let check_guidance = |g: &Spanned<f64>| {
        if g.get_ref().is_finite() {
            Ok(*g.get_ref())
        } else {
            Err(error(
                Some(g.span()),
                "guidance must be a finite number".to_string(),
            ))
        }
    };
    let top_frames = doc.frames.as_ref().map(check_frames).transpose()?;
    let top_guidance = doc.guidance.as_ref().map(check_guidance).transpose()?;

    let count = doc.keyframe.len();
    if count < 2 {
        let span = doc.keyframe.last().map(|k| k.span());
        return Err(error(
            span,
            format!("a walk needs at least two [[keyframe]] tables, found {count}"),
        ));
    }
    let mut keyframes = Vec::with_capacity(count);
    for (i, spanned) in doc.keyframe.iter().enumerate() {
        let k = spanned.get_ref();
        // toml spans an array-of-tables entry by its `[[keyframe]]` header.
        let here = Some(spanned.span());
        let prompt = k.prompt.get_ref().clone();
        if prompt.trim().is_empty() {
            return Err(error(
                Some(k.prompt.span()),
                format!("keyframe {}: the prompt is empty", i + 1),
            ));
        }
        let Some(seed) = k.seed.or(doc.seed) else {
            return Err(error(
                here,
                format!(
                    "keyframe {}: no seed (set `seed = N` here or at the top of the file)",
                    i + 1
                ),
            ));
        };
        let frames = match &k.frames {
            Some(f) => Some(check_frames(f)?),
            None => top_frames.or(defaults.frames),
        };
        let needs_frames = looped || i + 1 < count;
        if needs_frames && frames.is_none() {
            return Err(error(
                here,
                format!(
                    "keyframe {}: no frame count to the next keyframe (set `frames = N` here or \
                     at the top of the file, or give a default frame count)",
                    i + 1
                ),
            ));
        }
        let guidance = match &k.guidance {
            Some(g) => check_guidance(g)?,
            None => top_guidance.unwrap_or(defaults.guidance),
        };
        keyframes.push(Keyframe {
            prompt,
            negative_prompt: k
                .negative_prompt
                .clone()
                .or_else(|| doc.negative_prompt.clone())
                .unwrap_or_else(|| defaults.negative_prompt.clone()),
            seed,
            frames: if needs_frames { frames } else { None },
            guidance,
        });
    }
    Ok(keyframes)
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> FileDefaults {
        FileDefaults {
            frames: None,
            negative_prompt: "flag negative".into(),
            guidance: 7.5,
        }
    }

    fn parse(text: &str) -> std::result::Result<Vec<Keyframe>, KeyframeFileError> {
        parse_keyframes(text, Path::new("walk.toml"), &defaults(), false)
    }

    fn err_at(text: &str, line: usize, words: &str) {
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains(words), "{e}");
        assert!(
            e.to_string().starts_with(&format!("walk.toml:{line}: ")),
            "{e}"
        );
    }

    const GOOD: &str = r#"# a walk
frames = 4
negative_prompt = "blurry"

[[keyframe]]
prompt = "a red apple"
seed = 1
frames = 2

[[keyframe]]
prompt = "a green pear"
seed = 2
guidance = 5
negative_prompt = ""

[[keyframe]]
prompt = "a yellow banana"
seed = 3
"#;

    #[test]
    fn a_good_file_with_defaults_and_overrides() {
        let k = parse(GOOD).unwrap();
        assert_eq!(k.len(), 3);
        assert_eq!(
            k[0],
            Keyframe {
                prompt: "a red apple".into(),
                negative_prompt: "blurry".into(),
                seed: 1,
                frames: Some(2),
                guidance: 7.5,
            }
        );
        assert_eq!((k[1].frames, k[1].guidance), (Some(4), 5.0));
        assert_eq!(k[1].negative_prompt, "");
        // The last keyframe of a walk without loop has no segment.
        assert_eq!(k[2].frames, None);
        let looped = parse_keyframes(GOOD, Path::new("walk.toml"), &defaults(), true).unwrap();
        assert_eq!(looped[2].frames, Some(4));
    }

    #[test]
    fn flags_fill_what_the_file_leaves_out() {
        let text =
            "[[keyframe]]\nprompt = \"a\"\nseed = 1\n[[keyframe]]\nprompt = \"b\"\nseed = 2\n";
        let d = FileDefaults {
            frames: Some(6),
            ..defaults()
        };
        let k = parse_keyframes(text, Path::new("w.toml"), &d, false).unwrap();
        assert_eq!(k[0].frames, Some(6));
        assert_eq!(k[0].negative_prompt, "flag negative");
        assert_eq!(k[1].guidance, 7.5);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        err_at("[[keyframe]]\nprompt = \"a\nseed = 1\n", 2, "");
        err_at(
            "frames = 3\n\n[[keyframe]]\nprompt = \"a\"\nseed = -1\n",
            5,
            "u64",
        );
    }

    #[test]
    fn unknown_and_missing_fields_name_the_line() {
        err_at(
            "[[keyframe]]\nprompt = \"a\"\nseed = 1\nfarmes = 3\n[[keyframe]]\nprompt = \"b\"\nseed = 2\n",
            4,
            "farmes",
        );
        let e =
            parse("[[keyframe]]\nprompt = \"a\"\nseed = 1\nframes = 2\n\n[[keyframe]]\nseed = 2\n")
                .unwrap_err();
        assert!(e.message.contains("prompt"), "{e}");
        assert!(e.line >= 6, "{e}");
    }

    #[test]
    fn bad_values_name_their_line() {
        err_at(
            "[[keyframe]]\nprompt = \"a\"\nseed = 1\nframes = 0\n[[keyframe]]\nprompt = \"b\"\nseed = 2\n",
            4,
            "at least 1",
        );
        err_at(
            "[[keyframe]]\nprompt = \"a\"\nseed = 1\nframes = 2\n[[keyframe]]\nprompt = \"  \"\nseed = 2\n",
            6,
            "prompt is empty",
        );
        err_at(
            "[[keyframe]]\nprompt = \"a\"\nseed = 1\nframes = 2\nguidance = nan\n[[keyframe]]\nprompt = \"b\"\nseed = 2\n",
            5,
            "finite",
        );
    }

    #[test]
    fn missing_seed_or_frames_point_at_the_keyframe() {
        err_at(
            "[[keyframe]]\nprompt = \"a\"\nseed = 1\nframes = 2\n\n[[keyframe]]\nprompt = \"b\"\n",
            6,
            "keyframe 2: no seed",
        );
        err_at(
            "[[keyframe]]\nprompt = \"a\"\nseed = 1\n\n[[keyframe]]\nprompt = \"b\"\nseed = 2\n",
            1,
            "keyframe 1: no frame count",
        );
        // A top-level seed serves every keyframe.
        let k = parse(
            "seed = 9\nframes = 2\n[[keyframe]]\nprompt = \"a\"\n[[keyframe]]\nprompt = \"b\"\n",
        )
        .unwrap();
        assert_eq!((k[0].seed, k[1].seed), (9, 9));
    }

    #[test]
    fn fewer_than_two_keyframes() {
        err_at("frames = 2\n", 1, "found 0");
        err_at(
            "frames = 2\n[[keyframe]]\nprompt = \"a\"\nseed = 1\n",
            2,
            "found 1",
        );
    }

    #[test]
    fn flags_pair_up_or_walk_one_axis() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let k = keyframes_from_flags(&p(&["a", "b"]), &[1, 2], 3, "", 7.5).unwrap();
        assert_eq!(
            k.iter()
                .map(|k| (k.prompt.as_str(), k.seed))
                .collect::<Vec<_>>(),
            [("a", 1), ("b", 2)]
        );
        let k = keyframes_from_flags(&p(&["a"]), &[1, 2, 3], 3, "", 7.5).unwrap();
        assert_eq!(k.len(), 3);
        assert!(k.iter().all(|k| k.prompt == "a"));
        let k = keyframes_from_flags(&p(&["a", "b", "c"]), &[5], 3, "neg", 7.5).unwrap();
        assert!(k.iter().all(|k| k.seed == 5 && k.negative_prompt == "neg"));
        assert!(k.iter().all(|k| k.frames == Some(3)));

        let e = keyframes_from_flags(&p(&["a", "b", "c"]), &[1, 2], 3, "", 7.5).unwrap_err();
        assert!(e.to_string().contains("3 prompts and 2 seeds"), "{e}");
        let e = keyframes_from_flags(&p(&["a"]), &[1], 3, "", 7.5).unwrap_err();
        assert!(e.to_string().contains("at least two keyframes"), "{e}");
        let e = keyframes_from_flags(&p(&["a", "b"]), &[1], 0, "", 7.5).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Setting {
                    setting: Setting::Frames,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn keyframes_round_trip_through_json() {
        let k = parse(GOOD).unwrap();
        let json = serde_json::to_string(&k).unwrap();
        let back: Vec<Keyframe> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, k);
    }
}
