//! diffusers parity of `latent::schedulers`: replays every case of tests/fixtures/schedulers
//! (made by tools/make_scheduler_fixtures.py with diffusers 0.42.1) and compares timesteps,
//! sigmas, init_noise_sigma, add_noise and a whole denoising loop with a fake model.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use latent::noise::{BatchNoise, NoiseSource};
use latent::schedulers::{build, Scheduler, SchedulerConfig, SchedulerKind};
use serde::Deserialize;

/// Largest difference allowed between a loop's final sample and diffusers', relative to the
/// reference's largest magnitude. The float32 operations are the same as torch's; what remains
/// is torch's vectorised sqrt/exp/log versus libm's (measured worst: 9.2e-7, DPM++ 2M).
const LOOP_TOLERANCE: f32 = 1e-5;

#[derive(Deserialize)]
struct Manifest {
    sample_shape: Vec<usize>,
    noise_seed: u64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: String,
    scheduler: String,
    steps: usize,
    karras: bool,
    init_noise_sigma: f64,
    num_timesteps: usize,
    has_sigmas: bool,
    has_noise: bool,
    /// How many noise tensors diffusers drew (Euler a: one per step; LCM: one per step but
    /// the last).
    noise_draws: usize,
    add_noise_index: Option<usize>,
}

struct Fixture {
    dir: PathBuf,
    manifest: Manifest,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn load() -> Fixture {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers");
        let text = std::fs::read_to_string(dir.join("cases.json")).expect("cases.json");
        let manifest: Manifest = serde_json::from_str(&text).expect("cases.json is valid");
        let tensors =
            candle_core::safetensors::load(dir.join("schedulers.safetensors"), &Device::Cpu)
                .expect("schedulers.safetensors");
        Fixture {
            dir,
            manifest,
            tensors,
        }
    }

    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture lacks tensor `{name}`"))
    }

    fn scheduler(&self, case: &Case) -> Box<dyn Scheduler> {
        let config = SchedulerConfig::from_file(self.dir.join(&case.config))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let kind: SchedulerKind = case.scheduler.parse().unwrap();
        build(kind, &config, case.steps, case.karras)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name))
    }
}

/// The fake model of the fixture: x * 0.1 + pattern * float32(cos(t * 0.0123) * 0.8).
fn fake_model(x: &Tensor, t: f64, pattern: &Tensor) -> Tensor {
    let c = ((t * 0.0123).cos() * 0.8) as f32;
    (x.affine(0.1, 0.0).unwrap() + pattern.affine(f64::from(c), 0.0).unwrap()).unwrap()
}

/// Hands out the noise tensors diffusers drew, in order, checking the requested shape.
struct Replay {
    noise: Tensor,
    next: usize,
}

impl NoiseSource for Replay {
    fn randn(&mut self, shape: &[usize], _device: &Device) -> latent::Result<Tensor> {
        let t = self.noise.get(self.next)?;
        assert_eq!(
            t.dims(),
            shape,
            "noise drawn with another shape than diffusers'"
        );
        self.next += 1;
        Ok(t)
    }
}

/// A noise source for schedulers that must not draw any.
struct NoNoise;

impl NoiseSource for NoNoise {
    fn randn(&mut self, _shape: &[usize], _device: &Device) -> latent::Result<Tensor> {
        panic!("a deterministic scheduler drew noise")
    }
}

fn run_loop(
    s: &mut dyn Scheduler,
    sample: &Tensor,
    pattern: &Tensor,
    noise: &mut dyn NoiseSource,
) -> Tensor {
    let mut x = (sample * s.init_noise_sigma()).unwrap();
    let timesteps = s.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let input = s.scale_model_input(&x, i).unwrap();
        let out = fake_model(&input, t, pattern);
        x = s.step(&out, i, &x, noise).unwrap();
    }
    x
}

/// max |a − b| / max |b|.
fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale
}

fn ulps(a: f32, b: f32) -> u32 {
    if a == b {
        return 0;
    }
    // Sigmas are non-negative, so bit patterns order like the values.
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn fixture_covers_every_scheduler_and_option() {
    let f = Fixture::load();
    let kinds: BTreeSet<&str> = f
        .manifest
        .cases
        .iter()
        .map(|c| c.scheduler.as_str())
        .collect();
    for kind in SchedulerKind::ALL {
        assert!(
            kinds.contains(kind.to_string().as_str()),
            "no case for {kind}"
        );
    }
    let configs: BTreeSet<&str> = f.manifest.cases.iter().map(|c| c.config.as_str()).collect();
    for name in [
        "sd15",
        "sd21",
        "sd15-linspace",
        "sd15-leading",
        "sd15-trailing",
        "sd15-squaredcos",
        "sd15-sample",
        "sd15-prk",
        "sd21-zsnr",
        "minimal",
        "lcm-dreamshaper",
        "lcm-custom",
        "turbo",
    ] {
        assert!(
            configs.contains(format!("configs/{name}.json").as_str()),
            "no {name} case"
        );
    }
    assert!(f
        .manifest
        .cases
        .iter()
        .any(|c| c.karras && c.scheduler == "euler"));
    assert!(f
        .manifest
        .cases
        .iter()
        .any(|c| c.karras && c.scheduler == "dpm++2m"));
    assert_eq!(
        f.tensor("sample").dims(),
        f.manifest.sample_shape.as_slice()
    );
    // The step counts LCM and the Turbo models are run at.
    let names: BTreeSet<&str> = f.manifest.cases.iter().map(|c| c.name.as_str()).collect();
    for name in [
        "lcm-dreamshaper/lcm/1",
        "lcm-dreamshaper/lcm/2",
        "lcm-dreamshaper/lcm/4",
        "lcm-dreamshaper/lcm/8",
        "sd15/lcm/4",
        "sd21/lcm/4",
        "turbo/euler-a/1",
        "turbo/euler-a/2",
        "turbo/euler-a/4",
    ] {
        assert!(names.contains(name), "no case {name}");
    }
}

/// diffusers draws Euler a's noise on every step and LCM's on every step but the last (none
/// for one step); the replay in `full_loops_match_diffusers` holds `latent` to the same count.
#[test]
fn noise_is_drawn_where_diffusers_draws_it() {
    let f = Fixture::load();
    for case in &f.manifest.cases {
        let expected = match case.scheduler.as_str() {
            "euler-a" => case.num_timesteps,
            "lcm" => case.num_timesteps - 1,
            _ => 0,
        };
        assert_eq!(case.noise_draws, expected, "{}", case.name);
        assert_eq!(case.has_noise, expected > 0, "{}", case.name);
        let kind: SchedulerKind = case.scheduler.parse().unwrap();
        if case.num_timesteps > 1 {
            assert_eq!(kind.draws_noise(), expected > 0, "{}", case.name);
        }
    }
}

#[test]
fn timesteps_match_diffusers_exactly() {
    let f = Fixture::load();
    for case in &f.manifest.cases {
        let s = f.scheduler(case);
        let expected: Vec<f64> = f
            .tensor(&format!("{}/timesteps", case.name))
            .to_vec1()
            .unwrap();
        assert_eq!(expected.len(), case.num_timesteps, "{}", case.name);
        assert_eq!(s.timesteps(), expected.as_slice(), "{}", case.name);
        // diffusers' init_noise_sigma is a float32 tensor or 1.0: compared exactly as float32
        // (serde_json may read the decimal in cases.json one float64 ulp off).
        assert_eq!(
            s.init_noise_sigma() as f32,
            case.init_noise_sigma as f32,
            "{}: init_noise_sigma",
            case.name
        );
    }
}

#[test]
fn sigmas_match_diffusers_within_one_ulp() {
    let f = Fixture::load();
    let mut exact = 0;
    let mut total = 0;
    for case in f.manifest.cases.iter().filter(|c| c.has_sigmas) {
        let s = f.scheduler(case);
        let expected: Vec<f32> = f
            .tensor(&format!("{}/sigmas", case.name))
            .to_vec1()
            .unwrap();
        let ours = s
            .sigmas()
            .unwrap_or_else(|| panic!("{}: no sigmas", case.name));
        assert_eq!(ours.len(), expected.len(), "{}", case.name);
        for (i, (&a, &b)) in ours.iter().zip(&expected).enumerate() {
            // One float32 ulp: numpy's float64 pow (Karras) may differ from libm's by an ulp
            // before the cast.
            assert!(
                ulps(a, b) <= 1,
                "{} sigma {i}: {a} vs diffusers {b}",
                case.name
            );
            if a != b {
                println!("{} sigma {i}: {a:e} vs diffusers {b:e}", case.name);
            }
            exact += usize::from(a == b);
            total += 1;
        }
    }
    println!("sigmas: {exact} of {total} bit-equal to diffusers, the rest within 1 ulp");
    assert!(total > 0);
}

#[test]
fn full_loops_match_diffusers() {
    let f = Fixture::load();
    let sample = f.tensor("sample");
    let pattern = f.tensor("pattern");
    let mut worst: BTreeMap<String, (f32, String)> = BTreeMap::new();
    for case in &f.manifest.cases {
        let mut s = f.scheduler(case);
        let result = if case.has_noise {
            let mut replay = Replay {
                noise: f.tensor(&format!("{}/noise", case.name)).clone(),
                next: 0,
            };
            let r = run_loop(s.as_mut(), sample, pattern, &mut replay);
            assert_eq!(replay.next, case.noise_draws, "{}: noise draws", case.name);
            r
        } else {
            run_loop(s.as_mut(), sample, pattern, &mut NoNoise)
        };
        let expected = f.tensor(&format!("{}/final", case.name));
        let rel = relative_diff(&result, expected);
        assert!(
            rel <= LOOP_TOLERANCE,
            "{}: max |ours - diffusers| / max |diffusers| = {rel:e}",
            case.name
        );
        let entry = worst
            .entry(case.scheduler.clone())
            .or_insert((0.0, String::new()));
        if rel >= entry.0 {
            *entry = (rel, case.name.clone());
        }
    }
    for (kind, (rel, name)) in worst {
        println!("{kind}: worst relative difference {rel:e} ({name})");
    }
}

#[test]
fn add_noise_matches_diffusers() {
    let f = Fixture::load();
    let sample = f.tensor("sample");
    let pattern = f.tensor("pattern");
    let mut checked = 0;
    let mut worst = 0.0f32;
    for case in &f.manifest.cases {
        let Some(index) = case.add_noise_index else {
            continue;
        };
        let s = f.scheduler(case);
        let ours = s.add_noise(sample, pattern, index).unwrap();
        let expected = f.tensor(&format!("{}/add_noise", case.name));
        // Same float32 operations as torch: equal up to rounding of the coefficients.
        let rel = relative_diff(&ours, expected);
        assert!(
            rel <= 1e-6,
            "{}: add_noise relative difference {rel:e}",
            case.name
        );
        worst = worst.max(rel);
        checked += 1;
    }
    println!("add_noise: {checked} cases, worst relative difference {worst:e}");
    assert!(checked > 50, "only {checked} add_noise cases");
}

/// Euler ancestral and LCM with the torch-compatible generators `latent` uses (one per image,
/// seeds s, s+1, ...) draw the same noise diffusers drew with a list of torch generators.
#[test]
fn noisy_schedulers_with_torch_generators_match_diffusers() {
    let f = Fixture::load();
    let sample = f.tensor("sample");
    let pattern = f.tensor("pattern");
    let batch = f.manifest.sample_shape[0];
    let mut checked = 0;
    for case in f.manifest.cases.iter().filter(|c| c.has_noise) {
        let mut s = f.scheduler(case);
        let mut noise = BatchNoise::consecutive(f.manifest.noise_seed, batch);
        let result = run_loop(s.as_mut(), sample, pattern, &mut noise);
        let expected = f.tensor(&format!("{}/final", case.name));
        let rel = relative_diff(&result, expected);
        assert!(rel <= LOOP_TOLERANCE, "{}: {rel:e}", case.name);
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} cases draw noise");
}

#[test]
fn config_files_keep_their_path_for_errors() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers/configs");
    let path = dir.join("sd15.json");
    let config = SchedulerConfig::from_file(&path).unwrap();
    assert_eq!(config.path(), Path::new(&path));
    assert_eq!(config.default_kind(&path).unwrap(), SchedulerKind::Pndm);
    let sd21 = SchedulerConfig::from_file(dir.join("sd21.json")).unwrap();
    assert_eq!(
        sd21.default_kind(dir.join("sd21.json")).unwrap(),
        SchedulerKind::Ddim
    );
    for (name, kind) in [
        ("lcm-dreamshaper.json", SchedulerKind::Lcm),
        ("turbo.json", SchedulerKind::EulerAncestral),
    ] {
        let config = SchedulerConfig::from_file(dir.join(name)).unwrap();
        assert_eq!(config.default_kind(dir.join(name)).unwrap(), kind, "{name}");
    }
    let missing = SchedulerConfig::from_file(dir.join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.json"), "{missing}");
}
