//! Where the model runs and in which precision, and how `Auto` resolves.
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::{Error, Result, Setting};

/// Which device to run on.
///
/// `Auto` picks the first CUDA GPU when the binary was built with the `cuda` feature and one is
/// present, else Metal when built with `metal` and available, else the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "metal" | "mps" => Ok(Self::Metal),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(Error::InvalidInput(format!(
                    "unknown device {s:?}: expected auto, cpu, cuda, cuda:N or metal"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. Asking for CUDA or Metal in a build without that feature is an error
    /// that says which feature to enable.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::setting(
                        Setting::Device,
                        format!("cuda:{n}"),
                        "this binary was built without CUDA support (rebuild with --features cuda)",
                    ));
                }
                Device::new_cuda(n).map_err(|e| {
                    Error::setting(Setting::Device, format!("cuda:{n}"), e.to_string())
                })
            }
            Self::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(Error::setting(
                        Setting::Device,
                        "metal",
                        "this binary was built without Metal support (rebuild with --features metal)",
                    ));
                }
                Device::new_metal(0)
                    .map_err(|e| Error::setting(Setting::Device, "metal", e.to_string()))
            }
        }
    }
}

/// Floating-point precision of the model weights and activations.
///
/// `Auto` is f16 on a GPU and f32 on the CPU. bf16 on the CPU means bf16 weights and bf16
/// matrix products (AMX / AVX512-BF16 where the CPU has them) with f32 activations. Which suits
/// which device: on a CPU f32 (latent's own kernels) or bf16 (half the memory; fastest with
/// AMX or AVX512-BF16); f16 runs there on candle's generic ops, about 4x slower than f32 (see
/// [`dtype_advice`]). On a GPU f16, or bf16 where the GPU supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Auto,
    F32,
    F16,
    BF16,
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(Error::InvalidInput(format!(
                "unknown dtype {other:?}: expected auto, f32, f16 or bf16"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        })
    }
}

impl Precision {
    /// The dtype of the weights this precision means on `device`.
    pub fn resolve(self, device: &Device) -> Result<DType> {
        Ok(match self {
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto => DType::F16,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        })
    }
}

/// A warning for a dtype that works but is a poor choice on `device`: f16 on the CPU, which has
/// no fast kernels for it (about 4x slower than f32), and bf16 on a CPU without bf16
/// instructions (the portable kernel). `None` when the pair is fine.
pub fn dtype_advice(device: &Device, dtype: DType) -> Option<String> {
    if !device.is_cpu() {
        return None;
    }
    match dtype {
        DType::F16 => Some(
            "dtype f16 on the CPU runs about 4x slower than f32 (the CPU kernels are f32 and \
             bf16); use f32, or bf16 for half the memory (fastest on CPUs with AMX or \
             AVX512-BF16)"
                .to_string(),
        ),
        DType::BF16 if crate::kernels::bf16::backend() == "portable" => Some(
            "dtype bf16 on this CPU (no AVX512-BF16 or AMX) runs the portable bf16 kernel, about twice as \
             slow as f32: use f32 unless memory is short"
                .to_string(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        for (s, d) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("metal", DeviceSpec::Metal),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), d);
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn auto_precision_is_f32_on_cpu() {
        assert_eq!(Precision::Auto.resolve(&Device::Cpu).unwrap(), DType::F32);
        assert_eq!(Precision::BF16.resolve(&Device::Cpu).unwrap(), DType::BF16);
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::BF16);
        assert!("f8".parse::<Precision>().is_err());
    }

    #[test]
    fn f16_on_the_cpu_and_bf16_without_bf16_instructions_get_advice() {
        let advice = dtype_advice(&Device::Cpu, DType::F16).unwrap();
        assert!(advice.contains("f16") && advice.contains("f32"), "{advice}");
        assert_eq!(dtype_advice(&Device::Cpu, DType::F32), None);
        let bf16 = dtype_advice(&Device::Cpu, DType::BF16);
        if crate::kernels::bf16::backend() == "portable" {
            assert!(bf16.unwrap().contains("use f32"));
        } else {
            assert_eq!(bf16, None);
        }
    }
}
