//! Output files: AUTOMATIC1111-style "parameters" text, PNG writing with that text embedded, safe
//! (atomic, no-clobber) file replacement, and the choice of output file names.
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};

use crate::files::{write_atomic, Replace};
use crate::{Error, Result};

/// PNG text keyword under which AUTOMATIC1111 (and tools that read its files) keep the settings.
pub const PARAMETERS_KEY: &str = "parameters";

/// The settings of one generated image, as AUTOMATIC1111 records them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationParams {
    /// The prompt; may span several lines.
    pub prompt: String,
    /// The negative prompt; empty when none was given.
    pub negative_prompt: String,
    /// Number of denoising steps.
    pub steps: usize,
    /// Sampler under its AUTOMATIC1111 name, e.g. "DPM++ 2M" or "Euler a".
    pub sampler: String,
    /// Schedule type under its AUTOMATIC1111 name, e.g. "Karras"; `None` leaves the key out.
    pub schedule_type: Option<String>,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// Seed of this image's noise.
    pub seed: u64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Model name; an empty name leaves the key out.
    pub model: String,
    /// Further `Key: value` pairs appended in order after `Model` (e.g. `("Model hash", ..)`).
    ///
    /// Keys should consist of letters, digits, `_`, spaces, `-` and `/`, as AUTOMATIC1111's keys
    /// do; other keys are written as given but [`parse_a1111`] will not recognise the line.
    pub extra: Vec<(String, String)>,
}

impl GenerationParams {
    /// The settings as AUTOMATIC1111's "parameters" text (`create_infotext`).
    ///
    /// Line 1 is the prompt, then `Negative prompt: ...` when there is one, then one line of
    /// `Key: value` pairs joined by `, `. Values holding `,`, `:` or a newline are written as JSON
    /// strings, as A1111's `quote()` does; values starting with `"` are quoted too (A1111 does not,
    /// and then cannot read them back). A pair whose value equals its key is written as the bare
    /// key, as A1111 does. Like A1111, the whole text is stripped of surrounding whitespace.
    pub fn to_a1111(&self) -> String {
        let mut pairs: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.clone()),
        ];
        if let Some(schedule) = &self.schedule_type {
            pairs.push(("Schedule type", schedule.clone()));
        }
        pairs.push(("CFG scale", format_float(self.cfg_scale)));
        pairs.push(("Seed", self.seed.to_string()));
        pairs.push(("Size", format!("{}x{}", self.width, self.height)));
        if !self.model.is_empty() {
            pairs.push(("Model", self.model.clone()));
        }
        pairs.extend(self.extra.iter().map(|(k, v)| (k.as_str(), v.clone())));

        let settings = pairs
            .iter()
            .map(|(key, value)| {
                if key == value {
                    key.to_string()
                } else {
                    format!("{key}: {}", quote(value))
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let negative = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        format!("{}{negative}\n{settings}", self.prompt)
            .trim()
            .to_string()
    }
}

/// Formats a float the way a user would type it: `7.0` as `7`, `7.5` as `7.5`.
///
/// AUTOMATIC1111 prints whatever number the UI handed over; integers without `.0` read best and
/// parse back to the same value.
fn format_float(value: f64) -> String {
    // Rust's `Display` for f64 already prints the shortest text that reads back to the same value
    // and drops a zero fraction.
    format!("{value}")
}

/// AUTOMATIC1111's `quote()`: JSON-encode a value holding a character that would break the
/// `Key: value, Key: value` line (`json.dumps(ensure_ascii=False)`, which serde_json matches).
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) || value.starts_with('"') {
        serde_json::Value::from(value).to_string()
    } else {
        value.to_string()
    }
}

/// AUTOMATIC1111 "parameters" text split back into its parts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedParameters {
    /// The prompt (every line before `Negative prompt:` or the settings line).
    pub prompt: String,
    /// The negative prompt; empty when the text has none.
    pub negative_prompt: String,
    /// The settings line's pairs in order, quoted values decoded; empty when there is no settings
    /// line. A bare key (A1111 writes those when value equals key) appears as `(key, key)`.
    pub settings: Vec<(String, String)>,
}

impl ParsedParameters {
    /// The value of the first setting named `key`, e.g. `get("Seed")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads AUTOMATIC1111 "parameters" text (ours from [`GenerationParams::to_a1111`] or A1111's own).
///
/// As in A1111's `parse_generation_parameters`, the last line is the settings line when it reads
/// as `Key: value, Key: value` pairs (quoted values as JSON strings) with a `Steps` key; otherwise
/// the text has no settings and every line is prompt. The first line starting with
/// `Negative prompt:` ends the prompt, so a prompt with such a line cannot round-trip (the format
/// cannot tell them apart). Unlike A1111, lines are not stripped, so multi-line prompts round-trip
/// exactly apart from surrounding whitespace of the whole text.
///
/// Errors when the settings line holds a quoted value that is not a valid JSON string.
pub fn parse_a1111(text: &str) -> Result<ParsedParameters> {
    let text = text.trim();
    let mut lines: Vec<&str> = text.split('\n').collect();
    let settings = match lines.last().map(|line| parse_settings_line(line)) {
        Some(Ok(Some(settings))) => {
            lines.pop();
            settings
        }
        Some(Err(e)) => return Err(e),
        Some(Ok(None)) | None => Vec::new(),
    };

    let mut prompt: Vec<&str> = Vec::new();
    let mut negative: Option<Vec<&str>> = None;
    for line in lines {
        match &mut negative {
            Some(negative) => negative.push(line),
            None => match line.strip_prefix("Negative prompt:") {
                // We write one space after the colon; more are part of the negative prompt.
                Some(rest) => negative = Some(vec![rest.strip_prefix(' ').unwrap_or(rest)]),
                None => prompt.push(line),
            },
        }
    }
    Ok(ParsedParameters {
        prompt: prompt.join("\n"),
        negative_prompt: negative.map(|n| n.join("\n")).unwrap_or_default(),
        settings,
    })
}

/// A value of the settings line before JSON decoding.
enum RawValue<'a> {
    Plain(&'a str),
    Quoted(&'a str),
}

/// Splits a settings line into pairs; `Ok(None)` when the line is not one (some part does not
/// read as `Key: value` or a bare key, or there is no `Steps` key).
fn parse_settings_line(line: &str) -> Result<Option<Vec<(String, String)>>> {
    let mut raw: Vec<(&str, RawValue)> = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let key_end = rest.find([':', ',']).unwrap_or(rest.len());
        let key = rest[..key_end].trim();
        if !is_settings_key(key) {
            return Ok(None);
        }
        let Some(after_colon) = rest[key_end..].strip_prefix(':') else {
            // A bare key, written by A1111 when value == key.
            raw.push((key, RawValue::Plain(key)));
            rest = rest[key_end..].trim_start_matches(',').trim_start();
            continue;
        };
        let value = after_colon.trim_start();
        let (value, after_value) = if value.starts_with('"') {
            let Some(close) = closing_quote(value) else {
                return Ok(None);
            };
            (RawValue::Quoted(&value[..=close]), &value[close + 1..])
        } else {
            let end = value.find(',').unwrap_or(value.len());
            (RawValue::Plain(value[..end].trim_end()), &value[end..])
        };
        raw.push((key, value));
        let after_value = after_value.trim_start();
        rest = match after_value.strip_prefix(',') {
            Some(next) => next.trim_start(),
            None if after_value.is_empty() => after_value,
            None => return Ok(None),
        };
    }
    if !raw
        .iter()
        .any(|(k, v)| *k == "Steps" && !matches!(v, RawValue::Plain(p) if p == k))
    {
        return Ok(None);
    }
    raw.into_iter()
        .map(|(key, value)| {
            let value = match value {
                RawValue::Plain(v) => v.to_string(),
                RawValue::Quoted(q) => serde_json::from_str::<String>(q).map_err(|e| {
                    Error::InvalidInput(format!(
                        "parameters: value of `{key}` is not a valid JSON string ({e}): {q}"
                    ))
                })?,
            };
            Ok((key.to_string(), value))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Keys as A1111's parser accepts them (`\w[\w \-/]*`).
fn is_settings_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_alphanumeric() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ' ' | '-' | '/'))
}

/// Byte index of the `"` closing the JSON string that starts at `s[0]`, skipping escapes.
fn closing_quote(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Writes an 8-bit RGB image (`rgb` is `height x width x 3`, row-major) to `path` as PNG, with
/// `parameters` in a `parameters` text chunk.
///
/// The chunk is tEXt when the text is Latin-1, otherwise uncompressed iTXt, which is what
/// AUTOMATIC1111 gets from PIL. The file is written to a hidden temporary file in the same
/// folder, synced, then moved into place, so `path` never holds a partial image; the temporary
/// file is removed on every error. The parent folder is created when missing.
///
/// With `overwrite == false` an existing `path` is an error naming it, and the file is left
/// untouched even when another process creates it meanwhile (the final step is a hard link,
/// which fails when the name exists). With `overwrite == true` it is replaced atomically.
pub fn write_png(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    parameters: &str,
    overwrite: bool,
) -> Result<()> {
    let expected = (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3));
    if width == 0 || height == 0 || expected != Some(rgb.len()) {
        return Err(Error::InvalidInput(format!(
            "{}: image buffer has {} bytes, expected {width}x{height}x3",
            path.display(),
            rgb.len()
        )));
    }
    let replace = if overwrite {
        Replace::Overwrite
    } else {
        Replace::NoClobber
    };
    write_atomic(path, replace, |file, _| {
        encode_png(file, path, rgb, width, height, parameters)
    })
}

/// [`write_png`] for an image the pipeline made (its bytes and size).
pub fn write_image(
    path: &Path,
    image: &crate::pipeline::GeneratedImage,
    parameters: &str,
    overwrite: bool,
) -> Result<()> {
    write_png(
        path,
        &image.rgb,
        image.width as u32,
        image.height as u32,
        parameters,
        overwrite,
    )
}

/// The PNG [`write_image`] would write for `image`, as bytes in memory (a server's answer).
pub fn png_bytes(image: &crate::pipeline::GeneratedImage, parameters: &str) -> Result<Vec<u8>> {
    encode_rgb(
        &image.rgb,
        image.width as u32,
        image.height as u32,
        parameters,
    )
}

/// An 8-bit RGB buffer of `width` x `height` as PNG bytes with the `parameters` text.
pub fn encode_rgb(rgb: &[u8], width: u32, height: u32, parameters: &str) -> Result<Vec<u8>> {
    let label = Path::new("(in memory)");
    let expected = (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3));
    if width == 0 || height == 0 || expected != Some(rgb.len()) {
        return Err(Error::InvalidInput(format!(
            "image buffer has {} bytes, expected {width}x{height}x3",
            rgb.len()
        )));
    }
    let mut bytes = Vec::new();
    encode_png(&mut bytes, label, rgb, width, height, parameters)?;
    Ok(bytes)
}

/// Encodes the PNG into `file` (synced to disk by the caller when it is one); errors name
/// `path`, the final target.
fn encode_png(
    file: impl io::Write,
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    parameters: &str,
) -> Result<()> {
    let encode_error = |e: png::EncodingError| match e {
        png::EncodingError::IoError(e) => Error::io(path, e),
        e => Error::Image {
            path: path.to_path_buf(),
            message: format!("cannot encode PNG: {e}"),
        },
    };
    let mut out = BufWriter::new(file);
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let latin1 = parameters.chars().all(|c| u32::from(c) <= 0xFF);
    if latin1 {
        encoder.add_text_chunk(PARAMETERS_KEY.into(), parameters.into())
    } else {
        // `ITXtChunk::new` leaves the text uncompressed, as PIL writes it for A1111.
        encoder.add_itxt_chunk(PARAMETERS_KEY.into(), parameters.into())
    }
    .map_err(encode_error)?;
    let mut writer = encoder.write_header().map_err(encode_error)?;
    writer.write_image_data(rgb).map_err(encode_error)?;
    writer.finish().map_err(encode_error)?;
    io::Write::flush(&mut out).map_err(|e| Error::io(path, e))
}

/// Reads the `parameters` text back from a PNG's tEXt, zTXt or iTXt chunks.
///
/// `Ok(None)` when the PNG has no such chunk. The whole file is read, so chunks after the image
/// data count and a truncated or corrupt file is an error naming `path`.
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let image_error = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    let decode_error = |e: png::DecodingError| image_error(format!("not a valid PNG: {e}"));
    let mut reader = png::Decoder::new(BufReader::new(file))
        .read_info()
        .map_err(decode_error)?;
    reader.finish().map_err(decode_error)?;

    let info = reader.info();
    if let Some(chunk) = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
    {
        return Ok(Some(chunk.text.clone()));
    }
    let text_error = |e: png::DecodingError| image_error(format!("`parameters` chunk: {e}"));
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return chunk.get_text().map(Some).map_err(text_error);
    }
    if let Some(chunk) = info
        .compressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
    {
        return chunk.get_text().map(Some).map_err(text_error);
    }
    Ok(None)
}

/// Chooses the file for each image, one per seed, before anything is generated.
///
/// - `target` `None`: folder mode in `default_dir`.
/// - `target` ending in `.png` (any case) and not an existing folder: file mode. One seed writes
///   exactly that file; several write `{stem}-{i}.png` with `i` counting from 0, zero-padded to
///   the width of the last index (`cat-0.png`..`cat-9.png`, `cat-00.png`..`cat-11.png`) so names
///   sort in order. With `overwrite == false`, an existing planned file is an error naming it.
/// - `target` with another extension (not an existing folder): error, only PNG is written.
/// - otherwise (no extension, trailing separator or an existing folder): folder mode there.
///
/// Folder mode names files `{index:05}-{seed}.png` like AUTOMATIC1111, the index continuing
/// after the highest leading number of any file name already in the folder (`00012-42.png`,
/// `00012.txt`), so it never overwrites and `overwrite` does not matter. A missing folder starts
/// at 0.
pub fn plan_output_paths(
    target: Option<&Path>,
    default_dir: &Path,
    seeds: &[u64],
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    let file = match target {
        None => None,
        Some(target) => classify_target(target)?,
    };
    let Some(file) = file else {
        let dir = target.unwrap_or(default_dir);
        return folder_paths(dir, seeds);
    };

    let paths = file_paths(file, seeds.len());
    if !overwrite {
        if let Some(existing) = paths.iter().find(|p| fs::symlink_metadata(p).is_ok()) {
            return Err(Error::io(
                existing,
                io::Error::new(io::ErrorKind::AlreadyExists, "file exists"),
            ));
        }
    }
    Ok(paths)
}

/// `Some(target)` when `target` names a PNG file, `None` when it names a folder.
fn classify_target(target: &Path) -> Result<Option<&Path>> {
    let trailing_separator = target
        .as_os_str()
        .to_string_lossy()
        .ends_with(std::path::is_separator);
    if trailing_separator || target.is_dir() {
        return Ok(None);
    }
    match target.extension() {
        None => Ok(None),
        Some(ext) if ext.eq_ignore_ascii_case("png") => Ok(Some(target)),
        Some(_) => Err(Error::InvalidInput(format!(
            "{}: only .png output is supported (to write into a folder with a dot in its name, \
             create the folder first)",
            target.display()
        ))),
    }
}

/// File mode names: `file` itself for one image, else `{stem}-{i}.{ext}`.
fn file_paths(file: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![file.to_path_buf()];
    }
    let stem = file.file_stem().unwrap_or_default();
    let ext = file.extension().unwrap_or_default();
    let width = count.saturating_sub(1).to_string().len();
    (0..count)
        .map(|i| {
            let mut name = stem.to_os_string();
            name.push(format!("-{i:0width$}."));
            name.push(ext);
            file.with_file_name(name)
        })
        .collect()
}

/// Folder mode names: `{index:05}-{seed}.png`, continuing after the files already in `dir`.
fn folder_paths(dir: &Path, seeds: &[u64]) -> Result<Vec<PathBuf>> {
    let names = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| Error::io(dir, e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let first = next_index(names.iter().filter_map(|n| n.to_str()));
    seeds
        .iter()
        .enumerate()
        .map(|(i, seed)| {
            let index = first.checked_add(i as u64).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{}: file numbering is exhausted; use another folder",
                    dir.display()
                ))
            })?;
            Ok(dir.join(format!("{index:05}-{seed}.png")))
        })
        .collect()
}

/// One past the highest leading number among `names` (A1111's `get_next_sequence_number`: the
/// digits before the first `-` or `.`); 0 when none has one.
fn next_index<'a>(names: impl Iterator<Item = &'a str>) -> u64 {
    names
        .filter_map(|name| {
            let prefix = name.split(['-', '.']).next()?;
            if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Numbers beyond u64 cannot collide with the names we make, so they do not count.
            prefix.parse::<u64>().ok()
        })
        .max()
        .map_or(0, |max| max.saturating_add(1))
}

impl GenerationParams {
    /// The metadata of one image made by `model`: prompt, negative prompt, sampling settings,
    /// seed, and after AUTOMATIC1111's standard keys the VAE when replaced (A1111's `VAE` key),
    /// img2img's `Denoising strength` (and inpainting's `Masked content` when not the
    /// original), SDXL's size conditioning when set, the noise generator (`RNG`, as A1111) and the dtype
    /// the model ran in (`Precision: f32`, `f16` or `bf16`; A1111 has no such key, since its
    /// precision is a global setting, but here the same settings in another dtype give other
    /// pixels).
    pub fn for_image(
        model: &crate::pipeline::StableDiffusion,
        prompt: &str,
        negative_prompt: &str,
        s: &crate::pipeline::Sampling,
        seed: u64,
    ) -> GenerationParams {
        let mut extra = Vec::new();
        if let Some(vae) = model.vae_name() {
            extra.push(("VAE".into(), vae.to_string()));
        }
        // img2img and inpainting: A1111's key; the picture itself is not recorded (as A1111).
        if let Some(image) = &s.image {
            extra.push(("Denoising strength".into(), image.strength().to_string()));
            // A1111 writes the masked content when it is not the original picture.
            let content = image.masked_content();
            if image.mask().is_some() && content != crate::pipeline::MaskedContent::Original {
                extra.push(("Masked content".into(), content.a1111_name().to_string()));
            }
        }
        // Only SDXL models accept size conditioning (`check_inputs`), so set sizes are theirs.
        let c = &s.size_conditioning;
        let size = |key: &str, v: Option<(usize, usize)>, sep: &str| {
            v.map(|(a, b)| (key.to_string(), format!("{a}{sep}{b}")))
        };
        extra.extend(
            [
                size("Original size", c.original_size, "x"),
                size("Crop top-left", c.crop_top_left, ","),
                size("Target size", c.target_size, "x"),
                size("Negative original size", c.negative_original_size, "x"),
                size("Negative crop top-left", c.negative_crop_top_left, ","),
                size("Negative target size", c.negative_target_size, "x"),
            ]
            .into_iter()
            .flatten(),
        );
        // AUTOMATIC1111 writes clip skip above 1 (even where it has no effect), before RNG.
        if s.text.clip_skip > 1 {
            extra.push(("Clip skip".into(), s.text.clip_skip.to_string()));
        }
        extra.push(("RNG".into(), s.rng.to_string()));
        extra.push(("Precision".into(), model.dtype().as_str().to_string()));
        // AUTOMATIC1111's syntax is what its infotexts mean; plain text is said.
        if s.text.syntax == crate::prompt::PromptSyntax::Plain {
            extra.push(("Prompt syntax".into(), "plain".into()));
        }
        GenerationParams {
            prompt: model.recorded_prompt(prompt),
            negative_prompt: negative_prompt.to_string(),
            steps: s.steps,
            sampler: s.scheduler.a1111_name().to_string(),
            schedule_type: s.karras.then(|| "Karras".to_string()),
            cfg_scale: s.guidance,
            seed,
            width: s.width,
            height: s.height,
            model: model.name().to_string(),
            extra,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GenerationParams {
        GenerationParams {
            prompt: "a photo of a cat".into(),
            negative_prompt: "blurry".into(),
            steps: 30,
            sampler: "DPM++ 2M".into(),
            schedule_type: Some("Karras".into()),
            cfg_scale: 7.5,
            seed: 42,
            width: 512,
            height: 768,
            model: "v1-5-pruned-emaonly".into(),
            extra: vec![],
        }
    }

    #[test]
    fn a1111_text_has_the_exact_layout() {
        assert_eq!(
            params().to_a1111(),
            "a photo of a cat\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, \
             Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, \
             Model: v1-5-pruned-emaonly"
        );
    }

    #[test]
    fn optional_parts_are_left_out() {
        let p = GenerationParams {
            negative_prompt: String::new(),
            schedule_type: None,
            cfg_scale: 7.0,
            model: String::new(),
            ..params()
        };
        assert_eq!(
            p.to_a1111(),
            "a photo of a cat\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, Size: 512x768"
        );
    }

    #[test]
    fn extra_pairs_follow_in_order_and_bare_keys_match_a1111() {
        let p = GenerationParams {
            extra: vec![
                ("Model hash".into(), "6ce0161689".into()),
                ("Tiling".into(), "Tiling".into()),
                ("Walk".into(), "slerp, 8 frames".into()),
            ],
            ..params()
        };
        assert!(p.to_a1111().ends_with(
            "Model: v1-5-pruned-emaonly, Model hash: 6ce0161689, Tiling, Walk: \"slerp, 8 frames\""
        ));
    }

    #[test]
    fn floats_print_like_typed() {
        assert_eq!(format_float(7.0), "7");
        assert_eq!(format_float(7.5), "7.5");
        assert_eq!(format_float(0.1), "0.1");
        assert_eq!(format_float(12.25), "12.25");
    }

    #[test]
    fn quote_uses_json_only_when_needed() {
        assert_eq!(quote("DPM++ 2M"), "DPM++ 2M");
        assert_eq!(quote("a, b"), "\"a, b\"");
        assert_eq!(quote("lora: 1a2b"), "\"lora: 1a2b\"");
        assert_eq!(quote("x\ny"), "\"x\\ny\"");
        // ensure_ascii=False: non-ASCII stays as is; `"` and `\` are escaped.
        assert_eq!(quote("猫, \"q\" \\"), "\"猫, \\\"q\\\" \\\\\"");
        assert_eq!(quote("\"quoted\""), "\"\\\"quoted\\\"\"");
    }

    #[test]
    fn parse_round_trips_multiline_and_quoted_values() {
        let p = GenerationParams {
            prompt: "line one\nSteps: 3, looks like settings\n\nline four".into(),
            negative_prompt: "bad\n  worse".into(),
            sampler: "Euler a".into(),
            model: "my: model, v2".into(),
            extra: vec![
                ("Walk".into(), "a \"b\", c\nd\\e".into()),
                ("Note".into(), "\"starts with a quote\"".into()),
            ],
            ..params()
        };
        let parsed = parse_a1111(&p.to_a1111()).unwrap();
        assert_eq!(parsed.prompt, p.prompt);
        assert_eq!(parsed.negative_prompt, p.negative_prompt);
        assert_eq!(parsed.get("Model"), Some("my: model, v2"));
        assert_eq!(parsed.get("Walk"), Some("a \"b\", c\nd\\e"));
        assert_eq!(parsed.get("Note"), Some("\"starts with a quote\""));
        assert_eq!(parsed.get("Steps"), Some("30"));
        assert_eq!(parsed.get("Sampler"), Some("Euler a"));
        assert_eq!(parsed.get("Schedule type"), Some("Karras"));
        assert_eq!(parsed.settings.len(), 9);
    }

    #[test]
    fn parse_round_trips_empty_prompts() {
        let p = GenerationParams {
            prompt: String::new(),
            negative_prompt: String::new(),
            ..params()
        };
        let text = p.to_a1111();
        assert!(text.starts_with("Steps: 30"), "{text}");
        let parsed = parse_a1111(&text).unwrap();
        assert_eq!(
            (parsed.prompt.as_str(), parsed.negative_prompt.as_str()),
            ("", "")
        );
        assert_eq!(parsed.get("Seed"), Some("42"));

        let p = GenerationParams {
            prompt: String::new(),
            ..params()
        };
        let parsed = parse_a1111(&p.to_a1111()).unwrap();
        assert_eq!(
            (parsed.prompt.as_str(), parsed.negative_prompt.as_str()),
            ("", "blurry")
        );
    }

    #[test]
    fn settings_line_needs_steps_and_a_clean_shape() {
        let parsed = parse_a1111("masterpiece, best quality\ncat, dog").unwrap();
        assert_eq!(parsed.prompt, "masterpiece, best quality\ncat, dog");
        assert!(parsed.settings.is_empty());

        // `(cat:1.2)` is not a key, so a prompt line with weights is not taken for settings.
        let parsed = parse_a1111("(cat:1.2), Steps: 20").unwrap();
        assert_eq!(parsed.prompt, "(cat:1.2), Steps: 20");
        assert!(parsed.settings.is_empty());

        // An unterminated quote is not a settings line either.
        let parsed = parse_a1111("cat\nSteps: 20, Lora: \"x, y").unwrap();
        assert!(parsed.settings.is_empty());
    }

    #[test]
    fn invalid_json_in_a_settings_line_is_an_error() {
        let err = parse_a1111("cat\nSteps: 20, Walk: \"bad \\q escape\"").unwrap_err();
        assert!(err.to_string().contains("`Walk`"), "{err}");
    }

    #[test]
    fn settings_split_respects_quotes_and_bare_keys() {
        let settings = parse_settings_line(
            r#"Steps: 20, Lora hashes: "a: 1, b: 2", Tiling, Size: 512x512, Version: v1.10.1"#,
        )
        .unwrap()
        .unwrap();
        let keys: Vec<(&str, &str)> = settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("Steps", "20"),
                ("Lora hashes", "a: 1, b: 2"),
                ("Tiling", "Tiling"),
                ("Size", "512x512"),
                ("Version", "v1.10.1"),
            ]
        );
    }

    #[test]
    fn temp_names_are_not_counted() {
        assert_eq!(next_index([".00007-42.png.tmp-1234-5"].into_iter()), 0);
    }

    #[test]
    fn next_index_follows_the_highest_leading_number() {
        assert_eq!(next_index([].into_iter()), 0);
        assert_eq!(
            next_index(
                [
                    "00003-1.png",
                    "00010-7.png",
                    "00004.txt",
                    "cat.png",
                    "12a-3.png"
                ]
                .into_iter()
            ),
            11
        );
        assert_eq!(next_index(["123456-9.png"].into_iter()), 123457);
        // Too long for u64: cannot collide with our names, so it is not counted.
        assert_eq!(
            next_index(["999999999999999999999999-1.png"].into_iter()),
            0
        );
    }

    #[test]
    fn several_images_in_file_mode_get_padded_indices() {
        let names = |n| {
            file_paths(Path::new("out/cat.PNG"), n)
                .into_iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(1), ["out/cat.PNG"]);
        assert_eq!(names(2), ["out/cat-0.PNG", "out/cat-1.PNG"]);
        let eleven = names(11);
        assert_eq!(eleven[0], "out/cat-00.PNG");
        assert_eq!(eleven[10], "out/cat-10.PNG");
    }

    #[test]
    fn targets_are_classified_by_extension() {
        assert_eq!(
            classify_target(Path::new("no/such/x.png")).unwrap(),
            Some(Path::new("no/such/x.png"))
        );
        assert!(classify_target(Path::new("no/such/X.Png"))
            .unwrap()
            .is_some());
        assert_eq!(classify_target(Path::new("no/such/dir")).unwrap(), None);
        assert_eq!(classify_target(Path::new("no/such/x.png/")).unwrap(), None);
        let err = classify_target(Path::new("no/such/x.jpg")).unwrap_err();
        assert!(
            err.to_string().contains("only .png output is supported"),
            "{err}"
        );
    }
}
