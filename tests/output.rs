//! Output files on real folders: PNG pixels and metadata, safe writing, file naming, A1111 text.
use std::fs;
use std::path::{Path, PathBuf};

use latent::output::{
    parse_a1111, plan_output_paths, read_png_parameters, write_png, GenerationParams,
};

fn params(prompt: &str) -> GenerationParams {
    GenerationParams {
        prompt: prompt.into(),
        negative_prompt: "blurry, lowres".into(),
        steps: 30,
        sampler: "DPM++ 2M".into(),
        schedule_type: Some("Karras".into()),
        cfg_scale: 7.5,
        seed: 42,
        width: 5,
        height: 3,
        model: "v1-5-pruned-emaonly".into(),
        extra: vec![("Model hash".into(), "6ce0161689".into())],
    }
}

/// A 5x3 gradient, different in every channel so a swapped axis or channel would show.
fn pixels(width: u32, height: u32) -> Vec<u8> {
    (0..height)
        .flat_map(|y| (0..width).flat_map(move |x| [(x * 40) as u8, (y * 80) as u8, (x + y) as u8]))
        .collect()
}

/// File names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// How many tEXt, zTXt and iTXt chunks hold `parameters`, and whether any iTXt is compressed.
fn text_chunk_kinds(path: &Path) -> (usize, usize, usize, bool) {
    let file = std::io::BufReader::new(fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    reader.finish().unwrap();
    let info = reader.info();
    let itxt_compressed = info.utf8_text.iter().any(|c| c.compressed);
    (
        info.uncompressed_latin1_text
            .iter()
            .filter(|c| c.keyword == "parameters")
            .count(),
        info.compressed_latin1_text
            .iter()
            .filter(|c| c.keyword == "parameters")
            .count(),
        info.utf8_text
            .iter()
            .filter(|c| c.keyword == "parameters")
            .count(),
        itxt_compressed,
    )
}

#[test]
fn png_has_the_same_pixels_and_latin1_parameters_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cat.png");
    let rgb = pixels(5, 3);
    let text = params("café au lait, ½ cup").to_a1111();
    write_png(&path, &rgb, 5, 3, &text, false).unwrap();

    let decoded = image::open(&path).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (5, 3));
    assert_eq!(decoded.as_raw(), &rgb);
    assert_eq!(
        read_png_parameters(&path).unwrap().as_deref(),
        Some(text.as_str())
    );
    assert_eq!(text_chunk_kinds(&path), (1, 0, 0, false));
}

#[test]
fn non_latin1_parameters_go_into_an_uncompressed_itxt_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cat.png");
    let text = params("café 猫, 🐱").to_a1111();
    write_png(&path, &pixels(5, 3), 5, 3, &text, false).unwrap();

    assert_eq!(
        read_png_parameters(&path).unwrap().as_deref(),
        Some(text.as_str())
    );
    assert_eq!(text_chunk_kinds(&path), (0, 0, 1, false));
    let parsed = parse_a1111(&read_png_parameters(&path).unwrap().unwrap()).unwrap();
    assert_eq!(parsed.prompt, "café 猫, 🐱");
}

#[test]
fn png_without_parameters_reads_as_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.png");
    image::RgbImage::from_raw(5, 3, pixels(5, 3))
        .unwrap()
        .save(&path)
        .unwrap();
    assert_eq!(read_png_parameters(&path).unwrap(), None);
}

#[test]
fn corrupt_or_foreign_files_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let text_file = dir.path().join("notes.png");
    fs::write(&text_file, "not a png at all").unwrap();
    let err = read_png_parameters(&text_file).unwrap_err();
    assert!(err.to_string().contains("notes.png"), "{err}");

    let good = dir.path().join("good.png");
    write_png(&good, &pixels(5, 3), 5, 3, "x\nSteps: 1", false).unwrap();
    let bytes = fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.png");
    fs::write(&truncated, &bytes[..bytes.len() - 20]).unwrap();
    let err = read_png_parameters(&truncated).unwrap_err();
    assert!(err.to_string().contains("truncated.png"), "{err}");

    let missing = dir.path().join("missing.png");
    let err = read_png_parameters(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.png"), "{err}");
}

#[test]
fn no_overwrite_leaves_the_original_untouched_and_says_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cat.png");
    fs::write(&path, b"precious").unwrap();

    let err = write_png(&path, &pixels(5, 3), 5, 3, "p\nSteps: 1", false).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("cat.png"), "{message}");
    // The library names no flag; the command line adds "pass --overwrite" (tests/cli.rs).
    assert!(message.contains("file exists"), "{message}");
    assert_eq!(fs::read(&path).unwrap(), b"precious");
    assert_eq!(listing(dir.path()), ["cat.png"]);
}

#[test]
fn overwrite_replaces_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cat.png");
    write_png(&path, &pixels(5, 3), 5, 3, "first\nSteps: 1", false).unwrap();
    let rgb = vec![200; 2 * 2 * 3];
    write_png(&path, &rgb, 2, 2, "second\nSteps: 2", true).unwrap();

    assert_eq!(image::open(&path).unwrap().to_rgb8().as_raw(), &rgb);
    assert_eq!(
        read_png_parameters(&path).unwrap().as_deref(),
        Some("second\nSteps: 2")
    );
    assert_eq!(listing(dir.path()), ["cat.png"]);
}

#[test]
fn missing_parent_folders_are_created_and_no_temp_file_remains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/cat.png");
    write_png(&path, &pixels(5, 3), 5, 3, "p\nSteps: 1", false).unwrap();
    assert_eq!(listing(&dir.path().join("a/b")), ["cat.png"]);
}

#[test]
fn failures_after_encoding_remove_the_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    // A folder in the way: the PNG is encoded, then the rename into place fails.
    let path = dir.path().join("cat.png");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("inside"), b"keep").unwrap();
    let err = write_png(&path, &pixels(5, 3), 5, 3, "p\nSteps: 1", true).unwrap_err();
    assert!(err.to_string().contains("cat.png"), "{err}");
    assert_eq!(listing(dir.path()), ["cat.png"]);
    assert_eq!(listing(&path), ["inside"]);
}

#[test]
fn a_wrong_buffer_size_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cat.png");
    let err = write_png(&path, &pixels(5, 3), 5, 4, "p", false).unwrap_err();
    assert!(err.to_string().contains("expected 5x4x3"), "{err}");
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn concurrent_writers_without_overwrite_produce_exactly_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.png");
    let results: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let path = &path;
                scope.spawn(move || {
                    let rgb = vec![i; 5 * 3 * 3];
                    write_png(path, &rgb, 5, 3, &format!("writer {i}"), false).is_ok()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
    let winner = results.iter().position(|ok| *ok).unwrap();
    assert_eq!(
        read_png_parameters(&path).unwrap(),
        Some(format!("writer {winner}"))
    );
    assert_eq!(listing(dir.path()), ["race.png"]);
}

#[test]
fn folder_numbering_continues_after_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["00000-1.png", "00007-99.png", "00003-5.png", "notes.txt"] {
        fs::write(dir.path().join(name), b"").unwrap();
    }
    let paths = plan_output_paths(Some(dir.path()), Path::new("unused"), &[11, 12], false).unwrap();
    assert_eq!(
        paths,
        [
            dir.path().join("00008-11.png"),
            dir.path().join("00009-12.png")
        ]
    );

    // After writing them, the next plan goes on from there.
    for path in &paths {
        write_png(path, &pixels(5, 3), 5, 3, "p\nSteps: 1", false).unwrap();
    }
    let next = plan_output_paths(None, dir.path(), &[3], false).unwrap();
    assert_eq!(next, [dir.path().join("00010-3.png")]);
}

#[test]
fn a_missing_folder_starts_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("outputs");
    let paths = plan_output_paths(None, &out, &[42, 7], false).unwrap();
    assert_eq!(paths, [out.join("00000-42.png"), out.join("00001-7.png")]);
}

#[test]
fn file_targets_name_one_or_several_files() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("cat.png");
    let one = plan_output_paths(Some(&target), Path::new("unused"), &[1], false).unwrap();
    assert_eq!(one, std::slice::from_ref(&target));
    let three = plan_output_paths(Some(&target), Path::new("unused"), &[1, 2, 3], false).unwrap();
    let expected: Vec<PathBuf> = ["cat-0.png", "cat-1.png", "cat-2.png"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    assert_eq!(three, expected);
}

#[test]
fn an_existing_planned_file_is_an_error_unless_overwriting() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("cat-1.png"), b"old").unwrap();
    let target = dir.path().join("cat.png");

    let err = plan_output_paths(Some(&target), Path::new("unused"), &[1, 2], false).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("cat-1.png"), "{message}");
    assert!(message.contains("file exists"), "{message}");

    let paths = plan_output_paths(Some(&target), Path::new("unused"), &[1, 2], true).unwrap();
    assert_eq!(paths.len(), 2);
}

#[test]
fn other_extensions_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        plan_output_paths(Some(&dir.path().join("cat.jpg")), dir.path(), &[1], false).unwrap_err();
    assert!(
        err.to_string().contains("only .png output is supported"),
        "{err}"
    );
    // An existing folder with a dot in its name is still a folder.
    let dotted = dir.path().join("run.v2");
    fs::create_dir(&dotted).unwrap();
    let paths = plan_output_paths(Some(&dotted), dir.path(), &[1], false).unwrap();
    assert_eq!(paths, [dotted.join("00000-1.png")]);
}

#[test]
fn parameters_round_trip_through_text_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let p = GenerationParams {
        prompt: "a cat,\nwearing a hat: red".into(),
        negative_prompt: "dog\nhorse".into(),
        extra: vec![
            ("Walk".into(), "slerp: 8 frames, \"loop\"".into()),
            ("Lora hashes".into(), "detail: 7c6bad76eb54".into()),
        ],
        ..params("")
    };
    let text = p.to_a1111();
    let path = dir.path().join("p.png");
    write_png(&path, &pixels(5, 3), 5, 3, &text, false).unwrap();
    let parsed = parse_a1111(&read_png_parameters(&path).unwrap().unwrap()).unwrap();

    assert_eq!(parsed.prompt, p.prompt);
    assert_eq!(parsed.negative_prompt, p.negative_prompt);
    let expected: Vec<(String, String)> = [
        ("Steps", "30"),
        ("Sampler", "DPM++ 2M"),
        ("Schedule type", "Karras"),
        ("CFG scale", "7.5"),
        ("Seed", "42"),
        ("Size", "5x3"),
        ("Model", "v1-5-pruned-emaonly"),
        ("Walk", "slerp: 8 frames, \"loop\""),
        ("Lora hashes", "detail: 7c6bad76eb54"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(parsed.settings, expected);
}

#[test]
fn automatic1111_text_parses() {
    // Written the way AUTOMATIC1111 v1.10 lays out its infotext (quoted hashes, bare version).
    let text = "masterpiece, best quality, (a red fox:1.2) in the snow\n\
                sharp focus\n\
                Negative prompt: lowres, bad anatomy, (blurry:1.1)\n\
                Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, \
                Seed: 3793271083, Size: 512x768, Model hash: 6ce0161689, \
                Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, \
                VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.5, \
                Hires upscale: 2, Hires upscaler: Latent, \
                Lora hashes: \"add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f\", \
                TI hashes: \"easynegative: c74b4e810b03\", Version: v1.10.1";
    let parsed = parse_a1111(text).unwrap();
    assert_eq!(
        parsed.prompt,
        "masterpiece, best quality, (a red fox:1.2) in the snow\nsharp focus"
    );
    assert_eq!(parsed.negative_prompt, "lowres, bad anatomy, (blurry:1.1)");
    assert_eq!(parsed.get("Steps"), Some("25"));
    assert_eq!(parsed.get("Sampler"), Some("DPM++ 2M"));
    assert_eq!(parsed.get("Schedule type"), Some("Karras"));
    assert_eq!(parsed.get("CFG scale"), Some("7"));
    assert_eq!(parsed.get("Seed"), Some("3793271083"));
    assert_eq!(parsed.get("Size"), Some("512x768"));
    assert_eq!(parsed.get("Model"), Some("v1-5-pruned-emaonly"));
    assert_eq!(
        parsed.get("Lora hashes"),
        Some("add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f")
    );
    assert_eq!(parsed.get("Version"), Some("v1.10.1"));
    assert_eq!(parsed.settings.len(), 16);
}
