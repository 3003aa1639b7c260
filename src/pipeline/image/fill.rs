//! AUTOMATIC1111's "fill" masked content: the masked area of the init picture painted with
//! the colours around it, blurred, before the picture is encoded (its `masking.fill`).
//!
//! The kept part (weight 1 − mask) is blurred as premultiplied colour and weight at falling
//! radii (256, 64, 16, 4, 2 pixels, then none), and each blur, divided by its blurred weight,
//! is laid over the previous ones with "over" compositing, the finer ones more times. Far
//! inside the mask only the wide blurs reach, near its edge the fine ones; outside the mask the
//! last, unblurred layer has weight 1 and gives back the picture.
//!
//! The blur is PIL's `GaussianBlur(radius)`: three passes of an extended box filter (a box of
//! fractional radius, edge pixels repeated) whose variance is radius², per axis.
use image::{GrayImage, RgbImage};

/// The blur radii (Gaussian standard deviations, pixels) and how many times each is laid on.
const LAYERS: [(f32, usize); 6] = [
    (256.0, 1),
    (64.0, 1),
    (16.0, 2),
    (4.0, 4),
    (2.0, 2),
    (0.0, 1),
];

/// Box passes per axis that make up one Gaussian blur.
const PASSES: usize = 3;

/// `image` with its masked area (`mask`: 255 redrawn, 0 kept; the same size) filled with the
/// blurred colours of the kept area.
pub(crate) fn fill(image: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    // Premultiplied RGB and weight of the kept part.
    let mut kept = Vec::with_capacity(w * h * 4);
    for (px, m) in image.pixels().zip(mask.pixels()) {
        let a = 1.0 - f32::from(m.0[0]) / 255.0;
        kept.extend(px.0.iter().map(|&c| f32::from(c) / 255.0 * a));
        kept.push(a);
    }
    // The layers so far, straight colour and alpha.
    let mut out = vec![0f32; w * h * 4];
    for (radius, repeats) in LAYERS {
        let mut layer = kept.clone();
        if radius > 0.0 {
            gaussian_blur(&mut layer, w, h, radius);
        }
        for px in layer.chunks_exact_mut(4) {
            let a = px[3];
            for c in &mut px[..3] {
                *c = if a > 0.0 { (*c / a).min(1.0) } else { 0.0 };
            }
        }
        for _ in 0..repeats {
            over(&layer, &mut out);
        }
    }
    let data = out
        .chunks_exact(4)
        .flat_map(|px| {
            px[..3]
                .iter()
                .map(|&c| (c * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect::<Vec<_>>()
        })
        .collect();
    RgbImage::from_raw(w as u32, h as u32, data).unwrap_or_else(|| image.clone())
}

/// Lays `top` over `under` (straight RGBA, 0..1): Porter-Duff "over".
fn over(top: &[f32], under: &mut [f32]) {
    for (t, u) in top.chunks_exact(4).zip(under.chunks_exact_mut(4)) {
        let (ta, ua) = (t[3], u[3]);
        let a = ta + ua * (1.0 - ta);
        for i in 0..3 {
            u[i] = if a > 0.0 {
                (t[i] * ta + u[i] * ua * (1.0 - ta)) / a
            } else {
                0.0
            };
        }
        u[3] = a;
    }
}

/// The box radius whose `PASSES` passes have variance `sigma`² (Gwosdek et al., "Theoretical
/// foundations of Gaussian convolution by extended box filtering", 2011): an integer radius
/// `l` plus the fraction that makes up the rest of the variance.
fn box_radius(sigma: f32) -> f32 {
    let var = f64::from(sigma) * f64::from(sigma) / PASSES as f64;
    let ideal = (12.0 * var + 1.0).sqrt();
    let l = ((ideal - 1.0) / 2.0).floor();
    let frac = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * var) / (6.0 * (var - (l + 1.0).powi(2)));
    (l + frac) as f32
}

/// Blurs RGBA `data` (w × h × 4) in place with a Gaussian of standard deviation `sigma`.
fn gaussian_blur(data: &mut [f32], w: usize, h: usize, sigma: f32) {
    let r = box_radius(sigma);
    let mut line = Vec::new();
    let mut blurred = Vec::new();
    for _ in 0..PASSES {
        for y in 0..h {
            line.clear();
            line.extend_from_slice(&data[y * w * 4..(y + 1) * w * 4]);
            box_line(&line, &mut blurred, r);
            data[y * w * 4..(y + 1) * w * 4].copy_from_slice(&blurred);
        }
    }
    for _ in 0..PASSES {
        for x in 0..w {
            line.clear();
            for y in 0..h {
                line.extend_from_slice(&data[(y * w + x) * 4..(y * w + x + 1) * 4]);
            }
            box_line(&line, &mut blurred, r);
            for y in 0..h {
                data[(y * w + x) * 4..(y * w + x + 1) * 4]
                    .copy_from_slice(&blurred[y * 4..(y + 1) * 4]);
            }
        }
    }
}

/// One pass of the extended box filter of radius `r` over a line of RGBA pixels: the mean of
/// the ⌊r⌋ pixels either side and the pixel itself, plus the next pixel on each side weighted
/// by the fraction of `r`; pixels beyond the ends repeat the end pixels.
fn box_line(line: &[f32], out: &mut Vec<f32>, r: f32) {
    let n = line.len() / 4;
    out.clear();
    out.resize(line.len(), 0.0);
    if n == 0 {
        return;
    }
    let l = r.floor() as i64;
    let frac = f64::from(r - r.floor());
    let norm = 1.0 / (2.0 * f64::from(r) + 1.0);
    let at = |i: i64, c: usize| f64::from(line[i.clamp(0, n as i64 - 1) as usize * 4 + c]);
    for c in 0..4 {
        let mut sum: f64 = (-l..=l).map(|k| at(k, c)).sum();
        for i in 0..n as i64 {
            let edges = at(i - l - 1, c) + at(i + l + 1, c);
            out[i as usize * 4 + c] = ((sum + frac * edges) * norm) as f32;
            sum += at(i + l + 1, c) - at(i - l, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variance_of_blurred_impulse(sigma: f32) -> f64 {
        let n = 201;
        let mut data = vec![0f32; n * 4];
        data[100 * 4] = 1.0;
        let mut line = Vec::new();
        let r = box_radius(sigma);
        for _ in 0..PASSES {
            box_line(&data, &mut line, r);
            data.copy_from_slice(&line);
        }
        let values: Vec<f64> = (0..n).map(|i| f64::from(data[i * 4])).collect();
        let total: f64 = values.iter().sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "the blur keeps the sum: {total}"
        );
        values
            .iter()
            .enumerate()
            .map(|(i, v)| v * (i as f64 - 100.0).powi(2))
            .sum()
    }

    #[test]
    fn the_box_passes_have_the_gaussians_variance() {
        for sigma in [0.7f32, 2.0, 4.0, 9.3, 16.0] {
            let var = variance_of_blurred_impulse(sigma);
            let want = f64::from(sigma).powi(2);
            assert!(
                (var - want).abs() < 1e-3 * want.max(1.0),
                "sigma {sigma}: variance {var}, want {want}"
            );
        }
    }

    fn halves(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 {
                image::Rgb([200, 0, 0])
            } else {
                image::Rgb([0, 0, 200])
            }
        })
    }

    #[test]
    fn kept_pixels_stay_and_the_hole_takes_the_colours_around_it() {
        let (w, h) = (64, 32);
        let image = halves(w, h);
        // A hole over the middle, with a soft left edge.
        let mask = GrayImage::from_fn(w, h, |x, _| match x {
            16..=19 => image::Luma([128]),
            20..=47 => image::Luma([255]),
            _ => image::Luma([0]),
        });
        let filled = fill(&image, &mask);
        for (x, y, px) in filled.enumerate_pixels() {
            if mask.get_pixel(x, y).0[0] == 0 {
                assert_eq!(px, image.get_pixel(x, y), "kept at ({x}, {y})");
            }
        }
        // Inside the hole: red near its left side, blue near its right, no black.
        let left = filled.get_pixel(21, 16).0;
        let right = filled.get_pixel(46, 16).0;
        assert!(left[0] > 150 && left[2] < 50, "{left:?}");
        assert!(right[2] > 150 && right[0] < 50, "{right:?}");
        for x in 20..=47 {
            let [r, _, b] = filled.get_pixel(x, 16).0;
            assert!(u32::from(r) + u32::from(b) > 150, "({x}, 16): {r}, {b}");
        }
    }

    #[test]
    fn matches_pil_running_automatic1111s_fill() {
        // tests/fixtures/img2img/fill-*.png, made by tools/make_fill_fixtures.py with PIL.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/img2img");
        let read = |name: &str| image::open(dir.join(name)).unwrap();
        let image = read("fill-image.png").to_rgb8();
        let mask = read("fill-mask.png").to_luma8();
        let want = read("fill-pil.png").to_rgb8();
        let got = fill(&image, &mask);
        let diffs: Vec<u8> = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        eprintln!("fill vs PIL: max |diff| {max}/255, mean {mean:.3}");
        // PIL rounds to 8 bits after every blur, conversion and composite, and divides by
        // small 8-bit alphas deep inside the mask; this stays in f32. Measured: max 6/255,
        // mean 0.48/255, all inside the mask (kept pixels are exact).
        assert!(max <= 8 && mean < 1.0, "max {max}, mean {mean}");
    }

    #[test]
    fn a_uniform_surrounding_fills_the_hole_with_its_colour() {
        let image = RgbImage::from_pixel(40, 40, image::Rgb([10, 120, 230]));
        let mut hole = image.clone();
        for y in 10..30 {
            for x in 10..30 {
                hole.put_pixel(x, y, image::Rgb([255, 255, 255]));
            }
        }
        let mask = GrayImage::from_fn(40, 40, |x, y| {
            image::Luma([if (10..30).contains(&x) && (10..30).contains(&y) {
                255
            } else {
                0
            }])
        });
        let filled = fill(&hole, &mask);
        for px in filled.pixels() {
            for (got, want) in px.0.iter().zip([10u8, 120, 230]) {
                assert!(got.abs_diff(want) <= 1, "{:?}", px.0);
            }
        }
        // A mask over everything leaves nothing to take colours from: black, as A1111's.
        let all = GrayImage::from_pixel(40, 40, image::Luma([255]));
        assert!(fill(&hole, &all).pixels().all(|p| p.0 == [0, 0, 0]));
    }
}
