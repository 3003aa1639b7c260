//! Cheap previews of latents during sampling: a fixed linear map from the 4 latent channels to
//! RGB, no decoder at all (AUTOMATIC1111's "Approx cheap" live preview).
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The latent space a preview reads, chosen from the model family: each family's VAE encodes
/// colours differently, so each has its own map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreviewMap {
    /// SD 1.x and SD 2.x (the same KL-f8 VAE).
    Sd,
    /// SDXL (its own VAE).
    Sdxl,
}

// The maps of AUTOMATIC1111's stable-diffusion-webui, `cheap_approximation` in
// modules/sd_vae_approx.py (commit 326c869), which credits the SD 1.x one to Keturn's fit on
// https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2 and uses the
// SD 1.x map for SD 2.x too. They apply to latents as the sampler holds them (scaled by the VAE's
// scaling factor) and give RGB in about [-1, 1]. Rows: latent channels; columns: R, G, B.
const SD_COEFFICIENTS: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];
const SDXL_COEFFICIENTS: [[f32; 3]; 4] = [
    [0.3448, 0.4168, 0.4395],
    [-0.1953, -0.0290, 0.0250],
    [0.1074, 0.0886, -0.0163],
    [-0.3730, -0.2499, -0.2088],
];

impl PreviewMap {
    /// The map's weights: `rgb[k] = sum_c latent[c] * coefficients()[c][k]`, in about [-1, 1].
    pub fn coefficients(self) -> &'static [[f32; 3]; 4] {
        match self {
            PreviewMap::Sd => &SD_COEFFICIENTS,
            PreviewMap::Sdxl => &SDXL_COEFFICIENTS,
        }
    }

    /// Latent channels the map reads.
    pub fn latent_channels(self) -> usize {
        self.coefficients().len()
    }
}

/// An 8-bit RGB image: `height` rows of `width` pixels, 3 bytes (R, G, B) per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewImage {
    pub width: usize,
    pub height: usize,
    /// HxWx3 bytes, rows top to bottom.
    pub rgb: Vec<u8>,
}

impl PreviewImage {
    /// The image at `width` x `height` by nearest neighbour (pixel `x` reads source column
    /// `floor(x * w / width)`, like torch's `interpolate(mode="nearest")`): latent-sized previews
    /// are 1/8 of the image's size.
    pub fn resize_nearest(&self, width: usize, height: usize) -> Result<PreviewImage> {
        if width == 0 || height == 0 {
            return Err(Error::InvalidInput(format!(
                "preview size {width}x{height}: both sides must be positive"
            )));
        }
        let mut rgb = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            let sy = y * self.height / height;
            let row = &self.rgb[sy * self.width * 3..(sy + 1) * self.width * 3];
            for x in 0..width {
                let sx = x * self.width / width;
                rgb.extend_from_slice(&row[sx * 3..sx * 3 + 3]);
            }
        }
        Ok(PreviewImage { width, height, rgb })
    }
}

/// One preview per image of a batch of latents (b, 4, h, w), each h x w pixels.
///
/// Pixels are `round(clamp(rgb * 0.5 + 0.5, 0, 1) * 255)`, as AUTOMATIC1111 turns its
/// [-1, 1] previews into bytes. Latents of any float dtype and device are accepted (they are
/// copied to the host as f32).
pub fn latents_to_rgb(latents: &Tensor, map: PreviewMap) -> Result<Vec<PreviewImage>> {
    let dims = latents.dims();
    let channels = map.latent_channels();
    if dims.len() != 4 || dims[1] != channels {
        return Err(Error::InvalidInput(format!(
            "preview: latents of shape {dims:?}, expected (batch, {channels}, height, width)"
        )));
    }
    let (b, _, h, w) = latents.dims4()?;
    let values: Vec<f32> = latents
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let coefficients = map.coefficients();
    let plane = h * w;
    let images = (0..b)
        .map(|i| {
            let item = &values[i * channels * plane..(i + 1) * channels * plane];
            let mut rgb = Vec::with_capacity(plane * 3);
            for p in 0..plane {
                let mut acc = [0f32; 3];
                for (c, row) in coefficients.iter().enumerate() {
                    let x = item[c * plane + p];
                    for (a, k) in acc.iter_mut().zip(row) {
                        *a += x * k;
                    }
                }
                rgb.extend(acc.map(to_byte));
            }
            PreviewImage {
                width: w,
                height: h,
                rgb,
            }
        })
        .collect();
    Ok(images)
}

/// [-1, 1] -> 0..=255; NaN becomes 0.
fn to_byte(v: f32) -> u8 {
    ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latents(b: usize, h: usize, w: usize, f: impl Fn(usize, usize, usize) -> f32) -> Tensor {
        let mut v = Vec::with_capacity(b * 4 * h * w);
        for i in 0..b {
            for c in 0..4 {
                for p in 0..h * w {
                    v.push(f(i, c, p));
                }
            }
        }
        Tensor::from_vec(v, (b, 4, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn zero_latents_are_mid_grey() {
        let images = latents_to_rgb(&latents(1, 2, 3, |_, _, _| 0.0), PreviewMap::Sd).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!((images[0].width, images[0].height), (3, 2));
        // 127.5 rounds away from zero.
        assert!(
            images[0].rgb.iter().all(|&x| x == 128),
            "{:?}",
            images[0].rgb
        );
    }

    #[test]
    fn one_hot_channels_give_the_published_coefficients() {
        // Expected bytes computed by hand from A1111's tables: round((coef + 1) / 2 * 255).
        let cases = [
            (PreviewMap::Sd, 0, [165, 154, 154]),
            (PreviewMap::Sd, 3, [104, 93, 67]),
            (PreviewMap::Sdxl, 0, [171, 181, 184]),
            (PreviewMap::Sdxl, 1, [103, 124, 131]),
        ];
        for (map, channel, want) in cases {
            let x = latents(1, 1, 1, |_, c, _| if c == channel { 1.0 } else { 0.0 });
            let got = latents_to_rgb(&x, map).unwrap();
            assert_eq!(got[0].rgb, want, "{map:?} channel {channel}");
        }
    }

    #[test]
    fn channels_mix_linearly_and_clamp() {
        // SD: R = 0.298 - 0.158 = 0.140 -> 145.35; G = 0.207 + 0.189 = 0.396 -> 178.0;
        // B = 0.208 + 0.264 = 0.472 -> 187.68.
        let x = latents(1, 1, 1, |_, c, _| [1.0, 0.0, 1.0, 0.0][c]);
        assert_eq!(
            latents_to_rgb(&x, PreviewMap::Sd).unwrap()[0].rgb,
            [145, 178, 188]
        );
        let big = latents(1, 1, 1, |_, c, _| [10.0, 10.0, 10.0, 0.0][c]);
        assert_eq!(
            latents_to_rgb(&big, PreviewMap::Sd).unwrap()[0].rgb,
            [255, 255, 255]
        );
        let small = latents(1, 1, 1, |_, c, _| [0.0, 0.0, 0.0, 10.0][c]);
        assert_eq!(
            latents_to_rgb(&small, PreviewMap::Sd).unwrap()[0].rgb,
            [0, 0, 0]
        );
    }

    #[test]
    fn pixels_are_row_major_and_images_follow_the_batch() {
        // Only channel 3 of pixel p of image i is non-zero; it darkens, so values decrease.
        let x = latents(2, 2, 3, |i, c, p| {
            if c == 3 && ((i == 0 && p == 1) || (i == 1 && p == 4)) {
                2.0
            } else {
                0.0
            }
        });
        let images = latents_to_rgb(&x, PreviewMap::Sd).unwrap();
        assert_eq!(images.len(), 2);
        for (image, dark) in images.iter().zip([1usize, 4]) {
            for p in 0..6 {
                let px = &image.rgb[p * 3..p * 3 + 3];
                if p == dark {
                    assert_ne!(px, [128, 128, 128], "pixel {p}");
                } else {
                    assert_eq!(px, [128, 128, 128], "pixel {p}");
                }
            }
        }
    }

    #[test]
    fn bf16_latents_are_accepted() {
        let x = latents(1, 1, 1, |_, c, _| if c == 0 { 1.0 } else { 0.0 })
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(
            latents_to_rgb(&x, PreviewMap::Sd).unwrap()[0].rgb,
            [165, 154, 154]
        );
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let three = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let err = latents_to_rgb(&three, PreviewMap::Sdxl).unwrap_err();
        assert!(err.to_string().contains("[1, 3, 2, 2]"), "{err}");
        let rank3 = Tensor::zeros((4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(latents_to_rgb(&rank3, PreviewMap::Sd).is_err());
    }

    #[test]
    fn nearest_resize_repeats_pixels() {
        let image = PreviewImage {
            width: 2,
            height: 1,
            rgb: vec![1, 2, 3, 4, 5, 6],
        };
        let up = image.resize_nearest(4, 2).unwrap();
        let row = [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6];
        assert_eq!(up.rgb, [row, row].concat());
        // 2 -> 3 columns: floor(x * 2 / 3) = 0, 0, 1.
        let odd = image.resize_nearest(3, 1).unwrap();
        assert_eq!(odd.rgb, [1, 2, 3, 1, 2, 3, 4, 5, 6]);
        assert_eq!(image.resize_nearest(2, 1).unwrap(), image);
        assert!(image.resize_nearest(0, 1).is_err());
    }
}
