//! What the masked area of an inpainting run starts from, AUTOMATIC1111's "Masked content":
//! the kinds, and the latents of the two that act on them ("fill" acts on the picture,
//! [`super::fill`]).
use candle_core::Tensor;

use crate::{Error, Result};

/// What the masked area of an inpainting run starts from: AUTOMATIC1111's "Masked content"
/// (its API's `inpainting_fill`, numbered in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MaskedContent {
    /// The picture's masked area painted with the blurred colours around it, then encoded.
    Fill,
    /// The picture as it is (diffusers' inpainting pipelines).
    #[default]
    Original,
    /// The encoded picture replaced by the run's initial noise inside the mask.
    LatentNoise,
    /// The encoded picture replaced by zeros inside the mask.
    LatentNothing,
}

impl MaskedContent {
    /// Every kind, in AUTOMATIC1111's `inpainting_fill` order (0 to 3).
    pub const ALL: [MaskedContent; 4] = [
        MaskedContent::Fill,
        MaskedContent::Original,
        MaskedContent::LatentNoise,
        MaskedContent::LatentNothing,
    ];

    /// The name AUTOMATIC1111 shows and writes in its infotexts ("latent noise").
    pub fn a1111_name(self) -> &'static str {
        match self {
            MaskedContent::Fill => "fill",
            MaskedContent::Original => "original",
            MaskedContent::LatentNoise => "latent noise",
            MaskedContent::LatentNothing => "latent nothing",
        }
    }

    /// The kind of AUTOMATIC1111's `inpainting_fill` number.
    pub fn from_a1111_index(index: usize) -> Option<MaskedContent> {
        Self::ALL.get(index).copied()
    }
}

/// Written as `fill`, `original`, `latent-noise` or `latent-nothing`.
impl std::fmt::Display for MaskedContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.a1111_name().replace(' ', "-"))
    }
}

/// Reads the [`Display`](std::fmt::Display) names, and AUTOMATIC1111's (with a space).
impl std::str::FromStr for MaskedContent {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace(' ', "-");
        Self::ALL
            .into_iter()
            .find(|k| k.to_string() == wanted)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown masked content `{s}`; expected fill, original, latent-noise or \
                     latent-nothing"
                ))
            })
    }
}

/// The encoded picture `init` with the masked area (`mask`, 1 inside, `keep` = 1 − mask, at
/// latent size) as `content` asks: AUTOMATIC1111's "latent noise" puts the run's initial
/// noise `fresh` there (its noise comes from the image's seed, as the initial noise does),
/// "latent nothing" zeros; the others keep the latents.
pub(super) fn masked_latent_content(
    init: Tensor,
    content: MaskedContent,
    fresh: &Tensor,
    mask: &Tensor,
    keep: &Tensor,
) -> Result<Tensor> {
    let dtype = init.dtype();
    let keep = keep.to_dtype(dtype)?;
    Ok(match content {
        MaskedContent::LatentNoise => {
            (init.broadcast_mul(&keep)?
                + fresh
                    .to_dtype(dtype)?
                    .broadcast_mul(&mask.to_dtype(dtype)?)?)?
        }
        MaskedContent::LatentNothing => init.broadcast_mul(&keep)?,
        MaskedContent::Fill | MaskedContent::Original => init,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn masked_latents_take_noise_zeros_or_stay() {
        let dev = Device::Cpu;
        let init = Tensor::full(2f32, (1, 2, 2, 2), &dev).unwrap();
        let fresh = Tensor::full(-5f32, (1, 2, 2, 2), &dev).unwrap();
        // The right column is masked.
        let mask = Tensor::new(&[[[[0f32, 1.], [0., 1.]]]], &dev).unwrap();
        let keep = mask.affine(-1.0, 1.0).unwrap();
        let run = |content| {
            masked_latent_content(init.clone(), content, &fresh, &mask, &keep)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let row = |kept: f32, masked: f32| [kept, masked].repeat(4);
        assert_eq!(run(MaskedContent::LatentNoise), row(2.0, -5.0));
        assert_eq!(run(MaskedContent::LatentNothing), row(2.0, 0.0));
        assert_eq!(run(MaskedContent::Original), row(2.0, 2.0));
        assert_eq!(
            run(MaskedContent::Fill),
            row(2.0, 2.0),
            "fill works on pixels"
        );
    }

    #[test]
    fn masked_content_names_and_numbers() {
        for (i, k) in MaskedContent::ALL.into_iter().enumerate() {
            assert_eq!(MaskedContent::from_a1111_index(i), Some(k));
            assert_eq!(k.to_string().parse::<MaskedContent>().unwrap(), k);
            assert_eq!(k.a1111_name().parse::<MaskedContent>().unwrap(), k);
        }
        assert_eq!(MaskedContent::from_a1111_index(4), None);
        assert_eq!(MaskedContent::default(), MaskedContent::Original);
        assert!("blur".parse::<MaskedContent>().is_err());
        assert_eq!(MaskedContent::LatentNoise.to_string(), "latent-noise");
    }
}
