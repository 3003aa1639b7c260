//! Reading an img2img body: AUTOMATIC1111's `StableDiffusionImg2ImgProcessingAPI` fields on top
//! of txt2img's. The init picture and mask arrive as base64 (with or without a `data:` prefix)
//! and are decoded here, so a bad picture is a 422 naming its field before the job queues.
use std::sync::Arc;

use base64::Engine;
use image::GrayImage;
use serde_json::{Map, Value};

use super::api::Detail;
use super::request::{parse_generation, txt2img_defaults, Fields, Txt2Img};
use crate::pipeline::{decode_image, mask_luma, ImageInput, MaskedContent};
use crate::Setting;

/// Largest `mask_blur` accepted (pixels of standard deviation; AUTOMATIC1111's slider ends at 64).
const MAX_MASK_BLUR: i128 = 64;

/// AUTOMATIC1111's img2img fields beyond txt2img's, with their defaults.
fn img2img_defaults() -> Map<String, Value> {
    const DEFAULTS: &str = r#"{
        "init_images": null, "resize_mode": 0, "image_cfg_scale": null, "mask": null,
        "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": null, "mask_round": true,
        "inpainting_fill": 0, "inpaint_full_res": true, "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0, "initial_noise_multiplier": null, "latent_mask": null,
        "include_init_images": false, "denoising_strength": 0.75
    }"#;
    let mut map = txt2img_defaults();
    for key in ["enable_hr", "firstphase_width", "firstphase_height"] {
        map.remove(key);
    }
    if let Ok(Value::Object(extra)) = serde_json::from_str::<Value>(DEFAULTS) {
        map.extend(extra);
    }
    map
}

/// The picture in a base64 field (AUTOMATIC1111's `decode_base64_to_image`: an optional
/// `data:image/...;base64,` prefix, then standard base64).
fn decode_field(
    f: &mut Fields,
    key: &str,
    text: &str,
    setting: Setting,
) -> Option<image::RgbImage> {
    let data = match text.find(";base64,") {
        Some(at) if text.starts_with("data:") => &text[at + ";base64,".len()..],
        _ => text,
    };
    let bytes = match base64::engine::general_purpose::STANDARD.decode(data.trim()) {
        Ok(b) => b,
        Err(e) => {
            f.invalid(key, format!("is not base64 ({e})"));
            return None;
        }
    };
    match decode_image(&bytes, setting, key) {
        Ok(img) => Some(img),
        Err(e) => {
            f.invalid(key, e.to_string());
            None
        }
    }
}

/// Reads an img2img body: txt2img's fields, then `init_images` (required; the first picture is
/// used), `mask` (inpainting; white is redrawn, the same size as the picture),
/// `denoising_strength` (0.75), `mask_blur` (4, a Gaussian blur of the mask before it is split
/// at one half), `inpainting_mask_invert` and `inpainting_fill` (what the masked area starts
/// from, [`MaskedContent`] in AUTOMATIC1111's numbering; 0, "fill", by default).
pub fn parse_img2img(body: &[u8]) -> Result<Txt2Img, Vec<Detail>> {
    let mut f = Fields::parse(body)?;
    let mut parameters = f.echo(img2img_defaults());
    // AUTOMATIC1111 leaves the pictures out of its echo unless include_init_images.
    parameters.insert("init_images".into(), Value::Null);
    parameters.insert("mask".into(), Value::Null);
    let mut ignored = Vec::new();

    let images = match f.value("init_images") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) | None => {
            f.invalid("init_images", "field required: a list of base64 pictures");
            Vec::new()
        }
        Some(_) => {
            f.invalid("init_images", "value is not a valid list");
            Vec::new()
        }
    };
    if images.len() > 1 {
        ignored.push("init_images[1:]".to_string());
    }
    let init = match images.first() {
        Some(Value::String(text)) => decode_field(&mut f, "init_images", text, Setting::InitImage),
        Some(_) => {
            f.invalid("init_images", "str type expected");
            None
        }
        None => None,
    };
    let mask = f
        .string("mask")
        .filter(|m| !m.trim().is_empty())
        .and_then(|text| decode_field(&mut f, "mask", &text, Setting::Mask));
    let strength = f.float("denoising_strength").unwrap_or(0.75);
    if !(strength > 0.0 && strength <= 1.0) {
        f.invalid(
            "denoising_strength",
            format!("{strength}: must be more than 0 and at most 1"),
        );
    }
    let blur = f.int_in("mask_blur", 0, MAX_MASK_BLUR);
    let blur_x = f.int_in("mask_blur_x", 0, MAX_MASK_BLUR);
    f.int_in("mask_blur_y", 0, MAX_MASK_BLUR);
    let blur = blur.or(blur_x).unwrap_or(4);
    let invert = f.int_in("inpainting_mask_invert", 0, 1).unwrap_or(0) == 1;
    // AUTOMATIC1111's API default is 0, "fill".
    let content = f
        .int_in("inpainting_fill", 0, 3)
        .and_then(|n| MaskedContent::from_a1111_index(n as usize))
        .unwrap_or(MaskedContent::Fill);
    // "Only masked" (AUTOMATIC1111's default): inpaint a crop around the mask at full size and
    // paste it back. latent inpaints the whole picture, and says so when a mask is given.
    let only_masked = match f.value("inpaint_full_res") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(_) => true,
    };
    for key in [
        "resize_mode",
        "image_cfg_scale",
        "mask_round",
        "inpaint_full_res_padding",
        "initial_noise_multiplier",
        "latent_mask",
        "include_init_images",
    ] {
        f.value(key);
    }
    let mask = match (&init, mask) {
        (Some(img), Some(m)) if img.dimensions() != m.dimensions() => {
            f.invalid(
                "mask",
                format!(
                    "is {}x{} pixels, but the init image is {}x{}",
                    m.width(),
                    m.height(),
                    img.width(),
                    img.height()
                ),
            );
            None
        }
        (_, m) => m.map(|m| prepare_mask(&mask_luma(&m), blur as f32, invert)),
    };
    if only_masked && mask.is_some() {
        ignored.push("inpaint_full_res".to_string());
    }
    let mut req = parse_generation(f, parameters)?;
    req.ignored.extend(ignored);
    req.ignored.sort();
    req.image =
        init.map(|img| Arc::new(ImageInput::new(img, mask, strength).with_masked_content(content)));
    Ok(req)
}

/// AUTOMATIC1111's mask preparation: inverted when asked, then blurred (Gaussian, `sigma`
/// pixels).
fn prepare_mask(mask: &GrayImage, sigma: f32, invert: bool) -> GrayImage {
    let mut m = mask.clone();
    if invert {
        image::imageops::invert(&mut m);
    }
    if sigma > 0.0 {
        m = image::imageops::blur(&m, sigma);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, v: u8) -> String {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([v, v, v]));
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn fields(e: &[Detail]) -> Vec<String> {
        e.iter()
            .map(|d| {
                d.loc
                    .get(1)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn pictures_strength_and_mask_are_read() {
        let body = serde_json::json!({
            "prompt": "a cat",
            "init_images": [format!("data:image/png;base64,{}", png(16, 8, 10))],
            "mask": png(16, 8, 255),
            "denoising_strength": 0.5,
            "mask_blur": 0,
            "inpainting_fill": 1,
            "inpaint_full_res": false,
        });
        let r = parse_img2img(body.to_string().as_bytes()).unwrap();
        let image = r.image.unwrap();
        assert_eq!(image.image().dimensions(), (16, 8));
        assert_eq!(image.strength(), 0.5);
        assert_eq!(image.masked_content(), MaskedContent::Original);
        assert!(image.mask().unwrap().pixels().all(|p| p.0[0] == 255));
        assert_eq!(r.parameters["init_images"], Value::Null);
        assert!(r.ignored.is_empty(), "{:?}", r.ignored);
    }

    #[test]
    fn bad_pictures_name_their_fields() {
        let body = serde_json::json!({
            "prompt": "a cat",
            "init_images": ["not base64!"],
            "mask": png(4, 4, 0),
            "denoising_strength": 2,
        });
        let e = parse_img2img(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(fields(&e), ["init_images", "denoising_strength"]);
        let body = serde_json::json!({
            "prompt": "a cat",
            "init_images": [base64::engine::general_purpose::STANDARD.encode(b"plain text")],
        });
        let e = parse_img2img(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(fields(&e), ["init_images"]);
        let body = serde_json::json!({
            "prompt": "a cat",
            "init_images": [png(8, 8, 0)],
            "mask": png(4, 4, 0),
        });
        let e = parse_img2img(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(fields(&e), ["mask"]);
        assert!(
            e[0].msg.contains("4x4") && e[0].msg.contains("8x8"),
            "{}",
            e[0].msg
        );
        let e = parse_img2img(br#"{"prompt": "a cat"}"#).unwrap_err();
        assert_eq!(fields(&e), ["init_images"]);
    }

    #[test]
    fn an_inverted_mask_keeps_what_was_white() {
        let body = serde_json::json!({
            "prompt": "a cat",
            "init_images": [png(8, 8, 0)],
            "mask": png(8, 8, 255),
            "inpainting_mask_invert": 1,
        });
        let r = parse_img2img(body.to_string().as_bytes()).unwrap();
        let image = r.image.unwrap();
        assert!(image.mask().unwrap().pixels().all(|p| p.0[0] == 0));
        assert_eq!(image.strength(), 0.75);
        assert_eq!(
            image.masked_content(),
            MaskedContent::Fill,
            "A1111's default"
        );
        // AUTOMATIC1111's default "only masked" inpainting is not done: the answer says so.
        assert_eq!(r.ignored, ["inpaint_full_res"]);
    }
}
