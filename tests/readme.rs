//! README.md kept in step with the binary: each subcommand's synopsis (the fenced block after
//! `<!-- synopsis: NAME -->`) names exactly the flags of `latent NAME --help`, every subcommand
//! has one, and every command of a block marked `<!-- offline-test -->` runs offline with the
//! demo model (steps cut to 2) and leaves the files the README says it makes.
//!
//! To extend: a new subcommand needs a `<!-- synopsis: NAME -->` block (the test finds the
//! subcommands in `latent --help`); a new flag needs a place in its synopsis; a new offline
//! example needs an [`expect`] rule when its subcommand is not yet known there.
// The offline run links the repository's folders into its working folder.
#![cfg(unix)]
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Flags every subcommand has and no synopsis needs to list.
const UNIVERSAL: &[&str] = &["--help", "-h", "--version", "-V"];

fn readme() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latent"))
        .args(args)
        .output()
        .expect("run latent")
}

/// The subcommands `latent --help` lists (its "Commands:" section), without `help`.
fn subcommands() -> Vec<String> {
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // Wrapped descriptions are indented further than the names.
        .filter(|l| !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

/// The flags `latent NAME --help` documents: long and short options and their aliases.
fn help_flags(name: &str) -> BTreeSet<String> {
    let o = run(&[name, "--help"]);
    assert!(o.status.success(), "latent {name} --help failed");
    let help = String::from_utf8(o.stdout).unwrap();
    let mut flags = BTreeSet::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        // Option lines: `  -m, --model <MODEL>  text` or `      --karras`; wrapped
        // descriptions are indented further.
        let indent = line.len() - trimmed.len();
        if (2..=6).contains(&indent) && trimmed.starts_with('-') {
            for word in trimmed.split_whitespace() {
                let word = word.trim_end_matches(',');
                if !word.starts_with('-') {
                    break;
                }
                flags.insert(word.to_string());
            }
        }
    }
    // `[alias: --neg]`, `[aliases: --a, --b]`, possibly wrapped over two lines.
    let joined = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for marker in [
        "[alias: ",
        "[aliases: ",
        "[short alias: ",
        "[short aliases: ",
    ] {
        for part in joined.split(marker).skip(1) {
            let list = part.split(']').next().unwrap_or_default();
            for alias in list.split(',') {
                let alias = alias.trim();
                let alias = if alias.starts_with('-') {
                    alias.to_string()
                } else if alias.len() == 1 {
                    format!("-{alias}")
                } else {
                    format!("--{alias}")
                };
                flags.insert(alias);
            }
        }
    }
    flags
}

/// The fenced block right after each `<!-- MARKER -->` line (blank lines between allowed).
fn blocks_after(text: &str, marker: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != marker {
            continue;
        }
        let mut j = i + 1;
        while j < lines.len() && lines[j].trim().is_empty() {
            j += 1;
        }
        assert!(
            j < lines.len() && lines[j].starts_with("```"),
            "README line {}: `{marker}` must be followed by a fenced block",
            i + 1
        );
        let body: Vec<&str> = lines[j + 1..]
            .iter()
            .take_while(|l| !l.starts_with("```"))
            .copied()
            .collect();
        blocks.push(body.join("\n"));
    }
    blocks
}

/// The flags a synopsis names: words starting with `-` once brackets, bars, slashes and commas
/// are taken as separators (`[-n/--num-images N]`, `[--format webp|apng|mp4]...`).
fn synopsis_flags(synopsis: &str) -> BTreeSet<String> {
    synopsis
        .replace(['[', ']', '|', '/', ',', '(', ')', ':'], " ")
        .split_whitespace()
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| {
            (w.starts_with("--") && w.len() > 2)
                || (w.len() == 2 && w.starts_with('-') && w.as_bytes()[1].is_ascii_alphabetic())
        })
        .map(String::from)
        .collect()
}

#[test]
fn every_subcommand_synopsis_names_exactly_the_flags_of_its_help() {
    let text = readme();
    let names = subcommands();
    assert!(
        names.len() >= 5,
        "subcommands parsed from latent --help: {names:?}"
    );
    let mut problems = Vec::new();
    for name in &names {
        let blocks = blocks_after(&text, &format!("<!-- synopsis: {name} -->"));
        if blocks.len() != 1 {
            problems.push(format!(
                "`latent {name}`: README.md has {} `<!-- synopsis: {name} -->` blocks; add exactly \
                 one (a fenced block of its usage lines) under its section",
                blocks.len()
            ));
            continue;
        }
        let documented = synopsis_flags(&blocks[0]);
        let real = help_flags(name);
        for flag in real.difference(&documented) {
            if !UNIVERSAL.contains(&flag.as_str()) {
                problems.push(format!(
                    "`latent {name} --help` has {flag}, but the README synopsis of `latent {name}` \
                     does not list it"
                ));
            }
        }
        for flag in documented.difference(&real) {
            problems.push(format!(
                "the README synopsis of `latent {name}` lists {flag}, which `latent {name} --help` \
                 does not have"
            ));
        }
    }
    // A synopsis marker for a subcommand the binary lacks is stale.
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("<!-- synopsis: ") {
            let name = rest.trim_end_matches("-->").trim();
            if !names.iter().any(|n| n == name) {
                problems.push(format!(
                    "README.md has a synopsis for `latent {name}`, which the binary does not have"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

/// The commands of the marked blocks, continuation lines joined, comments dropped, each split
/// into words as a shell would (quotes; no variables or globs: those the runner expands).
fn offline_commands(text: &str) -> Vec<(String, Vec<String>)> {
    let mut commands = Vec::new();
    for block in blocks_after(text, "<!-- offline-test -->") {
        let mut current = String::new();
        for line in block.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                current.push_str(head);
                current.push(' ');
                continue;
            }
            current.push_str(line);
            let words = latent::batch::split_words(&current)
                .unwrap_or_else(|e| panic!("README command `{current}`: {e}"));
            commands.push((std::mem::take(&mut current), words));
        }
    }
    commands
}

/// `cargo run --release -- ARGS` and `latent ARGS` both become the binary's ARGS.
fn latent_args(words: &[String]) -> Option<Vec<String>> {
    match words {
        [first, rest @ ..] if first == "latent" => Some(rest.to_vec()),
        [c, r, rel, dd, rest @ ..]
            if c == "cargo" && r == "run" && rel == "--release" && dd == "--" =>
        {
            Some(rest.to_vec())
        }
        _ => None,
    }
}

/// The value of the first of `names` in `args`.
fn value<'a>(args: &'a [String], names: &[&str]) -> Option<&'a str> {
    args.iter()
        .position(|a| names.contains(&a.as_str()))
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Cuts the sampling steps to 2 (file names do not depend on them), so the examples run fast.
fn quick(mut args: Vec<String>) -> Vec<String> {
    if !matches!(
        args.first().map(String::as_str),
        Some("generate" | "walk" | "batch" | "bench")
    ) {
        return args;
    }
    match args.iter().position(|a| a == "--steps" || a == "-s") {
        Some(i) if i + 1 < args.len() => args[i + 1] = "2".into(),
        _ => args.extend(["--steps".into(), "2".into()]),
    }
    args
}

/// `dir/*.ext`-style words expanded against the working folder, sorted, as a shell would.
fn expand_globs(args: Vec<String>, cwd: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for a in args {
        let Some((prefix, suffix)) = a.split_once('*') else {
            out.push(a);
            continue;
        };
        let (dir, stem) = match prefix.rsplit_once('/') {
            Some((d, s)) => (d.to_string(), s.to_string()),
            None => (String::new(), prefix.to_string()),
        };
        let mut hits: Vec<String> = fs::read_dir(cwd.join(&dir))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&stem) && n.ends_with(suffix) && !n.starts_with('.'))
                    .map(|n| {
                        if dir.is_empty() {
                            n
                        } else {
                            format!("{dir}/{n}")
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        hits.sort();
        assert!(!hits.is_empty(), "README glob {a} matches nothing");
        out.extend(hits);
    }
    out
}

/// Every file under `dir` (relative paths).
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if !e.file_type().map(|t| t.is_symlink()).unwrap_or(false) {
                    stack.push(p);
                }
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.insert(rel.to_path_buf());
            }
        }
    }
    out
}

/// What a README command must have done, checked against the files before and after it; an
/// error says what is missing. Add a rule here for a new subcommand's examples.
fn expect(args: &[String], new: &BTreeSet<PathBuf>, cwd: &Path, o: &Output) -> Result<(), String> {
    let new_in = |dir: &str, suffix: &str| {
        new.iter()
            .filter(|p| p.starts_with(dir) && p.to_string_lossy().ends_with(suffix))
            .count()
    };
    let out = value(args, &["-o", "--output"]);
    match args[0].as_str() {
        "generate" => {
            let n: usize = value(args, &["-n", "--num-images"]).map_or(1, |v| v.parse().unwrap());
            match out {
                Some(file) if file.ends_with(".png") && n == 1 => {
                    if !cwd.join(file).is_file() {
                        return Err(format!("{file} was not written"));
                    }
                }
                Some(dir) if !dir.ends_with(".png") => {
                    if new_in(dir, ".png") < n {
                        return Err(format!("{n} new PNG(s) expected in {dir}/"));
                    }
                }
                Some(_) => {}
                None => {
                    if new_in("outputs", ".png") < n {
                        return Err(format!("{n} new PNG(s) expected in outputs/"));
                    }
                }
            }
        }
        "walk" => {
            let dir = match out {
                Some(d) => PathBuf::from(d),
                None => new
                    .iter()
                    .find(|p| p.ends_with("walk.gif") && p.starts_with("outputs"))
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .ok_or("no new outputs/walk-N/walk.gif")?,
            };
            let formats = args
                .iter()
                .enumerate()
                .filter(|(_, a)| *a == "--format")
                .filter_map(|(i, _)| args.get(i + 1))
                .flat_map(|v| v.split(',').map(String::from).collect::<Vec<_>>());
            for name in std::iter::once("gif".to_string())
                .chain(formats)
                .map(|f| format!("walk.{f}"))
                .chain(["walk.json".into(), "frame-00000.png".into()])
            {
                if !cwd.join(&dir).join(&name).is_file() {
                    return Err(format!("{} was not written", dir.join(name).display()));
                }
            }
        }
        "batch" => {
            let first = args
                .iter()
                .skip(1)
                .find(|a| a.contains('.') && !a.starts_with('-'))
                .ok_or("no prompt file")?;
            let stem = Path::new(first).file_stem().unwrap().to_string_lossy();
            let dir = out.map_or_else(|| format!("outputs/{stem}"), String::from);
            if args.iter().any(|a| a == "--check") {
                if new.iter().any(|p| p.starts_with(&dir)) {
                    return Err(format!("--check wrote into {dir}"));
                }
            } else if !new.contains(&PathBuf::from(&dir).join("manifest.jsonl"))
                && !cwd.join(&dir).join("manifest.jsonl").is_file()
            {
                return Err(format!("{dir}/manifest.jsonl was not written"));
            }
        }
        "info" => {
            let stdout = String::from_utf8_lossy(&o.stdout);
            let files = args.len() - 1;
            if stdout.matches("Steps: ").count() != files {
                return Err(format!(
                    "expected the parameters of {files} files: {stdout}"
                ));
            }
        }
        "bench" => {
            if !String::from_utf8_lossy(&o.stdout).contains("UNet step") {
                return Err("no UNet step time printed".into());
            }
        }
        other => {
            return Err(format!(
                "no rule for `latent {other}` in tests/readme.rs `expect`"
            ))
        }
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

#[test]
fn offline_readme_commands_run_and_make_what_the_text_says() {
    let text = readme();
    let commands = offline_commands(&text);
    assert!(
        commands.len() >= 8,
        "offline README commands found: {}",
        commands.len()
    );
    // One working folder for all, in README order (info reads what generate made), holding the
    // repository's prompts/ and tests/ as the README's relative paths expect.
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path().join("repo");
    fs::create_dir(&cwd).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["prompts", "tests"] {
        std::os::unix::fs::symlink(root.join(dir), cwd.join(dir)).unwrap();
    }
    let cache = work.path().join("cache");
    let ffmpeg = on_path("ffmpeg");
    let mut problems = Vec::new();
    let mut ran: HashMap<&str, usize> = HashMap::new();
    for (line, words) in &commands {
        let Some(args) = latent_args(words) else {
            problems.push(format!("`{line}`: an offline README command must start with `latent` or `cargo run --release --`"));
            continue;
        };
        if args.iter().any(|a| a.contains("mp4")) && !ffmpeg {
            assert!(
                std::env::var_os("LATENT_REQUIRE_FFMPEG").is_none(),
                "LATENT_REQUIRE_FFMPEG=1 but ffmpeg is not on PATH"
            );
            eprintln!("note: ffmpeg not on PATH; skipping `{line}`");
            continue;
        }
        let args = expand_globs(quick(args), &cwd);
        let before = tree(&cwd);
        let o = Command::new(env!("CARGO_BIN_EXE_latent"))
            .current_dir(&cwd)
            .args(&args)
            .env_remove("LATENT_MODEL")
            .env("HF_HUB_OFFLINE", "1")
            .env("LATENT_CACHE_DIR", &cache)
            .output()
            .unwrap();
        if !o.status.success() {
            problems.push(format!(
                "`{line}` (run as latent {}) exited with {:?}: {}",
                args.join(" "),
                o.status.code(),
                String::from_utf8_lossy(&o.stderr)
            ));
            continue;
        }
        let new: BTreeSet<PathBuf> = tree(&cwd).difference(&before).cloned().collect();
        if let Err(e) = expect(&args, &new, &cwd, &o) {
            problems.push(format!("`{line}`: {e}"));
        }
        *ran.entry(if args[0] == "generate" {
            "generate"
        } else {
            "other"
        })
        .or_default() += 1;
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n\n"));
    assert!(ran.get("generate").copied().unwrap_or(0) >= 2, "{ran:?}");
}

#[test]
fn the_synopsis_parser_reads_brackets_aliases_and_shorts() {
    let flags = synopsis_flags(
        "latent x PROMPT [-m/--model M] [-g/--guidance/--cfg 7.5] [--format webp|apng]... \
         [--scheduler dpm++2m|euler-a] [--shard I/N|auto]",
    );
    let want: BTreeSet<String> = [
        "-m",
        "--model",
        "-g",
        "--guidance",
        "--cfg",
        "--format",
        "--scheduler",
        "--shard",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(flags, want);
}
