//! Animation files made from a walk's frame PNGs: GIF (image crate), animated WebP (each frame
//! a lossless VP8L bitstream from the image crate, muxed into the WebP animation container
//! here because the image crate has no animated WebP encoder), APNG (png crate) and MP4
//! (ffmpeg on PATH).
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Cursor, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::webp::WebPEncoder;
use image::{Delay, ExtendedColorType, RgbImage};

use super::frame_file_name;
use crate::files::{write_atomic, Replace};
use crate::{Error, Result, Setting};

/// An animation file a walk can write; GIF is always written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnimationFormat {
    /// GIF, 256 colours per frame (NeuQuant), plays everywhere.
    Gif,
    /// Animated WebP, lossless frames.
    Webp,
    /// Animated PNG, lossless frames.
    Apng,
    /// H.264 MP4 made by ffmpeg (must be on PATH).
    Mp4,
}

impl AnimationFormat {
    /// Every format, in the order help texts list them.
    pub const ALL: [AnimationFormat; 4] = [
        AnimationFormat::Gif,
        AnimationFormat::Webp,
        AnimationFormat::Apng,
        AnimationFormat::Mp4,
    ];

    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            AnimationFormat::Gif => "gif",
            AnimationFormat::Webp => "webp",
            AnimationFormat::Apng => "apng",
            AnimationFormat::Mp4 => "mp4",
        }
    }

    /// File name inside the walk folder (`walk.gif`, ...).
    pub fn file_name(self) -> String {
        format!("walk.{}", self.as_str())
    }
}

impl fmt::Display for AnimationFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AnimationFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        AnimationFormat::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown animation format `{s}` (expected gif, webp, apng or mp4)"
                ))
            })
    }
}

/// The program run for MP4 output.
const FFMPEG: &str = "ffmpeg";

/// Checks that ffmpeg can be started, so `--format mp4` fails before any rendering.
pub fn check_ffmpeg() -> Result<()> {
    match Command::new(FFMPEG)
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(Error::setting(
            Setting::Format,
            "mp4",
            format!(
                "`ffmpeg -version` failed ({status}); fix the ffmpeg install or use webp or apng"
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::setting(
            Setting::Format,
            "mp4",
            "needs ffmpeg, which is not on PATH: install it (e.g. `apt install ffmpeg`, `brew \
             install ffmpeg`) or use webp or apng",
        )),
        Err(e) => Err(Error::setting(
            Setting::Format,
            "mp4",
            format!("cannot run ffmpeg: {e}"),
        )),
    }
}

/// Writes `out` in `format` from frames `0..count` of the walk folder `dir`, played at `fps`,
/// looping forever. The file appears atomically (written beside, then renamed over `out`).
pub fn write_animation(
    format: AnimationFormat,
    dir: &Path,
    count: usize,
    fps: f64,
    out: &Path,
) -> Result<()> {
    if count == 0 {
        return Err(Error::InvalidInput("an animation needs frames".into()));
    }
    if !(fps.is_finite() && fps > 0.0) {
        return Err(Error::setting(
            Setting::Fps,
            fps,
            "must be a positive number",
        ));
    }
    let frames = || (0..count).map(|i| dir.join(frame_file_name(i)));
    match format {
        AnimationFormat::Gif => write_atomic(out, Replace::Overwrite, |file, tmp| {
            write_gif(frames(), fps, file, tmp, out)
        }),
        AnimationFormat::Webp => write_atomic(out, Replace::Overwrite, |file, tmp| {
            write_webp(frames(), fps, file, tmp, out)
        }),
        AnimationFormat::Apng => write_atomic(out, Replace::Overwrite, |file, tmp| {
            write_apng(frames(), count, fps, file, tmp, out)
        }),
        // ffmpeg writes the temporary file by its path (opening it anew, `-y`).
        AnimationFormat::Mp4 => write_atomic(out, Replace::Overwrite, |_, tmp| {
            write_mp4(dir, count, fps, tmp)
        }),
    }
}

/// Reads one frame PNG as RGB, checking it has the size of the first.
fn read_frame(path: &Path, size: &mut Option<(u32, u32)>) -> Result<RgbImage> {
    let image = image::open(path)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: format!("cannot read frame: {e}"),
        })?
        .to_rgb8();
    let dims = image.dimensions();
    match size {
        Some(first) if *first != dims => Err(Error::Image {
            path: path.to_path_buf(),
            message: format!(
                "frame is {}x{}, the first frame {}x{}",
                dims.0, dims.1, first.0, first.1
            ),
        }),
        _ => {
            *size = Some(dims);
            Ok(image)
        }
    }
}

fn image_error(out: &Path, what: &str, e: impl fmt::Display) -> Error {
    Error::Image {
        path: out.to_path_buf(),
        message: format!("cannot encode {what}: {e}"),
    }
}

/// Frame duration in whole milliseconds (at least 1).
fn frame_ms(fps: f64) -> u32 {
    (1000.0 / fps).round().clamp(1.0, f64::from(0xFF_FFFFu32)) as u32
}

/// GIF counts delays in hundredths of a second, so frame times round to 10 ms (24 fps plays
/// at 25).
fn write_gif(
    frames: impl Iterator<Item = std::path::PathBuf>,
    fps: f64,
    file: &mut File,
    tmp: &Path,
    out: &Path,
) -> Result<()> {
    let mut writer = BufWriter::new(file);
    {
        // Speed 10 of NeuQuant's 1..30: close to the best palette at a fraction of the time.
        let mut encoder = GifEncoder::new_with_speed(&mut writer, 10);
        encoder
            .set_repeat(Repeat::Infinite)
            .map_err(|e| image_error(out, "GIF", e))?;
        let delay = Delay::from_saturating_duration(Duration::from_secs_f64(1.0 / fps));
        let mut size = None;
        for path in frames {
            let rgba = image::DynamicImage::ImageRgb8(read_frame(&path, &mut size)?).to_rgba8();
            encoder
                .encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
                .map_err(|e| image_error(out, "GIF", e))?;
        }
        // Dropping the encoder writes the GIF trailer into `writer`.
    }
    // write_atomic syncs the file before moving it into place.
    writer.flush().map_err(|e| Error::io(tmp, e))
}

/// Animated WebP: the RIFF container of the WebP spec (`VP8X` with the animation flag, `ANIM`,
/// one `ANMF` per frame wrapping that frame's `VP8L` chunk).
fn write_webp(
    frames: impl Iterator<Item = std::path::PathBuf>,
    fps: f64,
    file: &mut File,
    tmp: &Path,
    out: &Path,
) -> Result<()> {
    let duration = frame_ms(fps);
    let mut size = None;
    let mut anmf = Vec::new();
    for path in frames {
        let rgb = read_frame(&path, &mut size)?;
        let (w, h) = rgb.dimensions();
        let mut still = Vec::new();
        WebPEncoder::new_lossless(Cursor::new(&mut still))
            .encode(rgb.as_raw(), w, h, ExtendedColorType::Rgb8)
            .map_err(|e| image_error(out, "WebP frame", e))?;
        let vp8l = find_chunk(&still, b"VP8L")
            .ok_or_else(|| image_error(out, "WebP frame", "no VP8L chunk in encoder output"))?;
        let mut payload = Vec::with_capacity(16 + 8 + vp8l.len() + 1);
        payload.extend_from_slice(&u24(0)); // x offset / 2
        payload.extend_from_slice(&u24(0)); // y offset / 2
        payload.extend_from_slice(&u24(w - 1));
        payload.extend_from_slice(&u24(h - 1));
        payload.extend_from_slice(&u24(duration));
        // Reserved 6 bits, blending method 1 = do not blend, disposal 0 = none.
        payload.push(0b0000_0010);
        push_chunk(&mut payload, b"VP8L", vp8l);
        push_chunk(&mut anmf, b"ANMF", &payload);
    }
    let Some((w, h)) = size else {
        return Err(image_error(out, "WebP", "no frames"));
    };
    let mut body = Vec::with_capacity(anmf.len() + 40);
    body.extend_from_slice(b"WEBP");
    let mut vp8x = vec![0b0000_0010, 0, 0, 0]; // animation flag
    vp8x.extend_from_slice(&u24(w - 1));
    vp8x.extend_from_slice(&u24(h - 1));
    push_chunk(&mut body, b"VP8X", &vp8x);
    // Background colour (BGRA, white) and loop count 0 = forever.
    push_chunk(&mut body, b"ANIM", &[255, 255, 255, 255, 0, 0]);
    body.extend_from_slice(&anmf);
    let riff_size = u32::try_from(body.len())
        .map_err(|_| image_error(out, "WebP", "animation larger than 4 GiB"))?;

    let mut writer = BufWriter::new(file);
    writer
        .write_all(b"RIFF")
        .and_then(|_| writer.write_all(&riff_size.to_le_bytes()))
        .and_then(|_| writer.write_all(&body))
        .map_err(|e| Error::io(tmp, e))?;
    // write_atomic syncs the file before moving it into place.
    writer.flush().map_err(|e| Error::io(tmp, e))
}

/// 24-bit little-endian field of the WebP container (values are < 2^24 by construction:
/// image sides are at most 16384 and durations are clamped).
fn u24(v: u32) -> [u8; 3] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// Appends a RIFF chunk: four-character code, little-endian size, data, pad byte to even size.
fn push_chunk(out: &mut Vec<u8>, fourcc: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(fourcc);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
}

/// The data of the first chunk `fourcc` in a WebP file (after the 12-byte RIFF header).
fn find_chunk<'a>(file: &'a [u8], fourcc: &[u8; 4]) -> Option<&'a [u8]> {
    if file.len() < 12 || &file[0..4] != b"RIFF" || &file[8..12] != b"WEBP" {
        return None;
    }
    let mut pos = 12;
    while pos + 8 <= file.len() {
        let size = u32::from_le_bytes(file[pos + 4..pos + 8].try_into().ok()?) as usize;
        let start = pos + 8;
        let end = start.checked_add(size)?;
        if end > file.len() {
            return None;
        }
        if &file[pos..pos + 4] == fourcc {
            return Some(&file[start..end]);
        }
        pos = end + (size % 2);
    }
    None
}

/// APNG: every frame a full RGB image shown for `1 / fps` s, looping forever.
fn write_apng(
    frames: impl Iterator<Item = std::path::PathBuf>,
    count: usize,
    fps: f64,
    file: &mut File,
    tmp: &Path,
    out: &Path,
) -> Result<()> {
    let encode_error = |e: png::EncodingError| image_error(out, "APNG", e);
    let mut frames = frames.peekable();
    let mut size = None;
    let first = match frames.next() {
        Some(p) => read_frame(&p, &mut size)?,
        None => return Err(image_error(out, "APNG", "no frames")),
    };
    let (w, h) = first.dimensions();
    let num_frames =
        u32::try_from(count).map_err(|_| image_error(out, "APNG", "too many frames"))?;
    let (num, den) = if fps.fract() == 0.0 && fps <= f64::from(u16::MAX) {
        (1, fps as u16)
    } else {
        (frame_ms(fps).min(u32::from(u16::MAX)) as u16, 1000)
    };

    let mut out_file = BufWriter::new(file);
    {
        let mut encoder = png::Encoder::new(&mut out_file, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_animated(num_frames, 0).map_err(encode_error)?;
        encoder.set_frame_delay(num, den).map_err(encode_error)?;
        let mut writer = encoder.write_header().map_err(encode_error)?;
        writer
            .write_image_data(first.as_raw())
            .map_err(encode_error)?;
        for path in frames {
            let rgb = read_frame(&path, &mut size)?;
            writer
                .write_image_data(rgb.as_raw())
                .map_err(encode_error)?;
        }
        writer.finish().map_err(encode_error)?;
    }
    out_file.flush().map_err(|e| Error::io(tmp, e))
}

/// H.264 in MP4 (yuv420p, CRF 18: visually lossless and playable everywhere) by ffmpeg, reading
/// the frame PNGs through its `frame-%05d.png` pattern.
fn write_mp4(dir: &Path, count: usize, fps: f64, tmp: &Path) -> Result<()> {
    let pattern = dir.join("frame-%05d.png");
    let output = Command::new(FFMPEG)
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-framerate", &format!("{fps}"), "-start_number", "0", "-i"])
        .arg(&pattern)
        .args(["-frames:v", &count.to_string()])
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18"])
        .args(["-movflags", "+faststart", "-f", "mp4"])
        .arg(tmp)
        .stdin(Stdio::null())
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return check_ffmpeg(),
        Err(e) => {
            return Err(Error::setting(
                Setting::Format,
                "mp4",
                format!("cannot run ffmpeg: {e}"),
            ))
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(Error::InvalidInput(format!(
            "ffmpeg failed ({}) making the MP4: {last}",
            output.status
        )));
    }
    if !tmp.is_file() {
        return Err(Error::InvalidInput(
            "ffmpeg reported success but wrote no MP4".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_name_their_files() {
        assert_eq!(
            "WebP".parse::<AnimationFormat>().unwrap(),
            AnimationFormat::Webp
        );
        assert_eq!(AnimationFormat::Apng.file_name(), "walk.apng");
        assert!("avi".parse::<AnimationFormat>().is_err());
    }

    #[test]
    fn frame_durations() {
        assert_eq!(frame_ms(12.0), 83);
        assert_eq!(frame_ms(24.0), 42);
        assert_eq!(frame_ms(1e9), 1);
        assert_eq!(frame_ms(1e-9), 0xFF_FFFF);
    }

    #[test]
    fn chunks_are_padded_and_found() {
        let mut file = b"RIFF\0\0\0\0WEBP".to_vec();
        push_chunk(&mut file, b"ABCD", &[1, 2, 3]);
        push_chunk(&mut file, b"VP8L", &[9, 8]);
        assert_eq!(file.len(), 12 + 8 + 4 + 8 + 2);
        assert_eq!(find_chunk(&file, b"VP8L"), Some(&[9u8, 8][..]));
        assert_eq!(find_chunk(&file, b"ABCD"), Some(&[1u8, 2, 3][..]));
        assert_eq!(find_chunk(&file, b"NONE"), None);
        assert_eq!(find_chunk(b"RIFX", b"VP8L"), None);
    }
}
