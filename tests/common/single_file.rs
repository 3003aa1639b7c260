//! The tiny fixtures as single-file checkpoints, assembled from their folders by the recipes
//! tools/make_single_file.py wrote (tests/fixtures/single-file/), so the repository holds
//! no second copy of their weights. The file must hash to what the script wrote and diffusers'
//! `from_single_file` loaded.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::fixtures;

/// Writes `tiny-{kind}.safetensors` (kind: sd1, sd2, sdxl) into `dir` and returns its path;
/// panics unless its sha256 is the recipe's.
pub fn assemble(kind: &str, dir: &Path) -> PathBuf {
    let fx = fixtures().join("single-file");
    let recipe: Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join(format!("tiny-{kind}.recipe.json"))).unwrap(),
    )
    .unwrap();
    let folder = fixtures().join(recipe["folder"].as_str().unwrap());
    let mut bytes: HashMap<String, Vec<u8>> = HashMap::new();
    let mut read = |rel: &str| -> () {
        if !bytes.contains_key(rel) {
            let path = if rel == "<extras>" {
                fx.join(recipe["extras"].as_str().unwrap())
            } else {
                folder.join(rel)
            };
            bytes.insert(rel.to_string(), std::fs::read(path).unwrap());
        }
    };
    read("<extras>");
    for (_, step) in recipe["tensors"].as_object().unwrap() {
        for source in step[1].as_array().unwrap() {
            read(source[0].as_str().unwrap());
        }
    }
    let files: HashMap<&str, SafeTensors> = bytes
        .iter()
        .map(|(k, v)| (k.as_str(), SafeTensors::deserialize(v).unwrap()))
        .collect();
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in files["<extras>"].tensors() {
        out.push((name, t.dtype(), t.shape().to_vec(), t.data().to_vec()));
    }
    for (name, step) in recipe["tensors"].as_object().unwrap() {
        let op = step[0].as_str().unwrap();
        let parts: Vec<_> = step[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                files[s[0].as_str().unwrap()]
                    .tensor(s[1].as_str().unwrap())
                    .unwrap()
            })
            .collect();
        let first = &parts[0];
        let (mut shape, dtype) = (first.shape().to_vec(), first.dtype());
        let data = match op {
            "same" => first.data().to_vec(),
            "conv" => {
                shape.extend([1, 1]);
                first.data().to_vec()
            }
            "cat" => {
                shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
                parts
                    .iter()
                    .flat_map(|p| p.data().iter().copied())
                    .collect()
            }
            "t" => {
                let (rows, cols) = (shape[0], shape[1]);
                let size = dtype.bitsize() / 8;
                let src = first.data();
                let mut data = vec![0u8; src.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        let from = (r * cols + c) * size;
                        let to = (c * rows + r) * size;
                        data[to..to + size].copy_from_slice(&src[from..from + size]);
                    }
                }
                shape.reverse();
                data
            }
            other => panic!("unknown recipe op {other}"),
        };
        out.push((name.clone(), dtype, shape, data));
    }
    let views: Vec<(String, TensorView)> = out
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let path = dir.join(format!("tiny-{kind}.safetensors"));
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let digest = Sha256::digest(std::fs::read(&path).unwrap());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        recipe["sha256"].as_str().unwrap(),
        "{kind}: the assembled file differs from the one diffusers loaded"
    );
    path
}
