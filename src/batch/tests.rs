//! Unit tests of the pure parts of batch: parsing, the plan, naming and the manifest.
use std::fs;
use std::path::{Path, PathBuf};

use super::prompt_file::decode_utf8;
use super::*;
use crate::noise::RngKind;
use crate::pipeline::Sampling;
use crate::schedulers::SchedulerKind;
use crate::{Error, Result};

fn spec(prompt: &str) -> LineSpec {
    LineSpec {
        prompt: prompt.into(),
        ..LineSpec::default()
    }
}

fn text(s: &str) -> PromptFile {
    parse_prompt_text(Path::new("p.txt"), s, Format::Text).unwrap()
}

fn opt_err(line: &str) -> String {
    parse_text_line(line).unwrap_err()
}

// -- words ----------------------------------------------------------------------------

#[test]
fn words_split_like_a_shell() {
    let w = |s: &str| split_words(s).unwrap();
    assert_eq!(w("a b  c"), ["a", "b", "c"]);
    assert_eq!(w(r#""a b" 'c d'"#), ["a b", "c d"]);
    assert_eq!(w(r#"a"b c"d"#), ["ab cd"]);
    assert_eq!(w(r#""say \"hi\" \\ \n""#), [r#"say "hi" \ \n"#]);
    assert_eq!(w(r#"'it''s' 'a \ b'"#), ["its", r"a \ b"]);
    assert_eq!(w(r"a\ b \'c"), ["a b", "'c"]);
    assert_eq!(w(r#""" ''"#), ["", ""]);
    assert_eq!(w("  \t "), Vec::<String>::new());
    assert_eq!(w("\"it's\""), ["it's"]);
    assert_eq!(w("caf\u{e9} \"\u{732b}\""), ["caf\u{e9}", "\u{732b}"]);
}

#[test]
fn words_report_unclosed_quotes_with_column() {
    assert_eq!(
        split_words(r#"--prompt "a cat"#).unwrap_err(),
        "unclosed double quote (opened at column 10)"
    );
    assert_eq!(
        split_words("--prompt 'a cat").unwrap_err(),
        "unclosed single quote (opened at column 10)"
    );
    assert_eq!(
        split_words(r"a b\").unwrap_err(),
        "a backslash at the end of the line (column 4) escapes nothing"
    );
}

// -- text lines -------------------------------------------------------------------------

#[test]
fn plain_lines_are_prompts_and_comments_are_skipped() {
    assert_eq!(
        parse_text_line("  a red fox  ").unwrap(),
        Some(spec("a red fox"))
    );
    assert_eq!(parse_text_line("# a comment").unwrap(), None);
    assert_eq!(parse_text_line("   # indented comment").unwrap(), None);
    assert_eq!(parse_text_line("").unwrap(), None);
    assert_eq!(parse_text_line(" \t").unwrap(), None);
    // A '#' later in the line is part of the prompt; so are quotes and a lone dash pair.
    assert_eq!(
        parse_text_line("a #1 \"best\" cat -- really").unwrap(),
        Some(spec("a #1 \"best\" cat -- really"))
    );
}

#[test]
fn a1111_lines_take_every_option() {
    let s = parse_text_line(
        r#"--prompt "a cat, oil" --negative_prompt 'blurry, dark' --seed 5 --steps 30 --cfg_scale 7 --width 512 --height 768 --sampler_name "DPM++ 2M" --batch_size 2 --n_iter 3"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        s,
        LineSpec {
            prompt: "a cat, oil".into(),
            negative_prompt: Some("blurry, dark".into()),
            seed: Some(5),
            steps: Some(30),
            cfg_scale: Some(7.0),
            width: Some(512),
            height: Some(768),
            scheduler: Some(SchedulerKind::DpmPp2m),
            karras: Some(false),
            batch_size: Some(2),
            n_iter: Some(3),
        }
    );
}

#[test]
fn a1111_prompt_runs_on_until_the_next_option() {
    let s = parse_text_line("--prompt a cat  on a mat --negative_prompt dog bark --steps 4")
        .unwrap()
        .unwrap();
    assert_eq!(s.prompt, "a cat on a mat");
    assert_eq!(s.negative_prompt.as_deref(), Some("dog bark"));
    assert_eq!(s.steps, Some(4));
}

#[test]
fn a1111_variants_equals_dashes_seed_minus_one_karras() {
    let s = parse_text_line(
        "--prompt=\"a b\" --negative-prompt=x --cfg-scale=4.5 --seed -1 \
         --sampler_name 'DPM++ 2M Karras'",
    )
    .unwrap()
    .unwrap();
    assert_eq!(s.prompt, "a b");
    assert_eq!(s.negative_prompt.as_deref(), Some("x"));
    assert_eq!(s.cfg_scale, Some(4.5));
    assert_eq!(s.seed, None);
    assert_eq!(s.scheduler, Some(SchedulerKind::DpmPp2m));
    assert_eq!(s.karras, Some(true));

    let s = parse_text_line("--prompt x --scheduler euler --karras true")
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.scheduler, s.karras),
        (Some(SchedulerKind::Euler), Some(true))
    );
    // latent's own names work in sampler_name too; no Karras suffix means karras off.
    let s = parse_text_line("--prompt x --sampler_name euler-a")
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.scheduler, s.karras),
        (Some(SchedulerKind::EulerAncestral), Some(false))
    );
    // Empty negative prompt, quoted.
    let s = parse_text_line("--prompt x --negative_prompt \"\"")
        .unwrap()
        .unwrap();
    assert_eq!(s.negative_prompt.as_deref(), Some(""));
}

#[test]
fn a1111_sampler_names_map_onto_schedulers() {
    let cases = [
        ("Euler a", SchedulerKind::EulerAncestral, false),
        ("Euler", SchedulerKind::Euler, false),
        ("Euler Karras", SchedulerKind::Euler, true),
        ("DPM++ 2M", SchedulerKind::DpmPp2m, false),
        ("DPM++ 2M Karras", SchedulerKind::DpmPp2m, true),
        ("dpm++ 2m karras", SchedulerKind::DpmPp2m, true),
        ("DDIM", SchedulerKind::Ddim, false),
        ("PLMS", SchedulerKind::Pndm, false),
        ("k_euler_a", SchedulerKind::EulerAncestral, false),
        ("k_dpmpp_2m_ka", SchedulerKind::DpmPp2m, true),
        ("dpm++2m", SchedulerKind::DpmPp2m, false),
    ];
    for (name, kind, karras) in cases {
        assert_eq!(parse_sampler_name(name), Ok((kind, karras)), "{name}");
        assert_eq!(
            parse_sampler_name(&sampler_name(kind, karras)),
            Ok((kind, karras)),
            "round trip of {name}"
        );
    }
    let e = parse_sampler_name("Heun").unwrap_err();
    assert!(
        e.starts_with("unknown sampler `Heun`; latent has DDIM, PLMS"),
        "{e}"
    );
}

#[test]
fn a1111_line_errors_say_why() {
    let cases = [
        ("--prompt x --foo 1", "unknown option --foo; known: prompt"),
        (
            "--prompt x --tiling true",
            "--tiling: this AUTOMATIC1111 option is not supported",
        ),
        (
            "--prompt x --steps ten",
            "--steps ten: expected a whole number of at least 1",
        ),
        ("--prompt x --steps 0", "--steps 0: must be at least 1"),
        ("--prompt x --steps", "--steps needs a value"),
        ("--prompt x --steps --seed 1", "--steps needs a value"),
        (
            "--prompt x --width -8",
            "--width -8: expected a whole number",
        ),
        (
            "--prompt x --cfg_scale abc",
            "--cfg_scale abc: expected a number",
        ),
        (
            "--prompt x --cfg_scale inf",
            "--cfg_scale inf: must be a finite number",
        ),
        (
            "--prompt x --seed -2",
            "--seed -2: expected a whole number >= 0, or -1",
        ),
        (
            "--prompt x --karras yes",
            "--karras yes: expected true or false",
        ),
        (
            "--prompt x --sampler_name Heun",
            "--sampler_name: unknown sampler `Heun`",
        ),
        (
            "--prompt x --scheduler lms",
            "--scheduler: unknown scheduler `lms`",
        ),
        ("--prompt x --seed 1 --seed 2", "--seed is given twice"),
        (
            "--prompt x --sampler_name DDIM --scheduler ddim",
            "give either sampler_name or scheduler",
        ),
        (
            "--prompt x --sampler_name 'Euler Karras' --karras false",
            "karras is false but sampler_name asks for Karras",
        ),
        ("--steps 3", "no --prompt on this line"),
        ("--prompt \"\" --steps 3", "--prompt is empty"),
        (
            "--prompt \"a cat",
            "unclosed double quote (opened at column 10)",
        ),
        ("a cat --steps 5", "`--steps` in the middle of a prompt"),
    ];
    for (line, want) in cases {
        let e = opt_err(line);
        assert!(e.starts_with(want), "{line}: got {e:?}, want {want:?}");
    }
    assert_eq!(
        opt_err("x --prompt y"),
        "`--prompt` in the middle of a prompt: options must come first, and the prompt goes \
         in --prompt \"...\""
    );
    assert_eq!(
        opt_err("--prompt x 'y"),
        "unclosed single quote (opened at column 12)"
    );
}

// -- JSON lines -------------------------------------------------------------------------

#[test]
fn json_lines_use_the_same_names() {
    let s = parse_json_line(
        r#"{"prompt": "a cat", "negative_prompt": "dog", "seed": 7, "steps": 3, "cfg_scale": 6.5, "width": 64, "height": 128, "sampler_name": "Euler a", "n_iter": 2}"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        s,
        LineSpec {
            prompt: "a cat".into(),
            negative_prompt: Some("dog".into()),
            seed: Some(7),
            steps: Some(3),
            cfg_scale: Some(6.5),
            width: Some(64),
            height: Some(128),
            scheduler: Some(SchedulerKind::EulerAncestral),
            karras: Some(false),
            batch_size: None,
            n_iter: Some(2),
        }
    );
    assert_eq!(parse_json_line("# note").unwrap(), None);
    assert_eq!(parse_json_line("   ").unwrap(), None);
    let s =
        parse_json_line(r#"{"prompt": "x", "seed": -1, "karras": true, "scheduler": "dpm++2m"}"#)
            .unwrap()
            .unwrap();
    assert_eq!((s.seed, s.karras), (None, Some(true)));
    let s = parse_json_line(r#"{"prompt": "x", "seed": null}"#)
        .unwrap()
        .unwrap();
    assert_eq!(s.seed, None);
}

#[test]
fn json_line_errors_say_why() {
    let cases = [
        (
            r#"{"prompt": "x", "steps": "30"}"#,
            "`steps`: expected a whole number, found a string",
        ),
        (
            r#"{"prompt": "x", "steps": 2.5}"#,
            "`steps` 2.5: expected a whole number",
        ),
        (
            r#"{"prompt": "x", "width": -64}"#,
            "`width` -64: expected a whole number",
        ),
        (
            r#"{"prompt": "x", "cfg_scale": "7"}"#,
            "`cfg_scale`: expected a number, found a string",
        ),
        (
            r#"{"prompt": 5}"#,
            "`prompt`: expected a string, found a number",
        ),
        (
            r#"{"prompt": "x", "karras": 1}"#,
            "`karras`: expected true or false, found a number",
        ),
        (
            r#"{"prompt": "x", "colour": "red"}"#,
            "unknown option `colour`",
        ),
        (r#"{"steps": 3}"#, "no `prompt` on this line"),
        (r#"["a cat"]"#, "expected a JSON object"),
        (r#"{"prompt": "x""#, "not valid JSON"),
        ("a cat", "not valid JSON"),
    ];
    for (line, want) in cases {
        let e = parse_json_line(line).unwrap_err();
        assert!(e.starts_with(want), "{line}: got {e:?}, want {want:?}");
    }
}

// -- files ------------------------------------------------------------------------------

#[test]
fn files_keep_line_numbers_for_lines_and_errors() {
    let f = text(
        "\u{FEFF}# header\n\na cat\r\n--prompt dog --steps 0\n--prompt \"fox\" --seed 3\n\n--bogus 1\n",
    );
    let got: Vec<(usize, &str)> = f
        .lines
        .iter()
        .map(|l| (l.line, l.spec.prompt.as_str()))
        .collect();
    assert_eq!(got, [(3, "a cat"), (5, "fox")]);
    let errs: Vec<String> = f.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errs,
        [
            "p.txt:4: --steps 0: must be at least 1",
            "p.txt:7: unknown option --bogus; known: prompt, negative_prompt, seed, steps, \
             cfg_scale, width, height, sampler_name, scheduler, karras, batch_size, n_iter"
        ]
    );
    let f = parse_prompt_text(
        Path::new("p.jsonl"),
        "{\"prompt\": \"a\"}\n\n# c\n{\"prompt\": 1}\n",
        Format::Jsonl,
    )
    .unwrap();
    assert_eq!(f.lines[0].line, 1);
    assert_eq!(f.errors[0].line, 4);
}

#[test]
fn empty_and_comment_only_files_are_errors() {
    let e = parse_prompt_text(Path::new("e.txt"), "", Format::Text).unwrap_err();
    assert_eq!(e.to_string(), "e.txt: the file is empty");
    let e = parse_prompt_text(Path::new("e.txt"), " \n\n", Format::Text).unwrap_err();
    assert_eq!(e.to_string(), "e.txt: the file is empty");
    let e =
        parse_prompt_text(Path::new("e.txt"), "# only\n\n# comments\n", Format::Text).unwrap_err();
    assert_eq!(
        e.to_string(),
        "e.txt: no prompts in the file (only comments and blank lines)"
    );
}

#[test]
fn non_utf8_and_utf16_files_are_errors_with_the_line() {
    let e = decode_utf8(Path::new("x.txt"), b"ok\nfine\ncaf\xe9\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "x.txt:3: the file is not valid UTF-8 (byte 11 is 0xE9); save it as UTF-8"
    );
    let e = decode_utf8(Path::new("x.txt"), b"\xff\xfea\x00").unwrap_err();
    assert_eq!(e.to_string(), "x.txt: the file is UTF-16; save it as UTF-8");
}

#[test]
fn formats_come_from_extensions_or_the_flag() {
    assert_eq!(
        Format::from_extension(Path::new("a.TXT")),
        Some(Format::Text)
    );
    assert_eq!(
        Format::from_extension(Path::new("a.jsonl")),
        Some(Format::Jsonl)
    );
    assert_eq!(Format::from_extension(Path::new("a.csv")), None);
    assert_eq!(Format::from_extension(Path::new("prompts")), None);
    assert_eq!("JSONL".parse::<Format>().unwrap(), Format::Jsonl);
    assert_eq!("a1111".parse::<Format>().unwrap(), Format::Text);
    assert!("csv".parse::<Format>().is_err());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("list.csv");
    fs::write(&p, "a cat\n").unwrap();
    let e = read_prompt_file(&p, None).unwrap_err().to_string();
    assert!(e.contains("pass --format text or --format jsonl"), "{e}");
    assert_eq!(
        read_prompt_file(&p, Some(Format::Text))
            .unwrap()
            .lines
            .len(),
        1
    );
    let e = read_prompt_file(&dir.path().join("none.txt"), None).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

// -- plan -------------------------------------------------------------------------------

fn defaults() -> Defaults {
    Defaults {
        negative_prompt: "ugly".into(),
        sampling: Sampling {
            width: 64,
            height: 64,
            steps: 3,
            guidance: 7.5,
            scheduler: SchedulerKind::Pndm,
            karras: false,
            rng: RngKind::Torch,
            size_conditioning: Default::default(),
            preview_every: None,
            text: Default::default(),
            image: None,
        },
        repeat: 2,
    }
}

fn no_check(_: &Job) -> Result<()> {
    Ok(())
}

#[test]
fn defaults_apply_and_lines_override_them() {
    let f = text(
        "a cat\n--prompt dog --negative_prompt none --steps 5 --cfg_scale 1 --width 96 \
         --sampler_name 'Euler Karras' --seed 100 --n_iter 3\n--prompt fox --batch_size 1\n",
    );
    let plan = Plan::new(&[f], &defaults(), 1000, &no_check);
    assert!(plan.errors.is_empty());
    let summary: Vec<(usize, &str, u64, SeedFrom)> = plan
        .jobs
        .iter()
        .map(|j| (j.index, j.prompt.as_str(), j.seed, j.seed_from))
        .collect();
    assert_eq!(
        summary,
        [
            // Defaults: repeat 2, run seed + index.
            (0, "a cat", 1000, SeedFrom::Run),
            (1, "a cat", 1001, SeedFrom::Run),
            // Own seed: seed + k, n_iter 3 overrides repeat.
            (2, "dog", 100, SeedFrom::Line),
            (3, "dog", 101, SeedFrom::Line),
            (4, "dog", 102, SeedFrom::Line),
            // batch_size 1 alone: one image.
            (5, "fox", 1005, SeedFrom::Run),
        ]
    );
    let cat = &plan.jobs[0];
    assert_eq!(cat.negative_prompt, "ugly");
    assert_eq!(
        (cat.sampling.width, cat.sampling.height, cat.sampling.steps),
        (64, 64, 3)
    );
    assert_eq!(cat.sampling.scheduler, SchedulerKind::Pndm);
    let dog = &plan.jobs[2];
    assert_eq!(dog.negative_prompt, "none");
    assert_eq!((dog.sampling.width, dog.sampling.height), (96, 64));
    assert_eq!((dog.sampling.steps, dog.sampling.guidance), (5, 1.0));
    assert_eq!(
        (dog.sampling.scheduler, dog.sampling.karras),
        (SchedulerKind::Euler, true)
    );
    assert_eq!(dog.source(), "p.txt:2");
}

#[test]
fn validation_failures_become_line_errors_and_make_no_items() {
    let f = text("a cat\n--prompt dog --width 100\n--prompt x --bad 1\nfox\n");
    let check = |j: &Job| {
        if j.sampling.width.is_multiple_of(8) {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "--width {}: must be a positive multiple of 8",
                j.sampling.width
            )))
        }
    };
    let plan = Plan::new(&[f], &defaults(), 0, &check);
    let errs: Vec<String> = plan.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 2);
    assert_eq!(
        errs[0],
        "p.txt:2: --width 100: must be a positive multiple of 8"
    );
    assert!(errs[1].starts_with("p.txt:3: unknown option --bad"));
    let got: Vec<(usize, &str)> = plan
        .jobs
        .iter()
        .map(|j| (j.index, j.prompt.as_str()))
        .collect();
    assert_eq!(got, [(0, "a cat"), (1, "a cat"), (2, "fox"), (3, "fox")]);
}

#[test]
fn indices_run_on_across_files() {
    let a = text("one\n");
    let b = parse_prompt_text(
        Path::new("b.jsonl"),
        "{\"prompt\": \"two\"}\n",
        Format::Jsonl,
    )
    .unwrap();
    let plan = Plan::new(&[a, b], &defaults(), 7, &no_check);
    let got: Vec<(usize, u64, String)> = plan
        .jobs
        .iter()
        .map(|j| (j.index, j.seed, j.source()))
        .collect();
    assert_eq!(
        got,
        [
            (0, 7, "p.txt:1".to_string()),
            (1, 8, "p.txt:1".to_string()),
            (2, 9, "b.jsonl:1".to_string()),
            (3, 10, "b.jsonl:1".to_string()),
        ]
    );
}

#[test]
fn seed_overflow_is_a_line_error() {
    let f = text(&format!("--prompt x --seed {} --n_iter 2\n", u64::MAX));
    let plan = Plan::new(&[f], &defaults(), 0, &no_check);
    assert_eq!(plan.jobs.len(), 0);
    assert_eq!(
        plan.errors[0].to_string(),
        "p.txt:1: the seed + image number overflows 64 bits"
    );
}

// -- grouping ---------------------------------------------------------------------------

#[test]
fn groups_share_every_sampling_setting_and_keep_item_order() {
    let f = text(
        "a\n--prompt b --steps 4\n--prompt c --negative_prompt other --seed 9\n\
         --prompt d --cfg_scale 7.5\n--prompt e --cfg_scale 7.25\n--prompt f --sampler_name DDIM\n\
         --prompt g --width 72\n--prompt h --steps 4\n",
    );
    let mut d = defaults();
    d.repeat = 1;
    let plan = Plan::new(&[f], &d, 0, &no_check);
    let groups = group_jobs(&plan.jobs);
    let prompts: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.jobs.iter().map(|j| j.prompt.as_str()).collect())
        .collect();
    assert_eq!(
        prompts,
        [
            vec!["a", "c", "d"],
            vec!["b", "h"],
            vec!["e"],
            vec!["f"],
            vec!["g"]
        ]
    );
    let sizes: Vec<usize> = groups[0].batches(2).map(|b| b.len()).collect();
    assert_eq!(sizes, [2, 1]);
    let sizes: Vec<usize> = groups[0].batches(4).map(|b| b.len()).collect();
    assert_eq!(sizes, [3]);
}

#[test]
fn lines_with_other_lora_tags_do_not_share_a_group() {
    let f = text(
        "a <lora:x:0.5>\nb\nc <lora:y><lora:x:0.5>\nd<lora:x:0.5>\ne <lora:x:0.5><lora:y:1>\n",
    );
    let mut d = defaults();
    d.repeat = 1;
    let plan = Plan::new(&[f], &d, 0, &no_check);
    let groups = group_jobs(&plan.jobs);
    let first_words: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.jobs.iter().map(|j| &j.prompt[..1]).collect())
        .collect();
    // The same tags in another order are the same set of LoRAs.
    assert_eq!(first_words, [vec!["a", "d"], vec!["b"], vec!["c", "e"]]);
}

// -- names ------------------------------------------------------------------------------

fn job(index: usize, seed: u64, prompt: &str) -> Job {
    Job {
        index,
        path: PathBuf::from("dir/My Prompts.txt"),
        line: 4,
        prompt: prompt.into(),
        negative_prompt: String::new(),
        sampling: defaults().sampling,
        seed,
        seed_from: SeedFrom::Run,
    }
}

#[test]
fn default_template_names_files_like_a1111_with_a_slug() {
    let t: NameTemplate = DEFAULT_TEMPLATE.parse().unwrap();
    assert_eq!(
        t.render(&job(3, 42, "A photo of a cat, (masterpiece:1.2)!")),
        Path::new("00003-42-a_photo_of_a_cat_masterpiece_1_2.png")
    );
    assert_eq!(t.render(&job(123456, 1, "x")), Path::new("123456-1-x.png"));
    let t: NameTemplate = "{file}/{line}-{index:03}-{width}x{height}-{steps}-{{x}}.PNG"
        .parse()
        .unwrap();
    assert_eq!(
        t.render(&job(5, 1, "x")),
        Path::new("my_prompts/4-005-64x64-3-{x}.PNG")
    );
}

#[test]
fn bad_templates_are_refused() {
    let cases = [
        ("{index}.jpg", "must end in .png"),
        ("{nope}.png", "unknown field {nope}"),
        ("{index.png", "a `{` is never closed"),
        ("a}.png", "a `}` without `{`"),
        ("{prompt_slug:05}.png", "the only format is zero padding"),
        ("{index:5}.png", "the only format is zero padding"),
        ("/abs/{index}.png", "must be a relative path"),
        ("../{index}.png", "must be a relative path"),
        ("a//{index}.png", "must be a relative path"),
        (r"a\{index}.png", "use / for subfolders"),
    ];
    for (t, want) in cases {
        let e = t.parse::<NameTemplate>().unwrap_err().to_string();
        assert!(e.contains(want), "{t}: got {e}, want {want}");
    }
}

#[test]
fn templates_that_give_two_items_one_name_are_refused() {
    let t: NameTemplate = "{prompt_slug}.png".parse().unwrap();
    let e = t
        .assign(&[job(0, 1, "cat"), job(1, 2, "dog"), job(2, 3, "cat")])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--filename gives items 0 (dir/My Prompts.txt:4) and 2 (dir/My Prompts.txt:4) the \
         same file cat.png; add {index} to the template"
    );
    let t: NameTemplate = DEFAULT_TEMPLATE.parse().unwrap();
    assert_eq!(
        t.assign(&[job(0, 1, "cat"), job(1, 1, "cat")])
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn slugs_are_safe_short_and_never_empty() {
    assert_eq!(prompt_slug("Hello, World!"), "hello_world");
    assert_eq!(prompt_slug("  ../../etc/passwd  "), "etc_passwd");
    assert_eq!(prompt_slug("a:b*c?d\"e<f>g|h\\i/j"), "a_b_c_d_e_f_g_h_i_j");
    assert_eq!(prompt_slug("Ünïcödé 猫 ok"), "ünïcödé_猫_ok");
    assert_eq!(prompt_slug("!!!"), "prompt");
    assert_eq!(prompt_slug(""), "prompt");
    assert_eq!(prompt_slug("CON"), "con_");
    assert_eq!(prompt_slug("com1"), "com1_");
    assert_eq!(prompt_slug("console"), "console");
    let long = "word ".repeat(40);
    let s = prompt_slug(&long);
    assert!(s.len() <= SLUG_MAX_BYTES, "{s}");
    assert!(s.ends_with("word"), "cut at a word boundary: {s}");
    let one_word = "x".repeat(100);
    assert_eq!(prompt_slug(&one_word).len(), SLUG_MAX_BYTES);
    // Multi-byte characters are never split.
    let cats = "猫".repeat(40);
    let s = prompt_slug(&cats);
    assert!(
        s.len() <= SLUG_MAX_BYTES && s.chars().all(|c| c == '猫'),
        "{s}"
    );
}

// -- manifest ---------------------------------------------------------------------------

fn run_info(model: &str, dtype: &str, vae: Option<&str>) -> RunInfo {
    RunInfo {
        run_seed: 1,
        model: model.into(),
        device: "Cpu".into(),
        dtype: dtype.into(),
        vae: vae.map(str::to_string),
        loras: None,
    }
}

fn tiny() -> RunInfo {
    run_info("tiny", "f32", None)
}

fn record_in(j: &Job, file: &str, run: &RunInfo) -> Record {
    Record::new(j, Path::new(file), run, Some(2), "params".into(), None)
}

fn record(j: &Job, file: &str) -> Record {
    record_in(j, file, &tiny())
}

#[test]
fn manifest_round_trips_and_keys_match_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out").join(MANIFEST_NAME);
    let mut j = job(0, 5, "cat");
    j.sampling.guidance = 0.1 + 0.2; // not exactly representable in decimal
    let r0 = record(&j, "a/x.png");
    {
        let (mut m, contents) = Manifest::open(&path).unwrap();
        assert!(contents.records.is_empty());
        m.append(&r0).unwrap();
        m.append(&record(&job(1, 6, "dog"), "y.png")).unwrap();
    }
    let c = Manifest::read(&path).unwrap();
    assert_eq!(c.records.len(), 2);
    assert_eq!(c.records[0], r0);
    assert_eq!(c.records[0].key(), j.key(&tiny()));
    assert_ne!(
        c.records[0].key(),
        j.key(&run_info("other model", "f32", None))
    );
    // An image made in another dtype or with another VAE has other pixels: not the same item.
    assert_ne!(c.records[0].key(), j.key(&run_info("tiny", "bf16", None)));
    assert_ne!(
        c.records[0].key(),
        j.key(&run_info("tiny", "f32", Some("taesd")))
    );
    assert_eq!(c.records[0].file, "a/x.png");
    assert_eq!(c.records[0].sampler_name, "PLMS");

    // Only records whose file exists count as finished.
    let out = dir.path().join("out");
    fs::write(out.join("y.png"), b"").unwrap();
    let finished = Finished::new(&out, &c.records);
    assert_eq!(finished.len(), 1);
    assert_eq!(finished.file(&job(1, 6, "dog").key(&tiny())), Some("y.png"));
    assert_eq!(finished.file(&j.key(&tiny())), None);
}

#[test]
fn records_without_a_vae_field_read_and_the_last_record_of_a_file_counts() {
    let dir = tempfile::tempdir().unwrap();
    let j = job(0, 5, "cat");
    // A record as runs before the `vae` field wrote it.
    let mut old = serde_json::to_value(record(&j, "x.png")).unwrap();
    assert!(
        old.get("vae").is_none(),
        "no vae key when none replaced the model's"
    );
    old.as_object_mut().unwrap().remove("vae");
    let old: Record = serde_json::from_value(old).unwrap();
    assert_eq!(old.vae, None);
    assert_eq!(old.key(), j.key(&tiny()));

    // The same file remade in bf16 with --overwrite: the f32 item is no longer finished.
    fs::write(dir.path().join("x.png"), b"").unwrap();
    let bf16 = run_info("tiny", "bf16", None);
    let records = [old, record_in(&j, "x.png", &bf16)];
    let finished = Finished::new(dir.path(), &records);
    assert_eq!(finished.len(), 1);
    assert_eq!(finished.file(&j.key(&bf16)), Some("x.png"));
    assert_eq!(finished.file(&j.key(&tiny())), None);
}

#[test]
fn a_torn_last_record_is_dropped_and_a_corrupt_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(MANIFEST_NAME);
    let good = serde_json::to_string(&record(&job(0, 5, "cat"), "x.png")).unwrap();
    fs::write(&path, format!("{good}\n{}", &good[..good.len() / 2])).unwrap();
    let (mut m, c) = Manifest::open(&path).unwrap();
    assert_eq!(c.records.len(), 1);
    assert!(c.torn.is_some());
    m.append(&record(&job(1, 6, "dog"), "y.png")).unwrap();
    drop(m);
    let c = Manifest::read(&path).unwrap();
    assert_eq!(c.records.len(), 2);
    assert!(c.torn.is_none());

    // A complete last record without its newline is kept and the line ended.
    fs::write(&path, &good).unwrap();
    let (mut m, c) = Manifest::open(&path).unwrap();
    assert_eq!((c.records.len(), c.torn.is_none()), (1, true));
    m.append(&record(&job(1, 6, "dog"), "y.png")).unwrap();
    assert_eq!(Manifest::read(&path).unwrap().records.len(), 2);

    fs::write(&path, format!("{good}\n{{broken\n{good}\n")).unwrap();
    let e = Manifest::read(&path).unwrap_err().to_string();
    assert!(e.contains("manifest.jsonl:2: not a manifest record"), "{e}");
    assert!(Manifest::open(&path).is_err());
}
