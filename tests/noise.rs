//! torch parity of `latent::noise`: replays every case of tests/fixtures/noise (made by
//! tools/make_noise_fixtures.py with torch's CPU generator) and requires bit-equal values.
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::Device;
use latent::noise::{BatchNoise, NoiseSource, RngKind, TorchGenerator};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    streams: Vec<Stream>,
    batches: Vec<Batch>,
}

/// One generator, fresh from `manual_seed(seed)`, then `calls` in order.
#[derive(Deserialize)]
struct Stream {
    seed: u64,
    calls: Vec<Call>,
}

#[derive(Deserialize)]
struct Call {
    tensor: String,
    shape: Vec<usize>,
}

/// diffusers' `randn_tensor(shape, generator=[manual_seed(s) for s in seeds])`.
#[derive(Deserialize)]
struct Batch {
    seeds: Vec<u64>,
    tensor: String,
    shape: Vec<usize>,
}

struct Fixture {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: HashMap<String, String>,
    cases: Cases,
}

fn load_fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/noise/torch_randn.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
    let metadata = header.metadata().clone().expect("fixture metadata");
    let cases: Cases = serde_json::from_str(&metadata["cases"]).expect("`cases` metadata is JSON");
    let file = SafeTensors::deserialize(&bytes).expect("safetensors file");
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect();
    Fixture {
        tensors,
        metadata,
        cases,
    }
}

/// All values of an f32 tensor, row-major.
fn values(tensor: &candle_core::Tensor) -> Vec<f32> {
    tensor
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values")
}

/// Number of positions where `got` and `expected` differ in their bits, and the first of them.
fn bit_mismatches(got: &[f32], expected: &[f32]) -> (usize, Option<usize>) {
    assert_eq!(got.len(), expected.len());
    let diffs: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != expected[i].to_bits())
        .collect();
    (diffs.len(), diffs.first().copied())
}

#[test]
fn torch_randn_is_reproduced_bit_for_bit() {
    let fixture = load_fixture();
    let mut checked = BTreeSet::new();
    let mut elements = 0;
    let mut failures = Vec::new();
    for stream in &fixture.cases.streams {
        let mut generator = TorchGenerator::new(stream.seed);
        for call in &stream.calls {
            let (shape, expected) = &fixture.tensors[&call.tensor];
            assert_eq!(shape, &call.shape, "{}", call.tensor);
            let got = generator.randn(call.shape.iter().product());
            // Tolerance: none. Every value must have the same bits as torch's.
            let (count, first) = bit_mismatches(&got, expected);
            if count > 0 {
                failures.push(format!(
                    "{}: {count}/{} values differ, first at {first:?}",
                    call.tensor,
                    got.len()
                ));
            }
            elements += got.len();
            checked.insert(call.tensor.clone());
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // The fixture covers what it claims: large, unaligned, tiny and multi-call cases.
    assert!(fixture.cases.streams.len() >= 30, "too few cases");
    assert!(fixture.cases.streams.iter().any(|s| s.calls.len() > 3));
    assert!(elements > 30_000, "only {elements} values checked");
    for batch in &fixture.cases.batches {
        checked.insert(batch.tensor.clone());
    }
    let unchecked: Vec<&String> = fixture
        .tensors
        .keys()
        .filter(|name| !checked.contains(*name))
        .collect();
    assert!(
        unchecked.is_empty(),
        "tensors without a case: {unchecked:?}"
    );
}

#[test]
fn batch_noise_matches_diffusers_randn_tensor() {
    let fixture = load_fixture();
    assert!(!fixture.cases.batches.is_empty());
    for batch in &fixture.cases.batches {
        let (_, expected) = &fixture.tensors[&batch.tensor];
        let mut noise = BatchNoise::from_seeds(batch.seeds.iter().copied());
        let tensor = noise.randn(&batch.shape, &Device::Cpu).expect("noise");
        assert_eq!(tensor.dims(), batch.shape.as_slice());
        let got = values(&tensor);
        // Tolerance: none (bit-equal).
        assert_eq!(
            bit_mismatches(&got, expected),
            (0, None),
            "{}",
            batch.tensor
        );
    }
}

#[test]
fn batch_noise_row_i_is_generator_seed_plus_i() {
    let (seed, batch) = (1234u64, 3usize);
    let shape = [batch, 4, 7, 9];
    let row: usize = shape[1..].iter().product();
    let mut noise = BatchNoise::consecutive(seed, batch);
    let mut via_kind = RngKind::Torch.noise_source((0..batch as u64).map(|i| seed + i));
    let mut alone: Vec<TorchGenerator> = (0..batch as u64)
        .map(|i| TorchGenerator::new(seed + i))
        .collect();
    // Two draws: the second shows that each image's generator carries on by itself.
    for draw in 0..2 {
        let got = values(&noise.randn(&shape, &Device::Cpu).expect("noise"));
        assert_eq!(
            got,
            values(&via_kind.randn(&shape, &Device::Cpu).expect("noise"))
        );
        for (i, generator) in alone.iter_mut().enumerate() {
            assert_eq!(
                got[i * row..(i + 1) * row],
                generator.randn(row)[..],
                "draw {draw}, row {i}"
            );
        }
    }
    assert!(noise.randn(&[batch + 1, 4], &Device::Cpu).is_err());
}

#[test]
fn seed_above_32_bits_equals_its_low_half_in_torch_and_here() {
    let fixture = load_fixture();
    assert_eq!(fixture.metadata["seed_low_32_bits_only"], "true");
    let high = (1u64 << 32) + 5;
    let mut compared = 0;
    for (name, (_, values)) in &fixture.tensors {
        let Some(rest) = name.strip_prefix(&format!("single/seed{high}/")) else {
            continue;
        };
        let (_, low) = &fixture.tensors[&format!("single/seed5/{rest}")];
        assert_eq!(bit_mismatches(values, low), (0, None), "{name}");
        let ours = TorchGenerator::new(5).randn(values.len());
        assert_eq!(bit_mismatches(&ours, values), (0, None), "{name}");
        compared += 1;
    }
    assert!(compared >= 5, "only {compared} shapes compared");
}

#[test]
fn fixture_records_its_versions() {
    let fixture = load_fixture();
    for key in ["torch_version", "diffusers_version", "cpu_capability"] {
        assert!(fixture.metadata.contains_key(key), "missing {key}");
    }
    assert!(matches!(
        fixture.metadata["cpu_capability"].as_str(),
        "AVX2" | "AVX512"
    ));
}
