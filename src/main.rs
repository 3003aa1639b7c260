//! The `latent` command: parse arguments, call the library, print one clear line on error.
mod cli;
mod commands;
mod progress;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    latent::kernels::keep_freed_memory();
    let result = match cli.command {
        cli::Command::Generate(args) => commands::generate(*args),
        cli::Command::Batch(args) => commands::batch(*args),
        cli::Command::Walk(args) => commands::walk(*args),
        cli::Command::Bench(args) => commands::bench(*args),
        cli::Command::Serve(args) => commands::serve(*args),
        cli::Command::Info { files } => commands::info(&files),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already show their cause in their message; print each cause
            // only when it adds something.
            let mut line = String::new();
            for cause in e.chain() {
                let text = match cause.downcast_ref::<latent::Error>() {
                    Some(err) => cli::describe(err),
                    None => cause.to_string(),
                };
                if !line.contains(&text) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&text);
                }
            }
            eprintln!("error: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}
